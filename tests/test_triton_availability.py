"""Where backend="triton" runs, and how it refuses what it cannot: "auto" picks it for CUDA
tensors; without the triton package lion8bit imports and backend="triton" raises; CPU tensors
without Triton's interpreter, or with the interpreter switched on after the kernels were
decorated, are refused before any change (each in a fresh process); a triton older than the
tested range is refused naming both versions. The backend's kernels and ops:
tests/test_triton_kernel.py.

tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU, before anything imports triton;
on a GPU machine this file is skipped, as test_triton_kernel.py is.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lion8bit import kernels

pytest.importorskip("triton")
if not kernels.interpreting():
    pytest.skip("the Triton interpreter is not on in this process (a GPU machine)", allow_module_level=True)


def test_auto_picks_triton_for_cuda_tensors():
    assert kernels.resolve("auto", torch.device("cuda", 0)).name == "triton"


def _fresh_python(code: str, hide_triton: bool) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = "import sys; sys.modules['triton'] = None\n" if hide_triton else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, env=environment, timeout=300,
    )


_STEP_WITH_TRITON = """
import torch
from lion8bit import Lion
p = torch.nn.Parameter(torch.randn(10))
p.grad = torch.randn(10)
Lion([p], backend="auto").step()  # falls back without a fused backend
print("auto ok")
try:
    Lion([p], backend="triton").step()
except RuntimeError as error:
    print("RuntimeError:", error)
"""


@pytest.mark.slow  # a fresh process
def test_without_triton_import_works_and_backend_triton_raises():
    result = _fresh_python(_STEP_WITH_TRITON, hide_triton=True)
    assert result.returncode == 0, result.stderr
    assert "auto ok" in result.stdout
    assert 'RuntimeError: backend="triton" needs the triton package' in result.stdout


@pytest.mark.slow  # a fresh process
def test_cpu_tensors_without_the_interpreter_raise_clearly():
    result = _fresh_python(_STEP_WITH_TRITON, hide_triton=False)
    assert result.returncode == 0, result.stderr
    assert 'RuntimeError: backend="triton" runs on CUDA tensors, got param_groups[0]' in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


_INTERPRET_SET_AFTER_IMPORT = """
import os
import torch
import lion8bit.kernels as kernels
from lion8bit import Lion
kernels.get("triton")  # decorated for the GPU compiler: the variable is not set yet
os.environ["TRITON_INTERPRET"] = "1"  # too late for the kernels
p = torch.nn.Parameter(torch.randn(10))
p.grad = torch.randn(10)
optimizer = Lion([p], backend="triton")
try:
    optimizer.step()
except RuntimeError as error:
    print("RuntimeError:", error)
print("state entries:", len(optimizer.state))
"""


@pytest.mark.slow  # a fresh process
def test_interpreter_set_after_the_kernels_were_decorated_is_refused_before_any_change():
    # What the kernels can run on was fixed when @triton.jit ran, so the optimizer's check
    # before the step must ask the kernels, not the variable now.
    result = _fresh_python(_INTERPRET_SET_AFTER_IMPORT, hide_triton=False)
    assert result.returncode == 0, result.stderr
    assert 'RuntimeError: backend="triton" runs on CUDA tensors' in result.stdout
    assert "state entries: 0" in result.stdout


def test_a_triton_older_than_the_tested_range_is_refused_naming_both_versions(monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "3.5.1" if name == "triton" else real(name)
    )
    kernels.forget()
    try:
        expected = r"needs triton >= 3\.6 \(tested: 3\.6 to 3\.9\), found 3\.5\.1"
        with pytest.raises(RuntimeError, match=expected):
            kernels.resolve("triton", torch.device("cuda", 0))
        assert not kernels.available("triton")
    finally:
        kernels.forget()
    monkeypatch.undo()
    assert kernels.available("triton")
