"""The ways people really hold params and drive optimizers, each checked against a plain run."""

import copy

import pytest
import torch

from lion8bit import Lion
from lion8bit import momentum as mom

OPTIONS = dict(lr=1e-3, weight_decay=0.1, cautious_factor=0.5)


def contiguous_twin(params, **options):
    """The same values as plain contiguous params, with an optimizer on the reference backend."""
    twins = [torch.nn.Parameter(p.detach().clone().contiguous()) for p in params]
    return twins, Lion(twins, backend="torch", **{**OPTIONS, **options})


def set_grads(params, generator, every=None):
    for index, p in enumerate(params):
        if every is not None and index not in every:
            p.grad = None
            continue
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype) * 0.01


def assert_same(params, twins):
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p.detach().contiguous(), q.detach())


@pytest.mark.parametrize("state", mom.STATE_KINDS)
def test_noncontiguous_channels_last_and_views(state):
    storage = torch.randn(70, 90)
    params = [
        torch.nn.Parameter(torch.randn(90, 70).t()),  # transposed: non-contiguous
        torch.nn.Parameter(torch.randn(16, 8, 7, 7).to(memory_format=torch.channels_last)),
        torch.nn.Parameter(storage[5:65, 10:80]),  # a view into a larger storage, with an offset
        torch.nn.Parameter(torch.randn(0, 5)),  # zero-size
    ]
    assert not params[0].is_contiguous() and not params[2].is_contiguous()
    twins, twin_opt = contiguous_twin(params, state=state, min_8bit_size=1024)
    optimizer = Lion(params, **OPTIONS, state=state, min_8bit_size=1024)
    for step in range(4):
        set_grads(params, torch.Generator().manual_seed(step))
        set_grads(twins, torch.Generator().manual_seed(step))
        params[0].grad = params[0].grad.t().contiguous().t()  # a non-contiguous grad too
        optimizer.step()
        twin_opt.step()
    assert_same(params, twins)
    assert params[1].is_contiguous(memory_format=torch.channels_last), "layout kept"
    assert storage.data_ptr() == params[2].untyped_storage().data_ptr(), "updated in place"


def test_grads_only_on_some_steps_and_zero_grad_modes():
    params = [torch.nn.Parameter(torch.randn(70, 70)) for _ in range(3)]
    twins, twin_opt = contiguous_twin(params)
    optimizer = Lion(params, **OPTIONS)
    schedule = [{0, 1, 2}, {0}, {1, 2}, set(), {2}]
    for step, every in enumerate(schedule):
        set_grads(params, torch.Generator().manual_seed(step), every)
        set_grads(twins, torch.Generator().manual_seed(step), every)
        optimizer.step()
        twin_opt.step()
    assert_same(params, twins)
    assert [optimizer.state[p][mom.STEP] for p in params] == [2, 2, 3]

    # set_to_none=False keeps zero grads, and a zero grad is a step (the momentum still moves
    # the param); set_to_none=True leaves no grad, and the param is skipped.
    set_grads(params, torch.Generator().manual_seed(9))
    optimizer.zero_grad(set_to_none=False)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


def test_add_param_group_after_steps():
    first, second = torch.nn.Parameter(torch.randn(70, 70)), torch.nn.Parameter(torch.randn(70, 70))
    (twin_first, twin_second), _ = contiguous_twin([first, second])
    optimizer = Lion([first], **OPTIONS)
    twin_a = Lion([twin_first], backend="torch", **OPTIONS)
    twin_b = Lion([twin_second], backend="torch", **{**OPTIONS, "lr": 3e-3, "state": "bf16"})
    for step in range(6):
        if step == 3:
            optimizer.add_param_group({"params": [second], "lr": 3e-3, "state": "bf16"})
        set_grads([first, second], torch.Generator().manual_seed(step))
        set_grads([twin_first, twin_second], torch.Generator().manual_seed(step))
        optimizer.step()
        twin_a.step()
        if step >= 3:
            twin_b.step()
    assert_same([first, second], [twin_first, twin_second])
    assert optimizer.param_groups[1]["decoupled_initial_lr"] == 3e-3


@pytest.mark.parametrize("decoupled", [False, True])
def test_lr_scheduler_drives_lr_and_decoupled_decay(decoupled):
    params = [torch.nn.Parameter(torch.randn(70, 70))]
    optimizer = Lion(params, **OPTIONS, decoupled_weight_decay=decoupled)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=8)
    twins = [torch.nn.Parameter(params[0].detach().clone())]
    twin_opt = Lion(twins, backend="torch", **OPTIONS, decoupled_weight_decay=decoupled)
    assert optimizer.param_groups[0]["decoupled_initial_lr"] == OPTIONS["lr"], "not OneCycleLR's start"
    for step in range(8):
        # OneCycleLR drives lr and, through cycle_momentum, beta1: copy both to the twin.
        twin_opt.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
        twin_opt.param_groups[0]["betas"] = optimizer.param_groups[0]["betas"]
        set_grads(params, torch.Generator().manual_seed(step))
        set_grads(twins, torch.Generator().manual_seed(step))
        optimizer.step()
        twin_opt.step()
        scheduler.step()
    assert_same(params, twins)


# Inductor may fuse and reorder the forward's fp32 arithmetic differently from eager (a few ulps
# on outputs of magnitude ~0.1-1); one Lion step at lr 1e-3 moves the outputs by more than 1e-3.
COMPILED_OUTPUT_ATOL = 1e-5
STEP_MOVES_OUTPUTS_BY = 1e-3


@pytest.mark.slow  # Inductor compiles the model: ~15 s
def test_a_compiled_model_sees_every_update_and_its_grads_step_as_the_reference():
    """torch.compile(model) trained with Lion: each step updates the params the compiled graph
    reads (its next output is the eager model's on the new params, not a stale one), and the
    optimizer steps the compiled backward's own grads exactly as the reference would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.ReLU(), torch.nn.Linear(80, 64))
    compiled = torch.compile(model)
    optimizer = Lion(model.parameters(), **OPTIONS)
    twins, twin_optimizer = contiguous_twin(list(model.parameters()))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        optimizer.zero_grad()
        before = compiled(x)
        before.square().mean().backward()
        for p, q in zip(model.parameters(), twins, strict=True):
            q.grad = p.grad.clone()
        optimizer.step()
        twin_optimizer.step()
        assert_same(list(model.parameters()), twins)
        with torch.no_grad():
            after, eager = compiled(x), model(x)
        torch.testing.assert_close(after, eager, rtol=0, atol=COMPILED_OUTPUT_ATOL)
        assert (after - before.detach()).abs().max() > STEP_MOVES_OUTPUTS_BY


def test_deepcopy_of_the_optimizer_is_independent():
    params = [torch.nn.Parameter(torch.randn(70, 70))]
    optimizer = Lion(params, **OPTIONS)
    set_grads(params, torch.Generator().manual_seed(0))
    optimizer.step()
    clone = copy.deepcopy(optimizer)
    (cloned_param,) = clone.param_groups[0]["params"]
    assert cloned_param is not params[0]
    assert torch.equal(clone.state[cloned_param][mom.MOMENTUM_CODES], optimizer.state[params[0]][mom.MOMENTUM_CODES])
    set_grads([cloned_param], torch.Generator().manual_seed(1))
    before = optimizer.state[params[0]][mom.MOMENTUM_CODES].clone()
    clone.step()
    assert torch.equal(optimizer.state[params[0]][mom.MOMENTUM_CODES], before)
    assert clone.state[cloned_param][mom.STEP] == 2 and optimizer.state[params[0]][mom.STEP] == 1
