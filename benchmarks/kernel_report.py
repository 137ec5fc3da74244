"""What the fused Triton kernel compiles to on real GPUs, and the memory-bound time floor it implies.

Runs on a CPU-only machine: triton compiles the kernel for sm_80 (A100) and sm_90 (H100) without
a GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``), and the report reads
the artefacts: registers, spills and local memory (``cuobjdump -res-usage`` on the cubin), the
vector width of the param and grad accesses and the bytes each element moves (global loads and
stores in the PTX, attributed to the kernel argument their address comes from).

The time columns are a FLOOR, not a measurement: bytes per element x 7e9 parameters / peak
bandwidth (3.35 TB/s H100 SXM, 2.0 TB/s A100 80GB). No GPU time was measured.

The launches per step and the launch tables' bytes for GPT-2-small and Llama-2-7B are counted
from the launcher: the functional step on meta tensors, the kernels replaced by recorders.

    python benchmarks/kernel_report.py [--out benchmarks/results]

writes kernel_report.csv, kernel_report_launches.csv and kernel_report.md there and prints the
markdown.
The compiling and the reading of the artefacts are in benchmarks/kernel_report_compile.py;
tests/test_triton_compile.py asserts the same facts with its helpers, through this module.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, also when a test loads this file
from kernel_report_compile import (  # noqa: E402  (benchmarks/kernel_report_compile.py: compiling, reading)
    ABSMAX,
    Access,
    Variant,
    compile_count,
    compile_step,
    elements_per_thread,
    load_gpu_module,
)

TARGETS = {80: ("A100", 2.0e12), 90: ("H100", 3.35e12)}  # compute capability -> (GPU, bytes/s)
MODEL_PARAMS = 7e9
# (param dtype, grad dtype, state format): the combinations the report and the tests cover.
COMBINATIONS = [
    ("fp32", "fp32", "8bit"),
    ("bf16", "bf16", "8bit"),
    ("bf16", "fp32", "8bit"),
    ("fp16", "fp16", "8bit"),
    ("bf16", "bf16", "bf16"),
    ("fp32", "fp32", "fp32"),
    ("fp32", "fp32", "4bit"),
    ("bf16", "bf16", "4bit"),
    ("fp16", "fp32", "4bit"),
]
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1, "i32": 4}
_MOMENTUM_TYPE = {"8bit": "u8", "4bit": "u8", "bf16": "bf16", "fp32": "fp32"}
# Per-element tensors of the step, reached through the launch table's address columns (the rest
# are per block, per tensor, scalars or cached tables).
ELEMENT_ARGS = ("param", "grad", "momentum")


# ---------------------------------------------------------------------------------------------
# the report


def element_bytes(accesses: dict[str, list[Access]], per_thread: int, fmt: str, block_size: int) -> float:
    """Bytes moved per element by one step: per-element tensors plus absmax amortised per block."""
    total = sum(a.bytes for name in ELEMENT_ARGS for a in accesses.get(name, [])) / per_thread
    if fmt in ABSMAX:  # one absmax per block, read and / or written
        size, block = ABSMAX[fmt]
        total += size * len({a.kind for a in accesses.get("absmax", [])}) / (block or block_size)
    return total


def vector_bits(accesses: dict[str, list[Access]], names=("param", "grad")) -> int:
    return min(a.vector * a.bits for name in names for a in accesses.get(name, []))


def report_rows(module) -> list[dict]:
    from tqdm import tqdm

    per_thread = elements_per_thread(module)
    rows = []
    cases = [(cc, combination) for cc in TARGETS for combination in COMBINATIONS]
    for capability, (param, grad, fmt) in tqdm(cases, desc="compiling", unit="kernel"):
        gpu, bandwidth = TARGETS[capability]
        variant = Variant(param, grad, fmt)
        step = compile_step(module, variant, capability)
        count = compile_count(module, variant, capability)
        accesses, count_accesses = step.accesses(), count.accesses()
        unaligned = compile_step(module, Variant(param, grad, fmt, aligned=False), capability)
        usage = step.usage()
        capturable = compile_step(module, replace(variant, device_scalars=True), capability).usage()
        moved = element_bytes(accesses, per_thread, fmt, variant.block_size)
        prepass = element_bytes(count_accesses, per_thread, fmt, variant.block_size)
        rows.append(
            {
                "target": f"sm_{capability} ({gpu})",
                "param/grad/state": f"{param}/{grad}/{fmt}",
                "registers": usage["REG"],
                "registers (capturable)": capturable["REG"],
                "spill+stack bytes": sum(u["LOCAL"] + u["STACK"] for u in (usage, capturable)),
                "shared bytes": step.kernel.metadata.shared,
                "vector bits (aligned launch)": vector_bits(accesses),
                "momentum vector bits": vector_bits(accesses, ("momentum",)),
                "vector bits (other launch)": vector_bits(unaligned.accesses(strict=False)),
                "registers (other launch)": unaligned.usage()["REG"],
                "bytes/element": round(moved, 3),
                "+ cautious pre-pass": round(prepass, 3),
                "7B floor ms (FLOOR, not measured)": round(MODEL_PARAMS * moved / bandwidth * 1e3, 1),
                "7B floor ms with caution": round(
                    MODEL_PARAMS * (moved + prepass) / bandwidth * 1e3, 1
                ),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# launches per step, counted from the launcher

MODELS = ("gpt2", "llama-2-7b")  # lion8bit/budget/shapes.py's catalog: 148 and 291 tensors
# (param, grad, state, cautious): the default (bf16 mixed precision, 8-bit state), with caution,
# fp32 params, bf16 state.
LAUNCH_CONFIGS = [
    ("bf16", "bf16", "8bit", False),
    ("bf16", "bf16", "8bit", True),
    ("fp32", "fp32", "8bit", False),
    ("bf16", "bf16", "bf16", False),
]


class Recorder:
    """Stands in for a kernel: records the launch arguments instead of running."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def count_launches(
    model: str, param: str, grad: str, state: str, *, cautious: bool, stochastic: bool,
    block_size: int = 256, min_8bit_size: int = 4096,
) -> dict:
    """Launches of two steps of one param group holding every trainable tensor of a catalog
    model, counted from the launcher: the functional step (lion8bit.functional.lion, as the
    optimizer calls it) runs with backend="triton" on meta tensors (sizes without memory: every
    address is 0, as 16-byte aligned as the CUDA caching allocator's blocks), the kernels
    replaced by recorders. Returns the second step's launches and the tables' bytes."""
    import contextlib

    import torch

    import lion8bit.kernels.triton_lion as launcher
    from lion8bit import momentum as mom
    from lion8bit.budget import catalog_model
    from lion8bit.functional import BUFFER_KEYS, lion
    from lion8bit.reference import lion_scalars

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    shapes = [shape.shape for shape in catalog_model(model).params if shape.trainable]
    params = [torch.empty(shape, dtype=dtypes[param], device="meta") for shape in shapes]
    grads = [torch.empty(shape, dtype=dtypes[grad], device="meta") for shape in shapes]
    formats = [mom.momentum_format(p.numel(), state, min_8bit_size) for p in params]
    entries = [
        {mom.STEP: 1, mom.SR_SEED: index, **mom.new_momentum(p, fmt, block_size)}
        for index, (p, fmt) in enumerate(zip(params, formats, strict=True))
    ]
    group = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, cautious_factor=0.5 if cautious else 1.0)
    keys_position = launcher.fused._lion_step_kernel.arg_names.index("rounding_keys_ptr")
    step, count = Recorder(), Recorder()
    tables = launcher.TableCache()

    def one_step():
        step.launches.clear()
        count.launches.clear()
        lion(params, grads, entries, formats, scalars=lion_scalars(group), block_size=block_size,
             stochastic_rounding=stochastic, backend="triton")

    with contextlib.ExitStack() as stack:
        for owner, name, value in [
            (launcher.fused, "_lion_step_kernel", step), (launcher.fused, "_aligned_count_kernel", count),
            (launcher, "TABLES", tables), (launcher.TritonBackend, "device_error", lambda *args: None),
        ]:
            stack.callback(setattr, owner, name, getattr(owner, name))
            setattr(owner, name, value)
        for _ in range(2):
            builds = tables.builds
            one_step()
        second = tables.builds - builds
        # The launcher's own host work per step (the plan: a few attribute reads per tensor, the
        # cache lookup), and with every table to build again (every storage moved). Timed apart
        # from the functional: meta tensors run the small torch ops as Python reference code.
        momenta = [
            {key: entry[key] for key in BUFFER_KEYS[fmt]} for entry, fmt in zip(entries, formats, strict=True)
        ]
        buffers, codes = launcher._flat_buffers(momenta, formats)

        def plan():
            return launcher.plan_launches(params, grads, buffers, codes, None, block_size)

        warm = _least_seconds(plan)
        cold = _least_seconds(plan, before=lambda: setattr(launcher, "TABLES", launcher.TableCache()))
    keys = {id(args[keys_position]): args[keys_position].nbytes for _, args, _ in step.launches
            if args[keys_position] is not None}
    return {
        "tensors": len(params),
        "params": sum(p.numel() for p in params),
        "step launches": len(step.launches),
        "pre-pass launches": len(count.launches),
        "table bytes": tables.nbytes,
        "table builds, second step": second,
        "keys bytes per step": sum(keys.values()),
        "launcher host us per step": warm * 1e6,
        "launcher host us to rebuild the tables": (cold - warm) * 1e6,
    }


