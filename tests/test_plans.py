"""Step plans (lion8bit/plans.py): a planned step equals the full path's step, bit for bit, after
every change a plan must notice, and the plan is used in the steady state it exists for.

Each case runs two optimizers in lockstep on copies of the same params: one as shipped, one whose
plans are switched off (every step takes the full path), applies the same change to both and
compares params and state exactly; errors must be the full path's, with nothing changed.
"""

import copy

import pytest
import torch

from lion8bit import Lion, kernels, plans
from lion8bit import momentum as mom

pytestmark = pytest.mark.skipif(not kernels.available("cpu"), reason="plans are made for the CPU backend")


class Unplanned(Lion):
    """Lion without plans: every step is the full path's."""

    _plans = property(lambda self: None, lambda self, value: None)


@pytest.fixture
def planned_steps(monkeypatch):
    """How many group steps went through a plan."""
    calls = []
    run = plans._Plan.run
    monkeypatch.setattr(plans._Plan, "run", lambda self, *args: (calls.append(1), run(self, *args))[1])
    return calls


def make(cls, dtypes=(torch.float32,) * 4, shapes=((8, 8),) * 4, **options):
    generator = torch.Generator().manual_seed(1)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
        for dtype, shape in zip(dtypes, shapes, strict=True)
    ]
    for p in params:
        p.grad_dtype = None  # torch >= 2.10 refuses a grad of another dtype unless allowed
    options = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=32, backend="cpu") | options
    return params, cls(params, **options)


def set_grads(params, seed, dtype=None):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(dtype or p.dtype)


def assert_same(a, b):
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    for x, y in zip(pa, pb, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
        ea, eb = a.state.get(x, {}), b.state.get(y, {})
        assert ea.keys() == eb.keys()
        for key in ea:
            same = torch.equal(ea[key], eb[key]) if isinstance(ea[key], torch.Tensor) else ea[key] == eb[key]
            assert same, key


def lockstep(change, every_step=False, **options):
    """Steps both optimizers 6 times; before step 3 (and every later one with ``every_step``)
    ``change(params, optimizer, seed)`` replaces setting the grads, on each optimizer alike."""
    pairs = [make(Lion, **options), make(Unplanned, **options)]
    for seed in range(6):
        for params, optimizer in pairs:
            if seed == 3 or (every_step and seed > 3):
                change(params, optimizer, seed)
            else:
                set_grads(params, seed)
            optimizer.step()
    assert_same(pairs[0][1], pairs[1][1])
    return pairs[0][1]


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(shapes=((8, 8), (3,), (8, 8), (0,))),  # 8-bit and fp32 (under min_8bit_size) in one group
        dict(state="bf16", dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.bfloat16)),
        dict(state="fp32", maximize=True, cautious_weight_decay=True, decoupled_weight_decay=True),
        # Keyed steps: the kernel makes the full path's keys from the seeds' bases and step counts.
        # 4-bit (nearest-rounded params, as without the option), fp32 under min_8bit_size, empty:
        dict(state="4bit", dtypes=(torch.bfloat16, torch.float32, torch.float16, torch.float32),
             shapes=((8, 8), (3,), (8, 8), (0,))),
        # stochastic rounding of bf16 params and bf16 momentum; 8-bit codes and 4-bit ones with it
        dict(state="bf16", stochastic_rounding=True,
             dtypes=(torch.bfloat16, torch.float32, torch.bfloat16, torch.float16)),
        dict(stochastic_rounding=True, dtypes=(torch.bfloat16,) * 4),
        dict(state="4bit", stochastic_rounding=True, dtypes=(torch.bfloat16,) * 4),
    ],
    ids=["8bit", "mixed", "bf16", "fp32", "4bit", "sr-bf16", "sr-8bit", "sr-4bit"],
)
def test_steady_steps_are_planned_and_exact(planned_steps, options):
    lockstep(lambda params, optimizer, seed: set_grads(params, seed), **options)
    assert len(planned_steps) == 5  # the first step collects; the other 5 are planned


