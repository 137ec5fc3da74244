"""The optimizer names: one vocabulary for every place that names optimizers.

``lion8bit budget --optimizers``, the examples' ``--optimizers`` (``examples/_common.py``) and
``benchmarks/bench_step.py`` take their names from here, so one name means one optimizer
everywhere. How an optimizer is run (lion8bit's ``backend``, lion-pytorch's foreach variant)
is not part of its name: the benchmark reports it in a column of its own.

Plain data, no torch: importing it costs nothing.
"""

# name -> what it is, in one line
OPTIMIZER_NAMES: dict[str, str] = {
    "lion8bit": "lion8bit.Lion8bit: 8-bit momentum (fp32 under min_8bit_size)",
    "lion8bit-4bit": 'lion8bit.Lion(state="4bit"): 4-bit momentum (fp32 under min_8bit_size)',
    "lion8bit-bf16": 'lion8bit.Lion(state="bf16"): bf16 momentum',
    "lion8bit-fp32": 'lion8bit.Lion(state="fp32"): fp32 momentum',
    "lion8bit-cautious": "lion8bit.Lion8bit(cautious_factor=0.0): 8-bit momentum, cautious update",
    "paged-lion8bit": "lion8bit.PagedLion8bit: 8-bit momentum in CUDA managed memory",
    "lion-pytorch": "lion_pytorch.Lion: momentum in the param dtype",
    "bnb-lion8bit": "bitsandbytes.optim.Lion8bit: 8-bit momentum (fp32 under min_8bit_size)",
    "bnb-adamw8bit": "bitsandbytes.optim.AdamW8bit: two 8-bit moments (fp32 under min_8bit_size)",
    "adamw": "torch.optim.AdamW: two moments in the param dtype",
    "sgd": "torch.optim.SGD with momentum: one buffer in the param dtype",
}

