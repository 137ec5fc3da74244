"""Fused implementations of :func:`lion8bit.reference.reference_step`, one module per device family.

Every implementation has the signature of :func:`lion8bit.optimizer.torch_lion_step`:
``(params, grads, entries, formats, *, scalars, block_size, stochastic_rounding) -> None``,
updating params and state entries in place, with each entry's ``step`` already incremented.
Modules are imported lazily so that ``import lion8bit`` works without Triton installed.
"""

from __future__ import annotations

import importlib
import os

_MODULES = {"triton": ("triton_lion", "triton_lion_step"), "cpu": ("cpu_lion", "cpu_lion_step")}


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load(backend: str):
    """The step function of a fused backend; RuntimeError saying why if it cannot be used."""
    module_name, function_name = _MODULES[backend]
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
    return getattr(module, function_name)


def available(backend: str) -> bool:
    try:
        load(backend)
    except RuntimeError:
        return False
    return True
