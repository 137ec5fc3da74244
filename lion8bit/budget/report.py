"""How a comparison is shown: the CLI's tables, its JSON, and a PNG bar chart."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from .. import momentum as mom
from .rules import GIB, PRECISIONS

if TYPE_CHECKING:
    from .comparison import Comparison

WIDTH = 100  # of the wrapped lines of text


def comparison_dict(comparison: Comparison) -> dict:
    """Everything as plain JSON values; bytes as exact ints."""
    measured = comparison.activations
    data = {
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
        "activation_bytes": comparison.activation_bytes,
        "activation_source": comparison.activation_source,
        "checkpointing": comparison.checkpointing,
    }
    if comparison.batch_size is not None:
        data["batch_size"] = comparison.batch_size
    if comparison.seq_len is not None:
        data["seq_len"] = comparison.seq_len
    if measured is not None:
        data["activations"] = {
            "inputs_text": measured.inputs_text,
            "held_after_forward": measured.held,
            "recomputed_block": measured.recomputed,
        }
    data["rows"] = [
        {
            "optimizer": r.optimizer,
            "label": r.label,
            "state_format": r.state_format,
            "weights": r.weights,
            "grads": r.grads,
            "state": r.state,
            "activations": r.activations,
            "paged": r.paged,
            "total": r.total,
            "bytes_per_param": r.bytes_per_param,
        }
        for r in comparison.rows
    ]
    data["gpus"] = [
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
    ]
    return data


def activations_text(comparison: Comparison) -> str:
    """One sentence: what the activations column holds and where it came from."""
    measured = comparison.activations
    if comparison.activation_source == "given":
        return (f"activations: {comparison.activation_bytes / GIB:.2f} GiB, given with --activation-gb "
                "(not measured)")
    if measured is None:
        return ("activations: NOT COUNTED (give --batch-size and --seq-len to measure them, or "
                "--activation-gb); verdicts below are for weights + grads + state only")
    text = (f"activations: measured for one training step on {measured.inputs_text}, {comparison.dtype}, "
            f"checkpointing {measured.checkpointing}: {measured.held / GIB:.2f} GiB saved for backward "
            "when the forward pass ends (loss included)")
    if measured.checkpointing == "full":
        text += f" + {measured.recomputed / GIB:.2f} GiB of the largest block, recomputed during backward"
    return text


def comparison_text(comparison: Comparison) -> str:
    """The readable table the CLI prints."""
    model = comparison.model
    counts = f"{model.n_params:,} parameters in {len(model.params)} tensors"
    if model.n_trainable != model.n_params:
        counts += f", {model.n_trainable:,} trainable"
    lines = [f"{model.name}: {counts}"]
    if model.description and model.description != model.name:
        lines.append(f"  {model.description}")
    lines += textwrap.wrap(f"dtype {comparison.dtype}: {PRECISIONS[comparison.dtype].description}", WIDTH,
                           subsequent_indent="  ")
    lines += textwrap.wrap(activations_text(comparison), WIDTH, subsequent_indent="  ")
    lines.append("sizes in GiB (2**30 bytes); B/param: (weights + grads + state) / parameters")

    label_width = max(len(r.label) for r in comparison.rows)
    format_width = max(len(r.state_format) for r in comparison.rows)
    table = [f"{'optimizer':<{label_width}}  {'state format':<{format_width}}  "
             f"{'weights':>8}  {'grads':>8}  {'state':>8}  {'activations':>11}  {'total':>8}  {'B/param':>8}"]
    for r in comparison.rows:
        table.append(
            f"{r.label:<{label_width}}  {r.state_format:<{format_width}}  {r.weights / GIB:>8.2f}  "
            f"{r.grads / GIB:>8.2f}  {r.state / GIB:>8.2f}  {r.activations / GIB:>11.2f}  "
            f"{r.total / GIB:>8.2f}  {r.bytes_per_param:>8.3f}" + (" *" if r.paged else "")
        )
    lines += ["", table[0], "-" * max(map(len, table)), *table[1:]]
    paged = next((r for r in comparison.rows if r.paged), None)
    if paged is not None:
        lines += textwrap.wrap(
            f"* {paged.label}: {paged.paged / GIB:.2f} GiB of momentum in CUDA managed memory "
            "(evicted to host RAM under pressure), not in its total; its state column is the "
            f"momentum of tensors under {mom.PAGED_MIN_NUMEL:,} elements (never paged) plus "
            "the largest paged tensor's, resident while that tensor updates",
            WIDTH,
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
            if f.largest_dense_layers is None:
                dense = "-"
            elif f.largest_dense_layers:
                dense = (f"{_params_text(f.largest_dense_params)} ({f.largest_dense_layers} layers x "
                         f"{128 * f.largest_dense_layers})")
            else:
                dense = "none"
            table.append(f"{r.label:<{label_width}}  {verdict:<{model_width}}  {catalog:<24}  {dense}")
        lines += [
            "",
            f"{gpu:g} GiB GPU (GiB left after weights + grads + state + activations):",
            table[0], "-" * max(map(len, table)), *table[1:],
        ]
    if comparison.gpu_gb:
        lines += [""] + textwrap.wrap(_largest_text(comparison), WIDTH, subsequent_indent="  ")
    return "\n".join(lines)


def _largest_text(comparison: Comparison) -> str:
    text = ("largest dense transformer: Llama-2 shape with d_model = 128 x layers (32 layers = llama-2-7b); "
            "largest models ")
    measured = comparison.activations
    if comparison.activation_source == "given":
        return text + f"with the same {comparison.activation_bytes / GIB:.2f} GiB of activations"
    if measured is None:
        return text + "without activations"
    if measured.kind == "images":
        return text + f"with their own activations on {measured.batch_size} images of their own size"
    return (text + f"with their own activations on {measured.inputs_text} (measured from their 1- and "
            "2-layer versions), among those with that much context")


def plot_comparison(comparison: Comparison, path) -> None:
    """A stacked bar chart (weights / grads / state / activations per optimizer) as PNG at ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ValueError("Invalid --plot: it needs matplotlib (pip install 'lion8bit[plot]')") from None
    figure = Figure(figsize=(9, 4.8), layout="constrained")
    axes = figure.subplots()
    labels = [r.label.replace(" (", "\n(") for r in comparison.rows]
    bottom = [0.0] * len(comparison.rows)
    parts = [("weights", "#4c72b0"), ("grads", "#dd8452"), ("state", "#55a868")]
    if comparison.activation_bytes:
        parts.append(("activations", "#c44e52"))
    for part, color in parts:
        values = [getattr(r, part) / GIB for r in comparison.rows]
        axes.bar(labels, values, bottom=bottom, label=part, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    if any(r.paged for r in comparison.rows):
        axes.bar(labels, [r.paged / GIB for r in comparison.rows], bottom=bottom,
                 label="state in managed memory", color="none", edgecolor="#55a868", hatch="//")
    for gpu in comparison.gpu_gb:
        axes.axhline(gpu, color="0.3", linestyle="--", linewidth=1)
        axes.annotate(f"{gpu:g} GiB GPU", (-0.45, gpu), ha="left", va="bottom", fontsize=8, color="0.2",
                      bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    tallest = max([r.total + r.paged for r in comparison.rows] + [g * GIB for g in comparison.gpu_gb]) / GIB
    axes.set_ylim(0, tallest * 1.15)
    axes.set_ylabel("GiB")
    model = comparison.model
    title = f"{model.name} ({_params_text(model.n_params)} params), dtype {comparison.dtype}"
    if comparison.activations is not None:
        title += f", {comparison.activations.inputs_text}, checkpointing {comparison.checkpointing}"
    elif comparison.activation_source == "not counted":
        title += ", activations not counted"
    axes.set_title(title, fontsize=10)
    axes.tick_params(axis="x", labelsize=7)
    axes.legend(fontsize=8, loc="upper right", ncols=5)
    figure.savefig(path, dpi=90)


def _params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
