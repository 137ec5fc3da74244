"""The fused kernel compiled for real GPUs (sm_80, sm_90) on this CPU-only machine.

triton compiles for a GPUTarget without a GPU; these tests read what it produced: the cubin's
resource usage (cuobjdump), the PTX's global loads and stores attributed to the kernel argument
their address comes from, and the TTIR's pointer arithmetic. The compile helpers are
benchmarks/kernel_report_compile.py's, read through benchmarks/kernel_report.py (the report prints
the same facts). Kernels decorated for Triton's interpreter cannot be compiled, so without a GPU
(where tests/conftest.py turns the interpreter on) this file runs in a pytest process of its own,
started by tests/test_triton_process.py.
"""

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lion8bit import kernels, quant
from lion8bit import momentum as mom
from lion8bit.reference import lion_scalars, rounding_keys

from helpers import load_script

triton = pytest.importorskip("triton")
if kernels.interpreting():
    pytest.skip(
        "kernels decorated for the interpreter do not compile: tests/test_triton_process.py runs this file "
        "with TRITON_INTERPRET=0",
        allow_module_level=True,
    )

_REPORT = Path(__file__).parents[1] / "benchmarks" / "kernel_report.py"
report = load_script(_REPORT, "kernel_report")
compiling = importlib.import_module("kernel_report_compile")  # its sibling, on the path kernel_report set

TARGETS = sorted(report.TARGETS)
COMBINATIONS = report.COMBINATIONS
_ids = ["/".join(c) for c in COMBINATIONS]
every_target_and_combination = pytest.mark.parametrize(
    "capability, combination",
    [(capability, combination) for capability in TARGETS for combination in COMBINATIONS],
    ids=[f"sm_{capability}-{name}" for capability in TARGETS for name in _ids],
)


@pytest.fixture(scope="module")
def module():
    return report.load_gpu_module()


@pytest.fixture(scope="module")
def compiled(module):
    """Compiled kernels by (kernel, variant, capability), each compiled once."""
    cache = {}

    def get(kind, variant, capability):
        key = (kind, variant, capability)
        if key not in cache:
            compile_ = report.compile_step if kind == "step" else report.compile_count
            cache[key] = compile_(module, variant, capability)
        return cache[key]

    return get


# Registers per thread: at 128, blocks of 4 warps keep >= 4 per SM (65536 registers). The
# capturable variant (scalars loaded into registers instead of read from the constant bank) may
# take 168 (>= 3 blocks per SM): triton 3.6 compiles some combinations to 138-144 (3.9: <= 106).
REGISTER_BUDGETS = {False: 128, True: 168}
# "4bit" requantizes with three level gathers, a correctly rounded division and a random draw per
# element: 136-168 registers with triton 3.9 (fp32 params the most), >= 2 blocks of 4 warps per
# SM at 184 (65536 / (184 * 128) = 2.8), still no spills.
REGISTER_BUDGET_4BIT = 184


@every_target_and_combination
@pytest.mark.parametrize("device_scalars", [False, True], ids=["scalars", "device-scalars"])
def test_no_spills_and_no_local_memory(compiled, capability, combination, device_scalars):
    budget = REGISTER_BUDGET_4BIT if combination[2] == "4bit" else REGISTER_BUDGETS[device_scalars]
    for kind in ("step", "count"):
        kernel = compiled(kind, report.Variant(*combination, device_scalars=device_scalars), capability)
        usage = kernel.usage()
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (kind, usage)
        assert usage["REG"] <= budget, (kind, usage)
        assert ".local" not in kernel.kernel.asm["ptx"]


def _check_elementwise(accesses, name, dtype, per_thread, kinds=("ld", "st")):
    """Each of a thread's elements of ``name`` is loaded / stored exactly once, in 128-bit accesses."""
    for kind in kinds:
        found = [a for a in accesses.get(name, []) if a.kind == kind]
        assert found, (name, kind)
        assert all(a.vector * a.bits == 128 for a in found), (name, kind, found)
        assert sum(a.bytes for a in found) == per_thread * report.BYTES[dtype], (name, kind, found)


