"""Paged momentum (GPU only): buffers in CUDA managed memory, prefetched before their update.

With ``paged=True``, every momentum buffer (8-bit codes and absmax, or the dense bf16 / fp32
momentum) of a CUDA parameter whose local tensor has at least :data:`lion8bit.momentum.PAGED_MIN_NUMEL` elements is
allocated here, in CUDA managed memory: the driver pages it between host and device, so it is
not counted by ``torch.cuda.memory_allocated`` (:func:`allocated_bytes` counts it). Smaller
tensors keep ordinary device memory: managed allocations are page-granular, and bitsandbytes
draws the line at the same size. The optimizer updates a paged group one tensor at a time and
prefetches each tensor's buffers just before its update, so only the tensor being updated has
to fit on the GPU.

The memory comes from the CUDA runtime that bitsandbytes' CUDA library loads, with the call
and flags of its allocator ``cget_managed_ptr`` (0.50.2: ``cudaMallocManaged(&p, n,
cudaMemAttachHost)``). We call the runtime ourselves because ``cget_managed_ptr`` prints and
calls ``exit(1)`` when the allocation fails (seen in its disassembly), and because its
``cprefetch`` always uses stream 0; :func:`prefetch` enqueues on the current stream instead, so
the prefetch is ordered before the update and nothing waits on the host. Buffers are freed
(``cudaFree``) when their last tensor dies; bitsandbytes never frees its paged buffers.
"""

from __future__ import annotations

import ctypes as ct
import functools
import math

import torch

from .momentum import PAGED_MIN_NUMEL


_ATTACH_HOST = 2  # cudaMemAttachHost, the flag of bitsandbytes' cget_managed_ptr
_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess: prefetch is supported
_LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice (CUDA >= 13 prefetch signature)

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
    """An uninitialised CUDA tensor in managed memory (same signature as ``torch.empty``)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    runtime = _runtime()
    pointer = ct.c_void_p()
    with torch.cuda.device(device):
        error = runtime.malloc_managed(ct.byref(pointer), nbytes, _ATTACH_HOST)
    if error:
        raise torch.cuda.OutOfMemoryError(
            f"paged state: cudaMallocManaged of {nbytes} bytes failed: {runtime.error_string(error)}"
        )
    buffer = _ManagedBuffer(pointer.value, nbytes, runtime)
    # torch keeps a reference to `buffer` until the storage dies (from_blob with a deleter).
    raw = torch.as_tensor(buffer, device=device)
    return raw.view(dtype).view(shape)


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
    """The CUDA runtime functions we need, typed, from bitsandbytes' loaded CUDA library."""

    def __init__(self, library: ct.CDLL):
        # dlsym on the library's handle also finds the symbols of libcudart, which it links.
        def function(name, restype, *argtypes):
            return ct.CFUNCTYPE(restype, *argtypes)(ct.cast(getattr(library, name), ct.c_void_p).value)

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
                "cudaMemPrefetchAsync", ct.c_int, ct.c_void_p, ct.c_size_t, _MemLocation, ct.c_uint, ct.c_void_p
            )
        else:
            # CUDA 11-12: cudaMemPrefetchAsync(ptr, count, device, stream)
            self._prefetch = function(
                "cudaMemPrefetchAsync", ct.c_int, ct.c_void_p, ct.c_size_t, ct.c_int, ct.c_void_p
            )

    def error_string(self, error: int) -> str:
        return f"{self._error_string(error).decode()} (cudaError {error})"

    @functools.lru_cache(maxsize=None)
    def can_prefetch(self, device: int) -> bool:
        value = ct.c_int()
        return self._attribute(ct.byref(value), _CONCURRENT_MANAGED_ACCESS, device) == 0 and bool(value.value)

    def prefetch(self, pointer: int, nbytes: int, device: int, stream: int) -> int:
        if self.version >= 13000:
            return self._prefetch(pointer, nbytes, _MemLocation(_LOCATION_DEVICE, device), 0, stream)
        return self._prefetch(pointer, nbytes, device, stream)


class _MemLocation(ct.Structure):
    _fields_ = [("type", ct.c_int), ("id", ct.c_int)]


@functools.lru_cache(maxsize=None)
def _runtime() -> _Runtime:
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        raise RuntimeError(
            "paged=True on CUDA needs bitsandbytes (pip install bitsandbytes): its CUDA "
            "library provides the managed-memory allocator"
        ) from None
    library = getattr(lib, "_lib", None)
    if library is None or getattr(library, "cget_managed_ptr", None) is None:
        raise RuntimeError(
            "paged=True needs bitsandbytes' CUDA library, but the installed bitsandbytes "
            "loaded none (a CPU-only build?)"
        )
    return _Runtime(library)
