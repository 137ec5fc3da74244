"""Lion against the implementations it replaces: lion-pytorch (fp32) and bitsandbytes Lion8bit."""

import bitsandbytes as bnb
import lion_pytorch
import pytest
import torch
from lion_pytorch.cautious_lion import Lion as CautiousLionPytorch

from lion8bit import Lion, Lion8bit, quant
from lion8bit import momentum as mom

STEPS = 50
LR = 1e-3

# fp32 state vs lion-pytorch. The params come out bit-identical (measured), but lion-pytorch's
# momentum EMA uses torch's add(alpha=...), which is an FMA on AVX2 CPUs, while the spec rounds
# both products (1-ulp momentum differences), and its cautious scale is lr*(s/mean) where ours
# is (lr/mean)*s. A real error (decay applied wrongly: lr*wd*|p| ~ 1e-4) is 100x the tolerance.
FP32_STATE_TOLERANCE = dict(rtol=1e-6, atol=1e-6)

# bitsandbytes' own Lion8bit-vs-lion-pytorch test (DESIGN.md §8), per param dtype:
# (mean |dp| bound, mean relative error bound) after each step, params re-synced between steps,
# at its learning rate (the default, 1e-4: the bf16 bound depends on lr through param rounding).
BNB_TEST_LR = 1e-4
BNB_PARAM_TOLERANCE = {
    torch.float32: (6e-5, 6e-4),
    torch.float16: (6e-5, 6.2e-4),
    torch.bfloat16: (1.7e-4, 1.6e-3),
}
# The largest distance between neighbouring codes: the decade [0.1, 1] split in 64 (+ fp32 slack).
COARSEST_CODE_STEP = 0.9 / 64 * (1 + 1e-5)
BNB_STATE_ATOL, BNB_STATE_RTOL, BNB_STATE_MAX_NOT_CLOSE = 3e-3, 1e-3, 20


def momentum_of(optimizer, param) -> torch.Tensor:
    entry = optimizer.state[param]
    fmt = mom.stored_format(entry)
    return mom.decode_momentum(entry, fmt, optimizer.param_groups[0]["block_size"])


def _pair(shape, dtype=torch.float32, reference_dtype=torch.float32):
    """(reference param, our param) holding the same values: drawn in ``dtype``."""
    start = (torch.randn(shape) * 0.1).to(dtype)
    return torch.nn.Parameter(start.to(reference_dtype)), torch.nn.Parameter(start.clone())


def step_both(theirs, their_opt, ours, our_opt, steps=STEPS):
    for _ in range(steps):
        g = torch.randn(theirs.shape) * 0.01
        theirs.grad, ours.grad = g.clone(), g.clone()
        their_opt.step()
        our_opt.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("decoupled", [False, True])
