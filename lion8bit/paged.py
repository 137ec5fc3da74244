"""Paged momentum (GPU only): buffers in CUDA managed memory, prefetched before their update.

With ``paged=True``, every momentum buffer (8-bit codes and absmax, or the dense bf16 / fp32
momentum) of a CUDA parameter whose local tensor has at least :data:`lion8bit.momentum.PAGED_MIN_NUMEL`
elements is allocated here, in CUDA managed memory: the driver pages it between host and device,
so it is not counted by ``torch.cuda.memory_allocated`` (:func:`allocated_bytes` counts it).
Smaller tensors keep ordinary device memory: managed allocations are page-granular, and
bitsandbytes draws the line at the same size. The optimizer updates a paged group one tensor at a
time and prefetches each tensor's buffers just before its update, so only the tensor being updated
has to fit on the GPU.

The CUDA calls go to the CUDA runtime library (libcudart) that torch itself has loaded. A CUDA
build of torch maps it into the process when it is imported: the pip wheels link the
``nvidia-cuda-runtime`` wheel's ``nvidia/cuda_runtime/lib/libcudart.so.12`` (CUDA 12) or
``nvidia/cu13/lib/libcudart.so.13`` (CUDA 13), older wheels a renamed ``libcudart-<hash>.so.*`` in
``torch/lib``, conda builds the environment's ``lib/libcudart.so.*``. We find it among the files
mapped into this process (``/proc/self/maps``), those of torch's CUDA major version first, and open
it with ``RTLD_NOLOAD``, so nothing new is ever loaded; failing that, we look the functions up in
the process's global symbols (torch loads ``libtorch_global_deps``, which links libcudart, with
``RTLD_GLOBAL``). ``torch.cuda.cudart()`` cannot serve: torch 2.13 binds no managed allocation,
free or prefetch there (only error strings, profiler start / stop, host register / unregister,
stream create / destroy and ``cudaMemGetInfo``). No other package is needed; bitsandbytes, whose
CUDA library exports such an allocator, is not imported.

Allocation is ``cudaMallocManaged(&p, n, cudaMemAttachHost)``, the call and flag of bitsandbytes'
paged allocator (0.50.2 ``cget_managed_ptr``), whose failure prints and calls ``exit(1)`` (seen in
its disassembly); here a failed allocation raises ``torch.cuda.OutOfMemoryError``. Before asking, the
size is checked against the GPU's free memory (``torch.cuda.mem_get_info``, after releasing torch's
cached blocks if they hold the difference, as torch's allocator does before it reports out of
memory): a larger buffer could never be resident for its update, and asking for managed memory
beyond what the GPU has free can hang it, so that raises ``OutOfMemoryError`` naming both sizes
instead. All paged buffers together may exceed the free memory: the driver evicts the pages of
tensors not being updated to host RAM.

:func:`prefetch` enqueues ``cudaMemPrefetchAsync`` on the current stream (bitsandbytes' ``cprefetch``
always uses stream 0), so the prefetch is ordered before the update and nothing waits on the host.
Buffers are freed (``cudaFree``) when their last tensor dies; bitsandbytes never frees its paged
buffers.
"""

from __future__ import annotations

import ctypes as ct
import functools
import math
import os
import re
from pathlib import Path

import torch

from .momentum import PAGED_MIN_NUMEL

_ATTACH_HOST = 2  # cudaMemAttachHost, the flag of bitsandbytes' cget_managed_ptr
_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess: prefetch is supported
_LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice (CUDA >= 13 prefetch signature)

# libcudart.so.12, libcudart.so.13.0.96, and the wheels' renamed copies (libcudart-9335f6a2.so.12).
_RUNTIME_FILE = re.compile(r"libcudart(-[0-9a-f]+)?\.so(\.[0-9]+)*")
_GLOBAL_SYMBOLS = "the process's global symbols"

_live: dict[int, int] = {}  # data pointer -> bytes of every managed buffer alive


def wanted(like: torch.Tensor) -> bool:
    """Whether the momentum of a (local) tensor like this one is paged when ``paged=True``."""
    return like.device.type == "cuda" and like.numel() >= PAGED_MIN_NUMEL


