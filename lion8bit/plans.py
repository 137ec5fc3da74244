"""Step plans: a group stepped on the fused CPU backend without being collected again.

A training loop steps the same params, state entries and momentum buffers every step, with new
grads. Collecting a group again is per-param Python (grad checks, format, state lookup, rows
in :meth:`lion8bit.Lion.step`): on 300 tensors of 64 elements, one thread, ``_collect`` alone
took 0.87 of a step's 3.41 us per tensor and the C++ kernel 0.19, against 3.59 for
torch.optim.AdamW(fused=True) (timeit, same run). With plans, the same step measured 0.53-0.60x
fused AdamW against 0.94-1.02x before (median of 9 interleaved rounds, 3 runs each; shared
2-core machine). A plan keeps what the last full step collected for a group and checks, with
C-level passes over the group's lists, that it still holds:

- the group dict, the options that decide collection (all but lr and the step's scalars) and
  its params list (the same objects, in order);
- which params have a grad, and that params and grads are plain tensors (one list of types);
- the grads' shapes equal the params' shapes as they are now (``param.data = ...`` may reshape);
- each param's state entry is the same dict (``load_state_dict``, ``state[p] = ...``); the
  momentum buffers are read from the entries every step;
- the CPU kernel's own checks (:func:`lion8bit.kernels.cpu_lion.planned_rows`: dtypes, sizes,
  addresses, CPU, contiguity of params, grads and buffers, the format of each buffer);
- with stochastic rounding (the option, or "4bit" momentum, which always rounds so): each
  entry's ``sr_seed`` as it was. The kernel makes the step's keys from the seeds' bases and the
  step counts (:func:`lion8bit.kernels.cpu_lion.set_key_steps`); such groups took the full
  path before, at 11.0-11.2 us per tensor of 64 elements against 2.4 for a planned 8-bit group.

Every group is checked before any group is stepped, so a plan that does not hold changes
nothing: the full path then runs (and raises its own errors), and makes the plans again. Only
groups the full path steps as one call of the CPU backend get plans: plain CPU tensors without
skip_nonfinite, capturable, paging, caution or a tensor lr. Never under torch.compile: Dynamo
cannot trace the itemgetter passes (torch 2.13).
"""

from __future__ import annotations

import operator
from itertools import compress

import torch
from torch.autograd.graph import increment_version

from . import kernels
from . import momentum as mom
from .reference import lion_scalars, rounding_key_bases

_CPU = torch.device("cpu")
# The group options a plan was made for: the ones that decide formats, state layout, backend
# and whether a step takes the plain path (the step's scalars are read from the group each step).
_options = operator.itemgetter(
    "state", "min_8bit_size", "block_size", "backend", "paged", "stochastic_rounding", "skip_nonfinite", "capturable"
)
_grad, _shape, _is = operator.attrgetter("grad"), operator.attrgetter("shape"), operator.is_
_absmax_of = operator.itemgetter(mom.MOMENTUM_ABSMAX)
_seed_of, _step_of = operator.itemgetter(mom.SR_SEED), operator.itemgetter(mom.STEP)


def _plain_group(group: dict) -> bool:
    return not (
        group["paged"] or group["skip_nonfinite"] or group["capturable"]
        or group.get("cautious_factor", 1.0) < 1.0 or isinstance(group["lr"], torch.Tensor)
    )


