"""The conformance suite's many-tensor calls (issue 13): every backend computes reference.py bit
for bit with many tensors in one call, and "triton" launches once per (param dtype, grad dtype,
format, alignment) through launch tables cached by the tensors' addresses.

Mixed sizes, dtypes and formats in one call; tensors off 16-byte boundaries; tensors joining and
leaving between steps; storages that move and wrappers that do not. The results are checked on
every backend, as in tests/test_backends.py (the oracle of tests/helpers.py, bit patterns); the
launch counts and the table cache on "triton" (in Triton's interpreter without a GPU) only.
"""

import pytest
import torch

from lion8bit import momentum as mom
from lion8bit import quant
from lion8bit.functional import lion
from lion8bit.reference import lion_scalars

from helpers import (
    FORMATS,
    PAIRINGS,
    assert_same_state,
    batch,
    copies,
    every_backend,
    group_of,
    reference_steps,
    step_and_compare,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class _TritonLaunches:
    """Counts the Triton kernels' launches (passing each on to the kernel) and the launch
    tables the launcher builds."""

    def __init__(self, monkeypatch):
        from lion8bit.kernels import triton_lion, triton_lion_kernels

        self.tables = triton_lion.TABLES
        self.counts = {"step": 0, "count": 0}
        for kind, name in (("step", "_lion_step_kernel"), ("count", "_aligned_count_kernel")):
            kernel = getattr(triton_lion_kernels, name)
            monkeypatch.setattr(triton_lion_kernels, name, self._counting(kind, kernel))

    def _counting(self, kind, kernel):
        counts = self.counts

        class Counting:
            def __getitem__(self, grid):
                counts[kind] += 1
                return kernel[grid]

        return Counting()

    def reset(self):
        self.counts.update(step=0, count=0)
        return self.tables.builds


@pytest.fixture
def launches(backend, monkeypatch):
    return _TritonLaunches(monkeypatch) if backend == "triton" else None


def _launch_kinds(params, grads, entries, formats) -> int:
    """The launches the one-launch-per-kind rule asks for: distinct (param dtype, grad dtype,
    format, 16-byte alignment of param, grad and momentum with numel % 16 == 0) of non-empty
    tensors."""
    kinds = set()
    for param, grad, entry, fmt in zip(params, grads, entries, formats, strict=True):
        momentum = entry.get(mom.MOMENTUM_CODES, entry.get(mom.MOMENTUM))
        addresses = (param.data_ptr(), grad.data_ptr(), momentum.data_ptr())
        aligned = param.numel() % 16 == 0 and all(address % 16 == 0 for address in addresses)
        if param.numel():
            kinds.add((param.dtype, grad.dtype, fmt, aligned))
    return len(kinds)


MIXED_SIZES = [0, 1, 255, 257, 4096, 4097]  # 4096: whole vectors, the aligned launch


@every_backend
@pytest.mark.parametrize("sizes", [MIXED_SIZES, pytest.param([1, 4096, 1_000_003], marks=pytest.mark.slow)],
                         ids=["small", "a-million"])
def test_many_tensors_of_mixed_sizes_dtypes_and_formats_in_one_call(backend, sizes, launches):
    """Every size, param/grad dtype pairing and format in one call, with caution and stochastic
    rounding: "triton" launches once per kind present, for the step and for the pre-pass."""
    generator = torch.Generator().manual_seed(21)
    pairings, formats = (PAIRINGS, FORMATS) if len(sizes) > 3 else (PAIRINGS[2:3], ["8bit", "bf16"])
    tensors = batch(sizes, generator, pairings=pairings, formats=formats)
    if launches:
        launches.reset()
    step_and_compare(backend, *tensors, group_of(0.3, 0.5, True, False, False, True))
    if launches:
        kinds = _launch_kinds(*tensors)
        assert kinds > len(pairings) * len(formats)  # aligned and unaligned launches both
        assert launches.counts == {"step": kinds, "count": kinds}


def _misaligned(tensor: torch.Tensor) -> torch.Tensor:
    """The same values at an address off 16-byte boundaries (a view one element into a buffer)."""
    buffer = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    view = buffer[1:].view(tensor.shape)
    view.copy_(tensor)
    return view


@every_backend
def test_tensors_off_16_byte_boundaries_take_the_other_launch(backend, launches):
    """numel % 16 == 0 but a param, grad or momentum one element into its buffer: the launch
    without the alignment hint (on a GPU the hint would make 128-bit accesses fault)."""
    generator = torch.Generator().manual_seed(22)
    params, grads, entries, formats = batch(
        [4096, 2048], generator, pairings=PAIRINGS[:2], formats=["8bit", "fp32"]
    )
    params[0], grads[1] = _misaligned(params[0]), _misaligned(grads[1])
    entries[2][mom.MOMENTUM_CODES] = _misaligned(entries[2][mom.MOMENTUM_CODES])
    oracle = copies(params, entries)
    group = group_of(0.3, 1.0, False, False, False, True)
    if launches:
        launches.reset()
    lion(params, grads, entries, formats, scalars=lion_scalars(group), block_size=quant.BLOCK_SIZE,
         stochastic_rounding=True, backend=backend)
    reference_steps(*oracle[:1], grads, oracle[1], formats, group)
    assert_same_state(params, entries, *oracle, formats)
    if launches:  # 4 kinds, 3 of them also off the boundaries
        assert launches.counts["step"] == _launch_kinds(params, grads, entries, formats) == 7


def _step_some(backend, params, grads, entries, formats, oracle, present, group):
    """One optimizer-like step of the tensors whose grad is present: their step counts advance
    and they go into one call; the others must not change."""
    for index in present:
        entries[index][mom.STEP] += 1
        oracle[1][index][mom.STEP] += 1
    pick = lambda items: [items[i] for i in present]  # noqa: E731
    lion(pick(params), pick(grads), pick(entries), pick(formats), scalars=lion_scalars(group),
         block_size=quant.BLOCK_SIZE, stochastic_rounding=True, backend=backend)
    reference_steps(pick(oracle[0]), pick(grads), pick(oracle[1]), pick(formats), group)
    assert_same_state(params, entries, *oracle, formats)


@every_backend
def test_tensors_joining_and_leaving_between_steps(backend, launches):
    """Grads that appear and vanish (a param whose grad is None on some steps): each step's call
    holds only the present tensors; "triton" builds a table for a new set of tensors and takes
    the cached one when a set comes back."""
    generator = torch.Generator().manual_seed(23)
    params, grads, entries, formats = batch(
        [300, 4096], generator, pairings=PAIRINGS[1:3], formats=["8bit", "bf16"]
    )
    oracle = copies(params, entries)
    group = group_of(0.3, 0.5, False, False, False, True)
    everyone = list(range(len(params)))
    schedule = [everyone, everyone[::2], everyone[1:], everyone[::2], everyone]
    builds = []
    for present in schedule:
        before = launches.reset() if launches else 0
        _step_some(backend, params, grads, entries, formats, oracle, present, group)
        builds.append(launches.tables.builds - before if launches else None)
    if launches:
        assert builds[0] > 0 and builds[1] > 0 and builds[2] > 0
        assert builds[3] == 0 and builds[4] == 0  # the sets of steps 1 and 0 again: cached tables


@every_backend
def test_a_moved_storage_builds_a_new_table_and_fresh_wrappers_do_not(backend, launches):
    """A param re-allocated (load_state_dict, a resize) and a grad that came back at a new
    address (zero_grad(set_to_none=True)): the next step must write the new storages. Fresh
    Python wrappers of the same storages (param.data, DTensor.to_local()) are the same table."""
    generator = torch.Generator().manual_seed(24)
    params, grads, entries, formats = batch([300, 4097], generator, pairings=PAIRINGS[:2], formats=["8bit"])
    oracle = copies(params, entries)
    group = group_of(0.0, 1.0, False, False, False, True)
    everyone = list(range(len(params)))
    _step_some(backend, params, grads, entries, formats, oracle, everyone, group)

    moved = params[1].clone()  # allocated while the old one lives: another address
    assert moved.data_ptr() != params[1].data_ptr()
    params[1] = moved
    grads[0] = grads[0] * 0.5  # new values at a new address
    before = launches.reset() if launches else 0
    _step_some(backend, params, grads, entries, formats, oracle, everyone, group)
    if launches:
        assert launches.tables.builds - before == 2  # the two launches whose tensors moved

    params = [param.detach() for param in params]  # new wrappers, the same storages
    before = launches.reset() if launches else 0
    _step_some(backend, params, grads, entries, formats, oracle, everyone, group)
    if launches:
        assert launches.tables.builds == before
