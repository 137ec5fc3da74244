"""The Lion optimizer: argument checks, param groups, lazy state, the step loop, state dicts.

It collects each group's params, grads and state entries (local shards for DTensor params) and
hands them to the functional :func:`lion8bit.functional.lion`, which dispatches to a backend of
:mod:`lion8bit.kernels`. Options live in :mod:`lion8bit.options`, the momentum's storage in
:mod:`lion8bit.momentum`, loading a state dict in :mod:`lion8bit.checkpoint`.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict

import torch
from torch.optim import Optimizer

from . import checkpoint, kernels, paged, plans, quant, reshard, shard_blocks, sharded
from . import momentum as mom
from .functional import lion
from .options import DEFAULTS, PARAM_DTYPES, check_group_options, compat_options, param_label
from .reference import lion_scalars


def _lr_is_zero(lr) -> bool:
    # A step with lr 0 on a state this step created moves no param and, with a zero grad, leaves
    # the momentum zero: it is how torch.distributed.checkpoint (torch 2.13, _init_optim_state)
    # creates the state before saving or loading. It is not counted, so such a call cannot
    # shift the stochastic-rounding position; no key is used twice (this step uses step 0, the
    # next one step 1). Asked only on the step that creates a param's state; a device-tensor lr
    # is read on the host then (one synchronisation per param, once).
    return float(lr) == 0.0


_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _Bucket:
    """The params of one group on one device, with their local views, grads, entries, formats."""

    def __init__(self, params, local_params, grads, entries, formats):
        self.params, self.local_params, self.grads, self.entries, self.formats = (
            params, local_params, grads, entries, formats
        )

    def singles(self) -> list["_Bucket"]:
        """One bucket per tensor, in order."""
        rows = zip(self.params, self.local_params, self.grads, self.entries, self.formats, strict=True)
        return [_Bucket(*([value] for value in row)) for row in rows]


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
        capturable: everything a step reads stays on the params' device — a tensor lr (and
            the scalars made from it), the step counters (int64 0-dim tensors in the state), the
            stochastic-rounding keys — so the step can be captured in a CUDA graph and replayed
            (torch's name and meaning). Give lr as a tensor on the device to change it between
            replays (LR schedulers fill it in place).

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
        block_size: int = 256,
        min_8bit_size: int = 4096,
        cautious_factor: float = 1.0,
        cautious_weight_decay: bool = False,
        decoupled_weight_decay: bool = False,
        stochastic_rounding: bool = False,
        paged: bool = False,
        backend: str = "auto",
        maximize: bool = False,
        skip_nonfinite: bool = False,
        capturable: bool = False,
        use_triton: bool | None = None,
        cautious_wd: bool | None = None,
        optim_bits: int | None = None,
        is_paged: bool | None = None,
        args=None,
    ):
        compat = compat_options(
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
            block_size=block_size,
            min_8bit_size=min_8bit_size,
            cautious_factor=cautious_factor,
            decoupled_weight_decay=decoupled_weight_decay,
            stochastic_rounding=stochastic_rounding,
            maximize=maximize,
            skip_nonfinite=skip_nonfinite,
            capturable=capturable,
            **compat,
        )
        check_group_options(defaults)
        self._paged_warned = False
        self._block_sizes: dict[int, int] = {}  # id(group) -> the block_size its state was checked for
        self._plans = None  # lion8bit.plans: what the last full step collected, checked each step
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param_groups[{len(self.param_groups) - 1}]"
        try:
            check_group_options(group, where)
            for position, param in enumerate(group["params"]):
                label = param_label(len(self.param_groups) - 1, position, group, param)
                if param.dtype not in PARAM_DTYPES:
                    raise ValueError(
                        f"Invalid parameter dtype of {label}: {param.dtype} "
                        f"(Lion supports {', '.join(str(d) for d in PARAM_DTYPES)})"
                    )
                fmt = mom.momentum_format(param.numel(), group["state"], group["min_8bit_size"])
                sharded.check_param(param, label, fmt)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        # The lr at construction, for decoupled weight decay. A key of our own: LR schedulers
        # own "initial_lr" and some rewrite it (OneCycleLR sets max_lr / div_factor).
        group.setdefault("decoupled_initial_lr", float(group["lr"]))
        group[quant.LEVELS_4BIT_KEY] = quant.LEVELS_4BIT  # saved: checkpoint.check_levels_4bit

    def __setstate__(self, state: dict) -> None:
        checkpoint.check_pickled_levels_4bit(state)  # before anything changes
        super().__setstate__(state)
        for group in self.param_groups:
            for name, default in DEFAULTS.items():
                group.setdefault(name, default)
            group.setdefault("decoupled_initial_lr", float(group["lr"]))
            group[quant.LEVELS_4BIT_KEY] = quant.LEVELS_4BIT
        self.__dict__.setdefault("_paged_warned", False)
        self._block_sizes = {}  # loaded state: check it at the next step
        self._plans = None  # the next full step makes them (an unpickled or copied optimizer comes here)

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

    def _prepare(self, param: torch.Tensor, group: dict, index: int, fmt: str) -> dict:
        """The param's state entry: created, or re-encoded if the group's state kind changed;
        ``fmt`` is the format its momentum must have (for a DTensor param it follows the whole
        param's size, as unsharded).
        """
        block_size = group["block_size"]
        entry = self.state[param]
        if not entry:
            # Allocate first: an allocation that fails (paged out of memory) leaves no half-made
            # entry behind for the next step to trip over.
            momentum = self._new_momentum(param, group, fmt)
            entry[mom.STEP] = 0
            entry.update(momentum)
        stored = mom.stored_format(entry)
        if stored != fmt:
            # The group's state kind or min_8bit_size was changed: re-encode the momentum.
            values = shard_blocks.decode(param, entry, stored, block_size)
            for key in (mom.MOMENTUM, mom.MOMENTUM_CODES, mom.MOMENTUM_ABSMAX):
                entry.pop(key, None)
            entry.update(self._new_momentum(param, group, fmt))
            shard_blocks.encode(param, entry, values, fmt, block_size)
        # "4bit" momentum always rounds stochastically: every entry of its group gets a seed
        if (group["stochastic_rounding"] or group["state"] == "4bit") and mom.SR_SEED not in entry:
            entry[mom.SR_SEED] = quant.mix32(index)
        if group["skip_nonfinite"] and mom.NONFINITE_SKIPS not in entry:
            entry[mom.NONFINITE_SKIPS] = torch.zeros((), dtype=torch.int64, device=sharded.local(param).device)
        step = entry[mom.STEP]
        if group["capturable"] and not isinstance(step, torch.Tensor):
            entry[mom.STEP] = torch.tensor(step, dtype=torch.int64, device=sharded.local(param).device)
        elif not group["capturable"] and isinstance(step, torch.Tensor):
            entry[mom.STEP] = int(step)  # capturable was turned off: read once
        return entry

    @staticmethod
    def _check_state_fits(param: torch.Tensor, entry: dict, group: dict, label) -> None:
        """ValueError unless the 8-bit state's absmax fits the group's block_size; ``label()``
        names the param."""
        if mom.stored_format(entry) == "8bit":
            found = tuple(entry[mom.MOMENTUM_ABSMAX].shape)
            expected = sharded.absmax_shape(param, group["block_size"])
            if found != expected:
                raise ValueError(
                    f"{label()}: its 8-bit momentum has absmax of shape {found}, but "
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

        if not torch.compiler.is_compiling() and plans.step(self):
            return loss
        collected = self._collect()  # every check first: an error leaves the optimizer unchanged
        skip = self._nonfinite_flag(collected)
        stepped = {}  # id(group) -> its buckets, for lion8bit.plans
        for group, params in collected:
            rows: dict[torch.device, list[tuple]] = defaultdict(list)  # (param, local param, grad, entry, fmt)
            sharded_devices = set()  # devices with DTensor params: their buckets step through shard_blocks
            skip_counters = []
            kind, min_8bit_size = group["state"], group["min_8bit_size"]
            codes, momentum_key, absmax_key = mom.MOMENTUM_CODES, mom.MOMENTUM, mom.MOMENTUM_ABSMAX
            quantized = kind in mom.QUANTIZED
            needs_prepare = (
                group["stochastic_rounding"] or kind == "4bit" or group["skip_nonfinite"] or group["capturable"]
            )
            for index, param, grad, entry, device in params:
                fmt = "fp32" if quantized and param.numel() < min_8bit_size else kind  # mom.momentum_format
                # whether the entry's momentum is stored in fmt (mom.stored_format, inlined)
                if fmt == "8bit":
                    held = entry is not None and codes in entry and entry[absmax_key].dtype is torch.float32
                elif fmt == "4bit":
                    held = entry is not None and codes in entry and entry[absmax_key].dtype is torch.bfloat16
                else:
                    momentum = entry.get(momentum_key) if entry else None
                    held = momentum is not None and (momentum.dtype is torch.bfloat16) == (fmt == "bf16")
                if needs_prepare or not entry or not held:
                    fresh = not entry
                    entry = self._prepare(param, group, index, fmt)
                    if not (fresh and _lr_is_zero(group["lr"])):
                        entry[mom.STEP] += 1
                    if group["skip_nonfinite"]:
                        skip_counters.append(entry[mom.NONFINITE_SKIPS])
                else:
                    entry[mom.STEP] += 1
                if type(param) in _PLAIN:
                    rows[device].append((param, param, grad, entry, fmt))
                else:
                    sharded_devices.add(device)
                    local_entry = sharded.local_entry(param, entry)
                    rows[device].append((param, sharded.local(param), sharded.local(grad), local_entry, fmt))
            buckets = [
                (device in sharded_devices, _Bucket(*map(list, zip(*device_rows, strict=True))))
                for device, device_rows in rows.items()
            ]
            stepped[id(group)] = buckets
            scalars = lion_scalars(group)
            for has_shards, bucket in buckets:
                # Paged state: one tensor at a time, each prefetched (asynchronously, on the
                # current stream) just before its own update, so only the tensor being updated
                # has to fit on the GPU, as with bitsandbytes.
                paging = group["paged"] and paged.any_paged(bucket.entries)
                for part in bucket.singles() if paging else (bucket,):
                    if paging:
                        paged.prefetch(part.entries)
                    self._step_part(part, group, scalars, skip, has_shards)
            for counter in skip_counters:
                counter.add_(skip.to(counter.device, non_blocking=True))
            self._block_sizes[id(group)] = group["block_size"]
        if not torch.compiler.is_compiling():
            self._plans = plans.build(self, stepped)
        return loss

    @staticmethod
    def _step_part(part: "_Bucket", group: dict, scalars, skip, has_shards: bool) -> None:
        """One call of the functional for these tensors. DTensor params go through
        :class:`lion8bit.shard_blocks.ShardedStep`: 8-bit blocks cut by shard boundaries are
        stepped around the backend's call, in the whole parameter's blocks."""
        options = dict(
            scalars=scalars,
            block_size=group["block_size"],
            stochastic_rounding=group["stochastic_rounding"],
            backend=group["backend"],
            skip=skip if group["skip_nonfinite"] else None,
            capturable=group["capturable"],
        )
        if not has_shards:
            lion(part.local_params, part.grads, part.entries, part.formats, **options)
            return
        pieces = shard_blocks.ShardedStep(
            part.params, part.local_params, part.grads, part.entries, part.formats, group["block_size"]
        )
        lion(
            pieces.params, pieces.grads, pieces.entries, pieces.formats, **options,
            numels=[param.numel() for param in part.params],
            reduce_counts=pieces.count_reducer(scalars) if scalars.cautious else None,
            element_offsets=pieces.element_offsets,
        )
        pieces.step_edges(scalars, stochastic_rounding=group["stochastic_rounding"], skip=options["skip"])

    def _collect(self) -> list[tuple[dict, list[tuple]]]:
        """Per group, its params with a grad as (index among all params, param, grad, state
        entry or None, the device of its local tensor).

        Checks everything a step could fail on before the step changes anything: the grads,
        the backend and the device it runs on, the existing state's layout. The common case
        takes a few comparisons per param; an error message is made only for an error.
        """
        collected = []
        index = -1
        state = self.state
        for group_index, group in enumerate(self.param_groups):
            params, checked_devices = [], set()
            # 8-bit state has the blocks of the block_size it was made with; only a group whose
            # block_size was changed since its last step needs its entries checked.
            check_blocks = self._block_sizes.get(id(group)) != group["block_size"]
            for position, param in enumerate(group["params"]):
                index += 1
                grad = param.grad
                if grad is None:
                    continue
                # _grad_fits, inlined: the common case costs a few comparisons per param
                plain = type(grad) in _PLAIN and type(param) in _PLAIN
                device = param.device
                if not (
                    (grad.dtype is param.dtype or grad.dtype is torch.float32)
                    and grad.shape == param.shape
                    and grad.device == device
                    and not grad.is_sparse
                    and (plain or sharded.same_layout(grad, param))
                ):
                    self._check_grad(param, grad, param_label(group_index, position, group, param))
                if not plain:
                    device = sharded.local(param).device
                if device not in checked_devices:
                    try:
                        kernels.resolve(group["backend"], device)
                    except kernels.UnavailableBackend:
                        kernels.resolve(group["backend"], device, param_label(group_index, position, group, param))
                    checked_devices.add(device)
                if not plain:  # the group's state kind may have changed: 8-bit takes fewer layouts
                    fmt = mom.momentum_format(param.numel(), group["state"], group["min_8bit_size"])
                    sharded.check_param(param, param_label(group_index, position, group, param), fmt)
                entry = state.get(param)
                if check_blocks and entry and mom.MOMENTUM_ABSMAX in entry:
                    label = functools.partial(param_label, group_index, position, group, param)
                    self._check_state_fits(param, entry, group, label)
                params.append((index, param, grad, entry, device))
            if params:
                collected.append((group, params))
        return collected

    @staticmethod
    def _nonfinite_flag(collected) -> torch.Tensor | None:
        """A bool 0-dim tensor: some grad of the skip_nonfinite groups is inf or NaN (or None).

        One max-norm pass over the grads per device, no host synchronisation; for sharded
        params the flag is OR-ed over their meshes (a rank seeing a NaN in its shard makes every
        rank skip).
        """
        params = [item[1] for group, items in collected if group["skip_nonfinite"] for item in items]
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
            raise RuntimeError(f"Gradient of {label} is {sharded.layout(grad)}; expected {sharded.layout(param)}")
        if grad.shape != param.shape:
            raise RuntimeError(f"Gradient of {label} has shape {tuple(grad.shape)}")
        if grad.device != param.device:
            raise RuntimeError(f"Gradient of {label} is on {grad.device}, the parameter on {param.device}")
        if grad.dtype != param.dtype and grad.dtype != torch.float32:
            raise RuntimeError(f"Gradient of {label} has dtype {grad.dtype}; expected {param.dtype} or torch.float32")

    # -- state dicts ---------------------------------------------------------------------------

    @torch._disable_dynamo
    def state_dict(self) -> dict:
        """torch's state dict, with the 8-bit / 4-bit absmax (and 4-bit codes) of DTensor params
        as DTensors of the whole parameter's (the layout that reshards, :mod:`lion8bit.reshard`). With such
        params it is a collective: call it on every rank, as get_optimizer_state_dict does.
        (State dict post hooks run inside torch's ``state_dict``, on the per-rank layout.)"""
        return reshard.checkpoint_state(super().state_dict(), self)

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this optimizer, of ``bitsandbytes.optim.Lion8bit`` / ``Lion``, or
        of ``lion_pytorch.Lion`` (recognised by their keys; foreign ones are converted into this
        optimizer's state kinds).

        Hyperparameters (lr, betas, ...) come from the state dict, as in torch; ``backend`` and
        ``paged`` stay this optimizer's. Everything is checked before anything changes: a state
        dict for other shapes, another state kind, block size or ``min_8bit_size`` raises
        ValueError naming the group or parameter, and the optimizer is left as it was. Tensors
        keep their dtypes (uint8 codes, fp32 absmax, bf16 momentum are never cast to the param
        dtype) and are copied, never shared with ``state_dict``. See :mod:`lion8bit.checkpoint`.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = checkpoint.own_format(state_dict, self)
        groups = checkpoint.merged_groups(self.param_groups, state_dict["param_groups"])
        state = checkpoint.loaded_state(state_dict, groups, self._allocator)
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


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