def _check_table_reads(module, accesses, columns):
    """Each table column the kernel needs is read once per program (8-byte scalar loads), the
    first-tile column once per halving of the row search and once for the tile's place."""
    for name in columns:
        reads = accesses[name]
        assert all(a.kind == "ld" and a.bytes == 8 for a in reads), (name, reads)
        expected = module.fused._SEARCH_STEPS.value + 1 if name == "first_tiles" else 1
        assert len(reads) == expected, (name, reads)


def _rounding_streams(param, fmt) -> int:
    return (param != "fp32") + (fmt in ("bf16", "4bit"))  # bf16 / fp16 params, bf16 or 4-bit momentum


def _check_nibbles(accesses, element_type, per_thread, kinds=("ld", "st")):
    """4-bit codes: each byte (two elements) loaded / stored once, in runs as wide as the codes
    of one 128-bit vector of ``element_type`` (the elements' thread layout: 4 bytes for 16-bit
    elements, 2 for fp32), so no layout conversion through shared memory is needed."""
    for kind in kinds:
        found = [a for a in accesses["momentum"] if a.kind == kind]
        assert found and all(a.vector * a.bits == 64 // report.BYTES[element_type] for a in found), (kind, found)
        assert sum(a.bytes for a in found) == per_thread // 2, (kind, found)


@every_target_and_combination
def test_step_reads_and_writes_each_element_once_in_128_bit_vectors(
    module, compiled, capability, combination
):
    param, grad, fmt = combination
    accesses = compiled("step", report.Variant(*combination), capability).accesses()
    per_thread = report.elements_per_thread(module)
    _check_elementwise(accesses, "param", param, per_thread)
    _check_elementwise(accesses, "grad", grad, per_thread, kinds=("ld",))
    if fmt == "4bit":
        _check_nibbles(accesses, param, per_thread)
    else:
        _check_elementwise(accesses, "momentum", report._MOMENTUM_TYPE[fmt], per_thread)
    columns = {"param_ptrs", "grad_ptrs", "momentum_ptrs", "numels", "first_tiles", "slots"}
    steps = accesses["cautious_steps_ptr"]
    assert [a.kind for a in steps] == ["ld", "ld"]  # the two step sizes, once per thread
    expected = {"param", "grad", "momentum", "cautious_steps_ptr"}
    streams = _rounding_streams(param, fmt)
    if streams:  # each key used, once; the element offset places the bits
        assert [a.kind for a in accesses["rounding_keys_ptr"]] == ["ld"] * streams
        expected.add("rounding_keys_ptr")
        columns.add("element_offsets")
    if fmt in ("8bit", "4bit"):
        expected |= {"absmax", "code_values_ptr"}
        columns.add("absmax_ptrs")
        absmax = accesses["absmax"]
        rows = module.fused.layout(fmt, 256)[1]
        loads = [a for a in absmax if a.kind == "ld"]
        stores = [a for a in absmax if a.kind == "st"]
        size = {"8bit": 4, "4bit": 2}[fmt]  # fp32 / bf16 absmax
        # A thread's elements lie in at most `rows` blocks: one absmax load each; the new absmax
        # is one predicated store (triton keeps one owner thread per block).
        assert 1 <= len(loads) <= rows and all(a.bytes == size for a in loads)
        assert len(stores) == 1 and stores[0].predicated and stores[0].bytes == size
        # 8-bit: one codebook and one requantization-table gather per element; 4-bit: one level
        # gather (decode: its new codes come from the grid, no table).
        tables = {"8bit": {"code_values_ptr": 1, "requant_table_ptr": 1}, "4bit": {"code_values_ptr": 1}}[fmt]
        expected |= set(tables)
        for table, per_element in tables.items():
            gathers = accesses[table]
            assert len(gathers) == per_element * per_thread
            assert all(a.kind == "ld" and a.bytes == 4 for a in gathers)
    _check_table_reads(module, accesses, columns)
    assert set(accesses) == expected | columns


@every_target_and_combination
def test_count_pre_pass_reads_only_grad_and_momentum(module, compiled, capability, combination):
    param, grad, fmt = combination
    accesses = compiled("count", report.Variant(*combination), capability).accesses()
    per_thread = report.elements_per_thread(module)
    _check_elementwise(accesses, "grad", grad, per_thread, kinds=("ld",))
    if fmt == "4bit":
        _check_nibbles(accesses, grad, per_thread, kinds=("ld",))
    else:
        _check_elementwise(accesses, "momentum", report._MOMENTUM_TYPE[fmt], per_thread, kinds=("ld",))
    # One atomic add of the tile's count per program, by one thread.
    counts = accesses["counts_ptr"]
    assert [(a.kind, a.bytes) for a in counts] == [("atomic", 8)] and counts[0].predicated
    readable = {"grad", "momentum"}
    columns = {"grad_ptrs", "momentum_ptrs", "numels", "first_tiles", "slots"}
    if fmt in ("8bit", "4bit"):
        readable |= {"absmax", "code_values_ptr"}
        columns.add("absmax_ptrs")
    _check_table_reads(module, accesses, columns)
    assert set(accesses) == readable | columns | {"counts_ptr"}
    assert all(a.kind == "ld" for name in readable for a in accesses[name])


def test_unaligned_launch_still_compiles_to_exact_accesses(module, compiled):
    # The launch of tensors off 16-byte boundaries or with numel % 16 != 0 has no ALIGNED hint:
    # triton cannot prove a 4-element mask uniform, so scalar accesses, still one per element
    # (the report shows the vector width of both launches).
    accesses = compiled("step", report.Variant("bf16", "bf16", "8bit", aligned=False), 90).accesses()
    per_thread = report.elements_per_thread(module)
    params = [a for a in accesses["param"] if a.kind == "ld"]
    assert sum(a.bytes for a in params) == per_thread * 2
    assert max(a.vector * a.bits for a in params) < 128


@pytest.mark.parametrize("capability", TARGETS)
def test_unaligned_4bit_launch_compiles_without_spills(module, compiled, capability):
    # Without the hint, params and grads are scalar accesses laid out one element per thread along
    # a row, while decoding holds a byte's two elements in one thread: triton converts between the
    # two through shared memory (4 KB) and takes 182-214 registers with triton 3.9 (strict=False:
    # should an address go through shared memory too, as gathering after the join once did). No
    # spills; each element of param and grad still loaded once. Such tensors are rare: numel % 16
    # != 0 or off 16 bytes, and "4bit" tensors have >= min_8bit_size elements.
    per_thread = report.elements_per_thread(module)
    for kind in ("step", "count"):
        kernel = compiled(kind, report.Variant("fp32", "fp32", "4bit", aligned=False), capability)
        usage = kernel.usage()
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0 and usage["REG"] <= 255, (kind, usage)
        accesses = kernel.accesses(strict=False)
        for name in ("param", "grad") if kind == "step" else ("grad",):
            loads = [a for a in accesses[name] if a.kind == "ld"]
            assert sum(a.bytes for a in loads) == per_thread * 4, (kind, name, loads)
        assert sum(a.bytes for a in accesses["momentum"] if a.kind == "ld") == per_thread // 2


@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("cautious", [False, True])
def test_device_scalars_are_six_loads_and_keep_the_vectors(module, capability, cautious):
    """capturable: the scalars come from a device tensor (6 loads per program, 5 with caution,
    whose step sizes replace lr; 2 for the pre-pass) instead of launch arguments; the elements'
    accesses do not change (registers: test_no_spills_and_no_local_memory)."""
    variant = report.Variant("bf16", "bf16", "8bit", cautious=cautious, device_scalars=True)
    accesses = report.compile_step(module, variant, capability).accesses()
    assert [a.kind for a in accesses["step_scalars_ptr"]] == ["ld"] * (6 - cautious)
    _check_elementwise(accesses, "param", "bf16", report.elements_per_thread(module))
    count = report.compile_count(module, variant, capability).accesses()
    assert [a.kind for a in count["step_scalars_ptr"]] == ["ld"] * 2


@pytest.mark.parametrize("capability", TARGETS)
def test_no_fma_contraction_and_a_correctly_rounded_reciprocal(compiled, capability):
    # The reference rounds each product and sum; enable_fp_fusion=False must keep them apart,
    # in the pre-pass too (its count is of sign(m*beta1 + g*(1 - beta1))).
    for kind in ("count", "step"):
        ptx = compiled(kind, report.Variant("fp32", "fp32", "8bit"), capability).kernel.asm["ptx"]
        assert not re.search(r"\bfma\.", ptx), kind
        assert re.search(r"\bmul\.rn\.f32|\bmul\.f32", ptx) and re.search(r"\b(add|sub)(\.rn)?\.f32", ptx)
    # the step's PTX:
    assert re.search(r"\bdiv\.rn\.f32", ptx)  # 1 / absmax, as torch.reciprocal
    assert not re.search(r"\bdiv\.(full|approx)\.f32", ptx)
    # 4-bit: 7.5 / absmax per block as torch divides, and no division per element (the grid's
    # codes are a floor and a compare); its multiply and add stay two roundings
    ptx = compiled("step", report.Variant("bf16", "bf16", "4bit"), capability).kernel.asm["ptx"]
    per_thread = report.elements_per_thread(report.load_gpu_module())
    assert 0 < len(re.findall(r"\bdiv\.rn\.f32", ptx)) < per_thread
    # floor; libdevice's is the flush-to-zero one, which is floor here: t >= 0 after the clamp,
    # and never subnormal (0 or at least 2**-21, triton_lion_nibbles.codes)
    assert re.search(r"\bcvt\.rmi(\.ftz)?\.f32\.f32", ptx)
    assert not re.search(r"\bdiv\.(full|approx)\.f32|\bfma\.", ptx)


@pytest.mark.parametrize("combination", COMBINATIONS, ids=_ids)
def test_offsets_are_64_bit(compiled, combination):
    # Tensors past 2**31 elements: every offset into a per-element or per-block tensor is i64.
    # Their pointers come from the table's address columns, so the offsets are grouped there
    # (with the row offset of the column's own load, i64 too).
    for kind in ("step", "count"):
        ttir = compiled(kind, report.Variant(*combination), 90).kernel.asm["ttir"]
        offsets = compiling.addptr_offset_types(ttir)
        for name in ("param_ptrs", "grad_ptrs", "momentum_ptrs", "absmax_ptrs"):
            if name in offsets:
                assert offsets[name] == {"i64"}, (kind, name, offsets[name])
        assert "grad_ptrs" in offsets and "momentum_ptrs" in offsets


# ---------------------------------------------------------------------------------------------
# the launcher, without launching


class _Recorder:
    """Stands in for a kernel: records the launch arguments instead of running."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def _seed_with_key(predicate) -> int:
    """A seed whose rounding key at step 1 (param stream) satisfies ``predicate``."""
    return next(s for s in range(10_000) if predicate(quant.rounding_key(s, 1, quant.STREAM_PARAM)))


def test_new_lr_step_seed_or_tensors_reuse_the_compiled_kernel(module, monkeypatch):
    """Triton's cache key (the specialization of every argument) of the launches the launcher
    makes for a new lr (a numpy float64 too), step, seed, element offset, or another number of
    tensors at other addresses is the same: no recompilation. Scalars are fp32 values; keys,
    offsets and addresses are in tensors; the row count is never specialized on and the table's
    columns always start on 16-byte boundaries."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = module.fused._lion_step_kernel
    target = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, target)
    recorder = _Recorder()
    monkeypatch.setattr(module.fused, "_lion_step_kernel", recorder)
    monkeypatch.setattr(module, "INTERPRETED", True)  # CPU tensors pass; nothing is launched

    def launch(param_dtype, lr, seed, step, tensors=1, offset=0, step_scalars=None):
        params = [torch.zeros(4096 + 256 * index, dtype=param_dtype) for index in range(tensors)]
        group = dict(lr=lr, betas=(0.9, 0.99), weight_decay=0.1, cautious_factor=0.5)
        module.load().lion_step(
            params, [torch.zeros_like(p) for p in params], [mom.new_momentum(p, "8bit", 256) for p in params],
            ["8bit"] * tensors, scalars=lion_scalars(group), block_size=256,
            rounding_keys=[rounding_keys(seed, step)] * tensors, cautious_steps=[torch.ones(2)] * tensors,
            skip=None, element_offsets=[offset] * tensors, step_scalars=step_scalars,
        )
        grid, args, kwargs = recorder.launches[-1]
        return binder(*args, **kwargs)[1]  # the specialization

    large = _seed_with_key(lambda k: k >= 2**31)
    divisible = _seed_with_key(lambda k: k % 16 == 0)
    first = launch(torch.bfloat16, 1e-3, 0, 1)
    for lr, seed, step, tensors, offset in [
        (3e-4, 5, 1, 1, 0), (np.float64(0.1), large, 1, 1, 0), (1e-3, divisible, 1, 1, 0),
        (1e-3, 0, 2**33 + 1, 1, 0),
        (1e-3, 0, 1, 2, 0), (1e-3, 0, 1, 5, 256), (1e-3, 0, 1, 16, 2**33),
    ]:
        case = (lr, seed, step, tensors, offset)
        assert launch(torch.bfloat16, *case) == first, case
    assert launch(torch.float16, 1e-3, 0, 1) != first  # the key does tell kernels apart
    assert launch(torch.bfloat16, 1e-3, 0, 1, step_scalars=torch.ones(6)) != first  # capturable: a variant
    _, args, kwargs = recorder.launches[0]
    assert kwargs["enable_fp_fusion"] is False and "num_warps" in kwargs


