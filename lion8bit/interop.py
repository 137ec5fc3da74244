"""State dicts of other Lion implementations: recognise, convert in, export out.

- ``bitsandbytes.optim.Lion8bit`` / ``Lion`` (>= 0.44): per param ``step`` (int), ``state1``
  (uint8 codes in the param's shape, or fp32 momentum), ``absmax1`` (fp32, blocks of 256),
  ``qmap1`` (the codebook); since 0.49.2 nested under ``__bnb_optimizer_quant_state__``.
- ``lion_pytorch.Lion`` (and ``cautious_lion.Lion``): per param ``exp_avg`` in the param's dtype.

:meth:`lion8bit.Lion.load_state_dict` calls :func:`detect_format` and :func:`convert_to_lion8bit`;
:func:`to_lion_pytorch_state_dict` writes what ``lion_pytorch.Lion.load_state_dict`` accepts.
"""

from __future__ import annotations

from itertools import chain

import torch

from . import momentum as mom
from . import quant, shard_blocks, sharded

BNB_NESTED_KEY = "__bnb_optimizer_quant_state__"
BNB_BLOCK_SIZE = 256
_OURS = {mom.MOMENTUM, mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX}


def detect_format(state_dict: dict) -> str:
    """"lion8bit", "bitsandbytes" or "lion_pytorch", from the keys of the state dict."""
    found = set()
    for entry in state_dict["state"].values():
        if not isinstance(entry, dict):
            continue
        if "state1" in entry or BNB_NESTED_KEY in entry:
            found.add("bitsandbytes")
        elif "exp_avg" in entry:
            found.add("lion_pytorch")
        elif _OURS & entry.keys():
            found.add("lion8bit")
    if len(found) > 1:
        raise ValueError(f"Invalid state dict: it mixes the state of {sorted(found)}")
    if found:
        return found.pop()
    groups = state_dict["param_groups"]
    if any("state" in group for group in groups):
        return "lion8bit"
    if any("eps" in group for group in groups):
        return "bitsandbytes"
    return "lion_pytorch"


def convert_to_lion8bit(state_dict: dict, source: str, optimizer) -> dict:
    """A foreign state dict re-expressed in ``optimizer``'s own groups and state kinds.

    Hyperparameters the source knows (lr, betas, weight_decay, lion-pytorch's cautious options)
    come from it; the rest (state kind, block size, ...) from the optimizer. 8-bit
    bitsandbytes codes are copied bit for bit when the target is 8-bit with blocks of 256.
    """
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"loaded state dict has {len(saved_groups)} parameter groups, "
            f"this optimizer {len(optimizer.param_groups)}"
        )
    groups = []
    for group, saved in zip(optimizer.param_groups, saved_groups, strict=True):
        merged = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        for key in ("lr", "betas", "weight_decay", "cautious_factor"):
            if key in saved:
                merged[key] = saved[key]
        if "cautious_wd" in saved:
            merged["cautious_weight_decay"] = bool(saved["cautious_wd"])
        merged["params"] = list(saved["params"])
        groups.append(merged)

    params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    ids = list(chain.from_iterable(g["params"] for g in saved_groups))
    group_of = list(chain.from_iterable([g] * len(g["params"]) for g in groups))
    convert = _from_bitsandbytes if source == "bitsandbytes" else _from_lion_pytorch
    state = {}
    for position, (saved_id, param, group) in enumerate(zip(ids, params, group_of, strict=True)):
        entry = state_dict["state"].get(saved_id)
        if entry is None:
            continue
        label = f"parameter {position} of shape {tuple(param.shape)} (in the {source} state dict)"
        fmt = mom.momentum_format(param.numel(), group["state"], group["min_8bit_size"])
        state[saved_id] = convert(entry, param, fmt, group["block_size"], label)
    return {"state": state, "param_groups": groups}


def _encoded(values: torch.Tensor, param: torch.Tensor, fmt: str, block_size: int) -> dict:
    entry = mom.new_momentum(param, fmt, block_size)
    mom.encode_momentum(entry, values.to(param.device), fmt, block_size)
    return entry


