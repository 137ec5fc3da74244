"""The GPU check's frame (benchmarks/gpu_check.py): its settings and time budgets, the deadline, the
environment it records and the report it rewrites after every result (gpu_check.md and .csv),
and run_part, which runs one part within its budget and records its outcome."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
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


def _fmt(value, spec=".2f") -> str:
    return "" if value is None or value == "" else format(value, spec)
