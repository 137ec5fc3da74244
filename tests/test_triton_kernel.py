"""What is particular to the Triton backend (lion8bit/kernels/triton_lion.py and
triton_lion_kernels.py), on CPU, in Triton's interpreter: its helpers exhaustively (requantizer,
random bits, bf16 / fp16 rounding, each run alone by tests/triton_probes.py), the public API with
backend="triton", no host synchronisation, its torch.library ops (opcheck, torch.compile) and the
launch-table cache. Where it runs and how it refuses what it cannot run on:
tests/test_triton_availability.py. Its step for every option, dtype, format and size, and its
launches of many tensors, are in the conformance suite, tests/test_backends.py and
test_backends_many_tensors.py.

tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU, before anything imports triton:
triton reads it when @triton.jit decorates a kernel (its own tl.max / tl.sum included).
"""

import os
import sys

import pytest
import torch

from lion8bit import Lion, kernels, quant
from lion8bit.functional import BUFFER_KEYS
from lion8bit.reference import lion_scalars

from helpers import assert_same_bits, assert_same_state, batch, copies, group_of, step_and_compare

pytest.importorskip("triton")
if not kernels.interpreting():
    pytest.skip("the Triton interpreter is not on in this process (a GPU machine)", allow_module_level=True)

import triton_probes as probes  # noqa: E402  (decorated for the interpreter: triton is importable)

# ---------------------------------------------------------------------------------------------
# helpers of the kernel, exhaustively


def _requant_boundaries() -> torch.Tensor:
    """Codes, fp32 roundings of every decision threshold, and their fp32 neighbours, both signs."""
    thresholds = quant.decision_thresholds()
    nearest = thresholds.float()
    below = torch.where(nearest.double() > thresholds, nearest.nextafter(torch.tensor(-1.0)), nearest)
    above = torch.where(nearest.double() < thresholds, nearest.nextafter(torch.tensor(1.0)), nearest)
    values = torch.cat([quant.codebook(), nearest, below, above, torch.tensor([1.0, 2.0**-22])])
    for _ in range(2):
        values = torch.cat([values, values.nextafter(values + 1), values.nextafter(values - 1)])
    return torch.cat([values, -values]).unique()


def test_requantizer_is_nearest_codes_exactly():
    generator = torch.Generator().manual_seed(1)
    sign = torch.randint(0, 2, (20_000,), generator=generator) * 2 - 1
    random = torch.cat(
        [
            torch.rand(20_000, generator=generator) * 2 - 1,
            sign * 10 ** (torch.rand(20_000, generator=generator) * 9 - 9),  # 1e-9 .. 1
        ]
    )
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17e-38, -1.17e-38, 1.0000001, -1.0000001])
    infinite = torch.tensor([float("inf"), float("nan")])
    special = torch.cat([special, infinite, -infinite])
    boundaries = _requant_boundaries()
    assert boundaries.numel() > 2500  # 255 thresholds x 3 roundings x 5 neighbours x 2 signs, less repeats
    for values in (boundaries, random, special):
        assert_same_bits(probes.nearest_codes(values), quant.nearest_codes(values), "codes")


@pytest.mark.parametrize("key", [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, quant.rounding_key(7, 3, 1)])
@pytest.mark.parametrize("start", [0, 2**32 - 2048, 3 * 2**32 + 1024])  # the middle one straddles 2**32
def test_random_bits_are_quants(key, start):
    expected = quant.random_bits(key, 4096, "cpu", start)
    assert torch.equal(probes.random_bits(key, 4096, start), expected)


