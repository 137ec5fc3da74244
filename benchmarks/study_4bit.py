"""Study (issue 15): can Lion's momentum be stored in 4 bits and still train like fp32 Lion?

Candidate formats (benchmarks/study_4bit_formats.py) of at most 0.6 byte per parameter: 16-level
maps (the 4-bit dynamic-exponent map of bitsandbytes / torchao, a symmetric variant of it, linear,
square-root and logarithmic companding, FP4 E2M1), blocks of 32 / 64 / 128 elements with an fp32
or bf16 absmax, nearest or keyed stochastic rounding. Each is plugged into an otherwise exact Lion
(fp32 Lion bit for bit when the format is fp32, checked below) and measured two ways:

1. Update-sign agreement with fp32 Lion on recorded gradient sequences, as
   tests/test_sign_agreement.py measures it (every tensor in the format, each shadow keeping its
   own momentum): the test's small-MLP sequence, and the char-LM example's own fp32-Lion
   trajectory (seed 0, its hyper-parameters, the clipped gradients the optimizer sees).
2. The final metric of the two examples (char-LM on the KJV: validation loss; Fashion-MNIST MLP:
   test accuracy) at their hyper-parameters, 3 seeds, paired with fp32 Lion as the README's
   8-bit evidence is (same initial weights, same batches), for the DE-128 baseline, lion8bit's
   8-bit format (for scale) and the best candidates by sign agreement. The gate: char-LM
   |Δ final val loss| <= max(2σ, 0.02 nats) and Fashion-MNIST |Δ test accuracy| <= 0.5 pp.

Writes PREFIX_sign.csv, PREFIX_runs.csv (final metric per task, format, seed), PREFIX_curves.csv
(the evaluations during each run), PREFIX.md (tables, verdict, command, machine) and PREFIX.png.

    OMP_NUM_THREADS=1 python benchmarks/study_4bit.py --jobs 2     # the full study (hours on 2 cores)
    python benchmarks/study_4bit.py --quick                        # a smoke run, about a minute
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import datetime
import importlib.metadata
import io
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lion8bit
from lion8bit import quant

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "examples"))
import _common as common  # noqa: E402  (the examples' shared module: data, schedule, train step)
import train_char_lm  # noqa: E402
import train_fashion_mnist  # noqa: E402
from study_4bit_formats import MAP_DESCRIPTIONS, MAPS, Format, FormatLion, random_bits  # noqa: E402

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
    """Every candidate of at most MAX_BYTES_PER_PARAM (blocks of 32 only with a bf16 absmax)."""
    formats = [
        Format(name, block, absmax, rounding)
        for name in MAPS
        for block, absmax in BLOCKS
        for rounding in ("nearest", "sr")
    ]
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


# -- update-sign agreement ----------------------------------------------------------------------

# Shadows from the lion8bit package itself, for scale: what tests/test_sign_agreement.py measures.
PACKAGE_SHADOWS = {"lion8bit 8bit": "8bit", "lion8bit bf16": "bf16"}
# The gradient sequences: the char-LM example's, the test's small MLP, and the same MLP sequence
# with each format's momentum re-synced to fp32 Lion's before every step (a diagnostic).
SEQUENCES = ("char-lm", "mlp", "mlp-resync")


class SignAgreement:
    """Shadow optimizers fed one gradient sequence; counts update signs equal to fp32 Lion's.

    As tests/test_sign_agreement.py: before each step every shadow's params are set to zero and
    given the step's gradients; with lr 1 and no weight decay the param is then -sign(c). Every
    tensor is stored in the format (min_size 0) and each shadow keeps its own momentum.

    With ``resync`` (a diagnostic, not the measure), each format's momentum is instead replaced
    before every step by fp32 Lion's momentum encoded in the format: what one rounding costs,
    without the error that the format's own trajectory accumulates.
    """

    def __init__(self, shapes, names: list[str], resync: bool = False):
        self.names = names
        self.resync = resync
        self.steps = 0
        self.shadows, self.optimizers = {}, {}
        for name in [FP32, *names]:
            params = [torch.zeros(shape, requires_grad=True) for shape in shapes]
            if name in PACKAGE_SHADOWS:
                optimizer = lion8bit.Lion(
                    params, lr=1.0, betas=BETAS, state=PACKAGE_SHADOWS[name], min_8bit_size=0
                )
            else:
                optimizer = FormatLion(params, lr=1.0, betas=BETAS, fmt=make_format(name), min_size=0)
            self.shadows[name], self.optimizers[name] = params, optimizer
        self.agree = dict.fromkeys(names, 0)
        self.total = 0

    @torch.no_grad()
    def feed(self, grads: list[torch.Tensor]) -> None:
        self.steps += 1
        if self.resync and self.steps > 1:
            self._resync()
        updates = {}
        for name, params in self.shadows.items():
            for shadow, grad in zip(params, grads, strict=True):
                shadow.zero_()
                shadow.grad = grad.clone()
            self.optimizers[name].step()
            updates[name] = torch.cat([-p.flatten() for p in params])
        for name in self.names:
            self.agree[name] += (updates[name] == updates[FP32]).sum().item()
        self.total += updates[FP32].numel()

    def _resync(self) -> None:
        reference = self.optimizers[FP32]
        for name in self.names:
            optimizer = self.optimizers[name]
            for index, (shadow, twin) in enumerate(zip(self.shadows[name], self.shadows[FP32], strict=True)):
                entry, momentum = optimizer.state[shadow], reference.state[twin]["momentum"]
                bits = random_bits(
                    quant.rounding_key(index, self.steps, quant.STREAM_MOMENTUM), momentum.numel()
                )
                entry["codes"], entry["absmax"] = optimizer.fmt.encode(momentum, bits)

    def result(self) -> dict[str, float]:
        return {name: count / self.total for name, count in self.agree.items()}


class _Recording(FormatLion):
    """fp32 Lion that hands each step's gradients (after clipping) to a callback first."""

    def __init__(self, params, callback, **kwargs):
        super().__init__(params, fmt=None, **kwargs)
        self.callback = callback

    def step(self, closure=None):
        self.callback([p.grad for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def sign_agreement_job(sequence: str, names: list[str], quick: bool, progress=None) -> dict[str, float]:
    """Agreement of each format in ``names`` with fp32 Lion on one gradient sequence.

    ``progress`` (a queue) receives ``len(names)`` after every step, for the progress bar.
    """
    torch.set_num_threads(1)
    counter = None

    def feed(grads):
        counter.feed(grads)
        if progress is not None:
            progress.put(len(names))

    if sequence in ("mlp", "mlp-resync"):
        model, x, y, generator = _mlp_problem()
        counter = SignAgreement([p.shape for p in model.parameters()], names, resync=sequence == "mlp-resync")
        driver = _Recording(model.parameters(), feed, lr=3e-4, betas=BETAS, weight_decay=0.1)
        for _ in range(20 if quick else 200):  # the test's 200 steps
            batch = torch.randint(len(x), (128,), generator=generator)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            driver.zero_grad()
            loss.backward()
            driver.step()
        return counter.result()

    def recording(groups, lr, betas):
        nonlocal counter
        params = [p for group in groups for p in group["params"]]
        counter = SignAgreement([p.shape for p in params], names)
        return _Recording(groups, feed, lr=lr, betas=betas)

    train(sequence, recording, seed=0, argv=example_argv(quick))
    return counter.result()


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


# -- choosing the finalists ----------------------------------------------------------------------


def choose_finalists(sign: dict[str, dict[str, float]], per_rounding: int) -> list[str]:
    """The formats of the loss runs, chosen from the sign agreement alone (before any loss is seen).

    Always the DE-128 baseline and the same with stochastic rounding (does the usual remedy for
    swamping fix it?); then, for each rounding, the ``per_rounding`` best maps by agreement on the
    char-LM sequence, each with its best block size and absmax dtype, skipping a map already
    chosen for that rounding. Per rounding, because per-step agreement need not rank rounding
    rules the way the loss does (stochastic rounding trades a bias for noise).
    """
    chosen = [BASELINE, BASELINE.replace("-nearest", "-sr")]
    families = {(Format.parse(name).map_name, Format.parse(name).rounding) for name in chosen}
    ranked = sorted(
        (name for name in sign if name not in PACKAGE_SHADOWS),
        key=lambda name: (-sign[name]["char-lm"], -sign[name]["mlp"], name),
    )
    for rounding in ("nearest", "sr"):
        added = 0
        for name in ranked:
            fmt = Format.parse(name)
            if fmt.rounding != rounding or (fmt.map_name, rounding) in families or added == per_rounding:
                continue
            chosen.append(name)
            families.add((fmt.map_name, rounding))
            added += 1
    return [name for name in chosen if name in sign or not sign]


# -- the gate ------------------------------------------------------------------------------------


def gate(runs: list[dict], names: list[str]) -> dict[str, dict]:
    """Per format: paired Δ per seed and mean for each task, the bounds, pass/fail."""
    finals = {(r["task"], r["format"], int(r["seed"])): float(r["final"]) for r in runs}
    verdicts = {}
    sigma = {}
    for task in TASKS:
        ref = [finals[task, FP32, s] for (t, n, s) in finals if t == task and n == FP32]
        sigma[task] = statistics.stdev(ref) if len(ref) > 1 else 0.0
    bounds = {"char-lm": max(2 * sigma["char-lm"], CHAR_LM_FLOOR), "fashion": FASHION_BOUND}
    for name in names:
        entry = {}
        for task in TASKS:
            seeds = sorted(s for (t, n, s) in finals if t == task and n == name and (task, FP32, s) in finals)
            deltas = [finals[task, name, s] - finals[task, FP32, s] for s in seeds]
            mean = statistics.fmean(deltas) if deltas else float("nan")
            entry[task] = dict(
                seeds=seeds,
                deltas=deltas,
                mean=mean,
                bound=bounds[task],
                passes=bool(deltas) and abs(mean) <= bounds[task],
            )
        entry["passes"] = all(entry[task]["passes"] for task in TASKS)
        verdicts[name] = entry
    return dict(verdicts=verdicts, sigma=sigma, bounds=bounds)


# -- output --------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> str:
    return (
        f"{_cpu_model()}, {os.cpu_count()} CPUs ({platform.machine()}), one torch thread per job; "
        f"python {platform.python_version()}, torch {torch.__version__}, lion8bit {_version('lion8bit')}, "
        f"lion-pytorch {_version('lion-pytorch')}, bitsandbytes {_version('bitsandbytes')}"
    )


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


SIGN_FIELDS = [
    "format",
    "map",
    "block_size",
    "absmax",
    "rounding",
    "bytes_per_param",
    "sequence",
    "steps",
    "agreement",
]
RUN_FIELDS = ["task", "format", "seed", "final", "seconds", "optimizer_seconds", "state_bytes", "data"]
CURVE_FIELDS = ["task", "format", "seed", "step", "value"]


def _fmt_row(name: str) -> dict:
    if name in PACKAGE_SHADOWS:
        return dict(map=name, block_size="", absmax="", rounding="", bytes_per_param="")
    fmt = Format.parse(name)
    return dict(
        map=fmt.map_name,
        block_size=fmt.block_size,
        absmax=fmt.absmax,
        rounding=fmt.rounding,
        bytes_per_param=f"{fmt.bytes_per_param:.4f}",
    )


def sign_table(sign: dict[str, dict[str, float]], finalists: list[str]) -> str:
    lines = [
        "| format | map | block | absmax | rounding | bytes/param | agreement, char-LM sequence "
        "| agreement, MLP sequence | MLP, momentum re-synced each step (diagnostic) | loss runs |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name in sorted(sign, key=lambda n: (-sign[n]["char-lm"], n)):
        row = _fmt_row(name)
        resync = f"{sign[name]['mlp-resync']:.4f}" if "mlp-resync" in sign[name] else ""
        lines.append(
            f"| `{name}` | {row['map']} | {row['block_size']} | {row['absmax']} | {row['rounding']} "
            f"| {row['bytes_per_param']} | {sign[name]['char-lm']:.4f} | {sign[name]['mlp']:.4f} "
            f"| {resync} | {'yes' if name in finalists else ''} |"
        )
    return "\n".join(lines)


def gate_table(result: dict, sign: dict) -> str:
    lines = [
        "| format | bytes/param | char-LM Δ val loss, per seed | mean Δ | bound | "
        "Fashion-MNIST Δ test acc (pp), per seed | mean Δ | bound | gate |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for name, entry in result["verdicts"].items():
        char, fashion = entry["char-lm"], entry["fashion"]
        bpp = (
            _fmt_row(name)["bytes_per_param"]
            if name != EIGHT_BIT
            else f"{Format.parse(name).bytes_per_param:.4f}"
        )
        lines.append(
            f"| `{name}` | {bpp} | {', '.join(f'{d:+.4f}' for d in char['deltas'])} | {char['mean']:+.4f} "
            f"| {char['bound']:.4f} {'✓' if char['passes'] else '✗'} "
            f"| {', '.join(f'{d:+.2f}' for d in fashion['deltas'])} | {fashion['mean']:+.2f} "
            f"| {fashion['bound']:.2f} {'✓' if fashion['passes'] else '✗'} "
            f"| {'**pass**' if entry['passes'] else 'fail'} |"
        )
    return "\n".join(lines)


def plot(path: Path, sign: dict, result: dict, curves: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9), dpi=90)
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(MAPS)}
    ax = axes[0, 0]
    for name, values in sign.items():
        if name in PACKAGE_SHADOWS:
            ax.axhline(values["char-lm"], color="grey", lw=0.8, ls=":")
            ax.text(
                0.01,
                values["char-lm"],
                name,
                fontsize=7,
                va="bottom",
                color="grey",
                transform=ax.get_yaxis_transform(),
            )
            continue
        fmt = Format.parse(name)
        ax.scatter(
            fmt.bytes_per_param + (0.002 if fmt.rounding == "sr" else -0.002),
            values["char-lm"],
            color=colors[fmt.map_name],
            marker="o" if fmt.rounding == "nearest" else "^",
            s=22,
        )
    for map_name, color in colors.items():
        ax.scatter([], [], color=color, label=map_name)
    ax.scatter([], [], color="k", marker="o", label="nearest")
    ax.scatter([], [], color="k", marker="^", label="stochastic")
    ax.set_xlabel("state bytes / param")
    ax.set_ylabel("update-sign agreement with fp32 Lion")
    ax.set_title("(a) sign agreement, char-LM gradient sequence (300 steps)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)

    names = list(result["verdicts"])
    for ax, task, unit, title in (
        (axes[0, 1], "char-lm", "Δ final val loss (nats/char)", "(b) char-LM, paired with fp32 Lion"),
        (axes[1, 0], "fashion", "Δ final test accuracy (pp)", "(c) Fashion-MNIST, paired with fp32 Lion"),
    ):
        bound = result["bounds"][task]
        ax.axhspan(-bound, bound, color="green", alpha=0.1, label=f"gate ±{bound:.3g}")
        ax.axhline(0, color="k", lw=0.8)
        for i, name in enumerate(names):
            entry = result["verdicts"][name][task]
            ax.scatter([i] * len(entry["deltas"]), entry["deltas"], color="grey", s=12)
            ax.scatter([i], [entry["mean"]], color="green" if entry["passes"] else "red", marker="_", s=300)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(title + " (dots: seeds; bar: mean)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

    ax = axes[1, 1]
    reference = {
        (int(r["seed"]), int(r["step"])): float(r["value"])
        for r in curves
        if r["task"] == "char-lm" and r["format"] == FP32
    }
    for i, name in enumerate(names):
        by_step = {}
        for r in curves:
            key = (int(r["seed"]), int(r["step"]))
            if r["task"] == "char-lm" and r["format"] == name and key in reference:
                by_step.setdefault(key[1], []).append(float(r["value"]) - reference[key])
        steps = sorted(by_step)
        ax.plot(
            steps,
            [statistics.fmean(by_step[s]) for s in steps],
            label=name,
            color=plt.get_cmap("tab10")(i % 10),
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("Δ val loss vs fp32 Lion (mean over seeds)")
    ax.set_title("(d) char-LM validation loss during training, minus fp32 Lion's", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reference_finals(runs: list[dict]) -> str:
    parts = []
    for task in TASKS:
        rows = sorted(
            (r for r in runs if r["task"] == task and r["format"] == FP32), key=lambda r: int(r["seed"])
        )
        parts.append(f"{task} " + ", ".join(f"{float(r['final']):.4f}" for r in rows))
    return "; ".join(parts)


SMOKE_LABEL = "SMOKE TEST (--quick: the examples' --quick settings, one seed), not evidence"


def write_report(
    prefix: Path, argv, quick: bool, started: str, checks, sign, finalists, runs, result, seconds: float
) -> None:
    command = shlex.join(["python", "benchmarks/study_4bit.py", *argv])
    data = sorted({f"{r['task']}: {r['data']}" for r in runs})
    lines = [
        "# 4-bit momentum for Lion: study results",
        "",
        *([f"**{SMOKE_LABEL}**", ""] if quick else []),
        "Written by `benchmarks/study_4bit.py`; the discussion and the verdict's reasoning are in "
        "[docs/4bit-study.md](../../docs/4bit-study.md).",
        "",
        f"Command: `{command}` (started {started}, {seconds / 60:.0f} min; results kept from earlier "
        "runs with `--resume` or `--parts` are in the CSVs)  ",
        f"Machine: {environment()}  ",
        f"Data: {'; '.join(data) or '–'}",
        "",
        "## Checks",
        "",
        *[f"- {'holds' if holds else '**FAILS**'}: {what}" for what, holds in checks],
        "",
        "## Maps",
        "",
        *[f"- `{name}`: {text}" for name, text in MAP_DESCRIPTIONS.items()],
        "",
        "## Update-sign agreement with fp32 Lion",
        "",
        "Share of (step, element) pairs whose update sign equals fp32 Lion's, every tensor stored in the "
        "format, each shadow keeping its own momentum (tests/test_sign_agreement.py's method). Sequences: "
        "the char-LM example's fp32-Lion run (seed 0, its hyper-parameters, clipped gradients) and the "
        "test's small MLP. `lion8bit 8bit` / `bf16` are the package's formats, for scale. The re-synced "
        "column is a diagnostic: each format's momentum replaced before every step by fp32 Lion's, encoded "
        "in the format, so that it counts one rounding only and none of the error the format's own "
        "trajectory accumulates.",
        "",
        sign_table(sign, finalists),
        "",
    ]
    if runs:
        lines += [
            "## Training runs: the gate",
            "",
            "Each format against fp32 Lion with the same initial weights and batches (per seed), at the "
            "examples' hyper-parameters; tensors under 4096 elements keep fp32 momentum (as "
            "`min_8bit_size`). Δ per seed = format's final value - fp32 Lion's; the gate takes the mean "
            f"over seeds. char-LM bound max(2σ, {CHAR_LM_FLOOR}) with σ = {result['sigma']['char-lm']:.4f} "
            f"(fp32 Lion's sample std over seeds); Fashion-MNIST bound {FASHION_BOUND} pp. `{EIGHT_BIT}` is "
            "lion8bit's 8-bit format, for scale; it is not a candidate.",
            "",
            gate_table(result, sign),
            "",
            "fp32 Lion's final values, per seed: " + reference_finals(runs) + ".",
            "",
        ]
        passing = [n for n, e in result["verdicts"].items() if e["passes"] and n != EIGHT_BIT]
        lines += ["## Verdict", ""]
        if quick:
            lines.append(f"None: {SMOKE_LABEL}.")
        elif passing:
            lines.append(f"Passing 4-bit formats: {', '.join(f'`{n}`' for n in passing)}.")
        else:
            lines.append("No 4-bit format passed the gate.")
        lines.append("")
    lines += [f"![study]({prefix.name}.png)", ""]
    prefix.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 4 formats, 20 MLP steps, the examples' --quick settings, one seed",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output prefix (default: benchmarks/results/study_4bit, _quick under --quick)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes, one torch thread each (default: 1)"
    )
    parser.add_argument(
        "--seeds", type=common.parse_seeds, default=None, help="training seeds (default: 0,1,2)"
    )
    parser.add_argument(
        "--per-rounding",
        type=int,
        default=3,
        help="maps chosen by sign agreement for the loss runs per rounding rule, besides DE-128 with "
        "either rounding (default: %(default)s)",
    )
    parser.add_argument(
        "--finalists",
        default=None,
        help="comma-separated formats for the loss runs instead of the automatic choice",
    )
    parser.add_argument("--parts", default="sign,loss", help="sign, loss or both (default: sign,loss)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in PREFIX_*.csv and run only what is missing",
    )
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts <= {"sign", "loss"} or not args.parts:
        parser.error(f"Invalid --parts: {','.join(sorted(args.parts))!r} (choose from sign, loss)")
    if args.jobs < 1:
        parser.error(f"Invalid --jobs: {args.jobs}")
    if args.finalists:
        try:
            for name in args.finalists.split(","):
                Format.parse(name)
        except ValueError as error:
            parser.error(f"Invalid --finalists: {error}")
    return args


def sign_steps(quick: bool) -> dict[str, int]:
    mlp = 20 if quick else 200
    return {
        "char-lm": train_char_lm.parse_args(list(example_argv(quick))).steps,
        "mlp": mlp,
        "mlp-resync": mlp,
    }


def _pool(jobs: int):
    # spawn: the workers start clean (no forked torch thread pools).
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="bitsandbytes")
    started = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    start = time.perf_counter()
    prefix = args.out or RESULTS / ("study_4bit" + ("_quick" if args.quick else ""))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {kind: prefix.parent / f"{prefix.name}_{kind}.csv" for kind in ("sign", "runs", "curves")}

    checks = run_checks(args.quick)
    for what, holds in checks:
        print(f"{'holds' if holds else 'FAILS'}: {what}")

    all_formats = [f.name for f in candidates()]
    if args.quick:
        all_formats = [BASELINE, "de-sym-64-bf16-sr", "sqrt-128-fp32-nearest", "linear-32-bf16-sr"]
    shadows = [*PACKAGE_SHADOWS, *all_formats]
    sign = {}
    if args.resume or "sign" not in args.parts:
        for row in read_csv(paths["sign"]):
            sign.setdefault(row["format"], {})[row["sequence"]] = float(row["agreement"])
    if "sign" in args.parts:
        todo = [
            (seq, n)
            for seq in SEQUENCES
            for n in (all_formats if seq == "mlp-resync" else shadows)
            if seq not in sign.get(n, {})
        ]
        chunks = [
            (seq, [n for s, n in todo if s == seq][i :: args.jobs])
            for seq in SEQUENCES
            for i in range(args.jobs)
        ]
        chunks = [(seq, names) for seq, names in chunks if names]
        steps = sign_steps(args.quick)
        total = sum(steps[seq] for seq, _ in todo)
        manager = multiprocessing.get_context("spawn").Manager()
        progress = manager.Queue()
        with _pool(args.jobs) as pool, tqdm(total=total, unit="format-step", desc="sign agreement") as bar:
            futures = {
                pool.submit(sign_agreement_job, seq, names, args.quick, progress): seq
                for seq, names in chunks
            }
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=2.0)
                while not progress.empty():
                    bar.update(progress.get())
                for future in done:
                    for name, value in future.result().items():
                        sign.setdefault(name, {})[futures[future]] = value
        manager.shutdown()

    if sign:
        steps = sign_steps(args.quick)
        rows = [
            dict(format=n, **_fmt_row(n), sequence=seq, steps=steps[seq], agreement=v)
            for n in sign
            for seq, v in sign[n].items()
        ]
        write_csv(paths["sign"], rows, SIGN_FIELDS)
    finalists = args.finalists.split(",") if args.finalists else choose_finalists(sign, args.per_rounding)
    runs, curves = [], []
    if "loss" in args.parts:
        if args.resume:
            runs, curves = read_csv(paths["runs"]), read_csv(paths["curves"])
        done = {(r["task"], r["format"], int(r["seed"])) for r in runs}
        names = [FP32, EIGHT_BIT, *finalists]
        # Seed by seed, so that a partial study holds whole seeds.
        todo = [(t, n, s) for s in args.seeds for t in TASKS for n in names if (t, n, s) not in done]
        with _pool(args.jobs) as pool, tqdm(total=len(todo), unit="run", desc="training runs") as bar:
            futures = [pool.submit(training_job, t, n, s, example_argv(args.quick)) for t, n, s in todo]
            for future in concurrent.futures.as_completed(futures):
                run = future.result()
                runs.append({k: run[k] for k in RUN_FIELDS})
                curves += [
                    dict(task=run["task"], format=run["format"], seed=run["seed"], step=s, value=v)
                    for s, v in run["curve"]
                ]
                bar.set_postfix_str(f"{run['task']} {run['format']} seed {run['seed']}: {run['final']:.4f}")
                bar.update()
                # Written after every run so that an interrupted study keeps what it finished.
                write_csv(paths["runs"], runs, RUN_FIELDS)
                write_csv(paths["curves"], curves, CURVE_FIELDS)
    result = gate(runs, [EIGHT_BIT, *finalists]) if runs else None
    if runs:
        plot(prefix.with_suffix(".png"), sign, result, curves)
    write_report(
        prefix, argv, args.quick, started, checks, sign, finalists, runs, result, time.perf_counter() - start
    )
    print(
        f"wrote {prefix}.md"
        + (f", {prefix}.png" if runs else "")
        + f" and {', '.join(map(str, paths.values()))}"
    )


if __name__ == "__main__":
    main()
