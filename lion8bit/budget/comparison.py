"""The comparison: bytes per optimizer for one model, and what fits on each GPU size."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from .. import momentum as mom
from .. import quant
from . import report
from .activations import Activations, check_checkpointing, config_activations, measure
from .models import resolve_model
from .rules import DEFAULT_OPTIMIZERS, DEFAULT_RULES, GIB, OPTIMIZERS, PRECISIONS, Rules
from .shapes import CATALOG, ModelShapes, catalog_model, dense_config, dense_transformer


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
    activations: int = 0  # the same for every optimizer: see Comparison.activation_source

    @property
    def total(self) -> int:
        """Everything on the GPU: weights + grads + state + activations."""
        return self.weights + self.grads + self.state + self.activations

    @property
    def bytes_per_param(self) -> float:
        """(weights + grads + state) per parameter: what the optimizer and precision decide."""
        return (self.weights + self.grads + self.state) / self.n_params if self.n_params else 0.0


def budget_row(
    shapes: ModelShapes,
    optimizer: str,
    dtype: str = "mixed",
    rules: Rules = DEFAULT_RULES,
    activations: int = 0,
) -> Row:
    """Bytes of weights, grads and optimizer state of ``shapes`` trained with ``optimizer``.

    Frozen tensors (``trainable=False``) count as weights only. For a paged optimizer the
    momentum of every tensor of at least ``lion8bit.momentum.PAGED_MIN_NUMEL`` elements is in ``paged``;
    ``state`` holds the smaller tensors' momentum plus the largest paged tensor's: the step
    updates a paged group one tensor at a time, so that much has to be resident at once (a
    floor: the driver decides what else stays). ``activations``: bytes, carried into ``total``.
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
        activations=activations,
    )


