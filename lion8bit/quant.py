"""Storage rounding for the momentum and the params (DESIGN.md §3).

- The 8-bit blockwise format of bitsandbytes >= 0.44: bitsandbytes' signed "dynamic" codebook of
  256 fp32 values, blocks of ``block_size`` consecutive elements of the flattened tensor, one fp32
  absmax per block, nearest rounding (ties toward zero), and no non-zero value stored as zero.
- The 4-bit blockwise format: 16 uniform levels, two codes per byte, blocks of 32 with a bf16
  absmax rounded up, stochastic rounding on the level grid (docs/4bit-study.md chose it).
- Round-to-nearest-even and stochastic rounding to bf16 / fp16, with a counter-based RNG keyed on
  (seed, step, stream, element index) so every backend draws the same bits.

Everything here is plain PyTorch and defines the bits the fused backends must reproduce.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 256
ZERO_CODE = 127  # index of 0.0 in the codebook: 127 negative values below it, 128 positive above

# A block whose absmax is subnormal (below 2**-126) is normalized with both the momentum and the
# absmax scaled by 2**24 first: 1/absmax would overflow to inf there (and 0 * inf is NaN), e.g.
# for embedding rows that get no gradient for ~8000 steps while beta2 = 0.99 decays their
# momentum. 2**24 makes every subnormal normal; power-of-two scaling is exact, and for normal
# blocks the scale is 1, so nothing else changes.
SUBNORMAL_ABSMAX = torch.finfo(torch.float32).tiny
SUBNORMAL_SCALE = 2.0**24

_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# codebook


def _build_codebook() -> torch.Tensor:
    # The signed dynamic map (arXiv 2110.02861 §2; bitsandbytes create_dynamic_map(signed=True)):
    # decade d = 0..6 covers [0.1, 1] * 10**(d-6) with 2**d codes at the midpoints of an even
    # split of [0.1, 1]. Each step is done in fp32 exactly as bitsandbytes does it, so the 256
    # values are bit-identical to its map (tests/test_quant.py checks); computing the midpoints
    # in float64 instead changes 36 of them by one ulp.
    positive = []
    for decade in range(7):
        edges = torch.linspace(0.1, 1.0, 2**decade + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        positive.append(midpoints * 10.0 ** (decade - 6))
    magnitudes = torch.cat(positive)  # 127 increasing values, 5.5e-7 ... 0.993
    return torch.cat([-magnitudes.flip(0), torch.zeros(1), magnitudes, torch.ones(1)])


_CODEBOOK = _build_codebook()


# Midpoints between neighbouring codes: exact in float64 (sum of two fp32 values, halved).
_THRESHOLDS = ((_CODEBOOK.double()[:-1] + _CODEBOOK.double()[1:]) / 2)

# Per-device copies, made once. Plain dicts rather than functools caches: torch.compile traces
# through a dict lookup, and warns about (and ignores) an lru_cache wrapper.
_ON_DEVICE: dict[tuple[str, torch.device], torch.Tensor] = {}


def _on(name: str, table: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    copy = _ON_DEVICE.get((name, device))
    if copy is None:
        copy = _ON_DEVICE[(name, device)] = table.to(device)
    return copy


def codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 sorted fp32 code values (shared, do not modify)."""
    return _on("codebook", _CODEBOOK, device)


def decision_thresholds(device: torch.device | str | None = None) -> torch.Tensor:
    """The 255 float64 midpoints between neighbouring codes; nearest-code boundaries."""
    return _on("thresholds", _THRESHOLDS, device)


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise format


