"""capturable=True: everything a step reads stays on the params' device (torch's meaning).

On CPU: a float64 tensor lr gives the bits of the same float lr, LR schedulers drive it, the
step counters are device tensors that advance in place, checkpoints resume exactly, and the
optimizer and functional never read a tensor on the host during a step. On a GPU: steps
captured in a CUDA graph and replayed give the eager steps' bits (skipped without one).
"""

import copy
import io
import sys

import pytest
import torch

from lion8bit import Lion, kernels
from lion8bit import momentum as mom

from helpers import native_cpu_backends

OPTIONS = dict(weight_decay=0.1, cautious_factor=0.5, stochastic_rounding=True)
LR = 1e-3


def _model(device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.ReLU(), torch.nn.Linear(80, 8))
    return model.to(device=device, dtype=torch.bfloat16)


def _set_grads(model, step):
    generator = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=generator) * 0.01).to(p.device, p.dtype)


def _assert_same(a, b, optimizer_a, optimizer_b):
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
        for key, value in optimizer_a.state[p].items():
            other = optimizer_b.state[q][key]
            if isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor):
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other).to(torch.as_tensor(value).device)), (
                    key
                )
            else:
                assert value == other, key


@pytest.mark.parametrize("backend", native_cpu_backends())
@pytest.mark.parametrize("state", ["8bit", "4bit", "bf16"])
def test_a_tensor_lr_under_a_schedule_gives_the_float_lr_bits(backend, state):
    plain_model, capturable_model = _model(), _model()
    plain = Lion(plain_model.parameters(), lr=LR, state=state, backend=backend, **OPTIONS)
    capturable = Lion(
        capturable_model.parameters(),
        lr=torch.tensor(LR, dtype=torch.float64),
        state=state,
        backend=backend,
        capturable=True,
        **OPTIONS,
    )
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (plain, capturable)]
    for step in range(4):
        for model, optimizer, schedule in zip(
            (plain_model, capturable_model), (plain, capturable), schedules, strict=True
        ):
            _set_grads(model, step)
            optimizer.step()
            schedule.step()
    lr = capturable.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == plain.param_groups[0]["lr"]
    entry = capturable.state[next(capturable_model.parameters())]
    assert isinstance(entry[mom.STEP], torch.Tensor) and int(entry[mom.STEP]) == 4
    _assert_same(plain_model, capturable_model, plain, capturable)


@pytest.mark.parametrize("backend", native_cpu_backends())
@pytest.mark.parametrize("state", ["8bit", "4bit"])
def test_capturable_state_resumes_exactly_and_keeps_its_device_counters(backend, state):
    options = dict(lr=torch.tensor(LR, dtype=torch.float64), state=state, backend=backend, capturable=True, **OPTIONS)
    straight_model = _model()
    straight = Lion(straight_model.parameters(), **copy.deepcopy(options))
    for step in range(4):
        _set_grads(straight_model, step)
        straight.step()
    first_model = _model()
    first = Lion(first_model.parameters(), **copy.deepcopy(options))
    for step in range(2):
        _set_grads(first_model, step)
        first.step()
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _model()
    resumed_model.load_state_dict(saved["model"])
    resumed = Lion(resumed_model.parameters(), **copy.deepcopy(options))
    resumed.load_state_dict(saved["optimizer"])
    assert all(isinstance(entry[mom.STEP], torch.Tensor) for entry in resumed.state.values())
    for step in range(2, 4):
        _set_grads(resumed_model, step)
        resumed.step()
    _assert_same(straight_model, resumed_model, straight, resumed)


_HOST_READS = ["item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"]


@pytest.mark.parametrize("backend", native_cpu_backends())
@pytest.mark.parametrize("state", ["8bit", "4bit"])
def test_a_capturable_step_reads_no_tensor_on_the_host(backend, state, monkeypatch):
    """On CUDA each of these would wait for the device. The CPU kernel's launcher reads CPU
    tensors by definition (no device to wait for), so calls from it are allowed."""
    allowed = ("cpu_lion.py",)
    calls = []

    def guard(name, original):
        def guarded(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "lion8bit" in caller and not caller.endswith(allowed):
                calls.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)

        return guarded

    model = _model()
    optimizer = Lion(
        model.parameters(),
        lr=torch.tensor(LR, dtype=torch.float64),
        state=state,
        backend=backend,
        capturable=True,
        **OPTIONS,
    )
    _set_grads(model, 0)
    optimizer.step()  # creating the state reads the lr once (a checkpointing step with lr 0 is not counted)
    with monkeypatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
        for step in range(1, 3):
            _set_grads(model, step)
            optimizer.step()
    assert calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("state", ["8bit", "4bit"])
def test_steps_captured_in_a_cuda_graph_replay_as_eager_steps(backend, state):
    if not kernels.available(backend):
        pytest.skip(f"backend={backend!r} is not available here")
    eager_model, graphed_model = _model("cuda"), _model("cuda")
    lr = dict(lr=torch.tensor(LR, dtype=torch.float64, device="cuda"), state=state)
    eager = Lion(eager_model.parameters(), backend=backend, capturable=True, **copy.deepcopy(lr), **OPTIONS)
    graphed = Lion(graphed_model.parameters(), backend=backend, capturable=True, **copy.deepcopy(lr), **OPTIONS)
    for model, optimizer in ((eager_model, eager), (graphed_model, graphed)):
        _set_grads(model, 0)
        optimizer.step()  # warm-up: the state exists before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _set_grads(graphed_model, 1)  # static grads the graph reads
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graphed.step()
    torch.cuda.current_stream().wait_stream(stream)
    _set_grads(eager_model, 1)
    eager.step()  # the step the capture recorded (capturing does not run it)
    graph.replay()
    for step in range(2, 5):
        _set_grads(eager_model, step)
        eager.step()
        for p, q in zip(eager_model.parameters(), graphed_model.parameters(), strict=True):
            q.grad.copy_(p.grad)
        graphed.param_groups[0]["lr"].fill_(eager.param_groups[0]["lr"])
        graph.replay()
    torch.cuda.synchronize()
    _assert_same(eager_model, graphed_model, eager, graphed)