@dataclass(frozen=True)
class Fit:
    """One optimizer on one GPU size: does the model fit, and the largest ones that do.

    The largest models carry activations as the compared model does: their own, measured at the
    same batch (``"measured"``), the same given bytes (``"given"``), or none (``"not counted"``).
    """

    optimizer: str
    fits: bool
    free: int  # bytes left (negative: missing) after weights + grads + state + activations
    largest_catalog_model: str | None
    largest_catalog_params: int
    largest_dense_layers: int | None  # 0: not even one layer fits; None: not comparable (images)
    largest_dense_params: int


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` returns: rows per optimizer and the fits per GPU size."""

    model: ModelShapes
    dtype: str
    rules: Rules
    rows: tuple[Row, ...]
    gpu_gb: tuple[float, ...]
    fits: dict[float, tuple[Fit, ...]]
    activation_bytes: int = 0
    activation_source: str = "not counted"  # "measured" | "given" | "not counted"
    activations: Activations | None = None  # the measurement, when measured
    batch_size: int | None = None
    seq_len: int | None = None
    checkpointing: str = "none"

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
        """A stacked bar chart (weights / grads / state / activations per optimizer) as PNG at ``path``."""
        report.plot_comparison(self, path)


class _CandidateActivations:
    """Activation bytes of the catalog models and dense transformers that might fit instead."""

    def __init__(self, source: str, nbytes: int, measured: Activations | None, dtype: str):
        self.source, self.nbytes, self.measured, self.dtype = source, nbytes, measured, dtype

    def comparable(self, config: dict) -> bool:
        """Whether a model of this config could replace the compared one: the same kind of
        input (tokens or images) and, for tokens, at least as much context."""
        if self.source != "measured":
            return True
        images = config["model_type"] == "vit"
        context = config.get("n_positions") or config.get("max_position_embeddings")
        seq_len = self.measured.seq_len
        return images == (self.measured.kind == "images") and not (seq_len and context and seq_len > context)

    def _of_config(self, config: dict, label: str) -> int | None:
        if not self.comparable(config):
            return None
        if self.source != "measured":
            return self.nbytes
        m = self.measured
        return config_activations(config, label, batch_size=m.batch_size, seq_len=m.seq_len, dtype=self.dtype,
                                  checkpointing=m.checkpointing).nbytes

    def catalog(self, name: str) -> int | None:
        return self._of_config(CATALOG[name], name)

    def dense(self, layers: int) -> int | None:
        return self._of_config(dense_config(layers), f"dense-{layers}")


def _largest_dense(optimizer: str, dtype: str, rules: Rules, gpu: int, candidates) -> int | None:
    """The most layers of ``dense_transformer`` that fit in ``gpu`` bytes (0: none; None: not comparable).

    Bytes grow with depth (and width with it). The largest depth whose weights + grads + state
    fit is found first (cheap: arithmetic); activations, when measured, are measured only from
    there down: one depth less, two less, four less, ..., then bisected.
    """
    if not candidates.comparable(dense_config(1)):
        return None

    def static_fits(layers: int) -> bool:
        return budget_row(dense_transformer(layers), optimizer, dtype, rules).total <= gpu

    def fits(layers: int) -> bool:
        activations = candidates.dense(layers)
        return activations is not None and budget_row(
            dense_transformer(layers), optimizer, dtype, rules, activations
        ).total <= gpu

    if not static_fits(1):
        return 0
    low, high = 1, 2
    while static_fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if static_fits(middle) else (low, middle)
    # ``low`` is the deepest whose weights + grads + state fit; now with activations
    high, step = low + 1, 1
    while low >= 1 and not fits(low):
        high, low, step = low, low - step, step * 2
    if low < 1:
        if not fits(1):
            return 0
        low = 1
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _catalog_fits(name: str, optimizer: str, dtype: str, rules: Rules, gpu: int, candidates) -> bool:
    if budget_row(catalog_model(name), optimizer, dtype, rules).total > gpu:
        return False  # without measuring its activations
    activations = candidates.catalog(name)
    return activations is not None and budget_row(
        catalog_model(name), optimizer, dtype, rules, activations
    ).total <= gpu


def _check_gb(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number of GiB)")
    return float(value)


def _check_size(name: str, value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Invalid {name}: {value!r} (expected a positive integer)")
    return value


def compare(
    model_or_shapes,
    dtype: str = "mixed",
    optimizers: Iterable[str] = DEFAULT_OPTIMIZERS,
    *,
    gpu_gb: Iterable[float] = (),
    batch_size: int | None = None,
    seq_len: int | None = None,
    checkpointing: str = "none",
    activation_gb: float | None = None,
    min_8bit_size: int = 4096,
    block_size: int = quant.BLOCK_SIZE,
) -> Comparison:
    """Weights, grads, optimizer state and activations of a model trained with each optimizer, in bytes.

    Args:
        model_or_shapes: anything :func:`model_shapes` accepts (e.g. ``"llama-2-7b"``).
        dtype: ``"fp32"`` | ``"bf16"`` | ``"mixed"`` (see ``PRECISIONS``).
        optimizers: keys of ``OPTIMIZERS``, one row each.
        gpu_gb: GPU sizes in GiB; for each, whether the model fits with each optimizer and the
            largest catalog model and dense transformer that do.
        batch_size: measure the activations of one training step at this batch size
            (``lion8bit.budget.activations``); needs a model with a module (not bare shapes).
        seq_len: tokens per sequence (token models); image models take their own image size.
        checkpointing: ``"none"`` | ``"full"`` (every repeated block through ``torch.utils.checkpoint``).
        activation_gb: GiB of activations given instead of measured (overrides ``batch_size``).
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
    if activation_gb is not None:
        activation_gb = _check_gb("activation_gb", activation_gb)
        if activation_gb < 0:
            raise ValueError(f"Invalid activation_gb: {activation_gb:g} (expected >= 0)")
    _check_size("batch_size", batch_size)
    _check_size("seq_len", seq_len)
    check_checkpointing(checkpointing)
    if batch_size is None and (seq_len is not None or checkpointing != "none"):
        raise ValueError(
            "Invalid batch_size: none given (seq_len and checkpointing describe a batch to measure)"
        )
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or (
        block_size & (block_size - 1)
    ):
        raise ValueError(f"Invalid block_size: {block_size!r} (expected a positive power of two)")
    rules = Rules(min_8bit_size, block_size)
    model = resolve_model(model_or_shapes)

    measured = None
    if activation_gb is not None:
        source, activation_bytes = "given", round(activation_gb * GIB)
    elif batch_size is not None:
        if model.module is None:
            raise ValueError("Invalid model for measuring activations: bare shapes have no forward pass "
                             "(give a catalog name, config.json, module:function or nn.Module)")
        measured = measure(model.module, model.shapes.name, batch_size=batch_size, seq_len=seq_len,
                           dtype=dtype, checkpointing=checkpointing)
        source, activation_bytes = "measured", measured.nbytes
    else:
        source, activation_bytes = "not counted", 0
    rows = tuple(budget_row(model.shapes, key, dtype, rules, activation_bytes) for key in optimizers)

    candidates = _CandidateActivations(source, activation_bytes, measured, dtype)
    by_size = sorted(CATALOG, key=lambda name: catalog_model(name).n_params, reverse=True)
    fits = {}
    for gpu in gpus:
        room = round(gpu * GIB)
        per_optimizer = []
        for row in rows:
            best = next((name for name in by_size if _catalog_fits(name, row.optimizer, dtype, rules, room,
                                                                    candidates)), None)
            layers = _largest_dense(row.optimizer, dtype, rules, room, candidates)
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
    return Comparison(model.shapes, dtype, rules, rows, gpus, fits, activation_bytes, source, measured,
                      batch_size, measured.seq_len if measured else seq_len, checkpointing)
