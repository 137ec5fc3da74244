"""What is particular to the fused CPU backend (lion8bit/kernels/cpu_lion): its builds, its
requantizer, and its registration. Its results for every option, dtype, format and size are
checked by the conformance suite, tests/test_backends.py, on the native build (AVX-512 here);
here a build without VBMI / DQ / BF16 and the portable build (the loops other CPUs run) get every
7th option combination.
"""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from lion8bit import kernels, quant
from lion8bit import momentum as mom
from lion8bit.functional import lion
from lion8bit.kernels import cpu_build, cpu_lion, cpu_tables
from lion8bit.reference import lion_scalars

from helpers import (
    LR,
    OPTIONS,
    PAIRINGS,
    TAILS,
    batch,
    copies,
    group_of,
    option_id,
    step_and_compare,
    written_rounding_key,
)
from test_quant import _boundary_values, brute_force_codes

# "older-avx512": AVX-512 without VBMI, DQ and BF16 (as on Skylake-SP): the 16-lane code lookup,
# the binary-search requantizer and the integer bf16 rounding in the vector step.
BUILDS = {"native": (), "older-avx512": ("-mno-avx512vbmi", "-mno-avx512dq", "-mno-avx512bf16"),
          "portable": ("-mno-avx512f",)}
_loaded = {}


