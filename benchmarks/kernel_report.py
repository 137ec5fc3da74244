"""What the fused Triton kernel compiles to on real GPUs, and the memory-bound time floor it implies.

Runs on a CPU-only machine: triton compiles the kernel for sm_80 (A100) and sm_90 (H100) without
a GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``), and the report reads
the artefacts: registers, spills and local memory (``cuobjdump -res-usage`` on the cubin), the
vector width of the param and grad accesses and the bytes each element moves (global loads and
stores in the PTX, attributed to the kernel argument their address comes from).

The time columns are a FLOOR, not a measurement: bytes per element x 7e9 parameters / peak
bandwidth (3.35 TB/s H100 SXM, 2.0 TB/s A100 80GB). No GPU time was measured.

    python benchmarks/kernel_report.py [--out benchmarks/results]

writes kernel_report.csv and kernel_report.md there and prints the markdown table.
tests/test_triton_compile.py asserts the same facts with the helpers below.
"""

from __future__ import annotations

import argparse
import collections
import csv
import platform
import re
import subprocess
import tempfile
from dataclasses import dataclass
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
]
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "u8": 1, "i32": 4}
_MOMENTUM_TYPE = {"8bit": "u8", "bf16": "bf16", "fp32": "fp32"}
# Per-element tensors of the step (the rest are per block, scalars or cached tables).
ELEMENT_ARGS = ("param_ptr", "grad_ptr", "momentum_ptr")


