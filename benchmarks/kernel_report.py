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
tests/test_triton_compile.py asserts the same facts with the helpers below.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import platform
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

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
# Elements per byte of momentum codes ("4bit": two per byte).
CODES_PER_BYTE = {"4bit": 2}
# The absmax of the quantized formats: its bytes, and elements per block (None: the variant's block_size).
ABSMAX = {"8bit": (4, None), "4bit": (2, 32)}
# Per-element tensors of the step, reached through the launch table's address columns (the rest
# are per block, per tensor, scalars or cached tables).
ELEMENT_ARGS = ("param", "grad", "momentum")


def load_gpu_module():
    """lion8bit/kernels/triton_lion.py (its kernels in triton_lion_kernels.py), decorated for the GPU compiler.

    triton reads TRITON_INTERPRET when @triton.jit runs (its own tl.max / tl.sum when
    triton.language is imported), so kernels decorated for the interpreter cannot be compiled:
    this needs a process started without it.
    """
    from lion8bit import kernels

    if kernels.interpreting():
        raise RuntimeError("compiling the kernels needs a process without TRITON_INTERPRET=1")
    import lion8bit.kernels.triton_lion as module

    return module


@dataclass(frozen=True)
class Variant:
    param: str = "fp32"
    grad: str = "fp32"
    fmt: str = "8bit"
    cautious: bool = True
    stochastic: bool = True
    weight_decay: bool = True
    cautious_weight_decay: bool = True
    block_size: int = 256
    # The launch of 16-byte-aligned tensors whose numel is a multiple of 16 (the launcher's
    # ALIGNED hint); False: the launch of the others.
    aligned: bool = True
    device_scalars: bool = False  # capturable: the scalars read from a device tensor


_TL_TYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The launch table's columns holding addresses: what is read or written through each.
POINTER_COLUMNS = {
    "param_ptrs": "param", "grad_ptrs": "grad", "momentum_ptrs": "momentum", "absmax_ptrs": "absmax"
}
# The kernels' arguments that are the table's columns (lion8bit/kernels/triton_lion_kernels.py COLUMNS).
TABLE_ARGS = ("param_ptrs", "grad_ptrs", "momentum_ptrs", "absmax_ptrs", "numels", "element_offsets",
              "first_tiles", "slots")


def _tl_type(name: str):
    import triton.language as tl

    return getattr(tl, _TL_TYPES[name])


def compile_step(module, variant: Variant, capability: int):
    """The step kernel compiled as the launcher would launch it (same constexprs and options)."""
    fused = module.fused
    kernel = fused._lion_step_kernel
    v = variant
    quant_block, rows = fused.layout(v.fmt, v.block_size)
    eight_bit = v.fmt == "8bit"
    pointers = {name: "i64" for name in TABLE_ARGS}
    pointers.update({
        "code_values_ptr": "fp32" if v.fmt in ABSMAX else None,
        "requant_table_ptr": "i32" if eight_bit else None,
        # "4bit" momentum rounds stochastically whatever the option: its keys are always passed
        "rounding_keys_ptr": "i64" if v.stochastic or v.fmt == "4bit" else None,
        "cautious_steps_ptr": "fp32" if v.cautious else None,
        "step_scalars_ptr": "fp32" if v.device_scalars else None,
        "skip_ptr": None,
    })
    scalars = dict(rows="i32")
    scalars.update(
        {n: "fp32" for n in ("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay")}
    )
    constexprs = dict(
        PARAM_TYPE=_tl_type(v.param),
        GRAD_TYPE=_tl_type(v.grad),
        FORMAT=v.fmt,
        MAXIMIZE=False,
        CAUTIOUS=v.cautious,
        CAUTIOUS_MASK=False,
        WEIGHT_DECAY=v.weight_decay,
        CAUTIOUS_WEIGHT_DECAY=v.cautious_weight_decay,
        STOCHASTIC_PARAM=v.stochastic and v.param != "fp32",
        STOCHASTIC_MOMENTUM=v.stochastic and v.fmt == "bf16",
        SKIP=False,
        DEVICE_SCALARS=v.device_scalars,
        ALIGNED=v.aligned,
        QUANT_BLOCK=quant_block,
        ROWS=rows,
    )
    return _compile(module, kernel, pointers, scalars, constexprs, capability)