class _Plan:
    """One group's params with a grad, their entries and formats, as the last full step had them."""

    def __init__(self, group: dict, bucket, backend):
        from .kernels import cpu_lion  # loaded: the backend was resolved to it

        self.group, self.options, self.backend, self.cpu = group, _options(group), backend, cpu_lion
        self.group_params = list(group["params"])
        grads = list(map(_grad, self.group_params))
        self.grad_types = list(map(type, grads))
        present = [grad is not None for grad in grads]
        self.mask = None if all(present) else present
        # The step's own lists (lion8bit.optimizer._Bucket): the params with a grad, in order.
        self.params, self.entries, self.formats = (
            (bucket.params, bucket.entries, bucket.formats) if bucket else ([], [], [])
        )
        # Each entry's buffer and which ones have an absmax, so that a group of mixed formats
        # (8-bit weights, fp32 biases under min_8bit_size) is read with C-level passes too.
        self.buffer_keys = [mom.MOMENTUM_CODES if fmt in mom.QUANTIZED else mom.MOMENTUM for fmt in self.formats]
        self.quantized = [fmt in mom.QUANTIZED for fmt in self.formats]
        self.codes = [cpu_lion._FORMATS.get(fmt) for fmt in self.formats]
        self.rows = None  # the kernel's checked descriptor rows, made at the first planned step
        # As the full path decides it for this bucket (lion8bit.functional).
        self.keyed = bool(self.params) and (group["stochastic_rounding"] or "4bit" in self.formats)
        self.seeds = self.key_bases = None
        if self.keyed:
            self.seeds = list(map(_seed_of, self.entries))
            self.key_bases = list(map(rounding_key_bases, self.seeds))
            if not group["stochastic_rounding"]:  # only "4bit" momentum rounds, as on the full path
                self.key_bases = cpu_lion._only_4bit_keys(self.key_bases, self.codes)

    def check(self, state):
        """(params, entries, scalars, rows, positions) to step, () for nothing to step, or None
        if the plan does not hold. Changes nothing the step reads."""
        group = self.group
        group_params = group["params"]
        if (
            _options(group) != self.options
            or not _plain_group(group)
            or len(group_params) != len(self.group_params)
            or not all(map(_is, group_params, self.group_params))
        ):
            return None
        grads = list(map(_grad, group_params))
        if list(map(type, grads)) != self.grad_types:
            return None
        params = self.params
        if not params:
            return ()
        if self.mask is not None:
            grads = list(compress(grads, self.mask))
        entries = list(map(state.get, params))
        if list(map(_shape, grads)) != list(map(_shape, params)) or not all(map(_is, entries, self.entries)):
            return None
        if kernels.resolve(group["backend"], _CPU) is not self.backend:
            return None
        if self.keyed and list(map(_seed_of, entries)) != self.seeds:
            return None
        buffers = list(map(operator.getitem, entries, self.buffer_keys))
        absmaxes = list(map(_absmax_of, compress(entries, self.quantized)))
        self.rows, rows, positions = self.cpu.planned_rows(
            self.rows, params, grads, buffers, absmaxes, self.codes, group["block_size"], self.key_bases
        )
        return params, entries, lion_scalars(group), rows, positions

    def run(self, params, entries, scalars, rows, positions) -> None:
        """The full path's step of this group: count the step, one kernel call, bump versions."""
        for entry in entries:
            entry[mom.STEP] += 1
        cpu = self.cpu
        if self.keyed:
            cpu.set_key_steps(rows, positions, list(map(_step_of, entries)))
        flags = cpu._flags(scalars, self.keyed)
        cpu.launch(rows, positions, cpu._host_scalars(scalars), flags, self.group["block_size"])
        increment_version(params)


def step(optimizer) -> bool:
    """Step every group through its plan and return True, or return False having changed
    nothing when a plan is missing or does not hold."""
    plans, groups = optimizer._plans, optimizer.param_groups
    if plans is None or len(plans) != len(groups):
        return False
    ready = []
    try:
        for plan, group in zip(plans, groups, strict=True):
            checked = plan.check(optimizer.state) if plan.group is group else None
            if checked is None:
                return False
            if checked:
                ready.append((plan, checked))
    except (ValueError, KeyError, kernels.UnavailableBackend):
        return False  # the full path says what is wrong
    for plan, checked in ready:
        plan.run(*checked)
    return True


def build(optimizer, stepped: dict) -> list[_Plan] | None:
    """Plans for every group after a full step, from ``stepped``: id(group) -> the step's
    [(has_shards, bucket)] of each group it stepped. None if some group cannot have one."""
    plans = []
    for group in optimizer.param_groups:
        if not _plain_group(group):
            return None
        buckets = stepped.get(id(group), ())
        bucket = backend = None
        if buckets:
            if len(buckets) > 1 or buckets[0][0]:
                return None  # params on several devices, or DTensor params
            bucket = buckets[0][1]
            if bucket.params[0].device != _CPU:
                return None
            backend = kernels.resolve(group["backend"], _CPU)
            if backend.name != "cpu":
                return None
        plan = _Plan(group, bucket, backend)
        with_grads = list(compress(plan.group_params, plan.mask)) if plan.mask else plan.group_params
        if None in plan.codes or len(with_grads) != len(plan.params) or not all(map(_is, with_grads, plan.params)):
            return None  # the grads were read again: a plan describes exactly what this step collected
        plans.append(plan)
    return plans
