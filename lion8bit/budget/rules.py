"""Bytes per tensor: the training precisions and what each optimizer allocates as its state.

Each rule is what the optimizer's own code allocates (versions in the comments); the tests
check every rule against the state tensors the optimizer really holds after one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import momentum as mom
from .. import quant

GIB = 2**30


@dataclass(frozen=True)
class Precision:
    weights: int  # bytes per element of the weights forward/backward use
    master: int  # bytes per element of an fp32 master copy that the optimizer steps (0: none)
    grads: int
    optimizer_dtype: torch.dtype  # dtype of the params the optimizer steps
    description: str


PRECISIONS = {
    "fp32": Precision(4, 0, 4, torch.float32,
                      "fp32 weights and grads; the optimizer steps fp32 params "
                      "(also torch.autocast training: its bf16 casts are transient)"),
    "bf16": Precision(2, 0, 2, torch.bfloat16,
                      "bf16 weights and grads and no fp32 copy: the optimizer steps bf16 params "
                      "(Lion: use stochastic_rounding=True)"),
    "mixed": Precision(2, 4, 2, torch.float32,
                       "bf16 weights and grads for forward/backward + an fp32 master copy of the "
                       "trainable weights (counted in weights) that the optimizer steps, its state "
                       "as for fp32 params; fp32 grad casts during the step are transient"),
}


@dataclass(frozen=True)
class Rules:
    """Options the state rules depend on (the optimizers' own keyword names)."""

    min_8bit_size: int = 4096  # lion8bit and bitsandbytes: smaller tensors keep fp32 state
    block_size: int = quant.BLOCK_SIZE  # lion8bit's absmax block


DEFAULT_RULES = Rules()


# bitsandbytes 0.50.2 Optimizer1State / Optimizer2State.init_state: blocks of 256 hard-coded,
# uint8 codes + one fp32 absmax per block per state; tensors under min_8bit_size get fp32 state
# whatever the param dtype; every param's qmap1 (qmap2) is the optimizer's one "dynamic"
# ("udynamic") codebook of 256 fp32 values, shared, so counted once per optimizer.
_BNB_BLOCK_SIZE = 256
_BNB_QMAP_BYTES = 256 * 4


def _bnb_nbytes(numel: int, states: int, rules: Rules) -> int:
    if numel < rules.min_8bit_size:
        return states * 4 * numel
    return states * (numel + 4 * quant.num_blocks(numel, _BNB_BLOCK_SIZE))


def _bnb_shared(numels: list[int], states: int, rules: Rules) -> int:
    return states * _BNB_QMAP_BYTES if any(n >= rules.min_8bit_size for n in numels) else 0


def _ours_nbytes(kind: str) -> Callable[[int, torch.dtype, Rules], int]:
    def nbytes(numel: int, dtype: torch.dtype, rules: Rules) -> int:
        fmt = mom.momentum_format(numel, kind, rules.min_8bit_size)
        return mom.momentum_nbytes(numel, fmt, rules.block_size)

    return nbytes


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@dataclass(frozen=True)
class OptimizerRule:
    """What one optimizer allocates per trainable tensor (plus once per optimizer)."""

    key: str  # its name in OPTIMIZER_NAMES (--optimizers)
    label: str
    tensor_nbytes: Callable[[int, torch.dtype, Rules], int]  # (numel, param dtype, rules)
    describe: Callable[[torch.dtype, Rules], str]  # the state's format, for the table
    shared_nbytes: Callable[[list[int], Rules], int] = lambda numels, rules: 0
    paged: bool = False


OPTIMIZERS: dict[str, OptimizerRule] = {
    rule.key: rule
    for rule in (
        # torch 2.13 AdamW: exp_avg and exp_avg_sq like the param, and a 0-dim fp32 `step`
        # tensor per param (on the param's device with fused=True or capturable=True; the
        # default foreach path keeps it on the host: 4 bytes per tensor fewer on the GPU).
        OptimizerRule(
            "adamw", "AdamW (torch)",
            lambda n, dtype, rules: 2 * n * dtype.itemsize + 4,
            lambda dtype, rules: f"2 x {_dtype_name(dtype)} + step",
        ),
        OptimizerRule(
            "bnb-adamw8bit", "AdamW8bit (bitsandbytes)",
            lambda n, dtype, rules: _bnb_nbytes(n, 2, rules),
            lambda dtype, rules: f"2 x 8-bit (fp32 < {rules.min_8bit_size})",
            lambda numels, rules: _bnb_shared(numels, 2, rules),
        ),
        # lion-pytorch 0.2.5: exp_avg = zeros_like(param), nothing else.
        OptimizerRule(
            "lion-pytorch", "Lion (lion-pytorch)",
            lambda n, dtype, rules: n * dtype.itemsize,
            lambda dtype, rules: _dtype_name(dtype),
        ),
        OptimizerRule(
            "lion8bit-bf16", "Lion bf16 state (lion8bit)", _ours_nbytes("bf16"),
            lambda dtype, rules: "bf16",
        ),
        OptimizerRule(
            "lion8bit", "Lion8bit (lion8bit)", _ours_nbytes("8bit"),
            lambda dtype, rules: f"8-bit (fp32 < {rules.min_8bit_size})",
        ),
        OptimizerRule(
            "lion8bit-4bit", "Lion 4-bit state (lion8bit)", _ours_nbytes("4bit"),
            lambda dtype, rules: f"4-bit (fp32 < {rules.min_8bit_size})",
        ),
        OptimizerRule(
            "paged-lion8bit", "PagedLion8bit (lion8bit)", _ours_nbytes("8bit"),
            lambda dtype, rules: f"8-bit paged (fp32 < {rules.min_8bit_size})",
            paged=True,
        ),
        # torch 2.13 SGD(momentum > 0): momentum_buffer = clone of the first grad.
        OptimizerRule(
            "sgd", "SGD momentum (torch)",
            lambda n, dtype, rules: n * dtype.itemsize,
            lambda dtype, rules: _dtype_name(dtype),
        ),
        OptimizerRule(
            "lion8bit-fp32", "Lion fp32 state (lion8bit)", _ours_nbytes("fp32"),
            lambda dtype, rules: "fp32",
        ),
        OptimizerRule(
            "bnb-lion8bit", "Lion8bit (bitsandbytes)",
            lambda n, dtype, rules: _bnb_nbytes(n, 1, rules),
            lambda dtype, rules: f"8-bit (fp32 < {rules.min_8bit_size})",
            lambda numels, rules: _bnb_shared(numels, 1, rules),
        ),
    )
}
DEFAULT_OPTIMIZERS = (
    "adamw", "bnb-adamw8bit", "lion-pytorch", "lion8bit-bf16", "lion8bit", "lion8bit-4bit", "paged-lion8bit", "sgd"
)

