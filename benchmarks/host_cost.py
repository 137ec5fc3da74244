"""Host cost of one optimizer step: microseconds per tensor per step on many tiny tensors.

With 300 tensors of 64 elements and one torch thread the arithmetic is negligible, so what is
left is what an optimizer spends per tensor around its kernels: Python, dispatch, checks,
launches. Every optimizer steps the same params and grads in the same run, interleaved over
several rounds (the best round counts: the machine is shared), timed with the process's CPU
time (time.thread_time), which a busy neighbour perturbs less than the wall clock. The headline
is the ratio to torch.optim.AdamW(fused=True), measured in the same run.

    python benchmarks/host_cost.py            # writes benchmarks/results/host_cost.{csv,md}
    python benchmarks/host_cost.py --quick    # fewer rounds; a smoke run

bench_step.py's full run includes this table.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TENSORS, NUMEL = 300, 64
LR = 1e-4


def _lion8bit(backend, **options):
    from lion8bit import Lion

    # min_8bit_size=0: these tiny tensors get 8-bit (or 4-bit) momentum, the path this measures
    return lambda params: Lion(params, lr=LR, weight_decay=0.1, min_8bit_size=0, backend=backend, **options)


def _bitsandbytes(params):
    import bitsandbytes as bnb

    return bnb.optim.Lion8bit(params, lr=LR, weight_decay=0.1, min_8bit_size=0)


def _lion_pytorch(params):
    import lion_pytorch

    return lion_pytorch.Lion(params, lr=LR, weight_decay=0.1)


# (optimizer name of lion8bit.budget.optimizers, implementation) -> factory
OPTIMIZERS = {
    ("lion8bit", "cpu"): _lion8bit("cpu"),
    # Steps with rounding keys (4-bit momentum always rounds stochastically)
    ("lion8bit", "cpu, state=4bit"): _lion8bit("cpu", state="4bit"),
    ("lion8bit", "cpu, stochastic_rounding"): _lion8bit("cpu", stochastic_rounding=True),
    ("lion8bit", "torch"): _lion8bit("torch"),
    ("adamw", "fused"): lambda params: torch.optim.AdamW(params, lr=LR, fused=True),
    ("adamw", "foreach"): lambda params: torch.optim.AdamW(params, lr=LR, foreach=True),
    ("lion-pytorch", "for-loop"): _lion_pytorch,
    ("bnb-lion8bit", ""): _bitsandbytes,
}
BASELINE = ("adamw", "fused")


def _runner(factory, steps: int):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(NUMEL, generator=generator)) for _ in range(TENSORS)]
    for param in params:
        param.grad = torch.randn(NUMEL, generator=generator) * 1e-3
    optimizer = factory(params)
    for _ in range(3):  # state creation, kernel builds
        optimizer.step()

    def run() -> float:
        start = time.thread_time()
        for _ in range(steps):
            optimizer.step()
        return (time.thread_time() - start) / steps / TENSORS * 1e6

    return run


def measure(rounds: int = 7, steps: int = 50) -> list[dict]:
    """Best-of-rounds microseconds per tensor per step for every optimizer that imports here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runners = {}
        for key, factory in OPTIMIZERS.items():
            try:
                runners[key] = _runner(factory, steps)
            except (ImportError, RuntimeError) as error:  # a peer that is not installed or cannot run
                print(f"host cost: skipping {key}: {error}", file=sys.stderr)
        best = dict.fromkeys(runners, float("inf"))
        for _ in range(rounds):
            for key, run in runners.items():
                best[key] = min(best[key], run())
    finally:
        torch.set_num_threads(threads)
    baseline = best.get(BASELINE, float("nan"))
    return [
        {"optimizer": name, "implementation": implementation, "us_per_tensor": value,
         "x_adamw_fused": value / baseline, "tensors": TENSORS, "numel": NUMEL}
        for (name, implementation), value in best.items()
    ]


def markdown(rows: list[dict], env_line: str) -> str:
    lines = [
        f"Host cost per tensor per step: {TENSORS} tensors of {NUMEL} elements, 1 torch thread, best of "
        "interleaved rounds of CPU time; x AdamW fused: the ratio to torch.optim.AdamW(fused=True) "
        "in the same run.",
        "",
        env_line,
        "",
        "| optimizer | implementation | us / tensor / step | x AdamW fused |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['optimizer']} | {row['implementation'] or '-'} | {row['us_per_tensor']:.2f} | "
            f"{row['x_adamw_fused']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write(rows: list[dict], path: Path, env_line: str) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    path.with_suffix(".md").write_text(markdown(rows, env_line))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 10 steps: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (the markdown table goes next to it)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="bitsandbytes")
    rows = measure(rounds=2, steps=10) if args.quick else measure()
    out = args.out or RESULTS / ("host_cost_quick.csv" if args.quick else "host_cost.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    write(rows, out, env_line())
    print(markdown(rows, env_line()))
    return 0


def env_line() -> str:
    """What bench_step.py's full run writes above this table: versions, commit and CPU."""
    from bench_step_env import environment  # beside this script, as for bench_step.py

    env = environment()
    return f"lion8bit {env['lion8bit']}, torch {env['torch']}, {env['cpu']}"


if __name__ == "__main__":
    sys.exit(main())
