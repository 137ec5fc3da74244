"""The 4-bit study's verdict and report (benchmarks/study_4bit.py): the finalists chosen from the
sign agreement, the gate on the paired training runs, the CSV columns, the tables, the figure and
PREFIX.md."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import statistics
from pathlib import Path

import torch
from study_4bit_agreement import PACKAGE_SHADOWS
from study_4bit_formats import MAP_DESCRIPTIONS, MAPS, STOCHASTIC, Format
from study_4bit_training import BASELINE, CHAR_LM_FLOOR, EIGHT_BIT, FASHION_BOUND, FP32, TASKS

# -- choosing the finalists ----------------------------------------------------------------------


def choose_finalists(sign: dict[str, dict[str, float]], per_rounding: int) -> list[str]:
    """The formats of the loss runs, chosen from the sign agreement alone (before any loss is seen).

    Always the DE-128 baseline and the same with stochastic rounding (does the usual remedy for
    swamping fix it?); then, for each rounding, the ``per_rounding`` best maps by agreement on the
    char-LM sequence, each with its best block size and absmax dtype, skipping a map already
    chosen for that rounding. Per rounding, because per-step agreement need not rank rounding
    rules the way the loss does (stochastic rounding trades a bias for noise).
    """
    chosen = [BASELINE, BASELINE.replace("-nearest", "-sr")]
    families = {(Format.parse(name).map_name, Format.parse(name).rounding) for name in chosen}
    ranked = sorted(
        (name for name in sign if name not in PACKAGE_SHADOWS),
        key=lambda name: (-sign[name]["char-lm"], -sign[name]["mlp"], name),
    )
    for rounding in ("nearest", "sr"):
        added = 0
        for name in ranked:
            fmt = Format.parse(name)
            if fmt.rounding != rounding or (fmt.map_name, rounding) in families or added == per_rounding:
                continue
            chosen.append(name)
            families.add((fmt.map_name, rounding))
            added += 1
    return [name for name in chosen if name in sign or not sign]


# -- the gate ------------------------------------------------------------------------------------


def gate(runs: list[dict], names: list[str]) -> dict[str, dict]:
    """Per format: paired Δ per seed and mean for each task, the bounds, pass/fail."""
    finals = {(r["task"], r["format"], int(r["seed"])): float(r["final"]) for r in runs}
    verdicts = {}
    sigma = {}
    for task in TASKS:
        ref = [finals[task, FP32, s] for (t, n, s) in finals if t == task and n == FP32]
        sigma[task] = statistics.stdev(ref) if len(ref) > 1 else 0.0
    bounds = {"char-lm": max(2 * sigma["char-lm"], CHAR_LM_FLOOR), "fashion": FASHION_BOUND}
    for name in names:
        entry = {}
        for task in TASKS:
            seeds = sorted(s for (t, n, s) in finals if t == task and n == name and (task, FP32, s) in finals)
            deltas = [finals[task, name, s] - finals[task, FP32, s] for s in seeds]
            mean = statistics.fmean(deltas) if deltas else float("nan")
            entry[task] = dict(
                seeds=seeds,
                deltas=deltas,
                mean=mean,
                bound=bounds[task],
                passes=bool(deltas) and abs(mean) <= bounds[task],
            )
        entry["passes"] = all(entry[task]["passes"] for task in TASKS)
        verdicts[name] = entry
    return dict(verdicts=verdicts, sigma=sigma, bounds=bounds)


# -- output --------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> str:
    return (
        f"{_cpu_model()}, {os.cpu_count()} CPUs ({platform.machine()}), one torch thread per job; "
        f"python {platform.python_version()}, torch {torch.__version__}, lion8bit {_version('lion8bit')}, "
        f"lion-pytorch {_version('lion-pytorch')}, bitsandbytes {_version('bitsandbytes')}"
    )


SIGN_FIELDS = [
    "format",
    "map",
    "block_size",
    "absmax",
    "rounding",
    "bytes_per_param",
    "sequence",
    "steps",
    "agreement",
]
RUN_FIELDS = ["task", "format", "seed", "final", "seconds", "optimizer_seconds", "state_bytes", "data"]
CURVE_FIELDS = ["task", "format", "seed", "step", "value"]


def _fmt_row(name: str) -> dict:
    if name in PACKAGE_SHADOWS:
        return dict(map=name, block_size="", absmax="", rounding="", bytes_per_param="")
    fmt = Format.parse(name)
    return dict(
        map=fmt.map_name,
        block_size=fmt.block_size,
        absmax=fmt.absmax,
        rounding=fmt.rounding,
        bytes_per_param=f"{fmt.bytes_per_param:.4f}",
    )


def sign_table(sign: dict[str, dict[str, float]], finalists: list[str]) -> str:
    lines = [
        "| format | map | block | absmax | rounding | bytes/param | agreement, char-LM sequence "
        "| agreement, MLP sequence | MLP, momentum re-synced each step (diagnostic) | loss runs |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name in sorted(sign, key=lambda n: (-sign[n]["char-lm"], n)):
        row = _fmt_row(name)
        resync = f"{sign[name]['mlp-resync']:.4f}" if "mlp-resync" in sign[name] else ""
        lines.append(
            f"| `{name}` | {row['map']} | {row['block_size']} | {row['absmax']} | {row['rounding']} "
            f"| {row['bytes_per_param']} | {sign[name]['char-lm']:.4f} | {sign[name]['mlp']:.4f} "
            f"| {resync} | {'yes' if name in finalists else ''} |"
        )
    return "\n".join(lines)


def gate_table(result: dict, sign: dict) -> str:
    lines = [
        "| format | bytes/param | char-LM Δ val loss, per seed | mean Δ | bound | "
        "Fashion-MNIST Δ test acc (pp), per seed | mean Δ | bound | gate |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for name, entry in result["verdicts"].items():
        char, fashion = entry["char-lm"], entry["fashion"]
        bpp = (
            _fmt_row(name)["bytes_per_param"]
            if name != EIGHT_BIT
            else f"{Format.parse(name).bytes_per_param:.4f}"
        )
        lines.append(
            f"| `{name}` | {bpp} | {', '.join(f'{d:+.4f}' for d in char['deltas'])} | {char['mean']:+.4f} "
            f"| {char['bound']:.4f} {'✓' if char['passes'] else '✗'} "
            f"| {', '.join(f'{d:+.2f}' for d in fashion['deltas'])} | {fashion['mean']:+.2f} "
            f"| {fashion['bound']:.2f} {'✓' if fashion['passes'] else '✗'} "
            f"| {'**pass**' if entry['passes'] else 'fail'} |"
        )
    return "\n".join(lines)


def plot(path: Path, sign: dict, result: dict, curves: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), dpi=90)
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(MAPS)}
    ax = axes[0, 0]
    for name, values in sign.items():
        if name in PACKAGE_SHADOWS:
            ax.axhline(values["char-lm"], color="grey", lw=0.8, ls=":")
            ax.text(
                0.01,
                values["char-lm"],
                name,
                fontsize=7,
                va="bottom",
                color="grey",
                transform=ax.get_yaxis_transform(),
            )
            continue
        fmt = Format.parse(name)
        ax.scatter(
            fmt.bytes_per_param + (0.002 if fmt.rounding in STOCHASTIC else -0.002),
            values["char-lm"],
            color=colors[fmt.map_name],
            marker="o" if fmt.rounding == "nearest" else "^",
            s=22,
        )
    for map_name, color in colors.items():
        ax.scatter([], [], color=color, label=map_name)
    ax.scatter([], [], color="k", marker="o", label="nearest")
    ax.scatter([], [], color="k", marker="^", label="stochastic")
    ax.set_xlabel("state bytes / param")
    ax.set_ylabel("update-sign agreement with fp32 Lion")
    ax.set_title("(a) sign agreement, char-LM gradient sequence (300 steps)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)

    names = list(result["verdicts"])
    for ax, task, unit, title in (
        (axes[0, 1], "char-lm", "Δ final val loss (nats/char)", "(b) char-LM, paired with fp32 Lion"),
        (axes[1, 0], "fashion", "Δ final test accuracy (pp)", "(c) Fashion-MNIST, paired with fp32 Lion"),
    ):
        bound = result["bounds"][task]
        ax.axhspan(-bound, bound, color="green", alpha=0.1, label=f"gate ±{bound:.3g}")
        ax.axhline(0, color="k", lw=0.8)
        for i, name in enumerate(names):
            entry = result["verdicts"][name][task]
            ax.scatter([i] * len(entry["deltas"]), entry["deltas"], color="grey", s=12)
            ax.scatter([i], [entry["mean"]], color="green" if entry["passes"] else "red", marker="_", s=300)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(title + " (dots: seeds; bar: mean)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    ax = axes[1, 1]
    reference = {
        (int(r["seed"]), int(r["step"])): float(r["value"])
        for r in curves
        if r["task"] == "char-lm" and r["format"] == FP32
    }
    for i, name in enumerate(names):
        by_step = {}
        for r in curves:
            key = (int(r["seed"]), int(r["step"]))
            if r["task"] == "char-lm" and r["format"] == name and key in reference:
                by_step.setdefault(key[1], []).append(float(r["value"]) - reference[key])
        steps = sorted(by_step)
        ax.plot(
            steps,
            [statistics.fmean(by_step[s]) for s in steps],
            label=name,
            color=plt.get_cmap("tab10")(i % 10),
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("Δ val loss vs fp32 Lion (mean over seeds)")
    ax.set_title("(d) char-LM validation loss during training, minus fp32 Lion's", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reference_finals(runs: list[dict]) -> str:
    parts = []
    for task in TASKS:
        rows = sorted(
            (r for r in runs if r["task"] == task and r["format"] == FP32), key=lambda r: int(r["seed"])
        )
        parts.append(f"{task} " + ", ".join(f"{float(r['final']):.4f}" for r in rows))
    return "; ".join(parts)


SMOKE_LABEL = "SMOKE TEST (--quick: the examples' --quick settings, one seed), not evidence"


def write_report(
    prefix: Path, argv, quick: bool, started: str, checks, sign, finalists, runs, result, seconds: float
) -> None:
    command = shlex.join(["python", "benchmarks/study_4bit.py", *argv])
    data = sorted({f"{r['task']}: {r['data']}" for r in runs})
    lines = [
        "# 4-bit momentum for Lion: study results",
        "",
        *([f"**{SMOKE_LABEL}**", ""] if quick else []),
        "Written by `benchmarks/study_4bit.py`; the discussion and the verdict's reasoning are in "
        "[docs/4bit-study.md](../../docs/4bit-study.md).",
        "",
        f"Command: `{command}` (started {started}, {seconds / 60:.0f} min; results kept from earlier "
        "runs with `--resume` or `--parts` are in the CSVs)  ",
        f"Machine: {environment()}  ",
        f"Data: {'; '.join(data) or '–'}",
        "",
        "## Checks",
        "",
        *[f"- {'holds' if holds else '**FAILS**'}: {what}" for what, holds in checks],
        "",
        "## Maps",
        "",
        *[f"- `{name}`: {text}" for name, text in MAP_DESCRIPTIONS.items()],
        "",
        "## Update-sign agreement with fp32 Lion",
        "",
        "Share of (step, element) pairs whose update sign equals fp32 Lion's, every tensor stored in the "
        "format, each shadow keeping its own momentum (tests/test_sign_agreement.py's method). Sequences: "
        "the char-LM example's fp32-Lion run (seed 0, its hyper-parameters, clipped gradients) and the "
        "test's small MLP. `lion8bit 8bit` / `bf16` are the package's formats, for scale. The re-synced "
        "column is a diagnostic: each format's momentum replaced before every step by fp32 Lion's, encoded "
        "in the format, so that it counts one rounding only and none of the error the format's own "
        "trajectory accumulates.",
        "",
        sign_table(sign, finalists),
        "",
    ]
    if runs:
        lines += [
            "## Training runs: the gate",
            "",
            "Each format against fp32 Lion with the same initial weights and batches (per seed), at the "
            "examples' hyper-parameters; tensors under 4096 elements keep fp32 momentum (as "
            "`min_8bit_size`). Δ per seed = format's final value - fp32 Lion's; the gate takes the mean "
            f"over seeds. char-LM bound max(2σ, {CHAR_LM_FLOOR}) with σ = {result['sigma']['char-lm']:.4f} "
            f"(fp32 Lion's sample std over seeds); Fashion-MNIST bound {FASHION_BOUND} pp. `{EIGHT_BIT}` is "
            "lion8bit's 8-bit format, for scale; it is not a candidate.",
            "",
            gate_table(result, sign),
            "",
            "fp32 Lion's final values, per seed: " + reference_finals(runs) + ".",
            "",
        ]
        passing = [n for n, e in result["verdicts"].items() if e["passes"] and n != EIGHT_BIT]
        lines += ["## Verdict", ""]
        if quick:
            lines.append(f"None: {SMOKE_LABEL}.")
        elif passing:
            lines.append(f"Passing 4-bit formats: {', '.join(f'`{n}`' for n in passing)}.")
        else:
            lines.append("No 4-bit format passed the gate.")
        lines.append("")
    lines += [f"![study]({prefix.name}.png)", ""]
    prefix.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
