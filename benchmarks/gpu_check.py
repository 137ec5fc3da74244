"""One prepared check for a lent GPU: correctness on CUDA and step speed, in under 6 minutes.

    python benchmarks/gpu_check.py --out DIR             # a CUDA machine: about 5 minutes, no network
    python benchmarks/gpu_check.py --dry-run --out DIR   # any machine: what runs on CPU, a few seconds

Writes DIR/gpu_check.md (the report) and DIR/gpu_check.csv (one row per result, each with the
device, driver and versions), rewritten after every result, so a run cut short still leaves what
it measured; pytest's logs go next to them. The parts run in this order, each within its own time
budget (printed with the time it took) and its own try/except, so a failure is recorded in the
report and the next part still runs:

1. environment: device, driver, CUDA runtime, torch, triton, python, lion8bit and its commit
   (git, else $LION8BIT_COMMIT), bitsandbytes and lion-pytorch if installed; printed first.
2. pytest-gpu: the tests marked ``gpu`` (paged state end to end, ``load_state_dict`` into paged
   buffers, the out-of-memory paths), in a subprocess; pass / fail / skip counts.
3. bit-exact: ``lion8bit.Lion(..., backend="triton")`` against ``backend="torch"`` (the reference)
   through the public API, for every state kind and param dtype, with decay, caution and
   stochastic rounding, on identical CUDA params and grads for several steps: params and every
   state tensor compared bit for bit (and against the reference run on CPU). No NaNs are fed: bf16
   NaN payloads may differ, as documented.
4. speed-tensor: one 256M-element tensor (fp32 and bf16 params; 8-bit, bf16 and fp32 state)
   against the copy floor of the same run: the bytes the update must move (params read and
   written, grads read, state read and written, DESIGN.md section 4) divided by the bandwidth of a
   1 GiB device-to-device copy measured just before; torch.optim.AdamW (fused and foreach),
   lion-pytorch's Triton kernel and bitsandbytes' Lion8bit when installed.
5. speed-models: the same for GPT-2 small's parameters (124M in 148 tensors) and one
   Llama-2-7B decoder layer (q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008; two
   norms), plus paged 8-bit state and, if ``Lion`` accepts ``capturable``, the step captured in a
   CUDA graph. Kernel launches per step are counted with torch.profiler (CUDA kernels, and
   copies / memsets apart).
6. pytest-backends: the CUDA cases of tests/test_backends.py (the conformance suite: every
   option combination of "torch" and "triton" on CUDA tensors against the reference), with the
   time left.

Times are CUDA-event medians after warm-up steps. With ``--dry-run`` (no CUDA needed) the
bit-exact part compares ``backend="cpu"`` with ``"torch"`` on CPU tensors, the speed parts build
every problem's shapes and time a small CPU problem to exercise the code (no GPU figure), and the
GPU-only parts are listed as skipped with the reason; it exits 0 unless something broke.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, also when a test loads this file

import torch  # noqa: E402
from gpu_check_correctness import (  # noqa: E402  (pytest parts, bit-exact)
    bit_exact_part,
    pytest_backends_part,
    pytest_gpu_part,
)
from gpu_check_report import (  # noqa: E402  (settings, environment, report)
    TIME_LIMIT,
    Deadline,
    Report,
    environment,
    run_part,
)
from gpu_check_speed import speed_part  # noqa: E402

# -- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.md, .csv and logs")
    parser.add_argument("--dry-run", action="store_true",
                        help="run what runs without CUDA (CPU figures only)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT,
                        help=f"seconds for the whole run (default {TIME_LIMIT}); later parts are not run")
    args = parser.parse_args(argv)
    if args.time_limit <= 0:
        raise ValueError(f"Invalid time limit: {args.time_limit}")
    time_limit = Deadline(args.time_limit)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run, or on a GPU machine", file=sys.stderr)
        return 2
    env = environment(cuda, args.dry_run)
    for key, value in env.items():
        print(f"{key:>18}: {value}")
    command = "python benchmarks/gpu_check.py" + (" --dry-run" if args.dry_run else "") + f" --out {args.out}"
    report = Report(args.out, env, command)
    run_part(report, "environment", lambda report, deadline: "printed above and in the table", time_limit)
    run_part(report, "pytest-gpu", pytest_gpu_part, time_limit, args.dry_run)
    run_part(report, "bit-exact", bit_exact_part, time_limit, cuda)
    run_part(report, "speed-tensor", speed_part, time_limit, "speed-tensor", cuda, ["tensor-256M"])
    models = ["gpt2-small", "llama2-7b-layer"]
    run_part(report, "speed-models", speed_part, time_limit, "speed-models", cuda, models)
    run_part(report, "pytest-backends", pytest_backends_part, time_limit, args.dry_run)
    skipped = [part for part in report.parts if part["status"] == "skipped"]
    for part in skipped:
        print(f"skipped {part['name']}: {part['note']}")
    failed = [part["name"] for part in report.parts if part["status"] in ("error", "not run")]
    print(f"wrote {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.csv'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
