"""backend="triton": the whole Lion step of one tensor in one fused Triton kernel, and its launcher.

Per element, in fp32 registers and in the exact operation order of ``lion8bit/reference.py``:
load param, grad and momentum (8-bit code + block absmax, bf16 or fp32), dequantize,
interpolate, sign, cautious step size, (cautious) weight decay, param update, momentum EMA, new
block absmax, requantize (nearest, ties toward zero, sign rule of ``quant.nearest_codes``) or
round to bf16, store param and momentum. Each input element is read once and each output element
written once. With caution on, a count pre-pass (``aligned_counts``) reads only the
old momentum and the grad.

Runs on CUDA tensors, or on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` when this
module is imported, which is when the kernels are decorated).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import triton
import triton.language as tl

from .. import momentum as mom
from .. import quant
from . import check_tensors, interpreting

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


def _bucket(bits: torch.Tensor) -> torch.Tensor:
    return bits >> _BUCKET_SHIFT.value


def _build_requant_table() -> tuple[torch.Tensor, int]:
    """(int32 entry per bucket, first bucket): the exact nearest-code search as one gather.

    For a normalized value x and the float64 midpoints t of the codebook, nearest code with
    ties toward zero is 127 + #{t_i in (0, |x|)} for x > 0 and 127 - #{t_i in (0, |x|)} for
    x < 0, at least code 0 (the map is symmetric but for its top code 1.0). For fp32 a, t < a iff rounddown_fp32(t) < a, so
    fp32 thresholds decide exactly, and comparing positive fp32 values is comparing their bits.
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
    # quant.random_bits: mix32(low32(i) ^ mix32(key ^ (i >> 32))) for int64 flat indices i of the
    # whole parameter (a shard starts at its element offset, anywhere, so the element key is
    # computed per element).
    element_key = _mix32(key.to(tl.uint32, bitcast=True) ^ (indices >> 32).to(tl.uint32))
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


