"""The Lion update, the spec (DESIGN.md §2), in plain PyTorch.

Every other implementation (the fused CPU path, the Triton kernel) is tested against this file,
and ``backend="torch"`` runs it. It is written for clarity, one tensor at a time, and defines the
exact fp32 operation order the fused paths reproduce:

    g  = grad (negated with maximize)
    c  = beta1*m + (1-beta1)*g            two fp32 products, one fp32 sum (no FMA)
    u  = sign(c)                          sign(0) = 0
    cautious (cautious_factor f < 1):     aligned = u*g > 0, counted over the whole tensor;
                                          step = lr/d where aligned else lr*f/d,
                                          d = max(mean(where(aligned, 1, f)), 1e-5)
    weight decay on the old param:        p = p * (1 - lr*wd_eff), where u*p >= 0 if cautious wd
    p  = p - u*step                       step = lr without caution
    m  = beta2*m + (1-beta2)*g            then stored: 8-bit or 4-bit codes, bf16 or fp32

Host-side scalars are computed once in float64 (:func:`lion_scalars`) and rounded to the compute
dtype, identically for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant
from .momentum import decode_momentum, encode_momentum

# Lower bound of the cautious mask's mean (lion-pytorch cautious_lion: clamp(min=1e-5)).
CAUTIOUS_MEAN_FLOOR = 1e-5


@dataclass(frozen=True)
class LionScalars:
    """The per-group numbers of one step, as the host computes them (Python floats in float64;
    with a tensor lr, ``lr`` and ``decay`` are float64 0-dim tensors on its device, computed
    there with the same float64 operations, so no step reads the lr on the host)."""

    lr: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    decay: float  # 1 - lr * effective weight decay
    weight_decay: bool  # any decay at all (decay != 1)
    cautious_factor: float
    cautious_weight_decay: bool
    maximize: bool
    # With rounding keys given: whether bf16 / fp16 params and bf16 momentum round
    # stochastically (the group's stochastic_rounding). "4bit" momentum always does: its
    # stochastic rounding is part of the format (docs/4bit-study.md: nearest fails the gate).
    stochastic_rounding: bool = True

    @property
    def cautious(self) -> bool:
        return self.cautious_factor < 1.0


def lion_scalars(group: dict) -> LionScalars:
    """Scalars of one step from a param group (lr as it is now, after any scheduler)."""
    lr = group["lr"]
    lr = lr.to(torch.float64) if isinstance(lr, torch.Tensor) else float(lr)
    beta1, beta2 = (float(b) for b in group["betas"])
    weight_decay = float(group["weight_decay"])
    if group.get("decoupled_weight_decay", False):
        # lion-pytorch: wd / the lr given at construction, so lr * wd_eff follows the schedule
        # relative to it. Not the LR schedulers' "initial_lr": OneCycleLR rewrites that one.
        weight_decay = weight_decay / float(group["decoupled_initial_lr"])
    return LionScalars(
        lr=lr,
        beta1=beta1,
        one_minus_beta1=1.0 - beta1,
        beta2=beta2,
        one_minus_beta2=1.0 - beta2,
        decay=1.0 - lr * weight_decay,
        weight_decay=weight_decay != 0.0,
        cautious_factor=float(group.get("cautious_factor", 1.0)),
        cautious_weight_decay=bool(group.get("cautious_weight_decay", False)),
        maximize=bool(group.get("maximize", False)),
        stochastic_rounding=bool(group.get("stochastic_rounding", True)),
    )


def device_step_scalars(scalars: LionScalars, device) -> torch.Tensor:
    """The six fp32 step scalars (kernels.STEP_SCALARS order: beta1, 1 - beta1, beta2,
    1 - beta2, decay, lr) as one tensor on ``device``, each the float64 value rounded once to
    fp32 as torch rounds a Python float operand. Device operations only (a fill per constant,
    no host-to-device copy), so the step can be captured in a CUDA graph and a tensor lr that
    an LR schedule fills between replays is read on the device."""
    values = [
        value.to(device=device, dtype=torch.float64) if isinstance(value, torch.Tensor)
        else torch.full((), value, dtype=torch.float64, device=device)
        for value in (
            scalars.beta1, scalars.one_minus_beta1, scalars.beta2, scalars.one_minus_beta2, scalars.decay, scalars.lr
        )
    ]
    return torch.stack(values).to(torch.float32)


def cautious_step_sizes(
    aligned_counts: torch.Tensor, numels, lr: float, cautious_factor: float, dtype
) -> torch.Tensor:
    """[..., 2] = [step where aligned, step where not] from counts of aligned elements.

    ``aligned_counts`` (any shape, on any device) and ``numels`` (same shape, or a number) count
    over whole tensors. mean = (k + (n - k) * f) / n in float64 (an exact count, no summation
    order), floored at 1e-5, then each step is rounded once to ``dtype``. Device ops only: no
    host synchronisation.
    """
    k = aligned_counts.to(torch.float64)
    n = torch.as_tensor(numels, dtype=torch.float64, device=k.device).clamp(min=1)
    mean = (k + (n - k) * cautious_factor) / n
    denominator = torch.clamp(mean, min=CAUTIOUS_MEAN_FLOOR)
    return torch.stack([lr / denominator, lr * cautious_factor / denominator], dim=-1).to(dtype)


def update_direction(grad: torch.Tensor, momentum: torch.Tensor, scalars: LionScalars):
    """(g, u): the gradient as the update sees it (negated with maximize), u = sign(c)."""
    g = -grad if scalars.maximize else grad
    c = momentum * scalars.beta1 + g * scalars.one_minus_beta1
    return g, torch.sign(c)


def lion_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor,
    scalars: LionScalars,
    cautious_steps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lion step on dense tensors of one compute dtype; returns (new param, new momentum).

    With caution, ``cautious_steps`` ([2], from :func:`cautious_step_sizes`) may carry counts
    made over more than this tensor (a shard's whole parameter); by default they come from it.
    """
    s = scalars
    g, u = update_direction(grad, momentum, s)
    if s.cautious:
        aligned = u * g > 0
        if cautious_steps is None:
            cautious_steps = cautious_step_sizes(
                aligned.sum(), u.numel(), s.lr, s.cautious_factor, param.dtype
            )
        step = torch.where(aligned, cautious_steps[0], cautious_steps[1])
        # With f == 0 the masked elements do not move (u = 0 there), which matters for the
        # cautious weight-decay test u*p >= 0.
        moving = aligned if s.cautious_factor == 0.0 else torch.ones_like(aligned)
    else:
        step = s.lr
        moving = None
    p = param
    if s.weight_decay:
        decayed = p * s.decay
        if s.cautious_weight_decay:
            # arXiv 2510.12402 Alg. 1: decay where u*p >= 0 (lion-pytorch 0.2.5 uses > 0).
            direction = u if moving is None else torch.where(moving, u, torch.zeros_like(u))
            decayed = torch.where(direction * p >= 0, decayed, p)
        p = decayed
    p = p - u * step
    new_momentum = momentum * s.beta2 + g * s.one_minus_beta2
    return p, new_momentum


