"""Sharded parameters (DTensor, as FSDP2's ``fully_shard`` makes them): local views and layouts.

The optimizer steps each rank's local shard: it hands the backends plain tensors (``to_local()``
of the param, its grad and its state), so no backend needs to know about DTensor. What this
module decides:

- State is allocated for the local shard only and kept as DTensors on the param's mesh, so
  ``state_dict()`` and ``torch.distributed.checkpoint`` see where every shard belongs:
  ``momentum`` / ``momentum_codes`` have the param's placements and global shape.
- 8-bit absmax is per block of the LOCAL flat shard (the kernels quantize what they see). Its
  DTensor has global shape ``(shards, blocks)``: one row per shard, padded with zeros to the
  block count of the largest shard, so the rows split evenly (DTensor's chunk rule) and a
  checkpoint records the sharding it was quantized for. Re-blocking 8-bit momentum for another
  sharding would requantize it (not exact), so loading it on another sharding is refused.
- The cautious mean is over the whole parameter: the per-shard counts are summed with one
  all-reduce per (mesh, sharded mesh dims) in a bucket (:func:`count_reducer`).
- Stochastic rounding draws bits by local element index, so each shard's key is the param's
  seed mixed with the shard's index (:func:`shard_seed`): shards do not repeat one pattern, and
  replicas of a shard (HSDP) draw the same bits and stay identical.

Placements other than ``Shard`` and ``Replicate`` are refused.
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch

from . import momentum as mom
from . import quant

_DENSE_KEYS = (mom.MOMENTUM, mom.MOMENTUM_CODES)  # state tensors placed like the param


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_sharded(tensor) -> bool:
    """True for a DTensor (every DTensor is stepped through its local tensor)."""
    if type(tensor) in _PLAIN:  # the common case, without a module lookup (the step asks per tensor)
        return False
    # No DTensor exists before torch.distributed.tensor is imported, and importing it costs
    # about as much as half of `import torch` (seen: 0.9 s of 2.0 s), so it is not imported here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor):
    """The local tensor of a DTensor (the storage itself, not a copy); other values unchanged."""
    if not is_sharded(tensor):
        return tensor
    with torch.no_grad():  # to_local() is an autograd op otherwise
        return tensor.to_local()


def check_param(param: torch.Tensor, label: str) -> None:
    """ValueError unless every placement of a DTensor param is Shard or Replicate."""
    if not is_sharded(param):
        return
    unsupported = [p for p in param.placements if not _is_shard(p) and not p.is_replicate()]
    if unsupported:
        raise ValueError(
            f"Invalid placements of {label}: {param.placements} "
            "(Lion supports DTensor params placed with Shard and Replicate)"
        )


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both plain tensors, or DTensors with the same placements (a grad and its param)."""
    if is_sharded(a) != is_sharded(b):
        return False
    return not is_sharded(a) or tuple(a.placements) == tuple(b.placements)


def layout(tensor: torch.Tensor) -> str:
    """How a tensor is laid out, for error messages."""
    return f"a DTensor placed {tensor.placements}" if is_sharded(tensor) else "a plain tensor"


# -- layout ------------------------------------------------------------------------------------


def _is_shard(placement) -> bool:
    from torch.distributed.tensor import Shard

    # _StridedShard (FSDP2 over tensor parallelism) is not a Shard subclass in torch 2.13 and
    # has another chunk rule: refused by check_param.
    return type(placement) is Shard


def _sharded_mesh_dims(param) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(param.placements) if _is_shard(p))


def _num_shards(param) -> int:
    return math.prod(param.device_mesh.size(i) for i in _sharded_mesh_dims(param))


