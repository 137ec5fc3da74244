"""How a comparison is shown: the CLI's tables, its JSON, and a PNG bar chart."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from .. import momentum as mom
from .rules import GIB, PRECISIONS

if TYPE_CHECKING:
    from .compare import Comparison


def comparison_dict(comparison: Comparison) -> dict:
    """Everything as plain JSON values; bytes as exact ints."""
    return {
        "model": {
            "name": comparison.model.name,
            "description": comparison.model.description,
            "params": comparison.model.n_params,
            "trainable_params": comparison.model.n_trainable,
            "tensors": len(comparison.model.params),
        },
        "dtype": comparison.dtype,
        "dtype_description": PRECISIONS[comparison.dtype].description,
        "min_8bit_size": comparison.rules.min_8bit_size,
        "block_size": comparison.rules.block_size,
        "unit": "bytes",
        "rows": [
            {
                "optimizer": r.optimizer,
                "label": r.label,
                "state_format": r.state_format,
                "weights": r.weights,
                "grads": r.grads,
                "state": r.state,
                "paged": r.paged,
                "total": r.total,
                "bytes_per_param": r.bytes_per_param,
            }
            for r in comparison.rows
        ],
        "activation_gib": comparison.activation_gb,
        "gpus": [
            {
                "gpu_gib": gpu,
                "fits": [
                    {
                        "optimizer": f.optimizer,
                        "fits": f.fits,
                        "free": f.free,
                        "largest_catalog_model": f.largest_catalog_model,
                        "largest_catalog_params": f.largest_catalog_params,
                        "largest_dense_layers": f.largest_dense_layers,
                        "largest_dense_params": f.largest_dense_params,
                    }
                    for f in comparison.fits[gpu]
                ],
            }
            for gpu in comparison.gpu_gb
        ],
    }


def comparison_text(comparison: Comparison) -> str:
    """The readable table the CLI prints."""
    model = comparison.model
    counts = f"{model.n_params:,} parameters in {len(model.params)} tensors"
    if model.n_trainable != model.n_params:
        counts += f", {model.n_trainable:,} trainable"
    lines = [f"{model.name}: {counts}"]
    if model.description and model.description != model.name:
        lines.append(f"  {model.description}")
    lines += textwrap.wrap(f"dtype {comparison.dtype}: {PRECISIONS[comparison.dtype].description}", 100,
                           subsequent_indent="  ")
    lines.append("sizes in GiB (2**30 bytes)")

    label_width = max(len(r.label) for r in comparison.rows)
    format_width = max(len(r.state_format) for r in comparison.rows)
    table = [f"{'optimizer':<{label_width}}  {'state format':<{format_width}}  "
             f"{'weights':>8}  {'grads':>8}  {'state':>8}  {'total':>8}  {'B/param':>8}"]
    for r in comparison.rows:
        table.append(
            f"{r.label:<{label_width}}  {r.state_format:<{format_width}}  {r.weights / GIB:>8.2f}  "
            f"{r.grads / GIB:>8.2f}  {r.state / GIB:>8.2f}  {r.total / GIB:>8.2f}  "
            f"{r.bytes_per_param:>8.3f}" + (" *" if r.paged else "")
        )
    lines += ["", table[0], "-" * max(map(len, table)), *table[1:]]
    paged = next((r for r in comparison.rows if r.paged), None)
    if paged is not None:
        lines += textwrap.wrap(
            f"* {paged.label}: {paged.paged / GIB:.2f} GiB of momentum in CUDA managed memory "
            "(evicted to host RAM under pressure), not in its total; its state column is the "
            f"momentum of tensors under {mom.PAGED_MIN_NUMEL:,} elements (never paged) plus "
            "the largest paged tensor's, resident while that tensor updates",
            100,
            subsequent_indent="  ",
        )

    model_width = max(len(model.name), 16)
    for gpu in comparison.gpu_gb:
        table = [f"{'optimizer':<{label_width}}  {model.name:<{model_width}}  "
                 f"{'largest catalog model':<24}  largest dense transformer"]
        for r, f in zip(comparison.rows, comparison.fits[gpu], strict=True):
            verdict = f"{'fits' if f.fits else 'no'} ({f.free / GIB:+.1f})"
            catalog = (f"{f.largest_catalog_model} ({_params_text(f.largest_catalog_params)})"
                       if f.largest_catalog_model else "none")
            dense = (f"{_params_text(f.largest_dense_params)} ({f.largest_dense_layers} layers x "
                     f"{128 * f.largest_dense_layers})" if f.largest_dense_layers else "none")
            table.append(f"{r.label:<{label_width}}  {verdict:<{model_width}}  {catalog:<24}  {dense}")
        lines += [
            "",
            f"{gpu:g} GiB GPU, {comparison.activation_gb:g} GiB kept for activations (--activation-gb); "
            "(GiB left after weights + grads + state):",
            table[0], "-" * max(map(len, table)), *table[1:],
        ]
    if comparison.gpu_gb:
        lines += ["", "largest dense transformer: Llama-2 shape with d_model = 128 x layers "
                     "(32 layers = llama-2-7b)"]
    return "\n".join(lines)


def plot_comparison(comparison: Comparison, path) -> None:
    """A stacked bar chart (weights / grads / state per optimizer) as PNG at ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("Invalid --plot: it needs matplotlib (pip install 'lion8bit[plot]')") from None
    figure = Figure(figsize=(9, 4.8), layout="constrained")
    axes = figure.subplots()
    labels = [r.label.replace(" (", "\n(") for r in comparison.rows]
    bottom = [0.0] * len(comparison.rows)
    for part, color in (("weights", "#4c72b0"), ("grads", "#dd8452"), ("state", "#55a868")):
        values = [getattr(r, part) / GIB for r in comparison.rows]
        axes.bar(labels, values, bottom=bottom, label=part, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    if any(r.paged for r in comparison.rows):
        axes.bar(labels, [r.paged / GIB for r in comparison.rows], bottom=bottom,
                 label="state in managed memory", color="none", edgecolor="#55a868", hatch="//")
    for gpu in comparison.gpu_gb:
        room = gpu - comparison.activation_gb
        axes.axhline(room, color="0.3", linestyle="--", linewidth=1)
        text = f"{gpu:g} GiB GPU"
        if comparison.activation_gb:
            text += f" - {comparison.activation_gb:g} GiB activations"
        axes.annotate(text, (-0.45, room), ha="left", va="bottom", fontsize=8, color="0.2",
                      bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    tallest = max([r.total + r.paged for r in comparison.rows] + [g * GIB for g in comparison.gpu_gb]) / GIB
    axes.set_ylim(0, tallest * 1.15)
    axes.set_ylabel("GiB")
    model = comparison.model
    axes.set_title(f"{model.name} ({_params_text(model.n_params)} params), dtype {comparison.dtype}")
    axes.tick_params(axis="x", labelsize=7)
    axes.legend(fontsize=8, loc="upper right", ncols=4)
    figure.savefig(path, dpi=90)


def _params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
