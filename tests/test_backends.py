"""The backend-conformance suite: every registered backend computes reference.py bit for bit.

Each case runs the functional ``lion()`` with one backend on copies of a batch of tensors, and
the oracle of tests/helpers.py (reference.py one tensor at a time, counts and stochastic-rounding
keys worked out from their written formulas) on the originals; params, 8-bit codes, absmax and
bf16 / fp32 momentum must agree as bit patterns. Backends: every one registered for CPU tensors
in this process — "torch", "cpu" (when its library builds) and "triton" in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU); on a CUDA machine also each backend on
CUDA tensors. The interpreter is slow, so "triton" gets every 7th option combination (each value
of each option still appears: 7 is coprime to the product's periods) on fewer tensors. Many
tensors in one call, and "triton"'s launches of them: tests/test_backends_many_tensors.py.
"""

import inspect

import pytest
import torch

from lion8bit import kernels, quant
from lion8bit import momentum as mom
from lion8bit.functional import BUFFER_KEYS, lion
from lion8bit.reference import cautious_step_sizes, lion_scalars, rounding_keys

from helpers import (
    FORMATS,
    OPTIONS,
    PAIRINGS,
    TAILS,
    assert_same_bits,
    assert_same_state,
    batch,
    copies,
    cpu_backends,
    every_backend,
    group_of,
    make_tensor,
    option_id,
    reference_steps,
    step_and_compare,
)

SLOW_BACKENDS = {"triton"}  # interpreted: ~1000x slower per element
CASES = [
    pytest.param(
        name, options, "cpu", id=f"{name}-{option_id(options)}",
        # the interpreter's cases take seconds each: a quarter of them in the inner loop
        marks=[pytest.mark.slow] * (name in SLOW_BACKENDS and index % 28 != 0),
    )
    for name in cpu_backends()
    for index, options in enumerate(OPTIONS)
    if name not in SLOW_BACKENDS or index % 7 == 0
]
if torch.cuda.is_available():
    CASES += [
        pytest.param(name, options, "cuda", id=f"{name}-cuda-{option_id(options)}")
        for name in ("torch", "triton")
        if kernels.available(name)
        for options in OPTIONS
    ]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("backend, options, device", CASES)
def test_every_option_dtype_format_and_tail(backend, options, device):
    generator = torch.Generator().manual_seed(hash(options) % 2**31)
    sizes = TAILS if backend not in SLOW_BACKENDS else [1, 257, 4097]
    step_and_compare(backend, *batch(sizes, generator, device=device), group_of(*options))


BLOCK_CASES = [
    (name, size)
    for name in cpu_backends()
    for size in ([1, 16, 64, 2048, 2**17] if name not in SLOW_BACKENDS else [64, 4096])
]


@pytest.mark.parametrize("backend, block_size", BLOCK_CASES)
def test_block_sizes_and_chunk_boundaries(backend, block_size):
    """Blocks of 1 element up to blocks larger than the "cpu" backend's 64K-element chunks and
    the Triton tile (2048 elements); two steps, on 1 and 3 threads ("cpu" splits work across
    torch's threads)."""
    generator = torch.Generator().manual_seed(block_size)
    if backend in SLOW_BACKENDS:
        sizes = [1000] if block_size < 2048 else [9000]
    else:
        sizes = [3 * 65536 + 17, 2**17 + 1] if block_size >= 2048 else [65536 + 1, 100]
    tensors = batch(sizes, generator, block_size, pairings=PAIRINGS[:2], formats=["8bit", "bf16"])
    group = group_of(0.3, 0.5, True, False, False, True)
    for count in (1, 3):
        torch.set_num_threads(count)
        step_and_compare(backend, *tensors, group, block_size=block_size)