def rounding_keys(seed: int, step: int) -> tuple[int, int]:
    """(param_key, momentum_key): the uint32 stochastic-rounding keys of one tensor's step.

    ``seed`` is the tensor's ``sr_seed``; ``step`` its ``step`` count INCLUDING this step (the
    first step uses 1), so no two steps of a tensor draw the same bits. The param stream rounds
    bf16 / fp16 params, the momentum stream bf16 momentum (:func:`lion8bit.quant.random_bits`
    turns a key into per-element bits by flat element index).
    """
    return (
        quant.rounding_key(seed, step, quant.STREAM_PARAM),
        quant.rounding_key(seed, step, quant.STREAM_MOMENTUM),
    )


def rounding_key_bases(seed: int) -> tuple[int, int]:
    """The step-independent half of :func:`rounding_keys` for one tensor: per stream,
    mix32((seed ^ mix32(stream + 1)) mod 2**32); the key is then mix32(base ^ (step mod 2**32))."""
    mask = 0xFFFFFFFF
    streams = (quant.STREAM_PARAM, quant.STREAM_MOMENTUM)
    return tuple(quant.mix32((seed ^ quant.mix32(stream + 1)) & mask) for stream in streams)


def rounding_keys_on_device(bases: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """:func:`rounding_keys` of many tensors as an int64 [n, 2] tensor, from their bases (int64
    [n, 2], :func:`rounding_key_bases`) and their step counters (int64 [n], counting this step)
    where those live: device operations only, for capturable steps."""
    return quant.mix32(bases ^ (steps & 0xFFFFFFFF)[:, None])


def reference_aligned_count(
    grad: torch.Tensor,
    momentum: dict,
    scalars: LionScalars,
    *,
    fmt: str,
    block_size: int,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elements of one tensor whose update agrees in sign with the gradient (int64, 0-dim).

    The cautious mean's pre-pass: it reads only the old momentum (``momentum``: the tensor's
    momentum buffers, keys of :mod:`lion8bit.momentum`) and the gradient.
    """
    old = decode_momentum(momentum, fmt, block_size, compute_dtype, grad.shape)
    g, u = update_direction(grad.to(compute_dtype), old, scalars)
    return (u * g > 0).sum()


def reference_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum: dict,
    scalars: LionScalars,
    *,
    fmt: str,
    block_size: int,
    rounding_keys: tuple[int, int] | None = None,
    cautious_steps: torch.Tensor | None = None,
    element_offset: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """One optimizer step for one tensor, in place on ``param`` and its momentum buffers.

    ``momentum`` holds the buffers in format ``fmt`` (keys of :mod:`lion8bit.momentum`).
    ``rounding_keys`` (from :func:`rounding_keys`) makes the rounding of bf16 / fp16 params and
    of bf16 momentum stochastic (unless ``scalars.stochastic_rounding`` is off), with the random
    bits of flat indices ``element_offset`` ... (the tensor's place in the whole parameter, for a
    shard); None rounds to nearest even. "4bit" momentum needs them: it always rounds
    stochastically.
    """
    old = decode_momentum(momentum, fmt, block_size, compute_dtype, param.shape)
    new_param, new_momentum = lion_update(param.to(compute_dtype), grad.to(compute_dtype), old, scalars, cautious_steps)
    param_bits = momentum_bits = None
    if fmt == "4bit" and rounding_keys is None:
        raise ValueError('"4bit" momentum rounds stochastically: pass rounding_keys')
    if rounding_keys is not None:
        param_key, momentum_key = rounding_keys
        if scalars.stochastic_rounding and param.dtype in (torch.bfloat16, torch.float16):
            param_bits = quant.random_bits(param_key, param.numel(), param.device, element_offset)
            param_bits = param_bits.view(param.shape)
        if fmt == "4bit" or (fmt == "bf16" and scalars.stochastic_rounding):
            momentum_bits = quant.random_bits(momentum_key, param.numel(), param.device, element_offset)
            momentum_bits = momentum_bits.view(param.shape)
    encode_momentum(momentum, new_momentum.float(), fmt, block_size, momentum_bits)
    param.copy_(quant.round_to_storage(new_param.float(), param.dtype, param_bits))
