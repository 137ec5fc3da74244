"""Parameter shapes of models: the catalog, written from the models' published configs.

Shapes only, no tensors: a catalog model is a tuple of (name, shape) that equals, tensor by
tensor, what transformers builds from the same config.json (``tests/test_budget.py`` checks it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable


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
# model_type -> the config field holding the number of (identical) transformer blocks
LAYERS_FIELD = {"gpt2": "n_layer", "llama": "num_hidden_layers", "mistral": "num_hidden_layers",
                "vit": "num_hidden_layers"}


def _gpt2(d, layers, heads):
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=50257,
                n_positions=1024, n_embd=d, n_layer=layers, n_head=heads)


def _llama(d, inner, layers, heads, kv_heads, vocab=32000, context=4096, model_type="llama", **more):
    architecture = "MistralForCausalLM" if model_type == "mistral" else "LlamaForCausalLM"
    return dict(architectures=[architecture], model_type=model_type, vocab_size=vocab,
                hidden_size=d, intermediate_size=inner, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                max_position_embeddings=context, **more)


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
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, vocab=128256, context=8192),  # meta-llama/Meta-Llama-3-8B
    "mistral-7b": _llama(4096, 14336, 32, 32, 8, context=32768, model_type="mistral",
                         sliding_window=4096),  # mistralai/Mistral-7B-v0.1
    "vit-b-16": _vit(768, 3072, 12, 12, 16),  # google/vit-base-patch16-224
    "vit-l-16": _vit(1024, 4096, 24, 16, 16),  # google/vit-large-patch16-224
    "vit-h-14": _vit(1280, 5120, 32, 16, 14),  # google/vit-huge-patch14-224-in21k, 1000-class head
}


def describe_config(config: Mapping) -> str:
    """One line naming a config's architecture, for ``--list`` and table headers."""
    kind = config["model_type"]
    if kind == "gpt2":
        return (f"gpt2: {config['n_layer']} layers, d_model {config['n_embd']}, "
                f"vocab {config['vocab_size']}, tied head")
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


def dense_config(layers: int) -> dict:
    """The config.json fields of a dense decoder of the Llama-2 shape at a given depth.

    d_model = 128 * layers with 128-wide heads, the SwiGLU width of Llama-2's rule (8/3 d_model
    rounded up to a multiple of 256), vocab 32000, untied head, Llama-2's 4096-token context:
    32 layers is exactly Llama-2-7B, 40 layers Llama-2-13B.
    """
    d = 128 * layers
    inner = 256 * -(-(8 * d // 3) // 256)
    return _llama(d, inner, layers, layers, layers)


@functools.lru_cache(maxsize=None)
def dense_transformer(layers: int) -> ModelShapes:
    """The parameter shapes of ``dense_config(layers)``: the "largest dense transformer"."""
    config = dense_config(layers)
    return ModelShapes(f"dense-{layers}", tuple(llama_shapes(config)), describe_config(config))


