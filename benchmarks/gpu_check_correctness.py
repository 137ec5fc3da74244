"""The GPU check's correctness parts (benchmarks/gpu_check.py): the test suite's GPU tests and
CUDA conformance cases in a pytest subprocess (counted from its JUnit XML or its log), and the
bit-exact comparison of backend "triton" with the reference through the public API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
from gpu_check_report import BETAS, PARAM_DTYPES, ROOT, STATES, WEIGHT_DECAY, Deadline, Report, Skip, dtype_name

import lion8bit

# -- pytest in a subprocess ------------------------------------------------------------------------

_GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\b.*\bpytest\.mark\.gpu\b)", re.MULTILINE)
_OUTCOME = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)


def junit_counts(path: Path) -> tuple[dict, list[str]]:
    """(passed / failed / skipped counts, failed test ids) from pytest's JUnit XML."""
    counts, failed = dict(passed=0, failed=0, skipped=0), []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
            failed.append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


def log_counts(text: str) -> tuple[dict, list[str]]:
    """The same from a ``pytest -v`` log cut short (no JUnit XML is written then)."""
    counts, failed = dict(passed=0, failed=0, skipped=0), []
    for test, outcome in _OUTCOME.findall(text):
        if outcome in ("FAILED", "ERROR", "XPASS"):
            counts["failed"] += 1
            failed.append(test)
        elif outcome in ("SKIPPED", "XFAIL"):
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


def run_pytest(
    report: Report, deadline: Deadline, part: str, files: list[str], marker: str, extra_env: dict,
    cwd: Path = ROOT,
) -> str:
    junit, log = report.out / f"{part}.xml", report.out / f"{part}.log"
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", *files, "-m", marker, "-v", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | extra_env
    timed_out, deadline_seconds = False, max(1.0, deadline.left())
    with log.open("w") as handle:
        try:
            completed = subprocess.run(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                       timeout=deadline_seconds)
            returncode = completed.returncode
        except subprocess.TimeoutExpired:
            timed_out, returncode = True, None
    if junit.exists() and not timed_out:
        counts, failed = junit_counts(junit)
    else:
        counts, failed = log_counts(log.read_text(errors="replace"))
    if counts["failed"] or (returncode not in (0, 5) and not timed_out):
        status = "failed"
    else:
        status = "timed out" if timed_out else "ok"
    shown = " ".join(files) + f' -m "{marker}"' + "".join(f" {k}={v}" for k, v in extra_env.items())
    report.add(part=part, case=shown, status=status, detail=f"exit {returncode}; log {log.name}", **counts)
    lines = report.section(part)
    lines += [f"`pytest {shown}`: {counts['passed']} passed, {counts['failed']} failed, "
              f"{counts['skipped']} skipped ({status}; log: `{log.name}`)."]
    lines += [f"- FAILED `{test}`" for test in failed]
    report.write()
    if status == "failed":
        raise RuntimeError(f"{counts['failed']} failed (exit {returncode})")
    note = f"{counts['passed']} passed, {counts['skipped']} skipped"
    return note + (f"; timed out after {deadline_seconds:.0f} s, the rest did not run" if timed_out else "")


def pytest_gpu_part(report: Report, deadline: Deadline, dry_run: bool) -> str:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if _GPU_MARK.search(p.read_text()))
    if not files:
        raise Skip("no test file has a gpu mark")
    if dry_run:
        raise Skip(f"dry run: every gpu test ({', '.join(files)}) skips without CUDA")
    return run_pytest(report, deadline, "pytest-gpu", files, "gpu", {})


def pytest_backends_part(report: Report, deadline: Deadline, dry_run: bool) -> str:
    if dry_run:
        raise Skip("dry run: these are the suite's own CPU tests, which the suite runs anyway")
    # The conformance suite adds a CUDA case (id "<backend>-cuda-...") for every option
    # combination of each backend registered for CUDA when the process sees a GPU.
    return run_pytest(report, deadline, "pytest-backends", ["tests/test_backends.py", "-k", "cuda"], "not slow", {})


# -- bit-exact through the public API --------------------------------------------------------------

OPTION_SETS = {
    "decay": dict(weight_decay=WEIGHT_DECAY),
    "cautious": dict(weight_decay=WEIGHT_DECAY, cautious_factor=0.5, cautious_weight_decay=True),
    "mask+sr+maximize": dict(weight_decay=WEIGHT_DECAY, cautious_factor=0.0, cautious_weight_decay=True,
                             stochastic_rounding=True, maximize=True),
}