def load_gpu_module():
    """lion8bit/kernels/triton_lion.py, decorated for the GPU compiler.

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
    # What a launch infers from 16-byte-aligned tensors whose numel is a multiple of 16.
    aligned: bool = True


def compile_step(module, variant: Variant, capability: int):
    """The step kernel compiled as the launcher would launch it (same constexprs and options)."""
    kernel = module._lion_step_kernel
    v = variant
    quant_block, rows = module._layout(v.fmt, v.block_size)
    eight_bit = v.fmt == "8bit"
    pointers = {
        "param_ptr": v.param,
        "momentum_ptr": _MOMENTUM_TYPE[v.fmt],
        "absmax_ptr": "fp32" if eight_bit else None,
        "grad_ptr": v.grad,
        "code_values_ptr": "fp32" if eight_bit else None,
        "requant_table_ptr": "i32" if eight_bit else None,
        "cautious_steps_ptr": "fp32" if v.cautious else None,
        "skip_ptr": None,
    }
    scalars = dict(numel="i32", param_key="i32", momentum_key="i32", element_offset="i64")
    scalars.update(
        {n: "fp32" for n in ("lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay")}
    )
    constexprs = dict(
        FORMAT=v.fmt,
        MAXIMIZE=False,
        CAUTIOUS=v.cautious,
        CAUTIOUS_MASK=False,
        WEIGHT_DECAY=v.weight_decay,
        CAUTIOUS_WEIGHT_DECAY=v.cautious_weight_decay,
        STOCHASTIC_PARAM=v.stochastic and v.param != "fp32",
        STOCHASTIC_MOMENTUM=v.stochastic and v.fmt == "bf16",
        SKIP=False,
        QUANT_BLOCK=quant_block,
        ROWS=rows,
    )
    return _compile(module, kernel, pointers, scalars, constexprs, v, capability)


def compile_count(module, variant: Variant, capability: int):
    """The cautious pre-pass kernel compiled as the launcher would launch it."""
    v = variant
    quant_block, rows = module._layout(v.fmt, v.block_size)
    eight_bit = v.fmt == "8bit"
    pointers = {
        "grad_ptr": v.grad,
        "momentum_ptr": _MOMENTUM_TYPE[v.fmt],
        "absmax_ptr": "fp32" if eight_bit else None,
        "code_values_ptr": "fp32" if eight_bit else None,
        "partial_counts_ptr": "i32",
    }
    scalars = dict(numel="i32", beta1="fp32", one_minus_beta1="fp32")
    constexprs = dict(FORMAT=v.fmt, MAXIMIZE=False, QUANT_BLOCK=quant_block, ROWS=rows)
    kernel = module._aligned_count_kernel
    return _compile(module, kernel, pointers, scalars, constexprs, v, capability)


def _compile(module, kernel, pointers, scalars, constexprs, variant, capability):
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
    if variant.aligned:
        for name in [n for n, t in signature.items() if t.startswith("*")] + ["numel"]:
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    ordered = {name: signature[name] for name in kernel.arg_names}
    source = ASTSource(kernel, ordered, constexprs, attrs)
    options = dict(num_warps=module._NUM_WARPS, enable_fp_fusion=False)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    # The PTX parameters are the non-constexpr arguments, in order.
    return Compiled(compiled, [name for name, kind in ordered.items() if kind != "constexpr"])


@dataclass
class Compiled:
    kernel: object  # triton's CompiledKernel: .asm["ttir" | "ptx" | "cubin"], .metadata
    runtime_args: list[str]

    def accesses(self) -> dict[str, list[Access]]:
        return ptx_accesses(self.kernel.asm["ptx"], self.runtime_args)

    def usage(self) -> dict[str, int]:
        return resource_usage(self.kernel.asm["cubin"])


def elements_per_thread(module) -> int:
    return module._TILE // (32 * module._NUM_WARPS)


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
    kind: str  # "ld" | "st"
    vector: int  # elements per instruction: 1, 2 or 4
    bits: int  # bits per element
    predicated: bool

    @property
    def bytes(self) -> int:
        return self.vector * self.bits // 8


def ptx_accesses(ptx: str, runtime_args: list[str]) -> dict[str, list[Access]]:
    """Global loads and stores of one thread, grouped by the kernel argument of their address.

    Follows the PTX def-use chains (Triton's PTX is straight-line code with virtual registers)
    from ``ld.param`` of each argument to the address register of every ``ld/st.global``; a
    loaded value starts a new chain, so a gather is attributed to the table it reads, not to
    the tensor its index came from. Raises if an address derives from no argument or from two.
    """
    body = ptx[ptx.index(".entry") : ptx.index("$L__func_end0")]
    origins: dict[str, set[int]] = collections.defaultdict(set)
    instructions = []  # (predicated, opcode, operands)
    for line in body.splitlines():
        match = re.match(r"\s*(@!?%p\d+\s+)?([a-z][\w.]*)\s*(.*?);?\s*$", line.split("//")[0])
        if match:
            instructions.append((match.group(1) is not None, match.group(2), match.group(3)))
    for _ in range(2):  # a second pass settles any register used before its (re)definition
        for predicated, opcode, operands in instructions:
            param = re.search(r"(%\w+),\s*\[\w+_param_(\d+)\]", operands)
            if opcode.startswith("ld.param") and param:
                origins[param.group(1)].add(int(param.group(2)))
            elif not re.match(r"(ld|st|atom|red)\.", opcode):  # a loaded value is data
                registers = _REGISTER.findall(operands)
                for source in registers[1:]:
                    origins[registers[0]] |= origins[source]
    accesses: dict[str, list[Access]] = collections.defaultdict(list)
    for predicated, opcode, operands in instructions:
        match = re.match(r"(ld|st)\.global\S*", opcode)
        if not match:
            continue
        address = re.search(r"\[\s*(%\w+)", operands).group(1)
        # Offsets mix in scalars (numel, masks); the base is the one pointer (names end in _ptr).
        roots = {runtime_args[i] for i in origins[address] if i < len(runtime_args)}
        roots = {name for name in roots if name.endswith("_ptr")}
        if len(roots) != 1:
            raise ValueError(f"cannot attribute {opcode} {operands} to one argument: {sorted(roots)}")
        vector = re.search(r"\.v(\d)", opcode)
        bits = int(re.search(r"\.[bsuf](\d+)$", opcode).group(1))
        access = Access(match.group(1), int(vector.group(1)) if vector else 1, bits, predicated)
        accesses[roots.pop()].append(access)
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
    for name, (op, base, line) in definitions.items():
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


def element_bytes(accesses: dict[str, list[Access]], per_thread: int, block_size: int) -> float:
    """Bytes moved per element by one step: per-element tensors plus absmax amortised per block."""
    total = sum(a.bytes for name in ELEMENT_ARGS for a in accesses.get(name, [])) / per_thread
    # One fp32 absmax per block, read and / or written.
    total += 4 * len({a.kind for a in accesses.get("absmax_ptr", [])}) / block_size
    return total


def vector_bits(accesses: dict[str, list[Access]], names=("param_ptr", "grad_ptr")) -> int:
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
        moved = element_bytes(accesses, per_thread, variant.block_size)
        prepass = element_bytes(count_accesses, per_thread, variant.block_size)
        rows.append(
            {
                "target": f"sm_{capability} ({gpu})",
                "param/grad/state": f"{param}/{grad}/{fmt}",
                "registers": usage["REG"],
                "spill+stack bytes": usage["LOCAL"] + usage["STACK"],
                "shared bytes": step.kernel.metadata.shared,
                "vector bits (numel%16==0)": vector_bits(accesses),
                "vector bits (other numel)": vector_bits(unaligned.accesses()),
                "bytes/element": round(moved, 3),
                "+ cautious pre-pass": round(prepass, 3),
                "7B floor ms (FLOOR, not measured)": round(MODEL_PARAMS * moved / bandwidth * 1e3, 1),
                "7B floor ms with caution": round(
                    MODEL_PARAMS * (moved + prepass) / bandwidth * 1e3, 1
                ),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    import torch
    import triton

    header = list(rows[0])
    lines = [
        "# lion8bit fused Triton kernel: compiled resources and time floor",
        "",
        f"Machine: {platform.machine()} {platform.system()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, triton {triton.__version__}; compiled for the targets "
        "below on a CPU-only machine, nothing run on a GPU.",
        "",
        "Floors are bytes/element x 7e9 / peak bandwidth (A100 2.0 TB/s, H100 3.35 TB/s): a lower "
        "bound for a memory-bound kernel, NOT a measurement. Bytes count global traffic of the "
        "per-element tensors plus 8 bytes of absmax per 256 elements; the codebook and "
        "requantization-table gathers hit a 6.6 KB table held in cache and are not counted.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    lines += ["| " + " | ".join(str(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    module = load_gpu_module()
    rows = report_rows(module)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "kernel_report.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (args.out / "kernel_report.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
