"""The optimizer's options: defaults, validation, and the keywords of the peers we replace.

One source for every option: :data:`DEFAULTS` (the constructor's defaults, and what
``__setstate__`` fills into old checkpoints' groups; a test pins the constructor's signature to
it), :func:`check_group_options`, and :func:`compat_options` for lion-pytorch's and
bitsandbytes' keywords (``use_triton``, ``cautious_wd``, ``optim_bits``, ``is_paged``).
"""

from __future__ import annotations

import math

import torch

from . import quant
from .kernels import BACKENDS as _REGISTERED
from .momentum import STATE_KINDS

BACKENDS = ("auto", *_REGISTERED)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Group options and their defaults; also what __setstate__ fills into old checkpoints' groups.
DEFAULTS = dict(
    lr=1e-4,
    betas=(0.9, 0.99),
    weight_decay=0.0,
    state="8bit",
    block_size=quant.BLOCK_SIZE,
    min_8bit_size=4096,
    cautious_factor=1.0,
    cautious_weight_decay=False,
    decoupled_weight_decay=False,
    stochastic_rounding=False,
    paged=False,
    backend="auto",
    maximize=False,
    skip_nonfinite=False,
    capturable=False,
)
# Options that define the stored state's format: a loaded state dict must have the same ones.
FORMAT_OPTIONS = ("state", "block_size", "min_8bit_size")
# Where and how this process runs, not how training behaves: kept from this optimizer on load.
RUNTIME_OPTIONS = ("backend", "paged")
_FLAGS = (
    "cautious_weight_decay",
    "decoupled_weight_decay",
    "stochastic_rounding",
    "paged",
    "maximize",
    "skip_nonfinite",
    "capturable",
)


def check_group_options(group: dict, where: str = "", *, zero_lr: bool = False) -> None:
    """Raise ValueError / TypeError naming the first invalid option of a param group.

    ``zero_lr``: accept lr 0, as a loaded checkpoint may hold it (an LR schedule's warmup from 0
    saved at its first step); a new group needs lr > 0.
    """
    at = f" in {where}" if where else ""
    lr = group["lr"]
    lr_value = float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None
    invalid = lr_value is None or not math.isfinite(lr_value) or lr_value < 0
    if invalid or (lr_value == 0 and not zero_lr):
        raise ValueError(f"Invalid learning rate{at}: {lr}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas{at}: {betas} (expected two numbers)")
    for index, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}{at}: {beta}")
    weight_decay = group["weight_decay"]
    if not isinstance(weight_decay, (int, float)) or not (
        math.isfinite(weight_decay) and weight_decay >= 0.0
    ):
        raise ValueError(f"Invalid weight_decay value{at}: {weight_decay}")
    if group["state"] not in STATE_KINDS:
        raise ValueError(f"Invalid state{at}: {group['state']!r} (expected one of {STATE_KINDS})")
    if group["backend"] not in BACKENDS:
        raise ValueError(f"Invalid backend{at}: {group['backend']!r} (expected one of {BACKENDS})")
    block_size = group["block_size"]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or (
        block_size & (block_size - 1)
    ):
        raise ValueError(f"Invalid block_size{at}: {block_size} (expected a positive power of two)")
    min_8bit_size = group["min_8bit_size"]
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size{at}: {min_8bit_size}")
    factor = group["cautious_factor"]
    if not isinstance(factor, (int, float)) or not 0.0 <= factor <= 1.0:
        raise ValueError(f"Invalid cautious_factor{at}: {factor} (expected 0 <= f <= 1)")
    for flag in _FLAGS:
        if not isinstance(group[flag], bool):
            raise TypeError(f"Invalid {flag}{at}: {group[flag]!r} (expected a bool)")


def compat_options(
    *, state, backend, paged, cautious_weight_decay, use_triton, cautious_wd, optim_bits, is_paged, args
) -> dict:
    """Map lion-pytorch / bitsandbytes keywords onto ours, refusing contradictions."""
    if args is not None:
        raise TypeError(
            "args= (bitsandbytes' config object) is not supported; pass optim_bits, "
            "min_8bit_size and is_paged as keywords"
        )
    if use_triton is not None:
        if use_triton and backend not in ("auto", "triton"):
            raise ValueError(f"use_triton=True contradicts backend={backend!r}")
        if use_triton:
            backend = "triton"
    if cautious_wd is not None:
        if cautious_weight_decay and not cautious_wd:
            raise ValueError("cautious_wd=False contradicts cautious_weight_decay=True")
        cautious_weight_decay = bool(cautious_wd)
    if optim_bits is not None:
        by_bits = {8: "8bit", 32: "fp32"}
        if optim_bits not in by_bits:
            raise ValueError(f"Invalid optim_bits: {optim_bits} (expected 8 or 32)")
        if state != "8bit" and state != by_bits[optim_bits]:
            raise ValueError(f"optim_bits={optim_bits} contradicts state={state!r}")
        state = by_bits[optim_bits]
    if is_paged is not None:
        paged = paged or bool(is_paged)
    return dict(state=state, backend=backend, paged=paged, cautious_weight_decay=cautious_weight_decay)


def param_label(group_index: int, position: int, group: dict, param: torch.Tensor) -> str:
    """How error messages name a param: its place in the groups, its name if known, its shape."""
    names = group.get("param_names")
    name = f" ({names[position]!r})" if names else ""
    return f"param_groups[{group_index}]['params'][{position}]{name} of shape {tuple(param.shape)}"
