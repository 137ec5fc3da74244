"""Shared test helpers (not a test file): bit comparisons, random problems, the registered
backends, and the oracle every backend is compared with — ``reference.py`` called one tensor at a
time, with the cautious counts and stochastic-rounding keys worked out here from their written
formulas rather than by the functional under test."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch

from lion8bit import kernels, quant
from lion8bit import momentum as mom
from lion8bit.functional import lion
from lion8bit.reference import cautious_step_sizes, lion_scalars, reference_aligned_count, reference_step

PAIRINGS = [  # (param dtype, grad dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]
FORMATS = ["8bit", "4bit", "bf16", "fp32"]
TAILS = [1, 255, 257, 4095, 4097]  # numels that are not whole blocks, stages or tiles
LR, INITIAL_LR = 1e-3, 2e-3  # decoupled_initial_lr != lr, so decoupled weight decay changes the decay
# weight_decay, cautious_factor, cautious_weight_decay, decoupled_weight_decay, maximize, stochastic_rounding
OPTIONS = list(
    itertools.product([0.0, 0.3], [1.0, 0.5, 0.0], [False, True], [False, True], [False, True], [False, True])
)


def load_script(path: Path, name: str):
    """A script of the repository (examples/, benchmarks/) as the module ``name``, registered in
    sys.modules (dataclasses look their module up there) unless a test loaded it before. Its folder
    is on sys.path while it runs, so it imports its siblings by plain name as when run directly."""
    if name in sys.modules:
        return sys.modules[name]
    folder = str(Path(path).resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(folder)
    return module


def option_id(options) -> str:
    return "wd{}-f{}-cwd{:d}-dec{:d}-max{:d}-sr{:d}".format(*options)


def group_of(weight_decay, cautious_factor, cautious_wd, decoupled, maximize, sr) -> dict:
    return dict(
        lr=LR,
        decoupled_initial_lr=INITIAL_LR,
        betas=(0.9, 0.99),
        weight_decay=weight_decay,
        cautious_factor=cautious_factor,
        cautious_weight_decay=cautious_wd,
        decoupled_weight_decay=decoupled,
        maximize=maximize,
        stochastic_rounding=sr,
    )


def cpu_backends() -> list[str]:
    """The registered backends that take CPU tensors in this process ("triton" when its kernels
    were decorated for the interpreter: TRITON_INTERPRET=1, which tests/conftest.py sets)."""
    cpu = torch.device("cpu")
    return [
        name for name in kernels.BACKENDS if kernels.available(name) and kernels.get(name).device_error(cpu, "") is None
    ]


def every_backend(test):
    """``test`` parametrized with ``backend`` over :func:`cpu_backends` (the conformance suite's
    backends; read when a test module applies it, not when this module is imported)."""
    return pytest.mark.parametrize("backend", cpu_backends())(test)


def native_cpu_backends() -> list[str]:
    """The registered backends that run CPU tensors natively ("torch", and "cpu" where its library
    builds): the ones the public-API tests run on, where the interpreter would be too slow."""
    return [name for name in cpu_backends() if name != "triton"]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns (so -0.0 != 0.0 and NaN payloads compare)."""
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    return tensor.contiguous().view(integer)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    different = int((bits(actual) != bits(expected)).sum())
    assert different == 0, f"{what}: {different} of {actual.numel()} elements differ"


def make_tensor(numel, param_dtype, grad_dtype, fmt, generator, block_size=quant.BLOCK_SIZE, device="cpu"):
    """(param, grad, state entry): random, with exact zeros (c == 0: u = 0; zero params for the
    cautious weight decay's >=), an all-zero block, and scales across the codebook's decades."""

    def randn(*scale):
        return (
            torch.randn(numel, generator=generator)
            * torch.tensor(scale)[torch.randint(len(scale), (numel,), generator=generator)]
        )

    param = randn(0.1, 1.0, 1e-3).to(param_dtype)
    grad = randn(1e-2, 1e-5, 1.0)
    momentum = randn(1e-2, 1e-6, 1.0)
    zero = torch.rand(numel, generator=generator) < 0.05
    grad[zero], momentum[zero] = 0.0, 0.0
    param[torch.rand(numel, generator=generator) < 0.02] = 0.0
    block = mom.absmax_block(fmt, block_size)
    grad[: min(numel, block)][torch.rand(min(numel, block), generator=generator) < 0.5] = 0.0
    if numel > block:
        momentum[:block] = 0.0  # an all-zero block: absmax 0 before the step
    entry = {
        mom.STEP: int(torch.randint(1, 10**6, (1,), generator=generator)),
        mom.SR_SEED: int(torch.randint(0, 2**32, (1,), generator=generator)),
    }
    entry.update(mom.new_momentum(param, fmt, block_size))
    mom.encode_momentum(entry, momentum, fmt, block_size)
    param, grad = param.to(device), grad.to(grad_dtype).to(device)
    entry = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
    return param, grad, entry


