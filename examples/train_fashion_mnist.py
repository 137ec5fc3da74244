"""Train an MLP (784-512-512-10) on Fashion-MNIST with several optimizers and compare test accuracy.

Every optimizer starts from the same initial weights and sees the same batches (per seed), under
the same warmup + cosine schedule and gradient clipping. Writes PREFIX.csv (train loss, test loss
and test accuracy every --eval-every steps), PREFIX.png (test-accuracy curves) and PREFIX.md (the
final table: test accuracy, wall time, optimizer-state bytes, and the check against lion-pytorch).

Data: sudo apt-get install dataset-fashion-mnist   (or --data synthetic for a smoke test)

    python examples/train_fashion_mnist.py               # the README's evidence (3 seeds)
    python examples/train_fashion_mnist.py --quick       # a CI smoke run, under a minute
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import _common as common
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# --quick: a slice of the data and one short epoch, to show the script works end to end.
QUICK = dict(data="auto", epochs=1, train_limit=1024, test_limit=512, eval_every=4, seeds=[0])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="a CI smoke run: 1024 images, one epoch, one seed (data: auto)"
    )
    parser.add_argument(
        "--data",
        choices=("fashion-mnist", "synthetic", "auto"),
        default="fashion-mnist",
        help="fashion-mnist: the Debian idx files; synthetic: generated smoke-test images; "
        "auto: fashion-mnist if installed (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=common.FASHION_DIR, help="where the idx files are (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds", type=common.parse_seeds, default="0,1,2", help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training set (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    parser.add_argument(
        "--warmup", type=float, default=0.05, help="warmup, as a fraction of all steps (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=50, help="steps between test evaluations (default: %(default)s)"
    )
    parser.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    common.add_optimizer_arguments(parser, lion_lr=1e-4, lion_wd=1.0, adamw_lr=1e-3, adamw_wd=0.1)
    common.add_output_arguments(parser, "fashion_mnist")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def as_tensors(images: np.ndarray, labels: np.ndarray, mean: float, std: float):
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - mean) / std
    return x, torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the whole set."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in x.split(2048)])
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main(argv=None) -> None:
    args = parse_args(argv)
    data_name, splits, label = common.load_data(
        args.data,
        "fashion-mnist",
        lambda: common.fashion_available(args.data_dir),
        lambda: common.load_fashion_mnist(args.data_dir),
        common.synthetic_images,
        "Fashion-MNIST (Debian dataset-fashion-mnist)",
    )
    prefix = common.output_prefix(args, "fashion_mnist")

    train_images, train_labels = (a[: args.train_limit] for a in splits["train"])
    test_images, test_labels = (a[: args.test_limit] for a in splits["test"])
    mean, std = train_images.mean() / 255.0, train_images.std() / 255.0
    x_train, y_train = as_tensors(train_images, train_labels, mean, std)
    x_test, y_test = as_tensors(test_images, test_labels, mean, std)
    steps_per_epoch = len(x_train) // args.batch_size
    steps = args.epochs * steps_per_epoch
    warmup = max(1, round(args.warmup * steps))

    rows, curves, finals = [], {}, {}
    bar = common.progress_bar(len(args.seeds) * len(args.optimizers) * steps)
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = mlp()
        initial = copy.deepcopy(model.state_dict())
        for name in args.optimizers:
            model.load_state_dict(initial)
            optimizer = common.make_optimizer(name, model, args)
            schedule = common.warmup_cosine(optimizer, warmup, steps)
            batch_gen = torch.Generator().manual_seed(seed)
            test_loss, accuracy = evaluate(model, x_test, y_test)
            curve = [(0, 100 * accuracy)]
            rows.append(
                dict(
                    data=data_name,
                    optimizer=name,
                    seed=seed,
                    step=0,
                    epoch=0,
                    lr="",
                    train_loss="",
                    test_loss=test_loss,
                    test_accuracy=accuracy,
                )
            )
            train_losses, seconds, optimizer_seconds, step = [], 0.0, 0.0, 0
            bar.set_postfix_str(f"seed {seed} {name}")
            for epoch in range(1, args.epochs + 1):
                order = torch.randperm(len(x_train), generator=batch_gen)
                for batch in order[: steps_per_epoch * args.batch_size].view(steps_per_epoch, -1):
                    step += 1
                    start = time.perf_counter()
                    loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
                    lr, step_seconds = common.train_step(model, optimizer, schedule, loss, args.grad_clip)
                    optimizer_seconds += step_seconds
                    seconds += time.perf_counter() - start
                    train_losses.append(loss.item())
                    bar.update()
                    if step % args.eval_every == 0 or step == steps:
                        test_loss, accuracy = evaluate(model, x_test, y_test)
                        curve.append((step, 100 * accuracy))
                        rows.append(
                            dict(
                                data=data_name,
                                optimizer=name,
                                seed=seed,
                                step=step,
                                epoch=epoch,
                                lr=lr,
                                train_loss=float(np.mean(train_losses)),
                                test_loss=test_loss,
                                test_accuracy=accuracy,
                            )
                        )
                        train_losses = []
                        bar.set_postfix_str(f"seed {seed} {name} acc {100 * accuracy:.2f}%")
            curves.setdefault(name, {})[seed] = curve
            finals.setdefault(name, {})[seed] = dict(
                test_accuracy=accuracy,
                seconds=seconds,
                optimizer_seconds=optimizer_seconds,
                state_bytes=common.optimizer_state_bytes(optimizer),
            )
            # Written after every run so a long run's finished part survives an interruption.
            common.write_csv(
                prefix.with_suffix(".csv"),
                rows,
                ["data", "optimizer", "seed", "step", "epoch", "lr", "train_loss", "test_loss", "test_accuracy"],
            )
    bar.close()

    title = f"MLP 784-512-512-10, {label}: test accuracy (%)"
    common.plot_curves(prefix.with_suffix(".png"), curves, title=title, ylabel="test accuracy (%)")
    table = common.comparison_table(
        finals,
        metric="test_accuracy",
        metric_label="final test accuracy (%)",
        bound=lambda sigma: 0.5,
        bound_text="0.5 pp",
        scale=100.0,
        digits=2,
    )
    description = (
        f"Data: {label}, {len(x_train)} training / {len(x_test)} test images. Model: MLP 784-512-512-10; "
        f"{args.epochs} epochs of batches of {args.batch_size} ({steps} steps); seeds {args.seeds}."
    )
    common.write_report(prefix, "train_fashion_mnist.py", argv, description, table)


if __name__ == "__main__":
    main()
