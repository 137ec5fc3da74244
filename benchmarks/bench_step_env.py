"""The machine and versions that each row of benchmarks/bench_step.py records, and the fused
kernel's build time."""

import datetime
import importlib.metadata
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lion8bit.kernels import cpu_build


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _llc() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in output.splitlines():
            if line.startswith("L3 cache"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "unknown"


def environment() -> dict:
    memory = _memory()
    return dict(
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {memory} RAM, L3 {_llc()})",
        cpu=_cpu_model(),
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        triton=_version("triton"),
        bitsandbytes=_version("bitsandbytes"),
        lion_pytorch=_version("lion-pytorch"),
        lion8bit=f"{_version('lion8bit')} ({_commit()})",
    )


def kernel_build_seconds() -> float:
    """A fresh build of the fused kernel (what the first process on a machine pays once)."""
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        cpu_build.build(directory=Path(directory))
        return time.perf_counter() - start
