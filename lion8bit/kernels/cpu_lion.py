"""backend="cpu": the fused CPU Lion step, ``cpu_lion.cpp`` (the kernels), and its launcher.

One call per step handles every tensor of a group: each element's param, grad and momentum are
read once and written once, in fp32 and in the reference's exact operation order
(``lion8bit/reference.py``), so params, codes, absmax and bf16 momentum are bit-identical to it,
stochastic rounding included. Work is split across ``torch.get_num_threads()`` threads in chunks
of whole absmax blocks, so a step needs no memory beyond the params, grads and state.

The library is built once per machine (:mod:`lion8bit.kernels.cpu_build`); without a compiler
the backend is not registered (:func:`load` raises :class:`~lion8bit.kernels.UnavailableBackend`).
"""

from __future__ import annotations

import array
import ctypes
import itertools
import operator

import torch

from .. import momentum as mom
from .. import quant
from . import STEP_SCALARS, UnavailableBackend, check_tensors, cpu_build
from .cpu_tables import requantizer_levels

# Descriptor row of one tensor, and the codes of cpu_lion.cpp's enums (same order).
_FIELDS = 12
_PARAM_KEY, _MOMENTUM_KEY, _KEY_STEP = 8, 9, 11
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FORMATS = {"8bit": 0, "bf16": 1, "fp32": 2, "4bit": 3}
_QUANTIZED = (0, 3)  # the format codes with an absmax buffer
_MAXIMIZE, _MASKED_DONT_MOVE, _CAUTIOUS_WEIGHT_DECAY, _STOCHASTIC = 1, 2, 4, 8
_NO_KEY = -1

def _pointer(tensor: torch.Tensor, kind):
    return ctypes.cast(tensor.data_ptr(), kind)


def _flags(scalars, stochastic_rounding: bool) -> int:
    flags = _MAXIMIZE if scalars.maximize else 0
    if scalars.cautious and scalars.cautious_factor == 0.0:
        flags |= _MASKED_DONT_MOVE
    if scalars.cautious_weight_decay:
        flags |= _CAUTIOUS_WEIGHT_DECAY
    if stochastic_rounding:
        flags |= _STOCHASTIC
    return flags


# The library, its tables, and a thread count, once loaded (load()); the ops below read them.
_RUNTIME: dict[str, object] = {}


_BUFFER_DTYPES = {0: torch.uint8, 1: torch.bfloat16, 2: torch.float32, 3: torch.uint8}  # by _FORMATS code
_ABSMAX_DTYPES = {0: torch.float32, 3: torch.bfloat16}
_FORMAT_NAMES = {code: name for name, code in _FORMATS.items()}


_data_ptr, _numel, _contiguous = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.is_contiguous
_dtype, _is_cpu = operator.attrgetter("dtype"), operator.attrgetter("is_cpu")


