"""Memory budgets: what training a model takes on the GPU with each optimizer (docs/budget.md).

Byte counts of weights, grads and optimizer state for real parameter shapes, with the per-tensor
rules each optimizer applies when it allocates its state (checked against the tensors those
optimizers allocate in ``tests/test_budget.py``), and the ``lion8bit`` console script:

    lion8bit budget llama-2-7b --gpu-gb 24 80 --dtype mixed
    lion8bit budget --list

Units: GiB (2**30 bytes) everywhere, for the GPU sizes too (an "80 GB" A100 has 80 GiB).

The package reads lion8bit's state formats from the spec (``lion8bit.quant``,
``lion8bit.momentum``) and nothing else of lion8bit:

- ``optimizers``: the optimizer names, one vocabulary for the budget, examples and benchmarks
- ``shapes``: parameter shapes of the catalog models
- ``models``: what ``compare`` accepts as a model (config.json, module:function, ...)
- ``rules``: training precisions and what each optimizer allocates
- ``comparison``: rows per optimizer, what fits on each GPU (``compare``)
- ``report``: tables, JSON, PNG
- ``cli``: the console script
"""

from .cli import main
from .comparison import Comparison, Fit, Row, budget_row, compare
from .models import model_shapes
from .optimizers import OPTIMIZER_NAMES
from .rules import DEFAULT_OPTIMIZERS, GIB, OPTIMIZERS, PRECISIONS, OptimizerRule, Precision, Rules
from .shapes import (
    CATALOG,
    FAMILIES,
    LAYERS_FIELD,
    ModelShapes,
    ParamShape,
    catalog_model,
    dense_config,
    dense_transformer,
    describe_config,
    gpt2_shapes,
    llama_shapes,
    vit_shapes,
)

__all__ = [
    "CATALOG", "DEFAULT_OPTIMIZERS", "FAMILIES", "GIB", "LAYERS_FIELD", "OPTIMIZERS", "OPTIMIZER_NAMES",
    "PRECISIONS", "Comparison", "Fit", "ModelShapes", "OptimizerRule", "ParamShape", "Precision", "Row",
    "Rules", "budget_row", "catalog_model", "compare", "dense_config", "dense_transformer", "describe_config",
    "gpt2_shapes", "llama_shapes", "main", "model_shapes", "vit_shapes",
]
