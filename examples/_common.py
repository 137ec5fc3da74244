"""What the example scripts share: data loading, the optimizers by name, schedule, CSV/PNG/tables.

The data is read from Debian packages already on disk (nothing is downloaded at run time):

- the King James Bible:  apt-get install bible-kjv bible-kjv-text   (dumped by the `bible` command)
- Fashion-MNIST:         apt-get install dataset-fashion-mnist      (idx files, parsed with numpy)

Each loader also has a tiny synthetic stand-in (``--data synthetic``) so CI can smoke-test the
scripts without those packages; results on it are labelled a smoke test, never evidence.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import lion8bit
from lion8bit.budget.optimizers import OPTIMIZER_NAMES

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SMOKE_LABEL = "SMOKE TEST on synthetic data, not evidence"


class DataMissing(RuntimeError):
    """The real data set is not installed; the message says how to get it."""


def load_data(choice: str, real: str, available, load_real, load_synthetic, real_label: str):
    """(name, data, label) of the data set to use: ``real`` or "synthetic".

    ``choice`` "auto" takes the real one when ``available()``, else the synthetic stand-in (and
    says so on stderr). A missing real data set ends the program with one line saying how to get it.
    """
    name = choice if choice != "auto" else (real if available() else "synthetic")
    try:
        data = load_real() if name == real else load_synthetic()
    except DataMissing as error:
        sys.exit(f"error: {error}")
    if name == "synthetic":
        print(f"*** {SMOKE_LABEL} ***", file=sys.stderr)
    return name, data, (real_label if name == real else SMOKE_LABEL)


# -- text ----------------------------------------------------------------------------------------

KJV_DATA = Path("/usr/lib/bible.data")
KJV_HINT = "install it with: sudo apt-get install bible-kjv bible-kjv-text"


def kjv_available() -> bool:
    return shutil.which("bible") is not None and KJV_DATA.exists()


def load_kjv() -> str:
    """The whole King James Bible (~4.4M characters), one verse per line, references stripped."""
    if not kjv_available():
        raise DataMissing(f"the King James Bible text (the `bible` command and {KJV_DATA}) is missing; {KJV_HINT}")
    # -f turns pretty-printing off: one "Book1:1 text" line per verse.
    dump = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    return "\n".join(line.split(" ", 1)[1] for line in dump.splitlines() if " " in line) + "\n"


_WORDS = (
    "the and of to in that he shall for unto i his a lord they be is him not them it with all thou "
    "thy was god which my me said but ye their have will thee from as are when this out were upon "
    "man by you israel king son up there hath then people came had house into on her come one we"
).split()


def synthetic_text(num_chars: int = 200_000, seed: int = 0) -> str:
    """Smoke-test text: sentences of common English words drawn from a fixed Zipf-like law."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(_WORDS) + 1)
    words = rng.choice(_WORDS, size=num_chars // 4, p=weights / weights.sum())
    lengths = rng.integers(6, 18, size=len(words))
    out, i = [], 0
    while i < len(words) and sum(map(len, out)) < num_chars:
        sentence = " ".join(words[i : i + lengths[i]])
        out.append(sentence[0].upper() + sentence[1:] + ".\n")
        i += lengths[i]
    return "".join(out)[:num_chars]


# -- images --------------------------------------------------------------------------------------

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HINT = "install it with: sudo apt-get install dataset-fashion-mnist"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_available(directory: Path = FASHION_DIR) -> bool:
    return all((directory / name).exists() for pair in _FASHION_FILES.values() for name in pair)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not): big-endian header, magic 0x00000800 | ndim, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"Invalid idx file {path}: magic {magic:#010x} is not unsigned-byte data")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(directory: Path = FASHION_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (60000x28x28 uint8, labels), "test": (10000x28x28, labels)}."""
    if not fashion_available(directory):
        raise DataMissing(f"Fashion-MNIST idx files are missing under {directory}; {FASHION_HINT}")
    return {
        split: (read_idx(directory / images), read_idx(directory / labels))
        for split, (images, labels) in _FASHION_FILES.items()
    }


def synthetic_images(num_train: int = 2048, num_test: int = 512, seed: int = 0):
    """Smoke-test stand-in for Fashion-MNIST: 10 random 28x28 prototypes plus noise, uint8."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(10, 28, 28))

    def draw(n):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = prototypes[labels] + rng.normal(0, 90, size=(n, 28, 28))
        return np.clip(images, 0, 255).astype(np.uint8), labels

    return {"train": draw(num_train), "test": draw(num_test)}


# -- optimizers ----------------------------------------------------------------------------------

# name -> what it is, for the optimizers these scripts train with: names and descriptions from the
# one vocabulary (lion8bit/budget/optimizers.py). --optimizers takes a comma-separated list of them.
OPTIMIZERS = {
    name: OPTIMIZER_NAMES[name]
    for name in (
        "lion8bit", "lion8bit-4bit", "lion8bit-bf16", "lion8bit-cautious", "lion-pytorch", "bnb-lion8bit", "adamw"
    )
}
# lion_pytorch.Lion: fp32 momentum for the scripts' fp32 params, the reference
REFERENCE = "lion-pytorch"
# The same update rule and hyper-parameters as the reference, only the momentum's storage differs:
# these are the ones the convergence check applies to.
SAME_UPDATE = ("lion8bit", "lion8bit-4bit", "lion8bit-bf16", "bnb-lion8bit")


