"""Loading a state dict into :class:`lion8bit.Lion`, in checked parts.

:meth:`Lion.load_state_dict` overrides torch's instead of hooking it: torch casts every floating
state tensor to its param's dtype by class name (``Optimizer._process_value_according_to_param_policy``),
which would turn 8-bit absmax and bf16 momentum into the param dtype. The steps, each of which
raises ValueError naming the group or param before anything changes:

1. :func:`own_format`: recognise the source (ours, bitsandbytes, lion-pytorch) and convert a
   foreign state dict into our keys (:mod:`lion8bit.interop`);
2. :func:`merged_groups`: the loaded hyperparameters over this optimizer's groups, checked;
   format options must match, runtime options (``backend``, ``paged``) stay this optimizer's;
3. :func:`loaded_state`: every entry checked against its param and copied into buffers from the
   param's allocator (paged ones for a paged group), dtypes kept. DTensor params take their
   state in the layouts :class:`lion8bit.reshard.Loader` reads (the checkpoint layout of any
   world size, whole-parameter tensors, the per-shard absmax of earlier releases); moving 8-bit
   absmax between ranks makes the load a collective for them.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import Callable

import torch

from . import interop, quant, reshard, sharded
from . import momentum as mom
from .options import DEFAULTS, FORMAT_OPTIONS, RUNTIME_OPTIONS, check_group_options, param_label

_KNOWN_KEYS = {
    mom.STEP,
    mom.MOMENTUM,
    mom.MOMENTUM_CODES,
    mom.MOMENTUM_ABSMAX,
    mom.SR_SEED,
    mom.NONFINITE_SKIPS,
}


def own_format(state_dict, optimizer) -> dict:
    """The state dict in this package's format (foreign ones converted for ``optimizer``)."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError("Invalid state dict: expected a dict with 'state' and 'param_groups'")
    source = interop.detect_format(state_dict)
    if source != "lion8bit":
        state_dict = interop.convert_to_lion8bit(state_dict, source, optimizer)
    return state_dict


def merged_groups(groups: list[dict], saved_groups: list[dict]) -> list[dict]:
    """This optimizer's groups with the saved hyperparameters, checked."""
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer {len(groups)}"
        )
    for group_index, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"param_groups[{group_index}] has {len(group['params'])} parameters, "
                f"the loaded state dict's {len(saved['params'])}"
            )
    merged_all = []
    for group_index, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        merged = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
        for name, default in DEFAULTS.items():
            merged.setdefault(name, default)
        # A checkpoint from before decoupled_initial_lr was kept: its lr is the best guess. A
        # checkpoint that has it keeps it (an LR schedule has moved lr since construction).
        merged.setdefault("decoupled_initial_lr", float(merged["lr"]))
        merged["betas"] = tuple(merged["betas"])
        check_group_options(merged, f"loaded param_groups[{group_index}]", zero_lr=True)
        check_levels_4bit(merged, f"param_groups[{group_index}]", merged["state"] == "4bit")
        for name in FORMAT_OPTIONS:
            if merged[name] != group[name]:
                raise ValueError(
                    f"param_groups[{group_index}]: the state dict was saved with "
                    f"{name}={merged[name]!r}, this optimizer has {name}={group[name]!r}; "
                    "construct it with the checkpoint's setting"
                )
        for name in RUNTIME_OPTIONS:
            merged[name] = group[name]
        merged["params"] = group["params"]
        if "param_names" in group:
            merged["param_names"] = group["param_names"]
        merged_all.append(merged)
    return merged_all


def check_levels_4bit(group: dict, where: str, holds_4bit: bool) -> None:
    """ValueError unless a saved group's 4-bit codes mean this version's levels: its
    ``quant.LEVELS_4BIT_KEY`` must be ``quant.LEVELS_4BIT``, or absent where it holds no 4-bit
    momentum (``holds_4bit`` false: a checkpoint from before the key, of another state kind)."""
    levels = group.get(quant.LEVELS_4BIT_KEY)
    if levels == quant.LEVELS_4BIT or (levels is None and not holds_4bit):
        return
    meaning = (
        "the square-root levels +-((2k-1)/15)**2 of lion8bit's first 4-bit momentum (a state dict "
        f"without {quant.LEVELS_4BIT_KEY!r})"
        if levels is None
        else f"levels {levels!r}"
    )
    raise ValueError(
        f"{where}: its 4-bit momentum codes mean {meaning}; this version's codes mean "
        f"{quant.LEVELS_4BIT!r} levels ((2c - 15) / 15), so they cannot be read as they are. "
        "Resume with the lion8bit version that wrote it; there, "
        "lion8bit.interop.to_lion_pytorch_state_dict(optimizer) gives the momentum as fp32 "
        "exp_avg, which this version loads into any state kind."
    )