@every_backend
@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_params_grads_and_state(backend, fmt):
    """Transposed params, strided grads, transposed momentum: the flat order is the views' own
    (row-major), as the spec's blocks are; the functional stages and copies back."""
    generator = torch.Generator().manual_seed(7)
    params, grads, entries, formats = batch([40 * 130], generator, formats=[fmt])
    for index, (param, grad, entry) in enumerate(zip(params, grads, entries, strict=True)):
        params[index] = param.view(40, 130).t()
        grads[index] = torch.cat([grad.view(40, 130), grad.view(40, 130)], dim=1)[:, ::2].t()
        for key in (mom.MOMENTUM, mom.MOMENTUM_CODES):
            if key in entry and fmt == "4bit":  # flat packed codes: a strided view instead
                entry[key] = torch.stack([entry[key], entry[key]], dim=-1)[..., 0]
            elif key in entry:
                entry[key] = entry[key].view(130, 40).t().contiguous().t()
    assert not params[0].is_contiguous() and not grads[0].is_contiguous()
    ours = step_and_compare(backend, params, grads, entries, formats, group_of(0.3, 0.5, True, False, True, True))
    for param, entry in zip(*ours, strict=True):
        assert not param.is_contiguous(), "written back into the caller's tensor, not replaced"
        assert all(not entry[key].is_contiguous() for key in (mom.MOMENTUM, mom.MOMENTUM_CODES) if key in entry)


# The interpreter computes with numpy, which warns on inf * 0 and the like: the IEEE results are
# what is compared.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@every_backend
@pytest.mark.parametrize("sr", [False, True])
def test_non_finite_values_as_in_the_reference(backend, sr):
    """NaN and +-inf in grads and params: the same bits, NaN payloads of torch's conversions
    included (except bf16 NaN, whose payload "triton" writes as 0x7FC0 where torch 2.13's CPU
    conversion writes 0xFFFF: compared as NaN)."""
    generator = torch.Generator().manual_seed(5)
    params, grads, entries, formats = batch([300, 5000], generator)
    for grad in grads:
        grad[7], grad[8], grad[9] = float("nan"), float("inf"), float("-inf")
    for param in params:
        param[11], param[12], param[13] = float("nan"), float("inf"), float("-inf")
    group = group_of(0.3, 0.5, True, False, False, sr)
    ours = copies(params, entries)
    lion(ours[0], grads, ours[1], formats, scalars=lion_scalars(group), block_size=quant.BLOCK_SIZE,
         stochastic_rounding=sr, backend=backend)
    reference_steps(params, grads, entries, formats, group)
    if backend == "triton":  # bf16 momentum, and the bf16 absmax of "4bit"
        keys = (mom.MOMENTUM, mom.MOMENTUM_ABSMAX)
        momenta = [[e.get(key) for e in side] for side in (ours[1], entries) for key in keys]
        for tensors in (ours[0], params, *momenta):
            for tensor in tensors:
                if tensor is not None and tensor.dtype == torch.bfloat16:
                    tensor[tensor.isnan()] = float("nan")  # one canonical payload
    assert_same_state(*ours, params, entries, formats)


@every_backend
def test_blocks_with_a_subnormal_absmax_as_in_the_reference(backend):
    """Momentum that decayed below 2**-126 (rows without gradient for thousands of steps):
    quant.quantize_blockwise scales such a block by 2**24 first; zeros must stay zeros."""
    generator = torch.Generator().manual_seed(6)
    params, grads, entries, formats = batch([5000], generator, pairings=PAIRINGS[:2], formats=["8bit"])
    for grad, entry in zip(grads, entries, strict=True):
        grad[256:768] = 0.0
        entry[mom.MOMENTUM_ABSMAX][1:3] = torch.tensor([3e-39, 1e-45])
        entry[mom.MOMENTUM_CODES][256:768:3] = quant.ZERO_CODE
    step_and_compare(backend, params, grads, entries, formats, group_of(0.3, 1.0, False, False, False, False))
    for entry in entries:
        assert entry[mom.MOMENTUM_ABSMAX][1] < torch.finfo(torch.float32).tiny
        assert torch.all(entry[mom.MOMENTUM_CODES][256:768:3] == quant.ZERO_CODE)


