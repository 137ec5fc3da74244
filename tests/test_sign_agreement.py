"""Update-sign agreement: 8-bit, 4-bit and bf16 momentum against fp32 momentum, on one gradient sequence.

Lion's update is sign(c) with c = beta1*m + (1-beta1)*g, so the momentum's storage matters only
where it flips a sign. The comparison, exactly:

- One gradient sequence: a small MLP trained for STEPS steps by fp32-state Lion on seeded
  mini-batches (gradients of a real, moving trajectory, not i.i.d. noise).
- Four shadow optimizers, identical except ``state`` ("fp32", "8bit", "4bit", "bf16"; every tensor in the
  stored format, ``min_8bit_size=0``), each over its own copy of the model's parameter shapes.
  Before every step their params are set to zero and given the trajectory's gradients; with
  lr = 1 and no weight decay each shadow param afterwards is exactly -sign(c): the update's sign.
- Agreement = share of (step, element) pairs whose update sign equals the fp32 shadow's.

The shadows' momenta are never re-synced to the fp32 one: each keeps its own history, so the
number includes the storage error accumulated over all steps, which is what training sees
(re-syncing would measure one rounding only and flatter the 8-bit state). Params and gradients,
on the other hand, are shared on purpose: letting each optimizer follow its own trajectory makes
the gradients differ, and after a few steps the comparison would measure chaos, not storage.
"""

import pytest
import torch

from lion8bit import Lion

STEPS = 200
BETAS = (0.9, 0.99)  # the paper's defaults


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 10)
    )


def sign_agreement(states=("8bit", "4bit", "bf16"), steps: int = STEPS, seed: int = 0) -> dict[str, float]:
    """{state: fraction of update signs equal to fp32 momentum's} over ``steps`` steps."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 64, generator=generator)
    teacher = torch.randn(64, 10, generator=generator)
    y = (x @ teacher + 0.5 * torch.randn(4096, 10, generator=generator)).argmax(1)
    torch.manual_seed(seed)
    model = _model()
    driver = Lion(model.parameters(), lr=3e-4, betas=BETAS, weight_decay=0.1, state="fp32")

    kinds = ("fp32", *states)
    shadows = {kind: [torch.zeros_like(p, requires_grad=True) for p in model.parameters()] for kind in kinds}
    optimizers = {
        kind: Lion(params, lr=1.0, betas=BETAS, weight_decay=0.0, state=kind, min_8bit_size=0)
        for kind, params in shadows.items()
    }
    agree = dict.fromkeys(states, 0)
    total = 0
    for _ in range(steps):
        batch = torch.randint(len(x), (128,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        driver.zero_grad()
        loss.backward()
        updates = {}
        for kind, params in shadows.items():
            with torch.no_grad():
                for shadow, param in zip(params, model.parameters(), strict=True):
                    shadow.zero_()
                    shadow.grad = param.grad.clone()
            optimizers[kind].step()
            updates[kind] = torch.cat([-p.detach().flatten() for p in params])
        for kind in states:
            agree[kind] += (updates[kind] == updates["fp32"]).sum().item()
        total += updates["fp32"].numel()
        driver.step()
    return {kind: count / total for kind, count in agree.items()}


@pytest.fixture(scope="module")
def agreement() -> dict[str, float]:
    return sign_agreement()


@pytest.mark.parametrize(
    "state, minimum",
    [
        # Issue 7's bound. The dynamic map's top decade spaces codes 0.9/64 of the block's absmax
        # apart, so m is off by up to ~0.7% of absmax and signs of c that close to zero may flip.
        pytest.param("8bit", 0.97, id="8bit>=0.97"),
        # benchmarks/results/study_4bit_sign.csv: 0.9045 on this sequence for the format "4bit"
        # is (linear-32-bf16-srgrid); the same map rounding to nearest, which failed the training
        # gate, 0.8479, and every 4-bit candidate 0.78-0.93.
        pytest.param("4bit", 0.90, id="4bit>=0.90"),
        # Issue 7's bound. bf16 keeps 8 significant bits: a flip needs |c| within 2**-9 of |beta1*m|.
        pytest.param("bf16", 0.995, id="bf16>=0.995"),
    ],
)
def test_update_sign_agreement_with_fp32_momentum(agreement, state, minimum):
    assert agreement[state] >= minimum, f"{state}: {agreement[state]:.5f} of update signs agree (< {minimum})"


def test_shadow_updates_are_exactly_the_update_sign():
    # The measurement's premise: from zero params, lr 1, no decay, one step leaves -sign(c).
    param = torch.zeros(5000, requires_grad=True)
    param.grad = torch.tensor([1.0, -2.0, 0.0, 3.0, -0.5]).repeat(1000)
    Lion([param], lr=1.0, betas=BETAS, weight_decay=0.0, state="8bit", min_8bit_size=0).step()
    assert torch.equal(-param.detach(), torch.sign(param.grad))


if __name__ == "__main__":
    print(sign_agreement())
