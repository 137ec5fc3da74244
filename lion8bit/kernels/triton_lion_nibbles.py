"""The "4bit" momentum codec of backend="triton" (lion8bit/quant.py, "4-bit blockwise format"),
as helpers of the fused step in :mod:`.triton_lion_kernels`.

A program's tile is ROWS blocks of 32 elements ([ROWS, 32] element tensors) and ROWS rows of 16
bytes of codes ([ROWS, 16]): a byte holds element 2i in its low nibble and 2i+1 in its high one,
so decoding is ``join(level[low], level[high])`` reshaped to the element tile and packing is its
inverse (``split`` of the tile reshaped to [ROWS, 16, 2]). Each byte of codes is loaded once and
stored once (tests/test_triton_compile.py counts them in the sm_80 / sm_90 PTX).

Every step rounds the codes stochastically, bit for bit as quant.codes_4bit of quant.grid_4bit
with quant.uniform_from_bits: on the level grid t = (m * scale) * (7.5 / (absmax * scale)) + 7.5
(level c at t = c), clamped to [0, 15], the code is floor(t) + 1 iff u < t - floor(t),
u = (bits >> 8) * 2**-24. No search and no per-element division.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import quant

_LAST_PLACE = tl.constexpr(2 * quant.GRID_HALF_4BIT)  # 15.0: the last code's place on the grid
_GRID_HALF = tl.constexpr(quant.GRID_HALF_4BIT)
_SMALL_ABSMAX = tl.constexpr(quant.SMALL_ABSMAX_4BIT)
_SMALL_SCALE = tl.constexpr(quant.SMALL_SCALE_4BIT)


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
def grid(m, absmax):
    # quant.grid_4bit: (m * scale) * (7.5 / (absmax * scale)) + 7.5, scale 2**64 for an absmax
    # below 2**-64, the quotient 0 unless absmax > 0 (NaN and 0 give 0). div_rn: a correctly
    # rounded quotient as torch's fp32 division ("/" on fp32 lowers to div.full.f32 on NVIDIA,
    # 2 ulp); the launch's enable_fp_fusion=False keeps the multiply and the add two roundings.
    scale = tl.where(absmax < _SMALL_ABSMAX, _SMALL_SCALE, 1.0)
    scaled = tl.where(absmax > 0, absmax * scale, 1.0)
    grid_scale = tl.where(absmax > 0, tl.math.div_rn(_GRID_HALF, scaled), 0.0)
    return (m * scale[:, None]) * grid_scale[:, None] + _GRID_HALF


@triton.jit
def codes(t, bits):
    # quant.codes_4bit(t, quant.uniform_from_bits(bits)) for fp32 grid places t, int32 codes
    # 0..15: t clamped to [0, 15] (t > 0 is false for NaN: 0), f = floor(t), f + 1 iff u < t - f.
    # The floor compiles to libdevice's flush-to-zero cvt.rmi.ftz (sm_80 / sm_90 PTX, triton
    # 3.9), the same here: the clamped t is 0 or at least 2**-21 (cpu_lion_nibbles.h codes16).
    t = tl.minimum(tl.where(t > 0, t, 0.0), _LAST_PLACE)
    floor = tl.floor(t)
    uniform = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24, exact
    return floor.to(tl.int32) + (uniform < t - floor).to(tl.int32)