@every_backend
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sr", [False, True])
def test_every_16_bit_param_value(backend, dtype, sr):
    """All 65536 bit patterns as params (subnormals, the largest finite values, infinities, NaN
    payloads but for "triton"'s bf16 NaN), decayed: each backend's fp16 / bf16 rounding."""
    param = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).clone()
    if backend == "triton" and dtype == torch.bfloat16:
        param = param[~param.isnan()].clone()
    entry = {mom.STEP: 3, mom.SR_SEED: 7, **mom.new_momentum(param, "bf16", quant.BLOCK_SIZE)}
    grad = torch.randn(param.numel()).to(dtype)
    grad[::2] = 0.0  # with zero momentum: u = 0, so the param is only decayed (and rounded)
    step_and_compare(backend, [param], [grad], [entry], ["bf16"], group_of(0.3, 1.0, False, False, False, sr))


@every_backend
def test_without_keys_4bit_is_refused_before_any_change(backend):
    """4-bit momentum always rounds stochastically (the reference raises without keys): every
    backend refuses a step without them, before it writes anything."""
    params, grads, entries, formats = batch([64], torch.Generator().manual_seed(43), pairings=PAIRINGS[:1],
                                            formats=["4bit"])
    momenta = [{key: entry[key] for key in BUFFER_KEYS["4bit"]} for entry in entries]
    before = copies(params, momenta)
    with pytest.raises(ValueError, match="rounds stochastically"):
        kernels.get(backend).lion_step(
            params, grads, momenta, formats, scalars=lion_scalars(group_of(0, 1.0, 0, 0, 0, 0)),
            block_size=quant.BLOCK_SIZE, rounding_keys=None, cautious_steps=None, skip=None,
        )
    assert_same_bits(params[0], before[0][0], "param")
    assert_same_bits(momenta[0][mom.MOMENTUM_CODES], before[1][0][mom.MOMENTUM_CODES], "codes")


@every_backend
def test_zero_size_tensors_and_an_empty_group(backend):
    generator = torch.Generator().manual_seed(3)
    params, grads, entries, formats = batch([0, 300, 0], generator, pairings=PAIRINGS[:1], formats=["8bit"])
    step_and_compare(backend, params, grads, entries, formats, group_of(0.3, 0.5, True, False, False, False))
    implementation = kernels.get(backend)
    momenta = [{key: e[key] for key in BUFFER_KEYS[f]} for e, f in zip(entries, formats, strict=True)]
    scalars = lion_scalars(group_of(0, 0.5, 0, 0, 0, 0))
    counts = implementation.aligned_counts(params, grads, momenta, formats, scalars=scalars, block_size=256)
    assert [c.dtype for c in counts] == [torch.int64] * 3 and int(counts[0]) == int(counts[2]) == 0
    step_and_compare(backend, [], [], [], [], group_of(0.3, 0.5, True, False, False, True))


@every_backend
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_device_skip_flag_stores_nothing_and_a_clear_one_is_the_reference(backend, fmt):
    """skip_nonfinite off the CPU: the decision is a flag the backend reads on the device (no
    host synchronisation). "cpu" never gets one: the functional decides CPU steps on the host."""
    generator = torch.Generator().manual_seed(9)
    params, grads, entries, formats = batch([4097], generator, pairings=PAIRINGS[2:3], formats=[fmt])
    group = group_of(0.3, 1.0, False, False, False, True)
    implementation = kernels.get(backend)
    momenta = [{key: e[key] for key in BUFFER_KEYS[f]} for e, f in zip(entries, formats, strict=True)]
    keys = [(e[mom.SR_SEED] & 0xFFFF, e[mom.STEP]) for e in entries]  # any keys: both sides use them
    common = dict(scalars=lion_scalars(group), block_size=quant.BLOCK_SIZE, rounding_keys=keys, cautious_steps=None)
    if backend == "cpu":
        with pytest.raises(ValueError, match="skipped by the caller"):
            implementation.lion_step(params, grads, momenta, formats, skip=torch.tensor(True), **common)
        return
    skipped = copies(params, momenta)
    implementation.lion_step(*skipped[:1], grads, skipped[1], formats, skip=torch.tensor(True), **common)
    assert_same_state(*skipped, params, momenta, formats)
    cleared = copies(params, momenta)
    implementation.lion_step(*cleared[:1], grads, cleared[1], formats, skip=torch.tensor(False), **common)
    kernels.get("torch").lion_step(params, grads, momenta, formats, skip=None, **common)
    assert_same_state(*cleared, params, momenta, formats)


