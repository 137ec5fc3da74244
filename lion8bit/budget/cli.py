"""The ``lion8bit`` console script: ``lion8bit budget MODEL ...`` (also ``python -m lion8bit``)."""

from __future__ import annotations

import argparse
import json
import sys

from .activations import CHECKPOINTING
from .comparison import compare
from .optimizers import OPTIMIZER_NAMES
from .rules import DEFAULT_OPTIMIZERS, OPTIMIZERS, PRECISIONS
from .shapes import CATALOG, catalog_model, describe_config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage too; bad input gets one line
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _list_text() -> str:
    width = max(map(len, CATALOG))
    lines = ["models:"]
    lines += [f"  {name:<{width}}  {catalog_model(name).n_params:>14,}  {describe_config(config)}"
              for name, config in CATALOG.items()]
    lines += ["  or a Hugging Face config.json path (needs transformers), or module:function "
              "returning an nn.Module", "", "optimizers (--optimizers):"]
    width = max(map(len, OPTIMIZERS))
    for name in OPTIMIZERS:
        default = "  [default]" if name in DEFAULT_OPTIMIZERS else ""
        lines.append(f"  {name:<{width}}  {OPTIMIZER_NAMES[name]}{default}")
    lines += ["", "dtypes (--dtype):"]
    lines += [f"  {name:<5}  {precision.description}" for name, precision in PRECISIONS.items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lion8bit", description="lion8bit command line tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    budget = commands.add_parser(
        "budget",
        help="memory of weights, grads, optimizer state and activations; what fits on which GPU",
        description="Exact bytes of weights, grads and optimizer state of a model with each "
        "optimizer, activations measured for one training step (--batch-size, --seq-len), and the "
        "largest models that fit on each GPU size. Sizes in GiB (2**30 bytes). See docs/budget.md.",
    )
    budget.add_argument("model", nargs="?", metavar="MODEL",
                        help="catalog name (see --list), Hugging Face config.json path, or module:function")
    budget.add_argument("--list", action="store_true", help="list catalog models, optimizers and dtypes")
    budget.add_argument("--gpu-gb", type=float, nargs="+", default=[24.0, 80.0], metavar="GB",
                        help="GPU sizes in GiB (default: 24 80)")
    budget.add_argument("--dtype", choices=tuple(PRECISIONS), default="mixed",
                        help="training precision (default: mixed; see --list)")
    budget.add_argument("--optimizers", nargs="+", choices=tuple(OPTIMIZERS),
                        default=list(DEFAULT_OPTIMIZERS), metavar="NAME",
                        help="rows to show (default: the 7 marked in --list)")
    budget.add_argument("--batch-size", type=int, metavar="B",
                        help="measure the activations of one training step at this batch size")
    budget.add_argument("--seq-len", type=int, metavar="S",
                        help="tokens per sequence (token models; image models take their own size)")
    budget.add_argument("--checkpointing", choices=CHECKPOINTING, default="none",
                        help="activation checkpointing of every transformer block (default: none)")
    budget.add_argument("--activation-gb", type=float, metavar="GB",
                        help="GiB of activations to count instead of measuring them")
    budget.add_argument("--plot", metavar="PNG", help="write a stacked bar chart to this PNG")
    budget.add_argument("--json", action="store_true", help="print JSON (exact bytes) instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lion8bit budget ...``: exit code 0, or 2 with a one-line error for bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "budget":
        parser.print_help(sys.stderr)
        return 2
    if args.list:
        print(_list_text())
        return 0
    if args.model is None:
        parser.error("budget: give a MODEL, or --list")
    try:
        comparison = compare(
            args.model, args.dtype, args.optimizers, gpu_gb=args.gpu_gb, batch_size=args.batch_size,
            seq_len=args.seq_len, checkpointing=args.checkpointing, activation_gb=args.activation_gb,
        )
        if args.plot:
            comparison.plot(args.plot)
    except (ValueError, OSError) as error:
        print(f"lion8bit budget: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(json.dumps(comparison.to_dict(), indent=2) if args.json else comparison.format())
    return 0