def num_blocks(numel: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-numel // block_size)


def _as_blocks(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """(num_blocks, block_size) view of a flat tensor, zero-padded (a copy) if the tail is partial."""
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, block_size)


def nearest_codes(normalized: torch.Tensor) -> torch.Tensor:
    """Codes (uint8) of values already divided by their block's absmax.

    The nearest code value, ties toward zero. Sign rule: a non-zero value whose nearest code is
    0.0 gets the smallest code of its own sign (+-5.5e-7) instead, so quantization never erases the
    sign of a momentum element (fp32 Lion never does either: its momentum of an element with zero
    gradients keeps its sign and keeps moving the param). bitsandbytes' CUDA kernel applies this
    rule to negative values only (it tests signbit, and signbit(0.0) is positive); ours is
    symmetric. Nearest rounding alone can never give a code of the opposite sign, because 0.0 is
    a code and is always closer.
    """
    x = normalized.double()  # exact: every fp32 is a float64, and so is every threshold
    thresholds = decision_thresholds(x.device)
    below = torch.searchsorted(thresholds, x, right=False)  # thresholds strictly below x
    upto = torch.searchsorted(thresholds, x, right=True)  # thresholds at or below x
    # At a tie x == threshold, "below" picks the lower neighbour and "upto" the upper one;
    # toward zero is the lower one for x > 0 and the upper one for x < 0.
    index = torch.where(x > 0, below, upto)
    index = torch.where((index == ZERO_CODE) & (x > 0), ZERO_CODE + 1, index)
    index = torch.where((index == ZERO_CODE) & (x < 0), ZERO_CODE - 1, index)
    return index.to(torch.uint8)


def blockwise_absmax(values: torch.Tensor, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """fp32 max |value| per block of the flattened tensor (the last block may be partial)."""
    return _as_blocks(values.reshape(-1).float(), block_size).abs().amax(dim=1)


def quantize_blockwise(
    values: torch.Tensor, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values -> (uint8 codes of the same shape, fp32 absmax per block).

    normalized = value * (1 / absmax), both fp32 operations correctly rounded; with a subnormal
    absmax, (value * 2**24) * (1 / (absmax * 2**24)). An all-zero block has absmax 0 and codes
    127 (no 0/0).
    """
    absmax = blockwise_absmax(values, block_size)
    return quantize_with_absmax(values, absmax, block_size), absmax


def quantize_with_absmax(
    values: torch.Tensor, absmax: torch.Tensor, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """uint8 codes of fp32 values in blocks whose fp32 absmax are given (one per block).

    Elementwise once the absmax is known: a piece of a block quantized with the whole block's
    absmax gets the codes the whole block would (how a block cut by a shard boundary is
    requantized, lion8bit/shard_blocks.py).
    """
    flat = values.reshape(-1).float()
    scale = torch.where(absmax < SUBNORMAL_ABSMAX, SUBNORMAL_SCALE, 1.0)
    inverse = torch.where(absmax > 0, torch.reciprocal(absmax * scale), torch.zeros_like(absmax))
    blocks = _as_blocks(flat, block_size) * scale[:, None]
    normalized = (blocks * inverse[:, None]).reshape(-1)[: flat.numel()]
    return nearest_codes(normalized).view(values.shape)


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    block_size: int = BLOCK_SIZE,
    code_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 codes + fp32 absmax -> fp32 values (code value * absmax, one fp32 multiply)."""
    if code_values is None:
        code_values = codebook(codes.device)
    flat = code_values[codes.reshape(-1).long()]
    scaled = _as_blocks(flat, block_size) * absmax.float()[:, None]
    return scaled.reshape(-1)[: codes.numel()].view(codes.shape)


# ---------------------------------------------------------------------------------------------
# 4-bit blockwise format (state="4bit"; docs/4bit-study.md: "linear-32-bf16-srgrid", uniform
# levels with the grid rounding below, which met the 8-bit evidence bounds on both examples)

BLOCK_SIZE_4BIT = 32  # elements per absmax block of "4bit": fixed, the format the gate passed
# Level c of the 16 is (2c - 15) / 15: +-1/15, +-3/15, ..., +-1, spacing 2/15. No zero level:
# every code carries a sign, so a stored momentum never loses its sign (the 8-bit format needs a
# rule for that; this one cannot). On the grid t = 7.5 * (x + 1) of a normalized value x, level
# c sits at t = c, so coding is a floor and a compare, with no search and no division.
GRID_HALF_4BIT = 7.5  # (16 - 1) / 2
SMALL_ABSMAX_4BIT = 2.0**-64  # blocks of a smaller absmax are scaled by SMALL_SCALE_4BIT (grid_4bit)
SMALL_SCALE_4BIT = 2.0**64
# Which levels the "4bit" codes mean, recorded in every param group (key LEVELS_4BIT_KEY) so a
# state dict written with other levels is refused, not misread (lion8bit/checkpoint.py): the
# square-root levels +-((2k-1)/15)**2 of the first 4-bit release have no marker.
LEVELS_4BIT_KEY = "levels_4bit"
LEVELS_4BIT = "uniform"


def _build_levels_4bit() -> torch.Tensor:
    # (2c - 15) / 15 in float64, rounded once to fp32.
    return torch.tensor([(2 * c - 15) / 15 for c in range(16)], dtype=torch.float64).to(torch.float32)


_LEVELS_4BIT = _build_levels_4bit()  # 16 sorted fp32 values: codes 0..7 negative, 8..15 positive


def levels_4bit(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 sorted fp32 level values of the 4-bit codes (shared, do not modify)."""
    return _on("levels_4bit", _LEVELS_4BIT, device)


def packed_size(numel: int) -> int:
    """Bytes of ``numel`` 4-bit codes: two per byte."""
    return -(-numel // 2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (flat) -> uint8 bytes: element 2i in the low nibble of byte i, element
    2i+1 in the high nibble; with an odd count the last byte's high nibble is 0."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` codes (uint8, flat)."""
    flat = packed.reshape(-1)
    return torch.stack([flat & 0xF, flat >> 4], dim=1).reshape(-1)[:numel]


def round_up_to_bf16(values: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 -> the smallest bf16 >= it: an absmax that no value of its block
    exceeds, so every normalized value lies in [-1, 1] (rounding to nearest could make it 1.004)."""
    pattern = values.float().view(torch.int32).to(torch.int64) & _MASK32
    up = torch.where(pattern & 0xFFFF != 0, (pattern | 0xFFFF) + 1, pattern)
    return _to_int32_bits(up & _MASK32).view(torch.float32).to(torch.bfloat16)


def _normalize(values: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """value * (1 / absmax) per block in fp32 (the subnormal rescale of the 8-bit format);
    an absmax of 0 gives 0."""
    flat = values.reshape(-1).float()
    absmax = absmax.float()
    scale = torch.where(absmax < SUBNORMAL_ABSMAX, SUBNORMAL_SCALE, 1.0)
    inverse = torch.where(absmax > 0, torch.reciprocal(absmax * scale), torch.zeros_like(absmax))
    blocks = _as_blocks(flat, block_size) * scale[:, None]
    return (blocks * inverse[:, None]).reshape(-1)[: flat.numel()]


def grid_4bit(values: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """fp32 values in blocks of 32 with the given absmax a -> their place t on the level grid
    (level c at t = c, so t = 7.5 * (m / a + 1) up to rounding), in three fp32 roundings:

        t = (m * scale) * (7.5 / (a * scale)) + 7.5

    the quotient correctly rounded per block (0 unless a > 0), scale = 2**64 for a < 2**-64 (else
    1). The scale keeps 7.5 * 2**24 / (a * scale) finite for every bf16 a, so a kernel can carry
    t * 2**24 with no other rounding (power-of-two scaling is exact; cpu_lion_nibbles.h). With
    |m| <= a, t is in [-2**-21, 15] (one ulp below 0 at most, tests/test_quant.py); NaN for a
    non-finite m in a block of NaN or infinite absmax."""
    flat = values.reshape(-1).float()
    absmax = absmax.float()
    scale = torch.where(absmax < SMALL_ABSMAX_4BIT, SMALL_SCALE_4BIT, 1.0)
    # A tensor numerator: a Python float over a tensor is reciprocal-then-multiply in torch
    # (Tensor.__rtruediv__), two roundings.
    quotient = torch.full_like(absmax, GRID_HALF_4BIT) / (absmax * scale)
    grid_scale = torch.where(absmax > 0, quotient, torch.zeros_like(absmax))
    blocks = _as_blocks(flat, BLOCK_SIZE_4BIT) * scale[:, None]
    return (blocks * grid_scale[:, None]).reshape(-1)[: flat.numel()] + GRID_HALF_4BIT


def codes_4bit(grid: torch.Tensor, uniform: torch.Tensor | float) -> torch.Tensor:
    """uint8 codes 0..15 of fp32 places t on the level grid (:func:`grid_4bit`).

    t is clamped to [0, 15] (NaN to 0); then with f = floor(t), the code is f + 1 iff
    ``uniform`` < t - f (exact in fp32), else f. Stochastic rounding passes
    u = (bits >> 8) * 2**-24 (exact in fp32, so E[code] = t and E[level] = x up to t's fp32
    roundings); nearest rounding passes 0.5 (ties go down: 0 is stored as -1/15).
    """
    t = grid.float()
    t = torch.where(t > 0, t, 0.0).clamp(max=2 * GRID_HALF_4BIT)
    floor = t.floor()
    return (floor + (uniform < t - floor).float()).to(torch.uint8)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint32 random bits (int64) -> fp32 uniforms in [0, 1): (bits >> 8) * 2**-24, exact."""
    return (bits >> 8).to(torch.float32) * 2.0**-24


def quantize_4bit(
    values: torch.Tensor, bits: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values -> (packed uint8 codes [ceil(n/2)], bf16 absmax [ceil(n/32)]).

    absmax = the block's max |value| rounded up to bf16; codes by :func:`codes_4bit`,
    stochastically with uint32 ``bits`` (one per element), to nearest without.
    """
    flat = values.reshape(-1).float()
    absmax = round_up_to_bf16(blockwise_absmax(flat, BLOCK_SIZE_4BIT))
    return pack_nibbles(codes_4bit_with_absmax(flat, absmax, bits)), absmax


def codes_4bit_with_absmax(
    values: torch.Tensor, absmax: torch.Tensor, bits: torch.Tensor | None = None
) -> torch.Tensor:
    """Unpacked uint8 codes (flat) of fp32 values in blocks of 32 whose bf16 absmax are given,
    stochastically with uint32 ``bits`` (one per element), to nearest without.

    Elementwise once the absmax is known: a piece of a block coded with the whole block's
    absmax (and the bits of its own elements) gets the codes the whole block would (how a block
    cut by a shard boundary is requantized, lion8bit/shard_blocks.py).
    """
    uniform = 0.5 if bits is None else uniform_from_bits(bits.reshape(-1))
    return codes_4bit(grid_4bit(values, absmax), uniform)


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, numel: int) -> torch.Tensor:
    """Packed 4-bit codes + bf16 absmax -> flat fp32 values (level * absmax, one fp32 multiply)."""
    levels = levels_4bit(packed.device)[unpack_nibbles(packed, numel).long()]
    scaled = _as_blocks(levels, BLOCK_SIZE_4BIT) * absmax.float()[:, None]
    return scaled.reshape(-1)[:numel]


# ---------------------------------------------------------------------------------------------
# counter-based random bits for stochastic rounding


def mix32(x):
    """A 32-bit integer hash (bijective), for Python ints or int64 tensors holding uint32 values.

    "lowbias32" (C. Wellons, hash-prospector): xorshift-multiply rounds. Multiplications are
    done mod 2**32 in 16-bit halves so int64 tensors never overflow; a Triton kernel computes the
    same thing with native uint32 arithmetic.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x, constant: int):
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + ((high * (constant & 0xFFFF)) << 16)) & _MASK32


# Streams: independent random bits for the two things one step may round stochastically.
STREAM_PARAM = 0
STREAM_MOMENTUM = 1


def rounding_key(seed: int, step: int, stream: int) -> int:
    """The per-(tensor, step, stream) key; host-side Python ints, passed to kernels as uint32."""
    return mix32(mix32((seed ^ mix32(stream + 1)) & _MASK32) ^ (step & _MASK32))


def element_key(key: int, index_high: int) -> int:
    """Key for the elements whose flat index has these upper 32 bits (0 below 2**32 elements)."""
    return mix32(key ^ (index_high & _MASK32))


def random_bits(key: int, numel: int, device, start: int = 0) -> torch.Tensor:
    """uint32 random bits (held in int64) for flat elements start .. start+numel-1.

    bits(i) = mix32((i mod 2**32) XOR element_key(key, i >> 32)).
    """
    index = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    if numel == 0 or start >> 32 == (start + numel - 1) >> 32:  # host ints: no device sync
        element = element_key(key, start >> 32)
    else:
        element = mix32((key ^ (index >> 32)) & _MASK32)
    return mix32((index & _MASK32) ^ element)


# ---------------------------------------------------------------------------------------------
# rounding fp32 to bf16 / fp16 storage


def _to_int32_bits(unsigned: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 -> int32 with the same bits."""
    return (unsigned - ((unsigned >> 31) << 32)).to(torch.int32)


def round_to_bf16(values: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> bf16. Nearest-even without ``bits``; stochastic with uint32 ``bits``.

    Stochastic: add the top 16 random bits to the low 16 bits of the fp32 pattern and truncate;
    rounds away from zero with probability (dropped bits) / 2**16, exactly unbiased.
    Non-finite values round to nearest.
    """
    values = values.float()
    nearest = values.to(torch.bfloat16)
    if bits is None:
        return nearest
    pattern = values.view(torch.int32).to(torch.int64) & _MASK32
    rounded = (pattern + (bits >> 16)) & 0xFFFF0000
    stochastic = _to_int32_bits(rounded).view(torch.float32).to(torch.bfloat16)
    return torch.where(torch.isfinite(values), stochastic, nearest)


def round_to_fp16(values: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 -> fp16. Nearest-even without ``bits``; stochastic with uint32 ``bits``.

    Stochastic: between the two fp16 neighbours lo (toward zero) and hi (away from zero) of x,
    pick hi iff u < (|x| - |lo|) / (|hi| - |lo|), with u = (bits >> 8) * 2**-24. Both sides of
    that comparison are exact in fp32. Values that are exact in fp16, or whose nearest fp16 is
    infinite, round to nearest.
    """
    values = values.float()
    nearest = values.to(torch.float16)
    if bits is None:
        return nearest
    nearest32 = nearest.float()
    magnitude = values.abs()
    away = magnitude > nearest32.abs()
    pattern = nearest.view(torch.int16).to(torch.int32)
    # fp16 is sign-magnitude: +-1 on the pattern steps the magnitude by one ulp.
    other = torch.where(away, pattern + 1, pattern - 1).to(torch.int16).view(torch.float16)
    other32 = other.float()
    low = torch.minimum(nearest32.abs(), other32.abs())
    high = torch.maximum(nearest32.abs(), other32.abs())
    fraction = (magnitude - low) / (high - low)
    uniform = (bits >> 8).to(torch.float32) * 2.0**-24
    chosen = torch.where(uniform < fraction, high, low).copysign(values).to(torch.float16)
    keep_nearest = (nearest32 == values) | ~torch.isfinite(nearest32)
    return torch.where(keep_nearest, nearest, chosen)


def round_to_storage(values: torch.Tensor, dtype: torch.dtype, bits=None) -> torch.Tensor:
    """Round computed values to a storage dtype; ``bits`` (uint32) makes bf16/fp16 stochastic."""
    if dtype == torch.bfloat16:
        return round_to_bf16(values, bits)
    if dtype == torch.float16:
        return round_to_fp16(values, bits)
    return values.to(dtype)