def _rounding_inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    random_bits = torch.randint(0, 2**32, (20_000,), dtype=torch.int64, generator=generator)
    patterns = [random_bits]  # any fp32 bit pattern
    # bf16 halfway points (even and odd), fp16 halfway points, exact values, overflow and
    # underflow edges of both formats, zeros and infinities.
    halves = torch.arange(0, 2**16, 97, dtype=torch.int64) << 16
    patterns += [halves | 0x8000, halves | 0x7FFF, halves | 0x8001, halves]
    fp16 = torch.arange(0, 2**15, 13, dtype=torch.int64).to(torch.int16).view(torch.float16).float()
    fp16_steps = fp16.nextafter(torch.tensor(float("inf")))
    middle = (fp16.double() + fp16.nextafter(torch.tensor(float("inf"))).double()) / 2
    values = torch.cat([fp16, fp16_steps, middle.float(), middle.float().nextafter(fp16)])
    values = torch.cat(
        [
            values,
            torch.tensor([65504.0, 65519.99, 65520.0, 70000.0, 3.4e38, 2.0**-24, 2.0**-25, 2.0**-26]),
            torch.tensor([0.0, float("inf"), 1e-40, 5.96e-8]),
        ]
    )
    finite = [torch.cat(patterns).to(torch.int32).view(torch.float32), values]
    out = torch.cat(finite)
    out = torch.cat([out, -out])
    # NaN patterns: only the sign and payload differ from the reference's canonical NaN, and
    # NaN never arises from finite inputs, so they are left out.
    return out[~out.isnan()]


# numpy warns on the overflow to inf of an fp16 cast and on inf * 0 (u * (high - low) next to
# an infinite neighbour): both are the intended IEEE results.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("stochastic", [False, True])
def test_rounding_to_bf16_and_fp16_is_quants(stochastic):
    values = _rounding_inputs()
    bits = None
    if stochastic:
        generator = torch.Generator().manual_seed(3)
        bits = torch.randint(0, 2**32, values.shape, dtype=torch.int64, generator=generator)
        bits[:64] = torch.tensor([0, 2**32 - 1]).repeat(32)  # extremes of the draw
    bf16, fp16 = probes.round_to_16_bits(values, bits)
    assert_same_bits(bf16, quant.round_to_bf16(values, bits), "bf16")
    assert_same_bits(fp16, quant.round_to_fp16(values, bits), "fp16")


@pytest.mark.slow
def test_a_million_elements():
    # 1_000_003 = 3906 whole blocks of 256 and a partial one, 489 programs of 2048 elements.
    tensors = batch([1_000_003], torch.Generator().manual_seed(1), pairings=[(torch.bfloat16, torch.float32)],
                    formats=["8bit"])
    step_and_compare("triton", *tensors, group_of(0.3, 0.0, True, False, False, True))


# ---------------------------------------------------------------------------------------------
# through the public API


def _model_params(dtype_second=torch.bfloat16):
    """Params of several formats: 8-bit (>= 4096 elements), the fp32 fallback, a bf16 param, a
    non-contiguous (transposed) param."""
    generator = torch.Generator().manual_seed(4)
    tensors = [
        torch.randn(80, 64, generator=generator),
        torch.randn(80, generator=generator),
        torch.randn(33, 129, generator=generator).to(dtype_second),
        torch.randn(96, 48, generator=generator).t(),
    ]
    return [torch.nn.Parameter(t) for t in tensors]


def _grads(params, step):
    generator = torch.Generator().manual_seed(100 + step)
    grads = []
    for index, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator) * 0.01
        if index == 0:  # a non-contiguous grad
            grad = (torch.randn(p.shape[::-1], generator=generator) * 0.01).t()
        grads.append(grad.to(p.dtype))
    return grads


