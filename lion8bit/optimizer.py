"""The Lion optimizer: argument checks, param groups, lazy state, the step loop, state dicts.

It collects each group's params, grads and state, and hands them to one step function per
backend: :func:`torch_lion_step` (the reference, one tensor at a time) or a fused kernel from
:mod:`lion8bit.kernels`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from itertools import chain
from typing import Callable

import torch
from torch.optim import Optimizer

from . import kernels, paged, quant, sharded
from . import momentum as mom
from .reference import (
    LionScalars,
    cautious_step_sizes,
    lion_scalars,
    reference_aligned_count,
    reference_step,
)

BACKENDS = ("auto", "torch", "triton", "cpu")
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Group options and their defaults; also what __setstate__ fills into old checkpoints' groups.
DEFAULTS = dict(
    lr=1e-4,
    betas=(0.9, 0.99),
    weight_decay=0.0,
    state="8bit",
    block_size=quant.BLOCK_SIZE,
    min_8bit_size=4096,
    cautious_factor=1.0,
    cautious_weight_decay=False,
    decoupled_weight_decay=False,
    stochastic_rounding=False,
    paged=False,
    backend="auto",
    maximize=False,
    skip_nonfinite=False,
)
# Options that define the stored state's format: a loaded state dict must have the same ones.
_FORMAT_OPTIONS = ("state", "block_size", "min_8bit_size")
# Where and how this process runs, not how training behaves: kept from this optimizer on load.
_RUNTIME_OPTIONS = ("backend", "paged")
_FLAGS = (
    "cautious_weight_decay",
    "decoupled_weight_decay",
    "stochastic_rounding",
    "paged",
    "maximize",
    "skip_nonfinite",
)


def check_group_options(group: dict, where: str = "", *, zero_lr: bool = False) -> None:
    """Raise ValueError / TypeError naming the first invalid option of a param group.

    ``zero_lr``: accept lr 0, as a loaded checkpoint may hold it (an LR schedule's warmup from 0
    saved at its first step); a new group needs lr > 0.
    """
    at = f" in {where}" if where else ""
    lr = group["lr"]
    lr_value = float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None
    invalid = lr_value is None or not math.isfinite(lr_value) or lr_value < 0
    if invalid or (lr_value == 0 and not zero_lr):
        raise ValueError(f"Invalid learning rate{at}: {lr}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas{at}: {betas} (expected two numbers)")
    for index, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}{at}: {beta}")
    weight_decay = group["weight_decay"]
    if not isinstance(weight_decay, (int, float)) or not (
        math.isfinite(weight_decay) and weight_decay >= 0.0
    ):
        raise ValueError(f"Invalid weight_decay value{at}: {weight_decay}")
    if group["state"] not in mom.STATE_KINDS:
        raise ValueError(f"Invalid state{at}: {group['state']!r} (expected one of {mom.STATE_KINDS})")
    if group["backend"] not in BACKENDS:
        raise ValueError(f"Invalid backend{at}: {group['backend']!r} (expected one of {BACKENDS})")
    block_size = group["block_size"]
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or (
        block_size & (block_size - 1)
    ):
        raise ValueError(f"Invalid block_size{at}: {block_size} (expected a positive power of two)")
    min_8bit_size = group["min_8bit_size"]
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size{at}: {min_8bit_size}")
    factor = group["cautious_factor"]
    if not isinstance(factor, (int, float)) or not 0.0 <= factor <= 1.0:
        raise ValueError(f"Invalid cautious_factor{at}: {factor} (expected 0 <= f <= 1)")
    for flag in _FLAGS:
        if not isinstance(group[flag], bool):
            raise TypeError(f"Invalid {flag}{at}: {group[flag]!r} (expected a bool)")


def _compat_options(
    *, state, backend, paged, cautious_weight_decay, use_triton, cautious_wd, optim_bits, is_paged, args
) -> dict:
    """Map lion-pytorch / bitsandbytes keywords onto ours, refusing contradictions."""
    if args is not None:
        raise TypeError(
            "args= (bitsandbytes' config object) is not supported; pass optim_bits, "
            "min_8bit_size and is_paged as keywords"
        )
    if use_triton is not None:
        if use_triton and backend not in ("auto", "triton"):
            raise ValueError(f"use_triton=True contradicts backend={backend!r}")
        if use_triton:
            backend = "triton"
    if cautious_wd is not None:
        if cautious_weight_decay and not cautious_wd:
            raise ValueError("cautious_wd=False contradicts cautious_weight_decay=True")
        cautious_weight_decay = bool(cautious_wd)
    if optim_bits is not None:
        by_bits = {8: "8bit", 32: "fp32"}
        if optim_bits not in by_bits:
            raise ValueError(f"Invalid optim_bits: {optim_bits} (expected 8 or 32)")
        if state != "8bit" and state != by_bits[optim_bits]:
            raise ValueError(f"optim_bits={optim_bits} contradicts state={state!r}")
        state = by_bits[optim_bits]
    if is_paged is not None:
        paged = paged or bool(is_paged)
    return dict(state=state, backend=backend, paged=paged, cautious_weight_decay=cautious_weight_decay)


def _param_label(group_index: int, position: int, group: dict, param: torch.Tensor) -> str:
    names = group.get("param_names")
    name = f" ({names[position]!r})" if names else ""
    return f"param_groups[{group_index}]['params'][{position}]{name} of shape {tuple(param.shape)}"


def torch_aligned_counts(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    entries: list[dict],
    formats: list[str],
    *,
    scalars: LionScalars,
    block_size: int,
) -> list[torch.Tensor]:
    """backend="torch": the cautious pre-pass of the reference, one tensor at a time."""
    return [
        reference_aligned_count(grad, entry, scalars, fmt=fmt, block_size=block_size)
        for grad, entry, fmt in zip(grads, entries, formats)
    ]


def torch_lion_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    entries: list[dict],
    formats: list[str],
    *,
    scalars: LionScalars,
    block_size: int,
    stochastic_rounding: bool,
    cautious_steps: list[torch.Tensor] | None,
    skip: torch.Tensor | None = None,
) -> None:
    """backend="torch": the reference, one tensor at a time, in fp32.

    With a device flag ``skip`` (non-CPU tensors), each tensor is updated and then put back
    where the flag is set: no host synchronisation, at the cost of a copy per tensor.
    """
    for index, (param, grad, entry, fmt) in enumerate(zip(params, grads, entries, formats)):
        before = None
        if skip is not None:
            before = param.clone(), {k: v.clone() for k, v in entry.items() if isinstance(v, torch.Tensor)}
        reference_step(
            param,
            grad,
            entry,
            scalars,
            fmt=fmt,
            block_size=block_size,
            stochastic_rounding=stochastic_rounding,
            cautious_steps=None if cautious_steps is None else cautious_steps[index],
        )
        if before is not None:
            old_param, old_state = before
            param.copy_(torch.where(skip, old_param, param))
            for key, old in old_state.items():
                entry[key].copy_(torch.where(skip, old, entry[key]))


TORCH_BACKEND = kernels.Backend(torch_aligned_counts, torch_lion_step)


def _resolve_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "triton" if kernels.available("triton") else "torch"
    if device.type == "cpu":
        return "cpu" if kernels.available("cpu") else "torch"
    return "torch"


def _implementation(backend: str) -> kernels.Backend:
    return TORCH_BACKEND if backend == "torch" else kernels.load(backend)


def lion(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    entries: list[dict],
    formats: list[str],
    *,
    scalars: LionScalars,
    block_size: int,
    stochastic_rounding: bool,
    backend: str,
    numels: list[int] | None = None,
    reduce_counts: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    skip: torch.Tensor | None = None,
) -> None:
    """Functional Lion: one step for tensors that share a group's options and a backend.

    With caution, the aligned counts of each tensor are taken first; ``reduce_counts`` (for
    sharded params) turns local counts into whole-parameter counts, and ``numels`` gives the
    whole parameters' sizes (default: the tensors' own). ``skip`` (a bool 0-dim tensor) leaves
    everything unchanged when true: decided here for CPU tensors, on the device otherwise.
    """
    device_skip = {}
    if skip is not None and params:
        device = params[0].device
        if device.type == "cpu":
            if bool(skip):  # a CPU tensor: no device synchronisation
                return
        else:
            device_skip = {"skip": skip.to(device, non_blocking=True)}
    implementation = _implementation(backend)
    cautious_steps = None
    if scalars.cautious:
        counts = implementation.aligned_counts(
            params, grads, entries, formats, scalars=scalars, block_size=block_size
        )
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        sizes = numels if numels is not None else [p.numel() for p in params]
        cautious_steps = [
            cautious_step_sizes(count, size, scalars.lr, scalars.cautious_factor, torch.float32)
            for count, size in zip(counts, sizes)
        ]
    implementation.lion_step(
        params,
        grads,
        entries,
        formats,
        scalars=scalars,
        block_size=block_size,
        stochastic_rounding=stochastic_rounding,
        cautious_steps=cautious_steps,
        **device_skip,
    )


def _lr_is_zero(lr) -> bool:
    # A step with lr 0 on a state this step created moves no param and, with a zero grad, leaves
    # the momentum zero: it is how torch.distributed.checkpoint (torch 2.13, _init_optim_state)
    # creates the state before saving or loading. It is not counted, so such a call cannot
    # shift the stochastic-rounding position; no key is used twice (this step uses step 0, the
    # next one step 1). A host-side float: no device sync.
    return float(lr) == 0.0


class _Bucket:
    """The params of one group that one backend updates, with their local views."""

    def __init__(self):
        self.params, self.local_params, self.grads, self.entries, self.formats = [], [], [], [], []

    def add(self, param, local_param, grad, entry, fmt) -> None:
        self.params.append(param)
        self.local_params.append(local_param)
        self.grads.append(grad)
        self.entries.append(entry)
        self.formats.append(fmt)

    def singles(self) -> list["_Bucket"]:
        """One bucket per tensor, in order."""
        parts = []
        for row in zip(self.params, self.local_params, self.grads, self.entries, self.formats):
            parts.append(_Bucket())
            parts[-1].add(*row)
        return parts


class Lion(Optimizer):
    r"""Lion (Chen et al. 2023, arXiv 2302.06675) with its momentum stored in 8 bits, bf16 or fp32.

    Per parameter: ``c = beta1*m + (1-beta1)*g``; ``p -= lr*sign(c)`` after weight decay
    ``p *= 1 - lr*wd``; ``m = beta2*m + (1-beta2)*g``. The momentum is stored block-quantized in
    8 bits (``state="8bit"``, the bitsandbytes format; tensors under ``min_8bit_size`` elements
    keep fp32), in bf16, or in fp32. See ``lion8bit/reference.py`` for the exact spec.

    Args:
        params: iterable of parameters (or named parameters) or dicts defining param groups.
        lr: learning rate; Lion wants 3-10x less than AdamW.
        betas: (beta1, beta2), interpolation for the update and the momentum decay.
        weight_decay: decoupled weight decay; Lion wants 3-10x more than AdamW.
        state: ``"8bit"`` | ``"bf16"`` | ``"fp32"``, how the momentum is stored.
        block_size: elements per absmax block of ``"8bit"`` (a power of two; 256 = bitsandbytes).
        min_8bit_size: tensors with fewer elements keep fp32 momentum under ``"8bit"``.
        cautious_factor: 1.0 = off; below 1 scales updates whose sign disagrees with the gradient
            by this factor and renormalises (lion-pytorch ``cautious_lion``; 0.0 = full mask).
        cautious_weight_decay: decay only where ``update * param >= 0`` (arXiv 2510.12402).
        decoupled_weight_decay: use ``weight_decay / decoupled_initial_lr`` (lion-pytorch's
            option), the group's lr at construction, kept in the group under that key.
        stochastic_rounding: unbiased rounding of bf16/fp16 params and of bf16 momentum,
            reproducible (keyed on a per-param seed, the step and the element index).
        paged: keep the momentum of tensors of at least ``lion8bit.momentum.PAGED_MIN_NUMEL`` elements in
            CUDA managed memory, prefetched before each update (GPU only, through the CUDA
            runtime torch loads; warns and uses ordinary memory on CPU).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cpu"``.
        maximize: maximize the objective instead of minimizing.
        skip_nonfinite: when any grad of the groups that set it is inf or NaN, skip the whole
            step for those groups (params and momentum unchanged) and count it in each param's
            ``nonfinite_skips``; decided on the device, without a host synchronisation per
            parameter (one all-reduce of the flag per step for sharded params).

    DTensor params (FSDP2's ``fully_shard``, placed with Shard / Replicate) are stepped through
    their local shards, with state for the local shard only; see :mod:`lion8bit.sharded`.

    Also accepted, so code written for lion-pytorch or bitsandbytes runs unchanged:
    ``use_triton`` (True means ``backend="triton"``), ``cautious_wd``, ``optim_bits`` (8 or 32)
    and ``is_paged``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        state: str = "8bit",
        block_size: int = quant.BLOCK_SIZE,
        min_8bit_size: int = 4096,
        cautious_factor: float = 1.0,
        cautious_weight_decay: bool = False,
        decoupled_weight_decay: bool = False,
        stochastic_rounding: bool = False,
        paged: bool = False,
        backend: str = "auto",
        maximize: bool = False,
        skip_nonfinite: bool = False,
        use_triton: bool | None = None,
        cautious_wd: bool | None = None,
        optim_bits: int | None = None,
        is_paged: bool | None = None,
        args=None,
    ):
        compat = _compat_options(
            state=state,
            backend=backend,
            paged=paged,
            cautious_weight_decay=cautious_weight_decay,
            use_triton=use_triton,
            cautious_wd=cautious_wd,
            optim_bits=optim_bits,
            is_paged=is_paged,
            args=args,
        )
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            weight_decay=weight_decay,
            state=compat["state"],
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            cautious_factor=cautious_factor,
            cautious_weight_decay=compat["cautious_weight_decay"],
            decoupled_weight_decay=decoupled_weight_decay,
            stochastic_rounding=stochastic_rounding,
            paged=compat["paged"],
            backend=compat["backend"],
            maximize=maximize,
            skip_nonfinite=skip_nonfinite,
        )
        check_group_options(defaults)
        self._paged_warned = False
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        try:
            check_group_options(group, where)
            for position, param in enumerate(group["params"]):
                label = _param_label(len(self.param_groups) - 1, position, group, param)
                if param.dtype not in PARAM_DTYPES:
                    raise ValueError(
                        f"Invalid parameter dtype of {label}: {param.dtype} "
                        f"(Lion supports {', '.join(str(d) for d in PARAM_DTYPES)})"
                    )
                sharded.check_param(param, label)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        # The lr at construction, for decoupled weight decay. A key of our own: LR schedulers
        # own "initial_lr" and some rewrite it (OneCycleLR sets max_lr / div_factor).
        group.setdefault("decoupled_initial_lr", float(group["lr"]))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for name, default in DEFAULTS.items():
                group.setdefault(name, default)
            group.setdefault("decoupled_initial_lr", float(group["lr"]))
        self.__dict__.setdefault("_paged_warned", False)

    # -- state ---------------------------------------------------------------------------------

    def _allocator(self, param: torch.Tensor, group: dict):
        """``torch.empty``, or :func:`lion8bit.paged.empty` for the momentum of a paged param."""
        if not group["paged"]:
            return torch.empty
        local_param = sharded.local(param)
        if local_param.device.type != "cuda":
            if not self._paged_warned:
                warnings.warn(
                    "paged=True needs CUDA managed memory; this parameter is on "
                    f"{local_param.device.type}, so its momentum uses ordinary memory",
                    stacklevel=5,
                )
                self._paged_warned = True
            return torch.empty
        return paged.empty if paged.wanted(local_param) else torch.empty

    def _new_momentum(self, param: torch.Tensor, group: dict, fmt: str) -> dict:
        return sharded.new_momentum(param, fmt, group["block_size"], self._allocator(param, group))

    def _prepare(self, param: torch.Tensor, group: dict, index: int) -> tuple[dict, str]:
        """The param's state entry: created, or re-encoded if the group's state kind changed.

        For a DTensor param the format follows the whole param's size, as unsharded.
        """
        block_size = group["block_size"]
        fmt = mom.momentum_format(param.numel(), group["state"], group["min_8bit_size"])
        entry = self.state[param]
        if not entry:
            entry[mom.STEP] = 0
            entry.update(self._new_momentum(param, group, fmt))
        stored = mom.stored_format(entry)
        if stored != fmt:
            # The group's state kind or min_8bit_size was changed: re-encode the momentum.
            values = mom.decode_momentum(sharded.local_entry(param, entry, block_size), stored, block_size)
            for key in (mom.MOMENTUM, mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX):
                entry.pop(key, None)
            entry.update(self._new_momentum(param, group, fmt))
            mom.encode_momentum(sharded.local_entry(param, entry, block_size), values, fmt, block_size)
        if group["stochastic_rounding"] and mom.SR_SEED not in entry:
            entry[mom.SR_SEED] = quant.mix32(index)
        if group["skip_nonfinite"] and mom.NONFINITE_SKIPS not in entry:
            entry[mom.NONFINITE_SKIPS] = torch.zeros((), dtype=torch.int64, device=sharded.local(param).device)
        return entry, fmt

    @staticmethod
    def _check_state_fits(param: torch.Tensor, entry: dict, group: dict, label: str) -> None:
        if mom.stored_format(entry) == "8bit":
            found = tuple(entry[mom.MOMENTUM_ABSMAX].shape)
            expected = sharded.absmax_shape(param, group["block_size"])
            if found != expected:
                raise ValueError(
                    f"{label}: its 8-bit momentum has absmax of shape {found}, but "
                    f"block_size={group['block_size']} needs {expected}; block_size cannot change "
                    "once the state exists"
                )

    # -- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        collected = self._collect()  # every check first: an error leaves the optimizer unchanged
        skip = self._nonfinite_flag(collected)
        for group, items in collected:
            buckets: dict[str, _Bucket] = defaultdict(_Bucket)
            skip_counters = []
            for index, param, backend in items:
                fresh = not self.state.get(param)
                entry, fmt = self._prepare(param, group, index)
                if not (fresh and _lr_is_zero(group["lr"])):
                    entry[mom.STEP] += 1
                if group["skip_nonfinite"]:
                    skip_counters.append(entry[mom.NONFINITE_SKIPS])
                buckets[backend].add(
                    param, sharded.local(param), sharded.local(param.grad),
                    sharded.local_entry(param, entry, group["block_size"]), fmt,
                )
            group_skip = skip if group["skip_nonfinite"] else None
            scalars = lion_scalars(group)
            for backend, bucket in buckets.items():
                # Paged state: one tensor at a time, each prefetched (asynchronously, on the
                # current stream) just before its own update, so only the tensor being updated
                # has to fit on the GPU, as with bitsandbytes.
                paging = group["paged"] and paged.any_paged(bucket.entries)
                for part in bucket.singles() if paging else (bucket,):
                    if paging:
                        paged.prefetch(part.entries)
                    lion(
                        part.local_params,
                        part.grads,
                        part.entries,
                        part.formats,
                        scalars=scalars,
                        block_size=group["block_size"],
                        stochastic_rounding=group["stochastic_rounding"],
                        backend=backend,
                        numels=[param.numel() for param in part.params],
                        reduce_counts=sharded.count_reducer(part.params) if scalars.cautious else None,
                        skip=group_skip,
                    )
            for counter in skip_counters:
                counter.add_(skip.to(counter.device, non_blocking=True))
        return loss

    def _collect(self) -> list[tuple[dict, list[tuple[int, torch.Tensor, str]]]]:
        """Per group, its params with a grad as (index among all params, param, backend).

        Checks everything a step could fail on before the step changes anything: the grads,
        the backend and the device it runs on, the existing state's layout.
        """
        collected = []
        index = -1
        for group_index, group in enumerate(self.param_groups):
            items = []
            for position, param in enumerate(group["params"]):
                index += 1
                if param.grad is None:
                    continue
                label = _param_label(group_index, position, group, param)
                self._check_grad(param, param.grad, label)
                device = sharded.local(param).device
                backend = _resolve_backend(group["backend"], device)
                _implementation(backend)  # RuntimeError if it cannot be used here at all
                kernels.check_device(backend, device, label)
                if self.state.get(param):
                    self._check_state_fits(param, self.state[param], group, label)
                items.append((index, param, backend))
            if items:
                collected.append((group, items))
        return collected

    @staticmethod
    def _nonfinite_flag(collected) -> torch.Tensor | None:
        """A bool 0-dim tensor: some grad of the skip_nonfinite groups is inf or NaN (or None).

        One max-norm pass over the grads per device, no host synchronisation; for sharded
        params the flag is OR-ed over their meshes (a rank seeing a NaN in its shard makes every
        rank skip).
        """
        params = [p for group, items in collected if group["skip_nonfinite"] for _, p, _ in items]
        if not params:
            return None
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for param in params:
            grad = sharded.local(param.grad)
            by_device[grad.device].append(grad)
        flags = []
        for device, grads in by_device.items():
            grads = [g for g in grads if g.numel()]  # the inf-norm of an empty shard is an error
            if not grads:
                flags.append(torch.zeros((), dtype=torch.bool, device=device))
                continue
            largest = torch.stack(torch._foreach_norm(grads, float("inf"))).float()
            flags.append(~torch.isfinite(largest).all())
        flag = flags[0]
        for other in flags[1:]:
            flag = flag | other.to(flag.device, non_blocking=True)
        return sharded.any_across(flag, params)

    @staticmethod
    def _check_grad(param, grad, label: str) -> None:
        if grad.is_sparse:
            raise RuntimeError(f"Lion does not support sparse gradients ({label})")
        if not sharded.same_layout(grad, param):
            raise RuntimeError(
                f"Gradient of {label} is {sharded.layout(grad)}; expected {sharded.layout(param)}"
            )
        if grad.shape != param.shape:
            raise RuntimeError(f"Gradient of {label} has shape {tuple(grad.shape)}")
        if grad.device != param.device:
            raise RuntimeError(f"Gradient of {label} is on {grad.device}, the parameter on {param.device}")
        if grad.dtype != param.dtype and grad.dtype != torch.float32:
            raise RuntimeError(
                f"Gradient of {label} has dtype {grad.dtype}; expected {param.dtype} or torch.float32"
            )

    # -- state dicts ---------------------------------------------------------------------------

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer, of ``bitsandbytes.optim.Lion8bit`` / ``Lion``, or
        of ``lion_pytorch.Lion`` (recognised by their keys; foreign ones are converted into this
        optimizer's state kinds).

        Hyperparameters (lr, betas, ...) come from the state dict, as in torch; ``backend`` and
        ``paged`` stay this optimizer's. Everything is checked before anything changes: a state
        dict for other shapes, another state kind, block size or ``min_8bit_size`` raises
        ValueError naming the group or parameter, and the optimizer is left as it was. Tensors keep their dtypes (uint8 codes, fp32 absmax, bf16 momentum
        are never cast to the param dtype) and are copied, never shared with ``state_dict``.
        """
        from . import interop

        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result

        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("Invalid state dict: expected a dict with 'state' and 'param_groups'")
        source = interop.detect_format(state_dict)
        if source != "lion8bit":
            state_dict = interop.convert_to_lion8bit(state_dict, source, self)

        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer {len(groups)}"
            )
        for group_index, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param_groups[{group_index}] has {len(group['params'])} parameters, "
                    f"the loaded state dict's {len(saved['params'])}"
                )

        new_groups = []
        for group_index, (group, saved) in enumerate(zip(groups, saved_groups)):
            merged = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            for name, default in DEFAULTS.items():
                merged.setdefault(name, default)
            merged.setdefault("decoupled_initial_lr", float(merged["lr"]))
            merged["betas"] = tuple(merged["betas"])
            check_group_options(merged, f"loaded param_groups[{group_index}]", zero_lr=True)
            for name in _FORMAT_OPTIONS:
                if merged[name] != group[name]:
                    raise ValueError(
                        f"param_groups[{group_index}]: the state dict was saved with "
                        f"{name}={merged[name]!r}, this optimizer has {name}={group[name]!r}; "
                        "construct it with the checkpoint's setting"
                    )
            for name in _RUNTIME_OPTIONS:
                merged[name] = group[name]
            merged["params"] = group["params"]
            if "param_names" in group:
                merged["param_names"] = group["param_names"]
            new_groups.append(merged)

        saved_ids = chain.from_iterable(g["params"] for g in saved_groups)
        locations = [
            (group_index, position, param, group)
            for group_index, group in enumerate(new_groups)
            for position, param in enumerate(group["params"])
        ]
        new_state = defaultdict(dict)
        for saved_id, (group_index, position, param, group) in zip(saved_ids, locations):
            entry = state_dict["state"].get(saved_id)
            if entry is None:
                continue
            label = _param_label(group_index, position, group, param)
            new_state[param] = _checked_entry(entry, param, group, label, self._allocator(param, group))

        self.__setstate__({"state": new_state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


_KNOWN_KEYS = {
    mom.STEP,
    mom.MOMENTUM,
    mom.MOMENTUM_CODES,
    mom.MOMENTUM_ABSMAX,
    mom.SR_SEED,
    mom.NONFINITE_SKIPS,
}


def _checked_entry(entry, param: torch.Tensor, group: dict, label: str, empty) -> dict:
    """A copy of one loaded state entry in buffers from ``empty`` on the param's device (a
    DTensor param's state stays DTensors), or ValueError naming the param."""
    if not isinstance(entry, dict):
        raise ValueError(f"{label}: state must be a dict, got {type(entry).__name__}")
    unknown = set(entry) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"{label}: unknown state keys {sorted(unknown)}")
    step = entry.get(mom.STEP, 0)
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{label}: step must be a non-negative int, got {step!r}")
    fmt = mom.momentum_format(param.numel(), group["state"], group["min_8bit_size"])
    sharded.check_momentum(entry, param, fmt, group["block_size"], label)
    checked = {mom.STEP: step}
    for key in (mom.MOMENTUM, mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX):
        if key in entry:
            checked[key] = sharded.copy_state(entry[key], param, empty)
    if mom.SR_SEED in entry:
        seed = entry[mom.SR_SEED]
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"{label}: {mom.SR_SEED} must be an int in [0, 2**32), got {seed!r}")
        checked[mom.SR_SEED] = seed
    if mom.NONFINITE_SKIPS in entry:
        skips = entry[mom.NONFINITE_SKIPS]
        skips = sharded.local(skips) if isinstance(skips, torch.Tensor) else skips
        if isinstance(skips, bool) or not (
            isinstance(skips, int)
            or (isinstance(skips, torch.Tensor) and skips.numel() == 1 and not skips.is_floating_point())
        ):
            raise ValueError(f"{label}: {mom.NONFINITE_SKIPS} must be an integer, got {skips!r}")
        device = sharded.local(param).device
        checked[mom.NONFINITE_SKIPS] = torch.as_tensor(skips, dtype=torch.int64).reshape(()).to(device, copy=True)
    if mom.stored_format(checked) is None:
        checked.update(sharded.new_momentum(param, fmt, group["block_size"], empty))
    return checked


class Lion8bit(Lion):
    """Lion with 8-bit blockwise momentum: ``Lion(..., state="8bit")``.

    A drop-in for ``bitsandbytes.optim.Lion8bit`` (``min_8bit_size`` and ``is_paged`` accepted).
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, **options):
        super().__init__(params, lr, betas, weight_decay, state="8bit", **options)


class PagedLion8bit(Lion):
    """Lion8bit with its momentum in CUDA managed memory: ``Lion(..., state="8bit", paged=True)``."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, **options):
        super().__init__(params, lr, betas, weight_decay, state="8bit", paged=True, **options)
