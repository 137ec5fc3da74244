"""Paged state's CUDA runtime, on CPU: a fake libcudart compiled here stands in for the real one.
How the runtime library is found (the libcudarts mapped into the process, torch's CUDA major
version first, nothing new loaded) and called (the CUDA 12 and 13 prefetch signatures), the
free-memory check before each allocation, the out-of-memory paths, and that buffers are freed
with their last tensor. Paged state end to end on a GPU: tests/test_paged.py."""

import contextlib
import ctypes as ct
import gc
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from lion8bit import paged

# The functions paged.py binds, with the CUDA 12 or 13 prefetch signature; allocations come from
# malloc, and what each call received is recorded in globals the tests read back.
FAKE_RUNTIME_C = r"""
#include <stdlib.h>
struct location { int type; int id; };  /* cudaMemLocation */
int fake_fail_next, fake_mallocs, fake_frees;
unsigned fake_flags, fake_prefetch_flags;
int fake_prefetch_device, fake_prefetch_type;
void *fake_prefetch_pointer, *fake_prefetch_stream;
size_t fake_prefetch_count;
int cudaRuntimeGetVersion(int *version) { *version = FAKE_VERSION; return 0; }
const char *cudaGetErrorString(int error) { return error == 2 ? "fake out of memory" : "fake error"; }
int cudaMallocManaged(void **pointer, size_t size, unsigned flags) {
    int error = fake_fail_next;
    fake_fail_next = 0;
    if (error) return error;
    *pointer = malloc(size);
    fake_flags = flags;
    fake_mallocs++;
    return 0;
}
int cudaFree(void *pointer) { free(pointer); fake_frees++; return 0; }
int cudaDeviceGetAttribute(int *value, int attribute, int device) {
    *value = attribute == 89 && device == 0;  /* concurrent managed access on device 0 only */
    return 0;
}
#if FAKE_VERSION >= 13000
int cudaMemPrefetchAsync(const void *p, size_t count, struct location where, unsigned flags, void *stream) {
    fake_prefetch_type = where.type;
    fake_prefetch_device = where.id;
    fake_prefetch_flags = flags;
#else
int cudaMemPrefetchAsync(const void *p, size_t count, int device, void *stream) {
    fake_prefetch_type = -1;
    fake_prefetch_device = device;
#endif
    fake_prefetch_pointer = (void *)p;
    fake_prefetch_count = count;
    fake_prefetch_stream = stream;
    return 0;
}
"""


