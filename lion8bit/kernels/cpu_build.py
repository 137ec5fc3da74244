"""Build and load the fused CPU kernel (``cpu_lion.cpp``) once per machine.

Why a plain shared library and ctypes rather than ``torch.utils.cpp_extension`` or
``torch.compile``: the kernel needs no torch headers (it takes raw pointers), so one compiler
call builds it in ~2 s where compiling one two-line file that includes ``torch/extension.h``
takes 27 s here (idle, 2 cores); ctypes releases the GIL during the call; and one build serves
every parameter shape (torch.compile reached 54-119 ms per step on one 16.8M-element tensor
where the floor is ~10 ms, DESIGN.md §4).

The library is cached under ``$LION8BIT_CACHE_DIR`` (default ``~/.cache/lion8bit``), keyed by
the source, the compiler and its version, the flags and the CPU, so later processes only load
it. Without a working compiler (``$CXX``, else ``c++``) :func:`library` raises
:class:`BuildError`, and the registry (:mod:`lion8bit.kernels`) does not register "cpu".
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_lion.cpp")
# What SOURCE includes: the cache key covers every file of the kernel.
HEADERS = tuple(sorted(SOURCE.parent.glob("cpu_lion_*.h")))

# -ffp-contract=off: the spec rounds beta1*m and (1-beta1)*g separately before adding them
# (reference.py); GCC contracts a*b + c*d into an FMA by default at -O2 and above, which changes
# the last bit of the momentum. No -ffast-math for the same reason (and for NaN / signed zeros).
# -fno-trapping-math only promises that no one reads floating-point exception flags; it changes
# no result, and without it GCC 12 keeps the update's selects as branches and vectorizes nothing.
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-trapping-math")
# -march=native lets the kernel use the widest vectors (AVX-512 here: its 16-lane 8-bit step and
# permute table lookups); the CPU is part of the cache key. Compilers without the flag build the
# portable variant.
TUNING = (("-march=native",), ())

INT64_P = ctypes.POINTER(ctypes.c_int64)
FLOAT_P = ctypes.POINTER(ctypes.c_float)
_SIGNATURES = {
    "lion8bit_cpu_step": (
        INT64_P, ctypes.c_int64, FLOAT_P, FLOAT_P, ctypes.c_int64, ctypes.c_int64,
        FLOAT_P, FLOAT_P, ctypes.c_int64,
    ),
    "lion8bit_cpu_aligned_counts": (
        INT64_P, ctypes.c_int64, FLOAT_P, ctypes.c_int64, ctypes.c_int64, FLOAT_P, INT64_P,
        ctypes.c_int64,
    ),
}


class BuildError(RuntimeError):
    """The kernel library could not be built; the message is one line."""


def cache_dir() -> Path:
    configured = os.environ.get("LION8BIT_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lion8bit"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def build(cxx: str | None = None, directory: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Path of the compiled library, compiling it if this machine has no cached build.

    ``extra_flags`` go after the tuning flags (tests build a variant without AVX-512 this way).
    """
    cxx = cxx or compiler()
    executable = shutil.which(cxx)
    if executable is None:
        raise BuildError(f"no C++ compiler {cxx!r} found (set CXX)")
    version = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    reason = ""
    for tuning in TUNING:
        flags = FLAGS + tuning + tuple(extra_flags)
        key = hashlib.sha256(
            "\0".join(
                [
                    SOURCE.read_text(),
                    *(h.read_text() for h in HEADERS),
                    executable,
                    version,
                    " ".join(flags),
                    _cpu_identity(),
                ]
            ).encode()
        ).hexdigest()[:16]
        target = directory / f"cpu_lion-{key}.so"
        if target.exists():
            return target
        # Compile to a private name, then rename: concurrent processes never load a partial file.
        handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(handle)
        result = subprocess.run([executable, *flags, str(SOURCE), "-o", partial], capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(partial, target)
            return target
        os.unlink(partial)
        log = target.with_suffix(".log")
        log.write_text(result.stderr)
        lines = result.stderr.splitlines()
        errors = [line for line in lines if "error" in line] or lines[-1:]
        reason = f"{errors[0].strip() if errors else f'exit code {result.returncode}'} (log: {log})"
    raise BuildError(f"{cxx} failed to compile {SOURCE.name}: {reason}")


def load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int64
    return library


@functools.cache
def _outcome() -> ctypes.CDLL | BuildError:
    try:
        return load(build())
    except OSError as error:  # a library that builds but does not load
        return BuildError(" ".join(str(error).split()))
    except BuildError as error:
        return error


def library() -> ctypes.CDLL:
    """The kernel library, built on first use (cached per process and per machine);
    :class:`BuildError` saying why if it cannot be built or loaded."""
    outcome = _outcome()
    if isinstance(outcome, BuildError):
        raise outcome
    return outcome
