"""What one training step feeds a model, and the loss it trains on.

- Hugging Face models by their main input: ``input_ids`` (batch x seq-len tokens; causal LMs get
  ``labels`` and return their own loss) or ``pixel_values`` (batch x the config's image size;
  image classifiers get ``labels``). Models without a loss of their own train on the sum of their
  first output (a sum saves nothing for backward).
- Any other module whose first layer is an ``nn.Embedding``: batch x seq-len tokens, and
  cross-entropy of its output against random targets, as ``examples/train_char_lm.py`` trains.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Batch:
    kind: str  # "tokens" | "images"
    seq_len: int | None
    inputs_text: str  # "4 x 256 tokens", "8 images of 3 x 224 x 224"
    inputs: Callable[[torch.dtype], tuple[tuple, dict]]  # (args, kwargs), given the float dtype
    loss: Callable[[object, tuple, dict], torch.Tensor]  # (output, args, kwargs) -> the loss
    # entered around the forward pass: what the model must be told that real tensors would show it
    context: Callable[[], ContextManager] = field(default=contextlib.nullcontext)


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected a positive integer)")
    return value


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    values = output.values() if isinstance(output, dict) else output
    return next(v for v in values if isinstance(v, torch.Tensor))


def _own_loss_or_sum(output, args, kwargs) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    return loss if loss is not None else _first_tensor(output).sum()


def _need_seq_len(label: str, seq_len: int | None, context: int | None) -> int:
    if seq_len is None:
        raise ValueError(f"Invalid seq_len: none given, and {label} takes token sequences (give --seq-len)")
    _check_size("seq_len", seq_len)
    if context is not None and seq_len > context:
        raise ValueError(f"Invalid seq_len: {seq_len} is beyond the context of {label} ({context} positions)")
    return seq_len


@contextlib.contextmanager
def _one_sequence_per_row():
    """transformers' decoders look for several sequences packed into one row by reading the
    position ids' values (transformers 5.x ``masking_utils.find_packed_sequence_indices``). Fake
    tensors have no values, so transformers assumes packing and builds a full attention mask,
    which real tensors never get (on Llama it also repeats the key / value heads). The budget's
    batch holds one sequence per row: the answer real tensors give, none packed, is given here."""
    masking = sys.modules.get("transformers.masking_utils")
    find = getattr(masking, "find_packed_sequence_indices", None)
    if find is None:
        yield
        return
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = find


def _hf_tokens(module, label: str, batch_size: int, seq_len: int | None) -> Batch:
    config = module.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    seq_len = _need_seq_len(label, seq_len, context)
    causal_lm = type(module).__name__.endswith(("ForCausalLM", "LMHeadModel"))

    def inputs(dtype):
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
        kwargs = {"input_ids": ids, "labels": ids} if causal_lm else {"input_ids": ids}
        if hasattr(config, "use_cache"):
            kwargs["use_cache"] = False  # training: no key/value cache
        return (), kwargs

    return Batch("tokens", seq_len, f"{batch_size} x {seq_len} tokens", inputs, _own_loss_or_sum,
                 _one_sequence_per_row)


def _hf_images(module, label: str, batch_size: int, seq_len: int | None) -> Batch:
    config = module.config
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(config, "num_channels", 3)
    if seq_len is not None:
        raise ValueError(
            f"Invalid seq_len: {label} takes {channels} x {height} x {width} images, not token sequences "
            "(drop --seq-len)"
        )
    classifier = type(module).__name__.endswith("ForImageClassification")

    def inputs(dtype):
        kwargs = {"pixel_values": torch.randn(batch_size, channels, height, width, dtype=dtype)}
        if classifier:
            kwargs["labels"] = torch.randint(0, config.num_labels, (batch_size,))
        return (), kwargs

    text = f"{batch_size} images of {channels} x {height} x {width}"
    return Batch("images", None, text, inputs, _own_loss_or_sum)


def _tokens(embedding: torch.nn.Embedding, label: str, batch_size: int, seq_len: int | None) -> Batch:
    seq_len = _need_seq_len(label, seq_len, None)

    def inputs(dtype):
        return (torch.randint(0, embedding.num_embeddings, (batch_size, seq_len)),), {}

    def loss(output, args, kwargs):
        logits = _first_tensor(output)
        if logits.dim() == 3 and tuple(logits.shape[:2]) == (batch_size, seq_len):
            targets = torch.randint(0, logits.shape[-1], (batch_size * seq_len,))
            return F.cross_entropy(logits.flatten(0, 1), targets)
        if logits.dim() == 2 and logits.shape[0] == batch_size:
            return F.cross_entropy(logits, torch.randint(0, logits.shape[-1], (batch_size,)))
        return logits.sum()

    return Batch("tokens", seq_len, f"{batch_size} x {seq_len} tokens", inputs, loss)


def training_batch(module: torch.nn.Module, label: str, batch_size: int, seq_len: int | None) -> Batch:
    """The batch of one training step of ``module`` (see the module docstring)."""
    _check_size("batch_size", batch_size)
    main_input = getattr(module, "main_input_name", None)
    if getattr(module, "config", None) is not None and main_input == "input_ids":
        return _hf_tokens(module, label, batch_size, seq_len)
    if getattr(module, "config", None) is not None and main_input == "pixel_values":
        return _hf_images(module, label, batch_size, seq_len)
    first = next((m for m in module.modules() if any(True for _ in m.parameters(recurse=False))), None)
    if isinstance(first, torch.nn.Embedding):
        return _tokens(first, label, batch_size, seq_len)
    raise ValueError(
        f"Invalid model for measuring activations: cannot tell what {label} takes as input (measured: "
        "Hugging Face token and image models, and models whose first layer is an nn.Embedding); "
        "give --activation-gb"
    )
