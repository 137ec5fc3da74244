"""8-bit and 4-bit state of DTensor params in checkpoints: one absmax tensor of the whole
parameter's blocks (and one of its packed 4-bit codes).

While training, a rank holds the absmax of the blocks that overlap its shard
(:func:`lion8bit.sharded.runtime_blocks`; a block cut by a shard boundary is on both ranks). A
checkpoint must not depend on the sharding, so :meth:`lion8bit.Lion.state_dict` gives each
8-bit absmax as one DTensor of global shape (blocks,) — the unsharded optimizer's absmax — split
over the param's sharded mesh dim like torch.chunk (Shard(0), Replicate on the other mesh dims),
and loading takes it back. The codes are placed like the param. So torch.distributed.checkpoint
reads, at any world size, exactly the blocks each rank's chunk needs, and a full state dict
(``full_tensor()`` of everything) is the unsharded optimizer's state dict.

The two layouts differ (the chunks of the blocks are not the blocks of the row chunks), so
``state_dict()`` and loading move absmax between ranks: one ``all_to_all_single`` per (mesh,
mesh dim) for all params, each rank sending and receiving about 4 bytes x blocks / shards; none
when every rank's chunk is its own blocks (shards of whole blocks, the same count on each).
Both are collectives: every rank of the params' meshes calls them, as
torch.distributed.checkpoint's get / set_optimizer_state_dict do.

Also loaded into DTensor params (:class:`Loader`): plain tensors of the whole parameter (a
full state dict, bitsandbytes' or lion-pytorch's), of which each rank takes its part; and the
per-shard absmax of lion8bit before global blocks, shape (shards, blocks per shard), converted
exactly when its blocks are the whole parameter's (every shard boundary on a block boundary) and
refused otherwise (re-blocking would requantize the momentum).

4-bit state (blocks of 32) goes the same way: its bf16 absmax as above, and its packed codes,
which a rank holds for the whole blocks its shard overlaps (lion8bit/sharded.py), as one DTensor
of the whole parameter's bytes, shape (ceil(numel / 2),), chunked like the absmax; each block's
bytes are sent by the shard that owns the block (holds its first element). One all_to_all per
dtype: fp32 absmax, bf16 absmax, uint8 codes (:class:`_Buffer` says which units each holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import momentum as mom
from . import quant, sharded

_DENSE_KEYS = (mom.MOMENTUM, mom.MOMENTUM_CODES)  # state tensors placed like the param


def checkpoint_placements(param) -> tuple:
    """Placements of a DTensor param's absmax in checkpoints: its blocks chunked over the mesh
    dim that shards the param."""
    from torch.distributed.tensor import Replicate, Shard

    sharding = sharded.sharded_mesh_dims(param)
    return tuple(Shard(0) if i in sharding else Replicate() for i in range(len(param.placements)))


def _owned(shard: sharded.FlatRange, block_size: int) -> tuple[int, int]:
    """The blocks whose first element lies in the shard: each block is owned by one shard."""
    return quant.num_blocks(shard.start, block_size), quant.num_blocks(shard.end, block_size)


@dataclass(frozen=True)
class _Buffer:
    """A block-laid-out state tensor of a DTensor param (its absmax, or its 4-bit codes): which
    of its elements ("units": blocks for absmax, packed bytes for 4-bit codes) each shard's
    runtime tensor holds, owns and holds in the checkpoint layout."""

    key: str
    block_size: int  # elements per block
    units_per_block: int  # 1 for absmax; 16 bytes for 4-bit codes (the last block may hold fewer)
    total: int  # units of the whole parameter

    def span(self, blocks: tuple[int, int]) -> tuple[int, int]:
        """The units of blocks [first, stop)."""
        return tuple(min(b * self.units_per_block, self.total) for b in blocks)

    def runtime(self, param) -> list[tuple[int, int]]:
        return [self.span(sharded.runtime_blocks(s, self.block_size)) for s in sharded.shard_ranges(param)]

    def owned(self, param) -> list[tuple[int, int]]:
        return [self.span(_owned(s, self.block_size)) for s in sharded.shard_ranges(param)]

    def chunks(self, param) -> list[tuple[int, int]]:
        shards = len(sharded.shard_ranges(param))
        return [sharded.chunk_range(0, self.total, shards, index) for index in range(shards)]


def _buffers(fmt: str, numel: int, block_size: int) -> list[_Buffer]:
    """The state tensors of a DTensor param in the checkpoint layout of their blocks: the absmax
    (8-bit and 4-bit) and the packed 4-bit codes (8-bit codes are placed like the param)."""
    B = mom.absmax_block(fmt, block_size)
    absmax = _Buffer(mom.MOMENTUM_ABSMAX, B, 1, quant.num_blocks(numel, B))
    if fmt != "4bit":
        return [absmax]
    return [absmax, _Buffer(mom.MOMENTUM_CODES, B, B // 2, quant.packed_size(numel))]


@dataclass
class _Transfer:
    """One param's absmax moving between layouts: shard c holds blocks ``sources[c]`` and needs
    ``targets[c]``; this rank's ``source`` holds its sources, its ``target`` is filled."""

    sources: list[tuple[int, int]]
    source: torch.Tensor
    targets: list[tuple[int, int]]
    target: torch.Tensor

    def sent(self, me: int, blocks: tuple[int, int]) -> torch.Tensor:
        """The part of this rank's source holding ``blocks``."""
        return self.source[blocks[0] - self.sources[me][0] : blocks[1] - self.sources[me][0]]

    def received(self, me: int, blocks: tuple[int, int]) -> torch.Tensor:
        """The part of this rank's target for ``blocks``."""
        return self.target[blocks[0] - self.targets[me][0] : blocks[1] - self.targets[me][0]]


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    low, high = max(a[0], b[0]), min(a[1], b[1])
    return (low, high) if low < high else None


