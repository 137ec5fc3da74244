"""The 8-bit format and the storage rounding, against independent brute-force definitions."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hs

from lion8bit import quant

CODES = quant.codebook()
SIZES_WITH_TAILS = [1, 255, 256, 257, 4095, 4096, 4097, 70_001]


def brute_force_codes(normalized: torch.Tensor) -> torch.Tensor:
    """argmin |x - code| over all 256 codes; ties to the smaller |code|; the sign rule."""
    x = normalized.double().reshape(-1)
    values = CODES.double()
    distance = (x[:, None] - values[None, :]).abs()
    nearest = distance == distance.min(dim=1, keepdim=True).values
    magnitude = torch.where(nearest, values.abs()[None, :], torch.tensor(float("inf"), dtype=torch.float64))
    index = magnitude.argmin(dim=1)
    index[(index == quant.ZERO_CODE) & (x > 0)] = quant.ZERO_CODE + 1
    index[(index == quant.ZERO_CODE) & (x < 0)] = quant.ZERO_CODE - 1
    return index.to(torch.uint8).view(normalized.shape)


def brute_force_quantize(values: torch.Tensor, block_size: int):
    """Block by block in numpy fp32: absmax, x * (1/absmax), brute-force codes; a subnormal
    absmax (whose reciprocal overflows) scales the block and the absmax by 2**24 first."""
    flat = values.reshape(-1).float().numpy()
    codes, absmax = [], []
    for start in range(0, flat.size, block_size):
        block = flat[start : start + block_size]
        peak = np.float32(np.abs(block).max())
        scale = np.float32(2.0**24) if peak < np.finfo(np.float32).tiny else np.float32(1.0)
        inverse = np.float32(1.0) / (peak * scale) if peak > 0 else np.float32(0.0)
        absmax.append(peak)
        codes.append(brute_force_codes(torch.from_numpy((block * scale) * inverse)))
    return torch.cat(codes).view(values.shape), torch.tensor(np.array(absmax, dtype=np.float32))


def test_codebook_is_bitsandbytes_dynamic_map():
    import bitsandbytes.functional as bnbf

    theirs = bnbf.create_dynamic_map(signed=True)
    assert CODES.dtype == torch.float32 and CODES.shape == (256,)
    assert torch.equal(CODES.view(torch.int32), theirs.view(torch.int32))


def test_codebook_shape_of_the_format():
    assert torch.all(CODES[1:] > CODES[:-1]), "sorted, no duplicates"
    assert CODES[quant.ZERO_CODE] == 0
    assert CODES[-1] == 1.0 and CODES[0] == pytest.approx(-0.99297, abs=1e-5)
    assert CODES[quant.ZERO_CODE + 1] == pytest.approx(5.5e-7, rel=1e-6)
    assert torch.equal(-CODES[: quant.ZERO_CODE].flip(0), CODES[quant.ZERO_CODE + 1 : -1])


def _boundary_values() -> torch.Tensor:
    """Every code, every midpoint representable in fp32, and their fp32 neighbours."""
    thresholds = quant.decision_thresholds()
    points = torch.cat([CODES.double(), thresholds]).float()
    up = torch.nextafter(points, torch.full_like(points, 2.0))
    down = torch.nextafter(points, torch.full_like(points, -2.0))
    return torch.cat([points, up, down, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1.0000001, -1.0000001])])


def test_nearest_codes_at_every_boundary():
    values = _boundary_values()
    assert torch.equal(quant.nearest_codes(values), brute_force_codes(values))


def test_exact_ties_round_toward_zero():
    thresholds = quant.decision_thresholds()
    representable = thresholds[thresholds.float().double() == thresholds].float()
    assert representable.numel() > 100, "the test needs real ties"
    codes = quant.nearest_codes(representable).long()
    chosen = CODES[codes].double()
    other = torch.where(representable > 0, CODES[(codes + 1).clamp(max=255)], CODES[(codes - 1).clamp(min=0)]).double()
    # Exactly halfway, so the chosen code is the smaller magnitude of the two neighbours.
    nonzero = chosen != 0
    assert torch.all(chosen[nonzero].abs() < other[nonzero].abs())


@given(hs.lists(hs.floats(-1.0, 1.0, width=32), min_size=1, max_size=300))
def test_nearest_codes_property(values):
    x = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(quant.nearest_codes(x), brute_force_codes(x))


@given(
    numel=hs.sampled_from(SIZES_WITH_TAILS[:7]),
    block_size=hs.sampled_from([64, 256, 2048]),
    scale=hs.sampled_from([1e-40, 1e-30, 1e-7, 1e-3, 1.0, 1e4]),
    outlier=hs.booleans(),
    zero_block=hs.booleans(),
    seed=hs.integers(0, 2**31 - 1),
)
def test_quantize_blockwise_equals_brute_force(numel, block_size, scale, outlier, zero_block, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=generator) * scale
    if outlier:
        values[numel // 2] = 1e6 * scale
    if zero_block:
        values[: min(block_size, numel)] = 0.0
    codes, absmax = quant.quantize_blockwise(values, block_size)
    expected_codes, expected_absmax = brute_force_quantize(values, block_size)
    assert torch.equal(absmax, expected_absmax)
    assert torch.equal(codes, expected_codes)
    decoded = quant.dequantize_blockwise(codes, absmax, block_size)
    assert torch.isfinite(decoded).all()
    assert torch.equal(torch.sign(decoded), torch.sign(values)), "no sign is flipped or erased"


@pytest.mark.parametrize("numel", SIZES_WITH_TAILS)
def test_round_trip_error_is_within_half_a_code_gap(numel):
    values = torch.randn(numel) * torch.logspace(-8, 2, numel)
    codes, absmax = quant.quantize_blockwise(values)
    assert codes.shape == values.shape and absmax.shape == (quant.num_blocks(numel),)
    decoded = quant.dequantize_blockwise(codes, absmax)
    scale = absmax.repeat_interleave(quant.BLOCK_SIZE)[:numel]
    index = codes.long()
    gap_up = (CODES[(index + 1).clamp(max=255)] - CODES[index]).abs()
    gap_down = (CODES[index] - CODES[(index - 1).clamp(min=0)]).abs()
    # A non-zero value below half the smallest code goes to +-5.5e-7 (sign rule): allow that.
    bound = torch.maximum(gap_up, gap_down) / 2 * scale * (1 + 1e-6) + 5.6e-7 * scale
    assert torch.all((decoded - values).abs() <= bound)


def test_a_block_with_subnormal_absmax_keeps_zeros_and_signs():
    """1/absmax overflows for an absmax below 2**-126; the 2**24 scaling keeps the block exact."""
    values = torch.zeros(256)
    values[::4] = torch.linspace(-2e-39, 3e-39, 64)
    values[1] = -3e-39
    codes, absmax = quant.quantize_blockwise(values)
    assert absmax[0] == 3e-39 and absmax[0] < torch.finfo(torch.float32).tiny
    decoded = quant.dequantize_blockwise(codes, absmax)
    assert torch.isfinite(decoded).all()
    assert torch.equal(torch.sign(decoded), torch.sign(values))
    assert torch.all(codes[values == 0] == quant.ZERO_CODE)


def test_all_zero_and_tiny_blocks():
    values = torch.zeros(3 * 256 + 5)
    values[256] = 1e-38  # a block holding one subnormal-adjacent value
    values[512:] = -3e-39  # fp32 subnormals
    codes, absmax = quant.quantize_blockwise(values)
    assert torch.equal(codes[:256], torch.full((256,), quant.ZERO_CODE, dtype=torch.uint8))
    assert absmax[0] == 0
    decoded = quant.dequantize_blockwise(codes, absmax)
    assert torch.isfinite(decoded).all()
    assert torch.equal(decoded[:256], torch.zeros(256))
    assert decoded[256] == pytest.approx(1e-38, rel=1e-6)
    assert torch.all(decoded[512:] < 0)


# -- random bits --------------------------------------------------------------------------------


def numpy_mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 with numpy's wrapping uint32 arithmetic: an independent implementation."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def test_mix32_matches_uint32_arithmetic():
    inputs = np.concatenate([np.arange(70_000), np.random.default_rng(0).integers(0, 2**32, 70_000)])
    ours = quant.mix32(torch.from_numpy(inputs.astype(np.int64)))
    assert np.array_equal(ours.numpy().astype(np.uint32), numpy_mix32(inputs))
    assert quant.mix32(123456789) == int(numpy_mix32(np.array([123456789]))[0])


def test_random_bits_are_a_function_of_key_and_index():
    key = quant.rounding_key(seed=7, step=3, stream=quant.STREAM_PARAM)
    whole = quant.random_bits(key, 1000, "cpu")
    assert torch.equal(whole[300:700], quant.random_bits(key, 400, "cpu", start=300))
    assert whole.min() >= 0 and whole.max() < 2**32
    assert len(set(whole.tolist())) == 1000, "a bijection of the index"
    other_step = quant.random_bits(quant.rounding_key(7, 4, quant.STREAM_PARAM), 1000, "cpu")
    other_stream = quant.random_bits(quant.rounding_key(7, 3, quant.STREAM_MOMENTUM), 1000, "cpu")
    assert (whole == other_step).float().mean() < 0.01
    assert (whole == other_stream).float().mean() < 0.01
    # Past 2**32 elements the upper index bits enter through the element key.
    straddle = quant.random_bits(key, 4, "cpu", start=2**32 - 2)
    low = torch.tensor([2**32 - 2, 2**32 - 1, 0, 1])
    expected = torch.cat(
        [quant.mix32(low[:2] ^ quant.element_key(key, 0)), quant.mix32(low[2:] ^ quant.element_key(key, 1))]
    )
    assert torch.equal(straddle, expected)


# -- rounding to bf16 / fp16 --------------------------------------------------------------------


def _neighbours(values: torch.Tensor, dtype: torch.dtype):
    """(toward zero, away from zero) representable neighbours, via float64 nextafter on the grid."""
    nearest = values.to(dtype)
    rounded_away = nearest.double().abs() > values.double().abs()
    toward = torch.where(rounded_away, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
    away = torch.nextafter(toward, toward.double().sign().to(dtype) * torch.tensor(float("inf"), dtype=dtype))
    away = torch.where(toward == 0, torch.nextafter(toward, values.sign().to(dtype)), away)
    return toward, away


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearest_rounding_is_torchs(dtype):
    values = torch.randn(10_000) * torch.logspace(-9, 4, 10_000)
    assert torch.equal(quant.round_to_storage(values, dtype), values.to(dtype))


# One value per case; (dtype, number of equally spaced bit patterns that cover every outcome).
_EXHAUSTIVE = [(torch.bfloat16, 16, 16), (torch.float16, 8, 13)]


@pytest.mark.parametrize("dtype, shift, resolution", _EXHAUSTIVE, ids=["bf16", "fp16"])
@pytest.mark.parametrize("value", [1.0 + 2**-20, -3.14159265, 1e-3 + 1e-9, -7.1e-6, 1234.5678, 6.1e-5 * 0.37])
def test_stochastic_rounding_is_exactly_unbiased(dtype, shift, resolution, value):
    """Over a full period of the random bits that matter, the mean equals the value exactly."""
    steps = 2**resolution
    bits = torch.arange(steps, dtype=torch.int64) << (32 - resolution)
    values = torch.full((steps,), value, dtype=torch.float32)
    rounded = quant.round_to_storage(values, dtype, bits)
    toward, away = _neighbours(values[:1], dtype)
    assert set(rounded.double().unique().tolist()) <= {toward.double().item(), away.double().item()}
    mean = rounded.double().mean().item()
    assert mean == pytest.approx(
        float(np.float32(value)), rel=0, abs=abs(away.double().item() - toward.double().item()) / steps * 1.0001
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_keeps_exact_and_nonfinite_values(dtype):
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan")])
    bits = torch.full((values.numel(),), 0xFFFFFFFF, dtype=torch.int64)
    rounded = quant.round_to_storage(values, dtype, bits)
    assert torch.equal(rounded[:6], values[:6].to(dtype))
    assert torch.isnan(rounded[6])


# -- the 4-bit format (state="4bit") ----------------------------------------------------------


def test_4bit_levels_are_uniform_and_sit_on_the_grid():
    levels = quant.levels_4bit()
    expected = torch.tensor([(2 * c - 15) / 15 for c in range(16)], dtype=torch.float64).float()
    assert levels.dtype == torch.float32 and torch.equal(levels, expected)
    assert not torch.any(levels == 0), "every code carries a sign"
    # Level c at grid place c, to within the grid's fp32 roundings (absmax 1: grid_scale 7.5).
    grid = quant.grid_4bit(levels, torch.ones(1))
    assert torch.all((grid - torch.arange(16)).abs() <= 2**-20)


@pytest.mark.parametrize("numel", [0, 1, 2, 31, 33, 4097])
def test_nibbles_round_trip_low_nibble_first(numel):
    codes = torch.randint(0, 16, (numel,), dtype=torch.uint8)
    packed = quant.pack_nibbles(codes)
    assert packed.numel() == quant.packed_size(numel) == (numel + 1) // 2
    assert torch.equal(quant.unpack_nibbles(packed, numel), codes)
    if numel >= 2:
        assert int(packed[0]) == int(codes[0]) | int(codes[1]) << 4  # element 0 in the low nibble
    if numel % 2:
        assert int(packed[-1]) >> 4 == 0  # the unused high nibble of an odd count is 0


def test_bf16_absmax_is_rounded_up_and_exact_when_representable():
    values = torch.cat([torch.rand(1000) * 10.0 ** torch.randint(-30, 30, (1000,)), torch.tensor([0.0, 1.0, 3.0])])
    up = quant.round_up_to_bf16(values)
    assert up.dtype == torch.bfloat16
    assert torch.all(up.float() >= values)
    below = up.float().view(torch.int32) - 0x10000  # the next bf16 toward zero
    assert torch.all((below.view(torch.float32) < values) | (up.float() == values))
    representable = values.bfloat16().float()
    assert torch.equal(quant.round_up_to_bf16(representable).float(), representable)


def test_4bit_nearest_keeps_levels_and_the_block_maximum():
    levels = quant.levels_4bit()
    codes = quant.codes_4bit_with_absmax(levels, torch.ones(1))
    assert torch.equal(codes, torch.arange(16, dtype=torch.uint8))
    values = torch.randn(1000)
    codes, absmax = quant.quantize_4bit(values)
    decoded = quant.dequantize_4bit(codes, absmax, values.numel())
    blocks = torch.nn.functional.pad(values, (0, 24)).view(-1, 32)
    top = blocks.abs().argmax(1) + torch.arange(len(blocks)) * 32
    assert torch.equal(decoded[top].abs(), absmax.float())  # +-1 level times the rounded-up absmax
    assert torch.equal(torch.sign(decoded[top]), torch.sign(values[top]))


# Grid places and the codes they must get with u = 0.5 (nearest, ties down) and u = 0: the clamp
# to [0, 15] (NaN to 0, as cpu_lion_nibbles.h's integer codes need), floors, fractions.
GRID_CASES = [
    # (t, code with u = 0.5, code with u = 0)
    (float("nan"), 0, 0),
    (-float("inf"), 0, 0),
    (-1e-6, 0, 0),
    (0.0, 0, 0),
    (0.25, 0, 1),
    (0.5, 0, 1),
    (0.75, 1, 1),
    (7.5, 7, 8),
    (14.0, 14, 14),
    (14.9999990463, 15, 15),
    (15.0, 15, 15),
    (15.000002, 15, 15),
    (float("inf"), 15, 15),
]


@pytest.mark.parametrize("t, nearest, above_zero", GRID_CASES, ids=[str(case[0]) for case in GRID_CASES])
def test_4bit_codes_clamp_floor_and_compare(t, nearest, above_zero):
    grid = torch.tensor([t], dtype=torch.float32)
    assert quant.codes_4bit(grid, 0.5).item() == nearest
    assert quant.codes_4bit(grid, 0.0).item() == above_zero


def test_4bit_grid_of_a_block_maximum_overshoots_only_below_0_by_one_ulp():
    """For every positive finite bf16 absmax a, +a lands on 15 and -a within 2**-21 of 0, with no
    clamp: a * RN(7.5 / a) is within 7.5 * 2**-24 of 7.5, so its fp32 rounding is at most one
    ulp (2**-21) off, and 15 + 2**-21 rounds to 15 (to even). The fused CPU step relies on it:
    cpu_lion_nibbles.h codes16's one clamp, at 0, takes NaN and -2**-21 (which occurs)."""
    absmax = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    peaks = absmax.repeat_interleave(quant.BLOCK_SIZE_4BIT).view(-1, 2, 16)
    peaks[:, 1] *= -1  # each block holds +a and -a
    grid = quant.grid_4bit(peaks.reshape(-1), absmax).view(-1, 2, 16)
    assert torch.all(grid[:, 0] == 15.0)
    assert torch.all(grid[:, 1].abs() <= 2.0**-21)
    assert torch.any(grid[:, 1] < 0)


