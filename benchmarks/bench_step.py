"""Optimizer step time on CPU: lion8bit against the optimizers it replaces, in one run.

For each problem (one 16.8M- and one 64M-element tensor, a GPT-2-small-shaped model) and param
dtype, every optimizer steps the same params and grads: lion8bit (8-bit, bf16 and fp32 state;
backend "cpu", the fused kernel, and "torch", the reference, the latter on the 16.8M tensor only:
it takes seconds per step), bitsandbytes.optim.Lion8bit, lion_pytorch.Lion and its foreach
variant, torch.optim.AdamW (foreach). A GPT-2-shaped 279M-parameter model checks lion8bit's
peak memory. Per optimizer: the first step (state creation and, for the fused kernel, loading
it) on its own, then the median and p20/p80 of the next steps; the bytes the update must move
(params read + written, grads read, state read + written); GB/s achieved; the ratio to the
memory floor (those bytes / the bandwidth of a large in-memory copy, measured right before the
optimizer's steps); the optimizer state's bytes; and how much the peak resident memory grows
during one step (Linux: VmHWM after resetting it).

Optimizers are named as everywhere in the project (``lion8bit/budget/optimizers.py``); how one
ran (lion8bit's backend, a foreach implementation) is the ``backend`` column, not part of its name.

The machine is shared and noisy: the headline figures are ratios within one run. Results go to
a CSV (one row per optimizer and problem, with the machine, versions, time and load average)
and a markdown table.

    python benchmarks/bench_step.py            # the full run (~10 min on an idle 2-core machine)
    python benchmarks/bench_step.py --quick    # a 1M-element smoke run, under 2 minutes
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from lion8bit import Lion

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_cost  # noqa: E402  (benchmarks/host_cost.py, beside this script)
from bench_step_env import environment, kernel_build_seconds  # noqa: E402  (the machine and versions)

RESULTS = Path(__file__).resolve().parent / "results"
LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.99), 0.1
MIB = 2**20


# -- problems ------------------------------------------------------------------------------------


def gpt2_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024):
    """Parameter shapes of GPT-2 (small: 12 layers of 768, 124.4M params in 148 tensors)."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return shapes + [(width,), (width,)]


@dataclass
class Problem:
    name: str
    shapes: list
    dtype: torch.dtype
    optimizers: list  # keys of OPTIMIZERS: (optimizer name, backend)
    params: list = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(torch.Size(shape).numel() for shape in self.shapes)

    def materialize(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.params = []
        for shape in self.shapes:
            param = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(self.dtype))
            param.grad = (torch.randn(shape, generator=generator) * 1e-3).to(self.dtype)
            self.params.append(param)

    def release(self):
        self.params = []
        gc.collect()


def _lion8bit(state, backend):
    return lambda params: Lion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, state=state, backend=backend)


def _bitsandbytes(params):
    import bitsandbytes as bnb

    return bnb.optim.Lion8bit(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def _lion_pytorch(params):
    import lion_pytorch

    return lion_pytorch.Lion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def _lion_pytorch_foreach(params):
    from lion_pytorch.foreach import Lion as ForeachLion

    return ForeachLion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01, foreach=True)


@dataclass(frozen=True)
class Variant:
    optimizer: str  # its name in lion8bit.budget.optimizers.OPTIMIZER_NAMES
    backend: str  # how it runs: lion8bit's backend, torch's or lion-pytorch's implementation ("": one)
    implementation: str
    state_kind: str
    factory: Callable