@pytest.mark.parametrize("options", [dict(state="4bit"), dict(stochastic_rounding=True)], ids=["4bit", "sr"])
def test_keys_follow_each_tensors_own_step_count(planned_steps, options):
    # Param 1 has no grad for the first 3 steps, so its step count stays 3 behind the others'
    # in the planned steps after: keys made from one count for the whole group would differ.
    pairs = [make(cls, dtypes=(torch.bfloat16,) * 4, **options) for cls in (Lion, Unplanned)]
    for seed in range(8):
        for params, optimizer in pairs:
            set_grads(params, seed)
            if seed < 3:
                params[1].grad = None
            optimizer.step()
    assert_same(pairs[0][1], pairs[1][1])
    state = pairs[0][1].state
    assert [state[p][mom.STEP] for p in pairs[0][0]] == [8, 5, 8, 8]
    assert len(planned_steps) == 6  # steps 0 and 3 (param 1's grad appears) collect


def test_a_grad_that_vanishes_or_appears_is_seen():
    def vanish(params, optimizer, seed):
        set_grads(params, seed)
        params[1].grad = None

    optimizer = lockstep(vanish)
    assert optimizer.state[optimizer.param_groups[0]["params"][1]][mom.STEP] == 5

    def appear_vanish(params, optimizer, seed):
        set_grads(params, seed)
        if seed % 2:
            params[2].grad = None

    lockstep(appear_vanish, every_step=True)


def test_fp32_grads_of_bf16_params_and_back():
    def mixed(params, optimizer, seed):
        set_grads(params, seed, torch.float32 if seed % 2 else None)

    lockstep(mixed, every_step=True, dtypes=(torch.bfloat16,) * 4)


@pytest.mark.parametrize(
    "edit",
    [
        lambda group, params: group.update(lr=0.5),
        lambda group, params: group.update(lr=torch.tensor(0.5)),
        lambda group, params: group.update(state="bf16"),
        lambda group, params: group.update(state="4bit"),
        lambda group, params: group.update(min_8bit_size=4096),
        lambda group, params: group.update(stochastic_rounding=True),
        lambda group, params: group.update(skip_nonfinite=True),
        lambda group, params: group.update(maximize=True),
        lambda group, params: group.update(cautious_factor=0.5),
        lambda group, params: group["params"].pop(0),
        lambda group, params: group["params"].reverse(),
        lambda group, params: group.update(params=group["params"][:2]),
    ],
    ids=[
        "lr", "tensor-lr", "state", "state-4bit", "min_8bit_size", "sr", "skip", "maximize", "cautious", "pop",
        "reverse", "new-list",
    ],
)
def test_an_edited_group_is_seen(edit):
    def change(params, optimizer, seed):
        edit(optimizer.param_groups[0], params)
        set_grads(params, seed)

    lockstep(change)


def test_an_added_group_and_a_loaded_state_are_seen():
    def add(params, optimizer, seed):
        extra = torch.nn.Parameter(torch.ones(8, 8))
        optimizer.add_param_group({"params": [extra], "state": "fp32"})
        set_grads([*params, extra], seed)

    lockstep(add)

    def load(params, optimizer, seed):
        state = copy.deepcopy(optimizer.state_dict())
        state["state"][0][mom.STEP] = 7
        optimizer.load_state_dict(state)
        set_grads(params, seed)

    lockstep(load)


@pytest.mark.parametrize(
    "edit",
    [
        lambda optimizer, p: optimizer.state.__setitem__(p, {}),
        lambda optimizer, p: optimizer.state[p].clear(),
        lambda optimizer, p: optimizer.state.pop(p),
        lambda optimizer, p: optimizer.state[p].update(
            {mom.MOMENTUM_CODES: torch.full_like(optimizer.state[p][mom.MOMENTUM_CODES], 200)}
        ),
        lambda optimizer, p: optimizer.state[p][mom.MOMENTUM_ABSMAX].fill_(3.0),
    ],
    ids=["new-entry", "cleared", "popped", "new-codes", "absmax-in-place"],
)
def test_an_edited_state_entry_is_seen(edit):
    def change(params, optimizer, seed):
        edit(optimizer, optimizer.param_groups[0]["params"][0])
        set_grads(params, seed)

    lockstep(change)


