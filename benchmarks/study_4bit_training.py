"""The 4-bit study's settings and training runs (benchmarks/study_4bit.py): the candidate formats,
the examples' training driven with a format's Lion (paired with fp32 Lion: same initial weights,
same batches), the checks that the simulation is Lion and that the loop is the example scripts',
and the CSV files."""

from __future__ import annotations

import contextlib
import csv
import io
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lion8bit
from lion8bit import quant

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
import _common as common  # noqa: E402  (the examples' shared module: data, schedule, train step)
import train_char_lm  # noqa: E402
import train_fashion_mnist  # noqa: E402
from study_4bit_formats import MAPS, Format, FormatLion, random_bits  # noqa: E402

RESULTS = HERE / "results"
FP32 = "fp32"  # the reference: FormatLion without a format, i.e. fp32 Lion
EIGHT_BIT = "8bit-256-fp32-nearest"  # lion8bit's 8-bit format, for scale (not a 4-bit candidate)
BASELINE = "de-128-fp32-nearest"  # the 4-bit optimizers paper's / torchao's format
MAX_BYTES_PER_PARAM = 0.6
BLOCKS = [(32, "bf16"), (64, "fp32"), (64, "bf16"), (128, "fp32"), (128, "bf16")]
TASKS = ("char-lm", "fashion")
CHAR_LM_FLOOR = 0.02  # nats: the gate's floor for the char LM
FASHION_BOUND = 0.5  # percentage points
BETAS = (0.9, 0.99)  # both examples' default (and the sign-agreement test's)


def candidates() -> list[Format]:
    """Every candidate of at most MAX_BYTES_PER_PARAM (blocks of 32 only with a bf16 absmax), and
    the grid rounding of the linear map in the layout state="4bit" ships."""
    formats = [
        Format(name, block, absmax, rounding)
        for name in MAPS
        for block, absmax in BLOCKS
        for rounding in ("nearest", "sr")
    ] + [Format("linear", 32, "bf16", "srgrid")]
    assert all(f.bytes_per_param <= MAX_BYTES_PER_PARAM for f in formats)
    return formats


def make_format(name: str) -> Format | None:
    return None if name == FP32 else Format.parse(name)


# -- checks: the simulation is Lion, and its 8-bit format is lion8bit's ---------------------------