def test_4bit_stochastic_rounding_takes_the_upper_code_with_its_fraction():
    # For t between codes f < f + 1, over u = k / 2**12 (k = 0 .. 4095) the share taking f + 1
    # is t - f to within one grid step of u: E[code] = t, so E[level] = x.
    uniforms = torch.arange(4096, dtype=torch.float32) / 4096
    for floor in range(15):
        t = torch.tensor(floor + 0.3)
        codes = quant.codes_4bit(t.expand(4096).clone(), uniforms)
        assert set(codes.tolist()) <= {floor, floor + 1}
        share = (codes == floor + 1).float().mean()
        assert abs(float(share - (t - floor))) <= 1 / 4096


def test_4bit_small_absmax_is_scaled_so_the_grid_keeps_its_bits():
    # Below 2**-64 a block is scaled by 2**64 (quant.SMALL_SCALE_4BIT), exactly: its grid places
    # are those of the same block scaled up by 2**64. Unscaled, 7.5 / absmax would overflow here.
    values = torch.linspace(-1, 1, 32) * 2.0**-130
    absmax = quant.round_up_to_bf16(values.abs().max().reshape(1))
    scaled = quant.grid_4bit(values * 2.0**64, absmax.float() * 2.0**64)
    assert torch.equal(quant.grid_4bit(values, absmax), scaled)
    assert quant.grid_4bit(values, absmax)[0] == 0.0 and quant.grid_4bit(values, absmax)[-1] == 15.0
