"""Sharded parameters (DTensor, as FSDP2's ``fully_shard`` makes them): local views and layouts.

The optimizer steps each rank's local shard: it hands the backends plain tensors (``to_local()``
of the param, its grad and its state), so no backend needs to know about DTensor. What this
module decides:

- Where a rank's shard sits in the whole parameter (:func:`flat_range`). FSDP2 shards dim 0
  into contiguous row ranges (torch.chunk's rule), so a shard is one range [start, end) of the
  whole parameter's flat, row-major elements, and stochastic rounding draws the bits of those
  whole-parameter indices: the same bits at every world size. Other Shard layouts (Shard(1),
  two sharded dims) are not one range: their bf16 / fp32 state works as before, with rounding
  bits drawn per shard (the seed mixed with the shard's index, :func:`shard_seed`).
- 8-bit momentum is quantized in blocks of the WHOLE parameter (block k = flat elements
  [k*B, (k+1)*B)), the blocks an unsharded optimizer uses. That needs the shard to be one flat
  range on one sharded mesh dim (FSDP2, HSDP); other layouts are refused for 8-bit and 4-bit state
  (:func:`check_param`). A block cut by a shard boundary is held by each rank that has a piece
  of it, with the same absmax on each (lion8bit/shard_blocks.py keeps it so every step).
- State is allocated for the local shard only: ``momentum`` / 8-bit ``momentum_codes`` are
  DTensors placed like the param; ``momentum_absmax`` is, while training, a plain local tensor
  of the blocks that overlap the shard (:func:`runtime_blocks`). ``state_dict()`` turns it into
  one DTensor of the whole parameter's blocks (lion8bit/reshard.py), which reshards.
- 4-bit momentum (blocks of 32, two codes per byte) is held like the absmax: its local codes
  are plain packed bytes of all the elements of the blocks that overlap the shard
  (:func:`covered`: [32*first, min(32*stop, numel)), so they start on a block and a byte
  boundary whatever the shard's offset, odd ones included). A cut block's codes and absmax are
  the whole block's, the same on every rank holding a piece of it (lion8bit/shard_blocks.py).
- The cautious mean is over the whole parameter: the per-shard counts are summed with one
  all-reduce per (mesh, sharded mesh dims) in a bucket (:func:`count_reducer`).

Placements other than ``Shard`` and ``Replicate`` are refused.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from . import momentum as mom
from . import quant

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


def check_param(param: torch.Tensor, label: str, fmt: str) -> None:
    """ValueError unless every placement of a DTensor param is Shard or Replicate, and, for 8-bit
    or 4-bit momentum (``fmt``), its shards are ranges of the flat parameter on one mesh dim."""
    if not is_sharded(param):
        return
    unsupported = [p for p in param.placements if not _is_shard(p) and not p.is_replicate()]
    if unsupported:
        raise ValueError(
            f"Invalid placements of {label}: {param.placements} "
            "(Lion supports DTensor params placed with Shard and Replicate)"
        )
    if fmt in mom.QUANTIZED and not blocks_fit(param):
        raise ValueError(
            f"Invalid placements of {label} for {fmt[0]}-bit state: {param.placements}. {fmt[0]}-bit momentum is "
            "quantized in blocks of the whole parameter's flat elements, so each rank's shard must "
            "be one range of them, sharded over one mesh dim (Shard(0) as fully_shard places "
            'params, with Replicate on the other mesh dims); use state="bf16" or "fp32" for this '
            "parameter (e.g. in a param group of its own)"
        )


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both plain tensors, or DTensors with the same placements (a grad and its param)."""
    if is_sharded(a) != is_sharded(b):
        return False
    return not is_sharded(a) or tuple(a.placements) == tuple(b.placements)


def layout(tensor: torch.Tensor) -> str:
    """How a tensor is laid out, for error messages."""
    return f"a DTensor placed {tensor.placements}" if is_sharded(tensor) else "a plain tensor"


# -- where a shard sits ------------------------------------------------------------------------


def _is_shard(placement) -> bool:
    from torch.distributed.tensor import Shard

    # _StridedShard (FSDP2 over tensor parallelism) is not a Shard subclass in torch 2.13 and
    # has another chunk rule: refused by check_param.
    return type(placement) is Shard