# (optimizer name, backend) -> how to make it. The names are the vocabulary's, shared with
# `lion8bit budget` and the examples; the backend is a column of its own, not part of the name.
OPTIMIZERS = {
    (variant.optimizer, variant.backend): variant
    for variant in (
        Variant("lion8bit", "cpu", "lion8bit.Lion", "8bit", _lion8bit("8bit", "cpu")),
        Variant("lion8bit-4bit", "cpu", "lion8bit.Lion", "4bit", _lion8bit("4bit", "cpu")),
        Variant("lion8bit-bf16", "cpu", "lion8bit.Lion", "bf16", _lion8bit("bf16", "cpu")),
        Variant("lion8bit-fp32", "cpu", "lion8bit.Lion", "fp32", _lion8bit("fp32", "cpu")),
        Variant("lion8bit", "torch", "lion8bit.Lion", "8bit", _lion8bit("8bit", "torch")),
        Variant("lion8bit-bf16", "torch", "lion8bit.Lion", "bf16", _lion8bit("bf16", "torch")),
        Variant("lion8bit-fp32", "torch", "lion8bit.Lion", "fp32", _lion8bit("fp32", "torch")),
        Variant("bnb-lion8bit", "", "bitsandbytes.optim.Lion8bit", "8bit", _bitsandbytes),
        Variant("lion-pytorch", "for-loop", "lion_pytorch.Lion", "param dtype", _lion_pytorch),
        Variant("lion-pytorch", "foreach", "lion_pytorch.foreach.Lion", "param dtype", _lion_pytorch_foreach),
        Variant("adamw", "foreach", "torch.optim.AdamW(foreach)", "param dtype x2", _adamw),
    )
}
FUSED = [key for key in OPTIMIZERS if key[1] == "cpu"]
PEERS = [
    ("bnb-lion8bit", ""), ("lion-pytorch", "for-loop"), ("lion-pytorch", "foreach"), ("adamw", "foreach")
]
REFERENCE = [key for key in OPTIMIZERS if key[1] == "torch"]
HEADLINE = ("lion8bit", "cpu")
FOUR_BIT = ("lion8bit-4bit", "cpu")
# The headline's columns: the 4-bit state's step, then the peers', each over the 8-bit step.
COMPARED = [FOUR_BIT, *PEERS]


def problems(quick: bool) -> list[Problem]:
    found = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if quick:
            if dtype is not torch.float16:
                found.append(Problem("tensor-1M", [(1024, 1024)], dtype, FUSED + REFERENCE + PEERS))
            continue
        if dtype is not torch.float16:
            found.append(Problem("tensor-16.8M", [(4096, 4096)], dtype, FUSED + REFERENCE + PEERS))
        found.append(Problem("tensor-64M", [(8192, 8192)], dtype, FUSED + PEERS))
        found.append(Problem("gpt2-small-124M", gpt2_shapes(), dtype, FUSED + PEERS))
    if not quick:
        # Bounded temporaries on a model of more than 256M params: 18 GPT-2-medium layers (width
        # 1024) and the embeddings, 279M params in 220 tensors.
        found.append(Problem("gpt2-279M", gpt2_shapes(layers=18, width=1024), torch.float32, [HEADLINE]))
    return found


# -- measurements --------------------------------------------------------------------------------


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()
if LIBC is not None:
    # A fixed mmap threshold: freed large buffers go back to the OS at once, so the resident
    # size before a step is what is live (glibc otherwise raises the threshold after a free and
    # keeps up to 32 MiB buffers in its heap, hiding a peer's temporaries from the next step).
    LIBC.mallopt(-3, 1 * MIB)  # M_MMAP_THRESHOLD


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_growth_mib(step) -> float | None:
    """Peak resident memory during step() above the resident memory before it (Linux)."""
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """GB/s (read + write) of copying a buffer larger than the last-level cache."""
    source = torch.ones(nbytes // 4)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9


def state_bytes(optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for entry in optimizer.state.values()
        for value in entry.values()
        if isinstance(value, torch.Tensor)
    )


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(problem: Problem, key: tuple[str, str], steps: int) -> dict:
    variant = OPTIMIZERS[key]
    optimizer = variant.factory(problem.params)
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    growth = peak_growth_mib(optimizer.step)
    param_bytes = sum(p.numel() * p.element_size() for p in problem.params)
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in problem.params)
    state = state_bytes(optimizer)
    del optimizer
    gc.collect()
    median = statistics.median(times)
    moved = 2 * param_bytes + grad_bytes + 2 * state
    return dict(
        optimizer=variant.optimizer, implementation=variant.implementation, state_kind=variant.state_kind,
        backend=variant.backend, state_bytes=state,
        steps=steps, first_step_ms=first * 1e3, median_ms=median * 1e3,
        p20_ms=percentile(times, 0.2) * 1e3, p80_ms=percentile(times, 0.8) * 1e3,
        bytes_moved=moved, gbps=moved / median / 1e9, peak_growth_mib=growth,
    )


