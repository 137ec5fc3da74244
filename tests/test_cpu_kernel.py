"""The fused CPU path (lion8bit/kernels/cpu_lion) against the reference, bit for bit.

Every option combination runs one step of the functional ``lion()`` with backend="cpu" and with
backend="torch" (reference.py) on the same batch of tensors (every param/grad dtype pairing,
every momentum format, tails around blocks and vectors), and compares params, codes, absmax and
momentum bit for bit. The kernel is built twice: natively (AVX-512 here) and without AVX-512
(the portable loops other CPUs run).
"""

import copy
import itertools
import warnings

import pytest
import torch
from test_quant import _boundary_values, brute_force_codes

from lion8bit import Lion, kernels, quant
from lion8bit import momentum as mom
from lion8bit.kernels import cpu_build, cpu_lion
from lion8bit.optimizer import _resolve_backend, lion
from lion8bit.reference import lion_scalars

TAILS = [1, 255, 257, 4095, 4097]
PAIRINGS = [  # (param dtype, grad dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
FORMATS = ["8bit", "bf16", "fp32"]
LR, INITIAL_LR = 1e-3, 2e-3  # decoupled_initial_lr != lr, so decoupled weight decay changes the decay
OPTIONS = list(
    itertools.product(
        [0.0, 0.3],  # weight_decay
        [1.0, 0.5, 0.0],  # cautious_factor
        [False, True],  # cautious_weight_decay
        [False, True],  # decoupled_weight_decay
        [False, True],  # maximize
        [False, True],  # stochastic_rounding
    )
)


BUILDS = {"native": (), "portable": ("-mno-avx512f",)}
_loaded = {}


@pytest.fixture(params=list(BUILDS))
def kernel(request, monkeypatch):
    """Which build of the kernel backend="cpu" uses: -march=native, or without AVX-512."""
    if request.param not in _loaded:
        _loaded[request.param] = cpu_build.load(cpu_build.build(extra_flags=BUILDS[request.param]))
    monkeypatch.setattr(cpu_build, "library", lambda: _loaded[request.param])
    return request.param


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns (so -0.0 != 0.0 and NaNs compare)."""
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.contiguous().view(integer)


def assert_same_bits(ours: torch.Tensor, reference: torch.Tensor, what: str):
    assert ours.dtype == reference.dtype and ours.shape == reference.shape, what
    different = (bits(ours) != bits(reference)).sum().item()
    assert different == 0, f"{what}: {different} of {ours.numel()} elements differ"


def make_tensor(numel, param_dtype, grad_dtype, fmt, generator, block_size=quant.BLOCK_SIZE):
    """(param, grad, state entry): random, with exact zeros, a zero block and varied scales."""

    def randn(*scale):
        return torch.randn(numel, generator=generator) * torch.tensor(scale)[
            torch.randint(len(scale), (numel,), generator=generator)
        ]

    param = randn(0.1, 1.0, 1e-3).to(param_dtype)
    grad = randn(1e-2, 1e-5, 1.0)
    momentum = randn(1e-2, 1e-6, 1.0)
    zero = torch.rand(numel, generator=generator) < 0.05
    grad[zero], momentum[zero] = 0.0, 0.0  # c == 0: u = 0
    param[torch.rand(numel, generator=generator) < 0.02] = 0.0
    grad[: min(numel, block_size)][torch.rand(min(numel, block_size), generator=generator) < 0.5] = 0.0
    if numel > block_size:
        momentum[:block_size] = 0.0  # an all-zero block: absmax 0 before the step
    entry = {
        mom.STEP: int(torch.randint(1, 10**6, (1,), generator=generator)),
        mom.SR_SEED: int(torch.randint(0, 2**32, (1,), generator=generator)),
    }
    entry.update(mom.new_momentum(param, fmt, block_size))
    mom.encode_momentum(entry, momentum, fmt, block_size)
    return param, grad.to(grad_dtype), entry


def batch(sizes, generator, block_size=quant.BLOCK_SIZE, pairings=PAIRINGS, formats=FORMATS):
    tensors = [
        make_tensor(numel, param_dtype, grad_dtype, fmt, generator, block_size)
        for numel in sizes
        for param_dtype, grad_dtype in pairings
        for fmt in formats
    ]
    params, grads, entries = (list(column) for column in zip(*tensors))
    formats = [mom.stored_format(entry) for entry in entries]
    return params, grads, entries, formats


def step_both(params, grads, entries, formats, group, *, block_size=quant.BLOCK_SIZE):
    """One step with backend="cpu" on copies, one with "torch"; compare every buffer."""
    ours = [p.clone() for p in params], copy.deepcopy(entries)
    scalars = lion_scalars(group)
    sr = group.get("stochastic_rounding", False)
    common = dict(scalars=scalars, block_size=block_size, stochastic_rounding=sr)
    lion(ours[0], grads, ours[1], formats, backend="cpu", **common)
    lion(params, grads, entries, formats, backend="torch", **common)
    for index, (param, entry) in enumerate(zip(params, entries)):
        label = f"tensor {index} ({param.numel()} {param.dtype} {formats[index]})"
        assert_same_bits(ours[0][index], param, f"{label} param")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert_same_bits(ours[1][index][key], value, f"{label} {key}")


def group_of(weight_decay, cautious_factor, cautious_wd, decoupled, maximize, sr):
    return dict(
        lr=LR, decoupled_initial_lr=INITIAL_LR, betas=(0.9, 0.99), weight_decay=weight_decay,
        cautious_factor=cautious_factor, cautious_weight_decay=cautious_wd,
        decoupled_weight_decay=decoupled, maximize=maximize, stochastic_rounding=sr,
    )


def test_auto_uses_the_fused_path_on_cpu():
    assert kernels.available("cpu")
    assert _resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The reference's many small ops run 10x slower on 2 intra-op threads of a loaded 2-core
    machine (measured: 8 ms vs 0.9 ms for one searchsorted of 4097 values). The kernel takes its
    thread count from torch: test_block_sizes_and_chunk_boundaries runs it on 1 and 3 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every combination on the native build; on the portable one, every 7th (each value of each
# option still appears: 7 is coprime to the product's periods 2, 4, 8, 16, 48).
OPTION_CASES = [("native", options) for options in OPTIONS] + [("portable", options) for options in OPTIONS[::7]]


@pytest.mark.parametrize(
    "kernel, options",
    OPTION_CASES,
    indirect=["kernel"],
    ids=["{}-wd{}-f{}-cwd{:d}-dec{:d}-max{:d}-sr{:d}".format(k, *o) for k, o in OPTION_CASES],
)
def test_every_option_combination_is_bit_exact(kernel, options):
    generator = torch.Generator().manual_seed(hash(options) % 2**31)
    step_both(*batch(TAILS, generator), group_of(*options))


@pytest.mark.parametrize("block_size", [1, 16, 64, 2048, 2**17])
def test_block_sizes_and_chunk_boundaries(kernel, block_size):
    """Chunks of 64K elements (whole blocks), stages of max(1024, block) elements, 16-lane
    vectors, and blocks larger than a chunk, on 1 and 3 threads."""
    generator = torch.Generator().manual_seed(block_size)
    sizes = [3 * 65536 + 17, 2**17 + 1] if block_size >= 2048 else [65536 + 1, 100]
    tensors = batch(sizes, generator, block_size, pairings=PAIRINGS[:2], formats=["8bit", "bf16"])
    group = group_of(0.3, 0.5, True, False, False, True)
    for count in (1, 3):
        torch.set_num_threads(count)
        step_both(*tensors, group, block_size=block_size)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_contiguous_params_grads_and_state(kernel, fmt):
    generator = torch.Generator().manual_seed(7)
    params, grads, entries, formats = batch([40 * 130], generator, formats=[fmt])
    for index, (param, grad, entry) in enumerate(zip(params, grads, entries)):
        params[index] = param.view(40, 130).t()  # the flat order is the transposed view's
        grads[index] = torch.cat([grad.view(40, 130), grad.view(40, 130)], dim=1)[:, ::2].t()
        for key in (mom.MOMENTUM, mom.MOMENTUM_CODES):
            if key in entry:
                entry[key] = entry[key].view(130, 40).t().contiguous().t()
    assert not params[0].is_contiguous() and not grads[0].is_contiguous()
    step_both(params, grads, entries, formats, group_of(0.3, 0.5, True, False, True, True))


@pytest.mark.parametrize("sr", [False, True])
def test_non_finite_values_as_in_the_reference(kernel, sr):
    """NaN and +-inf in grads and params: same bits, NaN payloads of torch's conversions included."""
    generator = torch.Generator().manual_seed(5)
    params, grads, entries, formats = batch([300, 5000], generator)
    for grad in grads:
        grad[7], grad[8], grad[9] = float("nan"), float("inf"), float("-inf")
    for param in params:
        param[11], param[12], param[13] = float("nan"), float("inf"), float("-inf")
    step_both(params, grads, entries, formats, group_of(0.3, 0.5, True, False, False, sr))


def test_blocks_with_a_subnormal_absmax_as_in_the_reference(kernel):
    """Momentum that decayed below 2**-126 (rows without gradient for thousands of steps):
    quant.quantize_blockwise scales such a block by 2**24 first; zeros must stay zeros."""
    generator = torch.Generator().manual_seed(6)
    params, grads, entries, formats = batch([5000], generator, pairings=PAIRINGS[:2], formats=["8bit"])
    for grad, entry in zip(grads, entries):
        grad[256:768] = 0.0
        entry[mom.MOMENTUM_ABSMAX][1:3] = torch.tensor([3e-39, 1e-45])
        entry[mom.MOMENTUM_CODES][256:768:3] = quant.ZERO_CODE
    step_both(params, grads, entries, formats, group_of(0.3, 1.0, False, False, False, False))
    for entry in entries:
        assert entry[mom.MOMENTUM_ABSMAX][1] < torch.finfo(torch.float32).tiny
        assert torch.all(entry[mom.MOMENTUM_CODES][256:768:3] == quant.ZERO_CODE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sr", [False, True])
def test_every_16_bit_param_value(kernel, dtype, sr):
    """All 65536 bit patterns as params (subnormals, the largest finite values, infinities, NaN
    payloads), decayed: the kernel's own fp16 / bf16 conversions against torch's."""
    param = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).clone()
    entry = {mom.STEP: 3, mom.SR_SEED: 7, **mom.new_momentum(param, "bf16", quant.BLOCK_SIZE)}
    grad = torch.randn(param.numel()).to(dtype)
    grad[::2] = 0.0  # with zero momentum: u = 0, so the param is only decayed (and rounded)
    step_both([param], [grad], [entry], ["bf16"], group_of(0.3, 1.0, False, False, False, sr))


def test_zero_size_tensors_are_skipped(kernel):
    generator = torch.Generator().manual_seed(3)
    params, grads, entries, formats = batch([0, 300, 0], generator, pairings=PAIRINGS[:1], formats=["8bit"])
    step_both(params, grads, entries, formats, group_of(0.3, 0.5, True, False, False, False))
    assert cpu_lion.cpu_aligned_counts(
        params[:1], grads[:1], entries[:1], formats[:1], scalars=lion_scalars(group_of(0, 0.5, 0, 0, 0, 0)), block_size=256
    )[0].item() == 0


def test_requantizer_equals_brute_force(kernel):
    """Codes of chosen values: beta2 = 0 makes the new momentum the gradient, and a 1.0 in
    every block makes its absmax 1, so the kernel quantizes exactly these values."""
    values = _boundary_values()
    values = values[values.abs() <= 1.0]
    scales = torch.logspace(-9, 0, 2000, dtype=torch.float64).float()
    values = torch.cat([values, scales, -scales, torch.rand(4000) * 2 - 1, (torch.rand(2000) * 2 - 1) * 1e-5])
    per_block = quant.BLOCK_SIZE - 1
    values = torch.cat([values, torch.zeros(-values.numel() % per_block)])
    blocks = values.view(-1, per_block)
    grad = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
    param = torch.zeros_like(grad)
    entry = {mom.STEP: 1, **mom.new_momentum(param, "8bit", quant.BLOCK_SIZE)}
    group = dict(lr=LR, betas=(0.9, 0.0), weight_decay=0.0)
    lion([param], [grad], [entry], ["8bit"], scalars=lion_scalars(group), block_size=quant.BLOCK_SIZE,
         stochastic_rounding=False, backend="cpu")
    assert torch.equal(entry[mom.MOMENTUM_ABSMAX], torch.ones(blocks.shape[0]))
    codes = entry[mom.MOMENTUM_CODES].view(-1, quant.BLOCK_SIZE)[:, 1:]
    assert torch.equal(codes.reshape(-1), brute_force_codes(blocks.reshape(-1)))


def test_requantizer_search_levels_hold_every_threshold_once():
    levels = cpu_lion.requantizer_levels()
    used = torch.cat([levels[o : o + 2**k] for k, o in enumerate(cpu_lion._LEVEL_OFFSETS)] + [levels[1:2]])
    thresholds = quant.decision_thresholds()[quant.ZERO_CODE :]
    assert used.numel() == used.unique().numel() == thresholds.numel() == 128
    # Each is the largest fp32 at or below its float64 threshold.
    below = used.sort().values
    assert torch.all(below.double() <= thresholds)
    assert torch.all(torch.nextafter(below, torch.tensor(2.0)).double() > thresholds)


def test_device_and_dtype_are_checked():
    scalars = lion_scalars(group_of(0, 1, 0, 0, 0, 0))
    options = dict(scalars=scalars, block_size=256, stochastic_rounding=False, cautious_steps=None)
    param = torch.empty(4, device="meta")
    entry = {mom.STEP: 1, mom.MOMENTUM: torch.empty(4, device="meta")}
    with pytest.raises(ValueError, match='Invalid device for backend="cpu"'):
        cpu_lion.cpu_lion_step([param], [param], [entry], ["fp32"], **options)
    param = torch.zeros(4, dtype=torch.float64)
    entry = {mom.STEP: 1, mom.MOMENTUM: torch.zeros(4)}
    with pytest.raises(ValueError, match='Invalid dtype for backend="cpu"'):
        cpu_lion.cpu_lion_step([param], [param], [entry], ["fp32"], **options)


@pytest.mark.parametrize("compiler", ["/nonexistent/c++", "false"], ids=["missing", "failing"])
def test_without_a_compiler_warns_once_and_runs_the_reference(tmp_path, compiler):
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("LION8BIT_CACHE_DIR", str(tmp_path))
    cpu_build.library.cache_clear()
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(80, 80)
        twin = copy.deepcopy(model)
        ours = Lion(model.parameters(), lr=LR, weight_decay=0.1, cautious_factor=0.5, backend="cpu")
        reference = Lion(twin.parameters(), lr=LR, weight_decay=0.1, cautious_factor=0.5, backend="torch")
        with pytest.warns(RuntimeWarning, match="fused CPU kernel is unavailable") as record:
            for _ in range(3):
                for a, b in zip(model.parameters(), twin.parameters()):
                    a.grad = torch.randn_like(a)
                    b.grad = a.grad.clone()
                ours.step()
                reference.step()
        messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "\n" not in messages[0]
        for a, b in zip(model.parameters(), twin.parameters()):
            assert_same_bits(a.detach(), b.detach(), "param")
    finally:
        monkeypatch.undo()
        cpu_build.library.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_build.library() is not None, "the real build is back"