@pytest.mark.parametrize(
    "options",
    [
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, cautious_factor=0.5, cautious_weight_decay=True, stochastic_rounding=True),
        dict(state="bf16", weight_decay=0.1, stochastic_rounding=True, maximize=True),
        dict(state="fp32", cautious_factor=0.0, decoupled_weight_decay=True, weight_decay=1e-4),
        dict(state="4bit", weight_decay=0.1, cautious_factor=0.5),  # stochastic codes, nearest params
    ],
    ids=["8bit", "8bit-cautious-sr", "bf16-sr-maximize", "fp32-mask-decoupled", "4bit-cautious"],
)
def test_optimizer_backend_triton_is_backend_torch(options):
    sides = {}
    for backend in ("torch", "triton"):
        params = _model_params()
        optimizer = Lion(params, lr=1e-3, backend=backend, **options)
        for step in range(3):
            for p, g in zip(params, _grads(params, step), strict=True):
                p.grad = g
            optimizer.step()
            optimizer.param_groups[0]["lr"] *= 0.7  # a schedule: a new lr every step
        sides[backend] = (params, optimizer.state_dict())
    (ref_params, ref_state), (out_params, out_state) = sides["torch"], sides["triton"]
    for ref, out in zip(ref_params, out_params, strict=True):
        assert out.stride() == ref.stride()  # a non-contiguous param stays as it was
        assert_same_bits(out.detach(), ref.detach(), "param")
    for index, ref_entry in ref_state["state"].items():
        for key, value in ref_entry.items():
            if isinstance(value, torch.Tensor):
                assert_same_bits(out_state["state"][index][key], value, key)
            else:
                assert out_state["state"][index][key] == value


@pytest.mark.parametrize("state", ["8bit", "bf16", "fp32"])
def test_resume_through_backend_triton_is_bit_exact(state):
    """state_dict -> torch.save -> load (weights_only) -> continue equals never stopping."""
    import io

    options = dict(lr=1e-3, weight_decay=0.1, state=state, stochastic_rounding=True, backend="triton")

    def run(params, optimizer, steps):
        for step in steps:
            for p, g in zip(params, _grads(params, step), strict=True):
                p.grad = g
            optimizer.step()

    straight = _model_params()
    straight_opt = Lion(straight, **options)
    run(straight, straight_opt, range(4))

    first = _model_params()
    first_opt = Lion(first, **options)
    run(first, first_opt, range(2))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in checkpoint["params"]]
    resumed_opt = Lion(resumed, **options)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    run(resumed, resumed_opt, range(2, 4))

    for a, b in zip(straight, resumed, strict=True):
        assert_same_bits(b.detach(), a.detach(), "param")
    for a, b in zip(straight, resumed, strict=True):
        for key, value in straight_opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert_same_bits(resumed_opt.state[b][key], value, key)
            else:
                assert resumed_opt.state[b][key] == value


_SYNCHRONISING = ["item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"]


