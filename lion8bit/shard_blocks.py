"""8-bit momentum of sharded params in the whole parameter's blocks: the step around the backends.

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


@dataclass
class _Edge:
    """A shard's piece of one cut block (flat views into the local tensors)."""

    owner: int  # position of its param in the bucket
    param: torch.Tensor
    grad: torch.Tensor
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
            if fmt != "8bit" or shard is None:
                self._add(local_param, grad, entry, fmt, 0 if shard is None else shard.start)
                continue
            slots = self._slots(param)
            (inner_start, inner_end), edges = split(shard, block_size)
            if not edges:
                self._add(local_param, grad, entry, fmt, inner_start)
                continue
            flat_param, flat_codes = self._flat(local_param), self._flat(entry[mom.MOMENTUM_CODES])
            flat_grad = grad.reshape(-1)
            absmax = entry[mom.MOMENTUM_ABSMAX]
            first, _ = sharded.runtime_blocks(shard, block_size)
            inside = slice(max(inner_start - shard.start, 0), max(inner_end - shard.start, 0))
            blocks = slice(inner_start // block_size - first, quant.num_blocks(inner_end, block_size) - first)
            if inner_end == inner_start:
                blocks = slice(0, 0)
            interior = {**entry, mom.MOMENTUM_CODES: flat_codes[inside], mom.MOMENTUM_ABSMAX: absmax[blocks]}
            self._add(flat_param[inside], flat_grad[inside], interior, fmt, inner_start)
            for edge_start, edge_end in edges:
                piece = slice(edge_start - shard.start, edge_end - shard.start)
                block = edge_start // block_size
                group, base, cut = slots
                self._edges.append(_Edge(
                    owner, flat_param[piece], flat_grad[piece], flat_codes[piece], absmax,
                    block - first, edge_start, param.numel(), entry, group, base + cut.index(block),
                ))

    def _add(self, param, grad, entry, fmt, offset) -> None:
        self.params.append(param)
        self.grads.append(grad)
        self.entries.append(entry)
        self.formats.append(fmt)
        self.element_offsets.append(offset)

    def _slots(self, param) -> tuple[tuple, int, list[int]]:
        """(all-reduce group, first slot, cut blocks) of a param's cut blocks."""
        cut = cut_blocks(param, self.block_size)
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
        block_size = self.block_size

        def reduce_counts(counts):
            counts = list(counts)
            for edge in self._edges:
                old = {mom.MOMENTUM_CODES: edge.codes, mom.MOMENTUM_ABSMAX: edge.block_absmax()}
                count = reference_aligned_count(edge.grad, old, scalars, fmt="8bit", block_size=block_size)
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
        B = self.block_size
        maxima = {group: torch.zeros(count, device=device) for group, count in self._cut_counts.items()}
        momenta = []
        for edge in self._edges:
            keys = None
            if stochastic_rounding:
                keys = rounding_keys(edge.entry[mom.SR_SEED], edge.entry[mom.STEP])
            steps = None
            if scalars.cautious:
                steps = cautious_step_sizes(
                    self._counts[edge.owner], edge.numel, scalars.lr, scalars.cautious_factor, torch.float32
                ).to(device)
            momentum = quant.dequantize_blockwise(edge.codes, edge.block_absmax(), B)
            before = edge.param.clone() if skip is not None else None
            # The spec's step on fp32 momentum: the same operations as its 8-bit step up to the
            # requantization, which waits for the whole block's absmax.
            reference_step(
                edge.param, edge.grad, {mom.MOMENTUM: momentum}, scalars, fmt="fp32", block_size=B,
                rounding_keys=keys, cautious_steps=steps, element_offset=edge.start,
            )
            if before is not None:
                edge.param.copy_(torch.where(skip, before, edge.param))
            momenta.append(momentum)
            maxima[edge.group][edge.slot] = momentum.abs().amax()
        for (mesh, mesh_dim), values in maxima.items():
            maxima[(mesh, mesh_dim)] = max_across(values, mesh, mesh_dim)
        for edge, momentum in zip(self._edges, momenta, strict=True):
            absmax = maxima[edge.group][edge.slot : edge.slot + 1]
            codes = quant.quantize_with_absmax(momentum, absmax, B)
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


# -- dense values of a shard ---------------------------------------------------------------------


def _lead(shard: sharded.FlatRange, block_size: int) -> int:
    """Elements of the first local block that lie before the shard."""
    return shard.start % block_size if shard.start < shard.end else 0


def decode(param: torch.Tensor, entry: dict, fmt: str, block_size: int) -> torch.Tensor:
    """The momentum of this rank's part of ``param`` as a new fp32 tensor (its local shape)."""
    view = sharded.local_entry(param, entry)
    if fmt != "8bit" or not sharded.is_sharded(param):
        return mom.decode_momentum(view, fmt, block_size, shape=sharded.local(param).shape)
    codes = view[mom.MOMENTUM_CODES]
    lead = _lead(sharded.flat_range(param), block_size)
    padded = torch.cat([codes.new_full((lead,), quant.ZERO_CODE), codes.reshape(-1)])
    values = quant.dequantize_blockwise(padded, view[mom.MOMENTUM_ABSMAX], block_size)
    return values[lead:].view(codes.shape)


def encode(param: torch.Tensor, entry: dict, values: torch.Tensor, fmt: str, block_size: int) -> None:
    """Store dense momentum ``values`` of this rank's part of ``param`` in the entry's buffers.

    For 8-bit momentum of a DTensor param whose shard boundaries cut blocks, the cut blocks'
    absmax is the max over their pieces: one all-reduce over the shard group, so every rank of
    it must call this for the param.
    """
    view = sharded.local_entry(param, entry)
    if fmt != "8bit" or not sharded.is_sharded(param):
        mom.encode_momentum(view, values, fmt, block_size)
        return
    shard = sharded.flat_range(param)
    lead = _lead(shard, block_size)
    padded = torch.cat([values.new_zeros(lead, dtype=torch.float32), values.reshape(-1).float()])
    absmax = quant.blockwise_absmax(padded, block_size)
    cut = cut_blocks(param, block_size)
    if cut:
        first, stop = sharded.runtime_blocks(shard, block_size)
        held = [(slot, block - first) for slot, block in enumerate(cut) if first <= block < stop]
        partial = torch.zeros(len(cut), dtype=torch.float32, device=absmax.device)
        for slot, block in held:
            partial[slot] = absmax[block]
        combined = max_across(partial, param.device_mesh, sharded.sharded_mesh_dims(param)[0])
        for slot, block in held:
            absmax[block] = combined[slot]
    codes = quant.quantize_with_absmax(padded, absmax, block_size)[lead:]
    view[mom.MOMENTUM_CODES].copy_(codes.view(view[mom.MOMENTUM_CODES].shape))
    view[mom.MOMENTUM_ABSMAX].copy_(absmax)
