import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests run with a fixed budget so the suite's time stays predictable on 2 cores.
settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("LION8BIT_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

# bitsandbytes prints and warns about optional GPU/kernels packages on a CPU-only machine.
warnings.filterwarnings("ignore", module="bitsandbytes")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