@pytest.mark.parametrize("capturable", [False, True], ids=["float-lr", "capturable"])
def test_step_issues_no_host_synchronisation(monkeypatch, capturable):
    """On CUDA each of these would wait for the device. The interpreter itself must move data to
    numpy (from triton's own files), so a call is refused only when it comes from outside the
    triton package: the launcher, the optimizer, torch.optim. capturable=True with a tensor lr:
    the scalars and keys are made on the device, and the launcher never reads them."""
    import triton

    triton_dir = os.path.dirname(triton.__file__)
    calls = []

    def guard(name, original):
        def guarded(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(triton_dir):
                calls.append(f"{name} from {caller}")
            return original(*args, **kwargs)

        return guarded

    params = _model_params()
    options = dict(lr=torch.tensor(1e-3, dtype=torch.float64), capturable=True) if capturable else dict(lr=1e-3)
    optimizer = Lion(
        params, weight_decay=0.1, cautious_factor=0.5, stochastic_rounding=True, backend="triton", **options
    )
    first = 0
    if capturable:  # creating the state reads a tensor lr once
        for p, g in zip(params, _grads(params, 0), strict=True):
            p.grad = g
        optimizer.step()
        first = 1
    with monkeypatch.context() as patch:
        for name in _SYNCHRONISING:
            patch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        patch.setattr(torch.cuda, "synchronize", guard("synchronize", torch.cuda.synchronize))
        torch.ones(1).item()  # the guard sees a call from here
        assert calls and "item" in calls.pop()
        for step in range(first, 2):  # the first step creates the state
            for p, g in zip(params, _grads(params, step), strict=True):
                p.grad = g
            optimizer.step()
    assert calls == []


def test_capturable_with_a_scheduled_tensor_lr_gives_the_torch_backends_float_lr_bits():
    """capturable=True on "triton": the scalars from the device (a float64 tensor lr driven by
    an LR scheduler) and the keys from the device step counters give what "torch" gives with
    the float lr."""
    options = dict(weight_decay=0.1, cautious_factor=0.5, stochastic_rounding=True)
    sides = {}
    for backend, lr, capturable in (("torch", 1e-3, False), ("triton", torch.tensor(1e-3, dtype=torch.float64), True)):
        params = _model_params()
        optimizer = Lion(params, lr=lr, backend=backend, capturable=capturable, **options)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        for step in range(3):
            for p, g in zip(params, _grads(params, step), strict=True):
                p.grad = g
            optimizer.step()
            schedule.step()
        sides[backend] = params, optimizer
    (expected, reference), (ours, optimizer) = sides["torch"], sides["triton"]
    for p, q in zip(expected, ours, strict=True):
        assert_same_bits(q.detach(), p.detach(), "param")
        for key, value in reference.state[p].items():
            other = optimizer.state[q][key]
            if isinstance(value, torch.Tensor) and value.dtype != torch.int64:
                assert_same_bits(other, value, key)
            else:  # the step: a device counter with capturable=True
                assert int(other) == int(value), key


# ---------------------------------------------------------------------------------------------
# torch.library ops, torch.compile, the table cache


def _op_inputs():
    """A small call of both ops: an fp32 tensor with fp32 momentum, a bf16 one with 8-bit state."""
    from lion8bit.kernels import triton_lion

    params, grads, entries, formats = batch([300, 4097], torch.Generator().manual_seed(31),
                                            pairings=[(torch.float32, torch.float32)], formats=["fp32"])
    more = batch([4097], torch.Generator().manual_seed(32), pairings=[(torch.bfloat16, torch.bfloat16)],
                 formats=["8bit"])
    params, grads, entries, formats = (
        a + b for a, b in zip((params, grads, entries, formats), more, strict=True)
    )
    momenta = [{key: e[key] for key in BUFFER_KEYS[f]} for e, f in zip(entries, formats, strict=True)]
    buffers, codes = triton_lion._flat_buffers(momenta, formats)
    return params, grads, buffers, codes, momenta, formats


def test_the_ops_pass_opcheck():
    """torch.library.opcheck's schema (declared mutations), autograd registration, fake
    implementation and AOT dispatch tests, running the interpreted kernels on CPU tensors."""
    params, grads, buffers, codes, _, _ = _op_inputs()
    keys = torch.tensor([[1, 2], [3, 4], [5, 2**32 - 1]], dtype=torch.int64)
    steps = torch.tensor([[1e-3, 5e-4]] * 3)
    step = (params, grads, buffers, codes, [], 256, [1e-3, 0.9, 0.1, 0.99, 0.01, 0.9999],
            False, True, False, True, True, True, keys, steps, None, None)
    results = torch.library.opcheck(torch.ops.lion8bit.triton_lion_step.default, step)
    results |= torch.library.opcheck(
        torch.ops.lion8bit.triton_aligned_counts.default,
        (params, grads, buffers, codes, 256, 0.9, 0.1, False, None),
    )
    assert set(results.values()) == {"SUCCESS"}, results


def test_torch_compile_sees_one_graph_and_gives_the_eager_bits():
    """The backend's two calls of a cautious step traced by Dynamo: one graph, no break (the
    launcher is inside the ops); compiled (AOT autograd's functionalization of the ops'
    mutations) it gives the eager step's params and state bit for bit."""
    backend = kernels.get("triton")
    params, grads, _, _, momenta, formats = _op_inputs()
    scalars = lion_scalars(group_of(0.3, 0.5, True, False, False, True))

    def step(params, momenta):
        counts = backend.aligned_counts(params, grads, momenta, formats, scalars=scalars, block_size=256)
        steps = [
            torch.stack([count.float() * 1e-3, count.float() * 1e-4]) / p.numel()
            for count, p in zip(counts, params, strict=True)
        ]
        backend.lion_step(params, grads, momenta, formats, scalars=scalars, block_size=256,
                          rounding_keys=[(7, 8), (9, 10), (11, 12)], cautious_steps=steps, skip=None)

    explained = torch._dynamo.explain(step)(*copies(params, momenta))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager = copies(params, momenta)
    step(*eager)
    torch._dynamo.reset()
    compiled = copies(params, momenta)
    torch.compile(step, backend="aot_eager", fullgraph=True)(*compiled)
    assert_same_state(*compiled, *eager, formats)
    assert not torch.equal(eager[0][0], params[0])  # the step did something


def test_the_table_cache_keeps_its_capacity_and_hits_on_equal_contents():
    """Grads at a new address every step (zero_grad(set_to_none=True) with an allocator that
    moves them) must not grow the cache without bound; equal contents are one table."""
    from lion8bit.kernels import triton_lion

    cache = triton_lion.TableCache(capacity=3)
    cpu = torch.device("cpu")
    first = cache.get(cpu, 2048, (64, 128, 192, 0, 300, 0, 0))
    assert cache.get(cpu, 2048, (64, 128, 192, 0, 300, 0, 0)) is first and cache.builds == 1
    for address in range(10):  # a grad moving every step
        table = cache.get(cpu, 2048, (64, 1024 + 16 * address, 192, 0, 300, 0, 0))
        assert (table.rows, table.tiles) == (1, 1)
    assert len(cache) == 3 and cache.builds == 11
    assert cache.nbytes == 3 * table.nbytes
    two = cache.get(cpu, 2048, (64, 128, 192, 0, 4097, 0, 0, 256, 320, 384, 0, 1, 5, 3))
    assert (two.rows, two.tiles) == (2, 4)  # 3 tiles of 4097, 1 of 1
    first_tiles = two.columns[triton_lion.fused.COLUMNS.index("first_tile")]
    assert first_tiles[:3].tolist() == [0, 3, 4]
    assert all(column.data_ptr() % 16 == 0 for column in two.columns)


def _count_step_launches(monkeypatch) -> list:
    from lion8bit.kernels import triton_lion_kernels

    kernel, grids = triton_lion_kernels._lion_step_kernel, []

    class Counting:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_lion_kernels, "_lion_step_kernel", Counting())
    return grids