@every_backend
def test_stochastic_rounding_is_used(backend):
    """Guards the suite against a backend (and an oracle) that ignore the keys."""
    generator = torch.Generator().manual_seed(11)
    params, grads, entries, formats = batch([4097], generator, pairings=PAIRINGS[1:2], formats=["bf16"])
    results = []
    for sr in (False, True):
        start_params, start_entries = copies(params, entries)
        group = group_of(0.3, 1.0, False, False, False, sr)
        results.append(step_and_compare(backend, start_params, grads, start_entries, formats, group))
    nearest, rounded = results
    assert not torch.equal(nearest[0][0], rounded[0][0])
    assert not torch.equal(nearest[1][0][mom.MOMENTUM], rounded[1][0][mom.MOMENTUM])


@every_backend
def test_element_offsets_key_stochastic_rounding_on_the_whole_parameters_indices(backend):
    """A shard's bits are those of its elements' indices in the whole parameter: offsets at a
    block boundary (8-bit), anywhere (bf16 / fp32 momentum), and across 2**32 (a new element
    key mid-tensor)."""
    generator = torch.Generator().manual_seed(12)
    params, grads, entries, formats = batch(
        [300, 4097], generator, pairings=[PAIRINGS[1], PAIRINGS[3]], formats=["8bit", "bf16"]
    )
    offsets = []
    for index, fmt in enumerate(formats):
        straddling = 2**32 - 100 if index % 2 else 2**33 + 7
        offsets.append(256 * (index + 1) if fmt == "8bit" else straddling)
    group = group_of(0.3, 0.5, False, False, False, True)
    shifted = step_and_compare(backend, *copies(params, entries)[:1], grads, copies(params, entries)[1], formats,
                               group, element_offsets=offsets)
    unshifted = step_and_compare(backend, *copies(params, entries)[:1], grads, copies(params, entries)[1], formats,
                                 group)
    assert not any(torch.equal(a, b) for a, b in zip(shifted[0], unshifted[0], strict=True))


def test_an_8bit_offset_off_the_blocks_is_refused():
    param, grad, entry = make_tensor(1000, torch.float32, torch.float32, "8bit", torch.Generator().manual_seed(1))
    momentum = {key: entry[key] for key in BUFFER_KEYS["8bit"]}
    with pytest.raises(ValueError, match="Invalid element offset"):
        kernels.check_tensors("torch", [param], [grad], [momentum], ["8bit"], 256, [100])


BAD_BUFFERS = {
    "absmax bf16": ("8bit", mom.MOMENTUM_ABSMAX, lambda t: t.bfloat16()),
    "codes int8": ("8bit", mom.MOMENTUM_CODES, lambda t: t.to(torch.int8)),
    "absmax short": ("8bit", mom.MOMENTUM_ABSMAX, lambda t: t[:-1]),
    "momentum fp16": ("bf16", mom.MOMENTUM, lambda t: t.half()),
    "momentum fp32 for bf16": ("bf16", mom.MOMENTUM, lambda t: t.float()),
    "momentum short": ("fp32", mom.MOMENTUM, lambda t: t[:-1]),
}


@every_backend
@pytest.mark.parametrize("case", list(BAD_BUFFERS))
def test_wrong_buffers_raise_instead_of_reading_out_of_bounds(backend, case):
    fmt, key, spoil = BAD_BUFFERS[case]
    param, grad, entry = make_tensor(1000, torch.float32, torch.float32, fmt, torch.Generator().manual_seed(1))
    momentum = {k: entry[k] for k in BUFFER_KEYS[fmt]}
    momentum[key] = spoil(momentum[key])
    implementation = kernels.get(backend)
    scalars = lion_scalars(group_of(0.3, 0.5, 0, 0, 0, 0))
    before = param.clone()
    with pytest.raises(ValueError, match=f'Invalid .* for backend="{backend}"'):
        implementation.aligned_counts([param], [grad], [momentum], [fmt], scalars=scalars, block_size=256)
    with pytest.raises(ValueError, match=f'Invalid .* for backend="{backend}"'):
        implementation.lion_step(
            [param], [grad], [momentum], [fmt], scalars=scalars, block_size=256,
            rounding_keys=None, cautious_steps=None, skip=None,
        )
    assert_same_bits(param, before, "param")


