"""backend="triton": the launcher of the fused kernels (:mod:`.triton_lion_kernels`).

One call (one param group's tensors on one device) is one launch per (param dtype, grad dtype,
state format, alignment) present in it — the ``multi_tensor_apply`` pattern — through a table of
the tensors' addresses that lives on the device. Alignment: tensors whose param, grad and
momentum sit on 16-byte boundaries with numel % 16 == 0 share a launch that tells the compiler
so (128-bit accesses); the rest share one without the hint. A launch holds at most
``MAX_ROWS`` tensors.

Tables are cached across steps by their contents (every address, size, element offset and slot),
so ``param.data`` or ``DTensor.to_local()`` wrappers, fresh at every access, still hit; a storage
that moved (a re-allocated param, a grad that came back at a new address after
``zero_grad(set_to_none=True)``) or a tensor that joined or left builds a new table: one small
host array, one copy to the device (``non_blocking`` from pinned memory on CUDA). Per-step
values (rounding keys, cautious step sizes) are separate small tensors, never in the table.

The launches are wrapped in ``torch.library`` custom ops (``lion8bit::triton_lion_step``,
``lion8bit::triton_aligned_counts``), so torch.compile sees one opaque node per call instead of
tracing into the launcher (Dynamo: one graph, no break; tests/test_triton_kernel.py). Not
``triton_op`` + ``wrap_triton``: those trace the body with FakeTensors, which have no
``data_ptr()`` to put in a table, and functionalize a kernel by the tensors passed to it as
arguments, while this one writes tensors it reaches through addresses. And with interpreted
kernels (the tests' CPU runs) even a one-tensor ``triton_op`` fails opcheck's fake-tensor test
and torch.compile: the interpreter's launcher reads its FakeTensor arguments' storage (seen with
torch 2.13 and triton 3.9).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton.language as tl

from .. import momentum as mom
from .. import quant
from . import STEP_SCALARS, check_tensors
from . import triton_lion_kernels as fused

# What the kernels were decorated for (the interpreter or the GPU compiler).
INTERPRETED = fused.INTERPRETED
MAX_ROWS = fused.MAX_ROWS
FORMATS = ("8bit", "bf16", "fp32", "4bit")  # the ops' format codes are indices into this
_QUANTIZED = ("8bit", "4bit")  # momentum as codes + absmax: two buffers
_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TABLE_CAPACITY = 64  # tables kept: a few per group and alignment, and some for moving grads


@functools.cache
def _tables_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Copied to a device once (the first step), like quant.codebook.
    return quant.codebook(device), fused._REQUANT_TABLE.to(device)


def _code_values(fmt: str, device: torch.device) -> torch.Tensor | None:
    """What a format's codes decode to: the 8-bit codebook, the 4-bit levels, or nothing."""
    if fmt == "8bit":
        return _tables_on(device)[0]
    return quant.levels_4bit(device) if fmt == "4bit" else None


def _fp32(value: float) -> float:
    # The scalar as the reference uses it (a Python float rounded once to fp32), whatever the
    # launcher or interpreter would do with a float64; host arithmetic only.
    return float(np.float32(value))


def _device_of(device: torch.device):
    # Launch on the tensors' GPU, not the current one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``: on CUDA one ``non_blocking`` copy from pinned memory (the
    caching host allocator keeps the pinned block until the copy has run), no host wait."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# launch tables


@dataclass(frozen=True)
class LaunchKind:
    """What one launch's tensors share: the kernel's compile-time types and hints."""

    param_dtype: torch.dtype
    grad_dtype: torch.dtype
    fmt: str
    aligned: bool


@dataclass(frozen=True)
class LaunchTable:
    """One launch's table on the device: the int64 columns of ``fused.COLUMNS`` (views of one
    tensor of ``nbytes``), its row count and its tile count (the launch's programs)."""

    columns: tuple[torch.Tensor, ...]
    rows: int
    tiles: int
    nbytes: int


# The fields of a table row the caller gives (COLUMNS less first_tile, which is derived).
_FIELDS = len(fused.COLUMNS) - 1


