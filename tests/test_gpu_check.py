"""benchmarks/gpu_check.py cannot rot before a GPU is lent: its dry run runs here, on CPU, and
the helpers its GPU parts depend on (pytest in a subprocess, the bit comparison) are checked on
inputs whose answers are known."""

import csv
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(SCRIPT, "gpu_check")


@pytest.fixture(scope="module")
def correctness(gpu_check):
    """benchmarks/gpu_check_correctness.py, importable once gpu_check has put benchmarks/ on the path."""
    return importlib.import_module("gpu_check_correctness")


@pytest.fixture(scope="module")
def report_module(gpu_check):
    """benchmarks/gpu_check_report.py (settings, environment, report)."""
    return importlib.import_module("gpu_check_report")


@pytest.mark.slow
def test_the_dry_run_writes_a_report_and_a_csv_of_every_part(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader((tmp_path / "gpu_check.csv").open()))
    assert all(row["dry_run"] == "True" and row["torch"] == torch.__version__ for row in rows)

    # backend="cpu" against the reference, through the public API: every state kind, param dtype
    # and option set, bit for bit.
    bit_exact = [row for row in rows if row["part"] == "bit-exact"]
    states, dtypes = ("8bit", "4bit", "bf16", "fp32"), ("float32", "bfloat16", "float16")
    kinds = {(state, dtype) for state in states for dtype in dtypes}
    assert {(row["state"], row["param_dtype"]) for row in bit_exact} == kinds
    assert len(bit_exact) == 36
    assert {(row["status"], row["mismatches"]) for row in bit_exact} == {("ok", "0")}

    # The speed rows of the small CPU problem: the floor's bytes per element are DESIGN.md
    # section 4's table for fp32 params (14 + 8/256 absmax bytes, 16, 20); 4-bit: 12 + 0.5 + 0.5 for
    # the codes, + 2 x 2/32 for the bf16 absmax.
    speed = {row["optimizer"]: row for row in rows if row["part"] == "speed-tensor" and row["status"] == "ok"}
    assert set(speed) == {f"lion8bit cpu {state}" for state in states} | {"AdamW fused", "AdamW foreach"}
    per_element = {state: float(speed[f"lion8bit cpu {state}"]["bytes_moved"]) / 256**2 for state in states}
    assert per_element == {"8bit": 14 + 8 / 256, "4bit": 13 + 4 / 32, "bf16": 16, "fp32": 20}
    assert all(float(row["median_ms"]) > 0 and float(row["floor_ms"]) > 0 for row in speed.values())
    assert float(speed["AdamW fused"]["x_adamw_fused"]) == 1

    report = (tmp_path / "gpu_check.md").read_text()
    assert "Dry run on CPU: no figure here was measured on a GPU" in report
    assert "## headline" in report and "## bit-exact" in report
    for part in ("pytest-gpu", "speed-models", "pytest-backends"):
        assert f"skipped {part}: dry run" in result.stdout
        assert re.search(rf"^\| {part} \| skipped \| [0-9.]+ \| [0-9]+ \| dry run", report, re.MULTILINE)
    assert "gpt2-small (148 tensors), llama2-7b-layer (9 tensors)" in report


def test_pytest_outcomes_are_counted_from_a_subprocess(correctness, report_module, tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert False\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skipped(): pass\n"
        "@pytest.mark.xfail(strict=True)\n"
        "def test_xfails(): assert False\n"
        "@pytest.mark.gpu\n"
        "def test_deselected(): pass\n"
    )
    env = {column: "" for column in report_module.ENV_COLUMNS} | {"dry_run": True}
    report = report_module.Report(tmp_path / "out", env, "test")
    with pytest.raises(RuntimeError, match="1 failed"):
        correctness.run_pytest(
            report, report_module.Deadline(120), "sample", ["test_sample.py"], "not gpu", {}, cwd=tmp_path
        )
    row = report.rows[-1]
    assert (row["status"], row["passed"], row["failed"], row["skipped"]) == ("failed", 1, 1, 2)
    assert "FAILED `test_sample::test_fails`" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_a_log_cut_short_still_gives_the_counts_so_far(correctness):
    log = (
        "tests/test_a.py::test_one PASSED                                   [ 10%]\n"
        "tests/test_a.py::test_two[8bit-cuda fp32] FAILED                   [ 20%]\n"
        "tests/test_a.py::test_three SKIPPED (needs a CUDA device)          [ 30%]\n"
        "tests/test_a.py::test_four XFAIL (known)                           [ 40%]\n"
        "tests/test_a.py::test_five ERROR                                   [ 50%]\n"
        "tests/test_a.py::test_six "
    )
    counts, failed = correctness.log_counts(log)
    assert counts == dict(passed=1, failed=2, skipped=2)
    assert failed == ["tests/test_a.py::test_two[8bit-cuda fp32]", "tests/test_a.py::test_five"]


@pytest.mark.parametrize(
    "first, second, expected",
    [
        (torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]), 1),  # equal numbers, different bits
        (torch.tensor([float("nan")]), torch.tensor([float("nan")]), 0),  # the same NaN
        (torch.tensor([1, 2], dtype=torch.bfloat16), torch.tensor([1, 2.015625], dtype=torch.bfloat16), 1),
        (torch.tensor([3, 4], dtype=torch.uint8), torch.tensor([3, 5], dtype=torch.uint8), 1),
        (torch.zeros(3), torch.zeros(4), 3),  # another shape: every element
        (7, 8, 1),  # a Python value (step)
    ],
)
def test_mismatching_elements_compares_bit_patterns(correctness, first, second, expected):
    assert correctness.mismatching_elements([{"x": first}], [{"x": second}]) == expected


def test_mismatching_elements_counts_a_missing_state_key_as_a_mismatch(correctness):
    assert correctness.mismatching_elements([{"x": 1, "y": 2}], [{"x": 1}]) == -1
