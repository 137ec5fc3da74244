"""Faults: non-finite grads, failed steps, checkpoints read back in a fresh process."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lion8bit import Lion, kernels, quant
from lion8bit import momentum as mom

from helpers import native_cpu_backends

OPTIONS = dict(lr=1e-3, weight_decay=0.1, cautious_factor=0.5, stochastic_rounding=True)


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(72, 72), torch.nn.Tanh(), torch.nn.Linear(72, 4)).to(dtype)


def snapshot(net, optimizer):
    return copy.deepcopy([p.detach() for p in net.parameters()]), copy.deepcopy(dict(optimizer.state))


def assert_unchanged(before, net, optimizer, ignore=(mom.STEP, mom.NONFINITE_SKIPS)):
    params, state = before
    for old, new in zip(params, net.parameters(), strict=True):
        assert torch.equal(old, new.detach())
    for (_, entry_old), (_, entry_new) in zip(state.items(), optimizer.state.items(), strict=True):
        for key, value in entry_old.items():
            if key in ignore:
                continue
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, entry_new[key]), key
            else:
                assert value == entry_new[key], key


def grads_for(net, seed, poison=None):
    generator = torch.Generator().manual_seed(seed)
    for index, p in enumerate(net.parameters()):
        p.grad = (torch.randn(p.shape, generator=generator) * 0.01).to(p.dtype)
        if poison is not None and index == 2:
            p.grad.view(-1)[1] = poison


# -- GradScaler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", mom.STATE_KINDS)
def test_grad_scaler_skips_a_step_with_inf_grads_leaving_params_and_momentum_bit_identical(state):
    net = model()
    optimizer = Lion(net.parameters(), **OPTIONS, state=state)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(32, 72)

    def loss():
        with torch.autocast("cpu", dtype=torch.float16):
            return net(x).float().square().mean()

    for _ in range(2):  # state exists and the momentum is non-zero
        optimizer.zero_grad()
        scaler.scale(loss()).backward()
        scaler.step(optimizer)
        scaler.update()
    before = snapshot(net, optimizer)
    steps_before = [e[mom.STEP] for e in optimizer.state.values()]
    optimizer.zero_grad()
    scaler.scale(loss()).backward()
    next(net.parameters()).grad.view(-1)[3] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert_unchanged(before, net, optimizer, ignore=())
    assert [e[mom.STEP] for e in optimizer.state.values()] == steps_before
    assert scaler.get_scale() == 2.0**9, "the scaler saw the inf and backed off"
    optimizer.zero_grad()
    scaler.scale(loss()).backward()
    scaler.step(optimizer)
    assert not torch.equal(before[0][0], next(net.parameters()).detach()), "a finite step moves again"


# -- skip_nonfinite ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", native_cpu_backends())
@pytest.mark.parametrize("state", mom.STATE_KINDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_skip_nonfinite_skips_the_whole_step_and_counts_it(backend, state, poison):
    net, clean = model(), model()
    # Without stochastic rounding: its position (step) moves on at a skipped step, so with it the
    # two runs below would round differently afterwards.
    options = dict(OPTIONS, stochastic_rounding=False, state=state, backend=backend, skip_nonfinite=True)
    optimizer = Lion(net.parameters(), **options)
    reference = Lion(clean.parameters(), **options)
    for seed in range(2):
        for n, o in ((net, optimizer), (clean, reference)):
            grads_for(n, seed)
            o.step()
    before = snapshot(net, optimizer)
    grads_for(net, 99, poison=poison)  # one bad element in one param: every param skips
    optimizer.step()
    assert_unchanged(before, net, optimizer)
    assert all(int(e[mom.NONFINITE_SKIPS]) == 1 for e in optimizer.state.values())
    assert all(e[mom.STEP] == 3 for e in optimizer.state.values()), "step counts calls: no RNG key reused"
    if state == "4bit":  # it always rounds stochastically: the reference's keys must move on too
        for entry in reference.state.values():
            entry[mom.STEP] += 1
    for seed in (2, 3):  # afterwards the run goes on as if the bad step had not been offered
        for n, o in ((net, optimizer), (clean, reference)):
            grads_for(n, seed)
            o.step()
    for a, b in zip(net.parameters(), clean.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(int(e[mom.NONFINITE_SKIPS]) == 1 for e in optimizer.state.values())


def test_skip_nonfinite_survives_a_checkpoint():
    net = model()
    optimizer = Lion(net.parameters(), **OPTIONS, skip_nonfinite=True)
    grads_for(net, 0, poison=float("nan"))
    optimizer.step()
    loaded = Lion(net.parameters(), **OPTIONS, skip_nonfinite=True)
    loaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert all(int(e[mom.NONFINITE_SKIPS]) == 1 for e in loaded.state.values())
    assert all(e[mom.NONFINITE_SKIPS].dtype == torch.int64 for e in loaded.state.values())


@pytest.mark.parametrize("backend", native_cpu_backends())
def test_without_skip_a_nan_grad_freezes_its_momentum_block_as_documented(backend):
    """README "Guarantees": without skip_nonfinite or a GradScaler, a NaN grad element makes the
    momentum NaN (8-bit: its whole block of 256, through the NaN absmax); sign(NaN) = 0, so
    those params stop moving (they only decay) from then on. Nothing becomes NaN: silent."""
    p = torch.nn.Parameter(torch.randn(4096))
    optimizer = Lion([p], lr=1e-3, weight_decay=0.1, backend=backend)
    p.grad = torch.randn(4096) * 0.01
    optimizer.step()
    p.grad = torch.randn(4096) * 0.01
    p.grad[300] = float("nan")
    optimizer.step()
    entry = optimizer.state[p]
    momentum = quant.dequantize_blockwise(entry[mom.MOMENTUM_CODES], entry[mom.MOMENTUM_ABSMAX])
    assert torch.isnan(momentum[256:512]).all() and torch.isfinite(momentum[:256]).all()
    before = p.detach().clone()
    p.grad = torch.randn(4096) * 0.01
    optimizer.step()
    assert torch.isfinite(p).all()
    assert torch.equal(p[256:512], before[256:512] * (1 - 1e-3 * 0.1)), "only decayed"
    assert not torch.equal(p[:256], before[:256] * (1 - 1e-3 * 0.1)), "the other blocks move"


@pytest.mark.parametrize("backend", native_cpu_backends())
def test_without_skip_an_inf_grad_keeps_its_param_moving_one_way_as_documented(backend):
    p = torch.nn.Parameter(torch.randn(4096))
    optimizer = Lion([p], lr=1e-3, state="fp32", backend=backend)
    p.grad = torch.randn(4096) * 0.01
    p.grad[300] = float("inf")
    optimizer.step()
    for seed in range(3):
        before = p.detach().clone()
        p.grad = torch.randn(4096, generator=torch.Generator().manual_seed(seed)) * 0.01
        optimizer.step()
        assert p[300] == before[300] - torch.tensor(1e-3), "u = sign(inf) = +1 whatever the grad"
    assert torch.isinf(optimizer.state[p][mom.MOMENTUM][300])


# -- a failed step changes nothing ---------------------------------------------------------------


def test_a_step_that_fails_a_check_changes_nothing():
    first, second = torch.nn.Parameter(torch.randn(80, 80)), torch.nn.Parameter(torch.randn(80, 80))
    optimizer = Lion([first, second], lr=1e-3)
    for p in (first, second):
        p.grad = torch.randn_like(p)
    optimizer.step()
    before = [first.detach().clone(), second.detach().clone()], copy.deepcopy(dict(optimizer.state))
    second.grad = torch.randn(80, 80).to_sparse()  # the second param's grad is bad
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert torch.equal(first, before[0][0]) and optimizer.state[first][mom.STEP] == 1
    second.grad = torch.randn(80, 80)
    optimizer.param_groups[0]["backend"] = "triton"  # CPU tensors, no interpreter
    if kernels.available("triton") and not kernels.interpreting():
        with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
            optimizer.step()
        assert torch.equal(first, before[0][0]) and optimizer.state[first][mom.STEP] == 1


def test_a_grad_reshaped_behind_autograds_back_is_rejected_naming_the_param():
    """torch refuses p.grad of another shape or device on assignment, but p.grad.data = ...
    slips through; the step names the param."""
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    optimizer = Lion([p])
    p.grad.data = torch.randn(4)
    message = r"Gradient of param_groups\[0\]\['params'\]\[0\] of shape \(3,\) has shape \(4,\)"
    with pytest.raises(RuntimeError, match=message):
        optimizer.step()
    assert not optimizer.state


# -- checkpoints in a fresh process --------------------------------------------------------------

_RESUME = textwrap.dedent(
    """
    import sys, torch
    from lion8bit import Lion
    mode, path, backend = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(72, 72), torch.nn.Tanh(), torch.nn.Linear(72, 4)).bfloat16()
    options = dict(lr=1e-3, weight_decay=0.1, cautious_factor=0.5, stochastic_rounding=True, backend=backend)
    optimizer = Lion(net.parameters(), **options)

    def train(steps):
        for step in steps:
            g = torch.Generator().manual_seed(step)
            for p in net.parameters():
                p.grad = (torch.randn(p.shape, generator=g) * 0.01).bfloat16()
            optimizer.step()

    if mode == "write":
        train(range(5))
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, path + ".ckpt")
        train(range(5, 10))
        torch.save([p.detach() for p in net.parameters()], path + ".expected")
    else:
        checkpoint = torch.load(path + ".ckpt", weights_only=True)
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        train(range(5, 10))
        expected = torch.load(path + ".expected", weights_only=True)
        pairs = zip(expected, net.parameters(), strict=True)
        same = all(torch.equal(a.view(torch.int16), b.detach().view(torch.int16)) for a, b in pairs)
        print("identical" if same else "DIFFERENT")
    """
)


@pytest.mark.slow  # two fresh processes
@pytest.mark.parametrize("backend", native_cpu_backends())
def test_checkpoint_written_mid_training_resumes_bit_exactly_in_a_fresh_process(tmp_path, backend):
    script = tmp_path / "resume.py"
    script.write_text(_RESUME)
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for mode in ("write", "read"):
        result = subprocess.run(
            [sys.executable, str(script), mode, str(tmp_path / "run"), backend],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
        )
        assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "identical"
