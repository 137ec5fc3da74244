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

import ctypes
import functools

import torch

from .. import momentum as mom
from .. import quant
from . import UnavailableBackend, check_tensors, cpu_build

# Descriptor row of one tensor, and the codes of cpu_lion.cpp's enums (same order).
_FIELDS = 11
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


def _scalars(scalars) -> torch.Tensor:
    # Rounded to fp32 once, as torch rounds a Python float operand of an fp32 tensor op.
    values = [
        scalars.beta1, scalars.one_minus_beta1, scalars.beta2, scalars.one_minus_beta2,
        scalars.decay, scalars.lr,
    ]
    return torch.tensor(values, dtype=torch.float32)


def _flags(scalars, stochastic_rounding: bool) -> int:
    flags = _MAXIMIZE if scalars.maximize else 0
    if scalars.cautious and scalars.cautious_factor == 0.0:
        flags |= _MASKED_DONT_MOVE
    if scalars.cautious_weight_decay:
        flags |= _CAUTIOUS_WEIGHT_DECAY
    if stochastic_rounding:
        flags |= _STOCHASTIC
    return flags


def _descriptors(params, grads, momenta, formats, rounding_keys, element_offsets=None) -> tuple[torch.Tensor, list[int]]:
    """(int64 descriptor rows of the non-empty tensors, their positions in the lists)."""
    rows, positions = [], []
    for index, (param, grad, momentum, fmt) in enumerate(zip(params, grads, momenta, formats)):
        if param.numel() == 0:
            continue
        if fmt == "8bit":
            state, absmax = momentum[mom.MOMENTUM_CODES], momentum[mom.MOMENTUM_ABSMAX].data_ptr()
        else:
            state, absmax = momentum[mom.MOMENTUM], 0
        param_key, momentum_key = (_NO_KEY, _NO_KEY) if rounding_keys is None else rounding_keys[index]
        rows.append([
            param.data_ptr(), grad.data_ptr(), state.data_ptr(), absmax, param.numel(),
            _DTYPES[param.dtype], _DTYPES[grad.dtype], _FORMATS[fmt], param_key, momentum_key,
            0 if element_offsets is None else element_offsets[index],
        ])
        positions.append(index)
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, _FIELDS), positions


class CpuBackend:
    name = "cpu"

    def __init__(self, library: ctypes.CDLL):
        self._library = library

    def device_error(self, device: torch.device, what: str) -> str | None:
        if device.type != "cpu":
            return f'backend="cpu" runs on CPU tensors, got {what} on {device}'
        return None

    def _check(self, params, grads, momenta, formats, block_size, element_offsets=None) -> None:
        check_tensors(self.name, params, grads, momenta, formats, block_size, element_offsets)
        for param in params:
            error = self.device_error(param.device, "a parameter")
            if error:
                raise ValueError(error)

    def aligned_counts(self, params, grads, momenta, formats, *, scalars, block_size):
        self._check(params, grads, momenta, formats, block_size)
        descriptors, positions = _descriptors(params, grads, momenta, formats, None)
        counts = torch.zeros(len(params), dtype=torch.int64)
        if positions:
            found = torch.zeros(len(positions), dtype=torch.int64)
            step_scalars = _scalars(scalars)  # referenced until the call returns
            self._library.lion8bit_cpu_aligned_counts(
                _pointer(descriptors, cpu_build.INT64_P), len(positions),
                _pointer(step_scalars, cpu_build.FLOAT_P), _flags(scalars, False), block_size,
                _pointer(quant.codebook(), cpu_build.FLOAT_P), _pointer(found, cpu_build.INT64_P),
                torch.get_num_threads(),
            )
            counts[positions] = found
        return list(counts.unbind())

    def lion_step(
        self, params, grads, momenta, formats, *, scalars, block_size, rounding_keys, cautious_steps, skip,
        element_offsets=None,
    ):
        if skip is not None:
            raise ValueError('Invalid skip for backend="cpu": CPU steps are skipped by the caller')
        self._check(params, grads, momenta, formats, block_size, element_offsets)
        descriptors, positions = _descriptors(params, grads, momenta, formats, rounding_keys, element_offsets)
        if not positions:
            return
        steps = None
        if cautious_steps is not None:
            steps = torch.stack([cautious_steps[i] for i in positions]).float().contiguous()
        step_scalars = _scalars(scalars)  # referenced until the call returns
        self._library.lion8bit_cpu_step(
            _pointer(descriptors, cpu_build.INT64_P), len(positions),
            None if steps is None else _pointer(steps, cpu_build.FLOAT_P),
            _pointer(step_scalars, cpu_build.FLOAT_P), _flags(scalars, rounding_keys is not None),
            block_size, _pointer(quant.codebook(), cpu_build.FLOAT_P),
            _pointer(requantizer_levels(), cpu_build.FLOAT_P), torch.get_num_threads(),
        )


def load() -> CpuBackend:
    try:
        return CpuBackend(cpu_build.library())
    except cpu_build.BuildError as error:
        raise UnavailableBackend(
            f'backend="cpu" needs its C++ library, which could not be built: {error}. '
            'Install a C++ compiler (or set CXX), or use backend="auto" / "torch"'
        ) from None
