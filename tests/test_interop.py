"""Loading bitsandbytes and lion-pytorch state dicts; exporting to lion-pytorch."""

import copy

import bitsandbytes as bnb
import lion_pytorch
import pytest
import torch
from lion_pytorch.cautious_lion import Lion as CautiousLionPytorch

from lion8bit import Lion, interop, quant
from lion8bit import momentum as mom

SHAPES = [(64, 100), (50,)]  # 6400 elements: 8-bit in bitsandbytes too; 50: fp32 there


def params_like(source):
    return [torch.nn.Parameter(p.detach().clone()) for p in source]


def fill_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 0.01


def trained_bitsandbytes(steps=3):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    optimizer = bnb.optim.Lion8bit(params, lr=1e-3, betas=(0.95, 0.98), weight_decay=0.1)
    for seed in range(steps):
        fill_grads(params, seed)
        optimizer.step()
    return params, optimizer


def flat_bitsandbytes_form(state_dict):
    """The layout bitsandbytes wrote before 0.49.2: quantization state at the top level."""
    flat = copy.deepcopy(state_dict)
    for entry in flat["state"].values():
        entry.update(entry.pop(interop.BNB_NESTED_KEY, {}))
    return flat


def test_formats_are_recognised():
    _, bnb_opt = trained_bitsandbytes()
    assert interop.detect_format(bnb_opt.state_dict()) == "bitsandbytes"
    assert interop.detect_format(flat_bitsandbytes_form(bnb_opt.state_dict())) == "bitsandbytes"
    p = torch.nn.Parameter(torch.randn(10))
    lp = lion_pytorch.Lion([p])
    assert interop.detect_format(lp.state_dict()) == "lion_pytorch"  # empty state
    p.grad = torch.randn(10)
    lp.step()
    assert interop.detect_format(lp.state_dict()) == "lion_pytorch"
    ours = Lion([p])
    assert interop.detect_format(ours.state_dict()) == "lion8bit"  # empty state
    ours.step()
    assert interop.detect_format(ours.state_dict()) == "lion8bit"


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_bitsandbytes_8bit_codes_load_bit_for_bit(layout):
    params, bnb_opt = trained_bitsandbytes()
    state_dict = bnb_opt.state_dict()
    if layout == "flat":
        state_dict = flat_bitsandbytes_form(state_dict)
    ours = params_like(params)
    optimizer = Lion(ours, lr=1.0)
    optimizer.load_state_dict(state_dict)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.95, 0.98), 0.1)
    big, small = ours
    their_big, their_small = (bnb_opt.state[p] for p in params)
    assert optimizer.state[big][mom.STEP] == 3
    assert torch.equal(optimizer.state[big][mom.MOMENTUM_CODES], their_big["state1"])
    assert torch.equal(optimizer.state[big][mom.MOMENTUM_ABSMAX], their_big["absmax1"])
    assert torch.equal(optimizer.state[small][mom.MOMENTUM], their_small["state1"])


def test_bitsandbytes_8bit_state_into_another_block_size_is_decoded_in_its_own_blocks():
    """bitsandbytes' absmax belong to blocks of 256: loading into block_size=64 must decode with
    256 (its blocks) and then quantize into blocks of 64 — decoding with the target's 64 would
    scale three of every four runs of 64 codes by the wrong absmax."""
    params, bnb_opt = trained_bitsandbytes()
    ours = params_like(params)
    optimizer = Lion(ours, lr=1.0, block_size=64)
    optimizer.load_state_dict(bnb_opt.state_dict())
    their = bnb_opt.state[params[0]]
    values = quant.codebook()[their["state1"].long()].reshape(-1, 256) * their["absmax1"][:, None]
    codes, absmax = quant.quantize_blockwise(values.reshape(params[0].shape), 64)
    assert torch.equal(optimizer.state[ours[0]][mom.MOMENTUM_CODES], codes)
    assert torch.equal(optimizer.state[ours[0]][mom.MOMENTUM_ABSMAX], absmax)
    assert absmax.numel() == 4 * their["absmax1"].numel()


@pytest.mark.parametrize("state", ["8bit", "bf16", "fp32"])
def test_bitsandbytes_state_continues_like_bitsandbytes(state):
    """After loading, one step of ours from bitsandbytes' state equals one step of bitsandbytes."""
    params, bnb_opt = trained_bitsandbytes()
    ours = params_like(params)
    optimizer = Lion(ours, state=state)
    optimizer.load_state_dict(bnb_opt.state_dict())
    expected = {
        id(p): quant.dequantize_blockwise(bnb_opt.state[p]["state1"], bnb_opt.state[p]["absmax1"])
        if bnb_opt.state[p]["state1"].dtype == torch.uint8
        else bnb_opt.state[p]["state1"].clone()
        for p in params
    }
    for p, q in zip(params, ours, strict=True):
        fmt = mom.stored_format(optimizer.state[q])
        loaded = mom.decode_momentum(optimizer.state[q], fmt, quant.BLOCK_SIZE)
        exact = expected[id(p)]
        if fmt == "bf16":
            exact = exact.bfloat16().float()
        assert torch.equal(loaded, exact), fmt
    fill_grads(params, 10)
    fill_grads(ours, 10)
    bnb_opt.step()
    optimizer.step()
    for p, q in zip(params, ours, strict=True):
        if state != "bf16" or p.numel() < 4096:
            assert torch.equal(p, q)
        else:  # bf16 momentum holds the loaded values rounded: signs may differ at ties only
            assert (p != q).float().mean() < 1e-3


