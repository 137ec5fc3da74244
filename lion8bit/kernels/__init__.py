"""Fused implementations of the reference step, one module per device family.

A backend is a pair of functions with the signatures of the reference backend in
:mod:`lion8bit.optimizer` (:func:`~lion8bit.optimizer.torch_aligned_counts`,
:func:`~lion8bit.optimizer.torch_lion_step`):

- ``aligned_counts(params, grads, entries, formats, *, scalars, block_size) -> list[Tensor]``:
  per tensor, the int64 0-dim count of elements whose update sign agrees with the gradient (the
  cautious pre-pass; reads the old momentum and the grad only). Called only with caution on.
- ``lion_step(params, grads, entries, formats, *, scalars, block_size, stochastic_rounding,
  cautious_steps, skip=None) -> None``: the whole update, in place on params and state entries; each
  entry's ``step`` is already incremented; ``cautious_steps`` is a list of [2] fp32 tensors (the
  step sizes where aligned / not) or None without caution; ``skip`` (optional, a bool 0-dim
  tensor on the params' device, only ever given for non-CPU devices) leaves everything
  unchanged when true, decided on the device (no host synchronisation).

Backends see plain tensors only: for a sharded (DTensor) param the optimizer passes the local
shard, its local grad, and a per-step dict of the local state tensors (8-bit absmax trimmed to
the shard's blocks). Write into those tensors; never put new tensors into an entry, or the
update is lost for sharded params.

Modules are imported lazily, so ``import lion8bit`` works without Triton installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Callable, NamedTuple

import torch

# backend -> (module in this package, prefix of its two functions)
_MODULES = {"triton": ("triton_lion", "triton"), "cpu": ("cpu_lion", "cpu")}


class Backend(NamedTuple):
    aligned_counts: Callable
    lion_step: Callable


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def load(backend: str) -> Backend:
    """The functions of a fused backend; RuntimeError saying why if it cannot be used."""
    module_name, prefix = _MODULES[backend]
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            'backend="triton" needs the triton package (pip install triton); '
            'use backend="auto" or "torch" without it'
        )
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{module_name}":
            raise
        raise RuntimeError(f"backend={backend!r} is not available in this build") from None
    return Backend(getattr(module, f"{prefix}_aligned_counts"), getattr(module, f"{prefix}_lion_step"))


def check_device(backend: str, device: torch.device, what: str, *, interpreted: bool | None = None) -> None:
    """RuntimeError unless ``backend`` can update tensors on ``device`` (the optimizer checks
    before a step changes anything; the launchers check again). For "triton", ``interpreted``
    says whether its kernels were decorated for the interpreter (default: the loaded module's
    ``INTERPRETED``; triton reads TRITON_INTERPRET in @triton.jit, not at launch)."""
    if backend == "cpu" and device.type != "cpu":
        raise RuntimeError(f'backend="cpu" runs on CPU tensors, got {what} on {device}')
    if interpreted is None and backend == "triton" and device.type == "cpu":
        interpreted = importlib.import_module(f"{__name__}.triton_lion").INTERPRETED
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and interpreted):
        raise RuntimeError(
            f'backend="triton" runs on CUDA tensors, got {what} on {device}; use backend="auto" '
            'or "torch", or set TRITON_INTERPRET=1 before lion8bit imports its Triton kernels to '
            "run them in Triton's CPU interpreter (slow, for tests)"
        )


@functools.lru_cache(maxsize=None)
def available(backend: str) -> bool:
    try:
        load(backend)
    except RuntimeError:
        return False
    return True
