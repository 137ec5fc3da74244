"""The "4bit" momentum of backend="triton" in Triton's interpreter (lion8bit/kernels/
triton_lion_nibbles.py): its codec run alone (tests/triton_probes.py) against quant.quantize_4bit
and quant.dequantize_4bit at the places where rounding decides — values at the levels and at the
midpoints between them (grid places at and next to integers and halves), each +-1 and 2 ulp,
uniforms equal to the grid fraction and one step either side, subnormal and all-zero blocks, NaN
and infinities, odd sizes — and its step through the backend at sizes 1, 31 and 33, at element
offsets and with zero-size tensors. The step for every option, dtype and size is in the
conformance suite (tests/test_backends.py, FORMATS).
"""

import pytest
import torch

from lion8bit import kernels, quant

from helpers import PAIRINGS, assert_same_bits, batch, copies, group_of, step_and_compare

pytest.importorskip("triton")
if not kernels.interpreting():
    pytest.skip("the Triton interpreter is not on in this process (a GPU machine)", allow_module_level=True)

import triton_probes as probes  # noqa: E402  (decorated for the interpreter: triton is importable)

BLOCK = quant.BLOCK_SIZE_4BIT


def _ulps(values: torch.Tensor, count: int) -> torch.Tensor:
    """``values`` and their fp32 neighbours up to ``count`` ulps either side."""
    out, up, down = [values], values, values
    for _ in range(count):
        up, down = up.nextafter(torch.tensor(float("inf"))), down.nextafter(torch.tensor(float("-inf")))
        out += [up, down]
    return torch.cat(out)


def _boundary_values() -> torch.Tensor:
    """Blocks whose absmax is a power of two (so the normalized values are the values / absmax
    exactly) holding the levels, the fp32 midpoints between neighbouring levels and zeros, each
    +-2 ulp, clipped to [-1, 1]; the last element of each block is the absmax itself."""
    levels = quant.levels_4bit()
    midpoints = ((levels.double()[:-1] + levels.double()[1:]) / 2).float()
    candidates = _ulps(torch.cat([levels, midpoints, torch.tensor([0.0, -0.0, 1e-30, -1e-30])]), 2)
    candidates = candidates[candidates.abs() <= 1.0]
    pad = -len(candidates) % (BLOCK - 1)
    candidates = torch.cat([candidates, torch.zeros(pad)]).view(-1, BLOCK - 1)
    blocks = torch.cat([candidates, torch.ones(len(candidates), 1)], dim=1)
    # 2**-140: a subnormal absmax, scaled by 2**64 first (values flush to fewer bits).
    return torch.cat([blocks * scale for scale in (1.0, -(2.0**-3), 2.0**-140)]).reshape(-1)