def _least_seconds(function, before=None, repeats: int = 30) -> float:
    """The least time of ``repeats`` calls: on a shared machine the others measure the load."""
    import time

    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def launch_rows() -> list[dict]:
    rows = []
    for model in MODELS:
        for param, grad, state, cautious in LAUNCH_CONFIGS:
            counted = count_launches(model, param, grad, state, cautious=cautious, stochastic=True)
            rows.append({
                "model": f"{model} ({counted['tensors']} tensors, {counted['params'] / 1e6:.0f}M params)",
                "param/grad/state": f"{param}/{grad}/{state}" + (", cautious" if cautious else ""),
                "launches/step": counted["step launches"] + counted["pre-pass launches"],
                "of them pre-pass": counted["pre-pass launches"],
                "per-tensor launches before": counted["tensors"] * (2 if cautious else 1),
                "table bytes (device, cached)": counted["table bytes"],
                "keys bytes/step (host to device)": counted["keys bytes per step"],
                "table builds on the second step": counted["table builds, second step"],
                "launcher host us/step": round(counted["launcher host us per step"]),
                "+ us to rebuild the tables": round(counted["launcher host us to rebuild the tables"]),
            })
    return rows


# ---------------------------------------------------------------------------------------------
# the report


def _table(rows: list[dict]) -> list[str]:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]


