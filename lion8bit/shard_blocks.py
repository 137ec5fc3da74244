"""8-bit and 4-bit momentum of sharded params in the whole parameter's blocks: the step around
the backends.

Block k of a parameter is its flat elements [k*B, (k+1)*B), whatever the sharding. A rank's
shard [start, end) (lion8bit/sharded.py) splits into

- an interior: the whole blocks inside the shard, a contiguous piece whose first element is a
  multiple of B. The backends update it as they update any tensor (views of the flat local
  param, grad and codes, and the slice of the local absmax for its blocks), with
  ``element_offsets`` = its place in the whole parameter;
- at most two edges (fewer than B elements each): the shard's pieces of the blocks a shard
  boundary cuts. They are stepped here with the spec's own functions (lion8bit/reference.py),
  their new momentum's partial max |m| per cut block is combined over the shard group with
  ONE all-reduce (MAX) per (mesh, mesh dim) per bucket and step, and each piece is quantized
  with its whole block's absmax. Quantizing with a known absmax is elementwise
  (:func:`lion8bit.quant.quantize_with_absmax`), so every piece gets the codes the unsharded
  block would: the state stays the unsharded optimizer's, bit for bit.

The all-reduce carries one fp32 per cut block of the group's params (as int32 bit patterns:
non-negative floats order like their bits, and a NaN sorts above +inf, so it propagates as
``torch.amax`` does). There is none when every shard boundary falls on a block boundary. The
cautious count pre-pass counts the edges too (:meth:`ShardedStep.count_reducer`).

4-bit momentum works the same way with its own blocks of 32 (``momentum.absmax_block``), and
one more step: a rank holds the packed codes of the WHOLE blocks its shard overlaps
(lion8bit/sharded.py), so the codes of a cut block, two per byte and possibly split inside a
byte by an odd shard boundary, must agree on every rank holding a piece. Each piece is coded
with the whole block's absmax (bf16, rounded up from the combined max) and the stochastic bits
of its own whole-parameter indices (:func:`lion8bit.quant.codes_4bit_with_absmax`, elementwise),
and a second all-reduce (SUM of uint8, 32 per cut block, each rank's row zero outside its
pieces) gives every holder the whole block's codes, which it packs: two all-reduces per bucket
and step when 4-bit blocks are cut, none otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import momentum as mom
from . import quant, sharded
from .reference import (
    LionScalars,
    cautious_step_sizes,
    reference_aligned_count,
    reference_step,
    rounding_keys,
)


def cut_blocks(param, block_size: int) -> list[int]:
    """The blocks of a DTensor param that a boundary between two shards cuts, ascending (the
    same list on every rank)."""
    bounds = set()
    for shard in sharded.shard_ranges(param):
        bounds |= {shard.start, shard.end}
    return sorted({b // block_size for b in bounds if b % block_size and 0 < b < param.numel()})


def split(shard: sharded.FlatRange, block_size: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(interior, edges) of a shard, in whole-parameter flat indices: the interior [a, b) starts
    at a multiple of ``block_size`` (an empty interior too); each edge lies in one cut block."""
    start, end, B = shard.start, shard.end, block_size
    head_end = start if start % B == 0 else min(-(-start // B) * B, end)
    tail_start = end if end % B == 0 or end == shard.numel else max(end // B * B, head_end)
    edges = [piece for piece in ((start, head_end), (tail_start, end)) if piece[0] < piece[1]]
    if tail_start == head_end:
        head_end = tail_start = head_end // B * B
    return (head_end, tail_start), edges


def _codes(fmt: str, inside: slice, shard: sharded.FlatRange, block_size: int) -> slice:
    """The local codes of the interior (``inside``: its elements in the local shard): the same
    elements for 8-bit codes; for 4-bit, the packed bytes of its elements among those the local
    codes hold (:func:`lion8bit.sharded.covered`, which start on a block and so on a byte)."""
    if fmt == "8bit" or inside.start == inside.stop:
        return inside if fmt == "8bit" else slice(0, 0)
    low = shard.start - sharded.covered(shard, block_size)[0]  # elements held before the shard
    return slice((low + inside.start) // 2, quant.packed_size(low + inside.stop))


@dataclass
class _Edge:
    """A shard's piece of one cut block (flat views into the local tensors)."""

    owner: int  # position of its param in the bucket
    fmt: str  # "8bit" or "4bit"
    param: torch.Tensor
    grad: torch.Tensor
    # "8bit": the piece's codes; "4bit": the packed bytes of its whole block (every rank holding
    # a piece of the block holds all of them, the same)
    codes: torch.Tensor
    absmax: torch.Tensor  # the param's local absmax; this piece's block is absmax[block]
    block: int
    start: int  # whole-parameter flat index of its first element
    numel: int  # the whole parameter's
    entry: dict
    group: tuple  # (mesh, mesh dim) of the all-reduce
    slot: int  # its block's position in that all-reduce

    def block_absmax(self) -> torch.Tensor:
        """Its block's absmax: a view of 1 element."""
        return self.absmax[self.block : self.block + 1]

    def momentum(self) -> torch.Tensor:
        """The piece's momentum, decoded to fp32."""
        if self.fmt == "8bit":
            return quant.dequantize_blockwise(self.codes, self.block_absmax(), self.codes.numel())
        B = quant.BLOCK_SIZE_4BIT
        values = quant.dequantize_4bit(self.codes, self.block_absmax(), min(B, self.numel - self.start // B * B))
        return values[self.start % B : self.start % B + self.param.numel()]


class ShardedStep:
    """One bucket's step with DTensor params: the tensors :func:`lion8bit.functional.lion` gets
    (``params``, ``grads``, ``entries``, ``formats``, ``element_offsets``), and what runs around
    it: the edges' counts (:meth:`count_reducer`) and the edges' update (:meth:`step_edges`).
    Plain params, bf16 / fp32 momentum and shards of whole blocks pass through unchanged."""

    def __init__(self, params, local_params, grads, entries, formats, block_size: int):
        self.block_size = block_size
        self.params, self.grads, self.entries, self.formats, self.element_offsets = [], [], [], [], []
        self._whole_params = params
        self._edges: list[_Edge] = []
        self._cut_counts: dict[tuple, int] = {}  # (mesh, mesh dim) -> cut blocks in the all-reduce
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._counts = None
        for owner, (param, local_param, grad, entry, fmt) in enumerate(
            zip(params, local_params, grads, entries, formats, strict=True)
        ):
            shard = sharded.flat_range(param) if sharded.is_sharded(param) else None
            if fmt not in mom.QUANTIZED or shard is None:
                self._add(local_param, grad, entry, fmt, 0 if shard is None else shard.start)
                continue
            B = mom.absmax_block(fmt, block_size)
            slots = self._slots(param, B)
            (inner_start, inner_end), edges = split(shard, B)
            if not edges:
                self._add(local_param, grad, entry, fmt, inner_start)
                continue
            flat_param, flat_codes = self._flat(local_param), self._flat(entry[mom.MOMENTUM_CODES])
            flat_grad = grad.reshape(-1)
            absmax = entry[mom.MOMENTUM_ABSMAX]
            first, _ = sharded.runtime_blocks(shard, B)
            inside = slice(max(inner_start - shard.start, 0), max(inner_end - shard.start, 0))
            blocks = slice(inner_start // B - first, quant.num_blocks(inner_end, B) - first)
            if inner_end == inner_start:
                blocks = slice(0, 0)
            interior = {**entry, mom.MOMENTUM_CODES: flat_codes[_codes(fmt, inside, shard, B)],
                        mom.MOMENTUM_ABSMAX: absmax[blocks]}
            self._add(flat_param[inside], flat_grad[inside], interior, fmt, inner_start)
            for edge_start, edge_end in edges:
                piece = slice(edge_start - shard.start, edge_end - shard.start)
                block = edge_start // B
                group, base, cut = slots
                codes = flat_codes[piece] if fmt == "8bit" else flat_codes[(block - first) * B // 2 :][: B // 2]
                self._edges.append(_Edge(
                    owner, fmt, flat_param[piece], flat_grad[piece], codes, absmax,
                    block - first, edge_start, param.numel(), entry, group, base + cut.index(block),
                ))

    def _add(self, param, grad, entry, fmt, offset) -> None:
        self.params.append(param)
        self.grads.append(grad)
        self.entries.append(entry)
        self.formats.append(fmt)
        self.element_offsets.append(offset)

    def _slots(self, param, block_size: int) -> tuple[tuple, int, list[int]]:
        """(all-reduce group, first slot, cut blocks) of a param's cut blocks."""
        cut = cut_blocks(param, block_size)
        group = (param.device_mesh, sharded.sharded_mesh_dims(param)[0]) if cut else None
        base = self._cut_counts.get(group, 0)
        if cut:
            self._cut_counts[group] = base + len(cut)
        return group, base, cut

    def _flat(self, tensor: torch.Tensor) -> torch.Tensor:
        """A flat view of a local tensor that is written, or of a contiguous copy written back
        by :meth:`step_edges` (FSDP2's shards are contiguous; other DTensors may not be)."""
        if tensor.is_contiguous():
            return tensor.view(-1)
        dense = tensor.contiguous()
        self._staged.append((tensor, dense))
        return dense.view(-1)

    def count_reducer(self, scalars: LionScalars):
        """``reduce_counts`` for the cautious pre-pass: adds the edges' aligned counts (read from
        the old momentum, before anything is written) to their params', then sums over shards."""
        across_shards = sharded.count_reducer(self._whole_params)
        if across_shards is None:
            return None
        def reduce_counts(counts):
            counts = list(counts)
            for edge in self._edges:
                old = {mom.MOMENTUM: edge.momentum()}
                count = reference_aligned_count(edge.grad, old, scalars, fmt="fp32", block_size=1)
                counts[edge.owner] = counts[edge.owner] + count.to(counts[edge.owner].device)
            self._counts = across_shards(counts)
            return self._counts

        return reduce_counts

    def step_edges(self, scalars: LionScalars, *, stochastic_rounding: bool, skip: torch.Tensor | None):
        """Update the edges (after the backend's step on the interiors): params, momentum, and
        the absmax of the cut blocks, combined over the shard group. ``skip``: as for
        :func:`lion8bit.functional.lion` (a true flag leaves everything unchanged)."""
        if self._cut_counts:
            device = sharded.local(self._whole_params[0]).device
            device_skip = None
            if skip is not None and device.type == "cpu":
                if bool(skip):  # every rank decided the same (sharded.any_across): no all-reduce
                    self._finish()
                    return
            elif skip is not None:
                device_skip = skip.to(device, non_blocking=True)
            self._update_edges(scalars, stochastic_rounding, device, device_skip)
        self._finish()

    def _update_edges(self, scalars, stochastic_rounding, device, skip) -> None:
        maxima = {group: torch.zeros(count, device=device) for group, count in self._cut_counts.items()}
        momenta, keys_of = [], []
        for edge in self._edges:
            keys = None
            if stochastic_rounding or edge.fmt == "4bit":  # 4-bit momentum always rounds stochastically
                keys = rounding_keys(edge.entry[mom.SR_SEED], edge.entry[mom.STEP])
            steps = None
            if scalars.cautious:
                steps = cautious_step_sizes(
                    self._counts[edge.owner], edge.numel, scalars.lr, scalars.cautious_factor, torch.float32
                ).to(device)
            momentum = edge.momentum()
            before = edge.param.clone() if skip is not None else None
            # The spec's step on fp32 momentum: the same operations as its 8-bit / 4-bit step up
            # to the requantization, which waits for the whole block's absmax.
            reference_step(
                edge.param, edge.grad, {mom.MOMENTUM: momentum}, scalars, fmt="fp32", block_size=1,
                rounding_keys=keys, cautious_steps=steps, element_offset=edge.start,
            )
            if before is not None:
                edge.param.copy_(torch.where(skip, before, edge.param))
            momenta.append(momentum)
            keys_of.append(keys)
            maxima[edge.group][edge.slot] = momentum.abs().amax()
        for (mesh, mesh_dim), values in maxima.items():
            maxima[(mesh, mesh_dim)] = max_across(values, mesh, mesh_dim)
        # 4-bit: each rank codes its pieces, and the whole cut blocks' codes are summed over the
        # shard group (a rank's row is zero outside its pieces), so every holder of a block
        # stores all of its bytes (a byte may hold nibbles of two ranks' elements)
        B4 = quant.BLOCK_SIZE_4BIT
        rows = {group: torch.zeros(count, B4, dtype=torch.uint8, device=device)
                for group, count in self._cut_counts.items()}
        for edge, momentum, keys in zip(self._edges, momenta, keys_of, strict=True):
            absmax = maxima[edge.group][edge.slot : edge.slot + 1]
            if edge.fmt == "8bit":
                self._store(edge, quant.quantize_with_absmax(momentum, absmax, edge.codes.numel()), absmax, skip)
                continue
            bits = quant.random_bits(keys[1], momentum.numel(), device, edge.start)
            codes = quant.codes_4bit_with_absmax(momentum, quant.round_up_to_bf16(absmax), bits)
            rows[edge.group][edge.slot, edge.start % B4 :][: codes.numel()] = codes
        if any(edge.fmt == "4bit" for edge in self._edges):
            for (mesh, mesh_dim), values in rows.items():
                rows[(mesh, mesh_dim)] = sum_across(values, mesh, mesh_dim)
        for edge in self._edges:
            if edge.fmt == "4bit":
                absmax = quant.round_up_to_bf16(maxima[edge.group][edge.slot : edge.slot + 1])
                block_codes = rows[edge.group][edge.slot, : min(B4, edge.numel - edge.start // B4 * B4)]
                self._store(edge, quant.pack_nibbles(block_codes), absmax, skip)

    @staticmethod
    def _store(edge: _Edge, codes: torch.Tensor, absmax: torch.Tensor, skip) -> None:
        old_absmax = edge.block_absmax()
        if skip is not None:
            codes, absmax = torch.where(skip, edge.codes, codes), torch.where(skip, old_absmax, absmax)
        edge.codes.copy_(codes)
        old_absmax.copy_(absmax)

    def _finish(self) -> None:
        for tensor, dense in self._staged:
            tensor.copy_(dense)
        self._staged = []


def max_across(values: torch.Tensor, mesh, mesh_dim: int) -> torch.Tensor:
    """Elementwise max of non-negative fp32 ``values`` over a mesh dim's ranks (one all-reduce
    of their int32 bit patterns, which order like the floats; NaN sorts above +inf)."""
    import torch.distributed as dist

    bits = values.to(sharded.mesh_device(mesh)).view(torch.int32)
    dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
    return bits.view(torch.float32).to(values.device)


def sum_across(values: torch.Tensor, mesh, mesh_dim: int) -> torch.Tensor:
    """Elementwise sum of ``values`` over a mesh dim's ranks (one all-reduce)."""
    import torch.distributed as dist

    summed = values.to(sharded.mesh_device(mesh))
    dist.all_reduce(summed, group=mesh.get_group(mesh_dim))
    return summed.to(values.device)


# -- dense values of a shard ---------------------------------------------------------------------


def _lead(shard: sharded.FlatRange, block_size: int) -> int:
    """Elements of the first local block that lie before the shard."""
    return shard.start % block_size if shard.start < shard.end else 0


def decode(param: torch.Tensor, entry: dict, fmt: str, block_size: int) -> torch.Tensor:
    """The momentum of this rank's part of ``param`` as a new fp32 tensor (its local shape)."""
    view = sharded.local_entry(param, entry)
    shape = sharded.local(param).shape
    if fmt not in mom.QUANTIZED or not sharded.is_sharded(param):
        return mom.decode_momentum(view, fmt, block_size, shape=shape)
    shard = sharded.flat_range(param)
    codes, absmax = view[mom.MOMENTUM_CODES], view[mom.MOMENTUM_ABSMAX]
    if fmt == "4bit":
        low, high = sharded.covered(shard, quant.BLOCK_SIZE_4BIT)
        values = quant.dequantize_4bit(codes, absmax, high - low)
        return values[shard.start - low : shard.end - low].view(shape)
    lead = _lead(shard, block_size)
    padded = torch.cat([codes.new_full((lead,), quant.ZERO_CODE), codes.reshape(-1)])
    values = quant.dequantize_blockwise(padded, absmax, block_size)
    return values[lead:].view(codes.shape)


def encode(param: torch.Tensor, entry: dict, values: torch.Tensor, fmt: str, block_size: int) -> None:
    """Store dense momentum ``values`` of this rank's part of ``param`` in the entry's buffers
    (8-bit and 4-bit codes to nearest, as :func:`lion8bit.momentum.encode_momentum`).

    For quantized momentum of a DTensor param whose shard boundaries cut blocks, the cut
    blocks' absmax is the max over their pieces, and a cut 4-bit block's codes are gathered from
    its pieces: one all-reduce (two for 4-bit) over the shard group, so every rank of it must
    call this for the param.
    """
    view = sharded.local_entry(param, entry)
    if fmt not in mom.QUANTIZED or not sharded.is_sharded(param):
        mom.encode_momentum(view, values, fmt, block_size)
        return
    B = mom.absmax_block(fmt, block_size)
    shard = sharded.flat_range(param)
    low, high = sharded.covered(shard, B)
    lead = _lead(shard, B)
    # The elements of the blocks the shard overlaps, zero outside the shard (8-bit codes hold
    # only the shard's; the tail of its last block is left out, as a partial block)
    padded = values.new_zeros(high - low if fmt == "4bit" else lead + values.numel(), dtype=torch.float32)
    padded[lead : lead + values.numel()] = values.reshape(-1).float()
    absmax = quant.blockwise_absmax(padded, B)
    cut = cut_blocks(param, B)
    first, stop = sharded.runtime_blocks(shard, B)
    held = [(slot, block - first) for slot, block in enumerate(cut) if first <= block < stop]
    if cut:
        partial = torch.zeros(len(cut), dtype=torch.float32, device=absmax.device)
        for slot, block in held:
            partial[slot] = absmax[block]
        combined = max_across(partial, param.device_mesh, sharded.sharded_mesh_dims(param)[0])
        for slot, block in held:
            absmax[block] = combined[slot]
    if fmt == "8bit":
        codes = quant.quantize_with_absmax(padded, absmax, block_size)[lead:]
        view[mom.MOMENTUM_CODES].copy_(codes.view(view[mom.MOMENTUM_CODES].shape))
        view[mom.MOMENTUM_ABSMAX].copy_(absmax)
        return
    absmax = quant.round_up_to_bf16(absmax)
    codes = quant.codes_4bit_with_absmax(padded, absmax)
    if cut:
        # the cut blocks' codes from the ranks whose pieces they are: zero outside this shard
        mine = torch.zeros(high - low, dtype=torch.bool, device=codes.device)
        mine[lead : lead + values.numel()] = True
        codes = torch.where(mine, codes, 0)
        rows = torch.zeros(len(cut), B, dtype=torch.uint8, device=codes.device)
        for slot, block in held:
            part = codes[block * B : (block + 1) * B]
            rows[slot, : part.numel()] = part
        rows = sum_across(rows, param.device_mesh, sharded.sharded_mesh_dims(param)[0])
        for slot, block in held:
            part = codes[block * B : (block + 1) * B]
            part.copy_(rows[slot, : part.numel()])
    view[mom.MOMENTUM_CODES].copy_(quant.pack_nibbles(codes))
    view[mom.MOMENTUM_ABSMAX].copy_(absmax)
