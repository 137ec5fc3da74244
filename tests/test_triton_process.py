"""tests/test_triton_compile.py in a pytest process of its own, without Triton's interpreter.

Without a GPU, tests/conftest.py turns the interpreter on for this process (the conformance
suite runs "triton" in it), and kernels decorated for the interpreter cannot be compiled for
sm_80 / sm_90; so the compile checks run in a child process with TRITON_INTERPRET=0. On a GPU
machine this process compiles, and pytest collects tests/test_triton_compile.py directly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lion8bit import kernels

pytest.importorskip("triton")


@pytest.mark.slow  # a pytest process of its own: ~20 s with a warm Triton cache, minutes without
@pytest.mark.skipif(not kernels.interpreting(), reason="this process compiles: test_triton_compile.py runs here")
def test_compile_checks_pass_in_a_process_without_the_interpreter():
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(tests / "test_triton_compile.py"), "-q", "-p", "no:cacheprovider"],
        capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, cwd=tests.parent,
        timeout=1200,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary, summary
