"""reference.py against an independent float64 loop written from the paper's formulas."""

import itertools

import numpy as np
import pytest
import torch

from lion8bit import reference

from helpers import written_rounding_key

STEPS = 8
OPTIONS = list(
    itertools.product(
        [1.0, 0.5, 0.0],  # cautious_factor
        [False, True],  # cautious_weight_decay
        [False, True],  # decoupled_weight_decay
        [False, True],  # maximize
        [0.0, 0.3],  # weight_decay
    )
)
# float64 on both sides; they differ only in the summation order of the cautious mean and in
# where lr multiplies (lr*(u*s/mean) vs u*(lr/mean)): a few ulps. The smallest real effect of a
# wrong rule (a decay factor lr*wd = 1.5e-4 applied or not) is eight orders of magnitude larger.
FLOAT64_RTOL = 1e-12


def numpy_lion(param, grads, lrs, *, beta1, beta2, weight_decay, cautious_factor, cautious_wd, decoupled, maximize):
    """Lion (arXiv 2302.06675 Alg. 1) + cautious mask (lion-pytorch cautious_lion) + cautious
    weight decay (arXiv 2510.12402 Alg. 1, u*p >= 0), element by element in float64."""
    p = param.copy()
    m = np.zeros_like(p)
    initial_lr = lrs[0]
    for g, lr in zip(grads, lrs, strict=True):
        g = -g if maximize else g
        u = np.sign(beta1 * m + (1 - beta1) * g)
        if cautious_factor < 1:
            s = np.where(u * g > 0, 1.0, cautious_factor)
            u = u * s / max(s.mean(), 1e-5)
        wd = weight_decay / initial_lr if decoupled else weight_decay
        if weight_decay > 0:
            mask = (u * p >= 0) if cautious_wd else np.ones_like(p, dtype=bool)
            p = np.where(mask, p * (1 - lr * wd), p)
        p = p - lr * u
        m = beta2 * m + (1 - beta2) * g
    return p, m


@pytest.mark.parametrize("cautious_factor, cautious_wd, decoupled, maximize, weight_decay", OPTIONS)
def test_reference_matches_independent_float64_loop(cautious_factor, cautious_wd, decoupled, maximize, weight_decay):
    rng = np.random.default_rng(1)
    shape = (37, 29)
    param = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) * 0.01 for _ in range(STEPS)]
    for g in grads:
        g[rng.random(shape) < 0.05] = 0.0  # sign(0) = 0 paths: c == 0 on the first step
    lrs = [5e-4 * (1 - 0.1 * t) for t in range(STEPS)]  # a schedule, for decoupled decay
    betas = (0.9, 0.99)

    expected_p, expected_m = numpy_lion(
        param, grads, lrs, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay,
        cautious_factor=cautious_factor, cautious_wd=cautious_wd, decoupled=decoupled, maximize=maximize,
    )

    p = torch.from_numpy(param)
    m = torch.zeros_like(p)
    for g, lr in zip(grads, lrs, strict=True):
        group = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, decoupled_initial_lr=lrs[0],
            decoupled_weight_decay=decoupled, cautious_factor=cautious_factor,
            cautious_weight_decay=cautious_wd, maximize=maximize,
        )
        p, m = reference.lion_update(p, torch.from_numpy(g), m, reference.lion_scalars(group))

    assert p.dtype == torch.float64
    np.testing.assert_allclose(p.numpy(), expected_p, rtol=FLOAT64_RTOL, atol=0)
    np.testing.assert_allclose(m.numpy(), expected_m, rtol=FLOAT64_RTOL, atol=0)


def test_cautious_step_sizes_from_the_count():
    numel, factor, lr = 1000, 0.25, 1e-3
    steps = reference.cautious_step_sizes(torch.tensor(600), numel, lr, factor, torch.float64)
    mean = (600 + 400 * factor) / numel
    assert steps.tolist() == pytest.approx([lr / mean, lr * factor / mean], rel=1e-15)
    # All misaligned with factor 0: the mean is floored at 1e-5, never a division by zero.
    floored = reference.cautious_step_sizes(torch.tensor(0), numel, lr, 0.0, torch.float32)
    assert floored.tolist() == pytest.approx([lr / 1e-5, 0.0])


@pytest.mark.parametrize("seed", [0, 7, 0xDEADBEEF, 2**32 - 1])
@pytest.mark.parametrize("step", [1, 2, 1000, 2**32 + 5])
def test_rounding_keys_are_the_written_formula_of_this_step(seed, step):
    """The stochastic-rounding keys of a step with ``step`` counting it (the first step uses 1):
    quant.rounding_key's formula, written out again in tests/helpers.py, on streams 0 (params)
    and 1 (momentum). The conformance suite's oracle keys with the same formula, so a backend or
    the functional using another step (e.g. step - 1) differs from it."""
    assert reference.rounding_keys(seed, step) == (
        written_rounding_key(seed, step, 0),
        written_rounding_key(seed, step, 1),
    )
    assert reference.rounding_keys(seed, step) != reference.rounding_keys(seed, step - 1)