def compile_count(module, variant: Variant, capability: int):
    """The cautious pre-pass kernel compiled as the launcher would launch it."""
    fused = module.fused
    v = variant
    quant_block, rows = fused.layout(v.fmt, v.block_size)
    pointers = {name: "i64" for name in TABLE_ARGS if name not in ("param_ptrs", "element_offsets")}
    pointers.update({
        "code_values_ptr": "fp32" if v.fmt in ABSMAX else None,
        "step_scalars_ptr": "fp32" if v.device_scalars else None,
        "counts_ptr": "i64",
    })
    scalars = dict(rows="i32", beta1="fp32", one_minus_beta1="fp32")
    constexprs = dict(
        GRAD_TYPE=_tl_type(v.grad), FORMAT=v.fmt, MAXIMIZE=False, DEVICE_SCALARS=v.device_scalars,
        ALIGNED=v.aligned, QUANT_BLOCK=quant_block, ROWS=rows,
    )
    return _compile(module, fused._aligned_count_kernel, pointers, scalars, constexprs, capability)


def _compile(module, kernel, pointers, scalars, constexprs, capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for name, dtype in pointers.items():
        if dtype is None:  # the launcher passes None: a constexpr
            signature[name] = "constexpr"
            constexprs[name] = None
        else:
            signature[name] = "*" + dtype
    signature.update(scalars)
    signature.update({name: "constexpr" for name in constexprs})
    # Every pointer argument is a whole allocation or a table column starting on a 16-byte
    # boundary (the launcher keeps them so): a launch specializes them as divisible by 16.
    for name in [n for n, t in signature.items() if t.startswith("*")]:
        attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    ordered = {name: signature[name] for name in kernel.arg_names}
    source = ASTSource(kernel, ordered, constexprs, attrs)
    options = dict(num_warps=module.fused._NUM_WARPS, enable_fp_fusion=False)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    # The PTX parameters are the non-constexpr arguments, in order.
    runtime = [name for name, kind in ordered.items() if kind != "constexpr"]
    return Compiled(compiled, runtime, {name for name in runtime if ordered[name].startswith("*")})


@dataclass
class Compiled:
    kernel: object  # triton's CompiledKernel: .asm["ttir" | "ptx" | "cubin"], .metadata
    runtime_args: list[str]
    pointer_args: set[str]

    def accesses(self, strict: bool = True) -> dict[str, list[Access]]:
        return ptx_accesses(self.kernel.asm["ptx"], self.runtime_args, self.pointer_args, POINTER_COLUMNS, strict)

    def usage(self) -> dict[str, int]:
        return resource_usage(self.kernel.asm["cubin"])


def elements_per_thread(module) -> int:
    return module.fused._TILE // (32 * module.fused._NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# reading the artefacts


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL, ... of the kernel, from cuobjdump -res-usage."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [str(tool), "-res-usage", file.name], check=True, capture_output=True, text=True
        ).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}


_REGISTER = re.compile(r"%[a-z]+\d+")


@dataclass
class Access:
    kind: str  # "ld" | "st" | "atomic"
    vector: int  # elements per instruction: 1, 2 or 4
    bits: int  # bits per element
    predicated: bool

    @property
    def bytes(self) -> int:
        return self.vector * self.bits // 8


