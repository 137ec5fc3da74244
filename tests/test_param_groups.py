"""lion8bit.param_groups: which params decay, which get the embeddings' state, each trainable param
placed once (tied weights once, frozen ones left out), names carried into errors and state dicts;
with zero gradients a Lion step moves exactly the decayed params, and torch's optimizers take the
groups too. The trainers that use them (Hugging Face Trainer, Accelerate, Lightning, the recipes
of docs/trainers.md): tests/test_trainers.py.
"""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lion8bit

DOCS = Path(__file__).resolve().parent.parent / "docs" / "trainers.md"


class Scale(nn.Module):
    """A norm-like module of our own with a 1-D gain, as custom RMSNorm classes have."""

    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gain


class Zoo(nn.Module):
    """One of each kind of param the groups must place: embeddings (one tied to the head, one
    bag), Linear and Conv weights and biases, LayerNorm and a custom norm, a 0-dim scalar, a
    frozen layer."""

    def __init__(self, vocab: int = 128, dim: int = 48):
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.bag = nn.EmbeddingBag(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.scale = Scale(dim)
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(dim, vocab, bias=True)
        self.head.weight = self.token.weight  # tied

    def forward(self, idx):
        x = self.token(idx) + self.bag(idx).unsqueeze(1)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = self.scale(self.norm(self.frozen(x)))
        return self.head(x) / self.temperature


ZOO_GROUPS = {
    "decay": ["conv.weight"],
    "no_decay": ["temperature", "conv.bias", "norm.weight", "norm.bias", "scale.gain", "head.bias"],
    "embeddings": ["token.weight", "bag.weight"],
}


def by_name(groups):
    return {group["name"]: group for group in groups}


@pytest.mark.parametrize("embedding_state", ["8bit", "bf16", "fp32"])
def test_param_groups_place_each_trainable_param_once(embedding_state):
    model = Zoo()
    groups = by_name(lion8bit.param_groups(model, weight_decay=0.5, embedding_state=embedding_state))
    assert list(groups) == list(ZOO_GROUPS)
    for name, expected in ZOO_GROUPS.items():
        assert sorted(groups[name]["param_names"]) == sorted(expected), name
        named = dict(model.named_parameters())
        assert all(
            p is named[n] for p, n in zip(groups[name]["params"], groups[name]["param_names"], strict=True)
        )
    assert groups["decay"]["weight_decay"] == 0.5 and groups["embeddings"]["weight_decay"] == 0.5
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert groups["embeddings"]["state"] == embedding_state
    assert "state" not in groups["decay"] and "state" not in groups["no_decay"]

    placed = [p for group in groups.values() for p in group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(placed) == len({id(p) for p in placed}) == len(trainable)
    assert {id(p) for p in placed} == {id(p) for p in trainable}
    assert not {id(p) for p in model.frozen.parameters()} & {id(p) for p in placed}


def test_param_groups_without_embedding_state_leave_embeddings_to_the_optimizer():
    groups = by_name(lion8bit.param_groups(Zoo(), weight_decay=0.5, embedding_state=None))
    assert list(groups) == ["decay", "no_decay"]
    assert sorted(groups["decay"]["param_names"]) == sorted(ZOO_GROUPS["decay"] + ZOO_GROUPS["embeddings"])
    assert not any("state" in group for group in groups.values())


def test_param_groups_default_embedding_state_is_the_documented_one():
    groups = by_name(lion8bit.param_groups(Zoo(), weight_decay=0.1))
    assert groups["embeddings"]["state"] == "8bit"
    assert '`embedding_state="8bit"` (the default)' in DOCS.read_text()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
        (dict(weight_decay=float("nan")), "Invalid weight_decay value: nan"),
        (dict(weight_decay=True), "Invalid weight_decay value: True"),
        (dict(weight_decay=0.1, embedding_state="2bit"), "Invalid embedding_state: '2bit'"),
    ],
)
def test_param_groups_reject_invalid_options(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lion8bit.param_groups(Zoo(), **options)


def test_param_groups_of_a_frozen_model_raise():
    model = Zoo().requires_grad_(False)
    with pytest.raises(ValueError, match="Invalid model: Zoo has no trainable parameters"):
        lion8bit.param_groups(model, weight_decay=0.1)


def _step_with_zero_grads(optimizer, model):
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()


@pytest.mark.parametrize(
    "embedding_state, state_keys", [("8bit", {"momentum_codes", "momentum_absmax"}), ("fp32", {"momentum"})]
)
def test_lion_applies_each_groups_decay_and_state(embedding_state, state_keys):
    """With zero grads and zero momentum Lion only decays: decayed params move, the others not."""
    model = Zoo()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = lion8bit.Lion8bit(
        lion8bit.param_groups(model, weight_decay=0.5, embedding_state=embedding_state), lr=0.1
    )
    _step_with_zero_grads(optimizer, model)
    for name, p in model.named_parameters():
        decayed = name in ZOO_GROUPS["decay"] + ZOO_GROUPS["embeddings"]
        assert torch.equal(p, before[name]) != decayed, name
    token = model.token.weight
    assert token.numel() >= 4096  # large enough for 8-bit state
    assert (
        state_keys <= set(optimizer.state[token])
        and "momentum" not in set(optimizer.state[token]) - state_keys
    )
    assert "momentum_codes" in optimizer.state[model.conv.weight]


def test_param_groups_carry_names_into_errors_and_state_dicts():
    model = Zoo()
    optimizer = lion8bit.Lion8bit(lion8bit.param_groups(model, weight_decay=0.1), lr=1e-3)
    saved = optimizer.state_dict()["param_groups"]
    assert [g["param_names"] for g in saved] == [g["param_names"] for g in optimizer.param_groups]
    model.conv.weight.grad = torch.zeros_like(model.conv.weight).to_sparse()
    with pytest.raises(RuntimeError, match=r"'conv\.weight'"):
        optimizer.step()


def test_unfrozen_params_join_with_their_names():
    model = Zoo()
    optimizer = lion8bit.Lion8bit(lion8bit.param_groups(model, weight_decay=0.1), lr=1e-3)
    model.frozen.requires_grad_(True)
    optimizer.add_param_group(
        {"params": [model.frozen.weight], "param_names": ["frozen.weight"], "weight_decay": 0.1}
    )
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
        optimizer.add_param_group({"params": [model.frozen.bias]})


def test_param_groups_work_with_torch_optimizers():
    model = Zoo()
    optimizer = torch.optim.AdamW(lion8bit.param_groups(model, weight_decay=0.5), lr=0.1)
    _step_with_zero_grads(optimizer, model)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0, 0.5]