# The package each optimizer needs beyond lion8bit and torch (all in the "examples" extra).
_PACKAGES = {
    "lion-pytorch": ("lion_pytorch", "lion-pytorch"),
    "bnb-lion8bit": ("bitsandbytes", "bitsandbytes"),
}


def parse_optimizers(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"Invalid optimizers: {text!r} (choose from {', '.join(OPTIMIZERS)})"
        )
    for name in names:
        module, package = _PACKAGES.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise argparse.ArgumentTypeError(
                f"optimizer {name!r} needs {package}: pip install -e '.[examples]' (or drop it from --optimizers)"
            )
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"Invalid seeds: {text!r} (expected e.g. 0,1,2)")
    return seeds


def add_optimizer_arguments(parser: argparse.ArgumentParser, *, lion_lr, lion_wd, adamw_lr, adamw_wd):
    group = parser.add_argument_group("optimizers")
    group.add_argument(
        "--optimizers",
        type=parse_optimizers,
        default=",".join(OPTIMIZERS),
        help="comma-separated, from: " + "; ".join(f"{name} = {what}" for name, what in OPTIMIZERS.items())
        + " (default: all)",
    )
    group.add_argument("--lion-lr", type=float, default=lion_lr, help="peak lr of every Lion (default: %(default)g)")
    group.add_argument(
        "--lion-wd", type=float, default=lion_wd, help="weight decay of every Lion (default: %(default)g)"
    )
    group.add_argument("--adamw-lr", type=float, default=adamw_lr, help="peak lr of AdamW (default: %(default)g)")
    group.add_argument("--adamw-wd", type=float, default=adamw_wd, help="weight decay of AdamW (default: %(default)g)")
    group.add_argument("--beta1", type=float, default=0.9, help="beta1 of every optimizer (default: %(default)g)")
    group.add_argument("--beta2", type=float, default=0.99, help="beta2 of every optimizer (default: %(default)g)")
    group.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (default: %(default)g)")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings only; biases and LayerNorm gains are not decayed."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model`` with the script's hyper-parameters (backend default)."""
    betas = (args.beta1, args.beta2)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, args.adamw_wd), lr=args.adamw_lr, betas=betas)
    groups = param_groups(model, args.lion_wd)
    if name == "lion8bit":
        return lion8bit.Lion8bit(groups, lr=args.lion_lr, betas=betas)
    if name == "lion8bit-4bit":
        return lion8bit.Lion(groups, lr=args.lion_lr, betas=betas, state="4bit")
    if name == "lion8bit-bf16":
        return lion8bit.Lion(groups, lr=args.lion_lr, betas=betas, state="bf16")
    if name == "lion8bit-cautious":
        return lion8bit.Lion8bit(groups, lr=args.lion_lr, betas=betas, cautious_factor=0.0)
    if name == "lion-pytorch":
        from lion_pytorch import Lion as LionPytorch

        return LionPytorch(groups, lr=args.lion_lr, betas=betas)
    if name == "bnb-lion8bit":
        # bitsandbytes warns and prints about optional GPU kernels on a CPU-only machine.
        warnings.filterwarnings("ignore", module="bitsandbytes")
        import bitsandbytes

        return bitsandbytes.optim.Lion8bit(groups, lr=args.lion_lr, betas=betas)
    raise ValueError(f"Invalid optimizer name: {name!r} (choose from {', '.join(OPTIMIZERS)})")


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors, each storage counted once (bitsandbytes shares its codebook)."""
    storages = {}
    for entry in optimizer.state.values():
        for value in entry.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def train_step(model: torch.nn.Module, optimizer, schedule, loss: torch.Tensor, grad_clip: float):
    """Backward, clip the global grad norm, one optimizer step, one schedule step.

    Returns (the lr this step used, seconds spent in ``optimizer.step()``).
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    optimizer.step()
    seconds = time.perf_counter() - start
    schedule.step()
    return lr, seconds


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int, final_ratio: float = 0.1):
    """Linear warmup to the peak lr over ``warmup`` steps, then cosine down to ``final_ratio`` of it."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- output --------------------------------------------------------------------------------------


def add_output_arguments(parser: argparse.ArgumentParser, default_prefix: str) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output prefix; writes PREFIX.csv, PREFIX.png, PREFIX.md "
        f"(default: examples/results/{default_prefix}, with _quick under --quick)",
    )


def output_prefix(args: argparse.Namespace, default_prefix: str) -> Path:
    if args.out is not None:
        prefix = args.out
    else:
        prefix = RESULTS_DIR / (default_prefix + ("_quick" if args.quick else ""))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return prefix


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(
    path: Path,
    curves: dict[str, dict[int, list[tuple[int, float]]]],
    *,
    title: str,
    ylabel: str,
    zoom_from: float = 0.5,
) -> None:
    """One line per optimizer (mean over seeds, shaded min..max), and a zoom on the last part.

    ``curves[optimizer][seed]`` is a list of (step, value).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=90)
    colors = plt.get_cmap("tab10")
    # Fixed colours per optimizer; the dashed fp32 reference is drawn last, on top of the others.
    for name, by_seed in sorted(curves.items(), key=lambda item: item[0] == REFERENCE):
        index = list(OPTIMIZERS).index(name)
        steps = np.array([s for s, _ in next(iter(by_seed.values()))])
        values = np.array([[v for _, v in run] for run in by_seed.values()])
        mean = values.mean(axis=0)
        style = dict(color=colors(index), lw=1.4, ls="--" if name == REFERENCE else "-")
        label = f"{name} ({len(by_seed)} seed{'s' if len(by_seed) > 1 else ''})"
        for ax in axes:
            ax.plot(steps, mean, label=label, **style)
            if len(by_seed) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colors(index), alpha=0.15, lw=0)
    last = max(s for by_seed in curves.values() for run in by_seed.values() for s, _ in run)
    tail = [v for by_seed in curves.values() for run in by_seed.values() for s, v in run if s >= zoom_from * last]
    axes[1].set_xlim(zoom_from * last, last * 1.01)
    if tail:
        low, high = min(tail), max(tail)
        margin = 0.05 * (high - low) + 1e-6
        axes[1].set_ylim(low - margin, high + margin)
    fig.suptitle(title, fontsize=10)
    axes[0].set_title("whole run (mean over seeds, band: min..max)", fontsize=9)
    axes[1].set_title(f"zoom: last {1 - zoom_from:.0%} of training", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 with one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def comparison_table(
    finals: dict[str, dict[int, dict[str, float]]],
    *,
    metric: str,
    metric_label: str,
    bound,
    bound_text: str,
    scale: float = 1.0,
    digits: int = 4,
) -> str:
    """Markdown table of the final metric, wall time and state bytes, with the check vs lion-pytorch.

    ``finals[optimizer][seed]`` holds the run's final numbers (``metric``, "seconds",
    "optimizer_seconds", "state_bytes"). Delta is the mean over seeds of the paired differences
    (same init, same batches) from the reference; sigma is the reference's sample standard
    deviation over seeds; ``bound(sigma)`` is the allowed |delta|, checked for the optimizers in
    ``SAME_UPDATE`` only (the cautious variant and AdamW are other algorithms: shown, not checked).
    """
    reference = finals.get(REFERENCE, {})
    ref_values = [reference[s][metric] * scale for s in reference]
    sigma = mean_std(ref_values)[1] if ref_values else float("nan")
    allowed = bound(sigma) if ref_values else float("nan")
    lines = [
        f"| optimizer | seeds | {metric_label} (mean ± std) | Δ vs {REFERENCE} | check: {bound_text} "
        "| wall time / run | optimizer step time / run | optimizer state |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, by_seed in finals.items():
        seeds = sorted(by_seed)
        mean, std = mean_std([by_seed[s][metric] * scale for s in seeds])
        paired = [by_seed[s][metric] * scale - reference[s][metric] * scale for s in seeds if s in reference]
        delta_text, check = "–", "–"
        if name != REFERENCE and paired:
            delta = statistics.fmean(paired)
            delta_text = f"{delta:+.{digits}f}"
            if name in SAME_UPDATE:
                check = f"{'pass' if abs(delta) <= allowed else 'FAIL'} (bound {allowed:.{digits}f})"
            else:
                check = "– (another update rule)"
        seconds = statistics.fmean(by_seed[s]["seconds"] for s in seeds)
        opt_seconds = statistics.fmean(by_seed[s]["optimizer_seconds"] for s in seeds)
        state_bytes = by_seed[seeds[0]]["state_bytes"]
        lines.append(
            f"| {name} | {len(seeds)} | {mean:.{digits}f} ± {std:.{digits}f} | {delta_text} | {check} "
            f"| {seconds:.1f} s | {opt_seconds:.1f} s | {state_bytes / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def progress_bar(total: int) -> tqdm:
    return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=1.0)


def write_report(prefix: Path, script: str, argv, description: str, table: str) -> None:
    """PREFIX.md: what was run, the command that reproduces it, the machine, the table; also printed."""
    command = shlex.join(["python", f"examples/{script}", *(sys.argv[1:] if argv is None else argv)])
    report = "\n".join([description, f"Command: `{command}`", f"Machine: {environment_line()}", "", table, ""])
    prefix.with_suffix(".md").write_text(report)
    print(report)
    print(f"wrote {prefix}.csv, {prefix}.png, {prefix}.md")


def environment_line() -> str:
    return (
        f"torch {torch.__version__}, lion8bit {lion8bit.__version__}, {platform.machine()} "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
