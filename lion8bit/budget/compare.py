"""The comparison: bytes per optimizer for one model, and what fits on each GPU size."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .. import momentum as mom
from .. import quant
from . import report
from .models import model_shapes
from .rules import DEFAULT_OPTIMIZERS, DEFAULT_RULES, GIB, OPTIMIZERS, PRECISIONS, Rules
from .shapes import CATALOG, ModelShapes, catalog_model, dense_transformer


@dataclass(frozen=True)
class Row:
    """One optimizer's bytes on the GPU; ``paged`` bytes live in CUDA managed memory."""

    optimizer: str
    label: str
    state_format: str
    weights: int
    grads: int
    state: int  # on the device (paged rows: small tensors' + the largest paged one's, see budget_row)
    paged: int  # managed memory: on the device while there is room, evicted to host RAM
    n_params: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state

    @property
    def bytes_per_param(self) -> float:
        return self.total / self.n_params if self.n_params else 0.0


def budget_row(
    shapes: ModelShapes, optimizer: str, dtype: str = "mixed", rules: Rules = DEFAULT_RULES
) -> Row:
    """Bytes of weights, grads and optimizer state of ``shapes`` trained with ``optimizer``.

    Frozen tensors (``trainable=False``) count as weights only. For a paged optimizer the
    momentum of every tensor of at least ``lion8bit.momentum.PAGED_MIN_NUMEL`` elements is in ``paged``;
    ``state`` holds the smaller tensors' momentum plus the largest paged tensor's: the step
    updates a paged group one tensor at a time, so that much has to be resident at once (a
    floor: the driver decides what else stays).
    """
    rule, precision = OPTIMIZERS[optimizer], PRECISIONS[dtype]
    trainable = [p.numel for p in shapes.params if p.trainable]
    frozen = shapes.n_params - sum(trainable)
    per_tensor = [rule.tensor_nbytes(n, precision.optimizer_dtype, rules) for n in trainable]
    state = sum(per_tensor) + rule.shared_nbytes(trainable, rules)
    paged = 0
    if rule.paged:
        in_managed = [b for n, b in zip(trainable, per_tensor, strict=True) if n >= mom.PAGED_MIN_NUMEL]
        paged = sum(in_managed)
        state = state - paged + max(in_managed, default=0)
    return Row(
        optimizer=optimizer,
        label=rule.label,
        state_format=rule.describe(precision.optimizer_dtype, rules),
        weights=sum(trainable) * (precision.weights + precision.master) + frozen * precision.weights,
        grads=sum(trainable) * precision.grads,
        state=state,
        paged=paged,
        n_params=shapes.n_params,
    )


@dataclass(frozen=True)
class Fit:
    """One optimizer on one GPU size: does the model fit, and the largest ones that do."""

    optimizer: str
    fits: bool
    free: int  # bytes left (negative: missing) after weights + grads + state + activations
    largest_catalog_model: str | None
    largest_catalog_params: int
    largest_dense_layers: int  # 0: not even one layer fits
    largest_dense_params: int


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` returns: rows per optimizer and the fits per GPU size."""

    model: ModelShapes
    dtype: str
    rules: Rules
    rows: tuple[Row, ...]
    gpu_gb: tuple[float, ...]
    activation_gb: float
    fits: dict[float, tuple[Fit, ...]]

    def row(self, optimizer: str) -> Row:
        return next(r for r in self.rows if r.optimizer == optimizer)

    def to_dict(self) -> dict:
        """Everything as plain JSON values; bytes as exact ints."""
        return report.comparison_dict(self)

    def format(self) -> str:
        """The readable table the CLI prints."""
        return report.comparison_text(self)

    __str__ = format

    def plot(self, path) -> None:
        """A stacked bar chart (weights / grads / state per optimizer) as PNG at ``path``."""
        report.plot_comparison(self, path)


def _largest_dense(optimizer: str, dtype: str, rules: Rules, room: int) -> int:
    """The most layers of ``dense_transformer`` that fit in ``room`` bytes (0: none)."""

    def fits(layers: int) -> bool:
        return budget_row(dense_transformer(layers), optimizer, dtype, rules).total <= room

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):  # bytes grow with depth (and width with it): double, then bisect
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _check_gb(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number of GiB)")
    return float(value)


def compare(
    model_or_shapes,
    dtype: str = "mixed",
    optimizers: Iterable[str] = DEFAULT_OPTIMIZERS,
    *,
    gpu_gb: Iterable[float] = (),
    activation_gb: float = 0.0,
    min_8bit_size: int = 4096,
    block_size: int = quant.BLOCK_SIZE,
) -> Comparison:
    """Weights, grads and optimizer state of a model trained with each optimizer, in bytes.

    Args:
        model_or_shapes: anything :func:`model_shapes` accepts (e.g. ``"llama-2-7b"``).
        dtype: ``"fp32"`` | ``"bf16"`` | ``"mixed"`` (see ``PRECISIONS``).
        optimizers: keys of ``OPTIMIZERS``, one row each.
        gpu_gb: GPU sizes in GiB; for each, whether the model fits with each optimizer and the
            largest catalog model and dense transformer that do.
        activation_gb: GiB kept free for activations (and anything else) on every GPU.
        min_8bit_size: lion8bit's and bitsandbytes' fp32 fallback threshold.
        block_size: lion8bit's absmax block.
    """
    if dtype not in PRECISIONS:
        raise ValueError(f"Invalid dtype: {dtype!r} (expected one of {', '.join(PRECISIONS)})")
    optimizers = tuple(optimizers)
    for key in optimizers:
        if key not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {key!r} (expected one of {', '.join(OPTIMIZERS)})")
    if not optimizers:
        raise ValueError("Invalid optimizers: none given")
    gpus = tuple(_check_gb("gpu_gb", g) for g in gpu_gb)
    for gpu in gpus:
        if gpu <= 0:
            raise ValueError(f"Invalid gpu_gb: {gpu:g} (expected > 0)")
    activation_gb = _check_gb("activation_gb", activation_gb)
    if activation_gb < 0:
        raise ValueError(f"Invalid activation_gb: {activation_gb:g} (expected >= 0)")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or (
        block_size & (block_size - 1)
    ):
        raise ValueError(f"Invalid block_size: {block_size!r} (expected a positive power of two)")
    rules = Rules(min_8bit_size, block_size)
    shapes = model_shapes(model_or_shapes)
    rows = tuple(budget_row(shapes, key, dtype, rules) for key in optimizers)

    activation_bytes = round(activation_gb * GIB)
    catalog_rows = {
        name: {key: budget_row(catalog_model(name), key, dtype, rules) for key in optimizers}
        for name in (CATALOG if gpus else ())
    }
    fits = {}
    for gpu in gpus:
        room = round(gpu * GIB) - activation_bytes
        per_optimizer = []
        for row in rows:
            fitting = [name for name in CATALOG if catalog_rows[name][row.optimizer].total <= room]
            best = max(fitting, key=lambda name: catalog_model(name).n_params, default=None)
            layers = _largest_dense(row.optimizer, dtype, rules, room)
            per_optimizer.append(Fit(
                optimizer=row.optimizer,
                fits=row.total <= room,
                free=room - row.total,
                largest_catalog_model=best,
                largest_catalog_params=catalog_model(best).n_params if best else 0,
                largest_dense_layers=layers,
                largest_dense_params=dense_transformer(layers).n_params if layers else 0,
            ))
        fits[gpu] = tuple(per_optimizer)
    return Comparison(shapes, dtype, rules, rows, gpus, activation_gb, fits)