def allocated_bytes() -> int:
    """Bytes of managed memory held by paged buffers now (invisible to memory_allocated)."""
    return sum(_live.values())


def is_paged(tensor: torch.Tensor) -> bool:
    """True if the tensor's storage is a managed buffer from :func:`empty`."""
    return tensor.device.type == "cuda" and tensor.untyped_storage().data_ptr() in _live


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised CUDA tensor in managed memory (same signature as ``torch.empty``).

    Raises ``torch.cuda.OutOfMemoryError`` if the buffer is larger than the GPU's free memory
    or the allocation fails, and RuntimeError if no CUDA runtime library is loaded."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    runtime = _runtime()
    _check_free_memory(nbytes, device)
    pointer = ct.c_void_p()
    with torch.cuda.device(device):
        error = runtime.malloc_managed(ct.byref(pointer), nbytes, _ATTACH_HOST)
    if error:
        raise torch.cuda.OutOfMemoryError(
            f"paged state: cudaMallocManaged of {nbytes:,} bytes failed: {runtime.error_string(error)}"
        )
    buffer = _ManagedBuffer(pointer.value, nbytes, runtime)
    return _as_tensor(buffer, device).view(dtype).view(shape)


def _check_free_memory(nbytes: int, device: torch.device) -> None:
    free, total = torch.cuda.mem_get_info(device)
    if nbytes > free:
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
    if nbytes > free:
        raise torch.cuda.OutOfMemoryError(
            f"paged state: a managed buffer of {nbytes:,} bytes is larger than the {free:,} bytes free "
            f"on {device} ({total:,} bytes in all); it could not be resident for its update, and "
            "asking for managed memory beyond the GPU's free memory can hang the GPU"
        )


def _as_tensor(buffer: _ManagedBuffer, device: torch.device) -> torch.Tensor:
    # torch keeps a reference to `buffer` until the storage dies (from_blob with a deleter).
    return torch.as_tensor(buffer, device=device)


def any_paged(entries: list[dict]) -> bool:
    """True if a buffer of these state entries is paged."""
    return any(isinstance(v, torch.Tensor) and is_paged(v) for entry in entries for v in entry.values())


def prefetch(entries: list[dict]) -> None:
    """Enqueue, on each buffer's current stream, the migration of every paged buffer in these
    state entries to its GPU. Asynchronous: no host synchronisation."""
    for entry in entries:
        for value in entry.values():
            if isinstance(value, torch.Tensor) and is_paged(value):
                _prefetch_storage(value)


def _prefetch_storage(tensor: torch.Tensor) -> None:
    device = tensor.device.index
    runtime = _runtime()
    if not runtime.can_prefetch(device):
        return  # no concurrent managed access (e.g. Windows): pages move on demand
    pointer = tensor.untyped_storage().data_ptr()
    stream = torch.cuda.current_stream(device).cuda_stream
    error = runtime.prefetch(pointer, _live[pointer], device, stream)
    if error:
        raise RuntimeError(f"paged state: cudaMemPrefetchAsync failed: {runtime.error_string(error)}")


class _ManagedBuffer:
    """Owns one managed allocation; exposes it to torch as a flat uint8 CUDA array."""

    def __init__(self, pointer: int, nbytes: int, runtime):
        self.pointer, self.nbytes, self._runtime = pointer, nbytes, runtime
        self._live = _live  # still reachable in __del__ at interpreter exit
        _live[pointer] = nbytes
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (pointer, False),
            "strides": None,  # C-contiguous
            "version": 2,
        }

    def __del__(self):
        # cudaFree waits for the device, so no kernel still uses the buffer.
        if self._live.pop(self.pointer, None) is not None:
            self._runtime.free(self.pointer)