def _descriptors(params, grads, buffers, absmaxes, formats, rounding_keys, element_offsets, block_size):
    """(descriptor rows of the non-empty tensors as one int64 array, their positions).

    Checks every tensor first (kernels.check_tensors' rules: the kernel reads raw memory, so a
    wrong buffer must raise, not be read out of bounds). Both are done a column at a time,
    with map() over the tensors' own methods: the per-tensor bytecode of a Python loop cost
    more than the C++ step of a small tensor (measured: 5 of 12.6 us per tensor of 64 elements).
    The rows are an array.array: torch.tensor(list) of ints took 4x as long here.
    """
    count = len(params)
    if not len(grads) == len(buffers) == len(formats) == count or (element_offsets and len(element_offsets) != count):
        raise ValueError('Invalid call of backend="cpu": lists of different lengths')
    numels = list(map(_numel, params))
    param_types = list(map(_DTYPES.get, map(_dtype, params)))
    grad_types = list(map(_DTYPES.get, map(_dtype, grads)))
    buffer_types = list(map(_dtype, buffers))
    # Per-format sizes: "4bit" packs two codes per byte and has blocks of 32 (quant.packed_size,
    # quant.num_blocks).
    buffer_numels = [-(-n // 2) if f == 3 else n for n, f in zip(numels, formats, strict=True)]
    blocks = [block_size if f == 0 else quant.BLOCK_SIZE_4BIT for f in formats]
    absmax_blocks = [-(-n // b) for n, f, b in zip(numels, formats, blocks, strict=True) if f in _QUANTIZED]
    offsets = list(element_offsets) if element_offsets else [0] * count
    valid = (
        None not in param_types
        and all(g == p or g == 0 for g, p in zip(grad_types, param_types, strict=True))
        and list(map(_numel, grads)) == numels
        and list(map(_numel, buffers)) == buffer_numels
        and [_BUFFER_DTYPES.get(f) for f in formats] == buffer_types
        and list(map(_numel, absmaxes)) == absmax_blocks
        and list(map(_dtype, absmaxes)) == [_ABSMAX_DTYPES[f] for f in formats if f in _QUANTIZED]
        and all(map(_is_cpu, params)) and all(map(_is_cpu, grads)) and all(map(_is_cpu, buffers))
        and all(map(_is_cpu, absmaxes))
        and all(map(_contiguous, params)) and all(map(_contiguous, grads)) and all(map(_contiguous, buffers))
        and all(map(_contiguous, absmaxes))
        and all(type(o) is int and o >= 0 for o in offsets)
        and not any(o % b for o, f, b in zip(offsets, formats, blocks, strict=True) if f in _QUANTIZED)
    )
    if not valid:
        absmax_iterator = iter(absmaxes)
        for index, (param, grad, buffer, fmt, offset) in enumerate(
            zip(params, grads, buffers, formats, offsets, strict=True)
        ):
            absmax = next(absmax_iterator) if fmt in _QUANTIZED else None
            _refuse(index, param, grad, buffer, absmax, fmt, offset, block_size)
        raise AssertionError("the tensors failed a check that no single tensor fails")
    absmax_pointers = iter(list(map(_data_ptr, absmaxes)))
    keys = rounding_keys.tolist() if isinstance(rounding_keys, torch.Tensor) else rounding_keys
    columns = (
        map(_data_ptr, params),
        map(_data_ptr, grads),
        map(_data_ptr, buffers),
        [next(absmax_pointers) if f in _QUANTIZED else 0 for f in formats],
        numels,
        param_types,
        grad_types,
        formats,
        [_NO_KEY] * count if keys is None else [k[0] for k in keys],
        [_NO_KEY] * count if keys is None else [k[1] for k in keys],
        offsets,
        [-1] * count,  # KEY_STEP: the key columns are the keys themselves
    )
    rows = array.array("q", itertools.chain.from_iterable(zip(*columns, strict=True)))
    positions = [index for index, numel in enumerate(numels) if numel]
    if len(positions) < count:  # zero-size tensors: nothing to do, and their pointers may be 0
        rows = array.array("q", itertools.chain.from_iterable(rows[i * _FIELDS : (i + 1) * _FIELDS] for i in positions))
    return rows, positions


def _refuse(index, param, grad, buffer, absmax, fmt, offset, block_size):
    """Raise the ValueError of kernels.check_tensors if this tensor fails the checks."""
    name = _FORMAT_NAMES.get(fmt, fmt)
    quantized = fmt in _QUANTIZED
    momentum = {mom.MOMENTUM_CODES: buffer, mom.MOMENTUM_ABSMAX: absmax} if quantized else {mom.MOMENTUM: buffer}
    for tensor in (param, grad, buffer, absmax):
        if tensor is not None and not tensor.is_cpu:
            raise ValueError(f'backend="cpu" runs on CPU tensors, got a tensor on {tensor.device}')
    try:
        check_tensors("cpu", [param], [grad], [momentum], [name], block_size, [offset])
    except ValueError as error:
        raise ValueError(str(error).replace("tensor 0", f"tensor {index}")) from None


def _address(rows: array.array, kind):
    return ctypes.cast(rows.buffer_info()[0], kind)


# torch.library custom ops, so torch.compile sees the step as one opaque, mutating call (Dynamo
# cannot trace a ctypes call). Eager calls skip the dispatcher (about 8 us per tensor in a list,
# measured on 300 tensors: more than the whole step of a small tensor) and run the same
# functions directly; opcheck (tests/test_cpu_kernel.py) checks the registrations.
# Arguments: per tensor its momentum buffer (uint8 codes or dense momentum), absmax for the
# 8-bit and 4-bit ones only (in order), its format code (_FORMATS); step scalars as an fp32 [6] tensor.


class _Rows:
    """Validated descriptor rows of one call's tensors, reused while they stay the same.

    A training loop steps the same params and momentum buffers every step with new grads
    (zero_grad(set_to_none=True) makes them anew). Checking and describing everything again
    cost 3.8 of 10.3 us per tensor of 64 elements here; a call with the same param and buffer
    objects, at the same addresses, with the same dtypes and sizes, only checks and describes
    its grads (the rest is compared a column at a time).
    """

    def __init__(self, params, buffers, absmaxes, rows, positions):
        self.rows, self.positions = rows, positions
        self.every = list(positions) == list(range(len(params)))  # no empty tensor left out
        self.facts = _facts(params, buffers, absmaxes)
        self.numels = self.facts[2][: len(params)]
        self.param_types = list(map(_DTYPES.get, self.facts[1][: len(params)]))

    def fits(self, params, buffers, absmaxes) -> bool:
        return _facts(params, buffers, absmaxes) == self.facts

    def with_grads(self, grads, rounding_keys):
        """These rows with the grads' pointers and dtypes (and the keys), or None if the grads
        are not what the kernel takes for these params (the full check then names the tensor)."""
        positions = self.positions
        grad_types = list(map(_DTYPES.get, map(_dtype, grads)))
        if not (
            list(map(_numel, grads)) == self.numels
            and all(map(_is_cpu, grads))
            and all(map(_contiguous, grads))
            and (
                grad_types == self.param_types
                or all(g == p or g == 0 for g, p in zip(grad_types, self.param_types, strict=True))
            )
        ):
            return None
        rows = array.array("q", self.rows)
        if self.every:
            rows[1::_FIELDS] = array.array("q", map(_data_ptr, grads))
            rows[6::_FIELDS] = array.array("q", grad_types)
        else:
            rows[1::_FIELDS] = array.array("q", [grads[i].data_ptr() for i in positions])
            rows[6::_FIELDS] = array.array("q", [grad_types[i] for i in positions])
        if rounding_keys is not None:
            keys = rounding_keys.tolist() if isinstance(rounding_keys, torch.Tensor) else rounding_keys
            rows[_PARAM_KEY::_FIELDS] = array.array("q", [keys[i][0] for i in positions])
            rows[_MOMENTUM_KEY::_FIELDS] = array.array("q", [keys[i][1] for i in positions])
        return rows


def _facts(params, buffers, absmaxes):
    # What a kernel relies on and a caller could change behind the same Python objects
    # (param.data = ..., a view of another dtype at the same address): addresses, dtypes, sizes
    # (params first) and contiguity, in one pass per attribute over all the tensors.
    tensors = [*params, *buffers, *absmaxes]
    return (
        list(map(_data_ptr, tensors)),
        list(map(_dtype, tensors)),
        list(map(_numel, tensors)),
        all(map(_contiguous, tensors)),
    )


_ROWS: dict[tuple, _Rows] = {}  # by (block_size, formats, ids of params and buffers); a few groups
_MAX_CACHED = 64


def _cached_rows(params, grads, buffers, absmaxes, formats, rounding_keys, element_offsets, block_size):
    """:func:`_descriptors`, reusing the rows of the last call with the same params and buffers."""
    if element_offsets or not params:
        return _descriptors(params, grads, buffers, absmaxes, formats, rounding_keys, element_offsets, block_size)
    key = (block_size, tuple(formats), tuple(map(id, params)), tuple(map(id, buffers)))
    cached = _ROWS.get(key)
    if cached is None or not cached.fits(params, buffers, absmaxes):
        rows, positions = _descriptors(params, grads, buffers, absmaxes, formats, rounding_keys, (), block_size)
        if len(_ROWS) >= _MAX_CACHED:
            _ROWS.clear()
        _ROWS[key] = _Rows(params, buffers, absmaxes, rows, positions)
        return rows, positions
    rows = cached.with_grads(grads, rounding_keys)
    if rows is None:
        return _descriptors(params, grads, buffers, absmaxes, formats, rounding_keys, (), block_size)
    return rows, cached.positions


def planned_rows(cached: _Rows | None, params, grads, buffers, absmaxes, codes, block_size: int, key_bases=None):
    """(rows object, descriptor rows, positions) for a caller that keeps the rows object itself
    (:mod:`lion8bit.plans`: the same params and buffers step after step, so no cache key of
    their ids is made and hashed). Raises ValueError, before anything is written, if a tensor
    fails the kernel's checks. ``key_bases``: per tensor (param base, momentum base) of
    :func:`lion8bit.reference.rounding_key_bases`, or -1 for no key; :func:`set_key_steps`
    then gives the step the kernel makes the keys for."""
    if cached is None or not cached.fits(params, buffers, absmaxes):
        rows, positions = _descriptors(params, grads, buffers, absmaxes, codes, key_bases, (), block_size)
        return _Rows(params, buffers, absmaxes, rows, positions), rows, positions
    rows = cached.with_grads(grads, None)
    if rows is None:
        rows, positions = _descriptors(params, grads, buffers, absmaxes, codes, key_bases, (), block_size)
        return cached, rows, positions
    return cached, rows, cached.positions


def set_key_steps(rows: array.array, positions, steps) -> None:
    """Key rows of :func:`planned_rows` for these step counts (per tensor, this step included):
    the kernel makes reference.rounding_keys(seed, step) from the bases in the rows."""
    if len(positions) != len(steps):
        steps = [steps[i] for i in positions]
    rows[_KEY_STEP::_FIELDS] = array.array("q", steps)  # the kernel takes them mod 2**32


def launch(descriptors, positions, step_scalars: torch.Tensor, flags: int, block_size: int, steps=None) -> None:
    """Run the step on validated descriptor rows (:func:`planned_rows`, :func:`_cached_rows`)."""
    if not positions:
        return
    _RUNTIME["library"].lion8bit_cpu_step(
        _address(descriptors, cpu_build.INT64_P),
        len(positions),
        None if steps is None else _pointer(steps, cpu_build.FLOAT_P),
        _pointer(step_scalars, cpu_build.FLOAT_P),
        flags,
        block_size,
        _pointer(quant.codebook(), cpu_build.FLOAT_P),
        _pointer(_RUNTIME["levels"], cpu_build.FLOAT_P),
        torch.get_num_threads(),
    )


def _cpu_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor],
    absmaxes: list[torch.Tensor],
    formats: list[int],
    step_scalars: torch.Tensor,
    flags: int,
    block_size: int,
    rounding_keys: torch.Tensor | None,
    element_offsets: list[int],
    cautious_steps: torch.Tensor | None,
) -> None:
    descriptors, positions = _cached_rows(
        params, grads, buffers, absmaxes, formats, rounding_keys, element_offsets, block_size
    )
    if not positions:
        return
    steps = None
    if cautious_steps is not None:
        steps = cautious_steps[positions].float().contiguous()
    launch(descriptors, positions, step_scalars.float().contiguous(), flags, block_size, steps)


def _cpu_aligned_counts(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    buffers: list[torch.Tensor],
    absmaxes: list[torch.Tensor],
    formats: list[int],
    step_scalars: torch.Tensor,
    flags: int,
    block_size: int,
) -> torch.Tensor:
    descriptors, positions = _cached_rows(params, grads, buffers, absmaxes, formats, None, (), block_size)
    counts = torch.zeros(len(params), dtype=torch.int64)
    if positions:
        found = torch.zeros(len(positions), dtype=torch.int64)
        scalars = step_scalars.float().contiguous()
        _RUNTIME["library"].lion8bit_cpu_aligned_counts(
            _address(descriptors, cpu_build.INT64_P),
            len(positions),
            _pointer(scalars, cpu_build.FLOAT_P),
            flags,
            block_size,
            _pointer(quant.codebook(), cpu_build.FLOAT_P),
            _pointer(found, cpu_build.INT64_P),
            torch.get_num_threads(),
        )
        counts[positions] = found
    return counts


cpu_step = torch.library.custom_op(
    "lion8bit::cpu_step", mutates_args=("params", "buffers", "absmaxes"), device_types="cpu"
)(_cpu_step)
cpu_aligned_counts = torch.library.custom_op("lion8bit::cpu_aligned_counts", mutates_args=(), device_types="cpu")(
    _cpu_aligned_counts
)


@cpu_step.register_fake
def _(
    params,
    grads,
    buffers,
    absmaxes,
    formats,
    step_scalars,
    flags,
    block_size,
    rounding_keys,
    element_offsets,
    cautious_steps,
) -> None:
    return None


@cpu_aligned_counts.register_fake
def _(params, grads, buffers, absmaxes, formats, step_scalars, flags, block_size) -> torch.Tensor:
    return torch.empty(len(params), dtype=torch.int64)


def _arguments(momenta, formats, count: int):
    """The op's arguments from the contract's: (buffers, absmaxes of the 8-bit ones, format codes)."""
    if not len(momenta) == len(formats) == count:
        raise ValueError('Invalid call of backend="cpu": lists of different lengths')
    if count and formats.count(formats[0]) == count and formats[0] in _FORMATS and not torch.compiler.is_compiling():
        # One format for every tensor (the common group): C-level passes, no per-tensor branches
        # (eager only: Dynamo cannot trace an itemgetter call, torch 2.13).
        try:
            if formats[0] in ("8bit", "4bit"):
                return (
                    list(map(_codes_of, momenta)),
                    list(map(_absmax_of, momenta)),
                    [_FORMATS[formats[0]]] * count,
                )
            return list(map(_momentum_of, momenta)), [], [_FORMATS[formats[0]]] * count
        except KeyError:
            pass  # a missing buffer: the loop below names the tensor
    buffers, absmaxes, codes = [], [], []
    for index, (momentum, fmt) in enumerate(zip(momenta, formats, strict=True)):
        code = _FORMATS.get(fmt)
        if code in _QUANTIZED and mom.MOMENTUM_CODES in momentum and mom.MOMENTUM_ABSMAX in momentum:
            buffers.append(momentum[mom.MOMENTUM_CODES])
            absmaxes.append(momentum[mom.MOMENTUM_ABSMAX])
        elif code is not None and code not in _QUANTIZED and mom.MOMENTUM in momentum:
            buffers.append(momentum[mom.MOMENTUM])
        else:
            raise ValueError(
                f'Invalid momentum buffers for backend="cpu", tensor {index}: format {fmt!r} with {sorted(momentum)}'
            )
        codes.append(code)
    return buffers, absmaxes, codes


_codes_of = operator.itemgetter(mom.MOMENTUM_CODES)
_absmax_of = operator.itemgetter(mom.MOMENTUM_ABSMAX)
_momentum_of = operator.itemgetter(mom.MOMENTUM)


_HOST_SCALARS: dict[tuple, torch.Tensor] = {}  # a few lr values at a time; cleared when full


def _host_scalars(scalars) -> torch.Tensor:
    # Rounded to fp32 once, as torch rounds a Python float operand of an fp32 tensor op. Kept by
    # value: a constant lr makes the same tensor every step (torch.tensor cost 0.4 us per tensor
    # of a 300-tensor step in benchmarks/host_cost.py), and the kernel only reads it.
    values = tuple(getattr(scalars, name) for name in STEP_SCALARS)
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32)
    tensor = _HOST_SCALARS.get(values)
    if tensor is None:
        if len(_HOST_SCALARS) >= 16:
            _HOST_SCALARS.clear()
        tensor = _HOST_SCALARS[values] = torch.tensor(values, dtype=torch.float32)
    return tensor


def _only_4bit_keys(rounding_keys, codes):
    """Keys given with stochastic_rounding off (the functional passes them for "4bit" momentum,
    which always rounds stochastically): _NO_KEY (round to nearest) for every param, and for
    every momentum but the 4-bit ones, as the reference does."""
    if isinstance(rounding_keys, torch.Tensor):
        keep = torch.tensor([[False, code == 3] for code in codes], device=rounding_keys.device)
        return torch.where(keep, rounding_keys, _NO_KEY)
    return [(_NO_KEY, keys[1] if code == 3 else _NO_KEY) for keys, code in zip(rounding_keys, codes, strict=True)]


class CpuBackend:
    name = "cpu"

    def device_error(self, device: torch.device, what: str) -> str | None:
        if device.type != "cpu":
            return f'backend="cpu" runs on CPU tensors, got {what} on {device}'
        return None

    def aligned_counts(self, params, grads, momenta, formats, *, scalars, block_size, step_scalars=None):
        buffers, absmaxes, codes = _arguments(momenta, formats, len(params))
        step_scalars = _host_scalars(scalars) if step_scalars is None else step_scalars
        count = cpu_aligned_counts if torch.compiler.is_compiling() else _cpu_aligned_counts
        counts = count(params, grads, buffers, absmaxes, codes, step_scalars, _flags(scalars, False), block_size)
        return list(counts.unbind())

    def lion_step(
        self,
        params,
        grads,
        momenta,
        formats,
        *,
        scalars,
        block_size,
        rounding_keys,
        cautious_steps,
        skip,
        element_offsets=None,
        step_scalars=None,
    ):
        if skip is not None:
            raise ValueError('Invalid skip for backend="cpu": CPU steps are skipped by the caller')
        buffers, absmaxes, codes = _arguments(momenta, formats, len(params))
        if rounding_keys is None and "4bit" in formats:  # as the reference and "triton" refuse it
            raise ValueError('"4bit" momentum rounds stochastically: pass rounding_keys')
        if rounding_keys is not None and not scalars.stochastic_rounding:
            rounding_keys = _only_4bit_keys(rounding_keys, codes)
        step = _cpu_step
        if torch.compiler.is_compiling():
            step = cpu_step
            if rounding_keys is not None and not isinstance(rounding_keys, torch.Tensor):
                rounding_keys = torch.tensor(rounding_keys, dtype=torch.int64).view(-1, 2)  # the op's schema
        step(
            params,
            grads,
            buffers,
            absmaxes,
            codes,
            _host_scalars(scalars) if step_scalars is None else step_scalars,
            _flags(scalars, rounding_keys is not None),
            block_size,
            rounding_keys,
            list(element_offsets or []),
            None if cautious_steps is None else torch.stack(cautious_steps),
        )


def load() -> CpuBackend:
    try:
        _RUNTIME["library"] = cpu_build.library()
    except cpu_build.BuildError as error:
        raise UnavailableBackend(
            f'backend="cpu" needs its C++ library, which could not be built: {error}. '
            'Install a C++ compiler (or set CXX), or use backend="auto" / "torch"'
        ) from None
    _RUNTIME["levels"] = requantizer_levels()
    return CpuBackend()