def build_table(device: torch.device, tile_elements: int, contents: tuple[int, ...]) -> LaunchTable:
    """The table of ``contents``: per tensor (param, grad, momentum, absmax address, numel,
    element offset, slot), flat. One host array, one copy to the device."""
    fields = np.array(contents, dtype=np.int64).reshape(-1, _FIELDS).T
    rows = fields.shape[1]
    # One entry past the rows ends the first-tile column; an even height keeps each column's
    # start on a 16-byte boundary (the kernel's specialization does not change with the count).
    height = rows + 1 + (rows + 1) % 2
    host = np.zeros((len(fused.COLUMNS), height), dtype=np.int64)
    first_tile = fused.COLUMNS.index("first_tile")
    host[:first_tile, :rows] = fields[:first_tile]
    host[first_tile + 1 :, :rows] = fields[first_tile:]
    numels = fields[fused.COLUMNS.index("numel")]
    host[first_tile, 1 : rows + 1] = np.cumsum(-(-numels // tile_elements))
    table = _to_device(torch.from_numpy(host), device)
    return LaunchTable(tuple(table.unbind(0)), rows, int(host[first_tile, rows]), table.nbytes)


class TableCache:
    """Launch tables by device, tile and contents; least recently used first out.

    A table used while a CUDA graph is captured is kept for good: the graph replays its
    addresses. A table cannot be built during capture (the graph would replay a copy from a
    host buffer freed after it); warm up, as for any captured step, with one eager step first.
    """

    def __init__(self, capacity: int = _TABLE_CAPACITY):
        self.capacity = capacity
        self.builds = 0  # tables built so far (tests and benchmarks read it)
        self._tables: collections.OrderedDict = collections.OrderedDict()
        self._captured: dict = {}

    def __len__(self) -> int:
        return len(self._tables) + len(self._captured)

    @property
    def nbytes(self) -> int:
        """Device bytes of the tables held."""
        return sum(table.nbytes for table in (*self._tables.values(), *self._captured.values()))

    def get(self, device: torch.device, tile_elements: int, contents: tuple[int, ...]) -> LaunchTable:
        key = (device, tile_elements, contents)
        table = self._captured.get(key) or self._tables.get(key)
        capturing = _capturing(device)
        if table is None:
            if capturing:
                raise RuntimeError(
                    'backend="triton": a launch table is missing while a CUDA graph is captured; run the '
                    "step once eagerly before capturing (with the same params, grads and state)"
                )
            table = build_table(device, tile_elements, contents)
            self.builds += 1
        if capturing:
            self._tables.pop(key, None)
            self._captured[key] = table
        elif key not in self._captured:
            self._tables[key] = table
            self._tables.move_to_end(key)
            if len(self._tables) > self.capacity:
                self._tables.popitem(last=False)
        return table


TABLES = TableCache()


def plan_launches(params, grads, buffers, formats, element_offsets, block_size):
    """[(kind, (quant_block, rows), table)]: the launches of one call, tables from the cache.
    ``buffers`` and ``formats`` as the ops take them. Per tensor: a few attribute reads, no
    device work (this runs every step)."""
    contents: dict[tuple, list[int]] = {}
    position = 0
    for slot, param in enumerate(params):
        fmt = FORMATS[formats[slot]]
        momentum = buffers[position]
        absmax = 0
        if fmt in _QUANTIZED:
            absmax = buffers[position + 1].data_ptr()
            position += 1
        position += 1
        numel = param.numel()
        if numel == 0:
            continue
        grad = grads[slot]
        addresses = (param.data_ptr(), grad.data_ptr(), momentum.data_ptr())
        aligned = not (addresses[0] | addresses[1] | addresses[2] | numel) & 15
        key = (param.dtype, grad.dtype, fmt, aligned)
        flat = contents.get(key)
        if flat is None:
            flat = contents[key] = []
        flat += (*addresses, absmax, numel, element_offsets[slot] if element_offsets else 0, slot)
    launches = []
    for (param_dtype, grad_dtype, fmt, aligned), flat in contents.items():
        kind = LaunchKind(param_dtype, grad_dtype, fmt, aligned)
        quant_block, rows = fused.layout(fmt, block_size)
        per_launch = MAX_ROWS * _FIELDS  # ints of a full table
        for start in range(0, len(flat), per_launch):
            table = TABLES.get(params[0].device, quant_block * rows, tuple(flat[start : start + per_launch]))
            launches.append((kind, (quant_block, rows), table))
    return launches


# ---------------------------------------------------------------------------------------------
# the ops


def _aligned_counts(
    params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor], formats: list[int],
    block_size: int, beta1: float, one_minus_beta1: float, maximize: bool, step_scalars: torch.Tensor | None,
) -> torch.Tensor:
    """The cautious pre-pass of every tensor: int64 [n], the aligned elements per tensor.
    ``buffers``: each tensor's momentum buffers in turn (codes and absmax for "8bit" and "4bit");
    ``formats``: indices into :data:`FORMATS`. ``params`` are not read (they key the tables the
    step shares)."""
    device = params[0].device
    counts = torch.zeros(len(params), dtype=torch.int64, device=device)
    for kind, (quant_block, rows), table in plan_launches(params, grads, buffers, formats, None, block_size):
        grad_column, momentum_column, absmax_column, numels, _, first_tiles, slots = table.columns[1:]
        with _device_of(device):
            fused._aligned_count_kernel[(table.tiles,)](
                grad_column, momentum_column, absmax_column, numels, first_tiles, slots, table.rows,
                _code_values(kind.fmt, device), step_scalars, counts,
                _fp32(beta1), _fp32(one_minus_beta1),
                GRAD_TYPE=_TYPES[kind.grad_dtype], FORMAT=kind.fmt, MAXIMIZE=maximize,
                DEVICE_SCALARS=step_scalars is not None, ALIGNED=kind.aligned,
                QUANT_BLOCK=quant_block, ROWS=rows,
                num_warps=fused._NUM_WARPS,
                # As in the step: c = m*beta1 + g*(1 - beta1) fused into one rounding can flip
                # the sign of a c near 0, and so the count (the interpreter never fuses).
                enable_fp_fusion=False,
            )
    return counts


triton_aligned_counts = torch.library.custom_op(
    "lion8bit::triton_aligned_counts", _aligned_counts, mutates_args=()
)


@triton_aligned_counts.register_fake
def _(params, grads, buffers, formats, block_size, beta1, one_minus_beta1, maximize, step_scalars):
    return params[0].new_empty(len(params), dtype=torch.int64)


def _lion_step(
    params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor], formats: list[int],
    element_offsets: list[int], block_size: int, scalars: list[float],
    maximize: bool, cautious: bool, cautious_mask: bool, weight_decay: bool, cautious_weight_decay: bool,
    stochastic_rounding: bool, rounding_keys: torch.Tensor | None, cautious_steps: torch.Tensor | None,
    step_scalars: torch.Tensor | None, skip: torch.Tensor | None,
) -> None:
    """The whole step of every tensor, in place. ``scalars``: lr, beta1, 1 - beta1, beta2,
    1 - beta2, decay (replaced by ``step_scalars`` when given); ``rounding_keys``: int64 [n, 2]
    uint32 keys, with which bf16 / fp16 params and bf16 momentum round stochastically if
    ``stochastic_rounding`` and "4bit" momentum always; ``cautious_steps``: fp32 [n, 2];
    ``skip``: uint8 0-dim, nonzero = change nothing; ``element_offsets``: [] for all 0. Buffers
    and formats as in triton_aligned_counts."""
    device = params[0].device
    lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay = (_fp32(value) for value in scalars)
    for kind, (quant_block, rows), table in plan_launches(
        params, grads, buffers, formats, element_offsets, block_size
    ):
        requant_table = _tables_on(device)[1] if kind.fmt == "8bit" else None
        stochastic = rounding_keys is not None and stochastic_rounding
        with _device_of(device):
            fused._lion_step_kernel[(table.tiles,)](
                *table.columns, table.rows,
                _code_values(kind.fmt, device), requant_table,
                rounding_keys, cautious_steps, step_scalars, skip,
                lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay,
                PARAM_TYPE=_TYPES[kind.param_dtype],
                GRAD_TYPE=_TYPES[kind.grad_dtype],
                FORMAT=kind.fmt,
                MAXIMIZE=maximize,
                CAUTIOUS=cautious,
                CAUTIOUS_MASK=cautious_mask,
                WEIGHT_DECAY=weight_decay,
                CAUTIOUS_WEIGHT_DECAY=cautious_weight_decay,
                STOCHASTIC_PARAM=stochastic and kind.param_dtype != torch.float32,
                STOCHASTIC_MOMENTUM=stochastic and kind.fmt == "bf16",
                SKIP=skip is not None,
                DEVICE_SCALARS=step_scalars is not None,
                ALIGNED=kind.aligned,
                QUANT_BLOCK=quant_block,
                ROWS=rows,
                num_warps=fused._NUM_WARPS,
                # No FMA contraction: the reference rounds each product and sum (c, the EMA,
                # p*decay - u*step); a fused multiply-add rounds once and changes the bits.
                enable_fp_fusion=False,
            )