@pytest.fixture(scope="module")
def fake_runtime_files(tmp_path_factory):
    """{CUDA version: path} of fake runtimes, named like libcudart but with a major version (99)
    no torch has, so a real runtime of torch's version is always found before them."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the fake CUDA runtime")
    directory = tmp_path_factory.mktemp("fake_cudart")
    (directory / "fake.c").write_text(FAKE_RUNTIME_C)
    files = {}
    for version in (12080, 13000):
        (directory / str(version)).mkdir()
        path = directory / str(version) / "libcudart.so.99"
        command = [compiler, "-shared", "-fPIC", f"-DFAKE_VERSION={version}", "-o", str(path)]
        subprocess.run([*command, str(directory / "fake.c")], check=True)
        files[version] = str(path)
    return files


def fake_library(path):
    library = ct.CDLL(path)  # loaded (RTLD_LOCAL) as torch would have: paged.py only finds it

    class Fake:
        def __getattr__(self, name):
            kind = ct.c_int
            if name.endswith("count"):
                kind = ct.c_size_t
            elif name.endswith(("pointer", "stream")):
                kind = ct.c_void_p
            elif name.endswith("flags"):
                kind = ct.c_uint
            return kind.in_dll(library, f"fake_{name}").value

        def set(self, name, value):
            ct.c_int.in_dll(library, f"fake_{name}").value = value

    return Fake()


@pytest.fixture(params=[12080, 13000], ids=["cuda12", "cuda13"])
def fake(request, fake_runtime_files, monkeypatch):
    """A fake runtime as paged._runtime(), and CPU stand-ins for the CUDA calls around it."""
    path = fake_runtime_files[request.param]
    recorder = fake_library(path)
    runtime = paged._find_runtime([path])
    monkeypatch.setattr(paged, "_runtime", lambda: runtime)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 2**31))
    monkeypatch.setattr(paged, "_as_tensor", host_tensor)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importing it now raises ImportError
    gc.collect()  # buffers of earlier tests are freed before this one counts
    recorder.runtime, recorder.version = runtime, request.param
    return recorder


def host_tensor(buffer, device):
    # The CPU analogue of torch.as_tensor(buffer, device="cuda"): the storage keeps `buffer`.
    owner = type("Owner", (ct.c_uint8 * buffer.nbytes,), {}).from_address(buffer.pointer)
    owner.buffer = buffer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not writable" warnings of frombuffer on some versions
        return torch.frombuffer(owner, dtype=torch.uint8)


SITE = "/env/lib/python3.12/site-packages"
CU12 = f"{SITE}/nvidia/cuda_runtime/lib/libcudart.so.12"
CU13 = f"{SITE}/nvidia/cu13/lib/libcudart.so.13"
BUNDLED = f"{SITE}/torch/lib/libcudart-9335f6a2.so.11.0"
UNVERSIONED = "/opt/my libs/libcudart.so"
MAPS = f"""\
7f0000000000-7f0000001000 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.575.57.08
7f0000001000-7f0000002000 r-xp 00000000 08:01 2 {CU12}
7f0000002000-7f0000003000 r--p 00001000 08:01 2 {CU12}
7f0000003000-7f0000004000 r-xp 00000000 08:01 3 {CU13}
7f0000004000-7f0000005000 r-xp 00000000 08:01 4 {BUNDLED}
7f0000005000-7f0000006000 r-xp 00000000 08:01 5 {SITE}/nvidia/cu13/lib/libcudadevrt.a
7f0000006000-7f0000007000 r-xp 00000000 08:01 6 /old/libcudart.so.12 (deleted)
7f0000007000-7f0000008000 r-xp 00000000 08:01 7 {SITE}/torch/lib/libtorch_cuda.so
7f0000008000-7f0000009000 rw-p 00000000 00:00 0
7f0000009000-7f000000a000 r-xp 00000000 08:01 8 {UNVERSIONED}
"""


@pytest.mark.parametrize(
    "cuda_version, expected",
    [
        ("13.0", [CU13, CU12, BUNDLED, UNVERSIONED]),
        ("12.8", [CU12, CU13, BUNDLED, UNVERSIONED]),
        ("11.8", [BUNDLED, CU12, CU13, UNVERSIONED]),
        (None, [CU12, CU13, BUNDLED, UNVERSIONED]),  # a CPU build of torch: the order mapped
    ],
)
def test_the_runtime_files_are_the_mapped_libcudarts_torchs_major_version_first(cuda_version, expected):
    assert paged._mapped_runtime_files(MAPS, cuda_version) == expected


def test_a_loaded_runtime_library_is_found_in_this_process_maps(fake_runtime_files):
    path = fake_runtime_files[13000]
    ct.CDLL(path)
    assert path in paged._mapped_runtime_files(paged._process_maps(), None)


def test_the_runtime_is_found_after_torch_initialises_cuda(fake_runtime_files, monkeypatch):
    path = fake_runtime_files[13000]
    ct.CDLL(path)
    initialised = []
    monkeypatch.setattr(torch.cuda, "init", lambda: initialised.append(True))
    maps = f"7f0000000000-7f0000001000 r-xp 00000000 08:01 1 {path}\n"
    monkeypatch.setattr(paged, "_process_maps", lambda: maps)
    runtime = paged._runtime.__wrapped__()  # not the cached one
    assert initialised == [True] and runtime.source == path and runtime.version == 13000


def test_the_first_loaded_library_with_every_function_is_used_and_nothing_new_is_loaded(fake_runtime_files, tmp_path):
    not_loaded = tmp_path / "libcudart.so.99"
    shutil.copy(fake_runtime_files[12080], not_loaded)
    loaded = fake_runtime_files[13000]
    ct.CDLL(loaded)
    libc = next(p for p in paged._process_maps().split() if os.path.basename(p).startswith("libc.so"))
    runtime = paged._find_runtime([str(not_loaded), libc, loaded])
    assert runtime.source == loaded
    assert str(not_loaded) not in paged._process_maps()  # RTLD_NOLOAD: looked at, never loaded


def test_no_runtime_raises_a_runtime_error_naming_what_was_tried(tmp_path):
    # This process has no CUDA runtime in its global symbols (a CPU build of torch); on a GPU
    # machine it has torch's, so the error cannot happen there.
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch has its runtime in the global symbols")
    missing = str(tmp_path / "libcudart.so.12")
    with pytest.raises(RuntimeError, match="needs the CUDA runtime library") as error:
        paged._find_runtime([missing])
    assert missing in str(error.value) and paged._GLOBAL_SYMBOLS in str(error.value)
    assert torch.__version__ in str(error.value)


def test_the_runtime_binds_each_function_with_its_cuda_version_signature(fake):
    runtime = fake.runtime
    assert runtime.version == fake.version
    assert runtime.error_string(2) == "fake out of memory (cudaError 2)"
    assert runtime.can_prefetch(0) and not runtime.can_prefetch(1)
    buffer = paged.empty((1000,), dtype=torch.uint8, device="cuda:0")
    pointer = buffer.untyped_storage().data_ptr()
    assert runtime.prefetch(pointer, 1000, 0, 0xBEEF) == 0
    assert (fake.prefetch_pointer, fake.prefetch_count, fake.prefetch_stream) == (pointer, 1000, 0xBEEF)
    assert fake.prefetch_device == 0
    if fake.version >= 13000:
        assert (fake.prefetch_type, fake.prefetch_flags) == (1, 0)  # cudaMemLocationTypeDevice, no flags
    else:
        assert fake.prefetch_type == -1  # the int-device signature was called


def test_empty_allocates_managed_memory_attached_to_the_host_and_frees_it_with_the_last_tensor(fake):
    before, mallocs, frees = paged.allocated_bytes(), fake.mallocs, fake.frees
    codes = paged.empty((64, 100), dtype=torch.float32, device="cuda:0")
    assert codes.shape == (64, 100) and codes.dtype == torch.float32
    assert fake.mallocs == mallocs + 1 and fake.flags == 2  # cudaMemAttachHost
    assert paged.allocated_bytes() - before == 64 * 100 * 4
    codes.fill_(1.5)  # the memory is really there
    row = codes[3]
    del codes
    gc.collect()
    assert fake.frees == frees and row.sum().item() == 150.0  # a view keeps the buffer
    del row
    gc.collect()
    assert fake.frees == frees + 1 and paged.allocated_bytes() == before


def test_empty_never_asks_for_more_than_the_gpu_has_free(fake, monkeypatch):
    released = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4096, 2**34))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    before, mallocs = paged.allocated_bytes(), fake.mallocs
    sizes = "8,192 bytes is larger than the 4,096 bytes free on cuda:0 .17,179,869,184 bytes in all"
    with pytest.raises(torch.cuda.OutOfMemoryError, match=sizes):
        paged.empty((2048,), dtype=torch.float32, device="cuda:0")
    assert released == [True]  # torch's cache was released before giving up
    assert fake.mallocs == mallocs and paged.allocated_bytes() == before
    paged.empty((1024,), dtype=torch.float32, device="cuda:0")  # exactly the free bytes: fine
    assert fake.mallocs == mallocs + 1


def test_empty_asks_again_after_torch_releases_its_cache(fake, monkeypatch):
    answers = iter([(4096, 2**34), (2**20, 2**34)])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: next(answers))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    mallocs = fake.mallocs
    assert paged.empty((2048,), dtype=torch.float32, device="cuda:0").numel() == 2048
    assert fake.mallocs == mallocs + 1


def test_a_failed_allocation_raises_out_of_memory_and_keeps_nothing(fake):
    before = paged.allocated_bytes()
    fake.set("fail_next", 2)
    failed = r"cudaMallocManaged of 4,000 bytes failed: fake out of memory \(cudaError 2\)"
    with pytest.raises(torch.cuda.OutOfMemoryError, match=failed):
        paged.empty((1000,), dtype=torch.float32, device="cuda:0")
    assert paged.allocated_bytes() == before
    assert paged.empty((1000,), dtype=torch.float32, device="cuda:0").numel() == 1000  # and it goes on
