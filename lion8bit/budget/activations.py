"""Activations: the bytes autograd holds for backward in one training step, measured, not run.

One training step's forward pass, loss included, runs on fake tensors (``FakeTensorMode``:
shapes, dtypes and devices, no data), so a 7B model at 4096 tokens is measured in seconds on a
CPU without allocating its weights. A ``saved_tensors_hooks`` pack hook sees every tensor autograd
saves for backward; the bytes of the distinct storages still held when the forward pass ends,
less the model's own parameters and buffers (counted as weights), are the activations.

The fake tensors live on the CPU device, so the ops dispatch as a real CPU step would (the same
attention kernel choice, the same autocast lists); ``docs/budget.md`` says what that means for a
GPU step and what the measurement cannot see.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from .batches import Batch, training_batch
from .models import hf_module, quiet_transformers
from .shapes import LAYERS_FIELD

CHECKPOINTING = ("none", "full")
# --dtype -> (dtype of the floating params and buffers, torch.autocast to bf16)
_PRECISION = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "mixed": (torch.bfloat16, True),
}


def check_checkpointing(checkpointing: str) -> str:
    if checkpointing not in CHECKPOINTING:
        raise ValueError(
            f"Invalid checkpointing: {checkpointing!r} (expected one of {', '.join(CHECKPOINTING)})"
        )
    return checkpointing


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one training step of a model at one batch shape."""

    held: int  # saved for backward when the forward pass ends (loss included), deduplicated by storage
    recomputed: int  # checkpointing "full": the largest block's saved bytes, rebuilt during backward
    batch_size: int
    seq_len: int | None  # None: the model takes images of its own size
    checkpointing: str
    kind: str  # "tokens" | "images"
    inputs_text: str  # the batch in words: "4 x 256 tokens", "8 images of 3 x 224 x 224"

    @property
    def nbytes(self) -> int:
        """What the GPU must hold at once: ``held`` plus one recomputed block."""
        return self.held + self.recomputed


class _ContextExceeded(Exception):
    def __init__(self, positions: int):
        super().__init__(positions)
        self.positions = positions


class _NoGraph(Exception):
    pass


class _Watch(TorchDispatchMode):
    """Remembers the op that fake tensors could not run, and catches positions past an embedding's end.

    A position embedding indexed by ``arange(seq_len)`` (or a view of it) longer than the table
    would fail on real tensors; fake tensors have no values to check, so the aranges' ranges are
    remembered by storage. A failing op's error goes on as it is (code above may expect its type).
    """

    def __init__(self):
        super().__init__()
        self.arange_top: dict[StorageWeakRef, int] = {}
        self.failed: tuple[object, Exception] | None = None  # (op, its error)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.embedding.default:
            weight, indices = args[0], args[1]
            top = self.arange_top.get(StorageWeakRef(indices.untyped_storage()))
            if top is not None and top >= weight.shape[0]:
                raise _ContextExceeded(weight.shape[0])
        try:
            out = func(*args, **kwargs)
        except Exception as error:
            self.failed = (func, error)
            raise
        if func.overloadpacket is torch.ops.aten.arange and out.numel():
            numbers = [a for a in args if isinstance(a, (int, float))]
            start, step = (numbers[0] if len(numbers) > 1 else 0), (numbers[2] if len(numbers) > 2 else 1)
            self.arange_top[StorageWeakRef(out.untyped_storage())] = start + step * (out.numel() - 1)
        return out


