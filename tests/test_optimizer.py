"""The optimizer object: options, drop-in keywords, groups, torch conventions."""

import warnings

import pytest
import torch

import lion8bit
from lion8bit import Lion, Lion8bit, PagedLion8bit, quant
from lion8bit import momentum as mom


def param(*shape, dtype=torch.float32):
    p = torch.nn.Parameter(torch.randn(*shape).to(dtype))
    p.grad = torch.randn(*shape).to(dtype) * 0.01
    return p


def test_public_api():
    assert lion8bit.__all__ == ["Lion", "Lion8bit", "PagedLion8bit", "param_groups"]
    assert issubclass(Lion8bit, torch.optim.Optimizer)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(lr=0.0), ValueError, "Invalid learning rate"),
        (dict(lr=-1e-3), ValueError, "Invalid learning rate"),
        (dict(lr=float("nan")), ValueError, "Invalid learning rate"),
        (dict(lr=float("inf")), ValueError, "Invalid learning rate"),
        (dict(betas=(1.0, 0.99)), ValueError, "Invalid beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1"),
        (dict(betas=(0.9,)), ValueError, "Invalid betas"),
        (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay"),
        (dict(weight_decay=float("nan")), ValueError, "Invalid weight_decay"),
        (dict(cautious_factor=1.5), ValueError, "Invalid cautious_factor"),
        (dict(cautious_factor=-0.1), ValueError, "Invalid cautious_factor"),
        (dict(state="2bit"), ValueError, "Invalid state"),
        (dict(backend="cuda"), ValueError, "Invalid backend"),
        (dict(block_size=0), ValueError, "Invalid block_size"),
        (dict(block_size=100), ValueError, "Invalid block_size"),
        (dict(min_8bit_size=-1), ValueError, "Invalid min_8bit_size"),
        (dict(maximize="yes"), TypeError, "Invalid maximize"),
        (dict(skip_nonfinite=1), TypeError, "Invalid skip_nonfinite"),
        (dict(optim_bits=16), ValueError, "Invalid optim_bits"),
        (dict(optim_bits=32, state="bf16"), ValueError, "contradicts"),
        (dict(use_triton=True, backend="cpu"), ValueError, "contradicts"),
        (dict(args=object()), TypeError, "args="),
    ],
)
def test_invalid_options_raise_naming_the_option(options, error, message):
    with pytest.raises(error, match=message):
        Lion([param(3)], **options)


def test_invalid_per_group_option_names_the_group():
    with pytest.raises(ValueError, match=r"Invalid block_size in param_groups\[1\]"):
        Lion([{"params": [param(3)]}, {"params": [param(3)], "block_size": 3}])


