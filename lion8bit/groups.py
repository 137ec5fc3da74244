"""Param groups with the usual conventions, for any training loop: :func:`param_groups`.

Plain dicts that ``torch.optim.Optimizer`` takes, so the Hugging Face Trainer, Accelerate,
Lightning and plain loops all use them the same way (docs/trainers.md has the recipes).
"""

from __future__ import annotations

import math

from torch import nn

from .momentum import STATE_KINDS

# The embedding default: fp32 embedding state did no better than 8-bit on the char LM nor on words
# (3 paired seeds each, |Δ| <= 0.004 nats), at 2.2x the state for the word model; docs/trainers.md,
# examples/results/embedding_state.md and embedding_state_words.md.
DEFAULT_EMBEDDING_STATE = "8bit"
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    embedding_state: str | None = DEFAULT_EMBEDDING_STATE,
) -> list[dict]:
    """The trainable params of ``model`` in up to three param groups, each param once.

    - ``"decay"``: tensors with two or more dims (Linear / Conv weights), ``weight_decay``;
    - ``"no_decay"``: tensors with fewer dims (biases, the gains of LayerNorm, RMSNorm and any
      custom norm), weight decay 0;
    - ``"embeddings"``: the weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules (an output
      layer tied to one included), ``weight_decay`` and ``state=embedding_state``; with
      ``embedding_state=None`` they join ``"decay"`` and get the optimizer's state kind.

    Params with ``requires_grad=False`` are left out (add them with ``add_param_group`` when
    unfrozen). Each group has ``"params"``, their ``"param_names"`` (from
    ``model.named_parameters()``: error messages and state dicts name them), ``"weight_decay"``,
    ``"name"`` (the group's name above; Lightning's ``LearningRateMonitor`` logs under it) and,
    for embeddings, ``"state"``; every other option (lr, betas, ...) comes from the optimizer's
    arguments. Groups that would be empty are omitted; the order is the one above.
    """
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not (math.isfinite(weight_decay) and weight_decay >= 0.0)
    ):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if embedding_state is not None and embedding_state not in STATE_KINDS:
        raise ValueError(
            f"Invalid embedding_state: {embedding_state!r} (expected one of {STATE_KINDS} or None)"
        )
    embedding_params = {
        param
        for module in model.modules()
        if isinstance(module, EMBEDDING_TYPES)
        for param in module.parameters()
    }
    groups: dict[str, dict] = {
        "decay": {"weight_decay": float(weight_decay)},
        "no_decay": {"weight_decay": 0.0},
        "embeddings": {"weight_decay": float(weight_decay), "state": embedding_state},
    }
    for group in groups.values():
        group.update(params=[], param_names=[])
    # named_parameters() yields a tied param once, under its first name.
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param in embedding_params and embedding_state is not None:
            kind = "embeddings"
        elif param.dim() >= 2:
            kind = "decay"
        else:
            kind = "no_decay"
        groups[kind]["params"].append(param)
        groups[kind]["param_names"].append(name)
    result = [{"name": kind, **group} for kind, group in groups.items() if group["params"]]
    if not result:
        raise ValueError(f"Invalid model: {type(model).__name__} has no trainable parameters")
    return result
