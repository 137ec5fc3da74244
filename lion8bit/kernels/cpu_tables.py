"""The tables the fused CPU kernel (``cpu_lion.cpp``) reads besides the tensors: the 8-bit
requantizer's binary-search levels, made from the spec's thresholds (``lion8bit/quant.py``)."""

from __future__ import annotations

import torch

from .. import quant

# The requantizer's binary-search levels (cpu_lion.cpp LEVEL_OFFSET, TOP): level k holds 2**k
# thresholds; levels 0-4 are padded to 16 floats; the top threshold sits in level 0's padding.
_LEVEL_OFFSETS = (0, 16, 32, 48, 64, 80, 112)
_TOP = 1
_LEVELS_SIZE = 176


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
