"""What is particular to the fused CPU backend (lion8bit/kernels/cpu_lion): its two builds, its
requantizer, and its registration. Its results for every option, dtype, format and size are
checked by the conformance suite, tests/test_backends.py, on the native build (AVX-512 here);
here the portable build (the loops other CPUs run) gets every 7th option combination.
"""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lion8bit import kernels, quant
from lion8bit import momentum as mom
from lion8bit.functional import lion
from lion8bit.kernels import cpu_build, cpu_lion
from lion8bit.reference import lion_scalars

from helpers import LR, OPTIONS, TAILS, batch, group_of, option_id, step_and_compare
from test_quant import _boundary_values, brute_force_codes

BUILDS = {"native": (), "portable": ("-mno-avx512f",)}
_loaded = {}


@pytest.fixture(params=list(BUILDS))
def kernel(request, monkeypatch):
    """Which build of the library the registered "cpu" backend calls: -march=native, or without
    AVX-512."""
    if request.param not in _loaded:
        _loaded[request.param] = cpu_build.load(cpu_build.build(extra_flags=BUILDS[request.param]))
    monkeypatch.setitem(cpu_lion._RUNTIME, "library", _loaded[request.param])
    return request.param


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("options", OPTIONS[::7], ids=option_id)
def test_portable_build_is_bit_exact(options):
    if "portable" not in _loaded:
        _loaded["portable"] = cpu_build.load(cpu_build.build(extra_flags=BUILDS["portable"]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(cpu_lion._RUNTIME, "library", _loaded["portable"])
        generator = torch.Generator().manual_seed(hash(options) % 2**31)
        step_and_compare("cpu", *batch(TAILS, generator), group_of(*options))


def test_requantizer_equals_brute_force(kernel):
    """Codes of chosen values: beta2 = 0 makes the new momentum the gradient, and a 1.0 in
    every block makes its absmax 1, so the kernel quantizes exactly these values."""
    values = _boundary_values()
    values = values[values.abs() <= 1.0]
    scales = torch.logspace(-9, 0, 2000, dtype=torch.float64).float()
    values = torch.cat([values, scales, -scales, torch.rand(4000) * 2 - 1, (torch.rand(2000) * 2 - 1) * 1e-5])
    per_block = quant.BLOCK_SIZE - 1
    values = torch.cat([values, torch.zeros(-values.numel() % per_block)])
    blocks = values.view(-1, per_block)
    grad = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
    param = torch.zeros_like(grad)
    entry = {mom.STEP: 1, **mom.new_momentum(param, "8bit", quant.BLOCK_SIZE)}
    group = dict(lr=LR, betas=(0.9, 0.0), weight_decay=0.0)
    lion([param], [grad], [entry], ["8bit"], scalars=lion_scalars(group), block_size=quant.BLOCK_SIZE,
         stochastic_rounding=False, backend="cpu")
    assert torch.equal(entry[mom.MOMENTUM_ABSMAX], torch.ones(blocks.shape[0]))
    codes = entry[mom.MOMENTUM_CODES].view(-1, quant.BLOCK_SIZE)[:, 1:]
    assert torch.equal(codes.reshape(-1), brute_force_codes(blocks.reshape(-1)))


def test_requantizer_search_levels_hold_every_threshold_once():
    levels = cpu_lion.requantizer_levels()
    used = torch.cat([levels[o : o + 2**k] for k, o in enumerate(cpu_lion._LEVEL_OFFSETS)] + [levels[1:2]])
    thresholds = quant.decision_thresholds()[quant.ZERO_CODE :]
    assert used.numel() == used.unique().numel() == thresholds.numel() == 128
    # Each is the largest fp32 at or below its float64 threshold.
    below = used.sort().values
    assert torch.all(below.double() <= thresholds)
    assert torch.all(torch.nextafter(below, torch.tensor(2.0)).double() > thresholds)


def test_cpu_tensors_only():
    assert kernels.get("cpu").device_error(torch.device("meta"), "a parameter") == (
        'backend="cpu" runs on CPU tensors, got a parameter on meta'
    )


def test_a_machine_with_a_compiler_registers_the_backend_and_auto_takes_it():
    """The suite runs the "cpu" backend only where it is registered: a machine whose compiler
    stopped working would otherwise pass every test on "torch" alone."""
    assert shutil.which(cpu_build.compiler()), "this test machine has a C++ compiler"
    assert kernels.available("cpu")
    assert kernels.resolve("auto", torch.device("cpu")).name == "cpu"


_WITHOUT_A_COMPILER = """
import warnings
import torch
from lion8bit import Lion, kernels
warnings.simplefilter("error")  # auto must not warn about a backend nobody asked for
print("auto:", kernels.resolve("auto", torch.device("cpu")).name)
p = torch.nn.Parameter(torch.randn(10))
p.grad = torch.randn(10)
Lion([p], lr=1e-3).step()
try:
    Lion([p], lr=1e-3, backend="cpu").step()
except RuntimeError as error:
    print("RuntimeError:", error)
"""


@pytest.mark.slow  # a fresh process each
@pytest.mark.parametrize("compiler", ["/nonexistent/c++", "false"], ids=["missing", "failing"])
def test_without_a_compiler_auto_quietly_takes_torch_and_cpu_raises(tmp_path, compiler):
    environment = {"CXX": compiler, "LION8BIT_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WITHOUT_A_COMPILER)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "auto: torch"
    assert lines[1].startswith('RuntimeError: backend="cpu" needs its C++ library, which could not be built: ')
    assert compiler in lines[1] and "Install a C++ compiler (or set CXX)" in lines[1]
    assert result.stderr == ""