def markdown(rows: list[dict], launches: list[dict]) -> str:
    import torch
    import triton

    lines = [
        "# lion8bit fused Triton kernel: compiled resources, launches and time floor",
        "",
        f"Machine: {platform.machine()} {platform.system()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, triton {triton.__version__}; compiled for the targets "
        "below on a CPU-only machine, nothing run on a GPU.",
        "",
        "One launch updates all tensors of a param group that share param dtype, grad dtype, state "
        "format and alignment, through a table of their addresses (lion8bit/kernels/triton_lion.py). "
        "\"aligned launch\": tensors on 16-byte boundaries with numel % 16 == 0 (every tensor of a "
        "model whose params the caching allocator placed), compiled with that hint; \"other "
        "launch\": the rest.",
        "",
        "Floors are bytes/element x 7e9 / peak bandwidth (A100 2.0 TB/s, H100 3.35 TB/s): a lower "
        "bound for a memory-bound kernel, NOT a measurement. Bytes count global traffic of the "
        "per-element tensors plus the absmax (8-bit: 4 bytes read and 4 written per 256 elements; "
        "4-bit: 2 and 2 per 32); the codebook and requantization-table gathers (8-bit) hit a "
        "6.6 KB table held in cache, the 4-bit levels' gathers a 64-byte one: not counted, nor "
        "are a program's ~20 scalar reads of the launch table (64 bytes per tensor, cached), "
        "about 0.08 bytes per element even if none hit a cache.",
        "",
        *_table(rows),
        "",
        "## Launches per step, counted from the launcher",
        "",
        "One param group holding every trainable tensor of the model, stochastic rounding on; "
        "the functional step runs twice on meta tensors with recording stand-ins for the kernels "
        "(count_launches in this script). \"per-tensor launches before\": the launcher before the "
        "launch tables (one launch per tensor, and one more per tensor for the pre-pass). Keys: "
        "the per-step int64 [n, 2] stochastic-rounding keys, one non_blocking copy. Besides the "
        "launches, a step issues a few small torch ops per group (the keys' copy; with caution, "
        "the counts' zeroing, the step sizes and their stack). Launcher host us: the least time "
        "(of 30) of the launcher's planning of one step (plan_launches in lion8bit/kernels/triton_lion.py: "
        "per tensor a few attribute reads, then the table cache's lookup), without the launches "
        "themselves, on this machine (load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs when written); \"to rebuild\": what a "
        "step whose tables all had to be built again (every storage moved) adds.",
        "",
        *_table(launches),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    module = load_gpu_module()
    rows = report_rows(module)
    launches = launch_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in [("kernel_report.csv", rows), ("kernel_report_launches.csv", launches)]:
        with open(args.out / name, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    text = markdown(rows, launches)
    (args.out / "kernel_report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
