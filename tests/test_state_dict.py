"""state_dict / load_state_dict: exact resume, dtypes kept, weights_only loads, loud failures."""

import copy
import io

import pytest
import torch

from lion8bit import Lion, quant
from lion8bit import momentum as mom

from helpers import native_cpu_backends

STATE_KINDS = list(mom.STATE_KINDS)
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    # 80x80 = 6400 elements is 8-bit at min_8bit_size 4096 (25 blocks, the last partial);
    # the bias (80) stays fp32 under "8bit".
    model = torch.nn.Sequential(torch.nn.Linear(80, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3))
    return model.to(dtype)


def train(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 80, generator=generator).to(dtype)
        optimizer.zero_grad()
        model(x).float().square().mean().backward()
        optimizer.step()


def save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def snapshot(optimizer):
    return copy.deepcopy({"state": dict(optimizer.state), "groups": optimizer.param_groups})


def assert_same_state(a, b):
    assert len(a.state) == len(b.state)
    for pa, pb in zip(
        [p for g in a.param_groups for p in g["params"]], [p for g in b.param_groups for p in g["params"]], strict=True
    ):
        ea, eb = a.state[pa], b.state[pb]
        assert ea.keys() == eb.keys()
        for key in ea:
            if isinstance(ea[key], torch.Tensor):
                assert ea[key].dtype == eb[key].dtype, key
                assert torch.equal(ea[key], eb[key]), key
            else:
                assert ea[key] == eb[key], key


