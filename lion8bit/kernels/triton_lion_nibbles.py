"""The "4bit" momentum codec of backend="triton" (lion8bit/quant.py, "4-bit blockwise format"),
as helpers of the fused step in :mod:`.triton_lion_kernels`.

A program's tile is ROWS blocks of 32 elements ([ROWS, 32] element tensors) and ROWS rows of 16
bytes of codes ([ROWS, 16]): a byte holds element 2i in its low nibble and 2i+1 in its high one,
so decoding is ``join(level[low], level[high])`` reshaped to the element tile and packing is its
inverse (``split`` of the tile reshaped to [ROWS, 16, 2]). Each byte of codes is loaded once and
stored once (tests/test_triton_compile.py counts them in the sm_80 / sm_90 PTX).

Every step rounds the codes stochastically, bit for bit as quant.codes_4bit with
quant.uniform_from_bits: between the levels lo < hi around the normalized x, hi iff
u < (x - lo) / (hi - lo), u = (bits >> 8) * 2**-24.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant

# The 8 positive level magnitudes' fp32 bit patterns (levels 8..15; levels 0..7 are their
# negatives): hi is found by comparing |x|'s bits with them, which for non-negative fp32 values
# is comparing the values, so no level table is read for the search.
_MAGNITUDES = quant.levels_4bit()[8:].view(torch.int32).tolist()
if quant.levels_4bit()[:8].flip(0).neg().view(torch.int32).tolist() != _MAGNITUDES:
    raise RuntimeError("the 4-bit levels are no longer symmetric: the kernel's level search assumes it")
if quant.levels_4bit()[-1] != 1.0:
    raise RuntimeError("the 4-bit end levels are no longer +-1: the kernel's end clamps assume it")
_M0, _M1, _M2, _M3, _M4, _M5, _M6, _M7 = (tl.constexpr(bits) for bits in _MAGNITUDES)
_LAST_LEVEL = tl.constexpr(len(quant.levels_4bit()) - 1)  # 15
_POSITIVE = tl.constexpr(len(_MAGNITUDES))  # 8: the first positive level
_SUBNORMAL_ABSMAX = tl.constexpr(quant.SUBNORMAL_ABSMAX)
_SUBNORMAL_SCALE = tl.constexpr(quant.SUBNORMAL_SCALE)


@triton.jit
def byte_tile(blocks, numel, QUANT_BLOCK: tl.constexpr, ALIGNED: tl.constexpr, ELEMENT_TYPE: tl.constexpr):
    # The bytes of codes of ``blocks`` (QUANT_BLOCK // 2 per block) and which exist: byte i is
    # there iff element 2i is. The mask compares a byte offset (contiguous), not 2 * offset, so
    # the compiler can prove it uniform over a thread's bytes; with ALIGNED numel % 16 == 0, so
    # the byte count is a multiple of 8.
    offsets = blocks[:, None] * (QUANT_BLOCK // 2) + tl.arange(0, QUANT_BLOCK // 2)[None, :]
    # Runs of bytes as long as a thread's 128-bit vector of ELEMENT_TYPE elements has codes (4
    # for 16-bit, 2 for fp32): left to itself the compiler loads 8-byte runs in another thread
    # layout than the elements' and converts between them through shared memory (seen in the
    # sm_90 TTGIR with triton 3.9: ttg.convert_layout of the codes, 1 KB of shared memory).
    if ELEMENT_TYPE == tl.float32:
        offsets = tl.max_contiguous(offsets, [1, 2])
    else:
        offsets = tl.max_contiguous(offsets, [1, 4])
    packed = (numel + 1) >> 1
    if ALIGNED:
        packed = tl.multiple_of(packed, 8)
    return offsets, offsets < packed


@triton.jit
def decode(packed, absmax, levels_ptr, ROWS: tl.constexpr, QUANT_BLOCK: tl.constexpr):
    # quant.dequantize_4bit: level[code] * float(absmax), one fp32 multiply. ``packed``: uint8
    # [ROWS, QUANT_BLOCK // 2]; ``absmax``: the blocks' bf16 absmax as fp32 [ROWS]. The levels
    # are gathered per nibble in the bytes' layout, then joined: byte i's low nibble at
    # [.., i, 0], its high one at [.., i, 1], which row-major is element 2i, 2i+1. Gathering after
    # the join instead, triton 3.6 (and 3.9 in the unaligned launch) gave the gather another
    # thread layout and moved its 64-bit addresses through shared memory (16 KB, sm_90 TTGIR).
    wide = packed.to(tl.int32)
    low = tl.load(levels_ptr + (wide & 0xF))
    high = tl.load(levels_ptr + (wide >> 4))
    return tl.reshape(tl.join(low, high), (ROWS, QUANT_BLOCK)) * absmax[:, None]


@triton.jit
def pack(codes, ROWS: tl.constexpr, QUANT_BLOCK: tl.constexpr):
    # int32 codes 0..15 [ROWS, QUANT_BLOCK] -> uint8 [ROWS, QUANT_BLOCK // 2], element 2i in the
    # low nibble of byte i (quant.pack_nibbles): split takes the pairs [.., i, 0] and [.., i, 1].
    even, odd = tl.split(tl.reshape(codes, (ROWS, QUANT_BLOCK // 2, 2)))
    return (even | (odd << 4)).to(tl.uint8)


@triton.jit
def round_up_to_bf16(absmax):
    # quant.round_up_to_bf16 with integer ops on the fp32 bits (non-negative or NaN input): the
    # smallest bf16 >= it, as (bf16, its exact fp32 value). A NaN absmax (tl.reduce gives
    # 0x7FC00000) is stored as 0x7FC0, where torch 2.13's CPU conversion writes 0xFFFF: NaN
    # either way, as for bf16 momentum (tests/test_backends.py compares bf16 NaN as NaN).
    pattern = absmax.to(tl.uint32, bitcast=True)
    up = tl.where((pattern & 0xFFFF) != 0, (pattern | 0xFFFF) + 1, pattern)
    return (up >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), up.to(tl.float32, bitcast=True)


@triton.jit
def normalize(m, absmax):
    # quant._normalize: (m * scale) * (1 / (absmax * scale)), scale 2**24 for a subnormal absmax
    # (1/absmax would overflow), 0 for an absmax of 0 (or NaN: absmax > 0 is false). div_rn: a
    # correctly rounded reciprocal as torch.reciprocal ("/" on fp32 lowers to div.full.f32 on
    # NVIDIA, 2 ulp).
    scale = tl.where(absmax < _SUBNORMAL_ABSMAX, _SUBNORMAL_SCALE, 1.0)
    scaled = tl.where(absmax > 0, absmax * scale, 1.0)
    inverse = tl.where(absmax > 0, tl.math.div_rn(1.0, scaled), 0.0)
    return (m * scale[:, None]) * inverse[:, None]


@triton.jit
def _above(bits, MAGNITUDE: tl.constexpr):
    return (bits > MAGNITUDE).to(tl.int32)


@triton.jit
def codes(x, bits, levels_ptr):
    # quant.codes_4bit(x, quant.uniform_from_bits(bits)) for fp32 x, int32 codes 0..15.
    # hi = clamp(#levels < x, 1, 15). With a = |x| and the positive magnitudes M_k: for x > 0,
    # #levels < x = 8 + #{M_k < a}; for x < 0 it is 8 - #{M_k <= a} (-M_k < x iff M_k > a). On
    # the bits of non-negative fp32 values M < a iff bits(M) < bits(a), and M <= a iff
    # bits(M) < bits(a) + 1. x = +-0: 8 (the reference's searchsorted too). NaN (x < 0 false,
    # its bits above every M): 16 -> 15, and u < NaN is false, so lo = 14, as searchsorted puts
    # a NaN of either sign after every level.
    negative = x < 0
    search = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) + negative.to(tl.int32)
    count = _above(search, _M0) + _above(search, _M1) + _above(search, _M2) + _above(search, _M3)
    count += _above(search, _M4) + _above(search, _M5) + _above(search, _M6) + _above(search, _M7)
    hi = tl.where(negative, _POSITIVE - count, _POSITIVE + count)
    hi = tl.minimum(tl.maximum(hi, 1), _LAST_LEVEL)
    low = tl.load(levels_ptr + (hi - 1))
    high = tl.load(levels_ptr + hi)
    # Two subtractions and one correctly rounded division, as the reference's fp32 ops.
    fraction = tl.math.div_rn(x - low, high - low)
    uniform = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24, exact
    code = tl.where(uniform < fraction, hi, hi - 1)
    code = tl.where(x <= -1.0, 0, code)  # level 0 is -1.0, level 15 is 1.0
    return tl.where(x >= 1.0, _LAST_LEVEL, code)
