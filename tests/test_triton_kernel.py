"""The fused Triton kernel against the reference, on CPU, in Triton's interpreter.

Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, so the ``interpreted`` fixture
imports lion8bit.kernels.triton_lion (and the probe kernels) afresh with it set, and drops them
again afterwards: later imports in the same pytest process (tests/test_triton_compile.py, a CUDA
run) get kernels for the GPU compiler.

The interpreter runs each fp32 operation on its own (numpy), as the GPU does with FMA contraction
off (which the launcher asks for and tests/test_triton_compile.py checks in the PTX), so the
kernel must reproduce the reference bit for bit: params, 8-bit codes, absmax and bf16 momentum
are compared as bit patterns. The exception the issue allows (params differing where c is
within rounding of 0) has a bound of zero here; the tests count such sign ties to show they
are exercised.
"""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lion8bit.kernels as kernels
from lion8bit import Lion, quant
from lion8bit import momentum as mom
from lion8bit.optimizer import _resolve_backend, torch_aligned_counts, torch_lion_step
from lion8bit.reference import cautious_step_sizes, lion_scalars

pytest.importorskip("triton")

MODULE = "lion8bit.kernels.triton_lion"
PROBES = "triton_probes"


def _forget_kernels():
    for name in (MODULE, PROBES):
        sys.modules.pop(name, None)
    if hasattr(kernels, "triton_lion"):
        delattr(kernels, "triton_lion")
    kernels.load.cache_clear()
    kernels.available.cache_clear()


@pytest.fixture(scope="module")
def interpreted():
    """(triton_lion, probes), both decorated for the interpreter."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        _forget_kernels()
        module = importlib.import_module(MODULE)
        assert module.INTERPRETED
        yield module, importlib.import_module(PROBES)
    _forget_kernels()


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns (so -0.0 != 0.0 and every NaN payload counts)."""
    view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[tensor.element_size()]
    return tensor.contiguous().view(view)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    differ = bits_of(actual) != bits_of(expected)
    assert not differ.any(), f"{what}: {int(differ.sum())} of {differ.numel()} elements differ"


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


def test_requantizer_is_nearest_codes_exactly(interpreted):
    _, probes = interpreted
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
def test_random_bits_are_quants(interpreted, key, start):
    _, probes = interpreted
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
def test_rounding_to_bf16_and_fp16_is_quants(interpreted, stochastic):
    _, probes = interpreted
    values = _rounding_inputs()
    bits = None
    if stochastic:
        generator = torch.Generator().manual_seed(3)
        bits = torch.randint(0, 2**32, values.shape, dtype=torch.int64, generator=generator)
        bits[:64] = torch.tensor([0, 2**32 - 1]).repeat(32)  # extremes of the draw
    bf16, fp16 = probes.round_to_16_bits(values, bits)
    assert_same_bits(bf16, quant.round_to_bf16(values, bits), "bf16")
    assert_same_bits(fp16, quant.round_to_fp16(values, bits), "fp16")


# ---------------------------------------------------------------------------------------------
# the step, through the backend interface

# Group options of lion_scalars, each exercising a branch of reference.lion_update.
OPTIONS = {
    "plain": dict(weight_decay=0.0),
    "decay": dict(weight_decay=0.1),
    "decoupled": dict(weight_decay=1e-4, decoupled_weight_decay=True, decoupled_initial_lr=3e-3),
    "cautious": dict(weight_decay=0.1, cautious_factor=0.5),
    "mask+cwd": dict(weight_decay=0.1, cautious_factor=0.0, cautious_weight_decay=True),
    "cwd+maximize": dict(weight_decay=0.1, cautious_weight_decay=True, maximize=True),
}
DTYPES = {  # param dtype, grad dtype
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16/fp32 grad": (torch.bfloat16, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "fp16/fp32 grad": (torch.float16, torch.float32),
}
TAIL_SIZES = [1, 255, 257, 4095, 4097]  # numels that are not whole blocks (or whole tiles)


def _group(options: dict, lr: float = 1e-3) -> dict:
    group = dict(lr=lr, betas=(0.9, 0.99), weight_decay=0.0, decoupled_initial_lr=lr)
    group.update(options)
    return group


def _problem(numel, param_dtype, grad_dtype, fmt, block_size=256, seed=0):
    """A param, three grads and a state entry with momentum already in it, plus exact ties:
    an all-zero block (absmax 0, c = 0), zero params (cautious weight decay's >=), zero grads."""
    generator = torch.Generator().manual_seed(seed)
    param = torch.randn(numel, generator=generator).to(param_dtype)
    grads = [(torch.randn(numel, generator=generator) * 0.01).to(grad_dtype) for _ in range(3)]
    momentum = torch.randn(numel, generator=generator) * 0.01
    zero_block = slice(block_size, 2 * block_size)
    momentum[zero_block] = 0
    for grad in grads:
        grad[zero_block] = 0
        grad[::7] = 0
    param[::5] = 0
    entry = {mom.STEP: 0, mom.SR_SEED: 0xDEADBEEF}  # a seed >= 2**31: keys of both signs
    entry.update(mom.new_momentum(param, fmt, block_size))
    mom.encode_momentum(entry, momentum, fmt, block_size)
    return param, grads, entry