def _other_values(generator) -> torch.Tensor:
    random = torch.randn(12, BLOCK, generator=generator)
    random *= 10.0 ** torch.randint(-8, 1, (12, 1), generator=generator)
    subnormal = torch.randn(2, BLOCK, generator=generator) * 1e-39
    subnormal[1] = torch.tensor([1e-45, -1e-45] * (BLOCK // 2))  # the smallest: absmax rounds up a lot
    zeros = torch.zeros(2, BLOCK)
    zeros[1, ::2] = -0.0
    special = torch.randn(3, BLOCK, generator=generator)
    special[0, 3], special[1, 5], special[2, 7] = float("nan"), float("inf"), float("-inf")
    near_top = torch.full((1, BLOCK), 3.3895e38)  # absmax rounds up to inf: the values normalize to 0
    return torch.cat([random, subnormal, zeros, special, near_top]).reshape(-1)


def _reference_fraction(values: torch.Tensor) -> torch.Tensor:
    """The fraction quant.codes_4bit compares u with: t - floor(t) of the reference's grid place t
    (clamped to [0, 15], NaN to 0), a multiple of 2**-24."""
    absmax = quant.round_up_to_bf16(quant.blockwise_absmax(values, BLOCK))
    t = quant.grid_4bit(values, absmax)
    t = torch.where(t > 0, t, 0.0).clamp(max=15.0)
    return t - t.floor()


def _bit_sets(values: torch.Tensor, generator) -> dict[str, torch.Tensor]:
    """Random bits, and bits whose uniform u = (bits >> 8) * 2**-24 is the fraction (the tie: the
    lower code) and one step of 2**-24 above and below it."""
    random = torch.randint(0, 2**32, values.shape, dtype=torch.int64, generator=generator)
    steps = (_reference_fraction(values).double() * 2**24).floor().nan_to_num(0).clamp(0, 2**24 - 1).long()
    low_byte = random & 0xFF  # ignored by the uniform: any value
    sets = {"random": random}
    for name, shift in (("tie", 0), ("above", 1), ("below", -1)):
        sets[name] = ((steps + shift).clamp(0, 2**24 - 1) << 8) | low_byte
    return sets


def _check(values: torch.Tensor, bits: torch.Tensor, what: str) -> None:
    packed, absmax = probes.quantize_4bit(values, bits)
    expected_packed, expected_absmax = quant.quantize_4bit(values, bits)
    # A NaN absmax: the kernel writes bf16 NaN as 0x7FC0, torch's CPU conversion (2.13) as
    # 0xFFFF; compared as NaN, as tests/test_backends.py compares bf16 NaN.
    assert_same_bits(absmax.isnan(), expected_absmax.isnan(), f"{what} NaN absmax")
    absmax[absmax.isnan()] = expected_absmax[expected_absmax.isnan()] = float("nan")
    assert_same_bits(absmax, expected_absmax, f"{what} absmax")
    assert_same_bits(packed, expected_packed, f"{what} codes")
    decoded = probes.dequantize_4bit(packed, absmax, values.numel())
    assert_same_bits(decoded, quant.dequantize_4bit(packed, absmax, values.numel()), f"{what} decoded")


# numpy warns on inf * 0 (an infinite value normalized by the inverse of an infinite absmax)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_codec_is_quants_at_level_boundaries_ties_and_special_blocks():
    generator = torch.Generator().manual_seed(40)
    values = torch.cat([_boundary_values(), _other_values(generator)])
    assert values.numel() % BLOCK == 0 and values.numel() > 20 * BLOCK
    bit_sets = _bit_sets(values, generator)
    # The ties are there: u equals the fraction for many elements (it is a multiple of 2**-24).
    uniform = quant.uniform_from_bits(bit_sets["tie"])
    assert int((uniform == _reference_fraction(values)).sum()) > values.numel() // 4
    for name, bits in bit_sets.items():
        _check(values, bits, name)


@pytest.mark.parametrize("numel", [1, 2, 31, 33, 65])
def test_codec_at_odd_sizes_writes_a_zero_last_high_nibble(numel):
    generator = torch.Generator().manual_seed(numel)
    values = torch.randn(numel, generator=generator)
    bits = torch.randint(0, 2**32, (numel,), dtype=torch.int64, generator=generator)
    _check(values, bits, f"{numel} values")
    if numel % 2:
        assert int(probes.quantize_4bit(values, bits)[0][-1]) >> 4 == 0


@pytest.mark.parametrize("sizes", [[1, 31, 33], [0, 64, 0]], ids=["odd", "zero-size"])
def test_step_at_small_and_zero_sizes(sizes):
    generator = torch.Generator().manual_seed(41)
    tensors = batch(sizes, generator, formats=["4bit"])
    step_and_compare("triton", *tensors, group_of(0.3, 0.5, True, False, True, False))


def test_element_offsets_key_the_4bit_codes_bits():
    """Offsets at multiples of 32 (blocks of the whole parameter), one straddling 2**32 (a new
    element key mid-tensor): the codes' bits are the whole parameter's."""
    generator = torch.Generator().manual_seed(42)
    params, grads, entries, formats = batch([300, 4097], generator, pairings=PAIRINGS[:2], formats=["4bit"])
    offsets = [32, 2**32 - 96, 2**33 + 64, 2**32 - 2048]
    group = group_of(0.0, 1.0, False, False, False, False)
    shifted = step_and_compare("triton", *copies(params, entries)[:1], grads, copies(params, entries)[1], formats,
                               group, element_offsets=offsets)
    unshifted = step_and_compare("triton", *copies(params, entries)[:1], grads, copies(params, entries)[1],
                                 formats, group)
    codes = "momentum_codes"
    assert not any(torch.equal(a[codes], b[codes]) for a, b in zip(shifted[1], unshifted[1], strict=True))