def _mlp_problem(seed: int = 0):
    """tests/test_sign_agreement.py's data and model: a 64-128-128-10 GELU MLP on a noisy teacher."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 64, generator=generator)
    teacher = torch.randn(64, 10, generator=generator)
    y = (x @ teacher + 0.5 * torch.randn(4096, 10, generator=generator)).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.GELU(),
        torch.nn.Linear(128, 128),
        torch.nn.GELU(),
        torch.nn.Linear(128, 10),
    )
    return model, x, y, generator


def _train_mlp(make_optimizer, steps: int) -> list[torch.Tensor]:
    model, x, y, generator = _mlp_problem()
    optimizer = make_optimizer(common.param_groups(model, 0.1))
    for _ in range(steps):
        batch = torch.randint(len(x), (128,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def example_argv(quick: bool) -> tuple:
    """The examples' own settings: their defaults (the README's evidence), or their --quick smoke run."""
    return ("--quick",) if quick else ()


# Shortened example runs on which the study's training loop is checked against the scripts' own.
CHECK_ARGV = {
    "char-lm": ("--steps", "40", "--warmup", "4", "--eval-every", "20", "--eval-batches", "4"),
    "fashion": ("--epochs", "1", "--train-limit", "16384", "--test-limit", "2048"),
}


def run_checks(quick: bool) -> list[tuple[str, bool]]:
    """(what, holds) for each premise of the study; the report lists them."""
    steps = 10 if quick else 50
    import bitsandbytes.functional
    from lion_pytorch import Lion as LionPytorch

    checks = []
    bnb_map = bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)
    checks.append(
        (
            "the `de` map equals the 16 distinct values of bitsandbytes "
            "`create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)`",
            torch.equal(bnb_map.unique(), MAPS["de"]),
        )
    )
    key = quant.rounding_key(12345, 7, quant.STREAM_MOMENTUM)
    checks.append(
        (
            "the study's random bits equal `lion8bit.quant.random_bits` (1,000,003 elements)",
            torch.equal(random_bits(key, 1_000_003), quant.random_bits(key, 1_000_003, "cpu")),
        )
    )
    kw = dict(lr=3e-4, betas=BETAS)
    fp32 = _train_mlp(lambda groups: FormatLion(groups, fmt=None, **kw), steps)
    peers = {
        "lion_pytorch.Lion": lambda groups: LionPytorch(groups, **kw),
        'lion8bit.Lion(state="fp32")': lambda groups: lion8bit.Lion(groups, state="fp32", **kw),
    }
    for name, make in peers.items():
        same = all(torch.equal(a, b) for a, b in zip(fp32, _train_mlp(make, steps), strict=True))
        checks.append(
            (
                f"the study's Lion without a format equals {name}, params bit for bit after {steps} "
                "steps (lr 3e-4, weight decay 0.1 on matrices)",
                same,
            )
        )
    eight = _train_mlp(lambda groups: FormatLion(groups, fmt=make_format(EIGHT_BIT), min_size=0, **kw), steps)
    ref = _train_mlp(lambda groups: lion8bit.Lion8bit(groups, min_8bit_size=0, **kw), steps)
    checks.append(
        (
            f"the study's Lion with format `{EIGHT_BIT}` equals `lion8bit.Lion8bit`, params bit for bit "
            f"after {steps} steps (every tensor 8-bit)",
            all(torch.equal(a, b) for a, b in zip(eight, ref, strict=True)),
        )
    )
    for task in TASKS:
        argv = example_argv(quick) if quick else CHECK_ARGV[task]
        checks.append(
            (
                f"the study's training loop with fp32 Lion gives the example script's own {common.REFERENCE} "
                f"curve, every evaluation equal ({task}, seed 0, example arguments `{shlex.join(argv)}`)",
                loop_check(task, argv),
            )
        )
    return checks


# -- training runs: the examples' setups, paired with fp32 Lion ----------------------------------

_DATA: dict = {}


def _char_lm_setup(argv: tuple):
    if ("char-lm", argv) not in _DATA:
        args = train_char_lm.parse_args(list(argv))
        _, text, label = common.load_data(
            args.data, "kjv", common.kjv_available, common.load_kjv, common.synthetic_text, "kjv"
        )
        data, chars = train_char_lm.encode(text)
        split = int(0.9 * len(data))
        val = data[split:]
        val_gen = torch.Generator().manual_seed(12345)
        val_batches = [
            train_char_lm.windows(
                val,
                torch.randint(len(val) - args.context - 1, (args.batch_size,), generator=val_gen),
                args.context,
            )
            for _ in range(args.eval_batches)
        ]
        _DATA["char-lm", argv] = (args, label, data[:split], chars, val_batches)
    return _DATA["char-lm", argv]


def _fashion_setup(argv: tuple):
    if ("fashion", argv) not in _DATA:
        args = train_fashion_mnist.parse_args(list(argv))
        _, splits, label = common.load_data(
            args.data,
            "fashion-mnist",
            lambda: common.fashion_available(args.data_dir),
            lambda: common.load_fashion_mnist(args.data_dir),
            common.synthetic_images,
            "fashion-mnist",
        )
        train_images, train_labels = (a[: args.train_limit] for a in splits["train"])
        test_images, test_labels = (a[: args.test_limit] for a in splits["test"])
        mean, std = train_images.mean() / 255.0, train_images.std() / 255.0
        x_train, y_train = train_fashion_mnist.as_tensors(train_images, train_labels, mean, std)
        x_test, y_test = train_fashion_mnist.as_tensors(test_images, test_labels, mean, std)
        _DATA["fashion", argv] = (args, label, x_train, y_train, x_test, y_test)
    return _DATA["fashion", argv]


def train(task: str, make_optimizer, seed: int, argv: tuple) -> dict:
    """One run of an example's training as its main(argv) does it, with ``make_optimizer(groups, lr, betas)``.

    Same model init (torch.manual_seed(seed) before building it), same batches (a generator
    seeded with ``seed``), same schedule, clipping and evaluations as the example script with the
    command-line arguments ``argv``, so that the fp32 run reproduces the example's own fp32-Lion
    run (checked by :func:`loop_check`). Returns the final metric, the curve, timings.
    """
    torch.set_num_threads(1)
    if task == "char-lm":
        args, label, train_data, chars, val_batches = _char_lm_setup(argv)
        torch.manual_seed(seed)
        model = train_char_lm.CharGPT(len(chars), args.context, args.dim, args.layers, args.heads)

        def evaluate():
            return train_char_lm.evaluate(model, val_batches)

        steps, warmup = args.steps, args.warmup
        batch_gen = torch.Generator().manual_seed(seed)

        def batches():
            for _ in range(steps):
                starts = torch.randint(
                    len(train_data) - args.context - 1, (args.batch_size,), generator=batch_gen
                )
                yield train_char_lm.windows(train_data, starts, args.context)
    else:
        args, label, x_train, y_train, x_test, y_test = _fashion_setup(argv)
        torch.manual_seed(seed)
        model = train_fashion_mnist.mlp()

        def evaluate():
            return 100 * train_fashion_mnist.evaluate(model, x_test, y_test)[1]

        steps_per_epoch = len(x_train) // args.batch_size
        steps = args.epochs * steps_per_epoch
        warmup = max(1, round(args.warmup * steps))
        batch_gen = torch.Generator().manual_seed(seed)

        def batches():
            for _ in range(args.epochs):
                order = torch.randperm(len(x_train), generator=batch_gen)
                for batch in order[: steps_per_epoch * args.batch_size].view(steps_per_epoch, -1):
                    yield x_train[batch], y_train[batch]

    optimizer = make_optimizer(
        common.param_groups(model, args.lion_wd), args.lion_lr, (args.beta1, args.beta2)
    )
    schedule = common.warmup_cosine(optimizer, warmup, steps)
    curve = [(0, evaluate())]
    seconds = optimizer_seconds = 0.0
    for step, (x, y) in enumerate(batches(), start=1):
        start = time.perf_counter()
        logits = model(x)
        loss = (
            F.cross_entropy(logits.flatten(0, 1), y.flatten())
            if task == "char-lm"
            else F.cross_entropy(logits, y)
        )
        _, step_seconds = common.train_step(model, optimizer, schedule, loss, args.grad_clip)
        optimizer_seconds += step_seconds
        seconds += time.perf_counter() - start
        if step % args.eval_every == 0 or step == steps:
            curve.append((step, evaluate()))
    if isinstance(optimizer, FormatLion):
        state_bytes = optimizer.state_nbytes()
    else:
        state_bytes = common.optimizer_state_bytes(optimizer)
    return dict(
        final=curve[-1][1],
        curve=curve,
        seconds=seconds,
        optimizer_seconds=optimizer_seconds,
        state_bytes=state_bytes,
        data=label,
    )


def format_lion(name: str):
    """make_optimizer(groups, lr, betas) for a format name (min_size 4096, as min_8bit_size).

    The 8-bit format runs as ``lion8bit.Lion8bit`` itself (its fused CPU step), which the checks
    show to be bit-identical to the simulation with that format, and much faster.
    """
    if name == EIGHT_BIT:
        return lambda groups, lr, betas: lion8bit.Lion8bit(groups, lr=lr, betas=betas)
    fmt = make_format(name)
    return lambda groups, lr, betas: FormatLion(groups, lr=lr, betas=betas, fmt=fmt)


def training_job(task: str, name: str, seed: int, argv: tuple) -> dict:
    return dict(task=task, format=name, seed=seed, **train(task, format_lion(name), seed, argv))


def loop_check(task: str, argv: tuple) -> bool:
    """Does :func:`train` with fp32 Lion give the example script's own fp32-Lion curve, every value equal?"""
    script, column, scale = {
        "char-lm": (train_char_lm, "val_loss", 1.0),
        "fashion": (train_fashion_mnist, "test_accuracy", 100.0),
    }[task]
    with tempfile.TemporaryDirectory() as directory:
        prefix = Path(directory) / "run"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            script.main([*argv, "--optimizers", common.REFERENCE, "--seeds", "0", "--out", str(prefix)])
        theirs = [(int(r["step"]), float(r[column]) * scale) for r in read_csv(prefix.with_suffix(".csv"))]
    return theirs == train(task, format_lion(FP32), 0, argv)["curve"]


# -- CSV files: the study's, and the example scripts' that loop_check reads ----------------------


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
