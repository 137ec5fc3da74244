"""Property tests: Lion.step() on every CPU backend equals reference.py on random inputs."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs

from lion8bit import Lion, quant
from lion8bit import momentum as mom

from helpers import native_cpu_backends, reference_steps


@hs.composite
def cases(draw):
    numel = draw(hs.sampled_from([0, 1, 7, 255, 257, 4095, 4097, 9000]))
    columns = draw(hs.sampled_from([1, 3, 17]))
    shape = (numel // columns, columns) if numel % columns == 0 and numel >= columns else (numel,)
    group = dict(
        lr=draw(hs.sampled_from([1e-5, 3e-4, 1e-2])),
        betas=(draw(hs.sampled_from([0.0, 0.9, 0.95])), draw(hs.sampled_from([0.0, 0.98, 0.99]))),
        weight_decay=draw(hs.sampled_from([0.0, 0.1, 1.0])),
        state=draw(hs.sampled_from(mom.STATE_KINDS)),
        block_size=draw(hs.sampled_from([64, 256, 1024])),
        min_8bit_size=draw(hs.sampled_from([0, 4096])),
        cautious_factor=draw(hs.sampled_from([1.0, 0.5, 0.0])),
        cautious_weight_decay=draw(hs.booleans()),
        decoupled_weight_decay=draw(hs.booleans()),
        stochastic_rounding=draw(hs.booleans()),
        maximize=draw(hs.booleans()),
    )
    dtype = draw(hs.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    grad_fp32 = draw(hs.booleans())
    scale = draw(hs.sampled_from([1e-8, 1e-2, 10.0]))
    return shape, group, dtype, grad_fp32, scale, draw(hs.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", native_cpu_backends())
@given(case=cases())
def test_step_equals_reference(backend, case):
    shape, group, dtype, grad_fp32, scale, seed = case
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(shape, generator=generator).to(dtype)
    grads = [(torch.randn(shape, generator=generator) * scale) for _ in range(3)]
    param = torch.nn.Parameter(start.clone())
    if grad_fp32:
        param.grad_dtype = torch.float32
    optimizer = Lion([param], backend=backend, **group)

    expected = start.clone()
    fmt = mom.momentum_format(expected.numel(), group["state"], group["min_8bit_size"])
    entry = {mom.STEP: 0, **mom.new_momentum(expected, fmt, group["block_size"])}
    if group["stochastic_rounding"] or group["state"] == "4bit":  # 4-bit momentum always rounds stochastically
        entry[mom.SR_SEED] = quant.mix32(0)
    for g in grads:
        g = g if grad_fp32 else g.to(dtype)
        param.grad = g.clone()
        optimizer.step()
        entry[mom.STEP] += 1
        reference_steps(
            [expected], [g], [entry], [fmt], {**group, "decoupled_initial_lr": group["lr"]},
            block_size=group["block_size"],
        )
    assert torch.equal(param.detach(), expected)
    ours = optimizer.state[param]
    for key, value in entry.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key
