"""One prepared check for a lent GPU: correctness on CUDA and step speed, in under 6 minutes.

    python benchmarks/gpu_check.py --out DIR             # a CUDA machine: about 5 minutes, no network
    python benchmarks/gpu_check.py --dry-run --out DIR   # any machine: what runs on CPU, a few seconds

Writes DIR/gpu_check.md (the report) and DIR/gpu_check.csv (one row per result, each with the
device, driver and versions), rewritten after every result, so a run cut short still leaves what
it measured; pytest's logs go next to them. The parts run in this order, each within its own time
budget (printed with the time it took) and its own try/except, so a failure is recorded in the
report and the next part still runs:

1. environment: device, driver, CUDA runtime, torch, triton, python, lion8bit and its commit
   (git, else $LION8BIT_COMMIT), bitsandbytes and lion-pytorch if installed; printed first.
2. pytest-gpu: the tests marked ``gpu`` (paged state end to end, ``load_state_dict`` into paged
   buffers, the out-of-memory paths), in a subprocess; pass / fail / skip counts.
3. bit-exact: ``lion8bit.Lion(..., backend="triton")`` against ``backend="torch"`` (the reference)
   through the public API, for every state kind and param dtype, with decay, caution and
   stochastic rounding, on identical CUDA params and grads for several steps: params and every
   state tensor compared bit for bit (and against the reference run on CPU). No NaNs are fed: bf16
   NaN payloads may differ, as documented.
4. speed-tensor: one 256M-element tensor (fp32 and bf16 params; 8-bit, bf16 and fp32 state)
   against the copy floor of the same run: the bytes the update must move (params read and
   written, grads read, state read and written, DESIGN.md section 4) divided by the bandwidth of a
   1 GiB device-to-device copy measured just before; torch.optim.AdamW (fused and foreach),
   lion-pytorch's Triton kernel and bitsandbytes' Lion8bit when installed.
5. speed-models: the same for GPT-2 small's parameters (124M in 148 tensors) and one
   Llama-2-7B decoder layer (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008; two
   norms), plus paged 8-bit state and, if ``Lion`` accepts ``capturable``, the step captured in a
   CUDA graph. Kernel launches per step are counted with torch.profiler (CUDA kernels, and
   copies / memsets apart).
6. pytest-backends: the CUDA cases of tests/test_backends.py (the conformance suite: every
   option combination of "torch" and "triton" on CUDA tensors against the reference), with the
   time left.

Times are CUDA-event medians after warm-up steps. With ``--dry-run`` (no CUDA needed) the
bit-exact part compares ``backend="cpu"`` with ``"torch"`` on CPU tensors, the speed parts build
every problem's shapes and time a small CPU problem to exercise the code (no GPU figure), and the
GPU-only parts are listed as skipped with the reason; it exits 0 unless something broke.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import importlib.util
import inspect
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # check this tree, installed or not

import torch  # noqa: E402

import lion8bit  # noqa: E402

LR, BETAS, WEIGHT_DECAY = 1e-4, (0.9, 0.99), 0.1
STATES = ("8bit", "4bit", "bf16", "fp32")  # lion8bit.momentum.STATE_KINDS
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GIB = 2**30

# Seconds per part, 310 in all. A part stops starting new cases at its budget (a case in flight
# finishes: a Triton compile is about a second) and pytest is killed at it, so with python, torch
# and CUDA start-up (about 10 s) a run stays under 6 minutes.
BUDGETS = {
    "environment": 10, "pytest-gpu": 60, "bit-exact": 75, "speed-tensor": 50, "speed-models": 65,
    "pytest-backends": 50,
}
TIME_LIMIT = 320  # seconds after start-up; a part that would begin later is not run

ENV_COLUMNS = [
    "timestamp", "host", "device", "capability", "device_memory_gib", "driver", "cuda_runtime", "torch",
    "torch_cuda", "triton", "python", "lion8bit", "bitsandbytes", "lion_pytorch", "dry_run",
]
ROW_COLUMNS = [
    "part", "case", "param_dtype", "state", "optimizer", "status", "median_ms", "p20_ms", "p80_ms",
    "floor_ms", "x_floor", "x_adamw_fused", "bytes_moved", "gbps", "copy_gbps", "kernels_per_step",
    "copies_per_step", "passed", "failed", "skipped", "mismatches", "detail",
]


class Skip(Exception):
    """A part or row that cannot run here; the message says why."""


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def over(self) -> bool:
        return self.left() == 0.0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- environment -----------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        def git(*words):
            return subprocess.run(["git", *words], capture_output=True, text=True, cwd=ROOT)

        head = git("rev-parse", "--short", "HEAD")
        if head.returncode == 0 and head.stdout.strip():
            dirty = git("status", "--porcelain")
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return os.environ.get("LION8BIT_COMMIT", "unknown (no git; set LION8BIT_COMMIT)")


def _driver() -> str:
    if shutil.which("nvidia-smi"):
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            found = subprocess.run(query, capture_output=True, text=True, timeout=10)
            if found.returncode == 0 and found.stdout.strip():
                return found.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "unknown (no nvidia-smi)"


def environment(cuda: bool, dry_run: bool) -> dict:
    env = dict(
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
        device="none (CPU only)", capability="", device_memory_gib="", driver="", cuda_runtime="",
        torch=torch.__version__, torch_cuda=str(torch.version.cuda), triton=_version("triton"),
        python=platform.python_version(),
        lion8bit=f"{lion8bit.__version__} ({_commit()}) from {Path(lion8bit.__file__).parent}",
        bitsandbytes=_version("bitsandbytes"), lion_pytorch=_version("lion-pytorch"), dry_run=dry_run,
    )
    if cuda:
        properties = torch.cuda.get_device_properties(0)
        visible = torch.cuda.device_count()
        env.update(
            device=f"{properties.name} ({properties.multi_processor_count} SMs, {visible} visible)",
            capability=f"sm_{properties.major}{properties.minor}",
            device_memory_gib=f"{properties.total_memory / GIB:.1f}",
            driver=_driver(),
        )
        try:
            from lion8bit import paged

            runtime = paged._runtime()
            major, minor = runtime.version // 1000, runtime.version % 1000 // 10
            env["cuda_runtime"] = f"{major}.{minor} ({runtime.source})"
        except Exception as error:  # reported, not fatal: paged state is one part of the check
            env["cuda_runtime"] = f"not found: {error}"
    return env


# -- report ----------------------------------------------------------------------------------------


class Report:
    """Rows, part outcomes and markdown sections; both files rewritten on every write()."""

    def __init__(self, out: Path, env: dict, command: str):
        self.out, self.env, self.command = out, env, command
        self.rows: list[dict] = []
        self.parts: list[dict] = []
        self.sections: dict[str, list[str]] = {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, **row) -> dict:
        unknown = set(row) - set(ROW_COLUMNS)
        if unknown:
            raise KeyError(f"unknown columns {sorted(unknown)}")
        self.rows.append(row)
        self.write()
        return row

    def section(self, part: str) -> list[str]:
        return self.sections.setdefault(part, [])

    def write(self) -> None:
        with (self.out / "gpu_check.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=ENV_COLUMNS + ROW_COLUMNS)
            writer.writeheader()
            for row in self.rows:
                values = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()}
                writer.writerow({**self.env, **values})
        (self.out / "gpu_check.md").write_text(self.markdown())

    def markdown(self) -> str:
        env = self.env
        lines = ["# lion8bit GPU check", ""]
        if env["dry_run"]:
            lines += ["**Dry run on CPU: no figure here was measured on a GPU.**", ""]
        lines += [f"Command: `{self.command}`", "", "| | |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in env.items() if key != "dry_run"]
        lines += ["", "| part | status | seconds | budget s | note |", "| --- | --- | ---: | ---: | --- |"]
        for part in self.parts:
            note = part["note"].replace("|", "/").replace("\n", " ")
            lines.append(
                f"| {part['name']} | {part['status']} | {part['seconds']:.1f} | {part['budget']} | {note} |"
            )
        headline = [row for row in self.rows if row["part"].startswith("speed") and row["status"] == "ok"
                    and row["optimizer"].endswith(" 8bit")]
        if headline:
            lines += ["", "## headline", "",
                      "lion8bit's 8-bit step against the copy floor and fused AdamW, same run:", ""]
            lines += [f"- {row['case']}, {row['param_dtype']} params: {row['median_ms']:.3f} ms, "
                      f"{row['x_floor']:.2f}x the copy floor, {_fmt(row.get('x_adamw_fused'))}x fused AdamW"
                      for row in headline]
        for name, body in self.sections.items():
            lines += ["", f"## {name}", "", *body]
        return "\n".join(lines) + "\n"


def run_part(report: Report, name: str, function, time_limit: Deadline, *args) -> None:
    budget = min(BUDGETS[name], time_limit.left())
    print(f"== {name}: budget {budget:.0f} s", flush=True)
    start = time.monotonic()
    status, note = "ok", ""
    if budget < 1:
        status, note = "not run", "the time limit was reached"
    else:
        try:
            note = function(report, Deadline(budget), *args) or ""
        except Skip as skip:
            status, note = "skipped", str(skip)
        except Exception as error:
            status, note = "error", f"{type(error).__name__}: {error}"
            report.section(name).extend(["```", traceback.format_exc().rstrip(), "```"])
    seconds = time.monotonic() - start
    report.parts.append(dict(name=name, status=status, seconds=seconds, budget=BUDGETS[name], note=note))
    report.write()
    print(f"   {name}: {status} in {seconds:.1f} s{' - ' + note if note else ''}", flush=True)


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


# -- speed -----------------------------------------------------------------------------------------


def gpt2_small_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> list:
    """GPT-2 small's parameters (the LM head is tied to the token embedding): 124,439,808 in 148."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return shapes + [(width,), (width,)]


