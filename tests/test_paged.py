"""Paged state on CUDA: managed memory, prefetch on the current stream, no host syncs, survives
load_state_dict, freed with the optimizer, out of memory raised and never asked for. The tests
marked gpu skip without CUDA (the CPU fallback is tested in test_optimizer.py). On CPU: the order
of prefetches and updates, that loaded state of a paged group goes to its allocator, and that a
step whose state allocation failed can be retried. The CUDA runtime itself, on CPU with a fake
library: tests/test_paged_runtime.py."""

import gc
import os
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