def batch(sizes, generator, block_size=quant.BLOCK_SIZE, pairings=PAIRINGS, formats=FORMATS, device="cpu"):
    """(params, grads, entries, formats): one tensor per size x pairing x format."""
    tensors = [
        make_tensor(numel, param_dtype, grad_dtype, fmt, generator, block_size, device)
        for numel in sizes
        for param_dtype, grad_dtype in pairings
        for fmt in formats
    ]
    params, grads, entries = (list(column) for column in zip(*tensors, strict=True))
    return params, grads, entries, [mom.stored_format(entry) for entry in entries]


def _mix32(x: int) -> int:
    # "lowbias32" as written in lion8bit/quant.py's docstring, in plain Python ints.
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def written_rounding_key(seed: int, step: int, stream: int) -> int:
    """The key of lion8bit.quant.rounding_key, from its written formula:
    mix32(mix32((seed ^ mix32(stream + 1)) mod 2**32) ^ (step mod 2**32))."""
    return _mix32(_mix32((seed ^ _mix32(stream + 1)) & 0xFFFFFFFF) ^ (step & 0xFFFFFFFF))


def reference_steps(
    params, grads, entries, formats, group, *, block_size=quant.BLOCK_SIZE, numels=None, element_offsets=None
):
    """The oracle: one step of every tensor by reference.py, in place. Each entry's step already
    counts this step; keys come from :func:`written_rounding_key` with that step."""
    scalars = lion_scalars(group)
    numels = numels or [p.numel() for p in params]
    element_offsets = element_offsets or [0] * len(params)
    for param, grad, entry, fmt, numel, offset in zip(
        params, grads, entries, formats, numels, element_offsets, strict=True
    ):
        cautious_steps = None
        if scalars.cautious:
            count = reference_aligned_count(grad, entry, scalars, fmt=fmt, block_size=block_size)
            cautious_steps = cautious_step_sizes(count, numel, scalars.lr, scalars.cautious_factor, torch.float32)
        keys = None
        if group.get("stochastic_rounding") or fmt == "4bit":  # 4-bit momentum always rounds stochastically
            seed, step = entry[mom.SR_SEED], entry[mom.STEP]
            keys = (written_rounding_key(seed, step, 0), written_rounding_key(seed, step, 1))
        reference_step(
            param,
            grad,
            entry,
            scalars,
            fmt=fmt,
            block_size=block_size,
            rounding_keys=keys,
            cautious_steps=cautious_steps,
            element_offset=offset,
        )


def copies(params, entries):
    return [p.clone() for p in params], copy.deepcopy(entries)


def assert_same_state(params, entries, expected_params, expected_entries, formats):
    for index, (param, entry) in enumerate(zip(params, entries, strict=True)):
        label = f"tensor {index} ({param.numel()} {param.dtype} {formats[index]})"
        assert_same_bits(param, expected_params[index], f"{label} param")
        for key, value in expected_entries[index].items():
            if isinstance(value, torch.Tensor):
                assert_same_bits(entry[key], value, f"{label} {key}")
            else:
                assert entry[key] == value, f"{label} {key}"


def step_and_compare(
    backend, params, grads, entries, formats, group, *, block_size=quant.BLOCK_SIZE, element_offsets=None
):
    """One step of the functional with ``backend`` on copies, one of the oracle on the originals;
    every buffer must agree bit for bit. Returns the backend's (params, entries)."""
    ours = copies(params, entries)
    lion(
        ours[0],
        grads,
        ours[1],
        formats,
        scalars=lion_scalars(group),
        block_size=block_size,
        stochastic_rounding=group.get("stochastic_rounding", False),
        backend=backend,
        element_offsets=element_offsets,
    )
    reference_steps(params, grads, entries, formats, group, block_size=block_size, element_offsets=element_offsets)
    assert_same_state(*ours, params, entries, formats)
    return ours