def llama2_7b_layer_shapes(width: int = 4096, ffn: int = 11008) -> list:
    """One Llama-2-7B decoder layer: attention q, k, v, o; MLP gate, up, down; two RMSNorms."""
    return [(width, width)] * 4 + [(ffn, width), (ffn, width), (width, ffn), (width,), (width,)]


def problems(cuda: bool) -> list[tuple[str, list]]:
    found = [("tensor-256M", [(16384, 16384)]), ("gpt2-small", gpt2_small_shapes()),
             ("llama2-7b-layer", llama2_7b_layer_shapes())]
    numels = {name: sum(torch.Size(s).numel() for s in shapes) for name, shapes in found}
    counts = {name: len(shapes) for name, shapes in found}
    assert numels["gpt2-small"] == 124_439_808 and counts["gpt2-small"] == 148, (numels, counts)
    assert numels["llama2-7b-layer"] == 202_383_360 and counts["llama2-7b-layer"] == 9, (numels, counts)
    assert numels["tensor-256M"] == 2**28
    return found if cuda else [("tensor-64K (dry run)", [(256, 256)])]


def _lion8bit(state: str, backend: str, **extra):
    return lambda params: lion8bit.Lion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, state=state,
                                        backend=backend, **extra)


def _adamw(**kind):
    return lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01, **kind)