triton_lion_step = torch.library.custom_op(
    "lion8bit::triton_lion_step", _lion_step, mutates_args=("params", "buffers")
)


@triton_lion_step.register_fake
def _(*args):
    return None


# ---------------------------------------------------------------------------------------------
# the backend


def _flat_buffers(momenta, formats) -> tuple[list[torch.Tensor], list[int]]:
    buffers = []
    for momentum, fmt in zip(momenta, formats, strict=True):
        if fmt in _QUANTIZED:
            buffers += [momentum[mom.MOMENTUM_CODES], momentum[mom.MOMENTUM_ABSMAX]]
        else:
            buffers.append(momentum[mom.MOMENTUM])
    return buffers, [FORMATS.index(fmt) for fmt in formats]


def _per_slot(value, count: int, dtype: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    """A [count, 2] tensor of ``dtype`` on ``device`` from per-tensor pairs or such a tensor."""
    if isinstance(value, torch.Tensor):
        if value.dtype != dtype or value.shape != (count, 2) or value.device != device:
            raise ValueError(
                f'Invalid {what} for backend="triton": {value.dtype} {tuple(value.shape)} on {value.device}, '
                f"expected {dtype} ({count}, 2) on {device}"
            )
        return value.contiguous()
    if dtype == torch.int64:  # host keys
        if _capturing(device):
            raise RuntimeError(
                'backend="triton": host rounding keys would be frozen into a captured CUDA graph; pass them '
                "as a device tensor (capturable=True)"
            )
        return _to_device(torch.tensor(value, dtype=torch.int64).reshape(count, 2), device)
    return torch.stack(list(value)).to(dtype)  # per-tensor [2] device tensors


def _entry(op, function):
    """The op while torch.compile traces (one node in its graph), the plain function in eager:
    the op's dispatch bumps the version counter of every mutated tensor and checks aliasing,
    ~11 us per tensor measured on this 2-core machine against ~4 us for the whole launcher (the
    functional bumps the params' version counters itself)."""
    return op if torch.compiler.is_compiling() else function


def _host_scalars(scalars, step_scalars) -> list[float]:
    """lr, beta1, 1 - beta1, beta2, 1 - beta2, decay as the kernels' float arguments; unread
    when ``step_scalars`` is given, and then zeros: with a tensor lr, ``scalars.lr`` and
    ``scalars.decay`` are device tensors that must not be read on the host."""
    if step_scalars is not None:
        return [0.0] * 6
    s = scalars
    return [s.lr, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.decay]


class TritonBackend:
    name = "triton"

    def device_error(self, device: torch.device, what: str) -> str | None:
        if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
            return None
        return (
            f'backend="triton" runs on CUDA tensors, got {what} on {device}; use backend="auto" '
            'or "torch", or set TRITON_INTERPRET=1 before lion8bit imports its Triton kernels to '
            "run them in Triton's CPU interpreter (slow, for tests)"
        )

    def _check(self, params, grads, momenta, formats, block_size, element_offsets=None, step_scalars=None):
        check_tensors(self.name, params, grads, momenta, formats, block_size, element_offsets)
        for param in params[:1]:  # check_tensors put every tensor on the first param's device
            error = self.device_error(param.device, "a parameter")
            if error:
                raise ValueError(error)
        if step_scalars is not None and (
            step_scalars.dtype != torch.float32 or step_scalars.shape != (len(STEP_SCALARS),)
            or (params and step_scalars.device != params[0].device)
        ):
            raise ValueError(
                f'Invalid step_scalars for backend="triton": {step_scalars.dtype} '
                f"{tuple(step_scalars.shape)} on {step_scalars.device}, expected float32 "
                f"({len(STEP_SCALARS)},) on the params' device"
            )

    def aligned_counts(self, params, grads, momenta, formats, *, scalars, block_size, step_scalars=None):
        self._check(params, grads, momenta, formats, block_size, step_scalars=step_scalars)
        if not params:
            return []
        buffers, codes = _flat_buffers(momenta, formats)
        beta1, one_minus_beta1 = _host_scalars(scalars, step_scalars)[1:3]
        counts = _entry(torch.ops.lion8bit.triton_aligned_counts, _aligned_counts)(
            params, grads, buffers, codes, block_size, beta1, one_minus_beta1, scalars.maximize, step_scalars,
        )
        return list(counts.unbind(0))

    def lion_step(
        self, params, grads, momenta, formats, *, scalars, block_size, rounding_keys, cautious_steps, skip,
        element_offsets=None, step_scalars=None,
    ):
        self._check(params, grads, momenta, formats, block_size, element_offsets, step_scalars)
        if not params:
            return
        if rounding_keys is None and "4bit" in formats:
            # As reference.reference_step: the format's rounding is stochastic, keyed per step.
            raise ValueError('"4bit" momentum rounds stochastically: pass rounding_keys')
        device, count, s = params[0].device, len(params), scalars
        buffers, codes = _flat_buffers(momenta, formats)
        _entry(torch.ops.lion8bit.triton_lion_step, _lion_step)(
            params, grads, buffers, codes, list(element_offsets or ()), block_size, _host_scalars(s, step_scalars),
            s.maximize, s.cautious, s.cautious_factor == 0.0, s.weight_decay, s.cautious_weight_decay,
            s.stochastic_rounding,
            None if rounding_keys is None else _per_slot(
                rounding_keys, count, torch.int64, device, "rounding keys"
            ),
            None if cautious_steps is None else _per_slot(
                cautious_steps, count, torch.float32, device, "cautious steps"
            ),
            step_scalars,
            None if skip is None else skip.reshape(()).view(torch.uint8),
        )


def load() -> TritonBackend:
    return TritonBackend()
