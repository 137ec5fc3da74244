import os

import torch

# Without a GPU, the Triton kernels run in Triton's CPU interpreter, in this process: triton reads
# TRITON_INTERPRET when @triton.jit decorates a function (its own tl.max / tl.sum included, when
# triton.language is imported), so it is set here, before any test module imports triton
# (bitsandbytes does, at collection). An explicit TRITON_INTERPRET=0 is respected: that is how
# tests/test_triton_compile.py runs, in a process of its own (tests/test_triton_process.py),
# since kernels decorated for the interpreter cannot be compiled for a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from lion8bit.kernels import interpreting  # noqa: E402

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

# Compiling the kernels for sm_80 / sm_90 needs them decorated for the GPU compiler.
collect_ignore = ["test_triton_compile.py"] if interpreting() else []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """The reference's many small ops run 10x slower on 2 intra-op threads of a loaded 2-core
    machine (measured: 8 ms vs 0.9 ms for one searchsorted of 4097 values); the "cpu" backend
    takes its thread count from torch, and test_block_sizes_and_chunk_boundaries sets it. Used by
    the conformance suite (tests/test_backends.py, test_backends_many_tensors.py) and
    tests/test_cpu_kernel.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
