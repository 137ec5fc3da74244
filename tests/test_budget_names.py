"""One vocabulary of optimizer names: the budget, the examples and the step benchmark use it alike.

A name must mean the same optimizer in all three places: the class each place builds for it
comes from the package its description names, and the state it allocates is what the budget
predicts for that name.
"""

import warnings
from pathlib import Path

import pytest
import torch

from lion8bit import budget
from lion8bit.budget.optimizers import OPTIMIZER_NAMES

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def examples():
    return load_script(ROOT / "examples" / "_common.py", "examples_common")


@pytest.fixture(scope="module")
def bench_step():
    return load_script(ROOT / "benchmarks" / "bench_step.py", "bench_step")


def test_budget_names_are_the_vocabulary():
    assert set(budget.OPTIMIZERS) <= set(OPTIMIZER_NAMES)
    assert all(rule.key == name for name, rule in budget.OPTIMIZERS.items())


def test_example_names_are_the_vocabulary(examples):
    assert set(examples.OPTIMIZERS) <= set(OPTIMIZER_NAMES)
    assert {name: OPTIMIZER_NAMES[name] for name in examples.OPTIMIZERS} == examples.OPTIMIZERS
    assert examples.REFERENCE in examples.OPTIMIZERS and set(examples.SAME_UPDATE) <= set(examples.OPTIMIZERS)


def test_benchmark_names_are_the_vocabulary(bench_step):
    names = {name for name, _ in bench_step.OPTIMIZERS}
    assert names <= set(OPTIMIZER_NAMES)
    assert all((v.optimizer, v.backend) == key for key, v in bench_step.OPTIMIZERS.items())
    listed = [bench_step.HEADLINE, *bench_step.PEERS, *bench_step.FUSED, *bench_step.REFERENCE]
    assert set(listed) <= set(bench_step.OPTIMIZERS)


def _params():
    torch.manual_seed(0)
    # one tensor above min_8bit_size (8-bit state) and one below it (fp32 state)
    params = [torch.nn.Parameter(torch.randn(80, 70)), torch.nn.Parameter(torch.randn(30))]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _state_bytes(optimizer) -> int:
    storages = {}
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def _check_meaning(name: str, optimizer, params, step: bool):
    """``optimizer``, built for ``name``, is what the vocabulary and the budget say ``name`` is."""
    package = OPTIMIZER_NAMES[name].split(".", 1)[0]
    assert type(optimizer).__module__.split(".", 1)[0] == package, (name, type(optimizer))
    if step and name in budget.OPTIMIZERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bitsandbytes on a CPU-only machine
            optimizer.step()
        predicted = budget.compare(params, "fp32", [name]).row(name).state
        assert _state_bytes(optimizer) == predicted, name


def test_example_optimizers_are_what_their_names_say(examples):
    pytest.importorskip("lion_pytorch")
    pytest.importorskip("bitsandbytes")
    args = examples.argparse.Namespace(beta1=0.9, beta2=0.99, lion_lr=1e-4, lion_wd=0.0, adamw_lr=1e-3,
                                       adamw_wd=0.0)
    for name in examples.OPTIMIZERS:
        model = torch.nn.Module()
        model.params = torch.nn.ParameterList(_params())
        _check_meaning(name, examples.make_optimizer(name, model, args), list(model.parameters()), step=True)


def test_benchmark_optimizers_are_what_their_names_say(bench_step):
    pytest.importorskip("lion_pytorch")
    pytest.importorskip("bitsandbytes")
    for (name, backend), variant in bench_step.OPTIMIZERS.items():
        params = _params()
        # The fused "cpu" backend allocates the same state as "torch" (tests/test_cpu_kernel.py);
        # stepping it here would only add a compile on a machine without the cached library.
        _check_meaning(name, variant.factory(params), params, step=backend != "cpu")