def test_unsupported_params_are_rejected():
    with pytest.raises(ValueError, match="dtype"):
        Lion([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="dtype"):
        Lion([torch.nn.Parameter(torch.randn(3, dtype=torch.float64))])
    shared = param(3)
    with pytest.raises(ValueError, match="more than one parameter group"):
        Lion([{"params": [shared]}, {"params": [shared]}])


def test_bad_gradients_raise_naming_the_param():
    p = param(4, 4)
    optimizer = Lion([p])
    p.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(RuntimeError, match=r"sparse gradients.*\[0\]\['params'\]\[0\]"):
        optimizer.step()
    p.grad_dtype = None  # torch >= 2.10 refuses a grad of another dtype unless allowed
    p.grad = torch.randn(4, 4, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="dtype"):
        optimizer.step()


def test_drop_in_keywords():
    p = param(3)
    lion_pytorch_style = Lion(
        [p], lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, use_triton=False, decoupled_weight_decay=True
    )
    assert lion_pytorch_style.param_groups[0]["decoupled_weight_decay"] is True
    cautious_style = Lion([p], cautious_factor=0.0, cautious_wd=True)
    assert cautious_style.param_groups[0]["cautious_weight_decay"] is True
    bnb_style = Lion8bit([p], lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, min_8bit_size=16, is_paged=False)
    assert bnb_style.param_groups[0]["min_8bit_size"] == 16
    assert Lion([p], optim_bits=32).param_groups[0]["state"] == "fp32"
    assert Lion([p], optim_bits=8).param_groups[0]["state"] == "8bit"
    assert Lion([p], use_triton=True).param_groups[0]["backend"] == "triton"
    assert PagedLion8bit([p]).param_groups[0]["paged"] is True
    assert Lion([p], is_paged=True).param_groups[0]["paged"] is True


@pytest.mark.parametrize(
    "cls, forced", [(Lion8bit, dict(state="8bit")), (PagedLion8bit, dict(state="8bit", paged=True))]
)
def test_aliases_equal_lion_with_their_options(cls, forced):
    a, b = param(80, 80), param(80, 80)
    b.data.copy_(a.data)
    b.grad.copy_(a.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = cls([a], lr=1e-3, weight_decay=0.1), Lion([b], lr=1e-3, weight_decay=0.1, **forced)
        x.step()
        y.step()
    assert torch.equal(a, b)
    with pytest.raises(TypeError):
        cls([a], state="bf16")


def test_paged_on_cpu_warns_once_and_uses_ordinary_memory():
    params = [param(80, 80), param(80, 80)]
    optimizer = PagedLion8bit(params)
    with pytest.warns(UserWarning, match="paged=True needs CUDA") as record:
        optimizer.step()
        optimizer.step()
    assert len([w for w in record if "paged" in str(w.message)]) == 1
    assert optimizer.state[params[0]][mom.MOMENTUM_CODES].device.type == "cpu"


def test_step_returns_the_closure_loss_and_enables_grad():
    model = torch.nn.Linear(4, 1)
    optimizer = Lion(model.parameters())

    def closure():
        assert torch.is_grad_enabled()
        optimizer.zero_grad()
        loss = model(torch.ones(2, 4)).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert optimizer.step() is None


def test_params_without_grads_are_skipped_and_zero_size_is_fine():
    with_grad, without_grad, empty = param(5), param(5), param(0)
    without_grad.grad = None
    before = without_grad.detach().clone()
    optimizer = Lion([with_grad, without_grad, empty], lr=0.1)
    optimizer.step()
    assert torch.equal(without_grad, before)
    assert without_grad not in optimizer.state
    assert optimizer.state[empty][mom.STEP] == 1


def test_per_group_overrides_including_state():
    big = [param(80, 80) for _ in range(3)]
    optimizer = Lion(
        [
            {"params": [big[0]]},
            {"params": [big[1]], "state": "bf16", "lr": 1e-2},
            {"params": [big[2]], "state": "fp32", "weight_decay": 0.5, "cautious_factor": 0.0},
        ],
        lr=1e-3,
    )
    optimizer.step()
    assert mom.stored_format(optimizer.state[big[0]]) == "8bit"
    assert mom.stored_format(optimizer.state[big[1]]) == "bf16"
    assert mom.stored_format(optimizer.state[big[2]]) == "fp32"
    assert optimizer.param_groups[1]["lr"] == 1e-2 and optimizer.param_groups[2]["weight_decay"] == 0.5


def test_changing_a_groups_state_kind_reencodes_the_momentum():
    p = param(80, 80)
    optimizer = Lion([p], lr=1e-3, state="fp32")
    optimizer.step()
    momentum = optimizer.state[p][mom.MOMENTUM].clone()
    optimizer.param_groups[0]["state"] = "bf16"
    p.grad = torch.zeros_like(p)
    optimizer.step()  # zero grads: the momentum only decays by beta2, in bf16 now
    assert mom.stored_format(optimizer.state[p]) == "bf16"
    expected = (momentum.bfloat16().float() * 0.99).bfloat16()
    assert torch.equal(optimizer.state[p][mom.MOMENTUM], expected)


@pytest.mark.parametrize("before", ["fp32", "8bit"])
def test_changing_a_groups_state_kind_to_4bit_reencodes_the_momentum(before):
    p = param(80, 80)
    optimizer = Lion([p], lr=1e-3, state=before)
    optimizer.step()
    momentum = mom.decode_momentum(optimizer.state[p], before, 256, shape=p.shape)
    optimizer.param_groups[0]["state"] = "4bit"
    p.grad = torch.zeros_like(p)
    optimizer.step()  # zero grads: the re-encoded momentum only decays by beta2, then is stored in 4 bits
    entry = optimizer.state[p]
    assert mom.stored_format(entry) == "4bit"
    # re-encoding rounds to nearest (no step's random bits); the step then rounds stochastically
    # with the momentum stream's key of step 2 and the seed every 4-bit entry gets
    codes, absmax = quant.quantize_4bit(momentum)
    reencoded = quant.dequantize_4bit(codes, absmax, p.numel())
    key = quant.rounding_key(entry[mom.SR_SEED], 2, quant.STREAM_MOMENTUM)
    expected = quant.quantize_4bit(reencoded * 0.99, quant.random_bits(key, p.numel(), "cpu"))
    assert torch.equal(entry[mom.MOMENTUM_CODES], expected[0])
    assert torch.equal(entry[mom.MOMENTUM_ABSMAX], expected[1])
    optimizer.param_groups[0]["state"] = before
    optimizer.step()
    assert mom.stored_format(optimizer.state[p]) == before


def test_decoupled_decay_divides_by_the_lr_at_construction_whatever_the_scheduler():
    p = param(80, 80)
    optimizer = Lion([p], lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    assert optimizer.param_groups[0]["decoupled_initial_lr"] == 1e-3
    one_cycle = Lion([param(3)], lr=1e-3, weight_decay=0.1, decoupled_weight_decay=True)
    torch.optim.lr_scheduler.OneCycleLR(one_cycle, max_lr=2e-3, total_steps=5)
    assert one_cycle.param_groups[0]["initial_lr"] == 2e-3 / 25, "the scheduler's key, rewritten"
    assert one_cycle.param_groups[0]["decoupled_initial_lr"] == 1e-3, "ours, kept"
    optimizer.step()
    scheduler.step()
    before = p.detach().clone()
    p.grad = torch.zeros_like(p)
    optimizer.state[p].clear()  # zero momentum and zero grad: only the decay acts
    optimizer.step()
    # lr 5e-4, decoupled wd 0.1 / 1e-3 = 100: p *= 1 - 5e-4 * 100
    torch.testing.assert_close(p.detach(), before * (1 - 5e-4 * 100), rtol=1e-6, atol=0)


def test_setstate_fills_defaults_for_old_checkpoints():
    optimizer = Lion([param(3)])
    state = optimizer.__getstate__()
    for group in state["param_groups"]:
        del group["cautious_factor"], group["decoupled_initial_lr"]
    restored = Lion.__new__(Lion)
    restored.__setstate__(state)
    assert restored.param_groups[0]["cautious_factor"] == 1.0
    assert restored.param_groups[0]["decoupled_initial_lr"] == restored.param_groups[0]["lr"]


def test_the_signature_defaults_are_the_options_defaults():
    """One source of options: what help(Lion) shows is lion8bit.options.DEFAULTS, which is also
    what old checkpoints' groups are filled with and what a new group gets."""
    import inspect

    from lion8bit.options import DEFAULTS

    signature = inspect.signature(Lion.__init__).parameters
    assert {name: signature[name].default for name in DEFAULTS} == DEFAULTS
    for alias in (Lion8bit, PagedLion8bit):
        alias_signature = inspect.signature(alias.__init__).parameters
        assert {name: alias_signature[name].default for name in ("lr", "betas", "weight_decay")} == {
            name: DEFAULTS[name] for name in ("lr", "betas", "weight_decay")
        }
    group = Lion([param(3)]).param_groups[0]
    assert {name: group[name] for name in DEFAULTS} == DEFAULTS
    peers = [name for name, p in signature.items() if p.kind is p.KEYWORD_ONLY and name not in DEFAULTS]
    assert peers == ["use_triton", "cautious_wd", "optim_bits", "is_paged", "args"]