def test_fp32_state_matches_lion_pytorch(weight_decay, decoupled):
    theirs, ours = _pair((300, 50))
    their_opt = lion_pytorch.Lion([theirs], lr=LR, weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    our_opt = Lion([ours], lr=LR, weight_decay=weight_decay, decoupled_weight_decay=decoupled, state="fp32")
    step_both(theirs, their_opt, ours, our_opt)
    torch.testing.assert_close(ours, theirs, **FP32_STATE_TOLERANCE)
    torch.testing.assert_close(momentum_of(our_opt, ours), their_opt.state[theirs]["exp_avg"], **FP32_STATE_TOLERANCE)


@pytest.mark.parametrize("cautious_factor, cautious_wd", [(0.5, False), (0.5, True), (0.0, False)])
def test_cautious_matches_lion_pytorch_cautious_lion(cautious_factor, cautious_wd):
    theirs, ours = _pair((300, 50))
    their_opt = CautiousLionPytorch(
        [theirs], lr=LR, weight_decay=0.1, cautious_factor=cautious_factor, cautious_wd=cautious_wd
    )
    our_opt = Lion(
        [ours], lr=LR, weight_decay=0.1, state="fp32", cautious_factor=cautious_factor, cautious_wd=cautious_wd
    )
    step_both(theirs, their_opt, ours, our_opt)
    torch.testing.assert_close(ours, theirs, **FP32_STATE_TOLERANCE)


def test_cautious_weight_decay_differs_from_lion_pytorch_only_where_the_update_is_zero():
    """f = 0 masks updates to 0; there u*p = 0, which decays under >= (the paper) and not under
    lion-pytorch's >. Everywhere else one step from the same state is identical."""
    theirs, ours = _pair((300, 50))
    their_opt = CautiousLionPytorch([theirs], lr=LR, weight_decay=0.1, cautious_factor=0.0, cautious_wd=True)
    our_opt = Lion([ours], lr=LR, weight_decay=0.1, state="fp32", cautious_factor=0.0, cautious_weight_decay=True)
    momentum = torch.randn(300, 50) * 0.01
    their_opt.state[theirs]["exp_avg"] = momentum.clone()
    g = torch.randn(300, 50) * 0.01
    theirs.grad, ours.grad = g.clone(), g.clone()
    ours.grad.zero_()
    our_opt.step()  # creates the state; then put the same momentum and param back
    our_opt.state[ours][mom.MOMENTUM].copy_(momentum)
    ours.data.copy_(theirs.data)
    ours.grad = g.clone()
    before = theirs.detach().clone()
    their_opt.step()
    our_opt.step()
    update_is_zero = torch.sign(momentum * 0.9 + g * (1 - 0.9)) * g <= 0
    assert 0.2 < update_is_zero.float().mean() < 0.8
    torch.testing.assert_close(ours[~update_is_zero], theirs[~update_is_zero], **FP32_STATE_TOLERANCE)
    assert torch.equal(theirs[update_is_zero], before[update_is_zero])
    assert torch.equal(ours[update_is_zero], before[update_is_zero] * (1 - LR * 0.1))


@pytest.mark.parametrize("dtype", list(BNB_PARAM_TOLERANCE), ids=str)
@pytest.mark.parametrize("shape", [(1024, 32), (64, 4097)], ids=["1024x32", "64x4097"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("state", ["8bit", "bf16"])
def test_within_bitsandbytes_tolerances_of_lion_pytorch(dtype, shape, weight_decay, state):
    """bitsandbytes' protocol: step both, compare, then re-sync params and momentum."""
    theirs, ours = _pair(shape, dtype)
    their_opt = lion_pytorch.Lion([theirs], lr=BNB_TEST_LR, weight_decay=weight_decay)
    our_opt = Lion([ours], lr=BNB_TEST_LR, weight_decay=weight_decay, state=state)
    mean_bound, relative_bound = BNB_PARAM_TOLERANCE[dtype]
    for _ in range(STEPS):
        g = (torch.randn(shape) * 0.01).to(dtype)
        theirs.grad, ours.grad = g.float(), g.clone()
        their_opt.step()
        our_opt.step()
        our_momentum = momentum_of(our_opt, ours)
        not_close = ~torch.isclose(
            their_opt.state[theirs]["exp_avg"], our_momentum, atol=BNB_STATE_ATOL, rtol=BNB_STATE_RTOL
        )
        assert not_close.sum() < BNB_STATE_MAX_NOT_CLOSE
        error = (theirs - ours.float()).abs()
        assert error.mean() < mean_bound
        assert (error / (theirs.abs() + 1e-9)).mean() < relative_bound
        with torch.no_grad():
            theirs.copy_(theirs.to(dtype).float())
            ours.copy_(theirs)
        their_opt.state[theirs]["exp_avg"].copy_(our_momentum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_side_by_side_with_bitsandbytes_lion8bit(dtype):
    """From the same 8-bit state, one step of ours equals one of bitsandbytes'.

    Params: bit-identical (same dequantized momentum, same op order, same rounding).
    Momentum: bitsandbytes' CPU quantizer is not exactly nearest (measured with 0.50.2: ~0.15%
    of codes differ from the nearest, by at most one step of the coarsest decade, 0.9/64, e.g.
    near-zero values stored as 7.75e-6 where 5.5e-7 is nearest) and its EMA uses an FMA.
    """
    shape = (64, 4097)
    theirs, ours = _pair(shape, dtype, reference_dtype=dtype)
    their_opt = bnb.optim.Lion8bit([theirs], lr=LR, weight_decay=0.1)
    our_opt = Lion8bit([ours], lr=LR, weight_decay=0.1)
    for step in range(20):
        g = (torch.randn(shape) * 0.01).to(dtype)
        theirs.grad, ours.grad = g.clone(), g.clone()
        if step:
            our_opt.state[ours][mom.MOMENTUM_CODES].copy_(their_opt.state[theirs]["state1"])
            our_opt.state[ours][mom.MOMENTUM_ABSMAX].copy_(their_opt.state[theirs]["absmax1"])
            with torch.no_grad():
                ours.copy_(theirs)
        their_opt.step()
        our_opt.step()
        assert torch.equal(ours, theirs)
        their_codes = their_opt.state[theirs]["state1"].long()
        our_codes = our_opt.state[ours][mom.MOMENTUM_CODES].long()
        codes = quant.codebook()
        assert (codes[their_codes] - codes[our_codes]).abs().max() <= COARSEST_CODE_STEP
        assert (their_codes != our_codes).float().mean() < 0.01
        torch.testing.assert_close(
            our_opt.state[ours][mom.MOMENTUM_ABSMAX], their_opt.state[theirs]["absmax1"], rtol=1e-6, atol=0
        )


def test_state_tensors_are_what_the_format_says():
    small, large = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(5000))
    optimizer = Lion8bit([small, large], lr=LR)
    for p in (small, large):
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert optimizer.state[small][mom.MOMENTUM].dtype == torch.float32, "under min_8bit_size: fp32"
    assert optimizer.state[large][mom.MOMENTUM_CODES].dtype == torch.uint8
    assert optimizer.state[large][mom.MOMENTUM_CODES].shape == large.shape
    assert optimizer.state[large][mom.MOMENTUM_ABSMAX].shape == (quant.num_blocks(5000),)