def _copy_entry(entry):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in entry.items()}


def _run_both(module, param, grads, entry, fmt, scalars, *, block_size=256, stochastic=False):
    """Steps with the reference and the kernel side by side; returns both (param, entry) and
    the number of sign ties (c == 0) the kernel met."""
    sides = {"torch": (param.clone(), _copy_entry(entry)), "triton": (param.clone(), _copy_entry(entry))}
    counts = {"torch": torch_aligned_counts, "triton": module.triton_aligned_counts}
    steps = {"torch": torch_lion_step, "triton": module.triton_lion_step}
    ties = 0
    for grad in grads:
        for name, (p, e) in sides.items():
            e[mom.STEP] += 1
            cautious_steps = None
            if scalars.cautious:
                count = counts[name]([p], [grad], [e], [fmt], scalars=scalars, block_size=block_size)
                if name == "triton":
                    assert torch.equal(count[0], reference_count), "aligned count"
                reference_count = count[0]
                cautious_steps = [
                    cautious_step_sizes(count[0], p.numel(), scalars.lr, scalars.cautious_factor, torch.float32)
                ]
            if name == "torch":
                m = mom.decode_momentum(e, fmt, block_size)
                g = -grad.float() if scalars.maximize else grad.float()
                ties += int((m * scalars.beta1 + g * scalars.one_minus_beta1 == 0).sum())
            steps[name](
                [p], [grad], [e], [fmt],
                scalars=scalars, block_size=block_size,
                stochastic_rounding=stochastic, cautious_steps=cautious_steps,
            )
    return sides, ties


def _assert_sides_match(sides, fmt):
    (p_ref, e_ref), (p_out, e_out) = sides["torch"], sides["triton"]
    assert_same_bits(p_out, p_ref, "param")
    keys = (mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX) if fmt == "8bit" else (mom.MOMENTUM,)
    for key in keys:
        assert_same_bits(e_out[key], e_ref[key], key)


CASES = [
    (fmt, dtypes, options, TAIL_SIZES[i % len(TAIL_SIZES)])
    for i, (fmt, dtypes, options) in enumerate(
        (fmt, dtypes, options) for fmt in mom.STATE_KINDS for dtypes in DTYPES for options in OPTIONS
    )
]


@pytest.mark.parametrize("fmt, dtypes, options, numel", CASES)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_step_is_the_reference_bit_for_bit(interpreted, fmt, dtypes, options, numel, stochastic):
    module, _ = interpreted
    param_dtype, grad_dtype = DTYPES[dtypes]
    param, grads, entry = _problem(numel, param_dtype, grad_dtype, fmt)
    scalars = lion_scalars(_group(OPTIONS[options]))
    sides, _ = _run_both(module, param, grads, entry, fmt, scalars, stochastic=stochastic)
    _assert_sides_match(sides, fmt)
    if numel > 1:  # (a single element may be a zero param under a full cautious mask)
        assert not torch.equal(sides["triton"][0], param)  # it moved


def test_sign_ties_are_exercised_and_exact(interpreted):
    module, _ = interpreted
    param, grads, entry = _problem(4097, torch.bfloat16, torch.float32, "8bit")
    scalars = lion_scalars(_group(OPTIONS["mask+cwd"]))
    sides, ties = _run_both(module, param, grads, entry, "8bit", scalars, stochastic=True)
    assert ties >= 3 * 256  # at least the zero block, every step
    _assert_sides_match(sides, "8bit")  # no param differs at a tie: the allowed bound is 0


def test_a_block_with_subnormal_absmax_is_the_reference(interpreted):
    """A block whose momentum decayed below 2**-126 (e.g. embedding rows without gradient for
    thousands of steps): normalized with the 2**24 scaling of quant.quantize_blockwise, so its
    zeros stay code 127 and no NaN appears (1/absmax alone would overflow to inf)."""
    module, _ = interpreted
    param, grads, entry = _problem(1024, torch.float32, torch.float32, "8bit")
    tiny = slice(512, 768)
    entry[mom.MOMENTUM_ABSMAX][2] = 1e-39
    entry[mom.MOMENTUM_CODES][tiny][::3] = quant.ZERO_CODE
    for grad in grads:
        grad[tiny] = 0
    scalars = lion_scalars(_group(OPTIONS["decay"]))
    sides, _ = _run_both(module, param, grads, entry, "8bit", scalars)
    _assert_sides_match(sides, "8bit")
    after = sides["triton"][1]
    assert after[mom.MOMENTUM_ABSMAX][2] < torch.finfo(torch.float32).tiny, "still subnormal"
    assert torch.all(after[mom.MOMENTUM_CODES][tiny][::3] == quant.ZERO_CODE), "zeros stay zero"
    decoded = quant.dequantize_blockwise(after[mom.MOMENTUM_CODES], after[mom.MOMENTUM_ABSMAX])
    assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("block_size, numel", [(64, 1000), (4096, 9000)])  # rows > 1 and > the tile
