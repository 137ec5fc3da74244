"""Memory budgets: what training a model takes on the GPU with each optimizer (DESIGN.md §4).

Byte counts of weights, grads and optimizer state for real parameter shapes, with the per-tensor
rules each optimizer applies when it allocates its state (checked against the tensors those
optimizers allocate in ``tests/test_budget.py``), and the ``lion8bit`` console script:

    lion8bit budget llama-2-7b --gpu-gb 24 80 --dtype mixed
    lion8bit budget --list

Units: GiB (2**30 bytes) everywhere, for the GPU sizes too (an "80 GB" A100 has 80 GiB).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import math
import sys
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import quant
from . import momentum as mom

GIB = 2**30


# ---------------------------------------------------------------------------------------------
# model shapes


@dataclass(frozen=True)
class ParamShape:
    """One parameter tensor: its name, shape, and whether it trains (has a grad and state)."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShapes:
    """The distinct parameter tensors of a model (tied weights once), and what the model is."""

    name: str
    params: tuple[ParamShape, ...]
    description: str = ""

    @property
    def n_params(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def n_trainable(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)


def gpt2_shapes(config: Mapping) -> list[ParamShape]:
    """GPT-2 (Radford et al. 2019) in Hugging Face's GPT2LMHeadModel layout.

    Conv1D weights are stored (in, out); the LM head is tied to the token embedding unless
    ``tie_word_embeddings`` is false, and tied weights are one tensor.
    """
    d, layers = config["n_embd"], config["n_layer"]
    inner = config.get("n_inner") or 4 * d
    shapes = [("transformer.wte.weight", (config["vocab_size"], d)),
              ("transformer.wpe.weight", (config["n_positions"], d))]
    for i in range(layers):
        at = f"transformer.h.{i}."
        shapes += [
            (at + "ln_1.weight", (d,)), (at + "ln_1.bias", (d,)),
            (at + "attn.c_attn.weight", (d, 3 * d)), (at + "attn.c_attn.bias", (3 * d,)),
            (at + "attn.c_proj.weight", (d, d)), (at + "attn.c_proj.bias", (d,)),
            (at + "ln_2.weight", (d,)), (at + "ln_2.bias", (d,)),
            (at + "mlp.c_fc.weight", (d, inner)), (at + "mlp.c_fc.bias", (inner,)),
            (at + "mlp.c_proj.weight", (inner, d)), (at + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    if not config.get("tie_word_embeddings", True):
        shapes.append(("lm_head.weight", (config["vocab_size"], d)))
    return [ParamShape(name, shape) for name, shape in shapes]


def llama_shapes(config: Mapping) -> list[ParamShape]:
    """Llama / Mistral decoders in Hugging Face's LlamaForCausalLM layout.

    RMSNorm weights only, SwiGLU MLP, grouped-query attention (``num_key_value_heads``), an
    untied LM head unless ``tie_word_embeddings``; rotary embeddings have no parameters.
    """
    d, vocab, inner = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    attention_bias, mlp_bias = config.get("attention_bias", False), config.get("mlp_bias", False)
    shapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(config["num_hidden_layers"]):
        at = f"model.layers.{i}."
        for proj, out_features, in_features in (
            ("q_proj", heads * head_dim, d),
            ("k_proj", kv_heads * head_dim, d),
            ("v_proj", kv_heads * head_dim, d),
            ("o_proj", d, heads * head_dim),
        ):
            shapes.append((f"{at}self_attn.{proj}.weight", (out_features, in_features)))
            if attention_bias:
                shapes.append((f"{at}self_attn.{proj}.bias", (out_features,)))
        for proj, out_features, in_features in (
            ("gate_proj", inner, d), ("up_proj", inner, d), ("down_proj", d, inner)
        ):
            shapes.append((f"{at}mlp.{proj}.weight", (out_features, in_features)))
            if mlp_bias:
                shapes.append((f"{at}mlp.{proj}.bias", (out_features,)))
        shapes += [(at + "input_layernorm.weight", (d,)), (at + "post_attention_layernorm.weight", (d,))]
    shapes.append(("model.norm.weight", (d,)))
    if not config.get("tie_word_embeddings", False):
        shapes.append(("lm_head.weight", (vocab, d)))
    return [ParamShape(name, shape) for name, shape in shapes]


def vit_shapes(config: Mapping) -> list[ParamShape]:
    """ViT (Dosovitskiy et al. 2021) with a classification head, Hugging Face's layout.

    Pre-norm blocks with biased q/k/v (``qkv_bias``), a class token, learned position
    embeddings for (image_size / patch_size)**2 + 1 tokens, a final LayerNorm and a linear head.
    """
    d, inner = config["hidden_size"], config["intermediate_size"]
    patch, channels = config["patch_size"], config.get("num_channels", 3)
    tokens = (config["image_size"] // patch) ** 2 + 1
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
    qkv_bias = config.get("qkv_bias", True)
    shapes = [
        ("vit.embeddings.cls_token", (1, 1, d)),
        ("vit.embeddings.position_embeddings", (1, tokens, d)),
        ("vit.embeddings.patch_embeddings.projection.weight", (d, channels, patch, patch)),
        ("vit.embeddings.patch_embeddings.projection.bias", (d,)),
    ]
    for i in range(config["num_hidden_layers"]):
        at = f"vit.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"{at}attention.{proj}.weight", (d, d)))
            if qkv_bias or proj == "o_proj":
                shapes.append((f"{at}attention.{proj}.bias", (d,)))
        shapes += [
            (at + "layernorm_before.weight", (d,)), (at + "layernorm_before.bias", (d,)),
            (at + "layernorm_after.weight", (d,)), (at + "layernorm_after.bias", (d,)),
            (at + "mlp.fc1.weight", (inner, d)), (at + "mlp.fc1.bias", (inner,)),
            (at + "mlp.fc2.weight", (d, inner)), (at + "mlp.fc2.bias", (d,)),
        ]
    shapes += [("vit.layernorm.weight", (d,)), ("vit.layernorm.bias", (d,)),
               ("classifier.weight", (labels, d)), ("classifier.bias", (labels,))]
    return [ParamShape(name, shape) for name, shape in shapes]


# model_type of a config.json -> the function giving its parameter shapes
FAMILIES: dict[str, Callable[[Mapping], list[ParamShape]]] = {
    "gpt2": gpt2_shapes,
    "llama": llama_shapes,
    "mistral": llama_shapes,
    "vit": vit_shapes,
}


def _gpt2(d, layers, heads):
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=50257,
                n_positions=1024, n_embd=d, n_layer=layers, n_head=heads)


def _llama(d, inner, layers, heads, kv_heads, vocab=32000, model_type="llama"):
    architecture = "MistralForCausalLM" if model_type == "mistral" else "LlamaForCausalLM"
    return dict(architectures=[architecture], model_type=model_type, vocab_size=vocab,
                hidden_size=d, intermediate_size=inner, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False)


def _vit(d, inner, layers, heads, patch):
    return dict(architectures=["ViTForImageClassification"], model_type="vit", hidden_size=d,
                intermediate_size=inner, num_hidden_layers=layers, num_attention_heads=heads,
                image_size=224, patch_size=patch, num_channels=3, qkv_bias=True, num_labels=1000)


# name -> the architecture fields of the model's published config.json (Hugging Face hub repo in
# the comment). ViTs: 224 px with the 1000-class ImageNet head, as in torchvision's vit_*.
CATALOG: dict[str, dict] = {
    "gpt2": _gpt2(768, 12, 12),  # openai-community/gpt2
    "gpt2-medium": _gpt2(1024, 24, 16),  # openai-community/gpt2-medium
    "gpt2-large": _gpt2(1280, 36, 20),  # openai-community/gpt2-large
    "gpt2-xl": _gpt2(1600, 48, 25),  # openai-community/gpt2-xl
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32),  # meta-llama/Llama-2-7b-hf
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40),  # meta-llama/Llama-2-13b-hf
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8),  # meta-llama/Llama-2-70b-hf
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, vocab=128256),  # meta-llama/Meta-Llama-3-8B
    "mistral-7b": _llama(4096, 14336, 32, 32, 8, model_type="mistral"),  # mistralai/Mistral-7B-v0.1
    "vit-b-16": _vit(768, 3072, 12, 12, 16),  # google/vit-base-patch16-224
    "vit-l-16": _vit(1024, 4096, 24, 16, 16),  # google/vit-large-patch16-224
    "vit-h-14": _vit(1280, 5120, 32, 16, 14),  # google/vit-huge-patch14-224-in21k, 1000-class head
}


