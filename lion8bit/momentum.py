"""What the optimizer keeps per parameter, and the rules that decide it (DESIGN.md §3).

One place for the state keys, the per-tensor format rule (``min_8bit_size``), zero-initialised
buffers, encoding / decoding the momentum, the exact byte count (used by the budget tool) and the
checks a loaded state must pass. The optimizer, the reference, the kernels' launchers, interop
and the budget tool all use these, so they cannot disagree.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import quant

STATE_KINDS = ("8bit", "bf16", "fp32")

# State keys, one per concept, in every state dict this package writes.
# int (an int64 0-dim tensor with capturable=True): the step() calls that reached this param with
# a grad, those skipped for non-finite grads included (so no stochastic-rounding key is used
# twice); not the lr-0 call that only creates the state for torch.distributed.checkpoint.
STEP = "step"
MOMENTUM = "momentum"  # dense momentum: fp32 ("fp32", and "8bit" under min_8bit_size) or bf16
MOMENTUM_CODES = "momentum_codes"  # "8bit": uint8 codes, the param's shape
MOMENTUM_ABSMAX = "momentum_absmax"  # "8bit": fp32 absmax per block of the flattened param
SR_SEED = "sr_seed"  # int: stochastic-rounding seed of this param (with STEP: the RNG position)
NONFINITE_SKIPS = "nonfinite_skips"  # int64 0-dim tensor: steps skipped for non-finite grads

_DENSE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}

# With paged=True, the momentum of a (local) tensor of at least this many elements lives in CUDA
# managed memory (lion8bit/paged.py); smaller ones keep ordinary device memory, as managed
# allocations are page-granular. bitsandbytes 0.50.2 draws the same line
# (Optimizer8bit.get_state_buffer: p.numel() < 1e5 is not paged). The budget tool counts with it.
PAGED_MIN_NUMEL = 100_000


def momentum_format(numel: int, state: str, min_8bit_size: int) -> str:
    """The format one tensor's momentum really uses: "8bit" falls back to "fp32" when small."""
    if state == "8bit" and numel < min_8bit_size:
        return "fp32"
    return state


def momentum_nbytes(numel: int, fmt: str, block_size: int = quant.BLOCK_SIZE) -> int:
    """Bytes of the momentum buffers of one tensor in the format ``fmt``."""
    if fmt == "8bit":
        return numel + 4 * quant.num_blocks(numel, block_size)
    return numel * _DENSE_DTYPE[fmt].itemsize


def stored_format(entry: dict) -> str | None:
    """The format of a state entry from its tensors, or None for an entry without momentum."""
    if MOMENTUM_CODES in entry:
        return "8bit"
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
    momentum = empty(like.shape, dtype=_DENSE_DTYPE[fmt], device=like.device)
    return {MOMENTUM: momentum.zero_()}


def decode_momentum(entry: dict, fmt: str, block_size: int, dtype=torch.float32) -> torch.Tensor:
    """The momentum as a new dense tensor of ``dtype`` (the compute dtype), never an alias."""
    if fmt == "8bit":
        values = quant.dequantize_blockwise(
            entry[MOMENTUM_CODES], entry[MOMENTUM_ABSMAX], block_size
        )
        return values.to(dtype)
    return entry[MOMENTUM].to(dtype, copy=True)


def encode_momentum(
    entry: dict, values: torch.Tensor, fmt: str, block_size: int, bits=None
) -> None:
    """Store dense momentum ``values`` into the entry's buffers in place.

    "8bit" quantizes the fp32 values (nearest, sign rule); "bf16" rounds to nearest even, or
    stochastically with uint32 ``bits``.
    """
    if fmt == "8bit":
        codes, absmax = quant.quantize_blockwise(values.float(), block_size)
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
    if fmt == "8bit":
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