def test_other_block_sizes(interpreted, block_size, numel):
    module, _ = interpreted
    param, grads, entry = _problem(numel, torch.float32, torch.float32, "8bit", block_size)
    scalars = lion_scalars(_group(OPTIONS["cautious"]))
    sides, _ = _run_both(module, param, grads, entry, "8bit", scalars, block_size=block_size)
    _assert_sides_match(sides, "8bit")


def test_stochastic_rounding_changes_the_result(interpreted):
    # Guards the tests above against a kernel that ignores the stochastic flag.
    module, _ = interpreted
    param, grads, entry = _problem(4097, torch.bfloat16, torch.bfloat16, "bf16")
    scalars = lion_scalars(_group(OPTIONS["decay"]))
    nearest, _ = _run_both(module, param, grads[:1], entry, "bf16", scalars)
    stochastic, _ = _run_both(module, param, grads[:1], entry, "bf16", scalars, stochastic=True)
    assert not torch.equal(nearest["triton"][0], stochastic["triton"][0])
    assert not torch.equal(nearest["triton"][1][mom.MOMENTUM], stochastic["triton"][1][mom.MOMENTUM])


@pytest.mark.slow
def test_a_million_elements(interpreted):
    # 1_000_003 = 3906 whole blocks of 256 and a partial one, 489 programs of 2048 elements.
    module, _ = interpreted
    param, grads, entry = _problem(1_000_003, torch.bfloat16, torch.float32, "8bit")
    scalars = lion_scalars(_group(OPTIONS["mask+cwd"]))
    sides, _ = _run_both(module, param, grads[:1], entry, "8bit", scalars, stochastic=True)
    _assert_sides_match(sides, "8bit")


def test_empty_tensor(interpreted):
    module, _ = interpreted
    param, grads, entry = _problem(0, torch.float32, torch.float32, "8bit")
    scalars = lion_scalars(_group(OPTIONS["cautious"]))
    counts = module.triton_aligned_counts([param], grads[:1], [entry], ["8bit"], scalars=scalars, block_size=256)
    assert counts[0].dtype == torch.int64 and counts[0].shape == () and int(counts[0]) == 0


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
    ],
    ids=["8bit", "8bit-cautious-sr", "bf16-sr-maximize", "fp32-mask-decoupled"],
)
def test_optimizer_backend_triton_is_backend_torch(interpreted, options):
    sides = {}
    for backend in ("torch", "triton"):
        params = _model_params()
        optimizer = Lion(params, lr=1e-3, backend=backend, **options)
        for step in range(3):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            optimizer.step()
            optimizer.param_groups[0]["lr"] *= 0.7  # a schedule: a new lr every step
        sides[backend] = (params, optimizer.state_dict())
    (ref_params, ref_state), (out_params, out_state) = sides["torch"], sides["triton"]
    for ref, out in zip(ref_params, out_params):
        assert out.stride() == ref.stride()  # a non-contiguous param stays as it was
        assert_same_bits(out.detach(), ref.detach(), "param")
    for index, ref_entry in ref_state["state"].items():
        for key, value in ref_entry.items():
            if isinstance(value, torch.Tensor):
                assert_same_bits(out_state["state"][index][key], value, key)
            else:
                assert out_state["state"][index][key] == value


@pytest.mark.parametrize("state", ["8bit", "bf16", "fp32"])
def test_resume_through_backend_triton_is_bit_exact(interpreted, state):
    """state_dict -> torch.save -> load (weights_only) -> continue equals never stopping."""
    import io

    options = dict(lr=1e-3, weight_decay=0.1, state=state, stochastic_rounding=True, backend="triton")

    def run(params, optimizer, steps):
        for step in steps:
            for p, g in zip(params, _grads(params, step)):
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

    for a, b in zip(straight, resumed):
        assert_same_bits(b.detach(), a.detach(), "param")
    for a, b in zip(straight, resumed):
        for key, value in straight_opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert_same_bits(resumed_opt.state[b][key], value, key)
            else:
                assert resumed_opt.state[b][key] == value


