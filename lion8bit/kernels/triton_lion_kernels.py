"""The fused Triton kernels of backend="triton": the whole Lion step of every tensor of a launch,
and its cautious count pre-pass. The launcher is :mod:`lion8bit.kernels.triton_lion`.

Per element, in fp32 registers and in the exact operation order of ``lion8bit/reference.py``:
load param, grad and momentum (8-bit code + block absmax, bf16 or fp32), dequantize,
interpolate, sign, cautious step size, (cautious) weight decay, param update, momentum EMA, new
block absmax, requantize (nearest, ties toward zero, sign rule of ``quant.nearest_codes``; for
"4bit", stochastically to its 16 levels, :mod:`.triton_lion_nibbles`) or round to bf16, store
param and momentum. Each input element is read once and each output element
written once. With caution on, the count pre-pass reads only the old momentum and the grad.

One launch updates many tensors (the ``multi_tensor_apply`` pattern): a program is one tile of
one tensor; a table with a row per tensor (its addresses, size, element offset, first tile and
its slot in the call, one int64 column each: :data:`COLUMNS`) tells the program where its tensor
lives. The program finds its row by a binary search of the first-tile column, so the table is 64
bytes per tensor and no per-tile map is needed. Per-step values (rounding keys, cautious step
sizes, device scalars, the skip flag) are separate small tensors indexed by the row's slot.

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` when this
module is imported, which is when the kernels are decorated). The interpreter follows addresses
loaded from the table (triton 3.6 and 3.9), so the multi-tensor kernel is tested bit for bit there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import quant
from . import interpreting
from . import triton_lion_nibbles as nibbles

# The kernels were decorated for the interpreter iff the variable was set at import (triton reads
# TRITON_INTERPRET in @triton.jit), so this, not the variable now, says what they can run on.
INTERPRETED = interpreting()

# Requantization table (see _build_requant_table): the normalized magnitude's fp32 exponent and top
# 6 mantissa bits pick a bucket; with 6 bits no bucket holds more than one decision threshold
# of the 256-code map (5 bits would put up to 2 in one), so one gather and one compare are exact.
_BUCKET_SHIFT = tl.constexpr(17)  # 23 mantissa bits - 6
_COUNT_SHIFT = tl.constexpr(18)  # entry = thresholds below the bucket << 18 | threshold's low bits
_LOW_MASK = tl.constexpr((1 << 18) - 1)
_POSITIVE_THRESHOLDS = tl.constexpr(128)  # midpoints above zero; codes 127 + 0..128

# Elements per program: 2048 = 16 per thread with 4 warps, so a thread's share of a bf16 or fp32
# tensor and of the uint8 codes is whole 16-byte vectors (tests/test_triton_compile.py checks
# the vector width, registers and spills for sm_80 and sm_90).
_TILE = 2048
_NUM_WARPS = 4
_DENSE_BLOCK = 256  # row length of the tile when the momentum is not blockwise

# The launch table: one int64 column per field, one row per tensor (row ``rows`` of "first_tile"
# holds the launch's tile count, the end of the last tensor's tiles).
COLUMNS = ("param", "grad", "momentum", "absmax", "numel", "element_offset", "first_tile", "slot")
# Halvings of the row search: a launch holds at most 2**12 tensors (more take further launches).
_SEARCH_STEPS = tl.constexpr(12)
MAX_ROWS = 2**_SEARCH_STEPS.value



def _bucket(bits: torch.Tensor) -> torch.Tensor:
    return bits >> _BUCKET_SHIFT.value


def _build_requant_table() -> tuple[torch.Tensor, int]:
    """(int32 entry per bucket, first bucket): the exact nearest-code search as one gather.

    For a normalized value x and the float64 midpoints t of the codebook, nearest code with
    ties toward zero is 127 + #{t_i in (0, |x|)} for x > 0 and 127 - #{t_i in (0, |x|)} for
    x < 0, at least code 0 (the map is symmetric but for its top code 1.0). For fp32 a,
    t < a iff rounddown_fp32(t) < a, so fp32 thresholds decide exactly, and comparing positive
    fp32 values is comparing their bits.
    """
    thresholds = quant.decision_thresholds()[quant.ZERO_CODE :]
    nearest = thresholds.float()
    toward_zero = torch.nextafter(nearest, torch.zeros_like(nearest))
    down = torch.where(nearest.double() > thresholds, toward_zero, nearest)
    bits = down.view(torch.int32).long()
    if len(bits) != _POSITIVE_THRESHOLDS.value or not bool(down[-1] < 1.0):
        raise RuntimeError("the codebook no longer fits the requantization table's layout")
    first, end = int(_bucket(bits[0])), int(_bucket(torch.tensor(1.0).view(torch.int32)))
    lows = torch.arange(first, end, dtype=torch.int64) << _BUCKET_SHIFT.value
    below = torch.searchsorted(bits, lows)
    inside = torch.searchsorted(bits, lows + (1 << _BUCKET_SHIFT.value)) - below
    if int(inside.max()) > 1:
        raise RuntimeError("a requantization bucket holds more than one threshold")
    # No threshold in the bucket: a low part of 2**17 puts it at the bucket's top, above any x.
    low = torch.where(inside == 1, bits[below.clamp(max=len(bits) - 1)] - lows, 1 << 17)
    return ((below << _COUNT_SHIFT.value) | low).to(torch.int32), first


_REQUANT_TABLE, _FIRST = _build_requant_table()
_SUBNORMAL_ABSMAX = tl.constexpr(quant.SUBNORMAL_ABSMAX)
_SUBNORMAL_SCALE = tl.constexpr(quant.SUBNORMAL_SCALE)
_FIRST_BUCKET = tl.constexpr(_FIRST)
_NUM_BUCKETS = tl.constexpr(len(_REQUANT_TABLE))


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _max_propagating_nan(a, b):
    # torch.amax (quant.blockwise_absmax) returns NaN for a block holding a NaN; tl.max's
    # maximum does not promise either way (PropagateNan.NONE; max.f32 on NVIDIA drops a NaN).
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _mix32(x):
    # quant.mix32 ("lowbias32") in native uint32 arithmetic.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _random_bits(key, indices):
    # quant.random_bits for a uint32 ``key``: mix32(low32(i) ^ mix32(key ^ (i >> 32))) for int64
    # flat indices i of the whole parameter (a shard starts at its element offset, anywhere, so
    # the element key is computed per element).
    element_key = _mix32(key ^ (indices >> 32).to(tl.uint32))
    return _mix32(indices.to(tl.uint32) ^ element_key)


@triton.jit
def _to_fp32(x):
    # bf16 -> fp32 by its bits (exact, as on the GPU): the interpreter's cast (triton 3.9) turns
    # bf16 subnormals into wrong values (-1.8367e-40 into -0.0, 1.0102e-39 into 4.4081e-39).
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _round_to_bf16(x, bits, STOCHASTIC: tl.constexpr):
    # quant.round_to_bf16 with integer ops: the interpreter's fp32 -> bf16 cast truncates where
    # the GPU rounds to nearest even (triton 3.9), so both would not agree on .to(tl.bfloat16).
    pattern = x.to(tl.uint32, bitcast=True)
    rounded = (pattern + 0x7FFF + ((pattern >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN: c10's canonical quiet NaN
    if STOCHASTIC:
        finite = (pattern & 0x7F800000) != 0x7F800000
        rounded = tl.where(finite, (pattern + (bits >> 16)) >> 16, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _round_to_fp16(x, bits, STOCHASTIC: tl.constexpr):
    # quant.round_to_fp16. The cast rounds to nearest even on the GPU (cvt.rn) and in the
    # interpreter (numpy).
    nearest = x.to(tl.float16)
    if STOCHASTIC:
        nearest32 = nearest.to(tl.float32)
        magnitude = tl.abs(x)
        away = magnitude > tl.abs(nearest32)
        pattern = nearest.to(tl.int16, bitcast=True)
        other = tl.where(away, pattern + 1, pattern - 1).to(tl.int16)
        other32 = other.to(tl.float16, bitcast=True).to(tl.float32)
        low = tl.minimum(tl.abs(nearest32), tl.abs(other32))
        high = tl.maximum(tl.abs(nearest32), tl.abs(other32))
        uniform = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
        # u < (|x| - low) / (high - low), without the division: high - low is a power of two and
        # both sides are exact in fp32 (quant.round_to_fp16), so the comparison is the same.
        chosen = tl.where(uniform * (high - low) < magnitude - low, high, low)
        # copysign by the bits: triton 3.6's interpreter negates 0.0 to +0.0 (0 - x), the
        # reference (and the GPU's neg.f32) to -0.0.
        sign = x.to(tl.uint32, bitcast=True) & 0x80000000
        chosen = (chosen.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True).to(tl.float16)
        keep = (nearest32 == x) | ~(tl.abs(nearest32) <= 65504.0)  # exact, infinite or NaN
        nearest = tl.where(keep, nearest, chosen)
    return nearest


@triton.jit
def _nearest_codes(normalized, requant_table_ptr):
    # quant.nearest_codes exactly; see _build_requant_table.
    bits = normalized.to(tl.int32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF
    bucket = (magnitude >> _BUCKET_SHIFT) - _FIRST_BUCKET
    entry = tl.load(requant_table_ptr + tl.minimum(tl.maximum(bucket, 0), _NUM_BUCKETS - 1))
    threshold = (magnitude >> _BUCKET_SHIFT << _BUCKET_SHIFT) + (entry & _LOW_MASK)
    count = (entry >> _COUNT_SHIFT) + (threshold < magnitude).to(tl.int32)
    count = tl.where(bucket < 0, 0, tl.where(bucket >= _NUM_BUCKETS, _POSITIVE_THRESHOLDS, count))
    count = tl.where(magnitude != 0, tl.maximum(count, 1), count)  # never store non-zero as 0
    code = tl.where(bits < 0, 127 - tl.minimum(count, 127), 127 + count)
    # NaN of either sign sorts above every threshold in quant.nearest_codes: code 255 (a NaN
    # momentum; x86 makes 0 * inf a negative NaN, NVIDIA a positive one).
    code = tl.where(magnitude > 0x7F800000, 255, code)
    return code.to(tl.uint8)




def layout(fmt: str, block_size: int) -> tuple[int, int]:
    """(QUANT_BLOCK, ROWS) of a program's tile: ROWS x QUANT_BLOCK elements."""
    row = {"8bit": block_size, "4bit": quant.BLOCK_SIZE_4BIT}.get(fmt, _DENSE_BLOCK)
    return row, max(1, _TILE // row)


@triton.jit
def _find_row(first_tiles, rows, tile):
    # The table row whose tiles hold ``tile``: first_tiles ascends (every row has a tile) and
    # first_tiles[rows] is the launch's tile count, so lo <= row < hi holds throughout, and
    # 12 halvings take any rows <= 2**12 down to hi - lo == 1.
    lo = tile * 0
    hi = lo + rows
    for _ in tl.static_range(_SEARCH_STEPS):
        middle = (lo + hi) >> 1
        right = tl.load(first_tiles + middle) <= tile
        lo = tl.where(right, middle, lo)
        hi = tl.where(right, hi, middle)
    return lo


@triton.jit
def _absmax_pointer(address, FORMAT: tl.constexpr):
    # One return: the compiler (not the interpreter) rejects returns of different pointer types.
    if FORMAT == "4bit":
        pointer = address.to(tl.pointer_type(tl.bfloat16))
    else:
        pointer = address.to(tl.pointer_type(tl.float32))
    return pointer


@triton.jit
def _momentum_pointer(address, FORMAT: tl.constexpr, ALIGNED: tl.constexpr):
    if FORMAT == "8bit" or FORMAT == "4bit":
        pointer = address.to(tl.pointer_type(tl.uint8))
    elif FORMAT == "bf16":
        pointer = address.to(tl.pointer_type(tl.bfloat16))
    else:
        pointer = address.to(tl.pointer_type(tl.float32))
    if ALIGNED:
        # Here, not on the returned value: triton 3.6 drops a hint put on a helper's result
        # (the momentum's accesses compiled to scalars; 3.9 keeps it).
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _tile(tile, numel, QUANT_BLOCK: tl.constexpr, ROWS: tl.constexpr):
    # Tile ``tile`` of a tensor: ROWS x QUANT_BLOCK elements; 64-bit offsets (tensors past 2**31
    # elements).
    blocks = tile * ROWS + tl.arange(0, ROWS)
    offsets = blocks[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
    return blocks, offsets, offsets < numel, blocks * QUANT_BLOCK < numel


@triton.jit
def _code_tile(
    offsets, mask, blocks, numel,
    FORMAT: tl.constexpr, QUANT_BLOCK: tl.constexpr, ALIGNED: tl.constexpr, ELEMENT_TYPE: tl.constexpr,
):
    # Where the momentum's codes of the tile are: "4bit" packs two per byte, the others store one
    # element per element. ELEMENT_TYPE: the type whose vectors set the elements' thread layout.
    if FORMAT == "4bit":
        offsets, mask = nibbles.byte_tile(blocks, numel, QUANT_BLOCK, ALIGNED, ELEMENT_TYPE)
    return offsets, mask


@triton.jit
def _direction(
    grad_ptr, momentum_ptr, absmax_ptr, code_values_ptr,
    offsets, blocks, mask, block_mask, code_offsets, code_mask,
    beta1, one_minus_beta1,
    FORMAT: tl.constexpr, MAXIMIZE: tl.constexpr, ROWS: tl.constexpr, QUANT_BLOCK: tl.constexpr,
):
    # (g, m, u) from the old momentum: reference.update_direction. ``code_offsets`` and
    # ``code_mask``: the momentum's (_code_tile); ``code_values_ptr``: the 4-bit levels for "4bit".
    if FORMAT == "8bit":
        codes = tl.load(momentum_ptr + offsets, mask=mask, other=127)
        absmax = tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0)
        m = tl.load(code_values_ptr + codes.to(tl.int32)) * absmax[:, None]
    elif FORMAT == "4bit":
        packed = tl.load(momentum_ptr + code_offsets, mask=code_mask, other=0)
        absmax = _to_fp32(tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0))
        m = nibbles.decode(packed, absmax, code_values_ptr, ROWS, QUANT_BLOCK)
    else:
        m = _to_fp32(tl.load(momentum_ptr + offsets, mask=mask, other=0.0))
    g = _to_fp32(tl.load(grad_ptr + offsets, mask=mask, other=0.0))
    if MAXIMIZE:
        # -g by its sign bit, as torch negates (-0.0 for 0.0; triton 3.6's interpreter gives +0.0).
        g = (g.to(tl.uint32, bitcast=True) ^ 0x80000000).to(tl.float32, bitcast=True)
    c = m * beta1 + g * one_minus_beta1
    u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # torch.sign, NaN included
    return g, m, u