def bits(value):
    """A tensor's bit pattern (floats viewed as integers of their width), or the value itself."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[value.element_size()]
    return value.view(width) if value.dtype.is_floating_point else value


def mismatching_elements(first: list, second: list) -> int:
    """Elements (tensors) or values that differ in their bits; a missing key or shape counts all."""
    total = 0
    for a, b in zip(first, second, strict=True):
        if set(a) != set(b):
            return -1
        for key in a:
            x, y = bits(a[key]), bits(b[key])
            if isinstance(x, torch.Tensor):
                total += int((x != y).sum()) if x.shape == y.shape and x.dtype == y.dtype else x.numel()
            else:
                total += int(x != y)
    return total


def run_lion(backend: str, device: str, initial, grads, state: str, options: dict):
    params = [torch.nn.Parameter(p.clone().to(device)) for p in initial]
    optimizer = lion8bit.Lion(params, lr=1e-3, betas=BETAS, state=state, backend=backend, **options)
    for step_grads in grads:
        for param, grad in zip(params, step_grads, strict=True):
            param.grad = grad.to(device)
        optimizer.step()
    return [{"param": p, **optimizer.state[p]} for p in params]


def bit_exact_part(report: Report, deadline: Deadline, cuda: bool) -> str:
    if cuda:
        # Triton compiles a kernel per divisibility of numel by 16 (16-byte vectors or scalar
        # accesses, benchmarks/results/kernel_report.md), and compiles (a second or so each) are
        # what this part costs: the two large tensors are multiples of 16, as model tensors are,
        # both with a partial last block (91200 = 356 x 256 + 64); the small one (fp32 momentum,
        # under min_8bit_size) is not. Every size leaves a masked tail of the 2048-element tile.
        device, fused, shapes, steps = "cuda", "triton", [(3000,), (304, 300), (1000, 2064)], 3
    else:
        device, fused, shapes, steps = "cpu", "cpu", [(1000,), (70, 75)], 2
    lines = report.section("bit-exact")
    lines += [f"`Lion(backend=\"{fused}\")` against `backend=\"torch\"` (the reference) on {device}, "
              f"{steps} steps, shapes {shapes}; elements (params and every state tensor) whose bits differ "
              "(against the reference on CPU only after a mismatch; -1: different keys).", "",
              f"| state | params | options | {fused} vs torch on {device} | vs torch on cpu | status |",
              "| --- | --- | --- | ---: | ---: | --- |"]
    cases = [(s, d, o) for o in OPTION_SETS for s in STATES for d in PARAM_DTYPES]
    exact = 0
    for index, (state, dtype, option_set) in enumerate(cases):
        name = f"{state} {dtype_name(dtype)} {option_set}"
        if deadline.over():
            report.add(part="bit-exact", case=name, state=state, param_dtype=dtype_name(dtype),
                       status="not run", detail="part budget spent")
            lines.append(f"| {state} | {dtype_name(dtype)} | {option_set} | | | not run (budget) |")
            continue
        generator = torch.Generator().manual_seed(index)
        initial = [(torch.randn(s, generator=generator) * 0.5).to(dtype) for s in shapes]
        grads = [[(torch.randn(s, generator=generator) * 1e-2).to(dtype) for s in shapes]
                 for _ in range(steps)]
        options = OPTION_SETS[option_set]
        try:
            ours = run_lion(fused, device, initial, grads, state, options)
            reference = run_lion("torch", device, initial, grads, state, options)
        except Exception as error:  # one case failing must not lose the others
            kind = type(error).__name__
            report.add(part="bit-exact", case=name, state=state, param_dtype=dtype_name(dtype),
                       optimizer=fused, status="error", detail=f"{kind}: {error}"[:300])
            lines.append(f"| {state} | {dtype_name(dtype)} | {option_set} | | | error: {kind} |")
            print(f"   {name}: error {type(error).__name__}: {error}", flush=True)
            continue
        against_device = mismatching_elements(ours, reference)
        against_cpu = "-"  # a diagnostic, run only on a mismatch: is the reference on CUDA the odd one?
        if against_device and device != "cpu":
            against_cpu = mismatching_elements(ours, run_lion("torch", "cpu", initial, grads, state, options))
        status = "ok" if against_device == 0 else "MISMATCH"
        exact += status == "ok"
        report.add(part="bit-exact", case=name, state=state, param_dtype=dtype_name(dtype), optimizer=fused,
                   status=status, mismatches=against_device,
                   detail=f"vs torch on {device}: {against_device}"
                   + (f"; vs torch on cpu: {against_cpu}" if against_cpu != "-" else ""))
        lines.append(
            f"| {state} | {dtype_name(dtype)} | {option_set} | {against_device} | {against_cpu} | {status} |"
        )
        print(f"   {name}: {status} ({against_device} / {against_cpu})", flush=True)
    if exact != len(cases):
        raise RuntimeError(f"{exact} of {len(cases)} cases bit-exact")
    return f"all {len(cases)} cases bit-exact"