def paired_ratio(problem: Problem, first: tuple[str, str], second: tuple[str, str], steps: int) -> float:
    """Median over rounds of second's step time / first's, their steps alternating on the same
    params: both see the same machine load, which drifts on a shared machine (the 8-bit step on
    the 64M fp32 tensor: 29.4 and 38.6 ms medians in two runs 9 hours apart here)."""
    optimizers = [OPTIMIZERS[key].factory(problem.params) for key in (first, second)]
    for optimizer in optimizers:
        optimizer.step()
    ratios = []
    for _ in range(steps):
        times = []
        for optimizer in optimizers:
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        ratios.append(times[1] / times[0])
    del optimizers
    gc.collect()
    return statistics.median(ratios)


# -- output --------------------------------------------------------------------------------------

COLUMNS = [
    "timestamp", "machine", "cpu", "threads", "python", "torch", "triton", "bitsandbytes", "lion_pytorch",
    "lion8bit", "problem", "param_dtype", "numel", "tensors", "optimizer", "implementation", "state_kind",
    "backend", "steps", "first_step_ms", "median_ms", "p20_ms", "p80_ms", "bytes_moved", "gbps",
    "copy_gbps", "copy_mib", "floor_ms", "x_floor", "x_lion8bit", "x_lion8bit_paired", "state_bytes",
    "peak_growth_mib", "load_before", "load_after", "kernel_build_s",
]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_csv(rows, path: Path):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {key: (f"{value:.4g}" if isinstance(value, float) else value) for key, value in row.items()}
            )


def _fmt(value, spec=".1f", missing="n/a"):
    return missing if value is None else format(value, spec)