def describe_config(config: Mapping) -> str:
    """One line naming a config's architecture, for ``--list`` and table headers."""
    kind = config["model_type"]
    if kind == "gpt2":
        return f"gpt2: {config['n_layer']} layers, d_model {config['n_embd']}, vocab {config['vocab_size']}, tied head"
    if kind == "vit":
        return (f"vit: {config['num_hidden_layers']} layers, d_model {config['hidden_size']}, "
                f"patch {config['patch_size']}, {config['image_size']} px, {config['num_labels']} classes")
    heads = config["num_attention_heads"]
    return (f"{kind}: {config['num_hidden_layers']} layers, d_model {config['hidden_size']}, "
            f"ffn {config['intermediate_size']}, {heads} heads "
            f"({config.get('num_key_value_heads') or heads} kv), vocab {config['vocab_size']}")


@functools.lru_cache(maxsize=None)
def catalog_model(name: str) -> ModelShapes:
    """The parameter shapes of a catalog model (``lion8bit budget --list``)."""
    config = CATALOG.get(name)
    if config is None:
        raise ValueError(f"Invalid model: {name!r} is not in the catalog ({', '.join(CATALOG)})")
    return ModelShapes(name, tuple(FAMILIES[config["model_type"]](config)), describe_config(config))


@functools.lru_cache(maxsize=None)
def dense_transformer(layers: int) -> ModelShapes:
    """A dense decoder of the Llama-2 shape at a given depth: the "largest dense transformer".

    d_model = 128 * layers with 128-wide heads, the SwiGLU width of Llama-2's rule (8/3 d_model
    rounded up to a multiple of 256), vocab 32000, untied head: 32 layers is exactly Llama-2-7B,
    40 layers Llama-2-13B.
    """
    d = 128 * layers
    inner = 256 * -(-(8 * d // 3) // 256)
    config = _llama(d, inner, layers, layers, layers)
    return ModelShapes(f"dense-{layers}", tuple(llama_shapes(config)), describe_config(config))


def _module_shapes(module: torch.nn.Module, name: str, description: str) -> ModelShapes:
    # named_parameters() yields a tied (shared) parameter once, as the optimizers see it.
    params = tuple(
        ParamShape(param_name, tuple(p.shape), p.requires_grad)
        for param_name, p in module.named_parameters()
    )
    return ModelShapes(name, params, description)


def _hf_config_shapes(path: Path, label: str) -> ModelShapes:
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"Invalid model config {label}: cannot read it ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Invalid model config {label}: not a JSON file ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(f"Invalid model config {label}: no \"model_type\" (not a Hugging Face config.json)")
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(
            f"Invalid model config {label}: reading a Hugging Face config.json needs transformers "
            "(pip install 'lion8bit[hf]')"
        )
    import transformers

    fields = {k: v for k, v in config.items() if k != "model_type"}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
        architectures = config.get("architectures") or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        with torch.device("meta"):
            if model_class is not None:
                module = model_class(hf_config)
            else:
                module = transformers.AutoModel.from_config(hf_config)
    except Exception as error:  # transformers raises many kinds; the user needs one line
        raise ValueError(
            f"Invalid model config {label}: transformers could not build it ({type(error).__name__}: {error})"
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return _module_shapes(module, label, f"{type(module).__name__} from {label}")


def _function_shapes(spec: str) -> ModelShapes:
    module_name, _, function_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            file_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if file_spec is None or not Path(module_name).is_file():
                raise ImportError(f"no file {module_name}")
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as error:
        raise ValueError(f"Invalid model: {spec!r}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"Invalid model: {spec!r}: {module_name!r} has no function {function_name!r}")
    try:
        # Built on the meta device: shapes only, no weights allocated.
        with torch.device("meta"):
            built = function()
    except Exception as error:
        raise ValueError(f"Invalid model: {spec!r} raised {type(error).__name__}: {error}") from None
    if not isinstance(built, torch.nn.Module):
        raise ValueError(f"Invalid model: {spec!r} returned {type(built).__name__}, not an nn.Module")
    return _module_shapes(built, spec, f"{type(built).__name__} from {spec}")


def model_shapes(model) -> ModelShapes:
    """Resolve what ``compare`` accepts into parameter shapes.

    ``model``: a catalog name (``CATALOG``), a Hugging Face config.json path (or a directory
    holding one; needs transformers, built on the meta device), ``"module:function"`` or
    ``"path/file.py:function"`` returning an ``nn.Module`` (called on the meta device), an
    ``nn.Module``, a ``ModelShapes``, a mapping name -> shape, or an iterable of shapes / tensors.
    """
    if isinstance(model, ModelShapes):
        return model
    if isinstance(model, torch.nn.Module):
        return _module_shapes(model, type(model).__name__, type(model).__name__)
    if isinstance(model, (str, Path)):
        text = str(model)
        if text.lower() in CATALOG:
            return catalog_model(text.lower())
        path = Path(text)
        if path.exists() or text.endswith(".json"):
            return _hf_config_shapes(path, text)
        if ":" in text and not text.startswith(":") and not text.endswith(":"):
            return _function_shapes(text)
        raise ValueError(
            f"Invalid model: {text!r} (not a catalog model, a config.json path or module:function; "
            "see lion8bit budget --list)"
        )
    if isinstance(model, Mapping):
        items = list(model.items())
    elif isinstance(model, Iterable):
        items = [(f"param{i}", shape) for i, shape in enumerate(model)]
    else:
        raise ValueError(f"Invalid model: {type(model).__name__} (expected a name, module or shapes)")
    params = []
    for name, shape in items:
        trainable = shape.requires_grad if isinstance(shape, torch.Tensor) else True
        dims = tuple(shape.shape) if isinstance(shape, torch.Tensor) else tuple(shape)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in dims):
            raise ValueError(f"Invalid shape of {name}: {shape}")
        params.append(ParamShape(str(name), dims, trainable))
    return ModelShapes("shapes", tuple(params), f"{len(params)} tensors")


# ---------------------------------------------------------------------------------------------
# training precision


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


# ---------------------------------------------------------------------------------------------
# optimizer state rules


@dataclass(frozen=True)
class Rules:
    """Options the state rules depend on (the optimizers' own keyword names)."""

    min_8bit_size: int = 4096  # lion8bit and bitsandbytes: smaller tensors keep fp32 state
    block_size: int = quant.BLOCK_SIZE  # lion8bit's absmax block


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

    key: str  # --optimizers name
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
            "lion-bf16", "Lion bf16 state (lion8bit)", _ours_nbytes("bf16"),
            lambda dtype, rules: "bf16",
        ),
        OptimizerRule(
            "lion8bit", "Lion8bit (lion8bit)", _ours_nbytes("8bit"),
            lambda dtype, rules: f"8-bit (fp32 < {rules.min_8bit_size})",
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
            "lion-fp32", "Lion fp32 state (lion8bit)", _ours_nbytes("fp32"),
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
DEFAULT_OPTIMIZERS = ("adamw", "bnb-adamw8bit", "lion-pytorch", "lion-bf16", "lion8bit", "paged-lion8bit", "sgd")


# ---------------------------------------------------------------------------------------------
# the comparison


@dataclass(frozen=True)
class Row:
    """One optimizer's bytes on the GPU; ``paged`` bytes live in CUDA managed memory."""

    optimizer: str
    label: str
    state_format: str
    weights: int
    grads: int
    state: int  # on the device (paged rows: small tensors' + the largest paged one's, see budget_row)
    paged: int  # managed memory: on the device while there is room, evicted to host RAM
    n_params: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state

    @property
    def bytes_per_param(self) -> float:
        return self.total / self.n_params if self.n_params else 0.0


def budget_row(shapes: ModelShapes, optimizer: str, dtype: str = "mixed", rules: Rules = Rules()) -> Row:
    """Bytes of weights, grads and optimizer state of ``shapes`` trained with ``optimizer``.

    Frozen tensors (``trainable=False``) count as weights only. For a paged optimizer the
    momentum of every tensor of at least ``lion8bit.momentum.PAGED_MIN_NUMEL`` elements is in ``paged``;
    ``state`` holds the smaller tensors' momentum plus the largest paged tensor's: the step
    updates a paged group one tensor at a time, so that much has to be resident at once (a
    floor: the driver decides what else stays).
    """
    rule, precision = OPTIMIZERS[optimizer], PRECISIONS[dtype]
    trainable = [p.numel for p in shapes.params if p.trainable]
    frozen = shapes.n_params - sum(trainable)
    per_tensor = [rule.tensor_nbytes(n, precision.optimizer_dtype, rules) for n in trainable]
    state = sum(per_tensor) + rule.shared_nbytes(trainable, rules)
    paged = 0
    if rule.paged:
        in_managed = [b for n, b in zip(trainable, per_tensor) if n >= mom.PAGED_MIN_NUMEL]
        paged = sum(in_managed)
        state = state - paged + max(in_managed, default=0)
    return Row(
        optimizer=optimizer,
        label=rule.label,
        state_format=rule.describe(precision.optimizer_dtype, rules),
        weights=sum(trainable) * (precision.weights + precision.master) + frozen * precision.weights,
        grads=sum(trainable) * precision.grads,
        state=state,
        paged=paged,
        n_params=shapes.n_params,
    )


@dataclass(frozen=True)
class Fit:
    """One optimizer on one GPU size: does the model fit, and the largest ones that do."""

    optimizer: str
    fits: bool
    free: int  # bytes left (negative: missing) after weights + grads + state + activations
    largest_catalog_model: str | None
    largest_catalog_params: int
    largest_dense_layers: int  # 0: not even one layer fits
    largest_dense_params: int


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` returns: rows per optimizer and the fits per GPU size."""

    model: ModelShapes
    dtype: str
    rules: Rules
    rows: tuple[Row, ...]
    gpu_gb: tuple[float, ...]
    activation_gb: float
    fits: dict[float, tuple[Fit, ...]]

    def row(self, optimizer: str) -> Row:
        return next(r for r in self.rows if r.optimizer == optimizer)

    def to_dict(self) -> dict:
        """Everything as plain JSON values; bytes as exact ints."""
        return {
            "model": {
                "name": self.model.name,
                "description": self.model.description,
                "params": self.model.n_params,
                "trainable_params": self.model.n_trainable,
                "tensors": len(self.model.params),
            },
            "dtype": self.dtype,
            "dtype_description": PRECISIONS[self.dtype].description,
            "min_8bit_size": self.rules.min_8bit_size,
            "block_size": self.rules.block_size,
            "unit": "bytes",
            "rows": [
                {
                    "optimizer": r.optimizer,
                    "label": r.label,
                    "state_format": r.state_format,
                    "weights": r.weights,
                    "grads": r.grads,
                    "state": r.state,
                    "paged": r.paged,
                    "total": r.total,
                    "bytes_per_param": r.bytes_per_param,
                }
                for r in self.rows
            ],
            "activation_gib": self.activation_gb,
            "gpus": [
                {
                    "gpu_gib": gpu,
                    "fits": [
                        {
                            "optimizer": f.optimizer,
                            "fits": f.fits,
                            "free": f.free,
                            "largest_catalog_model": f.largest_catalog_model,
                            "largest_catalog_params": f.largest_catalog_params,
                            "largest_dense_layers": f.largest_dense_layers,
                            "largest_dense_params": f.largest_dense_params,
                        }
                        for f in self.fits[gpu]
                    ],
                }
                for gpu in self.gpu_gb
            ],
        }

    def format(self) -> str:
        """The readable table the CLI prints."""
        model = self.model
        counts = f"{model.n_params:,} parameters in {len(model.params)} tensors"
        if model.n_trainable != model.n_params:
            counts += f", {model.n_trainable:,} trainable"
        lines = [f"{model.name}: {counts}"]
        if model.description and model.description != model.name:
            lines.append(f"  {model.description}")
        lines += textwrap.wrap(f"dtype {self.dtype}: {PRECISIONS[self.dtype].description}", 100,
                               subsequent_indent="  ")
        lines.append("sizes in GiB (2**30 bytes)")

        label_width = max(len(r.label) for r in self.rows)
        format_width = max(len(r.state_format) for r in self.rows)
        table = [f"{'optimizer':<{label_width}}  {'state format':<{format_width}}  "
                 f"{'weights':>8}  {'grads':>8}  {'state':>8}  {'total':>8}  {'B/param':>8}"]
        for r in self.rows:
            table.append(
                f"{r.label:<{label_width}}  {r.state_format:<{format_width}}  {r.weights / GIB:>8.2f}  "
                f"{r.grads / GIB:>8.2f}  {r.state / GIB:>8.2f}  {r.total / GIB:>8.2f}  "
                f"{r.bytes_per_param:>8.3f}" + (" *" if r.paged else "")
            )
        lines += ["", table[0], "-" * max(map(len, table)), *table[1:]]
        paged = next((r for r in self.rows if r.paged), None)
        if paged is not None:
            lines += textwrap.wrap(
                f"* {paged.label}: {paged.paged / GIB:.2f} GiB of momentum in CUDA managed memory "
                "(evicted to host RAM under pressure), not in its total; its state column is the "
                f"momentum of tensors under {mom.PAGED_MIN_NUMEL:,} elements (never paged) plus "
                "the largest paged tensor's, resident while that tensor updates",
                100,
                subsequent_indent="  ",
            )

        model_width = max(len(model.name), 16)
        for gpu in self.gpu_gb:
            table = [f"{'optimizer':<{label_width}}  {model.name:<{model_width}}  "
                     f"{'largest catalog model':<24}  largest dense transformer"]
            for r, f in zip(self.rows, self.fits[gpu]):
                verdict = f"{'fits' if f.fits else 'no'} ({f.free / GIB:+.1f})"
                catalog = (f"{f.largest_catalog_model} ({_params_text(f.largest_catalog_params)})"
                           if f.largest_catalog_model else "none")
                dense = (f"{_params_text(f.largest_dense_params)} ({f.largest_dense_layers} layers x "
                         f"{128 * f.largest_dense_layers})" if f.largest_dense_layers else "none")
                table.append(f"{r.label:<{label_width}}  {verdict:<{model_width}}  {catalog:<24}  {dense}")
            lines += [
                "",
                f"{gpu:g} GiB GPU, {self.activation_gb:g} GiB kept for activations (--activation-gb); "
                "(GiB left after weights + grads + state):",
                table[0], "-" * max(map(len, table)), *table[1:],
            ]
        if self.gpu_gb:
            lines += ["", "largest dense transformer: Llama-2 shape with d_model = 128 x layers "
                         "(32 layers = llama-2-7b)"]
        return "\n".join(lines)

    __str__ = format

    def plot(self, path) -> None:
        """A stacked bar chart (weights / grads / state per optimizer) as PNG at ``path``."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ValueError("Invalid --plot: it needs matplotlib (pip install 'lion8bit[plot]')") from None
        figure = Figure(figsize=(9, 4.8), layout="constrained")
        axes = figure.subplots()
        labels = [r.label.replace(" (", "\n(") for r in self.rows]
        bottom = [0.0] * len(self.rows)
        for part, color in (("weights", "#4c72b0"), ("grads", "#dd8452"), ("state", "#55a868")):
            values = [getattr(r, part) / GIB for r in self.rows]
            axes.bar(labels, values, bottom=bottom, label=part, color=color)
            bottom = [b + v for b, v in zip(bottom, values)]
        if any(r.paged for r in self.rows):
            axes.bar(labels, [r.paged / GIB for r in self.rows], bottom=bottom, label="state in managed memory",
                     color="none", edgecolor="#55a868", hatch="//")
        for gpu in self.gpu_gb:
            room = gpu - self.activation_gb
            axes.axhline(room, color="0.3", linestyle="--", linewidth=1)
            text = f"{gpu:g} GiB GPU" + (f" - {self.activation_gb:g} GiB activations" if self.activation_gb else "")
            axes.annotate(text, (-0.45, room), ha="left", va="bottom", fontsize=8, color="0.2",
                          bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
        tallest = max([r.total + r.paged for r in self.rows] + [g * GIB for g in self.gpu_gb]) / GIB
        axes.set_ylim(0, tallest * 1.15)
        axes.set_ylabel("GiB")
        axes.set_title(f"{self.model.name} ({_params_text(self.model.n_params)} params), dtype {self.dtype}")
        axes.tick_params(axis="x", labelsize=7)
        axes.legend(fontsize=8, loc="upper right", ncols=4)
        figure.savefig(path, dpi=90)


def _params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _largest_dense(optimizer: str, dtype: str, rules: Rules, room: int) -> int:
    """The most layers of ``dense_transformer`` that fit in ``room`` bytes (0: none)."""

    def fits(layers: int) -> bool:
        return budget_row(dense_transformer(layers), optimizer, dtype, rules).total <= room

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):  # bytes grow with depth (and width with it): double, then bisect
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _check_gb(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number of GiB)")
    return float(value)


def compare(
    model_or_shapes,
    dtype: str = "mixed",
    optimizers: Iterable[str] = DEFAULT_OPTIMIZERS,
    *,
    gpu_gb: Iterable[float] = (),
    activation_gb: float = 0.0,
    min_8bit_size: int = 4096,
    block_size: int = quant.BLOCK_SIZE,
) -> Comparison:
    """Weights, grads and optimizer state of a model trained with each optimizer, in bytes.

    Args:
        model_or_shapes: anything :func:`model_shapes` accepts (e.g. ``"llama-2-7b"``).
        dtype: ``"fp32"`` | ``"bf16"`` | ``"mixed"`` (see ``PRECISIONS``).
        optimizers: keys of ``OPTIMIZERS``, one row each.
        gpu_gb: GPU sizes in GiB; for each, whether the model fits with each optimizer and the
            largest catalog model and dense transformer that do.
        activation_gb: GiB kept free for activations (and anything else) on every GPU.
        min_8bit_size: lion8bit's and bitsandbytes' fp32 fallback threshold.
        block_size: lion8bit's absmax block.
    """
    if dtype not in PRECISIONS:
        raise ValueError(f"Invalid dtype: {dtype!r} (expected one of {', '.join(PRECISIONS)})")
    optimizers = tuple(optimizers)
    for key in optimizers:
        if key not in OPTIMIZERS:
            raise ValueError(f"Invalid optimizer: {key!r} (expected one of {', '.join(OPTIMIZERS)})")
    if not optimizers:
        raise ValueError("Invalid optimizers: none given")
    gpus = tuple(_check_gb("gpu_gb", g) for g in gpu_gb)
    for gpu in gpus:
        if gpu <= 0:
            raise ValueError(f"Invalid gpu_gb: {gpu:g} (expected > 0)")
    activation_gb = _check_gb("activation_gb", activation_gb)
    if activation_gb < 0:
        raise ValueError(f"Invalid activation_gb: {activation_gb:g} (expected >= 0)")
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or (
        block_size & (block_size - 1)
    ):
        raise ValueError(f"Invalid block_size: {block_size!r} (expected a positive power of two)")
    rules = Rules(min_8bit_size, block_size)
    shapes = model_shapes(model_or_shapes)
    rows = tuple(budget_row(shapes, key, dtype, rules) for key in optimizers)

    activation_bytes = round(activation_gb * GIB)
    catalog_rows = {
        name: {key: budget_row(catalog_model(name), key, dtype, rules) for key in optimizers}
        for name in (CATALOG if gpus else ())
    }
    fits = {}
    for gpu in gpus:
        room = round(gpu * GIB) - activation_bytes
        per_optimizer = []
        for row in rows:
            fitting = [name for name in CATALOG if catalog_rows[name][row.optimizer].total <= room]
            best = max(fitting, key=lambda name: catalog_model(name).n_params, default=None)
            layers = _largest_dense(row.optimizer, dtype, rules, room)
            per_optimizer.append(Fit(
                optimizer=row.optimizer,
                fits=row.total <= room,
                free=room - row.total,
                largest_catalog_model=best,
                largest_catalog_params=catalog_model(best).n_params if best else 0,
                largest_dense_layers=layers,
                largest_dense_params=dense_transformer(layers).n_params if layers else 0,
            ))
        fits[gpu] = tuple(per_optimizer)
    return Comparison(shapes, dtype, rules, rows, gpus, activation_gb, fits)


# ---------------------------------------------------------------------------------------------
# the console script


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
    lines += [f"  {key:<{width}}  {rule.label}" + ("  [default]" if key in DEFAULT_OPTIMIZERS else "")
              for key, rule in OPTIMIZERS.items()]
    lines += ["", "dtypes (--dtype):"]
    lines += [f"  {name:<5}  {precision.description}" for name, precision in PRECISIONS.items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lion8bit", description="lion8bit command line tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    budget = commands.add_parser(
        "budget",
        help="memory of weights, grads and optimizer state per optimizer; what fits on which GPU",
        description="Exact bytes of weights, grads and optimizer state of a model with each "
        "optimizer, and the largest models that fit on each GPU size. Sizes in GiB (2**30 bytes).",
    )
    budget.add_argument("model", nargs="?", metavar="MODEL",
                        help="catalog name (see --list), Hugging Face config.json path, or module:function")
    budget.add_argument("--list", action="store_true", help="list catalog models, optimizers and dtypes")
    budget.add_argument("--gpu-gb", type=float, nargs="+", default=[24.0, 80.0], metavar="GB",
                        help="GPU sizes in GiB (default: 24 80)")
    budget.add_argument("--dtype", choices=tuple(PRECISIONS), default="mixed",
                        help="training precision (default: mixed; see --list)")
    budget.add_argument("--optimizers", nargs="+", choices=tuple(OPTIMIZERS), default=list(DEFAULT_OPTIMIZERS),
                        metavar="NAME", help="rows to show (default: the 7 marked in --list)")
    budget.add_argument("--activation-gb", type=float, default=0.0, metavar="GB",
                        help="GiB to keep free on the GPU for activations (default: 0)")
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
            args.model, args.dtype, args.optimizers, gpu_gb=args.gpu_gb, activation_gb=args.activation_gb
        )
        if args.plot:
            comparison.plot(args.plot)
    except (ValueError, OSError) as error:
        print(f"lion8bit budget: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(json.dumps(comparison.to_dict(), indent=2) if args.json else comparison.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
