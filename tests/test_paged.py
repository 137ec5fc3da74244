"""Paged state on CUDA: managed memory, prefetch on the current stream, no host syncs, survives
load_state_dict, freed with the optimizer, out of memory raised and never asked for. The tests
marked gpu skip without CUDA (the CPU fallback is tested in test_optimizer.py). On CPU: the order
of prefetches and updates, that loaded state of a paged group goes to its allocator, and, with a
fake CUDA runtime library compiled here, how the runtime is found and called, the free-memory
check, the out-of-memory paths and that buffers are freed with their tensors."""

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

import lion8bit.optimizer
from lion8bit import Lion, Lion8bit, PagedLion8bit, paged
from lion8bit import momentum as mom

BIG = (512, 256)  # 131072 elements: paged (mom.PAGED_MIN_NUMEL = 100000)
SMALL = (64, 64)  # 4096 elements: ordinary device memory
OPTIONS = dict(lr=1e-3, weight_decay=0.1)


def make_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(*shape, generator=generator).cuda())
        for shape in (BIG, BIG, SMALL)
    ]


def train(optimizer, params, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for param in params:
            param.grad = (torch.randn(param.shape, generator=generator) * 0.01).cuda()
        optimizer.step()


def momentum_buffers(optimizer, param):
    return [
        v for k, v in optimizer.state[param].items() if k in (mom.MOMENTUM, mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX)
    ]


def paged_bytes_of(params, fmt="8bit"):
    return sum(mom.momentum_nbytes(p.numel(), fmt) for p in params if p.numel() >= mom.PAGED_MIN_NUMEL)


@pytest.mark.gpu
@pytest.mark.parametrize("state", ["8bit", "4bit"])
def test_paged_state_lives_in_managed_memory_and_steps_like_unpaged_state(state):
    params, twins = make_params(), make_params()
    before = paged.allocated_bytes()
    optimizer = Lion(params, state=state, paged=True, **OPTIONS)
    unpaged = Lion(twins, state=state, **OPTIONS)
    train(optimizer, params, 5)
    train(unpaged, twins, 5)
    for param, twin in zip(params, twins, strict=True):
        assert torch.equal(param, twin)
        assert all(
            paged.is_paged(b) == (param.numel() >= mom.PAGED_MIN_NUMEL) for b in momentum_buffers(optimizer, param)
        )
    assert paged.allocated_bytes() - before == paged_bytes_of(params, state)


@pytest.mark.gpu
def test_paged_bytes_are_not_counted_by_memory_allocated():
    params = make_params()
    optimizer = PagedLion8bit(params, **OPTIONS)
    for param in params:
        param.grad = torch.full_like(param, 0.01)
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    optimizer.step()  # creates the state; the step's temporaries are freed again
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - allocated
    small = mom.momentum_nbytes(SMALL[0] * SMALL[1], "8bit")
    assert grown <= small + 2 * 512  # the caching allocator rounds each block up to 512 bytes
    assert paged_bytes_of(params) > 10 * grown


@pytest.mark.gpu
def test_paging_survives_load_state_dict():
    params = make_params()
    optimizer = PagedLion8bit(params, **OPTIONS)
    train(optimizer, params, 3)
    for state_dict in (optimizer.state_dict(), _on_cpu(optimizer.state_dict())):
        loaded = PagedLion8bit(make_params(), **OPTIONS)
        loaded.load_state_dict(state_dict)
        for param, twin in zip(params, loaded.param_groups[0]["params"], strict=True):
            for buffer, original in zip(
                momentum_buffers(loaded, twin), momentum_buffers(optimizer, param), strict=True
            ):
                assert paged.is_paged(buffer) == (param.numel() >= mom.PAGED_MIN_NUMEL)
                assert buffer.dtype == original.dtype and torch.equal(buffer, original)


def _on_cpu(state_dict):
    return {
        "state": {
            k: {n: v.cpu() if torch.is_tensor(v) else v for n, v in e.items()} for k, e in state_dict["state"].items()
        },
        "param_groups": state_dict["param_groups"],
    }


@pytest.mark.gpu
def test_step_never_synchronises_with_the_host():
    params = make_params()
    optimizer = PagedLion8bit(params, **OPTIONS)
    train(optimizer, params, 1)  # allocates the state
    for param in params:
        param.grad = torch.full_like(param, 0.01)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_each_paged_buffer_is_prefetched_on_the_current_stream(monkeypatch):
    runtime = paged._runtime()
    device = torch.cuda.current_device()
    if not runtime.can_prefetch(device):
        pytest.skip("this GPU has no concurrent managed access: prefetch is skipped by design")
    params = make_params()
    optimizer = PagedLion8bit(params, **OPTIONS)
    train(optimizer, params, 1)
    calls = []
    original = runtime.prefetch

    def spy(pointer, nbytes, device, stream):
        calls.append((pointer, stream))
        return original(pointer, nbytes, device, stream)

    monkeypatch.setattr(runtime, "prefetch", spy)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for param in params:
            param.grad = torch.full_like(param, 0.01)
        optimizer.step()
    side.synchronize()
    buffers = [b for p in params for b in momentum_buffers(optimizer, p) if paged.is_paged(b)]
    assert sorted(pointer for pointer, _ in calls) == sorted(b.untyped_storage().data_ptr() for b in buffers)
    assert {stream for _, stream in calls} == {side.cuda_stream}


@pytest.mark.gpu
def test_paged_buffers_are_freed_with_the_optimizer():
    before = paged.allocated_bytes()
    params = make_params()
    optimizer = PagedLion8bit(params, **OPTIONS)
    train(optimizer, params, 1)
    assert paged.allocated_bytes() > before
    del optimizer
    gc.collect()
    assert paged.allocated_bytes() == before


@pytest.mark.gpu
def test_the_runtime_is_the_cuda_runtime_torch_loaded():
    runtime = paged._runtime()
    assert runtime.version // 1000 == int(torch.version.cuda.split(".")[0])
    assert runtime.source == paged._GLOBAL_SYMBOLS or "libcudart" in os.path.basename(runtime.source)


@pytest.mark.gpu
def test_a_buffer_larger_than_the_free_memory_is_never_asked_for(monkeypatch):
    runtime = paged._runtime()
    asked = []
    monkeypatch.setattr(runtime, "malloc_managed", lambda *args: asked.append(args) or 2)
    before = paged.allocated_bytes()
    torch.cuda.empty_cache()  # what the check releases before it gives up
    free, _ = torch.cuda.mem_get_info()
    too_large = free + 2**30
    with pytest.raises(torch.cuda.OutOfMemoryError, match=f"{too_large:,} bytes is larger than"):
        paged.empty((too_large,), dtype=torch.uint8, device="cuda")
    assert asked == [] and paged.allocated_bytes() == before


@pytest.mark.gpu
def test_a_failed_managed_allocation_raises_out_of_memory_and_the_process_lives_on(monkeypatch):
    runtime = paged._runtime()
    monkeypatch.setattr(runtime, "malloc_managed", lambda *args: 2)  # cudaErrorMemoryAllocation
    before = paged.allocated_bytes()
    params = make_params()
    optimizer = PagedLion8bit(params, **OPTIONS)
    for param in params:
        param.grad = torch.full_like(param, 0.01)
    failed = r"cudaMallocManaged of [0-9,]+ bytes failed: .*\(cudaError 2\)"
    with pytest.raises(torch.cuda.OutOfMemoryError, match=failed):
        optimizer.step()
    assert paged.allocated_bytes() == before
    monkeypatch.undo()
    optimizer = PagedLion8bit(params, **OPTIONS)
    train(optimizer, params, 1)  # the runtime still allocates
    assert paged.allocated_bytes() - before == paged_bytes_of(params)


def test_a_paged_group_updates_one_tensor_at_a_time_each_prefetched_just_before(monkeypatch):
    # Nothing is paged on CPU: pretend the 8-bit codes are, and record prefetches and updates.
    events = []
    monkeypatch.setattr(paged, "is_paged", lambda tensor: tensor.dtype == torch.uint8)
    monkeypatch.setattr(paged, "_prefetch_storage", lambda tensor: events.append(("prefetch", tensor.data_ptr())))
    original = lion8bit.optimizer.lion  # the functional, as the optimizer calls it

    def recording_lion(params, grads, entries, *args, **kwargs):
        events.append(
            ("update", [entry[mom.MOMENTUM_CODES].data_ptr() for entry in entries if mom.MOMENTUM_CODES in entry])
        )
        return original(params, grads, entries, *args, **kwargs)

    monkeypatch.setattr(lion8bit.optimizer, "lion", recording_lion)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((8, 8), (3,), (8, 8))]
    for param in params:
        param.grad = torch.randn_like(param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged=True on CPU warns
        optimizer = PagedLion8bit(params, min_8bit_size=16)
        optimizer.step()
    codes = [optimizer.state[p][mom.MOMENTUM_CODES].data_ptr() for p in (params[0], params[2])]
    assert events == [
        ("prefetch", codes[0]),
        ("update", [codes[0]]),
        ("update", []),  # the small param keeps fp32 momentum: nothing to prefetch
        ("prefetch", codes[1]),
        ("update", [codes[1]]),
    ]


def test_loaded_state_of_a_paged_group_lands_in_buffers_from_its_allocator(monkeypatch):
    # The CPU half of test_paging_survives_load_state_dict: bitsandbytes copies loaded state into
    # ordinary tensors (it loses paging); we must copy it into buffers from the group's allocator.
    # Nothing is paged on CPU, so a paged group's allocator is replaced by one that records.
    from_allocator = set()

    def recording_empty(shape, *, dtype, device):
        tensor = torch.empty(shape, dtype=dtype, device=device)
        from_allocator.add(tensor.data_ptr())
        return tensor

    monkeypatch.setattr(
        lion8bit.optimizer.Lion,
        "_allocator",
        lambda self, param, group: recording_empty if group["paged"] else torch.empty,
    )

    def make(seed=0):
        generator = torch.Generator().manual_seed(seed)
        paged_params = [torch.nn.Parameter(torch.randn(64, 64, generator=generator)) for _ in range(2)]
        plain_params = [torch.nn.Parameter(torch.randn(64, 64, generator=generator))]
        optimizer = Lion8bit([{"params": paged_params, "paged": True}, {"params": plain_params}], **OPTIONS)
        return optimizer, paged_params, plain_params

    def step(optimizer, params):
        generator = torch.Generator().manual_seed(1)
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) * 0.01
        optimizer.step()

    source, paged_params, plain_params = make()
    step(source, paged_params + plain_params)
    saved = source.state_dict()

    from_allocator.clear()
    target, paged_params, plain_params = make()
    target.load_state_dict(saved)
    for param in paged_params:
        buffers = momentum_buffers(target, param)
        assert {buffer.dtype for buffer in buffers} == {torch.uint8, torch.float32}
        assert all(buffer.data_ptr() in from_allocator for buffer in buffers)
    assert not any(buffer.data_ptr() in from_allocator for buffer in momentum_buffers(target, plain_params[0]))
    # The loaded values arrived intact in the new buffers.
    for name in (mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX):
        for param_id, param in enumerate(paged_params):
            assert torch.equal(target.state[param][name], saved["state"][param_id][name])


def test_a_step_whose_state_allocation_failed_can_be_retried(monkeypatch):
    failures = [torch.cuda.OutOfMemoryError("paged state: cudaMallocManaged of 6,400 bytes failed")]

    def failing_once(shape, *, dtype, device):
        if failures:
            raise failures.pop()
        return torch.empty(shape, dtype=dtype, device=device)

    monkeypatch.setattr(lion8bit.optimizer.Lion, "_allocator", lambda self, param, group: failing_once)
    param = torch.nn.Parameter(torch.randn(64, 100))
    param.grad = torch.randn_like(param)
    optimizer = Lion8bit([param], **OPTIONS)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        optimizer.step()
    optimizer.step()
    assert optimizer.state[param][mom.STEP] == 1


# -- the CUDA runtime, on CPU: a fake libcudart compiled here ----------------------------------

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