def ptx_accesses(
    ptx: str, runtime_args: list[str], pointer_args: set[str], pointer_columns: dict[str, str] | None = None,
    strict: bool = True,
) -> dict[str, list[Access]]:
    """Global loads, stores and atomics of one thread, grouped by the pointer their address comes from.

    Follows the PTX def-use chains (Triton's PTX has no loops here and virtual registers) from
    ``ld.param`` of each argument to the address register of every global access. A loaded
    value starts a new chain, so a gather is attributed to the table it reads, not to the tensor
    its index came from — except a value loaded from a column of ``pointer_columns`` (the launch
    table's addresses), which is the base pointer of a tensor: accesses through it are
    attributed to the column's name for that tensor ("param" for "param_ptrs"). Scalars mixed
    into offsets (sizes, row numbers) are not pointers and are left out. Raises if an address
    derives from no pointer or from two; with ``strict`` off, such accesses are listed under
    "unattributed" instead (an address that went through shared memory: with the 4-bit levels
    gathered after unpacking, triton 3.6 converted the gathers' pointers between thread layouts
    there).
    """
    pointer_columns = pointer_columns or {}
    body = ptx[ptx.index(".entry") : ptx.index("$L__func_end0")]
    origins: dict[str, set[str]] = collections.defaultdict(set)
    instructions = []  # (predicated, opcode, operands)
    for line in body.splitlines():
        match = re.match(r"\s*(@!?%p\d+\s+)?([a-z][\w.]*)\s*(.*?);?\s*$", line.split("//")[0])
        if match:
            instructions.append((match.group(1) is not None, match.group(2), match.group(3)))
    pointers = set(pointer_args) | set(pointer_columns.values())

    def roots_of(register: str) -> set[str]:
        return {name for name in origins[register] if name in pointers}

    changed = True
    while changed:  # until every register's origins are settled (a use may precede a redefinition)
        changed = False
        for _, opcode, operands in instructions:
            registers = _REGISTER.findall(operands)
            param = re.search(r"(%\w+),\s*\[\w+_param_(\d+)\]", operands)
            if opcode.startswith("ld.param") and param:
                found = {runtime_args[int(param.group(2))]}
            elif opcode.startswith("ld.global") and registers:
                address = re.search(r"\[\s*(%\w+)", operands).group(1)
                columns = roots_of(address) & set(pointer_columns)
                found = {pointer_columns[columns.pop()]} if len(columns) == 1 else set()
            elif not re.match(r"(ld|st|atom|red)\.", opcode) and registers:  # a loaded value is data
                found = set().union(*(origins[source] for source in registers[1:]))
            else:
                continue
            if not found <= origins[registers[0]]:
                origins[registers[0]] |= found
                changed = True
    accesses: dict[str, list[Access]] = collections.defaultdict(list)
    for predicated, opcode, operands in instructions:
        match = re.match(r"(ld|st|atom|red)\.global\S*", opcode)
        if not match:
            continue
        roots = roots_of(re.search(r"\[\s*(%\w+)", operands).group(1))
        if len(roots) != 1 and strict:
            raise ValueError(f"cannot attribute {opcode} {operands} to one pointer: {sorted(roots)}")
        if len(roots) != 1:
            roots = {"unattributed"}
        vector = re.search(r"\.v(\d)", opcode)
        bits = int(re.search(r"\.[bsuf](\d+)$", opcode).group(1))
        kind = "atomic" if match.group(1) in ("atom", "red") else match.group(1)
        accesses[roots.pop()].append(Access(kind, int(vector.group(1)) if vector else 1, bits, predicated))
    return dict(accesses)


def addptr_offset_types(ttir: str) -> dict[str, set[str]]:
    """Per pointer argument, the element types of the offsets added to it (tt.addptr) in TTIR."""
    header = re.search(r"tt\.func public @\w+\((.*?)\)\s*(?:attributes|\{)", ttir, re.S).group(1)
    arguments = set(re.findall(r"%(\w+):", header))
    definitions = {}
    for line in ttir.splitlines():
        match = re.match(r"\s*%([\w#]+) = ([\w.]+) %([\w#]+)", line)
        if match:
            definitions[match.group(1)] = (match.group(2), match.group(3), line)
    offsets: dict[str, set[str]] = collections.defaultdict(set)
    for op, base, line in definitions.values():
        if op != "tt.addptr":
            continue
        root = base
        while root not in arguments and root in definitions:
            root = definitions[root][1]
        offset_type = re.search(r":\s*[^,]+,\s*(?:tensor<[\dx]*)?(i\d+)", line).group(1)
        offsets[root].add(offset_type)
    return dict(offsets)


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
