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
import datetime
import multiprocessing
import sys
import time
import warnings
from pathlib import Path

from study_4bit_agreement import PACKAGE_SHADOWS, SEQUENCES, sign_agreement_job
from study_4bit_formats import Format
from study_4bit_report import (
    CURVE_FIELDS,
    RUN_FIELDS,
    SIGN_FIELDS,
    _fmt_row,
    choose_finalists,
    gate,
    plot,
    write_report,
)
from study_4bit_training import (  # the examples' modules too (_common, train_char_lm), imported there
    BASELINE,
    EIGHT_BIT,
    FP32,
    RESULTS,
    TASKS,
    candidates,
    common,
    example_argv,
    read_csv,
    run_checks,
    train_char_lm,
    training_job,
    write_csv,
)
from tqdm import tqdm

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
