"""The step under torch.compile: one graph, no graph break, no warning of ours, the eager bits.

backend="cpu" is two torch.library custom ops (lion8bit::cpu_step, lion8bit::cpu_aligned_counts)
that Dynamo treats as opaque mutating calls; backend="torch" is plain torch ops. The "triton"
backend's ops are checked in tests/test_triton_kernel.py.
"""

import copy
import warnings

import pytest
import torch

from lion8bit import Lion
from lion8bit import momentum as mom
from lion8bit.kernels import cpu_lion
from lion8bit.reference import lion_scalars

from helpers import LR, batch, group_of, native_cpu_backends

OPTION_SETS = {
    "plain": dict(weight_decay=0.1),
    "cautious+sr": dict(weight_decay=0.1, cautious_factor=0.5, cautious_weight_decay=True, stochastic_rounding=True),
    "bf16-state+maximize": dict(state="bf16", weight_decay=0.1, maximize=True, decoupled_weight_decay=True),
}


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.ReLU(), torch.nn.Linear(80, 64))
    return model.to(dtype)


def _set_grads(model, step):
    generator = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=generator) * 0.01).to(p.dtype)


@pytest.mark.parametrize("backend", native_cpu_backends())
@pytest.mark.parametrize("options", list(OPTION_SETS), ids=str)
def test_the_step_is_one_graph_without_breaks_or_warnings(backend, options):
    model = _model()
    optimizer = Lion(model.parameters(), lr=LR, backend=backend, **OPTION_SETS[options])
    _set_grads(model, 0)
    optimizer.step()  # the state exists: the graph of a steady step
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explained = torch._dynamo.explain(optimizer.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ours = [w for w in caught if "lion8bit" in str(w.filename) or "lru_cache" in str(w.message)]
    assert ours == [], [str(w.message) for w in ours]


# (backend, options): Inductor compiles the reference's many ops slowly, so "torch" runs without
# stochastic rounding, whose keys change every step.
COMPILED = [(b, o) for b in native_cpu_backends() for o in OPTION_SETS if not (b == "torch" and "sr" in o)]


@pytest.mark.slow
@pytest.mark.parametrize("backend, options", COMPILED, ids=[f"{b}-{o}" for b, o in COMPILED])
def test_the_compiled_step_gives_the_eager_bits(backend, options):
    eager_model = _model(torch.bfloat16)
    compiled_model = copy.deepcopy(eager_model)
    eager = Lion(eager_model.parameters(), lr=LR, backend=backend, **OPTION_SETS[options])
    compiled = Lion(compiled_model.parameters(), lr=LR, backend=backend, **OPTION_SETS[options])
    compiled_step = torch.compile(compiled.step)
    for step in range(4):
        _set_grads(eager_model, step)
        _set_grads(compiled_model, step)
        eager.step()
        compiled_step()
    for p, q in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in eager.state[p].items():
            other = compiled.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


@pytest.mark.skipif("cpu" not in native_cpu_backends(), reason="the cpu backend is not built here")
def test_the_cpu_ops_pass_opcheck():
    generator = torch.Generator().manual_seed(3)
    params, grads, entries, formats = batch([300, 4097], generator, pairings=[(torch.float32, torch.float32)])
    buffers, absmaxes, codes = cpu_lion._arguments(entries, formats, len(params))
    scalars = cpu_lion._host_scalars(lion_scalars(group_of(0.3, 0.5, False, False, False, True)))
    keys = torch.tensor([[entry[mom.SR_SEED], 7] for entry in entries], dtype=torch.int64)
    step_args = (params, grads, buffers, absmaxes, codes, scalars, 8, 256, keys, [], torch.ones(len(params), 2))
    torch.library.opcheck(cpu_lion.cpu_step, step_args)
    count_args = (params, grads, buffers, absmaxes, codes, scalars, 0, 256)
    torch.library.opcheck(cpu_lion.cpu_aligned_counts, count_args)
