"""The fused kernel compiled for real GPUs (sm_80, sm_90) on this CPU-only machine.

triton compiles for a GPUTarget without a GPU; these tests read what it produced: the cubin's
resource usage (cuobjdump), the PTX's global loads and stores attributed to the kernel argument
their address comes from, and the TTIR's pointer arithmetic. The compile helpers are
benchmarks/kernel_report.py's (the report prints the same facts). Kernels decorated for Triton's
interpreter cannot be compiled, so without a GPU (where tests/conftest.py turns the interpreter
on) this file runs in a pytest process of its own, started by tests/test_triton_process.py.
"""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lion8bit import momentum as mom
from lion8bit import kernels, quant
from lion8bit.reference import lion_scalars, rounding_keys

triton = pytest.importorskip("triton")
if kernels.interpreting():
    pytest.skip(
        "kernels decorated for the interpreter do not compile: tests/test_triton_process.py runs this file "
        "with TRITON_INTERPRET=0",
        allow_module_level=True,
    )

_REPORT = Path(__file__).parents[1] / "benchmarks" / "kernel_report.py"
_spec = importlib.util.spec_from_file_location("kernel_report", _REPORT)
report = sys.modules.setdefault("kernel_report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(report)

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


@every_target_and_combination
def test_no_spills_and_no_local_memory(compiled, capability, combination):
    for kind in ("step", "count"):
        kernel = compiled(kind, report.Variant(*combination), capability)
        usage = kernel.usage()
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, (kind, usage)
        assert usage["REG"] <= 128, (kind, usage)  # 4 warps keep >= 4 blocks per SM
        assert ".local" not in kernel.kernel.asm["ptx"]


def _check_elementwise(accesses, name, dtype, per_thread, kinds=("ld", "st")):
    """Each of a thread's elements of ``name`` is loaded / stored exactly once, in 128-bit accesses."""
    for kind in kinds:
        found = [a for a in accesses.get(name, []) if a.kind == kind]
        assert found, (name, kind)
        assert all(a.vector * a.bits == 128 for a in found), (name, kind, found)
        assert sum(a.bytes for a in found) == per_thread * report.BYTES[dtype], (name, kind, found)


@every_target_and_combination
def test_step_reads_and_writes_each_element_once_in_128_bit_vectors(module, compiled, capability, combination):
    param, grad, fmt = combination
    accesses = compiled("step", report.Variant(*combination), capability).accesses()
    per_thread = report.elements_per_thread(module)
    _check_elementwise(accesses, "param_ptr", param, per_thread)
    _check_elementwise(accesses, "grad_ptr", grad, per_thread, kinds=("ld",))
    _check_elementwise(accesses, "momentum_ptr", report._MOMENTUM_TYPE[fmt], per_thread)
    expected = {"param_ptr", "grad_ptr", "momentum_ptr", "cautious_steps_ptr"}
    steps = accesses["cautious_steps_ptr"]
    assert [a.kind for a in steps] == ["ld", "ld"]  # the two step sizes, once per thread
    if fmt == "8bit":
        expected |= {"absmax_ptr", "code_values_ptr", "requant_table_ptr"}
        absmax = accesses["absmax_ptr"]
        rows = module._layout(fmt, 256)[1]
        loads = [a for a in absmax if a.kind == "ld"]
        stores = [a for a in absmax if a.kind == "st"]
        # A thread's elements lie in at most `rows` blocks: one absmax load each; the new absmax
        # is one predicated store (triton keeps one owner thread per block).
        assert 1 <= len(loads) <= rows and all(a.bytes == 4 for a in loads)
        assert len(stores) == 1 and stores[0].predicated and stores[0].bytes == 4
        for table in ("code_values_ptr", "requant_table_ptr"):  # one gather per element
            gathers = accesses[table]
            assert len(gathers) == per_thread and all(a.kind == "ld" and a.bytes == 4 for a in gathers)
    assert set(accesses) == expected


@every_target_and_combination
def test_count_pre_pass_reads_only_grad_and_momentum(module, compiled, capability, combination):
    param, grad, fmt = combination
    accesses = compiled("count", report.Variant(*combination), capability).accesses()
    per_thread = report.elements_per_thread(module)
    _check_elementwise(accesses, "grad_ptr", grad, per_thread, kinds=("ld",))
    _check_elementwise(accesses, "momentum_ptr", report._MOMENTUM_TYPE[fmt], per_thread, kinds=("ld",))
    assert [a.kind for a in accesses["partial_counts_ptr"]] == ["st"]
    readable = {"grad_ptr", "momentum_ptr", "partial_counts_ptr"}
    if fmt == "8bit":
        readable |= {"absmax_ptr", "code_values_ptr"}
    assert set(accesses) == readable
    assert all(a.kind == "ld" for name in readable - {"partial_counts_ptr"} for a in accesses[name])


def test_unaligned_numel_still_compiles_to_exact_accesses(module, compiled):
    # Without numel % 16 == 0 triton cannot prove a 4-element mask uniform: scalar accesses,
    # still one per element (the report shows the vector width of both cases).
    accesses = compiled("step", report.Variant("bf16", "bf16", "8bit", aligned=False), 90).accesses()
    per_thread = report.elements_per_thread(module)
    params = [a for a in accesses["param_ptr"] if a.kind == "ld"]
    assert sum(a.bytes for a in params) == per_thread * 2


@pytest.mark.parametrize("capability", TARGETS)
def test_no_fma_contraction_and_a_correctly_rounded_reciprocal(compiled, capability):
    # The reference rounds each product and sum; enable_fp_fusion=False must keep them apart.
    ptx = compiled("step", report.Variant("fp32", "fp32", "8bit"), capability).kernel.asm["ptx"]
    assert not re.search(r"\bfma\.", ptx)
    assert re.search(r"\bmul\.rn\.f32|\bmul\.f32", ptx) and re.search(r"\b(add|sub)(\.rn)?\.f32", ptx)
    assert re.search(r"\bdiv\.rn\.f32", ptx)  # 1 / absmax, as torch.reciprocal
    assert not re.search(r"\bdiv\.(full|approx)\.f32", ptx)


@pytest.mark.parametrize("combination", COMBINATIONS, ids=_ids)
def test_offsets_are_64_bit(compiled, combination):
    # Tensors past 2**31 elements: every offset into a per-element or per-block tensor is i64.
    for kind in ("step", "count"):
        offsets = report.addptr_offset_types(compiled(kind, report.Variant(*combination), 90).kernel.asm["ttir"])
        for name in ("param_ptr", "grad_ptr", "momentum_ptr", "absmax_ptr"):
            if name in offsets:
                assert offsets[name] == {"i64"}, (kind, name, offsets[name])
        assert "grad_ptr" in offsets and "momentum_ptr" in offsets


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


def test_new_lr_step_or_seed_reuses_the_compiled_kernel(module, monkeypatch):
    """Triton's cache key (the specialization of every argument) of the launches the launcher
    makes for a new lr (a numpy float64 too), step and seed is the same: no recompilation.
    Scalars are fp32 values, the keys int32 bit patterns that are never specialized on."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = module._lion_step_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    recorder = _Recorder()
    monkeypatch.setattr(module, "_lion_step_kernel", recorder)
    monkeypatch.setattr(module, "INTERPRETED", True)  # CPU tensors pass; nothing is launched

    def launch(param_dtype, lr, seed, step):
        param = torch.zeros(8192, dtype=param_dtype)
        momentum = mom.new_momentum(param, "8bit", 256)
        group = dict(lr=lr, betas=(0.9, 0.99), weight_decay=0.1, cautious_factor=0.5)
        module.load().lion_step(
            [param], [torch.zeros_like(param)], [momentum], ["8bit"], scalars=lion_scalars(group),
            block_size=256, rounding_keys=[rounding_keys(seed, step)], cautious_steps=[torch.ones(2)],
            skip=None,
        )
        grid, args, kwargs = recorder.launches[-1]
        return binder(*args, **kwargs)[1]  # the specialization

    large = _seed_with_key(lambda k: k >= 2**31)
    divisible = _seed_with_key(lambda k: k % 16 == 0)
    first = launch(torch.bfloat16, 1e-3, 0, 1)
    for lr, seed, step in [(3e-4, 5, 1), (np.float64(0.1), large, 1), (1e-3, divisible, 1), (1e-3, 0, 2**33 + 1)]:
        assert launch(torch.bfloat16, lr, seed, step) == first, (lr, seed, step)
    assert launch(torch.float16, 1e-3, 0, 1) != first  # the key does tell kernels apart
    _, args, kwargs = recorder.launches[0]
    assert kwargs["enable_fp_fusion"] is False and "num_warps" in kwargs


def test_cpu_tensors_raise_without_the_interpreter(module):
    param = torch.zeros(10)
    momentum = mom.new_momentum(param, "fp32", 256)
    scalars = lion_scalars(dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0))
    with pytest.raises(ValueError, match='backend="triton" runs on CUDA tensors'):
        module.load().lion_step(
            [param], [param], [momentum], ["fp32"], scalars=scalars, block_size=256,
            rounding_keys=None, cautious_steps=None, skip=None,
        )