@pytest.mark.parametrize("state", mom.STATE_KINDS)
@pytest.mark.parametrize("cautious", [False, True])
def test_lion_pytorch_state_loads(state, cautious):
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    if cautious:
        theirs = CautiousLionPytorch(params, lr=2e-4, weight_decay=0.3, cautious_factor=0.25, cautious_wd=True)
    else:
        theirs = lion_pytorch.Lion(params, lr=2e-4, weight_decay=0.3)
    for seed in range(3):
        fill_grads(params, seed)
        theirs.step()
    ours = params_like(params)
    optimizer = Lion(ours, state=state)
    optimizer.load_state_dict(theirs.state_dict())
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (2e-4, 0.3)
    if cautious:
        assert group["cautious_factor"] == 0.25 and group["cautious_weight_decay"] is True
    for p, q in zip(params, ours, strict=True):
        fmt = mom.stored_format(optimizer.state[q])
        assert fmt == mom.momentum_format(q.numel(), state, 4096)
        loaded = mom.decode_momentum(optimizer.state[q], fmt, quant.BLOCK_SIZE, shape=q.shape)
        original = theirs.state[p]["exp_avg"]
        if fmt == "fp32":
            assert torch.equal(loaded, original)
        elif fmt == "bf16":
            assert torch.equal(loaded, original.bfloat16().float())
        elif fmt == "4bit":  # converted to nearest: no step's random bits to draw from
            codes, absmax = quant.quantize_4bit(original)
            assert torch.equal(loaded, quant.dequantize_4bit(codes, absmax, q.numel()).view(q.shape))
        else:
            codes, absmax = quant.quantize_blockwise(original)
            assert torch.equal(loaded, quant.dequantize_blockwise(codes, absmax))


def test_export_to_lion_pytorch_continues_identically():
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    ours = Lion(params, lr=2e-4, weight_decay=0.3, state="fp32")
    for seed in range(3):
        fill_grads(params, seed)
        ours.step()
    exported = interop.to_lion_pytorch_state_dict(ours)
    theirs_params = params_like(params)
    theirs = lion_pytorch.Lion(theirs_params, lr=1.0)
    theirs.load_state_dict(exported)
    for p, q in zip(params, theirs_params, strict=True):
        assert torch.equal(theirs.state[q]["exp_avg"], ours.state[p][mom.MOMENTUM])
    fill_grads(params, 7)
    fill_grads(theirs_params, 7)
    ours.step()
    theirs.step()
    for p, q in zip(params, theirs_params, strict=True):
        assert torch.equal(p, q)


def test_export_from_8bit_dequantizes():
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    ours = Lion(params, lr=2e-4)
    fill_grads(params, 0)
    ours.step()
    exported = interop.to_lion_pytorch_state_dict(ours)
    entry = ours.state[params[0]]
    expected = quant.dequantize_blockwise(entry[mom.MOMENTUM_CODES], entry[mom.MOMENTUM_ABSMAX])
    assert torch.equal(exported["state"][0]["exp_avg"], expected)


def test_export_from_4bit_dequantizes():
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    ours = Lion(params, lr=2e-4, state="4bit")
    fill_grads(params, 0)
    ours.step()
    exported = interop.to_lion_pytorch_state_dict(ours)
    entry = ours.state[params[0]]
    assert mom.stored_format(entry) == "4bit"
    expected = quant.dequantize_4bit(entry[mom.MOMENTUM_CODES], entry[mom.MOMENTUM_ABSMAX], params[0].numel())
    assert torch.equal(exported["state"][0]["exp_avg"], expected.view(params[0].shape))


def test_foreign_state_that_does_not_fit_is_rejected():
    _, bnb_opt = trained_bitsandbytes()
    wrong = [torch.nn.Parameter(torch.randn(64, 99)), torch.nn.Parameter(torch.randn(50))]
    optimizer = Lion(wrong)
    with pytest.raises(ValueError, match=r"parameter 0 of shape \(64, 99\)"):
        optimizer.load_state_dict(bnb_opt.state_dict())
    assert not optimizer.state