@triton.jit
def _stream_bits(rounding_keys_ptr, slot, stream: tl.constexpr, indices, STOCHASTIC: tl.constexpr):
    # The bits of one stream (0: param, 1: momentum) of a slot's uint32 keys, held as int64.
    bits = None
    if STOCHASTIC:
        bits = _random_bits(tl.load(rounding_keys_ptr + 2 * slot + stream).to(tl.uint32), indices)
    return bits


@triton.jit(do_not_specialize=["rows"])
def _aligned_count_kernel(
    # the launch table (COLUMNS; the param and element-offset columns are not read)
    grad_ptrs, momentum_ptrs, absmax_ptrs, numels, first_tiles, slots, rows,
    # read: the codebook, the step's device scalars (DEVICE_SCALARS); written: an int64 count per slot
    code_values_ptr, step_scalars_ptr, counts_ptr,
    beta1, one_minus_beta1,
    GRAD_TYPE: tl.constexpr, FORMAT: tl.constexpr, MAXIMIZE: tl.constexpr,
    DEVICE_SCALARS: tl.constexpr, ALIGNED: tl.constexpr,
    QUANT_BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    row = _find_row(first_tiles, rows, program)
    grad_ptr = tl.load(grad_ptrs + row).to(tl.pointer_type(GRAD_TYPE))
    momentum_ptr = _momentum_pointer(tl.load(momentum_ptrs + row), FORMAT, ALIGNED)
    absmax_ptr = _absmax_pointer(tl.load(absmax_ptrs + row), FORMAT)
    numel = tl.load(numels + row)
    if ALIGNED:  # the launcher put only 16-byte-aligned tensors of numel % 16 == 0 here
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        numel = tl.multiple_of(numel, 16)
    if DEVICE_SCALARS:
        beta1 = tl.load(step_scalars_ptr)
        one_minus_beta1 = tl.load(step_scalars_ptr + 1)
    tile = program - tl.load(first_tiles + row)
    blocks, offsets, mask, block_mask = _tile(tile, numel, QUANT_BLOCK, ROWS)
    code_offsets, code_mask = _code_tile(offsets, mask, blocks, numel, FORMAT, QUANT_BLOCK, ALIGNED, GRAD_TYPE)
    g, m, u = _direction(
        grad_ptr, momentum_ptr, absmax_ptr, code_values_ptr, offsets, blocks, mask, block_mask,
        code_offsets, code_mask, beta1, one_minus_beta1, FORMAT, MAXIMIZE, ROWS, QUANT_BLOCK,
    )
    aligned = (u * g > 0).to(tl.int32)
    # Integer sums: the order of the tiles' additions does not change the count.
    tl.atomic_add(counts_ptr + tl.load(slots + row), tl.sum(aligned).to(tl.int64), sem="relaxed")


@triton.jit(do_not_specialize=["rows"])
def _lion_step_kernel(
    # the launch table (COLUMNS): params, momentum and absmax are updated in place at its addresses
    param_ptrs, grad_ptrs, momentum_ptrs, absmax_ptrs, numels, element_offsets, first_tiles, slots,
    rows,
    # read: the codebook (the levels for "4bit"), the requantization table
    code_values_ptr, requant_table_ptr,
    # read, per slot: uint32 stochastic-rounding keys (int64 [n, 2], quant.rounding_key), cautious
    # step sizes (fp32 [n, 2]: where aligned, where not); per step: the device scalars (fp32 [6],
    # lion8bit.kernels.STEP_SCALARS' order), the skip_nonfinite flag (uint8: nonzero = store nothing)
    rounding_keys_ptr, cautious_steps_ptr, step_scalars_ptr, skip_ptr,
    # fp32 scalars of reference.LionScalars (unread with DEVICE_SCALARS)
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
    PARAM_TYPE: tl.constexpr,
    GRAD_TYPE: tl.constexpr,
    FORMAT: tl.constexpr,  # "8bit" | "4bit" | "bf16" | "fp32"
    MAXIMIZE: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    CAUTIOUS_MASK: tl.constexpr,  # cautious_factor == 0: masked elements do not move
    WEIGHT_DECAY: tl.constexpr,
    CAUTIOUS_WEIGHT_DECAY: tl.constexpr,
    STOCHASTIC_PARAM: tl.constexpr,
    STOCHASTIC_MOMENTUM: tl.constexpr,  # bf16 momentum ("4bit" always rounds stochastically)
    SKIP: tl.constexpr,  # skip_ptr given
    DEVICE_SCALARS: tl.constexpr,  # step_scalars_ptr given: the scalars come from it
    ALIGNED: tl.constexpr,  # every tensor 16-byte aligned with numel % 16 == 0: 128-bit accesses
    QUANT_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)
    row = _find_row(first_tiles, rows, program)
    param_ptr = tl.load(param_ptrs + row).to(tl.pointer_type(PARAM_TYPE))
    grad_ptr = tl.load(grad_ptrs + row).to(tl.pointer_type(GRAD_TYPE))
    momentum_ptr = _momentum_pointer(tl.load(momentum_ptrs + row), FORMAT, ALIGNED)
    absmax_ptr = _absmax_pointer(tl.load(absmax_ptrs + row), FORMAT)
    numel = tl.load(numels + row)
    if ALIGNED:  # the launcher put only 16-byte-aligned tensors of numel % 16 == 0 here
        param_ptr = tl.multiple_of(param_ptr, 16)
        grad_ptr = tl.multiple_of(grad_ptr, 16)
        numel = tl.multiple_of(numel, 16)
    slot = tl.load(slots + row)
    if DEVICE_SCALARS:  # capturable: an LR schedule between CUDA-graph replays is seen
        beta1 = tl.load(step_scalars_ptr)
        one_minus_beta1 = tl.load(step_scalars_ptr + 1)
        beta2 = tl.load(step_scalars_ptr + 2)
        one_minus_beta2 = tl.load(step_scalars_ptr + 3)
        decay = tl.load(step_scalars_ptr + 4)
        lr = tl.load(step_scalars_ptr + 5)
    tile = program - tl.load(first_tiles + row)
    blocks, offsets, mask, block_mask = _tile(tile, numel, QUANT_BLOCK, ROWS)
    code_offsets, code_mask = _code_tile(offsets, mask, blocks, numel, FORMAT, QUANT_BLOCK, ALIGNED, PARAM_TYPE)
    if SKIP:
        # A step skipped for non-finite grads, decided on the device (no host synchronisation):
        # every load and store of the tile is masked off.
        keep = tl.load(skip_ptr) == 0
        # tl.where, not "&": the interpreter (triton 3.9) rejects a tensor & scalar mask.
        mask = tl.where(keep, mask, False)
        block_mask = tl.where(keep, block_mask, False)
        code_mask = tl.where(keep, code_mask, False)
    g, m, u = _direction(
        grad_ptr, momentum_ptr, absmax_ptr, code_values_ptr, offsets, blocks, mask, block_mask,
        code_offsets, code_mask, beta1, one_minus_beta1, FORMAT, MAXIMIZE, ROWS, QUANT_BLOCK,
    )
    p = _to_fp32(tl.load(param_ptr + offsets, mask=mask, other=0.0))

    # reference.lion_update, operation for operation.
    if CAUTIOUS:
        aligned = u * g > 0
        step_aligned = tl.load(cautious_steps_ptr + 2 * slot)
        step_other = tl.load(cautious_steps_ptr + 2 * slot + 1)
        step = tl.where(aligned, step_aligned, step_other)
    else:
        step = lr
    if WEIGHT_DECAY:
        decayed = p * decay
        if CAUTIOUS_WEIGHT_DECAY:
            direction = u
            if CAUTIOUS_MASK:
                direction = tl.where(aligned, u, 0.0)
            decayed = tl.where(direction * p >= 0, decayed, p)
        p = decayed
    p = p - u * step
    m = m * beta2 + g * one_minus_beta2

    # Flat indices in the whole parameter (a shard starts at its element offset), for the bits.
    indices = offsets + tl.load(element_offsets + row)
    if PARAM_TYPE == tl.bfloat16:
        bits = _stream_bits(rounding_keys_ptr, slot, 0, indices, STOCHASTIC_PARAM)
        p = _round_to_bf16(p, bits, STOCHASTIC_PARAM)
    elif PARAM_TYPE == tl.float16:
        bits = _stream_bits(rounding_keys_ptr, slot, 0, indices, STOCHASTIC_PARAM)
        p = _round_to_fp16(p, bits, STOCHASTIC_PARAM)
    tl.store(param_ptr + offsets, p, mask=mask)

    if FORMAT == "4bit":
        # quant.quantize_4bit, rounding stochastically with the momentum stream's bits (always:
        # the format's rounding, whatever STOCHASTIC_MOMENTUM says).
        absmax, absmax32 = nibbles.round_up_to_bf16(
            tl.reduce(tl.where(mask, tl.abs(m), 0.0), 1, _max_propagating_nan)
        )
        bits = _stream_bits(rounding_keys_ptr, slot, 1, indices, True)
        codes = nibbles.codes(nibbles.grid(m, absmax32), bits)
        # Elements past the end code 0: an odd count's last high nibble (quant.pack_nibbles).
        codes = nibbles.pack(tl.where(mask, codes, 0), ROWS, QUANT_BLOCK)
        tl.store(momentum_ptr + code_offsets, codes, mask=code_mask)
        tl.store(absmax_ptr + blocks, absmax, mask=block_mask)
    elif FORMAT == "8bit":
        absmax = tl.reduce(tl.where(mask, tl.abs(m), 0.0), 1, _max_propagating_nan)
        # A correctly rounded reciprocal, as torch.reciprocal: on NVIDIA, "/" on fp32 lowers to
        # an approximate division (div.full.f32, 2 ulp); div_rn is div.rn.f32.
        # A subnormal absmax would overflow 1/absmax: scale as quant.quantize_blockwise does.
        scale = tl.where(absmax < _SUBNORMAL_ABSMAX, _SUBNORMAL_SCALE, 1.0)
        scaled = tl.where(absmax > 0, absmax * scale, 1.0)
        inverse = tl.where(absmax > 0, tl.math.div_rn(1.0, scaled), 0.0)
        codes = _nearest_codes((m * scale[:, None]) * inverse[:, None], requant_table_ptr)
        tl.store(momentum_ptr + offsets, codes, mask=mask)
        tl.store(absmax_ptr + blocks, absmax, mask=block_mask)
    elif FORMAT == "bf16":
        bits = _stream_bits(rounding_keys_ptr, slot, 1, indices, STOCHASTIC_MOMENTUM)
        tl.store(momentum_ptr + offsets, _round_to_bf16(m, bits, STOCHASTIC_MOMENTUM), mask=mask)
    else:
        tl.store(momentum_ptr + offsets, m, mask=mask)