def check_pickled_levels_4bit(state: dict) -> None:
    """:func:`check_levels_4bit` for each group of an optimizer's pickled ``__dict__`` (an
    optimizer unpickled from before the key is refused if it holds 4-bit momentum)."""
    for index, group in enumerate(state["param_groups"]):
        holds_4bit = any(mom.stored_format(state["state"].get(p, {})) == "4bit" for p in group["params"])
        check_levels_4bit(group, f"param_groups[{index}]", holds_4bit)


def loaded_state(state_dict: dict, groups: list[dict], allocator: Callable) -> defaultdict:
    """param -> checked copy of its saved entry; ``allocator(param, group)`` gives the
    ``torch.empty``-like function that allocates that param's momentum buffers."""
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    locations = [
        (group_index, position, param, group)
        for group_index, group in enumerate(groups)
        for position, param in enumerate(group["params"])
    ]
    state = defaultdict(dict)
    loader = reshard.Loader()
    for saved_id, (group_index, position, param, group) in zip(saved_ids, locations, strict=True):
        entry = state_dict["state"].get(saved_id)
        if entry is None:
            continue
        label = param_label(group_index, position, group, param)
        state[param] = checked_entry(entry, param, group, label, allocator(param, group), loader)
    loader.finish()
    return state


def _checked_step(entry: dict, label: str) -> int:
    step = entry.get(mom.STEP, 0)
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{label}: step must be a non-negative int, got {step!r}")
    return step


def _checked_skips(skips, param: torch.Tensor, label: str) -> torch.Tensor:
    skips = sharded.local(skips) if isinstance(skips, torch.Tensor) else skips
    if isinstance(skips, bool) or not (
        isinstance(skips, int)
        or (isinstance(skips, torch.Tensor) and skips.numel() == 1 and not skips.is_floating_point())
    ):
        raise ValueError(f"{label}: {mom.NONFINITE_SKIPS} must be an integer, got {skips!r}")
    device = sharded.local(param).device
    return torch.as_tensor(skips, dtype=torch.int64).reshape(()).to(device, copy=True)


def checked_entry(
    entry, param: torch.Tensor, group: dict, label: str, empty: Callable, loader: reshard.Loader
) -> dict:
    """A copy of one loaded state entry in buffers from ``empty`` on the param's device, or
    ValueError naming the param. A DTensor param's state is taken in the layouts
    :class:`lion8bit.reshard.Loader` reads; ``loader.finish()`` completes its absmax."""
    if not isinstance(entry, dict):
        raise ValueError(f"{label}: state must be a dict, got {type(entry).__name__}")
    unknown = set(entry) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"{label}: unknown state keys {sorted(unknown)}")
    checked = {mom.STEP: _checked_step(entry, label)}
    if group["capturable"]:  # the step counter lives on the device
        checked[mom.STEP] = torch.tensor(checked[mom.STEP], dtype=torch.int64, device=sharded.local(param).device)
    fmt = mom.momentum_format(param.numel(), group["state"], group["min_8bit_size"])
    if sharded.is_sharded(param):
        checked.update(loader.momentum(entry, param, fmt, group["block_size"], label, empty))
    else:
        checked.update(_plain_momentum(entry, param, fmt, group["block_size"], label, empty))
    if mom.SR_SEED in entry:
        seed = entry[mom.SR_SEED]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"{label}: {mom.SR_SEED} must be an int in [0, 2**32), got {seed!r}")
        checked[mom.SR_SEED] = seed
    if mom.NONFINITE_SKIPS in entry:
        checked[mom.NONFINITE_SKIPS] = _checked_skips(entry[mom.NONFINITE_SKIPS], param, label)
    if mom.stored_format(checked) is None:
        checked.update(sharded.new_momentum(param, fmt, group["block_size"], empty))
    return checked


def _plain_momentum(entry: dict, param: torch.Tensor, fmt: str, block_size: int, label: str, empty: Callable):
    """Checked copies of the momentum buffers of a plain (not DTensor) param's loaded entry."""
    copies = {}
    for key in (mom.MOMENTUM, mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX):
        if key in entry and sharded.is_sharded(entry[key]):
            raise ValueError(f"{label}: {key} is a DTensor but the parameter is not")
    mom.check_momentum(entry, param, fmt, block_size, label)
    for key in (mom.MOMENTUM, mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX):
        if key in entry:
            value = entry[key]
            copies[key] = empty(value.shape, dtype=value.dtype, device=param.device).copy_(value)
    return copies