def _tensors_in(value):
    """The tensors in nested tuples, lists and dicts (a block's arguments: transformers passes
    Llama's rotary (cos, sin) as one tuple)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)


class _SavedTensors:
    """The pack hook: each storage autograd saves, once, with the block that saved it first."""

    def __init__(self, weights: set[StorageWeakRef]):
        self.weights = weights
        self.saved: dict[StorageWeakRef, tuple[int, int | None]] = {}  # -> (bytes, block index)
        self.block: int | None = None
        self.block_inputs: set[StorageWeakRef] = set()

    def pack(self, tensor):
        ref = StorageWeakRef(tensor.untyped_storage())
        if ref not in self.weights and ref not in self.saved:
            # A block's inputs are what checkpointing keeps; its recomputation rebuilds the rest.
            block = None if ref in self.block_inputs else self.block
            self.saved[ref] = (tensor.untyped_storage().nbytes(), block)
        return tensor

    def enter(self, index: int, inputs) -> None:
        self.block = index
        self.block_inputs = {StorageWeakRef(t.untyped_storage()) for t in _tensors_in(inputs)}

    def leave(self) -> None:
        self.block, self.block_inputs = None, set()

    def held(self) -> tuple[int, int]:
        """(bytes of the saved storages still alive, the largest block's share of them)."""
        live = [(nbytes, block) for ref, (nbytes, block) in self.saved.items() if not ref.expired()]
        per_block: dict[int, int] = {}
        for nbytes, block in live:
            if block is not None:
                per_block[block] = per_block.get(block, 0) + nbytes
        return sum(nbytes for nbytes, _ in live), max(per_block.values(), default=0)


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the children of the ``nn.ModuleList`` / ``nn.Sequential`` whose
    children are all of one (non-leaf) class, the one holding the most parameters."""
    best, best_params = [], 0
    for container in module.modules():
        if not isinstance(container, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        children = list(container.children())
        if not children or len({type(c) for c in children}) > 1:
            continue
        if not any(True for _ in children[0].children()):  # a stack of layers, not of blocks
            continue
        params = sum(p.numel() for c in children for p in c.parameters())
        if params > best_params:
            best, best_params = children, params
    return best


@contextlib.contextmanager
def _checkpointed(blocks):
    """Every block's forward through ``torch.utils.checkpoint`` (non-reentrant), then as before."""
    from torch.utils.checkpoint import checkpoint

    before = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block, forward in zip(blocks, before, strict=True):
            del block.forward
            if forward is not None:
                block.forward = forward


@contextlib.contextmanager
def _training_mode(module: torch.nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _forward(module, batch: Batch, dtype: str, blocks, checkpoint: bool, watch: _Watch) -> tuple[int, int]:
    param_dtype, autocast = _PRECISION[dtype]
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        # The module's own tensors stay untouched (meta, or the caller's real ones).
        tensors = {
            name: torch.empty_like(t, device="cpu", dtype=param_dtype if t.is_floating_point() else t.dtype)
            .requires_grad_(isinstance(t, torch.nn.Parameter) and t.requires_grad)
            for name, t in [*module.named_parameters(), *module.named_buffers()]
        }
    saved = _SavedTensors({StorageWeakRef(t.untyped_storage()) for t in tensors.values()})
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda _, args, kwargs, index=index: saved.enter(index, [*args, *kwargs.values()]),
            with_kwargs=True,
        ))
        handles.append(block.register_forward_hook(lambda *_: saved.leave()))
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(quiet_transformers())
            stack.enter_context(fake)
            stack.enter_context(watch)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(_training_mode(module))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t))
            stack.enter_context(torch.autocast("cpu", torch.bfloat16, enabled=autocast))
            stack.enter_context(batch.context())
            if checkpoint:
                stack.enter_context(_checkpointed(blocks))
            args, kwargs = batch.inputs(param_dtype)
            output = torch.func.functional_call(module, tensors, args, kwargs, strict=False)
            # A training step keeps the loss, not the output (the logits): what stays saved is
            # what the loss's graph holds.
            graph = batch.loss(output, args, kwargs).grad_fn
            del output
            if graph is None:
                raise _NoGraph
            return saved.held()
    finally:
        for handle in handles:
            handle.remove()


def measure(
    module: torch.nn.Module,
    label: str,
    *,
    batch_size: int,
    seq_len: int | None,
    dtype: str,
    checkpointing: str,
) -> Activations:
    """The activations of one training step of ``module`` (see the module docstring).

    ``ValueError`` with a one-line message for what cannot be measured: a bad size, a sequence
    longer than the model's context, an op that fake tensors cannot run.
    """
    check_checkpointing(checkpointing)
    batch = training_batch(module, label, batch_size, seq_len)
    blocks = repeated_blocks(module)
    if checkpointing == "full" and not blocks:
        raise ValueError(
            f"Invalid checkpointing: full, but {label} has no repeated blocks to checkpoint "
            "(an nn.ModuleList or nn.Sequential of one module class)"
        )
    watch = _Watch()
    try:
        held, largest_block = _forward(module, batch, dtype, blocks, False, watch)
        recomputed = 0
        if checkpointing == "full":
            recomputed = largest_block
            held, _ = _forward(module, batch, dtype, blocks, True, watch)
    except _ContextExceeded as error:
        raise ValueError(
            f"Invalid seq_len: {seq_len} is beyond the context of {label} ({error.positions} positions)"
        ) from None
    except _NoGraph:
        raise ValueError(
            f"Invalid model for measuring activations: the loss of {label} does not depend on any trainable "
            "parameter"
        ) from None
    except Exception as error:  # the model's own code: anything can go wrong, in one line
        if watch.failed is not None and watch.failed[1] is error:
            op, error = watch.failed
            raise ValueError(
                f"Invalid model for measuring activations: {label} cannot run on fake tensors: {op} "
                f"failed ({type(error).__name__}: {error}); give --activation-gb instead"
            ) from None
        raise ValueError(
            f"Invalid model for measuring activations: the forward pass of {label} on fake tensors raised "
            f"{type(error).__name__}: {error}; give --activation-gb instead"
        ) from None
    return Activations(
        held, recomputed, batch_size, batch.seq_len, checkpointing, batch.kind, batch.inputs_text
    )


@functools.lru_cache(maxsize=None)
def _config_activations(config_json: str, label: str, batch_size: int, seq_len, dtype: str, checkpointing):
    config = json.loads(config_json)
    field = LAYERS_FIELD[config["model_type"]]

    def with_layers(layers: int) -> Activations:
        module = hf_module({**config, field: layers}, label, "measuring the activations of a catalog model")
        return measure(module, label, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                       checkpointing=checkpointing)

    one = with_layers(1)
    if config[field] == 1:
        return one
    two = with_layers(2)
    held = one.held + (config[field] - 1) * (two.held - one.held)
    return Activations(
        held, two.recomputed, batch_size, two.seq_len, checkpointing, two.kind, two.inputs_text
    )


def config_activations(
    config: Mapping, label: str, *, batch_size: int, seq_len: int | None, dtype: str, checkpointing: str
) -> Activations:
    """The activations of the transformers model of a catalog-family config, from its 1- and
    2-layer versions: its blocks are identical, so each adds what the second one adds (exact
    for such models, checked in ``tests/test_budget_activations.py``; a 70B model costs two
    small forward passes)."""
    return _config_activations(json.dumps(dict(config), sort_keys=True), label, batch_size, seq_len, dtype,
                               checkpointing)