@pytest.mark.parametrize("model, tensors", [("gpt2", 148), ("llama-2-7b", 291)])
def test_one_launch_per_format_for_a_model_in_one_group(model, tensors):
    """Counted from the launcher (benchmarks/kernel_report.py runs the functional step on meta
    tensors with recording stand-ins for the kernels): all of a model's tensors in one group
    take one launch per momentum format present (8-bit, and fp32 for tensors under
    min_8bit_size), one more each for the cautious pre-pass; the launch tables are 64 bytes
    per tensor (+ one row per table)."""
    plain = report.count_launches(model, "bf16", "bf16", "8bit", cautious=False, stochastic=True)
    cautious = report.count_launches(model, "bf16", "bf16", "8bit", cautious=True, stochastic=True)
    formats = {"gpt2": 2, "llama-2-7b": 1}[model]  # GPT-2's 768-element norms and biases are fp32
    assert plain["tensors"] == tensors
    assert plain["step launches"] == formats and plain["pre-pass launches"] == 0
    assert cautious["step launches"] == formats and cautious["pre-pass launches"] == formats
    assert tensors * 64 < plain["table bytes"] <= (tensors + 2 * formats) * 64
    assert cautious["table builds, second step"] == 0  # the same tensors: the cached tables
    assert plain["keys bytes per step"] == tensors * 16