@pytest.mark.parametrize("state", STATE_KINDS)
@pytest.mark.parametrize("dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("stochastic_rounding", [False, True])
@pytest.mark.parametrize("backend", native_cpu_backends())  # "triton": tests/test_triton_kernel.py
def test_resume_is_bit_exact(state, dtype, stochastic_rounding, backend):
    options = dict(
        lr=1e-3, weight_decay=0.1, state=state, stochastic_rounding=stochastic_rounding,
        cautious_factor=0.5, backend=backend,
    )
    straight = make_model(dtype)
    straight_opt = Lion(straight.parameters(), **options)
    train(straight, straight_opt, 6, seed=1)
    train(straight, straight_opt, 6, seed=2)

    first = make_model(dtype)
    first_opt = Lion(first.parameters(), **options)
    train(first, first_opt, 6, seed=1)
    checkpoint = save_and_load({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    del first, first_opt

    resumed = make_model(dtype, seed=99)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = Lion(resumed.parameters(), **options)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, 6, seed=2)

    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same_state(straight_opt, resumed_opt)


def test_resume_with_decoupled_weight_decay_under_an_lr_schedule_is_bit_exact():
    """decoupled_weight_decay divides by the lr at construction (decoupled_initial_lr); the
    checkpoint is saved when the schedule has moved lr, so a load that took the saved lr as the
    initial one would change the decay of every later step."""
    options = dict(lr=2e-3, weight_decay=1e-3, decoupled_weight_decay=True)

    def scheduled(model):
        optimizer = Lion(model.parameters(), **options)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def run(model, optimizer, schedule, steps, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(16, 80, generator=generator)).square().mean().backward()
            optimizer.step()
            schedule.step()

    straight = make_model()
    straight_opt, straight_schedule = scheduled(straight)
    run(straight, straight_opt, straight_schedule, 3, seed=1)
    run(straight, straight_opt, straight_schedule, 3, seed=2)

    first = make_model()
    first_opt, first_schedule = scheduled(first)
    run(first, first_opt, first_schedule, 3, seed=1)
    assert first_opt.param_groups[0]["lr"] != first_opt.param_groups[0]["decoupled_initial_lr"]
    checkpoint = save_and_load(
        {"model": first.state_dict(), "optimizer": first_opt.state_dict(), "schedule": first_schedule.state_dict()}
    )
    resumed = make_model(seed=99)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt, resumed_schedule = scheduled(resumed)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    resumed_schedule.load_state_dict(checkpoint["schedule"])
    run(resumed, resumed_opt, resumed_schedule, 3, seed=2)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_opt.param_groups[0]["decoupled_initial_lr"] == 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dtypes_survive_loading(dtype):
    model = make_model(dtype)
    optimizer = Lion(model.parameters(), lr=1e-3, state="8bit")
    train(model, optimizer, 2, seed=1)
    bf16_model = make_model(torch.float32)
    bf16_opt = Lion(bf16_model.parameters(), lr=1e-3, state="bf16")
    train(bf16_model, bf16_opt, 2, seed=1)

    for source_model, source_opt in [(model, optimizer), (bf16_model, bf16_opt)]:
        loaded = Lion(source_model.parameters(), lr=1e-3, state=source_opt.param_groups[0]["state"])
        loaded.load_state_dict(save_and_load(source_opt.state_dict()))
        assert_same_state(source_opt, loaded)
    weight, bias = model[0].weight, model[0].bias
    assert optimizer.state[weight][mom.MOMENTUM_CODES].dtype == torch.uint8
    assert optimizer.state[weight][mom.MOMENTUM_ABSMAX].dtype == torch.float32
    assert optimizer.state[bias][mom.MOMENTUM].dtype == torch.float32  # under min_8bit_size
    assert bf16_opt.state[bf16_model[0].weight][mom.MOMENTUM].dtype == torch.bfloat16


def test_loaded_state_is_a_copy():
    model = make_model()
    optimizer = Lion(model.parameters(), lr=1e-3)
    train(model, optimizer, 2, seed=1)
    state_dict = optimizer.state_dict()
    other = Lion(model.parameters(), lr=1e-3)
    other.load_state_dict(state_dict)
    codes = other.state[model[0].weight][mom.MOMENTUM_CODES]
    assert codes.data_ptr() != optimizer.state[model[0].weight][mom.MOMENTUM_CODES].data_ptr()


def test_hyperparameters_come_from_the_checkpoint_but_not_the_backend():
    model = make_model()
    optimizer = Lion(model.parameters(), lr=3e-4, betas=(0.95, 0.98), weight_decay=0.2)
    train(model, optimizer, 1, seed=1)
    other = Lion(model.parameters(), lr=1.0, backend="torch")
    other.load_state_dict(optimizer.state_dict())
    group = other.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (3e-4, (0.95, 0.98), 0.2)
    assert group["backend"] == "torch"


def _trained(**options):
    model = make_model()
    optimizer = Lion(model.parameters(), lr=1e-3, **options)
    train(model, optimizer, 2, seed=1)
    return model, optimizer


@pytest.mark.parametrize(
    "saved, loading, message",
    [
        (dict(state="8bit"), dict(state="bf16"), "state="),
        (dict(state="8bit"), dict(state="4bit"), "state="),
        (dict(state="4bit"), dict(state="8bit"), "state="),
        (dict(block_size=128), dict(block_size=256), "block_size="),
        (dict(min_8bit_size=100), dict(min_8bit_size=4096), "min_8bit_size="),
    ],
)
def test_another_format_is_rejected(saved, loading, message):
    model, optimizer = _trained(**saved)
    other = Lion(model.parameters(), lr=1e-3, **loading)
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(optimizer.state_dict())


def test_a_checkpoint_saved_at_lr_zero_loads():
    """A warmup from lr 0 saved at its first step; a new group with lr 0 is still refused."""
    model, optimizer = _trained()
    optimizer.param_groups[0]["lr"] = 0.0
    other = Lion(model.parameters(), lr=1e-3)
    other.load_state_dict(optimizer.state_dict())
    assert other.param_groups[0]["lr"] == 0.0
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][0]["lr"] = -1e-3
    with pytest.raises(ValueError, match="Invalid learning rate"):
        other.load_state_dict(saved)


def test_another_model_is_rejected_naming_the_parameter():
    _, optimizer = _trained()
    wider = torch.nn.Sequential(torch.nn.Linear(80, 96), torch.nn.Tanh(), torch.nn.Linear(96, 3))
    other = Lion(wider.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] of shape \(96, 80\)"):
        other.load_state_dict(optimizer.state_dict())
    fewer = Lion(list(wider.parameters())[:2], lr=1e-3)
    with pytest.raises(ValueError, match="2 parameters"):
        fewer.load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda e: e.update({mom.MOMENTUM_ABSMAX: e[mom.MOMENTUM_ABSMAX][:-1]}), "momentum_absmax has shape"),
        (lambda e: e.update({mom.MOMENTUM_ABSMAX: e[mom.MOMENTUM_ABSMAX].half()}), "fp32"),
        (lambda e: e.update({mom.MOMENTUM_CODES: e[mom.MOMENTUM_CODES].float()}), "uint8"),
        (lambda e: e.update({mom.MOMENTUM_CODES: e[mom.MOMENTUM_CODES][:10]}), "momentum_codes has shape"),
        (lambda e: e.update({mom.STEP: -1}), "step"),
        (lambda e: e.update({"exp_avg_sq": torch.zeros(1)}), "unknown state keys"),
    ],
    ids=["short-absmax", "fp16-absmax", "float-codes", "truncated-codes", "negative-step", "extra-key"],
)
def test_corrupted_state_is_rejected_and_nothing_changes(corrupt, message):
    _, source = _trained()
    state_dict = copy.deepcopy(source.state_dict())
    corrupt(state_dict["state"][0])  # the first Linear's weight: 8-bit state
    target_model, target = _trained()
    train(target_model, target, 1, seed=5)
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state_dict)
    after = snapshot(target)
    assert before["groups"][0]["lr"] == after["groups"][0]["lr"]
    assert len(before["state"]) == len(after["state"])
    for entry_before, entry_after in zip(before["state"].values(), after["state"].values(), strict=True):
        assert entry_before.keys() == entry_after.keys()
        for key, value in entry_before.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, entry_after[key])
            else:
                assert value == entry_after[key]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda e: e.update({mom.MOMENTUM_CODES: e[mom.MOMENTUM_CODES][:-1]}), "momentum_codes has shape"),
        (lambda e: e.update({mom.MOMENTUM_CODES: e[mom.MOMENTUM_CODES].view(50, -1)}), "momentum_codes has shape"),
        (lambda e: e.update({mom.MOMENTUM_ABSMAX: e[mom.MOMENTUM_ABSMAX][:-1]}), "momentum_absmax has shape"),
        # an fp32 absmax is the 8-bit format's: the codes would be read as the wrong format
        (lambda e: e.update({mom.MOMENTUM_ABSMAX: e[mom.MOMENTUM_ABSMAX].float()}), "holds '8bit'"),
    ],
    ids=["truncated-codes", "codes-reshaped", "short-absmax", "fp32-absmax"],
)
def test_corrupted_4bit_state_is_rejected(corrupt, message):
    _, source = _trained(state="4bit")
    state_dict = copy.deepcopy(source.state_dict())
    assert state_dict["state"][0][mom.MOMENTUM_ABSMAX].dtype == torch.bfloat16  # the first weight: 4-bit state
    corrupt(state_dict["state"][0])
    _, target = _trained(state="4bit")
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state_dict)


