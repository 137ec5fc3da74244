"""How `lion8bit budget` activations compare with reality and with the closed-form estimate.

Two tables for docs/budget.md, each a CSV under benchmarks/results/ and both in one markdown file:

1. Reality on this CPU: for GPT-2-small, the examples' char-LM and ViT-B/16, the activations the
   budget reports (measured on fake tensors) against the same measurement on real tensors, and
   the peak resident memory (VmHWM) of a steady fp32 training step with Lion8bit against the
   budget's weights + grads + state + activations; each in a fresh process
   (tests/budget_peak_rss.py): grads kept allocated between steps or freed, and glibc's malloc
   returning freed buffers of 1 MiB and more to the OS, or with its defaults.
2. The closed form of Korthikanti et al. 2022 (arXiv 2205.05198), per transformer layer in
   16-bit: s*b*h*(34 + 5*a*s/h) bytes without recomputation, 34*s*b*h when the attention scores
   are not kept (flash attention, or their selective recomputation), 2*s*b*h with full
   recomputation; against the measured bytes of the layers (from the model at 1 and 2 layers:
   what one more layer adds, times the layer count) and of the whole step (embeddings, head and
   loss included). dtype mixed.

    python benchmarks/budget_activations.py          # ~10 min on a 2-core machine
    python benchmarks/budget_activations.py --quick  # the closed-form table only, under a minute
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from lion8bit.budget import CATALOG, GIB, LAYERS_FIELD, compare
from lion8bit.budget.activations import measure
from lion8bit.budget.models import hf_module

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (label, what tests/budget_peak_rss.py builds, the budget's model, batch, seq_len)
REAL = [
    ("gpt2", "gpt2", "gpt2", 4, 256),
    ("char-LM", "charlm", "examples/train_char_lm.py:budget_model", 32, 64),
    ("vit-b-16", "vit-b-16", "vit-b-16", 4, None),
]
# (--grads, --malloc) of tests/budget_peak_rss.py
VARIANTS = [("kept", "trimmed"), ("freed", "trimmed"), ("kept", "glibc")]
# (catalog model, config fields changed, batch, seq_len). GPT-2 trains with dropout on the attention
# probabilities (attn_pdrop 0.1), which CPU's flash attention kernel does not do: torch falls back
# to the math kernel, which keeps the probabilities. Without it, CPU runs flash attention, as a GPU
# would with dropout too.
CLOSED_FORM = [
    ("gpt2", {}, 4, 1024),
    ("gpt2", {"attn_pdrop": 0.0}, 4, 1024),
    ("gpt2-xl", {}, 1, 1024),
    ("gpt2-xl", {"attn_pdrop": 0.0}, 1, 1024),
    ("llama-2-7b", {}, 1, 2048),
    ("llama-2-7b", {}, 1, 4096),
    ("llama-2-13b", {}, 1, 4096),
    ("mistral-7b", {}, 1, 4096),
]


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def reality(bar) -> list[dict]:
    rows = []
    for label, probe, model, batch_size, seq_len in REAL:
        budget_row = compare(model, "fp32", ["lion8bit"], batch_size=batch_size,
                             seq_len=seq_len).row("lion8bit")
        row = dict(model=label, batch=f"{batch_size} x {seq_len}" if seq_len else f"{batch_size} images",
                   budget_activations=budget_row.activations, budget_total=budget_row.total)
        for grads, malloc in VARIANTS:
            args = [probe, str(batch_size)] + ([str(seq_len)] if seq_len else [])
            command = [sys.executable, str(ROOT / "tests" / "budget_peak_rss.py"), *args, "--grads", grads,
                       "--malloc", malloc]
            out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            real = json.loads(out.splitlines()[-1])
            row["real_saved"] = real["saved"]
            row[f"peak_{grads}_{malloc}"] = real["peak"] - real["before"]
            bar.update()
        rows.append(row)
    return rows


def _measured(config: dict, layers: int, batch_size: int, seq_len: int, checkpointing: str):
    field = LAYERS_FIELD[config["model_type"]]
    module = hf_module({**config, field: layers}, "model")
    return measure(module, "model", batch_size=batch_size, seq_len=seq_len, dtype="mixed",
                   checkpointing=checkpointing)


def closed_form(bar) -> list[dict]:
    rows = []
    for name, changed, batch_size, seq_len in CLOSED_FORM:
        config = {**CATALOG[name], **changed}
        layers = config[LAYERS_FIELD[config["model_type"]]]
        h = config.get("n_embd") or config["hidden_size"]
        a = config.get("n_head") or config["num_attention_heads"]
        sbh = seq_len * batch_size * h
        whole = _measured(config, layers, batch_size, seq_len, "none").held
        per_layer = (_measured(config, 2, batch_size, seq_len, "none").held
                     - _measured(config, 1, batch_size, seq_len, "none").held)
        full = _measured(config, layers, batch_size, seq_len, "full")
        label = name + "".join(f", {key} {value}" for key, value in changed.items())
        rows.append(dict(
            model=label, batch=f"{batch_size} x {seq_len}", layers=layers,
            measured_step=whole, measured_layers=layers * per_layer, measured_per_layer=per_layer,
            formula_per_layer=sbh * (34 + 5 * a * seq_len / h), formula_no_scores_per_layer=34 * sbh,
            measured_full=full.held, measured_full_recomputed=full.recomputed, formula_full=2 * sbh * layers,
        ))
        bar.update()
    return rows


def markdown(real_rows, closed_rows, command: str) -> str:
    lines = [
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, transformers {transformers.__version__}. "
        f"Reproduce: `{command}`.",
        "",
    ]
    if real_rows:
        lines += [
            "Reality on CPU (fp32, Lion8bit; the second training step of a fresh process). Activations: "
            "the budget's (fake tensors) against the same hook on real tensors. Peak: VmHWM of the step "
            "above the resident size before the model was built (ratio: to the budget's total, weights + "
            "grads + state + activations); grads kept allocated between steps (zero_grad(set_to_none="
            "False), as with gradient accumulation) or freed (set_to_none=True, torch's default); malloc "
            "returning freed buffers of 1 MiB and more to the OS, or glibc's defaults.",
            "",
            "| model | batch | activations, budget GiB | real GiB | budget total GiB | peak, grads kept GiB "
            "| ratio | grads freed GiB | ratio | grads kept, glibc defaults GiB | ratio |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in real_rows:
            peaks = "".join(
                f" | {_gib(r[f'peak_{g}_{m}'])} | {r[f'peak_{g}_{m}'] / r['budget_total']:.2f}"
                for g, m in VARIANTS
            )
            lines.append(
                f"| {r['model']} | {r['batch']} | {_gib(r['budget_activations'])} | {_gib(r['real_saved'])} "
                f"| {_gib(r['budget_total'])}{peaks} |"
            )
        lines.append("")
    lines += [
        "Measured against Korthikanti et al. 2022 (16-bit; dtype mixed; no recomputation unless said). "
        "Layers: what one more layer adds, times the layers; step: the whole forward pass, embeddings, "
        "head and loss included (the closed form has no term for them).",
        "",
        "| model | batch x seq | layers, measured GiB | s·b·h·(34+5as/h)·L GiB | ratio | 34·s·b·h·L GiB "
        "| ratio | step, measured GiB | full recomputation: held GiB | 2·s·b·h·L GiB | + one block GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in closed_rows:
        formula = r["formula_per_layer"] * r["layers"]
        no_scores = r["formula_no_scores_per_layer"] * r["layers"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {_gib(r['measured_layers'])} | {_gib(formula)} "
            f"| {r['measured_layers'] / formula:.2f} | {_gib(no_scores)} "
            f"| {r['measured_layers'] / no_scores:.2f} "
            f"| {_gib(r['measured_step'])} | {_gib(r['measured_full'])} | {_gib(r['formula_full'])} "
            f"| {_gib(r['measured_full_recomputed'])} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the closed-form table only")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(CLOSED_FORM) + (0 if args.quick else len(VARIANTS) * len(REAL)), unit="run") as bar:
        real_rows = [] if args.quick else reality(bar)
        closed_rows = closed_form(bar)
    if real_rows:
        write_csv(RESULTS / "budget_reality.csv", real_rows)
    write_csv(RESULTS / "budget_closed_form.csv", closed_rows)
    command = "python benchmarks/budget_activations.py" + (" --quick" if args.quick else "")
    table = markdown(real_rows, closed_rows, command)
    (RESULTS / ("budget_activations_quick.md" if args.quick else "budget_activations.md")).write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