def markdown(rows, env: dict, command: str) -> str:
    lines = [
        f"Measured {env['timestamp']} on {env['cpu']}, {env['machine']}, {env['threads']} threads; "
        f"torch {env['torch']}, triton {env['triton']}, bitsandbytes {env['bitsandbytes']}, "
        f"lion-pytorch {env['lion_pytorch']}, lion8bit {env['lion8bit']}. "
        f"Fused kernel build (once per machine, then cached): {rows[0]['kernel_build_s']:.1f} s. "
        f"Reproduce: `{command}`.",
        "",
        "Headline (same-run ratios): lion8bit's fused 8-bit step against the memory floor and the peers "
        "(x = times slower than `lion8bit` on backend `cpu`; optimizer (backend); the 4-bit column "
        "is the median of step-by-step ratios with the two optimizers' steps alternating, the others "
        "are the rows' medians).",
        "",
        "| problem | params | lion8bit (cpu) ms | floor ms | x floor | "
        + " | ".join(f"{name} ({backend})" if backend else name for name, backend in COMPARED)
        + " | peak growth MiB | load |",
        "| --- | --- | ---: | ---: | ---: | " + "---: | " * len(COMPARED) + "---: | --- |",
    ]
    by_problem = {}
    for row in rows:
        by_problem.setdefault((row["problem"], row["param_dtype"]), []).append(row)
    for (problem, dtype), group in by_problem.items():
        named = {(row["optimizer"], row["backend"]): row for row in group}
        ours = named.get(HEADLINE)
        if ours is None:
            continue

        def ratio(key, named=named):
            row = named.get(key)
            if row and row.get("x_lion8bit_paired"):
                return f"{row['x_lion8bit_paired']:.2f}x"
            return f"{row['x_lion8bit']:.1f}x" if row else "-"

        lines.append(
            f"| {problem} | {dtype} | {ours['median_ms']:.1f} | {ours['floor_ms']:.1f} | {ours['x_floor']:.2f} | "
            + " | ".join(ratio(key) for key in COMPARED)
            + f" | {_fmt(ours['peak_growth_mib'])} | {ours['load_before']:.1f}-{ours['load_after']:.1f} |"
        )
    lines += [
        "",
        "All rows (median and p20-p80 over the timed steps after the first; GB/s and floor from the bytes "
        "each update must move: params read + written, grads read, state read + written; floor = those "
        f"bytes / the bandwidth (read + write) of copying {rows[0]['copy_mib']} MiB, measured right before "
        "each row; load = the 1-minute load average before and after the row):",
        "",
        "| problem | params | optimizer | implementation | state | backend | first step ms | median ms | "
        "p20-p80 ms | GB/s | copy GB/s | x floor | x lion8bit | state MiB | peak growth MiB | load |",
        "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['problem']} | {row['param_dtype']} | {row['optimizer']} | {row['implementation']} | "
            f"{row['state_kind']} | "
            f"{row['backend'] or '-'} | {row['first_step_ms']:.0f} | {row['median_ms']:.1f} | "
            f"{row['p20_ms']:.1f}-{row['p80_ms']:.1f} | {row['gbps']:.1f} | {row['copy_gbps']:.1f} | "
            f"{row['x_floor']:.2f} | {row['x_lion8bit']:.2f} | {row['state_bytes'] / MIB:.1f} | "
            f"{_fmt(row['peak_growth_mib'])} | {row['load_before']:.1f}-{row['load_after']:.1f} |"
        )
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1M-element smoke run (under 2 minutes)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer (>= 20 in the full run)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (the markdown table goes next to it)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise ValueError(f"Invalid steps: {args.steps}")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    out = args.out or RESULTS / ("bench_step_quick.csv" if args.quick else "bench_step.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_step.py" + (" --quick" if args.quick else "")

    env = environment()
    build_seconds = kernel_build_seconds()
    cases = problems(args.quick)
    rows = []
    copy_bytes = (256 if args.quick else 1024) * MIB // 2
    with tqdm(total=sum(len(case.optimizers) for case in cases), unit="optimizer", dynamic_ncols=True) as bar:
        for case in cases:
            case.materialize()
            measured = []
            for key in case.optimizers:
                bar.set_description(f"{case.name} {_dtype_name(case.dtype)} {' '.join(filter(None, key))}")
                load_before = os.getloadavg()[0]
                # The floor's bandwidth right before each row: the machine is shared, and its
                # load changes within a problem.
                bandwidth = copy_bandwidth(copy_bytes)
                row = measure(case, key, args.steps)
                floor_ms = row["bytes_moved"] / (bandwidth * 1e9) * 1e3
                measured.append(
                    {
                        **row,
                        "copy_gbps": bandwidth,
                        "copy_mib": copy_bytes // MIB,
                        "floor_ms": floor_ms,
                        "x_floor": row["median_ms"] / floor_ms,
                        "load_before": load_before,
                        "load_after": os.getloadavg()[0],
                    }
                )
                bar.update()
            baseline = next(
                (row["median_ms"] for row in measured if (row["optimizer"], row["backend"]) == HEADLINE), None
            )
            paired = None
            if HEADLINE in case.optimizers and FOUR_BIT in case.optimizers:
                bar.set_description(f"{case.name} {_dtype_name(case.dtype)} 4-bit / 8-bit, alternating")
                paired = paired_ratio(case, HEADLINE, FOUR_BIT, args.steps)
            for row in measured:
                rows.append(
                    {
                        **env,
                        "problem": case.name,
                        "param_dtype": _dtype_name(case.dtype),
                        "numel": case.numel,
                        "tensors": len(case.shapes),
                        **row,
                        "x_lion8bit": row["median_ms"] / baseline if baseline else float("nan"),
                        "x_lion8bit_paired": paired if (row["optimizer"], row["backend"]) == FOUR_BIT else None,
                        "kernel_build_s": build_seconds,
                    }
                )
            case.release()
    write_csv(rows, out)
    table = markdown(rows, env, command)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    if not args.quick:  # the host-cost table: us per tensor per step on many tiny tensors
        host_rows = host_cost.measure()
        host_out = out.with_name("host_cost.csv")
        host_cost.write(host_rows, host_out, host_cost.env_line())
        print(host_out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