def test_a_call_past_max_rows_takes_further_launches(monkeypatch):
    """More tensors of one kind than a table holds: further launches, each its own table."""
    from lion8bit.kernels import triton_lion

    monkeypatch.setattr(triton_lion, "MAX_ROWS", 2)
    grids = _count_step_launches(monkeypatch)
    tensors = batch([1, 300, 17, 4097, 5], torch.Generator().manual_seed(33),
                    pairings=[(torch.float32, torch.float32)], formats=["fp32"])
    step_and_compare("triton", *tensors, group_of(0.3, 1.0, False, False, False, False))
    assert grids == [(2,), (4,), (1,)]  # tiles: 1 + 1, 1 + 3, 1


@pytest.mark.slow
def test_a_full_table_finds_every_row(monkeypatch):
    """MAX_ROWS tensors in one launch: the row search of every program (12 halvings) lands on
    its own tensor, the last one included."""
    from lion8bit.kernels import triton_lion

    grids = _count_step_launches(monkeypatch)
    rows = triton_lion.MAX_ROWS
    tensors = batch([1] * (rows - 1) + [300], torch.Generator().manual_seed(34),
                    pairings=[(torch.float32, torch.float32)], formats=["fp32"])
    step_and_compare("triton", *tensors, group_of(0.0, 1.0, False, False, False, False))
    assert grids == [(rows,)]