@every_backend
def test_params_of_a_float64_grad_or_another_shape_raise(backend):
    param, grad, entry = make_tensor(1000, torch.float32, torch.float32, "fp32", torch.Generator().manual_seed(1))
    momentum = {mom.MOMENTUM: entry[mom.MOMENTUM]}
    implementation = kernels.get(backend)
    options = dict(scalars=lion_scalars(group_of(0, 1.0, 0, 0, 0, 0)), block_size=256,
                   rounding_keys=None, cautious_steps=None, skip=None)
    for bad_grad in (grad.double(), grad[:-1]):
        with pytest.raises(ValueError, match=f'Invalid .* for backend="{backend}"'):
            implementation.lion_step([param], [bad_grad], [momentum], ["fp32"], **options)


@every_backend
def test_a_graph_that_saved_a_param_sees_it_was_updated(backend):
    """Every backend's step bumps the param's version counter (the functional does, for all),
    so autograd refuses a backward through a graph that saved the param before the step
    instead of silently using the updated values. "triton" missed it before the registry."""
    from lion8bit import Lion

    param = torch.nn.Parameter(torch.randn(300))
    optimizer = Lion([param], lr=1e-3, backend=backend)
    param.grad = torch.randn(300)
    loss = (param * param).sum()  # saves param for its backward
    version = param._version
    optimizer.step()
    assert param._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@every_backend
def test_device_scalars_and_device_keys_give_the_torch_backends_bits(backend):
    """capturable=True's inputs: the scalars as an fp32 [6] device tensor (values that differ
    from the LionScalars floats, so a backend reading the floats fails) and the rounding keys
    as an int64 [n, 2] tensor, for the pre-pass and the step, compared with "torch" given the
    same tensors."""
    implementation = kernels.get(backend)
    if "step_scalars" not in inspect.signature(implementation.lion_step).parameters:
        pytest.skip(f'backend="{backend}" does not take step_scalars yet')
    generator = torch.Generator().manual_seed(25)
    params, grads, entries, formats = batch([257, 4097], generator, pairings=PAIRINGS[1:4])
    momenta = [{key: e[key] for key in BUFFER_KEYS[f]} for e, f in zip(entries, formats, strict=True)]
    floats = lion_scalars(group_of(0.3, 0.5, True, False, True, True))
    on_device = lion_scalars(
        {**group_of(0.1, 0.5, True, False, True, True), "lr": 3e-3, "betas": (0.8, 0.95)}
    )
    step_scalars = torch.tensor(
        [getattr(on_device, name) for name in kernels.STEP_SCALARS], dtype=torch.float32
    )
    keys = torch.tensor([rounding_keys(e[mom.SR_SEED], e[mom.STEP]) for e in entries], dtype=torch.int64)
    common = dict(scalars=floats, block_size=quant.BLOCK_SIZE, step_scalars=step_scalars)
    results = {}
    for name in (backend, "torch"):
        tensors = copies(params, momenta)
        counts = kernels.get(name).aligned_counts(tensors[0], grads, tensors[1], formats, **common)
        steps = [
            cautious_step_sizes(c, p.numel(), on_device.lr, 0.5, torch.float32)
            for c, p in zip(counts, params, strict=True)
        ]
        kernels.get(name).lion_step(tensors[0], grads, tensors[1], formats, **common, rounding_keys=keys,
                                    cautious_steps=steps, skip=None)
        results[name] = counts, tensors
    (counts, ours), (expected_counts, expected) = results[backend], results["torch"]
    assert [int(c) for c in counts] == [int(c) for c in expected_counts]
    assert_same_state(*ours, *expected, formats)
    floats_only = copies(params, momenta)
    kernels.get("torch").lion_step(
        floats_only[0], grads, floats_only[1], formats, scalars=floats, block_size=quant.BLOCK_SIZE,
        rounding_keys=keys, cautious_steps=steps, skip=None,
    )
    # The floats alone give other bits: the backend read the tensor.
    assert not all(torch.equal(a, b) for a, b in zip(floats_only[0], expected[0], strict=True))