def test_every_launch_turns_fma_contraction_off(module, monkeypatch):
    """The compile checks above compile as the launcher launches: with enable_fp_fusion=False
    for the step and for the pre-pass (triton 3.9 fuses by default, the interpreter never)."""
    recorders = {name: _Recorder() for name in ("_lion_step_kernel", "_aligned_count_kernel")}
    for name, recorder in recorders.items():
        monkeypatch.setattr(module.fused, name, recorder)
    monkeypatch.setattr(module, "INTERPRETED", True)  # CPU tensors pass; nothing is launched
    params = [torch.zeros(4096), torch.zeros(300, dtype=torch.bfloat16)]
    grads = [torch.zeros_like(p) for p in params]
    momenta = [mom.new_momentum(params[0], "8bit", 256), mom.new_momentum(params[1], "fp32", 256)]
    scalars = lion_scalars(dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, cautious_factor=0.5))
    backend = module.load()
    counts = backend.aligned_counts(params, grads, momenta, ["8bit", "fp32"], scalars=scalars, block_size=256)
    backend.lion_step(params, grads, momenta, ["8bit", "fp32"], scalars=scalars, block_size=256,
                      rounding_keys=None, cautious_steps=[torch.ones(2)] * 2, skip=None)
    assert len(counts) == 2
    for recorder in recorders.values():
        assert len(recorder.launches) == 2  # one per format
        assert all(kwargs["enable_fp_fusion"] is False for _, _, kwargs in recorder.launches)


def test_cpu_tensors_raise_without_the_interpreter(module):
    param = torch.zeros(10)
    momentum = mom.new_momentum(param, "fp32", 256)
    scalars = lion_scalars(dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0))
    with pytest.raises(ValueError, match='backend="triton" runs on CUDA tensors'):
        module.load().lion_step(
            [param], [param], [momentum], ["fp32"], scalars=scalars, block_size=256,
            rounding_keys=None, cautious_steps=None, skip=None,
        )