@pytest.fixture(params=list(BUILDS))
def kernel(request, monkeypatch):
    """Which build of the library the registered "cpu" backend calls: -march=native, without
    some AVX-512 extensions, or without AVX-512."""
    if request.param not in _loaded:
        _loaded[request.param] = cpu_build.load(cpu_build.build(extra_flags=BUILDS[request.param]))
    monkeypatch.setitem(cpu_lion._RUNTIME, "library", _loaded[request.param])
    return request.param


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("build", ["older-avx512", "portable"])
@pytest.mark.parametrize("options", OPTIONS[::7], ids=option_id)
def test_other_builds_are_bit_exact(options, build):
    if build not in _loaded:
        _loaded[build] = cpu_build.load(cpu_build.build(extra_flags=BUILDS[build]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(cpu_lion._RUNTIME, "library", _loaded[build])
        generator = torch.Generator().manual_seed(hash(options) % 2**31)
        step_and_compare("cpu", *batch(TAILS, generator), group_of(*options))


def _kernel_codes(values: torch.Tensor) -> torch.Tensor:
    """The codes the kernel gives values in [-1, 1]: beta2 = 0 makes the new momentum the
    gradient, and a 1.0 in every block makes its absmax 1, so it quantizes exactly these values."""
    per_block, count = quant.BLOCK_SIZE - 1, values.numel()
    blocks = torch.cat([values, torch.zeros(-count % per_block)]).view(-1, per_block)
    grad = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
    param = torch.zeros_like(grad)
    entry = {mom.STEP: 1, **mom.new_momentum(param, "8bit", quant.BLOCK_SIZE)}
    group = dict(lr=LR, betas=(0.9, 0.0), weight_decay=0.0)
    lion([param], [grad], [entry], ["8bit"], scalars=lion_scalars(group), block_size=quant.BLOCK_SIZE,
         stochastic_rounding=False, backend="cpu")
    assert torch.equal(entry[mom.MOMENTUM_ABSMAX], torch.ones(blocks.shape[0]))
    return entry[mom.MOMENTUM_CODES].view(-1, quant.BLOCK_SIZE)[:, 1:].reshape(-1)[:count]


def test_requantizer_equals_brute_force(kernel):
    values = _boundary_values()
    values = values[values.abs() <= 1.0]
    scales = torch.logspace(-9, 0, 2000, dtype=torch.float64).float()
    values = torch.cat([values, scales, -scales, torch.rand(4000) * 2 - 1, (torch.rand(2000) * 2 - 1) * 1e-5])
    assert torch.equal(_kernel_codes(values), brute_force_codes(values))


def _ulps_away(points: torch.Tensor, steps: int) -> torch.Tensor:
    """fp32 points moved by `steps` ulps (toward +inf for steps > 0)."""
    bits = points.float().view(torch.int32)
    return (bits + torch.where(points >= 0, steps, -steps)).view(torch.float32)


def test_requantizer_arithmetic_path_around_every_threshold(kernel):
    """The native build computes codes arithmetically and searches only where |x| is within
    2**-12 (in code units) of a threshold: values up to 4096 ulps from every threshold cross
    that margin on both sides in every decade. Also octave and decade edges (the tables switch
    there), zeros and the smallest normal and subnormal values."""
    thresholds = quant.decision_thresholds()
    positive = thresholds[thresholds > 0].float()
    steps = [2**k for k in range(13)] + [3 * 2**k for k in range(11)]
    offsets = [0] + steps + [-k for k in steps]
    near = torch.cat([_ulps_away(positive, k) for k in offsets])
    octaves, decades = torch.arange(-40, 1, dtype=torch.float64), torch.arange(-8, 1, dtype=torch.float64)
    edges = torch.cat([2.0**octaves, 10.0**decades]).float()
    edges = torch.cat([_ulps_away(edges, k) for k in (-2, -1, 0, 1, 2)])
    tiny = torch.tensor([0.0, 1e-45, 1.1754942e-38, 1.1754944e-38, 1e-38, 1e-30])
    values = torch.cat([near, edges, tiny])
    values = values[values <= 1.0]
    values = torch.cat([values, -values])
    assert torch.equal(_kernel_codes(values), brute_force_codes(values))


def test_requantizer_search_levels_hold_every_threshold_once():
    levels = cpu_tables.requantizer_levels()
    used = torch.cat([levels[o : o + 2**k] for k, o in enumerate(cpu_tables._LEVEL_OFFSETS)] + [levels[1:2]])
    thresholds = quant.decision_thresholds()[quant.ZERO_CODE :]
    assert used.numel() == used.unique().numel() == thresholds.numel() == 128
    # Each is the largest fp32 at or below its float64 threshold.
    below = used.sort().values
    assert torch.all(below.double() <= thresholds)
    assert torch.all(torch.nextafter(below, torch.tensor(2.0)).double() > thresholds)


# -- the 4-bit format (cpu_lion_nibbles.h) -------------------------------------------------------

LEVELS = quant.levels_4bit()


def _nudged(values: torch.Tensor) -> torch.Tensor:
    """The values and their fp32 neighbours on both sides."""
    return torch.cat([values, torch.nextafter(values, values + 1), torch.nextafter(values, values - 1)])


def _grid_ties(uniform: torch.Tensor, generator) -> tuple[torch.Tensor, int]:
    """Per element a normalized value x (absmax 1) whose place t on the level grid
    (quant.grid_4bit) is f + u for a random f in 0..14 and that element's u, where some fp32 x near
    (f + u) / 7.5 - 1 gives it: the tie, where u < t - f is false (cpu_lion_nibbles.h codes16:
    r + complement = 2**24 - 1 exactly). Returns (values, how many are ties)."""
    floor = torch.randint(0, 15, uniform.shape, generator=generator).float()
    guess = (floor + uniform) / quant.GRID_HALF_4BIT - 1
    ones = torch.ones(quant.num_blocks(uniform.numel(), quant.BLOCK_SIZE_4BIT))
    values, tied = guess.clone(), torch.zeros(uniform.shape, dtype=torch.bool)
    for step in range(-4, 5):
        x = guess.clone()
        for _ in range(abs(step)):
            x = torch.nextafter(x, torch.full_like(x, float(step)))
        grid = quant.grid_4bit(x, ones)
        hit = (grid.floor() == floor) & (grid - floor == uniform) & (x.abs() <= 1) & ~tied
        values[hit] = x[hit]
        tied |= hit
    return values, int(tied.sum())


def _step_blocks(values: torch.Tensor, raw_blocks: torch.Tensor, sr: bool, *, tie_seed=None, param_dtype=torch.float32,
                 grad_dtype=torch.float32):
    """One 4-bit step whose new momentum is exactly the chosen values: beta2 = 0 makes it the
    (fp32) gradient; each block of 31 values gets a 1.0 first (absmax 1: normalized = value), and
    the raw blocks follow as they are. ``tie_seed``: replace the values by grid ties of their
    elements' u (which need the element indices, hence here). ``param_dtype``: the vector step
    takes fp32 params one block at a time and 16-bit ones in groups of 16 blocks. ``grad_dtype``:
    bf16 (with bf16 params) takes the blocks' even and odd elements as its two vectors; the
    values are then the grad's bf16 roundings."""
    per_block = quant.BLOCK_SIZE_4BIT - 1
    values = torch.cat([values, torch.zeros(-values.numel() % per_block)]).view(-1, per_block)
    head = torch.ones(values.shape[0], 1)
    grad = torch.cat([torch.cat([head, values], dim=1).reshape(-1), raw_blocks.reshape(-1)])
    entry = {mom.STEP: 5, mom.SR_SEED: 1234, **mom.new_momentum(grad, "4bit", quant.BLOCK_SIZE)}
    tied = 0
    if tie_seed is not None:
        key = written_rounding_key(1234, 5, quant.STREAM_MOMENTUM)
        uniform = quant.uniform_from_bits(quant.random_bits(key, grad.numel(), "cpu"))
        chosen = torch.arange(grad.numel()) % quant.BLOCK_SIZE_4BIT != 0
        chosen[values.numel() + values.shape[0] :] = False
        grad[chosen], tied = _grid_ties(uniform[chosen], torch.Generator().manual_seed(tie_seed))
    group = dict(lr=LR, betas=(0.9, 0.0), weight_decay=0.0, stochastic_rounding=sr)
    grad = grad.to(grad_dtype)
    ours = step_and_compare("cpu", [torch.zeros_like(grad, dtype=param_dtype)], [grad], [entry], ["4bit"], group)
    absmax = ours[1][0][mom.MOMENTUM_ABSMAX]
    assert torch.all(absmax[: values.shape[0]] == 1.0), "the chosen values were normalized by 1"
    return tied


def test_4bit_codes_at_levels_midpoints_and_their_neighbours(kernel):
    """Levels (grid places at or next to integers: fractions 0 and just below 1), midpoints,
    thirds, zeros and tiny values, each with its fp32 neighbours, and random values."""
    midpoints = (LEVELS[:-1] + LEVELS[1:]) / 2
    thirds = LEVELS[:-1] + (LEVELS[1:] - LEVELS[:-1]) / 3
    values = _nudged(torch.cat([LEVELS, midpoints, thirds, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40])]))
    values = torch.cat([values, torch.rand(3000, generator=torch.Generator().manual_seed(2)) * 2 - 1])
    _step_blocks(values.clamp(-1, 1), torch.empty(0), sr=True)


