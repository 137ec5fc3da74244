"""The fused Triton kernel compiled for sm_80 / sm_90 on a machine without a GPU, and what the
artefacts say: registers, spills and local memory (the cubin), the global loads and stores of each
kernel argument (the PTX) and the offsets added to each pointer (the TTIR). benchmarks/kernel_report.py
reports these facts; tests/test_triton_compile.py asserts them, through kernel_report.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The absmax of the quantized formats: its bytes, and elements per block (None: the variant's block_size).
ABSMAX = {"8bit": (4, None), "4bit": (2, 32)}


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
