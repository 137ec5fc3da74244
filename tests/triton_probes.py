"""Kernels that run one helper of lion8bit/kernels/triton_lion_kernels.py alone, for exhaustive
tests.

Imported by tests/test_triton_kernel.py after it has imported the kernels under
TRITON_INTERPRET=1 (triton reads the variable in @triton.jit), so these run in the interpreter too.
"""

import torch
import triton
import triton.language as tl

from lion8bit import quant
from lion8bit.kernels import triton_lion, triton_lion_kernels

_nearest_codes = triton_lion_kernels._nearest_codes
_random_bits = triton_lion_kernels._random_bits
_round_to_bf16 = triton_lion_kernels._round_to_bf16
_round_to_fp16 = triton_lion_kernels._round_to_fp16

BLOCK = 1024


@triton.jit
def _nearest_codes_kernel(normalized_ptr, requant_table_ptr, codes_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    normalized = tl.load(normalized_ptr + offsets, mask=mask, other=0.0)
    tl.store(codes_ptr + offsets, _nearest_codes(normalized, requant_table_ptr), mask=mask)


@triton.jit
def _random_bits_kernel(bits_ptr, key, start, numel, BLOCK: tl.constexpr):
    # ``key``: the uint32 key as an int32 bit pattern (a launch argument >= 2**31 would be int64).
    offsets = start + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bits = _random_bits(key.to(tl.uint32, bitcast=True), offsets)
    tl.store(bits_ptr + offsets - start, bits.to(tl.int64), mask=offsets - start < numel)


@triton.jit
def _round_kernel(
    values_ptr, bits_ptr, bf16_ptr, fp16_ptr, numel, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr
):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    values = tl.load(values_ptr + offsets, mask=mask, other=0.0)
    bits = tl.load(bits_ptr + offsets, mask=mask, other=0).to(tl.uint32)
    tl.store(bf16_ptr + offsets, _round_to_bf16(values, bits, STOCHASTIC), mask=mask)
    tl.store(fp16_ptr + offsets, _round_to_fp16(values, bits, STOCHASTIC), mask=mask)


def nearest_codes(normalized: torch.Tensor) -> torch.Tensor:
    codes = torch.empty(normalized.shape, dtype=torch.uint8)
    table = triton_lion._tables_on(normalized.device)[1]
    _nearest_codes_kernel[(triton.cdiv(normalized.numel(), BLOCK),)](
        normalized, table, codes, normalized.numel(), BLOCK=BLOCK
    )
    return codes


def random_bits(key: int, numel: int, start: int) -> torch.Tensor:
    """Like quant.random_bits(key, numel, "cpu", start); start must be a multiple of BLOCK."""
    bits = torch.empty(numel, dtype=torch.int64)
    _random_bits_kernel[(triton.cdiv(numel, BLOCK),)](
        bits, key - ((key >> 31) << 32), start, numel, BLOCK=BLOCK
    )
    return bits


def round_to_16_bits(values: torch.Tensor, bits: torch.Tensor | None):
    """(bf16, fp16) roundings of fp32 ``values``; stochastic with uint32 ``bits`` (int64 tensor)."""
    bf16 = torch.empty(values.shape, dtype=torch.bfloat16)
    fp16 = torch.empty(values.shape, dtype=torch.float16)
    stochastic = bits is not None
    if bits is None:
        bits = torch.zeros(values.shape, dtype=torch.int64)
    _round_kernel[(triton.cdiv(values.numel(), BLOCK),)](
        values, bits, bf16, fp16, values.numel(), STOCHASTIC=stochastic, BLOCK=BLOCK
    )
    return bf16, fp16


# ---------------------------------------------------------------------------------------------
# the "4bit" codec (lion8bit/kernels/triton_lion_nibbles.py) on tiles of ROWS_4BIT blocks of 32

nibbles = triton_lion_kernels.nibbles
ROWS_4BIT = 8


@triton.jit
def _quantize_4bit_kernel(
    values_ptr, bits_ptr, levels_ptr, packed_ptr, absmax_ptr, numel, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    # What the step does to its new momentum m: absmax, round up, grid, codes, pack.
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offsets = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offsets < numel
    m = tl.load(values_ptr + offsets, mask=mask, other=0.0)
    bits = tl.load(bits_ptr + offsets, mask=mask, other=0).to(tl.uint32)
    absmax, absmax32 = nibbles.round_up_to_bf16(
        tl.reduce(tl.where(mask, tl.abs(m), 0.0), 1, triton_lion_kernels._max_propagating_nan)
    )
    codes = nibbles.codes(nibbles.grid(m, absmax32), bits)
    byte_offsets, byte_mask = nibbles.byte_tile(blocks, numel, BLOCK, False, tl.float32)
    tl.store(packed_ptr + byte_offsets, nibbles.pack(tl.where(mask, codes, 0), ROWS, BLOCK), mask=byte_mask)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks * BLOCK < numel)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, levels_ptr, values_ptr, numel, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    blocks = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offsets = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    byte_offsets, byte_mask = nibbles.byte_tile(blocks, numel, BLOCK, False, tl.float32)
    packed = tl.load(packed_ptr + byte_offsets, mask=byte_mask, other=0)
    absmax = triton_lion_kernels._to_fp32(tl.load(absmax_ptr + blocks, mask=blocks * BLOCK < numel, other=0.0))
    m = nibbles.decode(packed, absmax, levels_ptr, ROWS, BLOCK)
    tl.store(values_ptr + offsets, m, mask=offsets < numel)


def quantize_4bit(values: torch.Tensor, bits: torch.Tensor):
    """Like quant.quantize_4bit(values, bits): (packed uint8, bf16 absmax)."""
    numel = values.numel()
    packed = torch.full((quant.packed_size(numel),), 0xAA, dtype=torch.uint8)  # every byte is written
    absmax = torch.full((quant.num_blocks(numel, 32),), float("nan"), dtype=torch.bfloat16)
    _quantize_4bit_kernel[(triton.cdiv(numel, 32 * ROWS_4BIT),)](
        values, bits, quant.levels_4bit(), packed, absmax, numel, ROWS=ROWS_4BIT, BLOCK=32
    )
    return packed, absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, numel: int) -> torch.Tensor:
    """Like quant.dequantize_4bit."""
    values = torch.empty(numel, dtype=torch.float32)
    _dequantize_4bit_kernel[(triton.cdiv(numel, 32 * ROWS_4BIT),)](
        packed, absmax, quant.levels_4bit(), values, numel, ROWS=ROWS_4BIT, BLOCK=32
    )
    return values
