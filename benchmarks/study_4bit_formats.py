"""The 4-bit momentum formats of the study (docs/4bit-study.md) and a Lion that stores through them.

Nothing here is part of the ``lion8bit`` package: it is the study's own simulation, written so
that each candidate format can be dropped into an otherwise exact Lion.

A format is a sorted map of 16 fp32 values in [-1, 1] (the 4-bit codes), a block size, the dtype
of the per-block absmax (fp32, or bf16 rounded up so that no normalized value exceeds 1) and a
rounding rule. One block of the flattened tensor is stored as 16-level codes of
``value / absmax`` plus the absmax, so the state costs 0.5 byte per element plus the absmax
bytes / block size.

:class:`FormatLion` is Lion exactly as ``lion_pytorch.Lion`` computes it (the same fp32
operations in the same order; ``lion8bit/reference.py`` is the spec they agree with), except that
the momentum of each tensor of at least ``min_size`` elements is decoded from its format before
the step and encoded back after it. With no format it is fp32 Lion, bit for bit (the study
checks this against ``lion_pytorch.Lion`` and ``lion8bit.Lion(state="fp32")``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from lion8bit import quant

# ---------------------------------------------------------------------------------------------
# maps: 16 sorted fp32 values (8-bit: 256), the codes' meaning in units of the block's absmax


def dynamic_exponent_map(total_bits: int = 4, max_exponent_bits: int = 3) -> torch.Tensor:
    """The signed dynamic-exponent map (arXiv 2110.02861 §2), as bitsandbytes builds it.

    Decade i = 0 .. max_exponent_bits-1 covers [0.1, 1] * 10**(i - max_exponent_bits + 1) with
    2**(i + total_bits - 1 - max_exponent_bits) values at the midpoints of an even split of
    [0.1, 1], each computed in fp32; then both signs, 0 and +1.0 (so the negative side stops short
    of -1). For 4 bits: 0, +-0.0055, +-0.0325, +-0.0775, +-0.2125, +-0.4375, +-0.6625, +-0.8875,
    +1 (bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4), whose 16
    non-padding values the study checks against these).
    """
    value_bits = total_bits - 1
    extra = 2 ** (value_bits - max_exponent_bits) - 1  # codes of the last decade beyond the split
    positive = []
    for decade in range(max_exponent_bits):
        edges = torch.linspace(0.1, 1.0, 2 ** (decade + value_bits - max_exponent_bits) + 1)
        positive.append((edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (decade - max_exponent_bits + 1))
    if extra > 0:
        edges = torch.linspace(0.1, 1.0, extra + 1)
        positive.append((edges[:-1] + edges[1:]) / 2.0)
    magnitudes = torch.cat(positive)
    values = torch.cat([-magnitudes, magnitudes, torch.tensor([0.0, 1.0])])
    return values.sort().values


def mirrored(magnitudes) -> torch.Tensor:
    """+-magnitudes (8 of them for 16 codes): a symmetric map without 0."""
    m = torch.as_tensor(magnitudes, dtype=torch.float64).to(torch.float32)
    return torch.cat([-m, m]).sort().values


def _positive_de() -> list[float]:
    de = dynamic_exponent_map()
    return de[de > 0].tolist()


MAPS: dict[str, torch.Tensor] = {
    # the 4-bit optimizers paper / torchao first-moment map: 0, 7 negative, 8 positive (+1)
    "de": dynamic_exponent_map(),
    # the same magnitudes on both sides, +-1 included, no 0: a negative block maximum is stored
    # exactly (the DE map stores it as -0.8875, 11% short)
    "de-sym": mirrored(_positive_de()),
    # uniform spacing 2/15, no 0: +-1/15, +-3/15, ..., +-1
    "linear": mirrored([(2 * k - 1) / 15 for k in range(1, 9)]),
    # uniform spacing 1/7 with 0 (int4 as symmetric quantizers use it): 15 values, one code unused
    "linear0": torch.tensor([k / 7 for k in range(-7, 8)] + [1.0], dtype=torch.float64).float().unique(),
    # square-root companding: uniform in sqrt|x|, +-((2k-1)/15)**2: 0.0044 ... 1
    "sqrt": mirrored([((2 * k - 1) / 15) ** 2 for k in range(1, 9)]),
    # logarithmic companding: +-2**-j, j = 0..7 (a sign and a 3-bit exponent): 0.0078 ... 1
    "log": mirrored([2.0**-j for j in range(8)]),
    # FP4 E2M1 (the OCP MX element type) scaled to 1: 0, +-1/12, 1/6, 1/4, 1/3, 1/2, 2/3, 1
    "fp4": torch.tensor(
        [s * v / 6 for s in (-1, 1) for v in (0.5, 1, 1.5, 2, 3, 4, 6)] + [0.0], dtype=torch.float64
    )
    .float()
    .sort()
    .values,
}
MAP_DESCRIPTIONS = {
    "de": "signed dynamic exponent (bitsandbytes / torchao 4-bit): 0, ±0.0055, ±0.0325, ±0.0775, "
    "±0.2125, ±0.4375, ±0.6625, ±0.8875, +1",
    "de-sym": "DE magnitudes mirrored, ±1 included, no 0: ±{0.0055, 0.0325, 0.0775, 0.2125, 0.4375, "
    "0.6625, 0.8875, 1}",
    "linear": "uniform, no 0: ±(2k-1)/15, k = 1..8",
    "linear0": "uniform with 0: k/7, k = -7..7 (15 values)",
    "sqrt": "square-root companded: ±((2k-1)/15)², k = 1..8 (0.0044 ... 1)",
    "log": "logarithmic: ±2^-j, j = 0..7 (0.0078 ... 1)",
    "fp4": "FP4 E2M1 / 6: 0, ±{1/12, 1/6, 1/4, 1/3, 1/2, 2/3, 1} (15 values)",
}


# ---------------------------------------------------------------------------------------------
# rounding to a map


def nearest_codes(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (ties toward zero); a non-zero x is never given the level 0.

    The sign rule is the 8-bit format's (lion8bit/quant.py): where the nearest level is 0.0 and
    x is not, the smallest level of x's sign is taken, so quantization never erases the sign of a
    momentum element. For the 8-bit codebook this is exactly ``lion8bit.quant.nearest_codes``
    (the study checks it through a whole optimizer run).
    """
    x64 = x.double()  # exact, and so are the midpoints of two fp32 levels
    thresholds = _thresholds(levels)
    below = torch.searchsorted(thresholds, x64)  # thresholds strictly below x
    # At a tie x == threshold, "below" is the lower neighbour: toward zero for x > 0; for x < 0
    # the upper one is.
    tie = thresholds[below.clamp(max=len(thresholds) - 1)] == x64
    index = torch.where((x64 < 0) & tie, below + 1, below)
    zero = (levels == 0).nonzero()
    if len(zero):
        z = int(zero[0])
        index = torch.where((index == z) & (x64 > 0), z + 1, index)
        index = torch.where((index == z) & (x64 < 0), z - 1, index)
    return index