@triton.jit
def _tile(numel, QUANT_BLOCK: tl.constexpr, ROWS: tl.constexpr):
    # A program's ROWS x QUANT_BLOCK elements; 64-bit offsets (tensors past 2**31 elements).
    blocks = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offsets = blocks[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
    return blocks, offsets, offsets < numel, blocks * QUANT_BLOCK < numel


@triton.jit
def _direction(
    grad_ptr, momentum_ptr, absmax_ptr, code_values_ptr,
    offsets, blocks, mask, block_mask,
    beta1, one_minus_beta1,
    FORMAT: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    # (g, m, u) from the old momentum: reference.update_direction.
    if FORMAT == "8bit":
        codes = tl.load(momentum_ptr + offsets, mask=mask, other=127)
        absmax = tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0)
        m = tl.load(code_values_ptr + codes.to(tl.int32)) * absmax[:, None]
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
def _aligned_count_kernel(
    # read
    grad_ptr, momentum_ptr, absmax_ptr, code_values_ptr,
    # written: one count per program
    partial_counts_ptr,
    numel,
    beta1, one_minus_beta1,
    FORMAT: tl.constexpr, MAXIMIZE: tl.constexpr,
    QUANT_BLOCK: tl.constexpr, ROWS: tl.constexpr,
):
    blocks, offsets, mask, block_mask = _tile(numel, QUANT_BLOCK, ROWS)
    g, m, u = _direction(
        grad_ptr, momentum_ptr, absmax_ptr, code_values_ptr, offsets, blocks, mask, block_mask,
        beta1, one_minus_beta1, FORMAT, MAXIMIZE,
    )
    aligned = (u * g > 0).to(tl.int32)
    tl.store(partial_counts_ptr + tl.program_id(0), tl.sum(aligned))


@triton.jit(do_not_specialize=["param_key", "momentum_key", "element_offset"])
def _lion_step_kernel(
    # updated in place
    param_ptr, momentum_ptr, absmax_ptr,
    # read: the grad, the codebook, the requantization table, [step where aligned, where not],
    # the skip_nonfinite flag (uint8: nonzero = store nothing)
    grad_ptr, code_values_ptr, requant_table_ptr, cautious_steps_ptr, skip_ptr,
    numel,
    # fp32 scalars of reference.LionScalars
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
    # stochastic rounding: uint32 keys (quant.rounding_key) as int32 bit patterns, and the flat
    # index of element 0 in the whole parameter
    param_key, momentum_key, element_offset,
    FORMAT: tl.constexpr,  # "8bit" | "bf16" | "fp32"
    MAXIMIZE: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    CAUTIOUS_MASK: tl.constexpr,  # cautious_factor == 0: masked elements do not move
    WEIGHT_DECAY: tl.constexpr,
    CAUTIOUS_WEIGHT_DECAY: tl.constexpr,
    STOCHASTIC_PARAM: tl.constexpr,
    STOCHASTIC_MOMENTUM: tl.constexpr,
    SKIP: tl.constexpr,  # skip_ptr given
    QUANT_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    blocks, offsets, mask, block_mask = _tile(numel, QUANT_BLOCK, ROWS)
    if SKIP:
        # A step skipped for non-finite grads, decided on the device (no host synchronisation):
        # every load and store of the tile is masked off.
        keep = tl.load(skip_ptr) == 0
        # tl.where, not "&": the interpreter (triton 3.9) rejects a tensor & scalar mask.
        mask = tl.where(keep, mask, False)
        block_mask = tl.where(keep, block_mask, False)
    g, m, u = _direction(
        grad_ptr, momentum_ptr, absmax_ptr, code_values_ptr, offsets, blocks, mask, block_mask,
        beta1, one_minus_beta1, FORMAT, MAXIMIZE,
    )
    p = _to_fp32(tl.load(param_ptr + offsets, mask=mask, other=0.0))

    # reference.lion_update, operation for operation.
    if CAUTIOUS:
        aligned = u * g > 0
        step_aligned = tl.load(cautious_steps_ptr)
        step_other = tl.load(cautious_steps_ptr + 1)
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

    indices = offsets + element_offset
    param_type: tl.constexpr = param_ptr.dtype.element_ty
    if param_type == tl.bfloat16:
        bits = _random_bits(param_key, indices) if STOCHASTIC_PARAM else None
        p = _round_to_bf16(p, bits, STOCHASTIC_PARAM)
    elif param_type == tl.float16:
        bits = _random_bits(param_key, indices) if STOCHASTIC_PARAM else None
        p = _round_to_fp16(p, bits, STOCHASTIC_PARAM)
    tl.store(param_ptr + offsets, p, mask=mask)

    if FORMAT == "8bit":
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
        bits = _random_bits(momentum_key, indices) if STOCHASTIC_MOMENTUM else None
        tl.store(momentum_ptr + offsets, _round_to_bf16(m, bits, STOCHASTIC_MOMENTUM), mask=mask)
    else:
        tl.store(momentum_ptr + offsets, m, mask=mask)


# ---------------------------------------------------------------------------------------------
# launcher


@functools.cache
def _tables_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Copied to a device once (the first step), like quant.codebook.
    return quant.codebook(device), _REQUANT_TABLE.to(device)


def _fp32(value: float) -> float:
    # The scalar as the reference uses it (a Python float rounded once to fp32), whatever the
    # launcher or interpreter would do with a float64; host arithmetic only.
    return float(np.float32(value))


def _int32_bits(key: int) -> int:
    # A uint32 key as the int32 with the same bits: a key >= 2**31 would otherwise be passed as
    # int64 and compile a second kernel.
    return key - ((key >> 31) << 32)


def _layout(fmt: str, block_size: int) -> tuple[int, int]:
    """(QUANT_BLOCK, ROWS) of a program's tile."""
    row = block_size if fmt == "8bit" else _DENSE_BLOCK
    return row, max(1, _TILE // row)


def _device_of(tensor: torch.Tensor):
    # Launch on the tensor's GPU, not the current one.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _momentum_buffers(momentum: dict, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if fmt == "8bit":
        return momentum[mom.MOMENTUM_CODES], momentum[mom.MOMENTUM_ABSMAX]
    return momentum[mom.MOMENTUM], None


class TritonBackend:
    name = "triton"

    def device_error(self, device: torch.device, what: str) -> str | None:
        if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
            return None
        return (
            f'backend="triton" runs on CUDA tensors, got {what} on {device}; use backend="auto" '
            'or "torch", or set TRITON_INTERPRET=1 before lion8bit imports its Triton kernels to '
            "run them in Triton's CPU interpreter (slow, for tests)"
        )

    def _check(self, params, grads, momenta, formats, block_size, element_offsets=None) -> None:
        check_tensors(self.name, params, grads, momenta, formats, block_size, element_offsets)
        for param in params:
            error = self.device_error(param.device, "a parameter")
            if error:
                raise ValueError(error)

    def aligned_counts(self, params, grads, momenta, formats, *, scalars, block_size):
        self._check(params, grads, momenta, formats, block_size)
        counts = []
        for param, grad, momentum, fmt in zip(params, grads, momenta, formats):
            numel = param.numel()
            quant_block, rows = _layout(fmt, block_size)
            grid = (triton.cdiv(numel, quant_block * rows),)
            partial_counts = torch.zeros(grid, dtype=torch.int32, device=param.device)
            if numel:
                state, absmax = _momentum_buffers(momentum, fmt)
                code_values = _tables_on(param.device)[0] if fmt == "8bit" else None
                with _device_of(param):
                    _aligned_count_kernel[grid](
                        grad, state, absmax, code_values,
                        partial_counts,
                        numel,
                        _fp32(scalars.beta1), _fp32(scalars.one_minus_beta1),
                        FORMAT=fmt, MAXIMIZE=scalars.maximize,
                        QUANT_BLOCK=quant_block, ROWS=rows,
                        num_warps=_NUM_WARPS,
                    )
            counts.append(partial_counts.sum(dtype=torch.int64))
        return counts

    def lion_step(
        self, params, grads, momenta, formats, *, scalars, block_size, rounding_keys, cautious_steps, skip,
        element_offsets=None,
    ):
        self._check(params, grads, momenta, formats, block_size, element_offsets)
        s = scalars
        skip_flag = None if skip is None else skip.to(torch.uint8)
        for index, (param, grad, momentum, fmt) in enumerate(zip(params, grads, momenta, formats)):
            numel = param.numel()
            if numel == 0:
                continue
            state, absmax = _momentum_buffers(momentum, fmt)
            code_values, requant_table = _tables_on(param.device) if fmt == "8bit" else (None, None)
            param_key = momentum_key = 0
            if rounding_keys is not None:
                param_key, momentum_key = (_int32_bits(key) for key in rounding_keys[index])
            quant_block, rows = _layout(fmt, block_size)
            grid = (triton.cdiv(numel, quant_block * rows),)
            with _device_of(param):
                _lion_step_kernel[grid](
                    param, state, absmax,
                    grad, code_values, requant_table,
                    None if cautious_steps is None else cautious_steps[index],
                    skip_flag,
                    numel,
                    _fp32(s.lr), _fp32(s.beta1), _fp32(s.one_minus_beta1),
                    _fp32(s.beta2), _fp32(s.one_minus_beta2), _fp32(s.decay),
                    param_key, momentum_key, 0 if element_offsets is None else element_offsets[index],
                    FORMAT=fmt,
                    MAXIMIZE=s.maximize,
                    CAUTIOUS=s.cautious,
                    CAUTIOUS_MASK=s.cautious_factor == 0.0,
                    WEIGHT_DECAY=s.weight_decay,
                    CAUTIOUS_WEIGHT_DECAY=s.cautious_weight_decay,
                    STOCHASTIC_PARAM=rounding_keys is not None and param.dtype != torch.float32,
                    STOCHASTIC_MOMENTUM=rounding_keys is not None and fmt == "bf16",
                    SKIP=skip_flag is not None,
                    QUANT_BLOCK=quant_block,
                    ROWS=rows,
                    num_warps=_NUM_WARPS,
                    # No FMA contraction: the reference rounds each product and sum (c, the EMA,
                    # p*decay - u*step); a fused multiply-add rounds once and changes the bits.
                    enable_fp_fusion=False,
                )


def load() -> TritonBackend:
    return TritonBackend()
