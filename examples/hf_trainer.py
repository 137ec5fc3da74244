"""Train a GPT-2-shaped character LM with the Hugging Face Trainer and Lion8bit; checkpoint and resume.

The model is built from a GPT2Config (nothing is downloaded); the text is the King James Bible
from Debian (sudo apt-get install bible-kjv bible-kjv-text), one character per token, the last 10%
held out, or generated smoke-test text (--data synthetic). Two ways to hand Lion8bit to the Trainer:

- optimizer_cls_and_kwargs=(Lion8bit, {"params": param_groups(...), "lr": ..., "betas": ...})
  (the default here). The Trainer then ignores TrainingArguments.learning_rate, and without
  "params" it builds its own groups whose weight decay is TrainingArguments.weight_decay;
- a Trainer subclass (--optim-args): lr and weight decay from TrainingArguments as usual, Lion's
  own knobs from TrainingArguments.optim_args, e.g. "beta2=0.98,embedding_state=fp32".

Do not use TrainingArguments(optim="lion_8bit" / "paged_lion_8bit"): they build bitsandbytes' Lion
with the Adam betas, so beta2 becomes 0.999 instead of Lion's 0.99.

    python examples/hf_trainer.py                   # 300 steps, a checkpoint every 100
    python examples/hf_trainer.py --resume          # continue from the last checkpoint in --output-dir
    python examples/hf_trainer.py --optim-args "beta1=0.95,beta2=0.98"   # the subclass route
    python examples/hf_trainer.py --quick           # a smoke run: small model, 8 steps

Needs transformers and accelerate (pip install transformers accelerate; both in the "test" extra).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

try:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
except ImportError as error:  # the Trainer also needs accelerate
    raise SystemExit(
        f"error: examples/hf_trainer.py needs transformers and accelerate ({error}): "
        "pip install transformers accelerate"
    ) from None

import _common as common
import train_char_lm as char_lm

import lion8bit

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
QUICK = dict(
    data="auto",
    steps=8,
    warmup=2,
    save_steps=4,
    eval_steps=4,
    logging_steps=2,
    batch_size=8,
    context=32,
    layers=2,
    dim=64,
    eval_chunks=16,
)


class CharChunks(torch.utils.data.Dataset):
    """Consecutive ``context``-character chunks of an encoded text, as causal-LM examples."""

    def __init__(self, data: torch.Tensor, context: int, limit: int | None = None):
        self.data, self.context = data, context
        self.count = (len(data) - 1) // context if limit is None else min(limit, (len(data) - 1) // context)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        chunk = self.data[index * self.context : (index + 1) * self.context]
        return {"input_ids": chunk, "labels": chunk}  # the model shifts the labels itself


def build_model(vocab: int, context: int, dim: int, layers: int, heads: int, seed: int) -> GPT2LMHeadModel:
    """GPT-2's architecture at the given size (its output layer is tied to the token embedding)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=context,
        n_embd=dim,
        n_layer=layers,
        n_head=heads,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lion_kwargs(
    model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.99), **group_options
) -> dict:
    """The kwargs of ``optimizer_cls_and_kwargs=(Lion8bit, ...)``: groups, lr and betas.

    "params" replaces the Trainer's own groups (whose weight decay would be
    TrainingArguments.weight_decay); the Trainer pops it from this dict, so build a new dict
    for each Trainer. ``group_options`` go to ``lion8bit.param_groups`` (``embedding_state``).
    """
    groups = lion8bit.param_groups(model, weight_decay=weight_decay, **group_options)
    return {"params": groups, "lr": lr, "betas": tuple(betas)}


def _flag(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"Invalid flag value: {text!r} (expected true or false)")
    return text.lower() == "true"


def _state_or_none(text: str) -> str | None:
    return None if text.lower() == "none" else text


# TrainingArguments.optim_args keys the subclass understands, and how to read each value.
OPTIM_ARGS = {
    "beta1": float,
    "beta2": float,
    "state": str,
    "embedding_state": _state_or_none,
    "cautious_factor": float,
    "stochastic_rounding": _flag,
    "skip_nonfinite": _flag,
}