def _max_local_numel(param) -> int:
    # DTensor splits like torch.chunk: ceil(n / k) per chunk, so the first shard is the largest.
    shape = list(param.shape)
    for mesh_dim, placement in enumerate(param.placements):
        if _is_shard(placement):
            dim = placement.dim % len(shape)
            shape[dim] = -(-shape[dim] // param.device_mesh.size(mesh_dim))
    return math.prod(shape)


def absmax_shape(param: torch.Tensor, block_size: int) -> tuple[int, ...]:
    """Global shape of a param's 8-bit absmax: (blocks,), or (shards, blocks of the largest shard)."""
    if not is_sharded(param):
        return (quant.num_blocks(param.numel(), block_size),)
    return (_num_shards(param), quant.num_blocks(_max_local_numel(param), block_size))


def _absmax_placements(param) -> tuple:
    from torch.distributed.tensor import Replicate, Shard

    return tuple(Shard(0) if _is_shard(p) else Replicate() for p in param.placements)


def _like(local_tensor: torch.Tensor, mesh, placements, shape) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_tensor,
        mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def shard_index(param) -> int:
    """This rank's shard of ``param``: its coordinates on the sharded mesh dims, row-major."""
    coordinate = param.device_mesh.get_coordinate()
    index = 0
    for mesh_dim in _sharded_mesh_dims(param):
        index = index * param.device_mesh.size(mesh_dim) + coordinate[mesh_dim]
    return index


def shard_seed(seed: int, param) -> int:
    """The stochastic-rounding seed of this rank's shard of a param whose seed is ``seed``."""
    return quant.mix32(seed ^ quant.mix32(shard_index(param) + 1))


# -- state -------------------------------------------------------------------------------------


def new_momentum(
    param: torch.Tensor, fmt: str, block_size: int, empty: Callable = torch.empty
) -> dict[str, torch.Tensor]:
    """Zero momentum buffers for ``param``; for a DTensor, local-shard buffers as DTensors."""
    if not is_sharded(param):
        return mom.new_momentum(param, fmt, block_size, empty)
    local_param = local(param)
    mesh, placements = param.device_mesh, param.placements
    if fmt == "8bit":
        codes = empty(local_param.shape, dtype=torch.uint8, device=local_param.device)
        shards, blocks = absmax_shape(param, block_size)
        absmax = empty((1, blocks), dtype=torch.float32, device=local_param.device)
        return {
            mom.MOMENTUM_CODES: _like(codes.fill_(quant.ZERO_CODE), mesh, placements, param.shape),
            mom.MOMENTUM_ABSMAX: _like(
                absmax.zero_(), mesh, _absmax_placements(param), (shards, blocks)
            ),
        }
    buffers = mom.new_momentum(local_param, fmt, block_size, empty)
    return {key: _like(value, mesh, placements, param.shape) for key, value in buffers.items()}


def local_entry(param: torch.Tensor, entry: dict, block_size: int) -> dict:
    """The state entry the backends update: ``entry`` itself, or for a DTensor param a dict of
    its local tensors (absmax trimmed to the shard's blocks, the seed made per shard)."""
    if not is_sharded(param):
        return entry
    view = {key: local(value) for key, value in entry.items()}
    if mom.MOMENTUM_ABSMAX in view:
        blocks = quant.num_blocks(local(param).numel(), block_size)
        view[mom.MOMENTUM_ABSMAX] = view[mom.MOMENTUM_ABSMAX][0, :blocks]
    if mom.SR_SEED in view:
        view[mom.SR_SEED] = shard_seed(view[mom.SR_SEED], param)
    return view


def check_momentum(entry: dict, param: torch.Tensor, fmt: str, block_size: int, where: str):
    """:func:`lion8bit.momentum.check_momentum` for plain or DTensor params (ValueError naming
    ``where``); DTensor state must sit on the param's mesh with the layout above."""
    keys = [key for key in (*_DENSE_KEYS, mom.MOMENTUM_ABSMAX) if key in entry]
    if not is_sharded(param):
        for key in keys:
            if is_sharded(entry[key]):
                raise ValueError(f"{where}: {key} is a DTensor but the parameter is not")
        mom.check_momentum(entry, param, fmt, block_size, where)
        return
    for key in keys:
        value = entry[key]
        if not is_sharded(value):
            raise ValueError(
                f"{where}: {key} is a {type(value).__name__}, expected a DTensor like the "
                "parameter (load sharded state with torch.distributed.checkpoint.state_dict."
                "set_optimizer_state_dict)"
            )
        placements = param.placements if key in _DENSE_KEYS else _absmax_placements(param)
        if value.device_mesh != param.device_mesh or tuple(value.placements) != tuple(placements):
            raise ValueError(
                f"{where}: {key} is placed {value.placements} on {value.device_mesh}, "
                f"expected {placements} on {param.device_mesh}"
            )
    if mom.MOMENTUM_ABSMAX in entry:
        found = tuple(entry[mom.MOMENTUM_ABSMAX].shape)
        expected = absmax_shape(param, block_size)
        if found != expected:
            raise ValueError(
                f"{where}: {mom.MOMENTUM_ABSMAX} has shape {found} (shards, blocks per shard), "
                f"this sharding needs {expected}. 8-bit momentum is quantized per local shard "
                "and cannot be resharded exactly: resume on the sharding it was saved with, "
                'or use state="bf16" / "fp32", which reshard exactly'
            )
    mom.check_momentum(local_entry(param, entry, block_size), local(param), fmt, block_size, where)


def copy_state(value: torch.Tensor, param: torch.Tensor, empty: Callable = torch.empty):
    """A copy of one loaded state tensor in a buffer from ``empty`` on the param's (local)
    device; a DTensor stays a DTensor with the same layout."""
    device = local(param).device
    source = local(value)
    copy = empty(source.shape, dtype=source.dtype, device=device).copy_(source)
    if not is_sharded(value):
        return copy
    return _like(copy, value.device_mesh, value.placements, value.shape)


def count_reducer(params: list[torch.Tensor]) -> Callable | None:
    """For the cautious pre-pass: a function turning the local aligned counts of ``params``
    into whole-parameter counts, or None when no param is sharded.

    Counts of the params sharded over the same mesh dims are stacked and summed with one
    all-reduce per sharded mesh dim (FSDP2 and HSDP shard over one: one all-reduce of 8 bytes
    per such param, per bucket and step).
    """
    positions: dict[tuple, list[int]] = {}
    for position, param in enumerate(params):
        if is_sharded(param) and _sharded_mesh_dims(param):
            key = (param.device_mesh, _sharded_mesh_dims(param))
            positions.setdefault(key, []).append(position)
    if not positions:
        return None

    def reduce_counts(counts: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch.distributed as dist

        counts = list(counts)
        for (mesh, mesh_dims), members in positions.items():
            stacked = torch.stack([counts[i] for i in members])
            on_mesh = stacked.to(_mesh_device(mesh))
            for mesh_dim in mesh_dims:
                dist.all_reduce(on_mesh, group=mesh.get_group(mesh_dim))
            for i, total in zip(members, on_mesh.to(stacked.device).unbind()):
                counts[i] = total
        return counts

    return reduce_counts


def any_across(flag: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``flag`` (bool, 0-dim) OR-ed over every rank of the meshes of the sharded ``params``:
    with FSDP2 a non-finite grad may sit in one rank's shard only, and every rank must make the
    same skip decision. One all-reduce per mesh dim of each distinct mesh; none if no param is
    a DTensor."""
    meshes = []
    for param in params:
        if is_sharded(param) and all(param.device_mesh is not m for m in meshes):
            meshes.append(param.device_mesh)
    if not meshes:
        return flag
    import torch.distributed as dist

    for mesh in meshes:
        value = flag.to(device=_mesh_device(mesh), dtype=torch.int32)
        for mesh_dim in range(mesh.ndim):
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
        flag = value.to(flag.device).bool()
    return flag


def _mesh_device(mesh) -> torch.device:
    # With FSDP2's CPU offload the state lives on the CPU while the mesh's group is NCCL.
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
