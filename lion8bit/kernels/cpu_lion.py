"""The fused CPU Lion step: ``cpu_lion.cpp`` (the kernels) and its launcher.

One call per step handles every tensor of a group: each element's param, grad and momentum are
read once and written once, in fp32 and in the reference's exact operation order
(``lion8bit/reference.py``), so params, codes, absmax and bf16 momentum are bit-identical to it,
stochastic rounding included. Work is split across ``torch.get_num_threads()`` threads in chunks
of whole absmax blocks; nothing but non-contiguous tensors is copied, so a step needs no memory
beyond the params, grads and state.

The library is built once per machine (:mod:`lion8bit.kernels.cpu_build`); without a compiler
both functions warn once and run the reference (``backend="torch"``) instead.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch.autograd.graph import increment_version

from .. import quant
from .. import momentum as mom
from ..optimizer import torch_aligned_counts, torch_lion_step
from ..reference import LionScalars
from . import cpu_build

# Descriptor row of one tensor, and the codes of cpu_lion.cpp's enums (same order).
_FIELDS = 10
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FORMATS = {"8bit": 0, "bf16": 1, "fp32": 2}
_MAXIMIZE, _MASKED_DONT_MOVE, _CAUTIOUS_WEIGHT_DECAY, _STOCHASTIC = 1, 2, 4, 8
_NO_KEY = -1

# The requantizer's binary-search levels (cpu_lion.cpp LEVEL_OFFSET, TOP): level k holds 2**k
# thresholds; levels 0-4 are padded to 16 floats; the top threshold sits in level 0's padding.
_LEVEL_OFFSETS = (0, 16, 32, 48, 64, 80, 112)
_TOP = 1
_LEVELS_SIZE = 176


@functools.lru_cache(maxsize=None)
def requantizer_levels() -> torch.Tensor:
    """The 128 positive decision thresholds, rounded down to fp32, as binary-search levels.

    For fp32 a and a float64 threshold t, t < a iff rounddown_fp32(t) < a, so a search on the
    rounded-down thresholds counts the exact ones (quant.decision_thresholds) below |x|. With
    n's top k bits known at level k, the next comparison is with threshold n * 2**(7-k) +
    2**(6-k) - 1 (of 0..127): level k lists those for each n. The 7 levels count thresholds
    0..126; the last comparison is with threshold 127.
    """
    thresholds = quant.decision_thresholds()
    negative, positive = thresholds[: quant.ZERO_CODE], thresholds[quant.ZERO_CODE :]
    if positive.numel() != 2 ** len(_LEVEL_OFFSETS) or not torch.equal(
        -negative.flip(0), positive[: negative.numel()]
    ):
        raise AssertionError("the kernel needs 128 positive thresholds, symmetric below 1.0")
    down = positive.float()
    down = torch.where(down.double() > positive, torch.nextafter(down, torch.tensor(-1.0)), down)
    levels = torch.zeros(_LEVELS_SIZE, dtype=torch.float32)
    for k, offset in enumerate(_LEVEL_OFFSETS):
        stride = 2 ** (len(_LEVEL_OFFSETS) - k)
        levels[offset : offset + 2**k] = down[stride // 2 - 1 :: stride]
    levels[_TOP] = down[-1]
    return levels


def _pointer(tensor: torch.Tensor, kind):
    return ctypes.cast(tensor.data_ptr(), kind)


def _scalars(scalars: LionScalars) -> torch.Tensor:
    # Rounded to fp32 once, as torch rounds a Python float operand of an fp32 tensor op.
    values = [
        scalars.beta1, scalars.one_minus_beta1, scalars.beta2, scalars.one_minus_beta2,
        scalars.decay, scalars.lr,
    ]
    return torch.tensor(values, dtype=torch.float32)


def _flags(scalars: LionScalars, stochastic_rounding: bool) -> int:
    flags = _MAXIMIZE if scalars.maximize else 0
    if scalars.cautious and scalars.cautious_factor == 0.0:
        flags |= _MASKED_DONT_MOVE
    if scalars.cautious_weight_decay:
        flags |= _CAUTIOUS_WEIGHT_DECAY
    if stochastic_rounding:
        flags |= _STOCHASTIC
    return flags


class _Batch:
    """Descriptor rows of the non-empty tensors; holds every tensor the kernel touches alive.

    Non-contiguous tensors are handled through contiguous copies (written ones are copied back
    by :meth:`finish`): the kernel indexes the flattened tensor, as the reference does.
    """

    def __init__(self, params, grads, entries, formats, stochastic_rounding: bool, write: bool):
        self.indices, self.alive, self.write_back = [], [], []
        rows = []
        for index, (param, grad, entry, fmt) in enumerate(zip(params, grads, entries, formats)):
            if param.device.type != "cpu" or grad.device.type != "cpu":
                raise ValueError(f'Invalid device for backend="cpu": {param.device}')
            if param.dtype not in _DTYPES or grad.dtype not in _DTYPES:
                raise ValueError(f'Invalid dtype for backend="cpu": param {param.dtype}, grad {grad.dtype}')
            if param.numel() == 0:
                continue
            if fmt == "8bit":
                momentum = self._dense(entry[mom.MOMENTUM_CODES], write)
                absmax = self._dense(entry[mom.MOMENTUM_ABSMAX], write).data_ptr()
            else:
                momentum, absmax = self._dense(entry[mom.MOMENTUM], write), 0
            param_key = momentum_key = _NO_KEY
            if stochastic_rounding:
                seed, step = entry[mom.SR_SEED], entry[mom.STEP]
                param_key = quant.rounding_key(seed, step, quant.STREAM_PARAM)
                momentum_key = quant.rounding_key(seed, step, quant.STREAM_MOMENTUM)
            rows.append([
                self._dense(param, write).data_ptr(), self._dense(grad, False).data_ptr(),
                momentum.data_ptr(), absmax, param.numel(), _DTYPES[param.dtype],
                _DTYPES[grad.dtype], _FORMATS[fmt], param_key, momentum_key,
            ])
            self.indices.append(index)
        self.descriptors = torch.tensor(rows, dtype=torch.int64).reshape(-1, _FIELDS)

    def _dense(self, tensor: torch.Tensor, write: bool) -> torch.Tensor:
        if tensor.is_contiguous():
            return tensor
        dense = tensor.contiguous()
        self.alive.append(dense)
        if write:
            self.write_back.append((tensor, dense))
        return dense

    def finish(self) -> None:
        for tensor, dense in self.write_back:
            tensor.copy_(dense)


def cpu_aligned_counts(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    entries: list[dict],
    formats: list[str],
    *,
    scalars: LionScalars,
    block_size: int,
) -> list[torch.Tensor]:
    """Per tensor, the int64 0-dim count of elements whose update agrees with the gradient."""
    library = cpu_build.library()
    if library is None:
        return torch_aligned_counts(
            params, grads, entries, formats, scalars=scalars, block_size=block_size
        )
    batch = _Batch(params, grads, entries, formats, stochastic_rounding=False, write=False)
    counts = torch.zeros(len(params), dtype=torch.int64)
    found = torch.zeros(len(batch.indices), dtype=torch.int64)
    if batch.indices:
        step_scalars = _scalars(scalars)  # referenced until the call returns
        library.lion8bit_cpu_aligned_counts(
            _pointer(batch.descriptors, cpu_build.INT64_P), len(batch.indices),
            _pointer(step_scalars, cpu_build.FLOAT_P), _flags(scalars, False), block_size,
            _pointer(quant.codebook(), cpu_build.FLOAT_P), _pointer(found, cpu_build.INT64_P),
            torch.get_num_threads(),
        )
        counts[batch.indices] = found
    return list(counts.unbind())


def cpu_lion_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    entries: list[dict],
    formats: list[str],
    *,
    scalars: LionScalars,
    block_size: int,
    stochastic_rounding: bool,
    cautious_steps: list[torch.Tensor] | None,
    skip: torch.Tensor | None = None,
) -> None:
    """The whole update, in place on params and state entries (one library call); nothing
    changes when ``skip`` (a CPU flag, read on the host: no device to wait for) is true."""
    if skip is not None and bool(skip):
        return
    library = cpu_build.library()
    if library is None:
        torch_lion_step(
            params, grads, entries, formats, scalars=scalars, block_size=block_size,
            stochastic_rounding=stochastic_rounding, cautious_steps=cautious_steps,
        )
        return
    batch = _Batch(params, grads, entries, formats, stochastic_rounding, write=True)
    if not batch.indices:
        return
    steps = None
    if cautious_steps is not None:
        steps = torch.stack([cautious_steps[i] for i in batch.indices]).float().contiguous()
    step_scalars = _scalars(scalars)  # referenced until the call returns
    library.lion8bit_cpu_step(
        _pointer(batch.descriptors, cpu_build.INT64_P), len(batch.indices),
        None if steps is None else _pointer(steps, cpu_build.FLOAT_P),
        _pointer(step_scalars, cpu_build.FLOAT_P), _flags(scalars, stochastic_rounding),
        block_size, _pointer(quant.codebook(), cpu_build.FLOAT_P),
        _pointer(requantizer_levels(), cpu_build.FLOAT_P), torch.get_num_threads(),
    )
    batch.finish()
    for param in params:
        increment_version(param)