def parse_optim_args(text: str | None) -> dict:
    """ "beta2=0.98,embedding_state=fp32" -> {"beta2": 0.98, "embedding_state": "fp32"}."""
    options = {}
    for item in filter(None, (text or "").replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        if key not in OPTIM_ARGS or not value:
            raise ValueError(
                f"Invalid optim_args item: {item!r} (expected key=value with key in {', '.join(OPTIM_ARGS)})"
            )
        options[key] = OPTIM_ARGS[key](value)
    return options


class LionTrainer(Trainer):
    """A Trainer that steps with lion8bit.Lion: lr and weight decay from TrainingArguments
    (learning_rate, weight_decay), the rest from TrainingArguments.optim_args (``OPTIM_ARGS``)."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            options = parse_optim_args(self.args.optim_args)
            betas = (options.pop("beta1", 0.9), options.pop("beta2", 0.99))
            group_options = {key: options.pop(key) for key in ("embedding_state",) if key in options}
            groups = lion8bit.param_groups(
                self.model if model is None else model, weight_decay=self.args.weight_decay, **group_options
            )
            self.optimizer = lion8bit.Lion(groups, lr=self.args.learning_rate, betas=betas, **options)
        return self.optimizer


def training_arguments(args: argparse.Namespace, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(args.output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        optim_args=args.optim_args,
        lr_scheduler_type="cosine_with_min_lr",  # as train_char_lm.py: down to 10% of the peak
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=args.warmup,
        max_grad_norm=1.0,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        seed=args.seed,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(args: argparse.Namespace, model, train_set, eval_set, **overrides) -> Trainer:
    """The subclass route when ``args.optim_args`` is set, else ``optimizer_cls_and_kwargs``."""
    training_args = training_arguments(args, **overrides)
    if args.optim_args is not None:
        return LionTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set)
    group_options = {} if args.embedding_state is None else {"embedding_state": args.embedding_state}
    kwargs = lion_kwargs(model, lr=args.lr, weight_decay=args.weight_decay, betas=args.betas, **group_options)
    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        optimizer_cls_and_kwargs=(lion8bit.Lion8bit, kwargs),
    )


def parse_betas(text: str) -> tuple[float, float]:
    try:
        betas = tuple(float(b) for b in text.split(","))
    except ValueError:
        betas = ()
    if len(betas) != 2:
        raise argparse.ArgumentTypeError(f"Invalid betas: {text!r} (expected e.g. 0.9,0.99)")
    return betas


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small model, 8 steps (data: auto)")
    parser.add_argument(
        "--data",
        choices=("kjv", "synthetic", "auto"),
        default="kjv",
        help="kjv: the Debian text; synthetic: generated text; auto: kjv if installed (default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="checkpoints go here (default: examples/checkpoints/hf_trainer[_quick])",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output-dir"
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=30, help="linear warmup steps (default: %(default)s)")
    parser.add_argument(
        "--save-steps", type=int, default=100, help="steps between checkpoints (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-steps", type=int, default=50, help="steps between evaluations (default: %(default)s)"
    )
    parser.add_argument(
        "--logging-steps", type=int, default=10, help="steps between log lines (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="sequences per step (default: %(default)s)"
    )
    parser.add_argument(
        "--context", type=int, default=64, help="characters per sequence (default: %(default)s)"
    )
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=128, help="model width (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    parser.add_argument(
        "--eval-chunks",
        type=int,
        default=256,
        help="held-out sequences per evaluation (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="model init and data order (default: %(default)s)"
    )
    group = parser.add_argument_group("optimizer (Lion: lr 3-10x below AdamW's, weight decay 3-10x above)")
    group.add_argument(
        "--lr", type=float, default=3e-3, help="peak lr (default: %(default)g, train_char_lm.py's)"
    )
    group.add_argument(
        "--weight-decay", type=float, default=0.3, help="for matrices and embeddings (default: %(default)g)"
    )
    group.add_argument(
        "--betas", type=parse_betas, default=(0.9, 0.99), help="beta1,beta2 (default: 0.9,0.99)"
    )
    group.add_argument(
        "--embedding-state",
        choices=("8bit", "bf16", "fp32"),
        default=None,
        help="momentum storage of the embeddings (default: lion8bit.param_groups' default)",
    )
    group.add_argument(
        "--optim-args",
        default=None,
        help=f"use the Trainer subclass and pass this as TrainingArguments.optim_args; keys: "
        f"{', '.join(OPTIM_ARGS)} (--betas and --embedding-state are then ignored)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = CHECKPOINTS / ("hf_trainer_quick" if args.quick else "hf_trainer")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    _, text, label = common.load_data(
        args.data,
        "kjv",
        common.kjv_available,
        common.load_kjv,
        common.synthetic_text,
        "King James Bible (Debian bible-kjv-text)",
    )
    data, chars = char_lm.encode(text)
    split = int(0.9 * len(data))
    train_set = CharChunks(data[:split], args.context)
    eval_set = CharChunks(data[split:], args.context, limit=args.eval_chunks)
    model = build_model(len(chars), args.context, args.dim, args.layers, args.heads, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"data: {label}; GPT-2-shaped model, {params:,} params; {len(train_set):,} training sequences")

    trainer = make_trainer(args, model, train_set, eval_set)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    loss = trainer.evaluate()["eval_loss"]
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    state = common.optimizer_state_bytes(optimizer)
    print(
        f"step {trainer.state.global_step}: eval loss {loss:.4f} nats/char "
        f"(perplexity {math.exp(loss):.2f}); "
        f"{type(optimizer).__name__} state {state / 1e6:.2f} MB for {params / 1e6:.2f}M params; "
        f"checkpoints in {args.output_dir}"
    )


if __name__ == "__main__":
    main()
