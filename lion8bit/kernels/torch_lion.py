"""backend="torch": the reference (``lion8bit/reference.py``), one tensor at a time, any device."""

from __future__ import annotations

import dataclasses

import torch

from .. import momentum as mom
from ..reference import reference_aligned_count, reference_step
from . import STEP_SCALARS, check_tensors


def _with_device_scalars(scalars, step_scalars):
    # 0-dim fp32 tensors in the reference's arithmetic give the bits of the Python floats they
    # were rounded from (torch rounds a Python float operand of an fp32 op to fp32).
    if step_scalars is None:
        return scalars
    return dataclasses.replace(scalars, **{name: step_scalars[i] for i, name in enumerate(STEP_SCALARS)})




def _keys(rounding_keys, index):
    if rounding_keys is None:
        return None
    return tuple(rounding_keys[index])  # ints, or 0-dim int64 tensors (quant.random_bits takes both)


class TorchBackend:
    name = "torch"

    def device_error(self, device: torch.device, what: str) -> str | None:
        return None

    def aligned_counts(self, params, grads, momenta, formats, *, scalars, block_size, step_scalars=None):
        check_tensors(self.name, params, grads, momenta, formats, block_size)
        scalars = _with_device_scalars(scalars, step_scalars)
        return [
            reference_aligned_count(grad, momentum, scalars, fmt=fmt, block_size=block_size)
            for grad, momentum, fmt in zip(grads, momenta, formats, strict=True)
        ]

    def lion_step(
        self, params, grads, momenta, formats, *, scalars, block_size, rounding_keys, cautious_steps, skip,
        element_offsets=None, step_scalars=None,
    ):
        check_tensors(self.name, params, grads, momenta, formats, block_size, element_offsets)
        scalars = _with_device_scalars(scalars, step_scalars)
        # With a device flag ``skip``, each tensor is updated and then put back where the flag
        # is set: no host synchronisation, at the cost of a copy per tensor.
        for index, (param, grad, momentum, fmt) in enumerate(zip(params, grads, momenta, formats, strict=True)):
            before = None
            if skip is not None:
                before = param.clone(), {key: momentum[key].clone() for key in mom.BUFFER_KEYS[fmt]}
            reference_step(
                param, grad, momentum, scalars, fmt=fmt, block_size=block_size,
                rounding_keys=_keys(rounding_keys, index),
                cautious_steps=None if cautious_steps is None else cautious_steps[index],
                element_offset=0 if element_offsets is None else element_offsets[index],
            )
            if before is not None:
                old_param, old_momentum = before
                param.copy_(torch.where(skip, old_param, param))
                for key, old in old_momentum.items():
                    momentum[key].copy_(torch.where(skip, old, momentum[key]))


def load() -> TorchBackend:
    return TorchBackend()