def test_an_edited_seed_is_seen():
    def change(params, optimizer, seed):
        optimizer.state[params[0]][mom.SR_SEED] = 12345
        set_grads(params, seed)

    lockstep(change, state="4bit")


@pytest.mark.parametrize(
    "swap",
    [
        lambda p: torch.randn(8, 8),
        lambda p: p.data.clone(),
        lambda p: p.data.to(torch.bfloat16),
        lambda p: p.data.t(),  # not contiguous: staged
    ],
    ids=["new", "copy", "bf16", "transposed"],
)
def test_a_param_data_swap_is_seen(swap):
    def change(params, optimizer, seed):
        torch.manual_seed(seed)
        params[0].data = swap(params[0])
        set_grads(params, seed)

    lockstep(change)


@pytest.mark.parametrize(
    "bad, error",
    [
        (lambda p: p.grad.data.view(64), "has shape"),  # p.grad = ... would refuse it
        (lambda p: torch.ones(8, 8, dtype=torch.float64), "has dtype"),
        (lambda p: torch.ones(8, 8).to_sparse(), "sparse"),
    ],
    ids=["shape", "dtype", "sparse"],
)
def test_a_bad_grad_raises_the_full_paths_error_and_changes_nothing(bad, error):
    params, optimizer = make(Lion)
    for seed in range(3):
        set_grads(params, seed)
        optimizer.step()
    before = copy.deepcopy((params, dict(optimizer.state)))
    grad = bad(params[3])
    if grad.shape == params[3].shape:
        params[3].grad = grad
    else:
        params[3].grad.data = grad
    with pytest.raises(RuntimeError, match=error):
        optimizer.step()
    for p, q in zip(params, before[0], strict=True):
        codes = optimizer.state[p][mom.MOMENTUM_CODES]
        assert torch.equal(p, q) and torch.equal(codes, before[1][q][mom.MOMENTUM_CODES])
        assert optimizer.state[p][mom.STEP] == 3


def test_a_param_reshaped_behind_its_grad_raises():
    params, optimizer = make(Lion)
    for seed in range(3):
        set_grads(params, seed)
        optimizer.step()
    params[0].data = params[0].data.view(64)  # same address, dtype and size: only the shape tells
    with pytest.raises(RuntimeError, match="has shape"):
        optimizer.step()
    assert optimizer.state[params[0]][mom.STEP] == 3


def test_a_failing_second_group_leaves_the_first_unstepped():
    params, optimizer = make(Lion)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(8, 8))]})
    extra = optimizer.param_groups[1]["params"][0]
    for seed in range(3):
        set_grads([*params, extra], seed)
        optimizer.step()
    before = params[0].detach().clone()
    extra.grad.data = extra.grad.data.view(64)  # extra.grad = ... would refuse it
    with pytest.raises(RuntimeError, match="has shape"):
        optimizer.step()
    assert torch.equal(params[0], before) and optimizer.state[params[0]][mom.STEP] == 3


def test_a_replaced_group_dict_is_seen():
    def replace(params, optimizer, seed):
        optimizer.param_groups[0] = dict(optimizer.param_groups[0], lr=0.5)
        set_grads(params, seed)

    lockstep(replace)


def test_a_backend_that_resolves_elsewhere_is_seen(monkeypatch, planned_steps):
    params, optimizer = make(Lion, backend="auto")
    for seed in range(3):
        set_grads(params, seed)
        optimizer.step()
    assert len(planned_steps) == 2
    monkeypatch.setitem(kernels._LOADED, "cpu", kernels.UnavailableBackend("not here"))
    optimizer.step()
    assert len(planned_steps) == 2, "auto means torch now"


def test_a_copied_optimizer_makes_its_own_plans():
    """deepcopy / unpickling go through __setstate__: the copy steps its own params exactly."""
    params, optimizer = make(Lion)
    set_grads(params, 0)
    optimizer.step()
    copied = copy.deepcopy(optimizer)
    copied_params = copied.param_groups[0]["params"]
    for seed in range(1, 4):
        set_grads(params, seed)
        set_grads(copied_params, seed)
        optimizer.step()
        copied.step()
    assert_same(optimizer, copied)
