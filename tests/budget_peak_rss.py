"""A real fp32 training step on CPU, for tests/test_budget_activations.py: the bytes autograd saves
for backward, and the peak resident memory of the step.

Run in a fresh process, so that the resident memory is this model's:

    python tests/budget_peak_rss.py MODEL BATCH_SIZE [SEQ_LEN] [--grads kept|freed] [--malloc trimmed|glibc]

MODEL: a catalog name (built by transformers from its config, real weights) or "charlm"
(examples/train_char_lm.py's budget_model). A warm-up step on a one-layer copy loads the kernels
and starts the thread pools; the resident size is read; the model is built and trained for two
steps with Lion8bit (forward, loss, backward, step), the first creating the optimizer state. The
peak is the second step's (VmHWM, reset after the first step): a steady step, weights and state
resident, and the grads too with ``--grads kept``. Prints one JSON line: the resident bytes before
the model existed, the peak of the second step, and the bytes of the distinct storages autograd
saved for backward and still held when its loss was computed (the model's own tensors aside).
"""

import argparse
import ctypes
import gc
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

import lion8bit
from lion8bit.budget import CATALOG, LAYERS_FIELD

ROOT = Path(__file__).resolve().parents[1]


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def build(name: str, layers: int | None = None):
    """(model, batch maker) for a real training step."""
    if name == "charlm":
        sys.path.insert(0, str(ROOT / "examples"))
        import train_char_lm

        model = train_char_lm.budget_model()
        if layers is not None:
            model.blocks = model.blocks[:layers]
        vocab = model.token.num_embeddings

        def step_loss(batch_size, seq_len):
            tokens = torch.randint(0, vocab, (batch_size, seq_len))
            targets = torch.randint(0, vocab, (batch_size * seq_len,))
            return F.cross_entropy(model(tokens).flatten(0, 1), targets)

        return model, step_loss
    import transformers

    transformers.logging.set_verbosity_error()
    fields = dict(CATALOG[name])
    if layers is not None:
        fields[LAYERS_FIELD[fields["model_type"]]] = layers
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = getattr(transformers, fields["architectures"][0])(config)
    if model.main_input_name == "pixel_values":

        def step_loss(batch_size, seq_len):
            pixels = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)
            return model(pixel_values=pixels, labels=torch.randint(0, config.num_labels, (batch_size,))).loss

        return model, step_loss

    def step_loss(batch_size, seq_len):
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    return model, step_loss


def saved_for_backward(model, make_loss):
    """(loss, bytes of the distinct storages autograd saved for backward and still holds once the
    loss exists, the model's parameters and buffers aside). The hook keeps no tensor alive."""
    own = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor):
        ref = StorageWeakRef(tensor.untyped_storage())
        if ref not in own:
            saved.setdefault(ref, tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = make_loss()
    return loss, sum(nbytes for ref, nbytes in saved.items() if not ref.expired())


def step(model, optimizer, step_loss, batch_size, seq_len) -> int:
    """One training step; returns the bytes saved for backward."""
    loss, held = saved_for_backward(model, lambda: step_loss(batch_size, seq_len))
    loss.backward()
    optimizer.step()
    return held


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("batch_size", type=int)
    parser.add_argument("seq_len", type=int, nargs="?")
    parser.add_argument("--grads", choices=("kept", "freed"), default="kept",
                        help="kept: zero_grad(set_to_none=False), the grads stay allocated through the "
                        "next forward pass (as with gradient accumulation); freed: set_to_none=True")
    parser.add_argument("--malloc", choices=("trimmed", "glibc"), default="trimmed",
                        help="trimmed: freed buffers of 1 MiB and more go back to the OS; glibc: defaults")
    args = parser.parse_args()
    if args.malloc == "trimmed":
        # The resident size then follows the live tensors (as in benchmarks/bench_step.py); glibc's
        # default keeps freed buffers of up to 32 MiB in its heap (docs/budget.md has both).
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    torch.manual_seed(0)
    warm, warm_loss = build(args.model, layers=1)
    warm.train()
    step(warm, lion8bit.Lion8bit(warm.parameters(), lr=1e-4), warm_loss, 1, 8 if args.seq_len else None)
    del warm, warm_loss
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")

    model, step_loss = build(args.model)
    model.train()
    optimizer = lion8bit.Lion8bit(model.parameters(), lr=1e-4)
    step(model, optimizer, step_loss, args.batch_size, args.seq_len)  # creates the state
    optimizer.zero_grad(set_to_none=args.grads == "freed")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the next step's peak only
    saved = step(model, optimizer, step_loss, args.batch_size, args.seq_len)
    peak = status_kib("VmHWM")
    print(json.dumps({"before": before * 1024, "peak": peak * 1024, "saved": saved}))


if __name__ == "__main__":
    main()
