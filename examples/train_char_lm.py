"""Train a small GPT-style character language model on the King James Bible with several optimizers.

Every optimizer starts from the same initial weights and sees the same batches (per seed), under
the same warmup + cosine schedule and gradient clipping. Writes PREFIX.csv (train and validation
loss every --eval-every steps), PREFIX.png (validation-loss curves) and PREFIX.md (the final table:
validation loss, wall time, optimizer-state bytes, and the check against lion-pytorch).

Data: sudo apt-get install bible-kjv bible-kjv-text   (or --data synthetic for a smoke test)

    python examples/train_char_lm.py                     # the README's evidence (3 seeds)
    python examples/train_char_lm.py --quick             # a CI smoke run, under a minute
"""

from __future__ import annotations

import argparse
import copy
import time

import _common as common
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --quick: a smaller model and a few steps, to show the script works end to end (not evidence).
QUICK = dict(data="auto", steps=16, warmup=4, eval_every=8, eval_batches=2, batch_size=16,
             context=32, layers=2, dim=64, seeds=[0])


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(self.ln1(x)).view(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.token(idx) + self.position(positions))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="a CI smoke run: small model, few steps, one seed (data: auto)"
    )
    parser.add_argument(
        "--data",
        choices=("kjv", "synthetic", "auto"),
        default="kjv",
        help="kjv: the Debian text; synthetic: generated smoke-test text; auto: kjv if installed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seeds", type=common.parse_seeds, default="0,1,2", help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=30, help="linear warmup steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: %(default)s)")
    parser.add_argument("--context", type=int, default=64, help="characters per sequence (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=128, help="model width (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between evaluations (default: %(default)s)")
    parser.add_argument(
        "--eval-batches", type=int, default=16, help="validation batches per evaluation (default: %(default)s)"
    )
    common.add_optimizer_arguments(parser, lion_lr=3e-3, lion_wd=0.3, adamw_lr=1e-2, adamw_wd=0.1)
    common.add_output_arguments(parser, "char_lm")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


# Distinct characters of the King James Bible text as load_kjv() gives it (encode(load_kjv()) on
# Debian's bible-kjv-text): the vocabulary of the README's runs.
KJV_VOCAB = 63


def budget_model() -> CharGPT:
    """The model of the README's runs (this script's defaults), for the memory budget:

    lion8bit budget examples/train_char_lm.py:budget_model --batch-size 32 --seq-len 64
    """
    parser = build_parser()
    return CharGPT(KJV_VOCAB, *(parser.get_default(name) for name in ("context", "dim", "layers", "heads")))


def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    chars = sorted(set(text))
    lookup = np.zeros(256, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    return torch.from_numpy(lookup[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]), chars


def windows(data: torch.Tensor, starts: torch.Tensor, context: int):
    index = starts[:, None] + torch.arange(context + 1)
    chunk = data[index]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    model.train()
    return float(np.mean(losses))


def main(argv=None) -> None:
    args = parse_args(argv)
    data_name, text, label = common.load_data(
        args.data,
        "kjv",
        common.kjv_available,
        common.load_kjv,
        common.synthetic_text,
        "King James Bible (Debian bible-kjv-text)",
    )
    prefix = common.output_prefix(args, "char_lm")

    data, chars = encode(text)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    val_gen = torch.Generator().manual_seed(12345)
    val_batches = [
        windows(val, torch.randint(len(val) - args.context - 1, (args.batch_size,), generator=val_gen), args.context)
        for _ in range(args.eval_batches)
    ]

    rows, curves, finals = [], {}, {}
    total = len(args.seeds) * len(args.optimizers) * args.steps
    bar = common.progress_bar(total)
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = CharGPT(len(chars), args.context, args.dim, args.layers, args.heads)
        initial = copy.deepcopy(model.state_dict())
        for name in args.optimizers:
            model.load_state_dict(initial)
            optimizer = common.make_optimizer(name, model, args)
            schedule = common.warmup_cosine(optimizer, args.warmup, args.steps)
            batch_gen = torch.Generator().manual_seed(seed)
            curve = [(0, evaluate(model, val_batches))]
            rows.append(
                dict(data=data_name, optimizer=name, seed=seed, step=0, lr="", train_loss="", val_loss=curve[0][1])
            )
            train_losses, seconds, optimizer_seconds = [], 0.0, 0.0
            bar.set_postfix_str(f"seed {seed} {name}")
            for step in range(1, args.steps + 1):
                start = time.perf_counter()
                starts = torch.randint(len(train) - args.context - 1, (args.batch_size,), generator=batch_gen)
                x, y = windows(train, starts, args.context)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                lr, step_seconds = common.train_step(model, optimizer, schedule, loss, args.grad_clip)
                optimizer_seconds += step_seconds
                seconds += time.perf_counter() - start
                train_losses.append(loss.item())
                bar.update()
                if step % args.eval_every == 0 or step == args.steps:
                    val_loss = evaluate(model, val_batches)
                    curve.append((step, val_loss))
                    rows.append(
                        dict(
                            data=data_name,
                            optimizer=name,
                            seed=seed,
                            step=step,
                            lr=lr,
                            train_loss=float(np.mean(train_losses)),
                            val_loss=val_loss,
                        )
                    )
                    train_losses = []
                    bar.set_postfix_str(f"seed {seed} {name} val {val_loss:.3f}")
            curves.setdefault(name, {})[seed] = curve
            finals.setdefault(name, {})[seed] = dict(
                val_loss=curve[-1][1],
                seconds=seconds,
                optimizer_seconds=optimizer_seconds,
                state_bytes=common.optimizer_state_bytes(optimizer),
            )
            # Written after every run so a long run's finished part survives an interruption.
            common.write_csv(
                prefix.with_suffix(".csv"), rows, ["data", "optimizer", "seed", "step", "lr", "train_loss", "val_loss"]
            )
    bar.close()

    params = sum(p.numel() for p in model.parameters())
    title = f"char LM, {params / 1e6:.2f}M params, {label}: validation loss (nats/char)"
    common.plot_curves(prefix.with_suffix(".png"), curves, title=title, ylabel="validation loss (nats/char)")
    table = common.comparison_table(
        finals,
        metric="val_loss",
        metric_label="final val loss (nats/char)",
        bound=lambda sigma: max(2 * sigma, 0.02),
        bound_text="max(2σ, 0.02)",
    )
    description = (
        f"Data: {label}. Model: {args.layers} layers, d={args.dim}, context {args.context}, "
        f"{params:,} params; {args.steps} steps of {args.batch_size} sequences; seeds {args.seeds}."
    )
    common.write_report(prefix, "train_char_lm.py", argv, description, table)


if __name__ == "__main__":
    main()
