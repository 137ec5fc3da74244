"""What the optimizer keeps per parameter, and the rules that decide it (DESIGN.md §3).

One place for the state keys, the per-tensor format rule (``min_8bit_size``), zero-initialised
buffers, encoding / decoding the momentum, the exact byte count (used by the budget tool) and the
checks a loaded state must pass. The optimizer, the reference, the kernels' launchers, interop
and the budget tool all use these, so they cannot disagree.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import quant

STATE_KINDS = ("8bit", "4bit", "bf16", "fp32")
# The formats stored as codes + absmax per block; tensors under min_8bit_size keep fp32 instead.
QUANTIZED = ("8bit", "4bit")

# State keys, one per concept, in every state dict this package writes.
# int (an int64 0-dim tensor with capturable=True): the step() calls that reached this param with
# a grad, those skipped for non-finite grads included (so no stochastic-rounding key is used
# twice); not the lr-0 call that only creates the state for torch.distributed.checkpoint.
STEP = "step"
MOMENTUM = "momentum"  # dense momentum: fp32 ("fp32", and "8bit" under min_8bit_size) or bf16
# "8bit": uint8 codes, the param's shape; "4bit": uint8, two codes per byte, flat [ceil(n / 2)]
# (element 2i in the low nibble of byte i, lion8bit/quant.py pack_nibbles)
MOMENTUM_CODES = "momentum_codes"
# absmax per block of the flattened param: fp32 for "8bit" (blocks of block_size), bf16 for
# "4bit" (blocks of quant.BLOCK_SIZE_4BIT); the absmax dtype tells the two formats apart
MOMENTUM_ABSMAX = "momentum_absmax"
SR_SEED = "sr_seed"  # int: stochastic-rounding seed of this param (with STEP: the RNG position)
NONFINITE_SKIPS = "nonfinite_skips"  # int64 0-dim tensor: steps skipped for non-finite grads

# The momentum buffers of each format: what the backends receive and update in place.
BUFFER_KEYS = {
    "8bit": (MOMENTUM_CODES, MOMENTUM_ABSMAX),
    "4bit": (MOMENTUM_CODES, MOMENTUM_ABSMAX),
    "bf16": (MOMENTUM,),
    "fp32": (MOMENTUM,),
}

_DENSE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}

# With paged=True, the momentum of a (local) tensor of at least this many elements lives in CUDA
# managed memory (lion8bit/paged.py); smaller ones keep ordinary device memory, as managed
# allocations are page-granular. bitsandbytes 0.50.2 draws the same line
# (Optimizer8bit.get_state_buffer: p.numel() < 1e5 is not paged). The budget tool counts with it.
PAGED_MIN_NUMEL = 100_000


def momentum_format(numel: int, state: str, min_8bit_size: int) -> str:
    """The format one tensor's momentum really uses: "8bit" and "4bit" fall back to "fp32"
    under ``min_8bit_size`` elements (one threshold, bitsandbytes' name, for both)."""
    if numel < min_8bit_size and state in QUANTIZED:
        return "fp32"
    return state


def absmax_block(fmt: str, block_size: int) -> int:
    """Elements per absmax block of a quantized format: the group's ``block_size`` for "8bit",
    the fixed :data:`lion8bit.quant.BLOCK_SIZE_4BIT` for "4bit"."""
    return quant.BLOCK_SIZE_4BIT if fmt == "4bit" else block_size


def momentum_nbytes(numel: int, fmt: str, block_size: int = quant.BLOCK_SIZE) -> int:
    """Bytes of the momentum buffers of one tensor in the format ``fmt``."""
    if fmt == "8bit":
        return numel + 4 * quant.num_blocks(numel, block_size)
    if fmt == "4bit":
        return quant.packed_size(numel) + 2 * quant.num_blocks(numel, quant.BLOCK_SIZE_4BIT)
    return numel * _DENSE_DTYPE[fmt].itemsize


def stored_format(entry: dict) -> str | None:
    """The format of a state entry from its tensors, or None for an entry without momentum."""
    if MOMENTUM_CODES in entry:
        absmax = entry.get(MOMENTUM_ABSMAX)
        return "4bit" if getattr(absmax, "dtype", None) == torch.bfloat16 else "8bit"
    momentum = entry.get(MOMENTUM)
    if momentum is None:
        return None
    return "bf16" if momentum.dtype == torch.bfloat16 else "fp32"


def new_momentum(
    like: torch.Tensor, fmt: str, block_size: int, empty: Callable = torch.empty
) -> dict[str, torch.Tensor]:
    """Zero momentum buffers for a tensor ``like`` (its shape and device).

    ``empty(shape, dtype=, device=)`` allocates them: ``torch.empty``, or the managed-memory
    allocator of :mod:`lion8bit.paged`; they are then filled in place (no second buffer).
    """
    if fmt == "8bit":
        codes = empty(like.shape, dtype=torch.uint8, device=like.device)
        absmax = empty(
            (quant.num_blocks(like.numel(), block_size),), dtype=torch.float32, device=like.device
        )
        return {MOMENTUM_CODES: codes.fill_(quant.ZERO_CODE), MOMENTUM_ABSMAX: absmax.zero_()}
    if fmt == "4bit":
        return new_4bit(like.numel(), like.device, empty)
    momentum = empty(like.shape, dtype=_DENSE_DTYPE[fmt], device=like.device)
    return {MOMENTUM: momentum.zero_()}


def new_4bit(numel: int, device, empty: Callable = torch.empty) -> dict[str, torch.Tensor]:
    """Zero "4bit" buffers for ``numel`` elements (a sharded param's: those of the blocks that
    overlap its shard, lion8bit/sharded.py)."""
    codes = empty((quant.packed_size(numel),), dtype=torch.uint8, device=device)
    absmax = empty((quant.num_blocks(numel, quant.BLOCK_SIZE_4BIT),), dtype=torch.bfloat16, device=device)
    # zeros encode (to nearest) as code 7 in every nibble: quant.quantize_4bit of zeros
    packed = codes.fill_(0x77)
    if numel % 2:
        packed[-1] = 0x07
    return {MOMENTUM_CODES: packed, MOMENTUM_ABSMAX: absmax.zero_()}


def decode_momentum(
    entry: dict, fmt: str, block_size: int, dtype=torch.float32, shape: tuple | torch.Size | None = None
) -> torch.Tensor:
    """The momentum as a new dense tensor of ``dtype`` (the compute dtype), never an alias.

    ``shape``: the param's; needed for "4bit", whose codes are stored flat (two per byte).
    """
    if fmt == "8bit":
        values = quant.dequantize_blockwise(
            entry[MOMENTUM_CODES], entry[MOMENTUM_ABSMAX], block_size
        )
        return values.to(dtype)
    if fmt == "4bit":
        if shape is None:
            raise ValueError("decoding 4-bit momentum needs the param's shape")
        numel = math.prod(shape)
        return quant.dequantize_4bit(entry[MOMENTUM_CODES], entry[MOMENTUM_ABSMAX], numel).to(dtype).view(shape)
    return entry[MOMENTUM].to(dtype, copy=True)


def encode_momentum(
    entry: dict, values: torch.Tensor, fmt: str, block_size: int, bits=None
) -> None:
    """Store dense momentum ``values`` into the entry's buffers in place.

    "8bit" quantizes the fp32 values (nearest, sign rule); "4bit" rounds stochastically with
    uint32 ``bits`` (every step does), to nearest without (re-encoding, converted checkpoints);
    "bf16" rounds to nearest even, or stochastically with ``bits``.
    """
    if fmt == "8bit":
        codes, absmax = quant.quantize_blockwise(values.float(), block_size)
        entry[MOMENTUM_CODES].copy_(codes)
        entry[MOMENTUM_ABSMAX].copy_(absmax)
    elif fmt == "4bit":
        codes, absmax = quant.quantize_4bit(values.float(), bits)
        entry[MOMENTUM_CODES].copy_(codes)
        entry[MOMENTUM_ABSMAX].copy_(absmax)
    else:
        momentum = entry[MOMENTUM]
        momentum.copy_(quant.round_to_storage(values.float(), momentum.dtype, bits))


def check_momentum(entry: dict, param: torch.Tensor, fmt: str, block_size: int, where: str):
    """Raise ValueError, naming ``where``, unless the entry's buffers fit ``param`` and ``fmt``."""
    found = stored_format(entry)
    if found is None:
        if entry:
            raise ValueError(f"{where}: state has no momentum (keys {sorted(entry)})")
        return
    if found != fmt:
        raise ValueError(
            f"{where}: state holds {found!r} momentum but this parameter uses {fmt!r} "
            f"(state kind, min_8bit_size or block_size differ from the checkpoint's)"
        )
    shape = tuple(param.shape)
    if fmt == "4bit":
        packed = (quant.packed_size(param.numel()),)
        _check_buffer(entry.get(MOMENTUM_CODES), MOMENTUM_CODES, torch.uint8, packed, where)
        blocks = (quant.num_blocks(param.numel(), quant.BLOCK_SIZE_4BIT),)
        _check_buffer(entry.get(MOMENTUM_ABSMAX), MOMENTUM_ABSMAX, torch.bfloat16, blocks, where)
    elif fmt == "8bit":
        codes, absmax = entry[MOMENTUM_CODES], entry.get(MOMENTUM_ABSMAX)
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            raise ValueError(f"{where}: {MOMENTUM_CODES} must be a uint8 tensor")
        if tuple(codes.shape) != shape:
            raise ValueError(
                f"{where}: {MOMENTUM_CODES} has shape {tuple(codes.shape)}, the parameter {shape}"
            )
        blocks = quant.num_blocks(param.numel(), block_size)
        if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
            raise ValueError(f"{where}: {MOMENTUM_ABSMAX} must be an fp32 tensor")
        if tuple(absmax.shape) != (blocks,):
            raise ValueError(
                f"{where}: {MOMENTUM_ABSMAX} has shape {tuple(absmax.shape)}, expected ({blocks},) "
                f"for {param.numel()} elements in blocks of {block_size}"
            )
    else:
        momentum = entry[MOMENTUM]
        if tuple(momentum.shape) != shape:
            raise ValueError(
                f"{where}: {MOMENTUM} has shape {tuple(momentum.shape)}, the parameter {shape}"
            )


def _check_buffer(buffer, key: str, dtype: torch.dtype, shape: tuple, where: str) -> None:
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != dtype:
        raise ValueError(f"{where}: {key} must be a {dtype} tensor")
    if tuple(buffer.shape) != shape:
        raise ValueError(f"{where}: {key} has shape {tuple(buffer.shape)}, expected {shape}")