class _Runtime:
    """The CUDA runtime functions we need, typed, from a loaded library (AttributeError if it
    lacks one). ``source`` says where they came from."""

    def __init__(self, library: ct.CDLL, source: str):
        def function(name, restype, *argtypes):
            return ct.CFUNCTYPE(restype, *argtypes)((name, library))

        self.source = source
        self._can_prefetch: dict[int, bool] = {}
        version = ct.c_int()
        function("cudaRuntimeGetVersion", ct.c_int, ct.POINTER(ct.c_int))(ct.byref(version))
        self.version = version.value
        self.malloc_managed = function(
            "cudaMallocManaged", ct.c_int, ct.POINTER(ct.c_void_p), ct.c_size_t, ct.c_uint
        )
        self.free = function("cudaFree", ct.c_int, ct.c_void_p)
        self._error_string = function("cudaGetErrorString", ct.c_char_p, ct.c_int)
        self._attribute = function(
            "cudaDeviceGetAttribute", ct.c_int, ct.POINTER(ct.c_int), ct.c_int, ct.c_int
        )
        if self.version >= 13000:
            # CUDA 13: cudaMemPrefetchAsync(ptr, count, cudaMemLocation, flags, stream)
            self._prefetch = function(
                "cudaMemPrefetchAsync",
                ct.c_int, ct.c_void_p, ct.c_size_t, _MemLocation, ct.c_uint, ct.c_void_p,
            )
        else:
            # CUDA 11-12: cudaMemPrefetchAsync(ptr, count, device, stream)
            self._prefetch = function(
                "cudaMemPrefetchAsync", ct.c_int, ct.c_void_p, ct.c_size_t, ct.c_int, ct.c_void_p
            )

    def error_string(self, error: int) -> str:
        return f"{self._error_string(error).decode()} (cudaError {error})"

    def can_prefetch(self, device: int) -> bool:
        if device not in self._can_prefetch:
            value = ct.c_int()
            error = self._attribute(ct.byref(value), _CONCURRENT_MANAGED_ACCESS, device)
            self._can_prefetch[device] = error == 0 and bool(value.value)
        return self._can_prefetch[device]

    def prefetch(self, pointer: int, nbytes: int, device: int, stream: int) -> int:
        if self.version >= 13000:
            return self._prefetch(pointer, nbytes, _MemLocation(_LOCATION_DEVICE, device), 0, stream)
        return self._prefetch(pointer, nbytes, device, stream)


class _MemLocation(ct.Structure):
    # cudaMemLocation: an enum and a union whose widest member is an int (CUDA 12.2+ and 13 headers).
    _fields_ = [("type", ct.c_int), ("id", ct.c_int)]


@functools.lru_cache(maxsize=None)
def _runtime() -> _Runtime:
    torch.cuda.init()  # a CUDA build of torch has mapped its libcudart by now
    return _find_runtime(_mapped_runtime_files(_process_maps(), torch.version.cuda))


def _process_maps() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""  # not Linux: only the global symbols are searched


def _mapped_runtime_files(maps: str, cuda_version: str | None) -> list[str]:
    """The CUDA runtime libraries mapped into this process (``maps``: the text of
    /proc/self/maps), each once, those of torch's CUDA major version (``cuda_version``) first."""
    paths = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
        path = fields[5] if len(fields) == 6 else ""
        if _RUNTIME_FILE.fullmatch(os.path.basename(path)) and path not in paths:
            paths.append(path)
    if cuda_version is None:
        return paths
    major = cuda_version.split(".")[0]
    return sorted(paths, key=lambda path: _soname_major(path) != major)


def _soname_major(path: str) -> str | None:
    found = re.search(r"\.so\.([0-9]+)", os.path.basename(path))
    return found.group(1) if found else None


def _find_runtime(paths: list[str]) -> _Runtime:
    """The first of these (already loaded) libraries that has every function we need, else the
    process's global symbols; RuntimeError naming what was tried."""
    tried = []
    for path in paths:
        try:
            return _Runtime(ct.CDLL(path, mode=os.RTLD_NOLOAD), path)
        except (OSError, AttributeError) as error:
            tried.append(f"{path} ({error})")
    try:
        return _Runtime(ct.CDLL(None), _GLOBAL_SYMBOLS)
    except (OSError, AttributeError, TypeError) as error:
        tried.append(f"{_GLOBAL_SYMBOLS} ({error})")
    raise RuntimeError(
        "paged=True needs the CUDA runtime library (libcudart) that a CUDA build of torch loads, "
        f"but none with the managed-memory functions is loaded in this process (torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}); tried: {'; '.join(tried)}"
    )