@pytest.mark.parametrize("fmt", ["8bit", "bf16", "fp32"])
def test_skip_flag_stores_nothing_and_a_clear_flag_is_the_reference(interpreted, fmt):
    """skip_nonfinite on a GPU: the decision is a device flag the kernel reads (no host sync)."""
    import copy

    module, _ = interpreted
    param, grads, entry = _problem(4097, torch.bfloat16, torch.float32, fmt)
    scalars = lion_scalars(_group(OPTIONS["decay"]))
    common = dict(scalars=scalars, block_size=quant.BLOCK_SIZE, stochastic_rounding=True, cautious_steps=None)
    entry[mom.STEP] += 1
    skipped_param, skipped_entry = param.clone(), copy.deepcopy(entry)
    module.triton_lion_step([skipped_param], [grads[0]], [skipped_entry], [fmt], skip=torch.tensor(True), **common)
    assert_same_bits(skipped_param, param, "param")
    for key, value in entry.items():
        if isinstance(value, torch.Tensor):
            assert_same_bits(skipped_entry[key], value, key)
    stepped_param, stepped_entry = param.clone(), copy.deepcopy(entry)
    module.triton_lion_step([stepped_param], [grads[0]], [stepped_entry], [fmt], skip=torch.tensor(False), **common)
    torch_lion_step([param], [grads[0]], [entry], [fmt], **common)
    assert_same_bits(stepped_param, param, "param")
    for key, value in entry.items():
        if isinstance(value, torch.Tensor):
            assert_same_bits(stepped_entry[key], value, key)


_SYNCHRONISING = ["item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"]


def test_step_issues_no_host_synchronisation(interpreted, monkeypatch):
    """On CUDA each of these would wait for the device. The interpreter itself must move data to
    numpy (from triton's own files), so a call is refused only when it comes from outside the
    triton package: the launcher, the optimizer, torch.optim."""
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
    optimizer = Lion(params, lr=1e-3, weight_decay=0.1, cautious_factor=0.5, stochastic_rounding=True, backend="triton")
    with monkeypatch.context() as patch:
        for name in _SYNCHRONISING:
            patch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        patch.setattr(torch.cuda, "synchronize", guard("synchronize", torch.cuda.synchronize))
        torch.ones(1).item()  # the guard sees a call from here
        assert calls and "item" in calls.pop()
        for step in range(2):  # the first step creates the state
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            optimizer.step()
    assert calls == []


def test_auto_picks_triton_for_cuda_tensors(interpreted):
    assert _resolve_backend("auto", torch.device("cuda", 0)) == "triton"


def _fresh_python(code: str, hide_triton: bool) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = "import sys; sys.modules['triton'] = None\n" if hide_triton else ""
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, env=environment, timeout=300,
    )


_STEP_WITH_TRITON = """
import torch
from lion8bit import Lion
p = torch.nn.Parameter(torch.randn(10))
p.grad = torch.randn(10)
Lion([p], backend="auto").step()  # falls back without a fused backend
print("auto ok")
try:
    Lion([p], backend="triton").step()
except RuntimeError as error:
    print("RuntimeError:", error)
"""


def test_without_triton_import_works_and_backend_triton_raises():
    result = _fresh_python(_STEP_WITH_TRITON, hide_triton=True)
    assert result.returncode == 0, result.stderr
    assert "auto ok" in result.stdout
    assert 'RuntimeError: backend="triton" needs the triton package' in result.stdout


def test_cpu_tensors_without_the_interpreter_raise_clearly():
    result = _fresh_python(_STEP_WITH_TRITON, hide_triton=False)
    assert result.returncode == 0, result.stderr
    assert 'RuntimeError: backend="triton" runs on CUDA tensors, got param_groups[0]' in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout


_INTERPRET_SET_AFTER_IMPORT = """
import os
import torch
import lion8bit.kernels as kernels
from lion8bit import Lion
kernels.load("triton")  # decorated for the GPU compiler: the variable is not set yet
os.environ["TRITON_INTERPRET"] = "1"  # too late for the kernels
p = torch.nn.Parameter(torch.randn(10))
p.grad = torch.randn(10)
optimizer = Lion([p], backend="triton")
try:
    optimizer.step()
except RuntimeError as error:
    print("RuntimeError:", error)
print("state entries:", len(optimizer.state))
"""


def test_interpreter_set_after_the_kernels_were_decorated_is_refused_before_any_change():
    # What the kernels can run on was fixed when @triton.jit ran, so the optimizer's check
    # before the step must ask the kernels, not the variable now.
    result = _fresh_python(_INTERPRET_SET_AFTER_IMPORT, hide_triton=False)
    assert result.returncode == 0, result.stderr
    assert 'RuntimeError: backend="triton" runs on CUDA tensors' in result.stdout
    assert "state entries: 0" in result.stdout