def _lion_pytorch_triton(params):
    if params[0].device.type != "cuda":
        raise Skip("dry run: peers are timed on CUDA only")
    if importlib.util.find_spec("lion_pytorch") is None or importlib.util.find_spec("triton") is None:
        raise Skip("lion-pytorch (with triton) not installed")
    import lion_pytorch

    return lion_pytorch.Lion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, use_triton=True)


def _bitsandbytes(params):
    if params[0].device.type != "cuda":
        raise Skip("dry run: peers are timed on CUDA only")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes not installed")
    import bitsandbytes

    return bitsandbytes.optim.Lion8bit(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def capturable() -> bool:
    return "capturable" in inspect.signature(lion8bit.Lion).parameters


def optimizers(cuda: bool, models: bool) -> dict:
    """label -> (state kind, factory, captured in a CUDA graph)."""
    backend = "triton" if cuda else "cpu"
    found = {f"lion8bit {backend} {state}": (state, _lion8bit(state, backend), False) for state in STATES}
    if models and cuda:
        paged = _lion8bit("8bit", backend, paged=True)
        found[f"lion8bit {backend} 8bit paged"] = ("8bit paged", paged, False)
        if capturable():
            graphed = _lion8bit("8bit", backend, capturable=True)
            found[f"lion8bit {backend} 8bit graph"] = ("8bit", graphed, True)
            found["AdamW fused graph"] = ("2 x param", _adamw(fused=True, capturable=True), True)
    found["AdamW fused"] = ("2 x param", _adamw(fused=True), False)
    found["AdamW foreach"] = ("2 x param", _adamw(foreach=True), False)
    found["lion-pytorch triton"] = ("param", _lion_pytorch_triton, False)
    found["bitsandbytes Lion8bit"] = ("8bit", _bitsandbytes, False)
    return found


def time_steps(step, device: str, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` calls: CUDA events on a GPU."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def copy_gbps(device: str, nbytes: int) -> float:
    """GB/s (read + write) of a device-to-device copy of ``nbytes``: the floor's bandwidth."""
    source = torch.ones(nbytes // 4, device=device)
    target = torch.empty_like(source)
    times = time_steps(lambda: target.copy_(source), device, warmup=2, iters=10)
    return 2 * nbytes / (statistics.median(times) / 1e3) / 1e9


def count_launches(step, device: str) -> tuple[int | None, int | None]:
    """(kernels, copies and memsets) on the GPU during one call, from torch.profiler."""
    if device != "cuda":
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as recorded:
        step()
        torch.cuda.synchronize()
    names = [event.name for event in recorded.events() if event.device_type == DeviceType.CUDA]
    copies = sum(name.startswith(("Memcpy", "Memset")) for name in names)
    if not names:
        return None, None  # the profiler saw nothing on the device (no CUPTI?)
    return len(names) - copies, copies


def graph_replay(optimizer):
    """The optimizer's step captured in a CUDA graph (after warm-up steps on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    optimizer._gpu_check_graph = graph  # keeps the graph alive with the optimizer
    return graph.replay


def state_nbytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for entry in optimizer.state.values() for v in entry.values()
               if isinstance(v, torch.Tensor))


def make_params(shapes: list, dtype: torch.dtype, device: str) -> list:
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        draw = dict(generator=generator, device=device, dtype=dtype)
        param = torch.nn.Parameter(torch.randn(shape, **draw).mul_(0.02))
        param.grad = torch.randn(shape, **draw).mul_(1e-3)
        params.append(param)
    return params


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def speed_part(report: Report, deadline: Deadline, part: str, cuda: bool, names: list) -> str:
    device = "cuda" if cuda else "cpu"
    warmup, iters = (3, 10 if part == "speed-tensor" else 20) if cuda else (1, 3)
    lines = report.section(part)
    if not lines:
        lines += ["Median step ms over the timed steps (p20-p80); floor = bytes the update moves (params "
                  "read and written, grads read, state read and written) / the bandwidth of a device-to-"
                  "device copy measured just before (1 GiB on CUDA); x AdamW fused = this step / fused "
                  "AdamW's, same problem and run; kernels = GPU kernels per step (copies and memsets apart).",
                  "",
                  "| problem | params | optimizer | state | median ms | p20-p80 | floor ms | x floor | "
                  "x AdamW fused | GB/s | kernels (copies) |",
                  "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    if not cuda:
        built = ", ".join(f"{n} ({len(s)} tensors)" for n, s in problems(True) if n in names)
        note = (f"dry run: skipped {', '.join(names)} (built their shapes: {built}), kernel counts, paged "
                "state and CUDA graphs (CUDA only)")
        if part == "speed-models":
            raise Skip(note)
        note = "timed a 64K-element fp32 CPU problem only (no GPU figure); " + note
    for name, shapes in problems(cuda):
        if name not in names and cuda:
            continue
        for dtype in (torch.float32, torch.bfloat16) if cuda else (torch.float32,):
            if deadline.over():
                report.add(part=part, case=name, param_dtype=dtype_name(dtype), status="not run",
                           detail="part budget spent")
                continue
            bandwidth = copy_gbps(device, GIB if cuda else 16 * 2**20)
            params = make_params(shapes, dtype, device)
            param_bytes = sum(p.numel() * p.element_size() for p in params)
            adamw_ms = None
            for label, (state, factory, graphed) in optimizers(cuda, models=part == "speed-models").items():
                row = dict(part=part, case=name, param_dtype=dtype_name(dtype), state=state, optimizer=label)
                if deadline.over():
                    report.add(**row, status="not run", detail="part budget spent")
                    continue
                try:
                    optimizer = factory(params)
                    step = graph_replay(optimizer) if graphed else optimizer.step
                    times = time_steps(step, device, warmup, iters)
                    kernels, copies = count_launches(step, device)
                    moved = 3 * param_bytes + 2 * state_nbytes(optimizer)  # p read + written, g read
                    median = statistics.median(times)
                    floor = moved / (bandwidth * 1e6)
                    if label == "AdamW fused":
                        adamw_ms = median
                    row.update(
                        status="ok", median_ms=median,
                        p20_ms=_percentile(times, 0.2), p80_ms=_percentile(times, 0.8),
                        floor_ms=floor, x_floor=median / floor, bytes_moved=moved, gbps=moved / median / 1e6,
                        copy_gbps=bandwidth, kernels_per_step=kernels, copies_per_step=copies,
                        detail="dry run: CPU, not a GPU figure" if not cuda else "",
                    )
                except Skip as skip:
                    row.update(status="skipped", detail=str(skip))
                except Exception as error:  # one optimizer failing must not lose the others
                    row.update(status="error", detail=f"{type(error).__name__}: {error}"[:300])
                finally:
                    optimizer = step = None
                    release(device)
                report.add(**row)
                took = f" {row['median_ms']:.3f} ms" if row["status"] == "ok" else ""
                print(f"   {name} {dtype_name(dtype)} {label}: {row['status']}{took} {row.get('detail', '')}",
                      flush=True)
            for row in report.rows:
                if row["part"] == part and row["case"] == name and row["param_dtype"] == dtype_name(dtype):
                    if adamw_ms and row.get("median_ms"):
                        row["x_adamw_fused"] = row["median_ms"] / adamw_ms
                    lines.append(_speed_line(row))
            params = None
            release(device)
            report.write()
    return "" if cuda else note


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _fmt(value, spec=".2f") -> str:
    return "" if value is None or value == "" else format(value, spec)


def _speed_line(row: dict) -> str:
    if row["status"] != "ok":
        return (f"| {row['case']} | {row['param_dtype']} | {row.get('optimizer', '')} | "
                f"{row.get('state', '')} | "
                f"{row['status']}: {row.get('detail', '')} | | | | | | |")
    launches = "n/a"
    if row["kernels_per_step"] is not None:
        launches = f"{row['kernels_per_step']} ({row['copies_per_step']})"
    return (f"| {row['case']} | {row['param_dtype']} | {row['optimizer']} | {row['state']} | "
            f"{row['median_ms']:.3f} | {row['p20_ms']:.3f}-{row['p80_ms']:.3f} | {row['floor_ms']:.3f} | "
            f"{row['x_floor']:.2f} | {_fmt(row.get('x_adamw_fused'))} | {row['gbps']:.0f} | {launches} |")


# -- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.md, .csv and logs")
    parser.add_argument("--dry-run", action="store_true",
                        help="run what runs without CUDA (CPU figures only)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT,
                        help=f"seconds for the whole run (default {TIME_LIMIT}); later parts are not run")
    args = parser.parse_args(argv)
    if args.time_limit <= 0:
        raise ValueError(f"Invalid time limit: {args.time_limit}")
    time_limit = Deadline(args.time_limit)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run, or on a GPU machine", file=sys.stderr)
        return 2
    env = environment(cuda, args.dry_run)
    for key, value in env.items():
        print(f"{key:>18}: {value}")
    command = "python benchmarks/gpu_check.py" + (" --dry-run" if args.dry_run else "") + f" --out {args.out}"
    report = Report(args.out, env, command)
    run_part(report, "environment", lambda report, deadline: "printed above and in the table", time_limit)
    run_part(report, "pytest-gpu", pytest_gpu_part, time_limit, args.dry_run)
    run_part(report, "bit-exact", bit_exact_part, time_limit, cuda)
    run_part(report, "speed-tensor", speed_part, time_limit, "speed-tensor", cuda, ["tensor-256M"])
    models = ["gpt2-small", "llama2-7b-layer"]
    run_part(report, "speed-models", speed_part, time_limit, "speed-models", cuda, models)
    run_part(report, "pytest-backends", pytest_backends_part, time_limit, args.dry_run)
    skipped = [part for part in report.parts if part["status"] == "skipped"]
    for part in skipped:
        print(f"skipped {part['name']}: {part['note']}")
    failed = [part["name"] for part in report.parts if part["status"] in ("error", "not run")]
    print(f"wrote {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.csv'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