# A grid place t in [2**k, 2**(k+1)) is a multiple of 2**(k-23), so u (a multiple of 2**-24) can
# equal t - f only when its low bits are 0: about 1 in 8 elements, 775 of 6200 expected.
MIN_GRID_TIES = 500


def test_4bit_grid_ties_round_down(kernel):
    """u == t - floor(t) exactly: u < t - f is false, so the lower code."""
    tied = _step_blocks(torch.zeros(31 * 200), torch.empty(0), sr=True, tie_seed=3)
    assert tied > MIN_GRID_TIES


def _special_blocks() -> torch.Tensor:
    """Blocks of 32 that stress the absmax: all zeros (either sign), subnormal maxima (one that
    rounds up to the smallest normal, 2**-126), the smallest subnormal, a maximum that rounds up
    to inf (2**128), inf and NaN, one just above 1, maxima on both sides of 2**-64 (below it a
    block is scaled by 2**64), one near the largest bf16 (the smallest grid_scale) and one whose
    grid place falls below 0."""
    generator = torch.Generator().manual_seed(4)

    def block(peak: float) -> torch.Tensor:
        values = (torch.rand(32, generator=generator) * 2 - 1) * peak
        values[5] = peak
        return values

    largest_subnormal = torch.tensor(0x007FFFFF, dtype=torch.int32).view(torch.float32).item()
    blocks = [torch.zeros(32), -torch.zeros(32), block(3e-39), block(largest_subnormal), block(1.4e-45),
              block(torch.finfo(torch.float32).tiny), block(torch.finfo(torch.float32).max),
              block(1.0000001), block(1e-20), block(2.0**-64), block(6e-20), block(3e38)]
    with_inf, with_nan = block(0.5), block(0.5)
    with_inf[9], with_nan[9] = float("inf"), float("nan")
    # -a with a bf16 absmax a whose grid_scale rounds up: its grid place is -2**-21, below 0.
    below_zero = block(float.fromhex("0x1.3p-129"))
    below_zero[6] = -below_zero[5]
    return torch.cat([*blocks, with_inf, with_nan, below_zero])


PARAM_GRAD_DTYPES = {"fp32": (torch.float32,) * 2, "bf16": (torch.bfloat16, torch.float32),
                     "fp16": (torch.float16, torch.float32), "bf16-bf16": (torch.bfloat16,) * 2}


@pytest.mark.parametrize("dtypes", list(PARAM_GRAD_DTYPES.values()), ids=list(PARAM_GRAD_DTYPES))
@pytest.mark.parametrize("sr", [False, True])
def test_4bit_blocks_of_zeros_subnormals_and_non_finite_values(kernel, sr, dtypes):
    _step_blocks(torch.rand(62), _special_blocks(), sr=sr, param_dtype=dtypes[0], grad_dtype=dtypes[1])


@pytest.mark.parametrize("parity", [0, 1], ids=["even", "odd"])
@pytest.mark.parametrize("sr", [False, True])
def test_4bit_bf16_params_special_in_one_parity(kernel, sr, parity):
    """Every bf16 pattern as a param at the even (or odd) elements only, 1.5 at the others: the
    vector step with bf16 params and grads rounds a block's two parities as one store, whose
    one-instruction conversion must be refused when either parity holds a NaN or subnormal."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    param = torch.full((2 * patterns.numel(),), 1.5, dtype=torch.bfloat16)
    param[parity::2] = patterns
    grad = torch.randn(param.numel(), generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    grad[parity::2] = 0.0  # with zero momentum: these params are only decayed (and rounded)
    entry = {mom.STEP: 3, mom.SR_SEED: 7, **mom.new_momentum(param, "4bit", quant.BLOCK_SIZE)}
    step_and_compare("cpu", [param], [grad], [entry], ["4bit"], group_of(0.3, 1.0, False, False, False, sr))


def test_4bit_nan_takes_code_0():
    """A NaN grid place (a non-finite momentum in a block of NaN or infinite absmax) takes code 0,
    which cpu_lion_nibbles.h's integer codes give it: NaN converts to INT_MIN, clamped to 0."""
    assert quant.codes_4bit(torch.tensor([float("nan"), -float("nan")]), 0.0).tolist() == [0, 0]


