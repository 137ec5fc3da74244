"""The functional Lion step: what every backend shares, then one call into the backend.

:class:`lion8bit.Lion` collects a group's params, grads and state and calls :func:`lion`; the
backends (:mod:`lion8bit.kernels`) only compute. What is decided here, once for all of them:

- which backend runs (:func:`lion8bit.kernels.resolve`);
- the skip decision of ``skip_nonfinite``: on the host for CPU tensors (reading a CPU flag waits
  for nothing), as a device flag the backend reads otherwise (no host synchronisation);
- the stochastic-rounding keys (:func:`lion8bit.reference.rounding_keys`);
- the cautious pre-pass and step sizes (:func:`lion8bit.reference.cautious_step_sizes`), with
  counts summed over shards by ``reduce_counts``;
- contiguous staging: the backends index flat, row-major tensors (as the spec's blocks do), so
  non-contiguous params, grads or momentum go through contiguous copies, written back after;
- the version-counter bump of every updated param, so autograd catches a graph that saved a
  param before the step (``backward`` through it raises) whichever backend wrote it.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Callable

import torch
from torch.autograd.graph import increment_version

from . import kernels
from . import momentum as mom
from .reference import (
    LionScalars,
    cautious_step_sizes,
    device_step_scalars,
    rounding_key_bases,
    rounding_keys,
    rounding_keys_on_device,
)

# The momentum buffers of each format, as backends receive them (lion8bit/momentum.py).
BUFFER_KEYS = mom.BUFFER_KEYS


class _Staging:
    """Contiguous stand-ins for non-contiguous tensors, and the copies back after the step."""

    def __init__(self):
        self._written = []

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.is_contiguous() else tensor.contiguous()

    def write(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_contiguous():
            return tensor
        dense = tensor.contiguous()
        self._written.append((tensor, dense))
        return dense

    def finish(self) -> None:
        for tensor, dense in self._written:
            tensor.copy_(dense)


# (device, seeds) -> int64 [n, 2] rounding_key_bases: made once, so a captured step copies nothing
# from the host.
_KEY_BASES: dict[tuple, torch.Tensor] = {}


def _key_bases(seeds: list[int], device: torch.device) -> torch.Tensor:
    key = (device, tuple(seeds))
    bases = _KEY_BASES.get(key)
    if bases is None:
        if len(_KEY_BASES) > 256:
            _KEY_BASES.clear()
        bases = _KEY_BASES[key] = torch.tensor([rounding_key_bases(s) for s in seeds], dtype=torch.int64, device=device)
    return bases


def _buffers_contiguous(entries: list[dict], formats: list[str]) -> bool:
    if formats and formats.count(formats[0]) == len(formats) and not torch.compiler.is_compiling():
        # One format (the common group): a C-level pass per buffer key (eager only: Dynamo cannot
        # trace an itemgetter call, torch 2.13).
        keys = BUFFER_KEYS[formats[0]]
        return all(all(map(torch.Tensor.is_contiguous, map(itemgetter(key), entries))) for key in keys)
    return all(
        entry[key].is_contiguous() for entry, fmt in zip(entries, formats, strict=True) for key in BUFFER_KEYS[fmt]
    )


def lion(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    entries: list[dict],
    formats: list[str],
    *,
    scalars: LionScalars,
    block_size: int,
    stochastic_rounding: bool,
    backend: str = "auto",
    numels: list[int] | None = None,
    reduce_counts: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    skip: torch.Tensor | None = None,
    element_offsets: list[int] | None = None,
    capturable: bool = False,
) -> None:
    """One Lion step for tensors on one device that share a group's options.

    ``entries``: per tensor, its state entry (``step`` already counting this step, ``sr_seed``
    with stochastic rounding, and the momentum buffers of its format). ``backend``: "auto" or a
    name of :data:`lion8bit.kernels.BACKENDS`. With caution, ``reduce_counts`` (sharded params)
    turns local aligned counts into whole-parameter counts, and ``numels`` gives the whole
    parameters' sizes (default: the tensors' own). ``skip`` (a bool 0-dim tensor) leaves
    everything unchanged when true. ``element_offsets``: where each tensor starts in the whole
    parameter's flat elements (a shard's place; default 0), for stochastic rounding's bits.
    ``capturable``: every value the step reads lives on the params' device — the scalars (a
    tensor lr is read there), the step counters (0-dim int64 tensors in the entries) and the
    rounding keys made from them — so the step can be captured in a CUDA graph and replayed.
    """
    if not params:
        return
    device = params[0].device
    implementation = kernels.resolve(backend, device)
    device_skip = None
    if skip is not None:
        if device.type == "cpu":
            if bool(skip):  # a CPU tensor: nothing to wait for
                return
        else:
            device_skip = skip.to(device, non_blocking=True)

    # Staging costs a check per tensor, so the common case (everything contiguous) is a pass of
    # C-level is_contiguous calls; entries are handed on as they are (backends read the buffer
    # keys of each format and ignore the rest).
    staging = _Staging()
    contiguous = torch.Tensor.is_contiguous
    local_params = params if all(map(contiguous, params)) else [staging.write(param) for param in params]
    local_grads = grads if all(map(contiguous, grads)) else [staging.read(grad) for grad in grads]
    momenta = entries
    if not _buffers_contiguous(entries, formats):
        momenta = [
            {key: staging.write(entry[key]) for key in BUFFER_KEYS[fmt]}
            for entry, fmt in zip(entries, formats, strict=True)
        ]
    common = dict(scalars=scalars, block_size=block_size)
    if capturable or isinstance(scalars.lr, torch.Tensor):
        common["step_scalars"] = device_step_scalars(scalars, device)

    cautious_steps = None
    if scalars.cautious:
        counts = implementation.aligned_counts(local_params, local_grads, momenta, formats, **common)
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        sizes = numels if numels is not None else [p.numel() for p in params]
        cautious_steps = [
            cautious_step_sizes(count, size, scalars.lr, scalars.cautious_factor, torch.float32)
            for count, size in zip(counts, sizes, strict=True)
        ]
    keys = None
    # "4bit" momentum always rounds stochastically (scalars.stochastic_rounding says whether the
    # params do too), so its tensors need keys whatever the option says.
    stochastic_rounding = stochastic_rounding or "4bit" in formats
    if stochastic_rounding and capturable:
        steps = torch.stack([entry[mom.STEP] for entry in entries])
        keys = rounding_keys_on_device(_key_bases([entry[mom.SR_SEED] for entry in entries], device), steps)
    elif stochastic_rounding:
        keys = [rounding_keys(entry[mom.SR_SEED], entry[mom.STEP]) for entry in entries]
    implementation.lion_step(
        local_params,
        local_grads,
        momenta,
        formats,
        **common,
        rounding_keys=keys,
        cautious_steps=cautious_steps,
        skip=device_skip,
        element_offsets=element_offsets,
    )
    staging.finish()
    increment_version(params)
