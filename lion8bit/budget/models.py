"""What ``compare`` accepts as a model, resolved into parameter shapes.

A catalog name, a Hugging Face config.json (built by transformers on the meta device), a
``module:function`` returning an ``nn.Module`` (called on the meta device), a module, or shapes.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .shapes import CATALOG, ModelShapes, ParamShape, catalog_model


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
        reason = error.strerror or error
        raise ValueError(f"Invalid model config {label}: cannot read it ({reason})") from None
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