@pytest.mark.parametrize("options", OPTIONS[::5], ids=option_id)
def test_4bit_odd_sizes_every_pairing(kernel, options):
    """1, 31, 33 and 4097 elements: partial blocks, a last byte with one code, the stages behind
    whole vectors."""
    generator = torch.Generator().manual_seed(hash(options) % 2**31)
    step_and_compare("cpu", *batch([1, 31, 33, 4097], generator, formats=["4bit"]), group_of(*options))


def test_4bit_threads_meet_at_whole_blocks(kernel):
    """Two threads on a tensor of two chunks and a partial block: chunks are whole blocks, so
    no byte of codes is written by both (the result equals the oracle's)."""
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(8)
    tensors = batch([2 * cpu_chunk() + 33], generator, pairings=PAIRINGS[:2], formats=["4bit"])
    step_and_compare("cpu", *tensors, group_of(0.3, 0.5, True, False, False, True))


def test_4bit_offsets_key_the_whole_parameters_indices(kernel):
    """Offsets that are multiples of 32, one with a multiple of 2**32 inside the tensor (new
    element keys mid-tensor, at a block boundary), and an empty tensor among them."""
    generator = torch.Generator().manual_seed(9)
    tensors = batch([0, 33, 4097], generator, pairings=PAIRINGS[:2], formats=["4bit"])
    offsets = [2**32 - 96 if index % 2 else 32 * (index + 1) for index in range(len(tensors[0]))]
    params, grads, entries, formats = tensors
    group = group_of(0.0, 1.0, False, False, False, True)
    shifted = step_and_compare("cpu", *copies(params, entries)[:1], grads, copies(params, entries)[1], formats,
                               group, element_offsets=offsets)
    unshifted = step_and_compare("cpu", *copies(params, entries)[:1], grads, copies(params, entries)[1], formats, group)
    codes = [entry[mom.MOMENTUM_CODES] for entry in shifted[1]], [entry[mom.MOMENTUM_CODES] for entry in unshifted[1]]
    assert not any(torch.equal(a, b) for a, b in zip(*codes, strict=True) if a.numel() > 8)


def cpu_chunk() -> int:
    """cpu_lion_elements.h CHUNK: the elements a thread takes at a time."""
    return 1 << 16


def test_cpu_tensors_only():
    assert kernels.get("cpu").device_error(torch.device("meta"), "a parameter") == (
        'backend="cpu" runs on CPU tensors, got a parameter on meta'
    )


def test_a_machine_with_a_compiler_registers_the_backend_and_auto_takes_it():
    """The suite runs the "cpu" backend only where it is registered: a machine whose compiler
    stopped working would otherwise pass every test on "torch" alone."""
    assert shutil.which(cpu_build.compiler()), "this test machine has a C++ compiler"
    assert kernels.available("cpu")
    assert kernels.resolve("auto", torch.device("cpu")).name == "cpu"


_WITHOUT_A_COMPILER = """
import warnings
import torch
from lion8bit import Lion, kernels
warnings.simplefilter("error")  # auto must not warn about a backend nobody asked for
print("auto:", kernels.resolve("auto", torch.device("cpu")).name)
p = torch.nn.Parameter(torch.randn(10))
p.grad = torch.randn(10)
Lion([p], lr=1e-3).step()
try:
    Lion([p], lr=1e-3, backend="cpu").step()
except RuntimeError as error:
    print("RuntimeError:", error)
"""


@pytest.mark.slow  # a fresh process each
@pytest.mark.parametrize("compiler", ["/nonexistent/c++", "false"], ids=["missing", "failing"])
def test_without_a_compiler_auto_quietly_takes_torch_and_cpu_raises(tmp_path, compiler):
    environment = {"CXX": compiler, "LION8BIT_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WITHOUT_A_COMPILER)],
        capture_output=True, text=True, env=environment, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "auto: torch"
    assert lines[1].startswith('RuntimeError: backend="cpu" needs its C++ library, which could not be built: ')
    assert compiler in lines[1] and "Install a C++ compiler (or set CXX)" in lines[1]
    assert result.stderr == ""