def sharded_mesh_dims(param) -> tuple[int, ...]:
    return tuple(i for i, p in enumerate(param.placements) if _is_shard(p))


def _sharded_dim(param) -> int | None:
    """The one tensor dim the shards split, if every Shard splits the same one and the dims
    before it have size 1 (so each shard is a range of the flat elements); else None."""
    dims = {p.dim % param.ndim for p in param.placements if _is_shard(p)}
    if len(dims) != 1:
        return None
    dim = dims.pop()
    return dim if math.prod(param.shape[:dim]) == 1 else None


def chunk_range(low: int, high: int, chunks: int, index: int) -> tuple[int, int]:
    """Piece ``index`` of [low, high) split like torch.chunk (DTensor's Shard rule): pieces of
    ceil(n / chunks), the last ones shorter or empty."""
    size = -(-(high - low) // chunks)
    return min(low + index * size, high), min(low + (index + 1) * size, high)


@dataclass(frozen=True)
class FlatRange:
    """This rank's shard as flat elements [start, end) of a parameter of ``numel`` elements."""

    start: int
    end: int
    numel: int


def flat_range(param) -> FlatRange | None:
    """Where this rank's shard of a DTensor param sits in the whole flat parameter, or None when
    the shard is not one range (see :func:`_sharded_dim`). A param that no placement shards
    is one range: all of it."""
    numel = param.numel()
    if not sharded_mesh_dims(param):
        return FlatRange(0, numel, numel)
    dim = _sharded_dim(param)
    if dim is None:
        return None
    low, high = 0, param.shape[dim]
    coordinate = param.device_mesh.get_coordinate()
    for mesh_dim in sharded_mesh_dims(param):
        low, high = chunk_range(low, high, param.device_mesh.size(mesh_dim), coordinate[mesh_dim])
    row = math.prod(param.shape[dim + 1 :])
    found = FlatRange(low * row, high * row, numel)
    if local(param).numel() != found.end - found.start:
        raise RuntimeError(
            f"A DTensor of shape {tuple(param.shape)} placed {param.placements} has "
            f"{local(param).numel()} local elements, torch.chunk's rule gives {found.end - found.start}: "
            "this torch shards differently from what lion8bit/sharded.py expects"
        )
    return found


def blocks_fit(param) -> bool:
    """Whether 8-bit or 4-bit momentum of this DTensor param can use the whole parameter's blocks."""
    return len(sharded_mesh_dims(param)) <= 1 and (
        not sharded_mesh_dims(param) or _sharded_dim(param) is not None
    )


def shard_ranges(param) -> list[FlatRange]:
    """Every shard of a param sharded over one mesh dim, in the order of that mesh dim's
    coordinates (the same on every rank); [all of it] for a param no placement shards."""
    numel = param.numel()
    mesh_dims = sharded_mesh_dims(param)
    if not mesh_dims:
        return [FlatRange(0, numel, numel)]
    dim = _sharded_dim(param)
    row = math.prod(param.shape[dim + 1 :])
    shards = param.device_mesh.size(mesh_dims[0])
    ranges = (chunk_range(0, param.shape[dim], shards, index) for index in range(shards))
    return [FlatRange(low * row, high * row, numel) for low, high in ranges]


def runtime_blocks(shard: FlatRange, block_size: int) -> tuple[int, int]:
    """The blocks [first, stop) that overlap a shard: what its local absmax holds."""
    if shard.start == shard.end:
        return 0, 0
    return shard.start // block_size, quant.num_blocks(shard.end, block_size)


def covered(shard: FlatRange, block_size: int) -> tuple[int, int]:
    """The flat elements [low, high) of the blocks that overlap a shard: what the local 4-bit
    codes of a sharded param hold (its shard and the rest of its cut blocks)."""
    first, stop = runtime_blocks(shard, block_size)
    return first * block_size, min(stop * block_size, shard.numel)


def absmax_shape(param: torch.Tensor, block_size: int) -> tuple[int, ...]:
    """Shape of a param's 8-bit absmax as the optimizer holds it: (blocks,) of the whole param,
    or for a DTensor param the blocks that overlap this rank's shard."""
    if not is_sharded(param):
        return (quant.num_blocks(param.numel(), block_size),)
    first, stop = runtime_blocks(flat_range(param), block_size)
    return (stop - first,)


def shard_index(param) -> int:
    """This rank's shard of ``param``: its coordinates on the sharded mesh dims, row-major."""
    coordinate = param.device_mesh.get_coordinate()
    index = 0
    for mesh_dim in sharded_mesh_dims(param):
        index = index * param.device_mesh.size(mesh_dim) + coordinate[mesh_dim]
    return index


def shard_seed(seed: int, param) -> int:
    """The stochastic-rounding seed of this rank's shard of a param whose shards are not ranges
    of its flat elements (their bits cannot be keyed on whole-parameter indices)."""
    return quant.mix32(seed ^ quant.mix32(shard_index(param) + 1))


# -- state -------------------------------------------------------------------------------------


def like_param(local_tensor: torch.Tensor, param) -> torch.Tensor:
    """A DTensor of ``local_tensor`` (this rank's shard) placed like ``param``."""
    return dtensor(local_tensor, param.device_mesh, param.placements, param.shape)


def dtensor(local_tensor: torch.Tensor, mesh, placements, shape) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_tensor,
        mesh,
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def new_momentum(
    param: torch.Tensor, fmt: str, block_size: int, empty: Callable = torch.empty
) -> dict[str, torch.Tensor]:
    """Zero momentum buffers for ``param``; for a DTensor, local-shard buffers: the dense ones as
    DTensors placed like it, the absmax of the blocks overlapping the shard as a plain tensor,
    and 4-bit codes as plain packed bytes of those blocks' elements (:func:`covered`)."""
    if not is_sharded(param):
        return mom.new_momentum(param, fmt, block_size, empty)
    local_param = local(param)
    if fmt == "4bit":
        low, high = covered(flat_range(param), quant.BLOCK_SIZE_4BIT)
        return mom.new_4bit(high - low, local_param.device, empty)
    buffers = mom.new_momentum(local_param, fmt, block_size, empty)
    if fmt == "8bit":
        absmax = empty(absmax_shape(param, block_size), dtype=torch.float32, device=local_param.device)
        buffers[mom.MOMENTUM_ABSMAX] = absmax.zero_()
    return {
        key: value if key == mom.MOMENTUM_ABSMAX else like_param(value, param)
        for key, value in buffers.items()
    }


def local_entry(param: torch.Tensor, entry: dict) -> dict:
    """The state entry the backends update: ``entry`` itself, or for a DTensor param a dict of
    its local tensors (and, for shards that are not flat ranges, the shard's own seed)."""
    if not is_sharded(param):
        return entry
    view = {key: local(value) for key, value in entry.items()}
    if mom.SR_SEED in view and flat_range(param) is None:
        view[mom.SR_SEED] = shard_seed(view[mom.SR_SEED], param)
    return view


def count_reducer(params: list[torch.Tensor]) -> Callable | None:
    """For the cautious pre-pass: a function turning the local aligned counts of ``params``
    into whole-parameter counts, or None when no param is sharded.

    Counts of the params sharded over the same mesh dims are stacked and summed with one
    all-reduce per sharded mesh dim (FSDP2 and HSDP shard over one: one all-reduce of 8 bytes
    per such param, per bucket and step).
    """
    positions: dict[tuple, list[int]] = {}
    for position, param in enumerate(params):
        if is_sharded(param) and sharded_mesh_dims(param):
            key = (param.device_mesh, sharded_mesh_dims(param))
            positions.setdefault(key, []).append(position)
    if not positions:
        return None

    def reduce_counts(counts: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch.distributed as dist

        counts = list(counts)
        for (mesh, mesh_dims), members in positions.items():
            stacked = torch.stack([counts[i] for i in members])
            on_mesh = stacked.to(mesh_device(mesh))
            for mesh_dim in mesh_dims:
                dist.all_reduce(on_mesh, group=mesh.get_group(mesh_dim))
            for i, total in zip(members, on_mesh.to(stacked.device).unbind(), strict=True):
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
        value = flag.to(device=mesh_device(mesh), dtype=torch.int32)
        for mesh_dim in range(mesh.ndim):
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
        flag = value.to(flag.device).bool()
    return flag


def mesh_device(mesh) -> torch.device:
    """Where a mesh's collectives take their tensors."""
    # With FSDP2's CPU offload the state lives on the CPU while the mesh's group is NCCL.
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