def _exchange(mesh, mesh_dim: int | None, transfers: list[_Transfer]) -> None:
    """Fill every transfer's target: one all_to_all_single over the mesh dim, or local copies
    when no block crosses ranks."""
    me = 0 if mesh_dim is None else mesh.get_local_rank(mesh_dim)
    shards = len(transfers[0].sources)
    pairs = [(p, q) for p in range(shards) for q in range(shards) if p != q]
    if not any(_overlap(t.sources[p], t.targets[q]) for t in transfers for p, q in pairs):
        for t in transfers:
            piece = _overlap(t.sources[me], t.targets[me])
            if piece is not None:
                t.received(me, piece).copy_(t.sent(me, piece))
        return
    import torch.distributed as dist

    group = mesh.get_group(mesh_dim)
    # Coordinates along the mesh dim of the group's ranks, in the group's rank order.
    order = [int((mesh.mesh == rank).nonzero()[0][mesh_dim]) for rank in dist.get_process_group_ranks(group)]
    device = sharded.mesh_device(mesh)
    parts, send_sizes, receive_sizes = [], [], []
    for other in order:
        sent = received = 0
        for t in transfers:
            piece = _overlap(t.sources[me], t.targets[other])
            if piece is not None:
                parts.append(t.sent(me, piece))
                sent += piece[1] - piece[0]
            piece = _overlap(t.sources[other], t.targets[me])
            received += 0 if piece is None else piece[1] - piece[0]
        send_sizes.append(sent)
        receive_sizes.append(received)
    dtype = transfers[0].target.dtype  # one dtype per exchange (_transfer_key)
    send = torch.cat(parts).to(device) if parts else torch.empty(0, dtype=dtype, device=device)
    receive = torch.empty(sum(receive_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(receive, send, receive_sizes, send_sizes, group=group)
    offset = 0
    for other in order:
        for t in transfers:
            piece = _overlap(t.sources[other], t.targets[me])
            if piece is not None:
                size = piece[1] - piece[0]
                t.received(me, piece).copy_(receive[offset : offset + size])
                offset += size


def _exchange_all(transfers: dict[tuple, list[_Transfer]]) -> None:
    for (mesh, mesh_dim, _), items in transfers.items():
        _exchange(mesh, mesh_dim, items)


def _transfer_key(param, dtype: torch.dtype) -> tuple:
    """Transfers exchanged together: those of one (mesh, mesh dim) and dtype (fp32 8-bit absmax,
    bf16 4-bit absmax, uint8 4-bit codes: one all_to_all each)."""
    dims = sharded.sharded_mesh_dims(param)
    return param.device_mesh, dims[0] if dims else None, dtype


# -- saving --------------------------------------------------------------------------------------


def checkpoint_state(state_dict: dict, optimizer) -> dict:
    """``state_dict`` (torch's packing of ``optimizer``'s state) with the absmax of each 8-bit
    or 4-bit DTensor param, and its 4-bit codes, in the checkpoint layout. Entries are copied,
    the optimizer's never changed."""
    owners = {}
    for group, packed in zip(optimizer.param_groups, state_dict["param_groups"], strict=True):
        for saved_id, param in zip(packed["params"], group["params"], strict=True):
            owners[saved_id] = (param, group)
    transfers: dict[tuple, list[_Transfer]] = {}
    for saved_id, entry in state_dict["state"].items():
        param, group = owners[saved_id]
        if not sharded.is_sharded(param) or mom.MOMENTUM_ABSMAX not in entry:
            continue
        entry = state_dict["state"][saved_id] = dict(entry)
        me = sharded.shard_index(param)
        for buffer in _buffers(mom.stored_format(entry), param.numel(), group["block_size"]):
            runtime, owned, chunks = buffer.runtime(param)[me], buffer.owned(param), buffer.chunks(param)
            source = entry[buffer.key][owned[me][0] - runtime[0] : owned[me][1] - runtime[0]]
            target = source.new_empty(chunks[me][1] - chunks[me][0])
            transfers.setdefault(_transfer_key(param, source.dtype), []).append(
                _Transfer(owned, source, chunks, target)
            )
            placements = checkpoint_placements(param)
            entry[buffer.key] = sharded.dtensor(target, param.device_mesh, placements, (buffer.total,))
    _exchange_all(transfers)
    return state_dict


# -- loading -------------------------------------------------------------------------------------


def _box(param) -> tuple[slice, ...]:
    """This rank's shard of a DTensor param as slices of the whole tensor."""
    bounds = [(0, size) for size in param.shape]
    coordinate = param.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if not placement.is_replicate():
            dim = placement.dim % param.ndim
            shards = param.device_mesh.size(mesh_dim)
            bounds[dim] = sharded.chunk_range(*bounds[dim], shards, coordinate[mesh_dim])
    return tuple(slice(low, high) for low, high in bounds)


class Loader:
    """Checked, local copies of loaded momentum buffers for DTensor params. Absmax that must
    move between ranks is gathered per param and moved for all at :meth:`finish` (one
    collective per mesh dim), so every rank must load the same state dict."""

    def __init__(self):
        self._transfers: dict[tuple, list[_Transfer]] = {}

    def momentum(self, entry: dict, param, fmt: str, block_size: int, where: str, empty: Callable) -> dict:
        """The entry's momentum buffers, checked (ValueError naming ``where``) and copied into
        buffers from ``empty``, in the optimizer's layout (absmax filled by :meth:`finish`)."""
        entry = {key: entry[key] for key in (*_DENSE_KEYS, mom.MOMENTUM_ABSMAX) if key in entry}
        for key, value in entry.items():
            if sharded.is_sharded(value) and value.device_mesh != param.device_mesh:
                raise ValueError(
                    f"{where}: {key} is on {value.device_mesh}, the parameter on {param.device_mesh}"
                )
        absmax = entry.get(mom.MOMENTUM_ABSMAX)
        if fmt == "8bit" and isinstance(absmax, torch.Tensor) and absmax.ndim == 2:
            entry[mom.MOMENTUM_ABSMAX] = _legacy_absmax(absmax, param, block_size, where)
        mom.check_momentum(entry, param, fmt, block_size, where)  # global shapes and dtypes
        device = sharded.local(param).device
        blocked = {buffer.key: buffer for buffer in _buffers(fmt, param.numel(), block_size)}
        copies = {}
        for key in _DENSE_KEYS:
            if key not in entry or key in blocked:
                continue
            value = entry[key]
            if sharded.is_sharded(value) and tuple(value.placements) != tuple(param.placements):
                raise ValueError(
                    f"{where}: {key} is placed {value.placements}, expected {param.placements} "
                    "like the parameter"
                )
            part = sharded.local(value) if sharded.is_sharded(value) else value[_box(param)]
            copy = empty(part.shape, dtype=part.dtype, device=device).copy_(part)
            copies[key] = sharded.like_param(copy, param)
        if fmt in mom.QUANTIZED:
            for key, buffer in blocked.items():
                if key in entry:
                    copies[key] = self._blocks(entry[key], param, buffer, empty)
        return copies

    def _blocks(self, value: torch.Tensor, param, buffer: _Buffer, empty: Callable) -> torch.Tensor:
        """This shard's runtime part of a block-laid-out tensor (the whole parameter's, or a
        DTensor in any placement); from other ranks at :meth:`finish`."""
        runtime = buffer.runtime(param)
        low, high = runtime[sharded.shard_index(param)]
        target = empty((high - low,), dtype=value.dtype, device=sharded.local(param).device)
        if not sharded.is_sharded(value):  # the whole parameter's: take this shard's part
            return target.copy_(value[low:high])
        placements = checkpoint_placements(param)
        if tuple(value.placements) != placements:
            value = value.redistribute(param.device_mesh, placements)
        transfer = _Transfer(buffer.chunks(param), sharded.local(value), runtime, target)
        self._transfers.setdefault(_transfer_key(param, value.dtype), []).append(transfer)
        return target

    def finish(self) -> None:
        """Move the absmax (and 4-bit codes) that other ranks hold (a collective)."""
        _exchange_all(self._transfers)
        self._transfers = {}


def _legacy_absmax(absmax: torch.Tensor, param, block_size: int, where: str) -> torch.Tensor:
    """The whole parameter's absmax from the per-shard layout of lion8bit before global blocks
    (shape (shards, blocks of the largest shard), row i the blocks of shard i's own flat
    elements, zero-padded), if its blocks are the whole parameter's; else ValueError."""
    shards, per_shard = absmax.shape
    if not sharded.is_sharded(param) or not sharded.blocks_fit(param):
        raise ValueError(
            f"{where}: {mom.MOMENTUM_ABSMAX} has shape {tuple(absmax.shape)}, this parameter needs 1-D"
        )
    if sharded.sharded_mesh_dims(param):
        dim = next(p.dim for p in param.placements if not p.is_replicate()) % param.ndim
        row = param.numel() // param.shape[dim] if param.shape[dim] else 0
        ranges = [sharded.chunk_range(0, param.shape[dim], shards, i) for i in range(shards)]
        ranges = [(low * row, high * row) for low, high in ranges]
    else:  # a replicated DTensor: one "shard", all of it
        ranges = [(0, param.numel())]
    largest = max(high - low for low, high in ranges)
    if len(ranges) != shards or per_shard != quant.num_blocks(largest, block_size):
        raise ValueError(
            f"{where}: {mom.MOMENTUM_ABSMAX} has shape {tuple(absmax.shape)}, which is neither this "
            f"optimizer's ({quant.num_blocks(param.numel(), block_size)},) nor the per-shard layout of "
            f"earlier lion8bit for {shards} shards of blocks of {block_size}"
        )
    cuts = [low for low, high in ranges if low < high and low % block_size]
    if cuts:
        raise ValueError(
            f"{where}: {mom.MOMENTUM_ABSMAX} of shape {tuple(absmax.shape)} is in the per-shard layout of "
            f"lion8bit before global blocks: the momentum was quantized in blocks of each of {shards} "
            f"shards, and shard boundaries cut blocks of {block_size} elements (at flat elements "
            f"{cuts[:4]}), so its blocks are not the whole parameter's and loading it would requantize "
            f"the momentum. Resume it on {shards} shards with the lion8bit release that saved it, or "
            "load only the model and start the optimizer afresh"
        )
    rows = absmax.full_tensor() if sharded.is_sharded(absmax) else absmax
    blocks = [rows[i, : quant.num_blocks(high - low, block_size)] for i, (low, high) in enumerate(ranges)]
    return torch.cat(blocks)
