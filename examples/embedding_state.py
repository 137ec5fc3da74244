"""Evidence for lion8bit.param_groups' embedding default: 8-bit or fp32 momentum for embeddings?

The character LM of train_char_lm.py, with its model, data, schedule and hyper-parameters
(taken from its own argument defaults), trained with Lion under three state policies, paired
(same initial weights and batches per seed):

- 8bit:            Lion8bit(param_groups(model, weight_decay=wd, embedding_state="8bit"))
- fp32-embeddings: Lion8bit(param_groups(model, weight_decay=wd, embedding_state="fp32"))
- fp32:            Lion(param_groups(model, weight_decay=wd, embedding_state=None), state="fp32")

`--tokens words` runs the same model on word tokens instead (a ~13,000-word vocabulary, most words
rare: the regime in which bitsandbytes advises 32-bit state for embeddings). Writes PREFIX.csv
(losses every --eval-every steps) and PREFIX.md (the table, the command and the machine).

    python examples/embedding_state.py                  # characters, 3 seeds (~30 min, 1 thread)
    python examples/embedding_state.py --tokens words   # words
    python examples/embedding_state.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
import time
from pathlib import Path

import _common as common
import torch
import torch.nn.functional as F
import train_char_lm as char_lm

import lion8bit

ARMS = ("8bit", "fp32-embeddings", "fp32")
REFERENCE = "fp32"
FIELDS = ["tokens", "data", "arm", "seed", "step", "lr", "train_loss", "val_loss"]


def parse_arms(text: str) -> list[str]:
    arms = [arm.strip() for arm in text.split(",") if arm.strip()]
    if not arms or any(arm not in ARMS for arm in arms):
        raise argparse.ArgumentTypeError(f"Invalid arms: {text!r} (choose from {', '.join(ARMS)})")
    return arms


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(this script's options, train_char_lm.py's defaults with --quick if asked)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="train_char_lm.py's --quick settings, one seed (data: auto)"
    )
    parser.add_argument("--tokens", choices=("chars", "words"), default="chars", help="default: %(default)s")
    parser.add_argument(
        "--arms",
        type=parse_arms,
        default=",".join(ARMS),
        help=f"comma-separated state policies, from {', '.join(ARMS)} (default: all)",
    )
    parser.add_argument(
        "--data",
        choices=("kjv", "synthetic", "auto"),
        default=None,
        help="as train_char_lm.py (default: kjv; auto under --quick)",
    )
    parser.add_argument(
        "--seeds", type=common.parse_seeds, default=None, help="default: 0,1,2 (0 under --quick)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output prefix (default: examples/results/embedding_state[_words][_quick])",
    )
    args = parser.parse_args(argv)
    base = char_lm.parse_args(["--optimizers", "lion8bit", *(["--quick"] if args.quick else [])])
    if args.data is not None:
        base.data = args.data
    if args.seeds is not None:
        base.seeds = args.seeds
    if args.out is None:
        name = (
            "embedding_state"
            + ("_words" if args.tokens == "words" else "")
            + ("_quick" if args.quick else "")
        )
        args.out = common.RESULTS_DIR / name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    return args, base


def encode_words(text: str) -> tuple[torch.Tensor, list[str]]:
    """Words, punctuation marks and newlines as tokens (spaces dropped)."""
    tokens = re.findall(r"[A-Za-z]+|[^\sA-Za-z]|\n", text)
    vocab = sorted(set(tokens))
    index = {token: i for i, token in enumerate(vocab)}
    return torch.tensor([index[t] for t in tokens], dtype=torch.int64), vocab


def make_optimizer(arm: str, model: torch.nn.Module, base: argparse.Namespace) -> torch.optim.Optimizer:
    options = dict(lr=base.lion_lr, betas=(base.beta1, base.beta2))
    if arm == "fp32":
        return lion8bit.Lion(
            lion8bit.param_groups(model, weight_decay=base.lion_wd, embedding_state=None),
            state="fp32",
            **options,
        )
    embedding_state = {"8bit": "8bit", "fp32-embeddings": "fp32"}[arm]
    groups = lion8bit.param_groups(model, weight_decay=base.lion_wd, embedding_state=embedding_state)
    return lion8bit.Lion8bit(groups, **options)


def embedding_state_bytes(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    embeddings = [model.token.weight, model.position.weight]
    return sum(t.nbytes for p in embeddings for t in optimizer.state[p].values() if torch.is_tensor(t))


def report_table(finals: dict[str, dict[int, dict]], digits: int = 4) -> str:
    """Final val loss per arm, paired deltas vs fp32 and vs 8bit, the example's bound, state bytes."""
    reference = [finals[REFERENCE][s]["val_loss"] for s in sorted(finals.get(REFERENCE, {}))]
    bound = max(2 * common.mean_std(reference)[1], 0.02) if reference else None
    lines = [
        "| state policy | seeds | final val loss (mean ± std) | Δ vs fp32 (per seed) | check: max(2σ, 0.02) "
        "| Δ vs 8bit (per seed) | embedding state | all state | wall time / run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def paired(arm: str, other: str) -> str:
        if arm == other or other not in finals:
            return "–"
        deltas = [finals[arm][s]["val_loss"] - finals[other][s]["val_loss"] for s in sorted(finals[arm])]
        per_seed = ", ".join(f"{d:+.{digits}f}" for d in deltas)
        return f"{statistics.fmean(deltas):+.{digits}f} ({per_seed})"

    for arm, by_seed in finals.items():
        seeds = sorted(by_seed)
        mean, std = common.mean_std([by_seed[s]["val_loss"] for s in seeds])

        check = "–"
        if arm != REFERENCE and bound is not None:
            delta = statistics.fmean(by_seed[s]["val_loss"] - finals[REFERENCE][s]["val_loss"] for s in seeds)
            check = f"{'pass' if abs(delta) <= bound else 'FAIL'} (bound {bound:.{digits}f})"
        first = by_seed[seeds[0]]
        seconds = statistics.fmean(by_seed[s]["seconds"] for s in seeds)
        cells = [
            arm,
            str(len(seeds)),
            f"{mean:.{digits}f} ± {std:.{digits}f}",
            paired(arm, REFERENCE),
            check,
            paired(arm, "8bit"),
            f"{first['embedding_bytes'] / 1e3:.1f} kB",
            f"{first['state_bytes'] / 1e3:.1f} kB",
            f"{seconds:.1f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args, base = parse_args(argv)
    data_name, text, label = common.load_data(
        base.data,
        "kjv",
        common.kjv_available,
        common.load_kjv,
        common.synthetic_text,
        "King James Bible (Debian bible-kjv-text)",
    )
    data, vocab = char_lm.encode(text) if args.tokens == "chars" else encode_words(text)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    val_gen = torch.Generator().manual_seed(12345)
    val_batches = [
        char_lm.windows(
            val,
            torch.randint(len(val) - base.context - 1, (base.batch_size,), generator=val_gen),
            base.context,
        )
        for _ in range(base.eval_batches)
    ]
    counts = torch.bincount(train, minlength=len(vocab))
    rare = int((counts < 10).sum())

    rows, finals = [], {}
    bar = common.progress_bar(len(base.seeds) * len(args.arms) * base.steps)
    for seed in base.seeds:
        torch.manual_seed(seed)
        model = char_lm.CharGPT(len(vocab), base.context, base.dim, base.layers, base.heads)
        initial = copy.deepcopy(model.state_dict())
        for arm in args.arms:
            model.load_state_dict(initial)
            optimizer = make_optimizer(arm, model, base)
            schedule = common.warmup_cosine(optimizer, base.warmup, base.steps)
            batch_gen = torch.Generator().manual_seed(seed)
            val_loss = char_lm.evaluate(model, val_batches)
            rows.append(
                dict(
                    tokens=args.tokens,
                    data=data_name,
                    arm=arm,
                    seed=seed,
                    step=0,
                    lr="",
                    train_loss="",
                    val_loss=val_loss,
                )
            )
            train_losses, seconds = [], 0.0
            bar.set_postfix_str(f"seed {seed} {arm}")
            for step in range(1, base.steps + 1):
                start = time.perf_counter()
                starts = torch.randint(len(train) - base.context - 1, (base.batch_size,), generator=batch_gen)
                x, y = char_lm.windows(train, starts, base.context)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                lr, _ = common.train_step(model, optimizer, schedule, loss, base.grad_clip)
                seconds += time.perf_counter() - start
                train_losses.append(loss.item())
                bar.update()
                if step % base.eval_every == 0 or step == base.steps:
                    val_loss = char_lm.evaluate(model, val_batches)
                    rows.append(
                        dict(
                            tokens=args.tokens,
                            data=data_name,
                            arm=arm,
                            seed=seed,
                            step=step,
                            lr=lr,
                            train_loss=statistics.fmean(train_losses),
                            val_loss=val_loss,
                        )
                    )
                    train_losses = []
                    bar.set_postfix_str(f"seed {seed} {arm} val {val_loss:.3f}")
            finals.setdefault(arm, {})[seed] = dict(
                val_loss=val_loss,
                seconds=seconds,
                state_bytes=common.optimizer_state_bytes(optimizer),
                embedding_bytes=embedding_state_bytes(optimizer, model),
            )
            common.write_csv(args.out.with_suffix(".csv"), rows, FIELDS)
    bar.close()

    params = sum(p.numel() for p in model.parameters())
    embedding = model.token.weight.numel() + model.position.weight.numel()
    command = " ".join(["python", "examples/embedding_state.py", *(sys.argv[1:] if argv is None else argv)])
    report = "\n".join(
        [
            f"Data: {label}, {args.tokens} as tokens: {len(vocab):,} in the vocabulary, {rare:,} of "
            f"them seen fewer than 10 times in the {len(train):,} training tokens. Model: "
            f"train_char_lm.py's CharGPT, {base.layers} layers, d={base.dim}, context {base.context}, "
            f"{params:,} params of which {embedding:,} in the two embeddings; {base.steps} steps of "
            f"{base.batch_size} sequences; Lion lr {base.lion_lr:g} (warmup {base.warmup} + cosine), "
            f"weight decay {base.lion_wd:g}, betas ({base.beta1:g}, {base.beta2:g}), grad clip "
            f"{base.grad_clip:g}; seeds {base.seeds}. Δ: mean of the paired differences (same init, "
            "same batches); σ: the fp32 policy's sample standard deviation over seeds.",
            f"Command: `{command}`",
            f"Machine: {common.environment_line()}",
            "",
            report_table(finals),
            "",
        ]
    )
    args.out.with_suffix(".md").write_text(report)
    print(report)
    print(f"wrote {args.out}.csv, {args.out}.md")


if __name__ == "__main__":
    main()