def _whole(tensor):
    """A tensor of the whole parameter: a DTensor's gathered (every rank of its mesh calls)."""
    return tensor.full_tensor() if sharded.is_sharded(tensor) else tensor


def _from_bitsandbytes(entry: dict, param, fmt: str, block_size: int, label: str) -> dict:
    entry = dict(entry)
    entry.update(entry.pop(BNB_NESTED_KEY, {}))
    entry = {key: _whole(value) if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
    momentum = entry.get("state1")
    if not isinstance(momentum, torch.Tensor) or momentum.numel() != param.numel():
        raise ValueError(f"{label}: state1 does not match the parameter")
    step = int(entry.get("step", 0))
    if momentum.dtype == torch.uint8:
        absmax = entry.get("absmax1")
        blocks = quant.num_blocks(param.numel(), BNB_BLOCK_SIZE)
        if not isinstance(absmax, torch.Tensor) or absmax.numel() != blocks:
            raise ValueError(f"{label}: absmax1 must have {blocks} entries (blocks of 256)")
        code_values = entry.get("qmap1")
        if code_values is None:
            code_values = quant.codebook()
        if code_values.numel() != 256:
            raise ValueError(f"{label}: qmap1 must have 256 entries")
        same_codebook = torch.equal(code_values.float().cpu(), quant.codebook())
        if fmt == "8bit" and block_size == BNB_BLOCK_SIZE and same_codebook:
            return {
                mom.STEP: step,
                mom.MOMENTUM_CODES: momentum.reshape(param.shape).clone(),
                mom.MOMENTUM_ABSMAX: absmax.float().reshape(-1).clone(),
            }
        values = quant.dequantize_blockwise(
            momentum.reshape(param.shape).cpu(),
            absmax.float().reshape(-1).cpu(),
            BNB_BLOCK_SIZE,
            code_values.float().cpu(),
        )
    else:
        values = momentum.float().reshape(param.shape)
    return {mom.STEP: step, **_encoded(values, param, fmt, block_size)}


def _from_lion_pytorch(entry: dict, param, fmt: str, block_size: int, label: str) -> dict:
    momentum = entry.get("exp_avg")
    if isinstance(momentum, torch.Tensor):
        momentum = _whole(momentum)
    if not isinstance(momentum, torch.Tensor) or tuple(momentum.shape) != tuple(param.shape):
        raise ValueError(f"{label}: exp_avg does not match the parameter")
    return {mom.STEP: 0, **_encoded(momentum.float(), param, fmt, block_size)}


def to_lion_pytorch_state_dict(optimizer) -> dict:
    """A state dict of ``optimizer`` (a :class:`lion8bit.Lion`) that ``lion_pytorch.Lion`` and
    ``lion_pytorch.cautious_lion.Lion`` load: fp32 momentum as ``exp_avg`` in each param's dtype.

    For a DTensor param (FSDP2) ``exp_avg`` is a DTensor placed like the param, made from this
    rank's shard (no communication): what lion-pytorch holds for the same sharded model;
    ``full_tensor()`` gives the whole parameter's. lion-pytorch keeps ``decoupled_weight_decay``
    on the instance, not in its state dict: construct it with the same setting.
    """
    groups, state, saved_id = [], {}, 0
    for group in optimizer.param_groups:
        ids = list(range(saved_id, saved_id + len(group["params"])))  # torch's state_dict numbering
        saved_id += len(ids)
        groups.append(
            {
                "lr": group["lr"],
                "betas": tuple(group["betas"]),
                "weight_decay": group["weight_decay"],
                "cautious_factor": group["cautious_factor"],
                "cautious_wd": group["cautious_weight_decay"],
                "params": ids,
            }
        )
        for param_id, param in zip(ids, group["params"], strict=True):
            entry = optimizer.state.get(param, {})
            fmt = mom.stored_format(entry)
            if fmt is None:
                continue
            values = shard_blocks.decode(param, entry, fmt, group["block_size"]).to(param.dtype)
            if sharded.is_sharded(param):
                values = sharded.like_param(values, param)
            state[param_id] = {"exp_avg": values}
    return {"state": state, "param_groups": groups}