@functools.lru_cache(maxsize=None)
def _thresholds_of(key: tuple) -> torch.Tensor:
    levels = torch.tensor(key, dtype=torch.float64)
    return (levels[:-1] + levels[1:]) / 2


def _thresholds(levels: torch.Tensor) -> torch.Tensor:
    return _thresholds_of(tuple(levels.tolist()))


def random_bits(key: int, numel: int) -> torch.Tensor:
    """``lion8bit.quant.random_bits(key, numel, "cpu")`` (start 0, numel < 2**32), 20x faster.

    The same lowbias32 hash in numpy's native wrapping uint32 arithmetic instead of int64
    halves; the study checks that the two agree.
    """
    x = np.arange(numel, dtype=np.uint32) ^ np.uint32(quant.element_key(key, 0))
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x ^= x >> np.uint32(shift)
        x *= np.uint32(multiplier)
    x ^= x >> np.uint32(16)
    return torch.from_numpy(x.astype(np.int64))


def stochastic_codes(x: torch.Tensor, levels: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Unbiased rounding between the two levels around x, driven by uint32 ``bits`` (int64).

    With lo <= x <= hi the neighbouring levels, the code of hi is taken iff
    u < (x - lo) / (hi - lo), in fp32 (two subtractions and a correctly rounded division), where
    u = (bits >> 8) * 2**-24 is exact in fp32. So E[decoded] = x up to that fp32 rounding; a value
    on a level stays there; values beyond the map's ends take the end level.
    """
    x = x.float()
    hi = torch.searchsorted(levels, x, right=False).clamp(1, len(levels) - 1)
    lo = hi - 1
    low, high = levels[lo], levels[hi]
    fraction = (x - low) / (high - low)
    uniform = (bits >> 8).to(torch.float32) * 2.0**-24
    index = torch.where(uniform < fraction, hi, lo)
    index = torch.where(x <= levels[0], 0, index)
    return torch.where(x >= levels[-1], len(levels) - 1, index)


# ---------------------------------------------------------------------------------------------
# the block format


def round_up_to_bf16(values: torch.Tensor) -> torch.Tensor:
    """Non-negative fp32 -> the smallest bf16 >= it (as fp32): an absmax no value exceeds."""
    pattern = values.float().view(torch.int32).to(torch.int64)
    up = torch.where(pattern & 0xFFFF != 0, (pattern | 0xFFFF) + 1, pattern)
    return quant._to_int32_bits(up & 0xFFFFFFFF).view(torch.float32)


def grid_codes(blocks: torch.Tensor, absmax: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding on the grid of the uniform "linear" map, whose level c sits at
    t = 7.5 * (x + 1) = c: no search and no division per element.

    t = (m * scale) * (7.5 / (absmax * scale)) + 7.5 for the values m of ``blocks`` (one row
    per block; the elements past the last are dropped), in fp32 with the quotient correctly
    rounded (0 for an absmax that is not > 0), scale = 2**64 for an absmax below 2**-64 (where
    7.5 * 2**24 / absmax would overflow fp32), else 1. t is clamped to [0, 15] with NaN to 0;
    then with f = floor(t) the code is f + 1 iff u < t - f (exact), u = (bits >> 8) * 2**-24.
    E[code] = t up to t's fp32 roundings.
    """
    scale = torch.where(absmax < 2.0**-64, 2.0**64, 1.0)
    numerator = torch.full_like(absmax, 7.5)  # a tensor: float / tensor is reciprocal * float in torch
    grid_scale = torch.where(absmax > 0, numerator / (absmax * scale), torch.zeros_like(absmax))
    t = ((blocks * scale[:, None]) * grid_scale[:, None]).reshape(-1)[: bits.numel()] + 7.5
    t = torch.where(t > 0, t, 0.0).clamp(max=15.0)
    floor = t.floor()
    uniform = (bits >> 8).to(torch.float32) * 2.0**-24
    return (floor + (uniform < t - floor).float()).long()


ABSMAX_BYTES = {"fp32": 4, "bf16": 2}
# "srgrid": "sr" by grid_codes, for the "linear" map only (the rule state="4bit" ships).
ROUNDINGS = ("nearest", "sr", "srgrid")
STOCHASTIC = ("sr", "srgrid")


@dataclass(frozen=True)
class Format:
    """One candidate: map, block size, absmax dtype, rounding."""

    map_name: str
    block_size: int
    absmax: str = "fp32"
    rounding: str = "nearest"

    def __post_init__(self):
        if self.map_name not in MAPS and self.map_name != "8bit":
            raise ValueError(f"Invalid map: {self.map_name!r} (choose from {', '.join(MAPS)}, 8bit)")
        if self.absmax not in ABSMAX_BYTES:
            raise ValueError(f"Invalid absmax dtype: {self.absmax!r} (choose from fp32, bf16)")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"Invalid rounding: {self.rounding!r} (choose from {', '.join(ROUNDINGS)})")
        if self.block_size < 1:
            raise ValueError(f"Invalid block size: {self.block_size}")
        if self.rounding == "srgrid" and self.map_name != "linear":
            raise ValueError(f"Invalid rounding: srgrid needs the linear map, not {self.map_name!r}")

    @property
    def name(self) -> str:
        return f"{self.map_name}-{self.block_size}-{self.absmax}-{self.rounding}"

    @property
    def levels(self) -> torch.Tensor:
        return quant.codebook() if self.map_name == "8bit" else MAPS[self.map_name]

    @property
    def bits(self) -> int:
        return math.ceil(math.log2(len(self.levels)))  # 15-level maps take 4 bits too

    @property
    def bytes_per_param(self) -> float:
        """State bytes per element of a large tensor: the codes plus the absmax share."""
        return self.bits / 8 + ABSMAX_BYTES[self.absmax] / self.block_size

    def nbytes(self, numel: int) -> int:
        """Bytes of one tensor's state: codes packed (two 4-bit codes per byte) and the absmax."""
        return -(-numel * self.bits // 8) + ABSMAX_BYTES[self.absmax] * quant.num_blocks(
            numel, self.block_size
        )

    @classmethod
    def parse(cls, name: str) -> "Format":
        """Inverse of :attr:`name`: "map-block-absmax-rounding" (the map name may hold a dash)."""
        head, block, absmax, rounding = name.rsplit("-", 3)
        return cls(head, int(block), absmax, rounding)

    def encode(self, values: torch.Tensor, bits: torch.Tensor | None = None):
        """fp32 values -> (uint8 code indices, one per element; fp32 absmax per block); ``bits`` for "sr" and "srgrid".

        normalized = value * (1 / absmax) in fp32, as lion8bit/quant.py does for 8 bits (with
        its power-of-two rescale of subnormal blocks). An all-zero block has absmax 0.
        """
        flat = values.reshape(-1).float()
        absmax = quant.blockwise_absmax(flat, self.block_size)
        if self.absmax == "bf16":
            absmax = round_up_to_bf16(absmax)
        scale = torch.where(absmax < quant.SUBNORMAL_ABSMAX, quant.SUBNORMAL_SCALE, 1.0)
        inverse = torch.where(absmax > 0, torch.reciprocal(absmax * scale), torch.zeros_like(absmax))
        blocks = quant._as_blocks(flat, self.block_size) * scale[:, None]
        normalized = (blocks * inverse[:, None]).reshape(-1)[: flat.numel()]
        if self.rounding == "nearest":
            codes = nearest_codes(normalized, self.levels)
        elif bits is None:
            raise ValueError("stochastic rounding needs random bits")
        elif self.rounding == "srgrid":
            codes = grid_codes(quant._as_blocks(flat, self.block_size), absmax, bits)
        else:
            codes = stochastic_codes(normalized, self.levels, bits)
        return codes.to(torch.uint8), absmax

    def decode(self, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """Code indices + absmax -> fp32 values (level * absmax, one fp32 multiply)."""
        flat = self.levels[codes.long()]
        scaled = quant._as_blocks(flat, self.block_size) * absmax[:, None]
        return scaled.reshape(-1)[: codes.numel()]


# ---------------------------------------------------------------------------------------------
# Lion with the momentum stored in a format


class FormatLion(torch.optim.Optimizer):
    """Lion (lion_pytorch.Lion's arithmetic) whose momentum is stored in ``fmt`` (None: fp32).

    Tensors under ``min_size`` elements keep fp32 momentum (as lion8bit's ``min_8bit_size``).
    Stochastic rounding draws lion8bit's counter-based bits: key
    ``quant.rounding_key(seed, step, quant.STREAM_MOMENTUM)`` with the tensor's seed
    ``quant.mix32(index)`` (index: the tensor's position over all groups) and its 1-based step,
    then ``quant.random_bits(key, numel)`` for flat element indices 0 .. numel-1 — the same
    bits lion8bit's bf16 momentum rounding draws.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, fmt=None, min_size=4096):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.fmt = fmt
        self.min_size = min_size

    def _entry(self, index: int, param: torch.Tensor) -> dict:
        entry = self.state[param]
        if not entry:
            entry["step"] = 0
            entry["seed"] = quant.mix32(index)
            if self.fmt is None or param.numel() < self.min_size:
                entry["momentum"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            else:
                codes, absmax = self.fmt.encode(
                    torch.zeros(param.numel()), torch.zeros(param.numel(), dtype=torch.int64)
                )
                entry["codes"], entry["absmax"] = codes, absmax
        return entry

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                entry = self._entry(index, param)
                entry["step"] += 1
                grad = param.grad
                quantized = "codes" in entry
                if quantized:
                    momentum = self.fmt.decode(entry["codes"], entry["absmax"]).view_as(param)
                else:
                    momentum = entry["momentum"]
                # lion_pytorch 0.2.5 update_fn, operation for operation
                param.mul_(1.0 - lr * wd)
                update = momentum.clone().mul_(beta1).add(grad, alpha=1.0 - beta1).sign_()
                param.add_(update, alpha=-lr)
                momentum.mul_(beta2).add_(grad, alpha=1.0 - beta2)
                if quantized:
                    bits = None
                    if self.fmt.rounding in STOCHASTIC:
                        key = quant.rounding_key(entry["seed"], entry["step"], quant.STREAM_MOMENTUM)
                        bits = random_bits(key, param.numel())
                    entry["codes"], entry["absmax"] = self.fmt.encode(momentum, bits)
        return loss

    def state_nbytes(self) -> int:
        """Bytes the momentum would take stored as specified (codes packed, absmax, fp32 rest)."""
        total = 0
        for entry in self.state.values():
            if "codes" in entry:
                total += self.fmt.nbytes(entry["codes"].numel())
            else:
                total += entry["momentum"].nbytes
        return total