# -- what the 4-bit codes mean (quant.LEVELS_4BIT_KEY) -------------------------------------------


def test_4bit_checkpoints_record_their_levels_and_other_levels_are_refused():
    """A 4-bit group's codes mean the levels its param group names; a state dict without the key
    (the square-root levels of the first 4-bit release) or with other levels is refused, naming
    the group, before anything changes. 8-bit checkpoints from before the key still load."""
    _, source = _trained(state="4bit")
    saved = source.state_dict()
    assert saved["param_groups"][0][quant.LEVELS_4BIT_KEY] == quant.LEVELS_4BIT
    target_model, target = _trained(state="4bit")
    train(target_model, target, 1, seed=5)
    before = snapshot(target)
    for levels, message in ((None, "the square-root levels"), ("sqrt", "levels 'sqrt'")):
        legacy = copy.deepcopy(saved)
        legacy["param_groups"][0].pop(quant.LEVELS_4BIT_KEY)
        if levels is not None:
            legacy["param_groups"][0][quant.LEVELS_4BIT_KEY] = levels
        with pytest.raises(ValueError, match=rf"param_groups\[0\]: its 4-bit momentum codes mean {message}"):
            target.load_state_dict(legacy)
    after = snapshot(target)
    for entry_before, entry_after in zip(before["state"].values(), after["state"].values(), strict=True):
        assert all(torch.equal(v, entry_after[k]) for k, v in entry_before.items() if isinstance(v, torch.Tensor))
    target.load_state_dict(saved)
    assert_same_state(target, source)
    _, eight_bit = _trained(state="8bit")
    old = copy.deepcopy(eight_bit.state_dict())
    old["param_groups"][0].pop(quant.LEVELS_4BIT_KEY)
    other_model, other = _trained(state="8bit")
    other.load_state_dict(old)
    assert other.param_groups[0][quant.LEVELS_4BIT_KEY] == quant.LEVELS_4BIT


def test_an_unpickled_4bit_optimizer_from_before_the_levels_key_is_refused():
    model, optimizer = _trained(state="4bit")
    state = copy.copy(optimizer.__getstate__())
    state["param_groups"] = [dict(group) for group in state["param_groups"]]
    state["param_groups"][0].pop(quant.LEVELS_4BIT_KEY)
    restored = Lion.__new__(Lion)
    with pytest.raises(ValueError, match="square-root levels"):
        restored.__setstate__(state)
    state["param_groups"][0][quant.LEVELS_4BIT_KEY] = quant.LEVELS_4BIT
    restored.__setstate__(state)
    assert restored.param_groups[0][quant.LEVELS_4BIT_KEY] == quant.LEVELS_4BIT
