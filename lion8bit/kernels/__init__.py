"""The backends: one implementation of the reference step per device family, and the registry.

Model: bitsandbytes' ``_ops.py`` + ``backends/*/ops.py`` — one contract (:class:`Backend`), one
module per implementation, registered only where it can run:

- ``"torch"`` (:mod:`.torch_lion`): the reference (``lion8bit/reference.py``) one tensor at a
  time; any device.
- ``"cpu"`` (:mod:`.cpu_lion`): the fused C++ step; registered only when its library builds (a
  C++ compiler is needed, :mod:`.cpu_build`).
- ``"triton"`` (:mod:`.triton_lion`): the fused Triton kernel; registered when ``triton`` is
  installed; CUDA tensors, or CPU tensors when the kernels were decorated for Triton's
  interpreter (``TRITON_INTERPRET=1`` before they were imported).

:func:`resolve` turns the ``backend`` option ("auto" or a name) into the backend for a device;
the functional :func:`lion8bit.functional.lion` calls it. Modules load lazily, so
``import lion8bit`` works without Triton and without a compiler.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
from typing import Protocol

import torch

from .. import momentum as mom
from .. import quant
from ..reference import LionScalars

BACKENDS = ("torch", "cpu", "triton")


class Backend(Protocol):
    """What every backend implements. Calls come from :func:`lion8bit.functional.lion` only.

    Arguments, the same for both functions:

    - ``params``, ``grads``: contiguous tensors on one device, updated in place (params); grads
      of the param dtype or fp32; zero-size tensors included.
    - ``momenta``: per tensor, a dict holding its contiguous momentum buffers — ``momentum_codes``
      (uint8) and ``momentum_absmax`` (fp32) for "8bit", the same keys for "4bit" (codes packed
      two per byte, flat; bf16 absmax per block of 32), ``momentum`` (bf16 or fp32) otherwise
      (keys of :mod:`lion8bit.momentum`; other keys, such as a state entry's ``step``, are
      ignored); updated in place. Write into them, never replace them: they may be views of
      sharded or staged state.
    - ``formats``: per tensor, "8bit" | "4bit" | "bf16" | "fp32".
    - ``scalars``: the group's :class:`~lion8bit.reference.LionScalars`; ``block_size``: elements
      per absmax block.
    - ``step_scalars``: None, or (``capturable=True``) an fp32 tensor [6] on the params' device:
      beta1, 1 - beta1, beta2, 1 - beta2, decay, lr, rounded as :func:`~lion8bit.reference.lion_scalars`
      rounds them, computed on the device so that an LR schedule between CUDA-graph replays is
      seen. When given, these values replace ``scalars``' floats (:data:`STEP_SCALARS` names
      them); ``scalars`` still gives the flags (maximize, caution, cautious weight decay).
    """

    name: str

    def device_error(self, device: torch.device, what: str) -> str | None:
        """None if this backend can update tensors on ``device``, else why not (an error
        message that names ``what``, e.g. the parameter)."""

    def aligned_counts(
        self, params, grads, momenta, formats, *, scalars: LionScalars, block_size: int, step_scalars=None,
    ):
        """The cautious pre-pass: per tensor, an int64 0-dim tensor counting the elements whose
        update sign agrees with the gradient (reads the old momentum and the grad only)."""

    def lion_step(
        self, params, grads, momenta, formats, *, scalars: LionScalars, block_size: int,
        rounding_keys, cautious_steps, skip, element_offsets=None, step_scalars=None,
    ) -> None:
        """The whole update, in place.

        - ``rounding_keys``: None, or per tensor ``(param_key, momentum_key)``: the uint32
          stochastic-rounding keys of :func:`lion8bit.reference.rounding_keys`; with
          ``capturable=True`` an int64 tensor [n, 2] of them on the params' device (computed
          there from the device step counters).
        - ``cautious_steps``: None without caution, else per tensor an fp32 [2] tensor (step
          where aligned, where not) on the params' device.
        - ``skip``: None, or a bool 0-dim tensor on the params' (non-CPU) device: when true,
          nothing may change. Decided on the device, never read on the host; never given for
          CPU tensors (the functional decides those on the host).
        - ``element_offsets``: None (all 0), or per tensor the flat index of its first element in
          the whole parameter it is part of (a shard's place in it). Stochastic rounding draws
          the bits of those whole-parameter indices. For "8bit" a multiple of ``block_size``:
          absmax blocks are blocks of the whole parameter; for "4bit" a multiple of 32.
        """


# The order of ``step_scalars``.
STEP_SCALARS = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay", "lr")


class UnavailableBackend(RuntimeError):
    """A backend cannot be used in this process; the message says why and what to do."""


def interpreting() -> bool:
    """True when Triton kernels are decorated for its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The Triton releases the kernels are tested with (bit-exact in the interpreter, compiled for
# sm_80 / sm_90): 3.6 is what torch 2.11 pins, 3.9 what CI installs with torch 2.13 (.ci/run tests both).
TRITON_TESTED = ((3, 6), (3, 9))


def _check_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        raise UnavailableBackend(
            'backend="triton" needs the triton package (pip install triton); '
            'use backend="auto" or "torch" without it'
        )
    found = importlib.metadata.version("triton")
    release = tuple(int(part) for part in re.findall(r"\d+", found)[:2])
    oldest = TRITON_TESTED[0]
    if release < oldest:
        raise UnavailableBackend(
            f'backend="triton" needs triton >= {oldest[0]}.{oldest[1]} (tested: 3.6 to 3.9), found {found}; '
            'upgrade triton, or use backend="auto" or "torch"'
        )


# name -> module in this package; each module defines BACKEND, an object that is a Backend.
_MODULES = {"torch": "torch_lion", "cpu": "cpu_lion", "triton": "triton_lion"}


# name -> the loaded backend, or the UnavailableBackend saying why not. A plain dict, not a
# functools cache: torch.compile traces through a dict lookup (and warns about lru_cache).
_LOADED: dict[str, object] = {}


def _load(name: str):
    if name not in _MODULES:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {BACKENDS})")
    try:
        if name == "triton":
            _check_triton()
        return importlib.import_module(f"{__name__}.{_MODULES[name]}").load()
    except UnavailableBackend as error:
        return error


def get(name: str) -> Backend:
    """The registered backend ``name``; :class:`UnavailableBackend` saying why if it is not."""
    loaded = _LOADED.get(name)
    if loaded is None:
        loaded = _LOADED[name] = _load(name)
    if isinstance(loaded, UnavailableBackend):
        raise loaded
    return loaded


def available(name: str) -> bool:
    """Whether backend ``name`` is registered in this process."""
    try:
        get(name)
    except UnavailableBackend:
        return False
    return True


def forget() -> None:
    """Forget what was loaded, so the next call looks again (tests change the environment)."""
    _LOADED.clear()


def resolve(requested: str, device: torch.device, what: str = "tensors") -> Backend:
    """The backend that runs ``requested`` ("auto" or a name) for tensors on ``device``.

    "auto": "triton" on CUDA when registered, "cpu" on CPU when registered, else "torch".
    A named backend that is not registered, or cannot run on ``device``, raises
    :class:`UnavailableBackend` (a RuntimeError) saying why and naming ``what``.
    """
    if requested == "auto":
        preferred = {"cuda": "triton", "cpu": "cpu"}.get(device.type)
        if preferred is not None and available(preferred):
            backend = get(preferred)
            if backend.device_error(device, what) is None:
                return backend
        return get("torch")
    backend = get(requested)
    error = backend.device_error(device, what)
    if error is not None:
        raise UnavailableBackend(error)
    return backend


_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_BUFFER_DTYPES = {
    "8bit": {mom.MOMENTUM_CODES: torch.uint8, mom.MOMENTUM_ABSMAX: torch.float32},
    "4bit": {mom.MOMENTUM_CODES: torch.uint8, mom.MOMENTUM_ABSMAX: torch.bfloat16},
    "bf16": {mom.MOMENTUM: torch.bfloat16},
    "fp32": {mom.MOMENTUM: torch.float32},
}


def _tensor_is_valid(param, grad, momentum, fmt, offset, block_size) -> bool:
    """The common case of :func:`check_tensors`, in as few operations as possible."""
    expected = _BUFFER_DTYPES.get(fmt)
    if expected is None:
        return False
    numel, device = param.numel(), param.device
    if (
        param.dtype not in _PARAM_DTYPES
        or (grad.dtype is not param.dtype and grad.dtype is not torch.float32)
        or grad.numel() != numel
        or grad.device != device
        or not (param.is_contiguous() and grad.is_contiguous())
    ):
        return False
    for key, dtype in expected.items():
        buffer = momentum.get(key)
        if buffer is None or buffer.dtype is not dtype or buffer.device != device or not buffer.is_contiguous():
            return False
        if buffer.numel() != _buffer_numel(key, fmt, numel, block_size):
            return False
    blocked = fmt in mom.QUANTIZED and offset % mom.absmax_block(fmt, block_size)
    return type(offset) is int and offset >= 0 and not blocked


def _buffer_numel(key: str, fmt: str, numel: int, block_size: int) -> int:
    if key == mom.MOMENTUM_ABSMAX:
        return quant.num_blocks(numel, mom.absmax_block(fmt, block_size))
    if fmt == "4bit":
        return quant.packed_size(numel)
    return numel


def check_tensors(backend: str, params, grads, momenta, formats, block_size: int, element_offsets=None) -> None:
    """ValueError unless the tensors are what the contract promises: dtypes, sizes, one device,
    contiguity. A fused kernel reads raw memory, so a wrong buffer (a bf16 absmax read as fp32)
    would read out of bounds instead of failing."""
    if not len(params) == len(grads) == len(momenta) == len(formats) or (
        element_offsets is not None and len(element_offsets) != len(params)
    ):
        raise ValueError(f'Invalid call of backend="{backend}": lists of different lengths')
    offsets = element_offsets or (0,) * len(params)
    for index, row in enumerate(zip(params, grads, momenta, formats, offsets, strict=True)):
        if not _tensor_is_valid(*row, block_size):
            _diagnose(f'backend="{backend}", tensor {index}', *row, block_size)


def _diagnose(where: str, param, grad, momentum, fmt, offset, block_size: int) -> None:
    """Raise the ValueError that says what is wrong with one tensor's arguments."""
    if param.dtype not in _PARAM_DTYPES or grad.dtype not in (param.dtype, torch.float32):
        raise ValueError(f"Invalid dtypes for {where}: param {param.dtype}, grad {grad.dtype}")
    if fmt not in _BUFFER_DTYPES:
        raise ValueError(f"Invalid momentum format for {where}: {fmt!r}")
    expected = _BUFFER_DTYPES[fmt]
    if not set(expected) <= set(momentum):
        raise ValueError(f"Invalid momentum buffers for {where}: {sorted(momentum)}, expected {sorted(expected)}")
    sizes = {key: _buffer_numel(key, fmt, param.numel(), block_size) for key in expected}
    for tensor, what, dtype, numel in [
        (grad, "grad", grad.dtype, param.numel()),
        *((momentum[key], key, expected[key], sizes[key]) for key in expected),
    ]:
        if tensor.dtype != dtype:
            raise ValueError(f"Invalid {what} for {where}: dtype {tensor.dtype}, expected {dtype}")
        if tensor.numel() != numel:
            raise ValueError(f"Invalid {what} for {where}: {tensor.numel()} elements, expected {numel}")
        if tensor.device != param.device or not tensor.is_contiguous():
            raise ValueError(f"Invalid {what} for {where}: must be contiguous, on the param's {param.device}")
    if not param.is_contiguous():
        raise ValueError(f"Invalid param for {where}: must be contiguous")
    raise ValueError(
        f"Invalid element offset for {where}: {offset!r} (a non-negative int; for 8-bit state "
        f"a multiple of block_size={block_size}, for 4-bit state of {quant.BLOCK_SIZE_4BIT})"
    )
