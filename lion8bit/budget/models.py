"""What ``compare`` accepts as a model, resolved into parameter shapes.

A catalog name, a Hugging Face config.json (built by transformers on the meta device), a
``module:function`` returning an ``nn.Module`` (called on the meta device), a module, or shapes.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .shapes import CATALOG, ModelShapes, ParamShape, catalog_model


def _module_shapes(module: torch.nn.Module, name: str, description: str) -> ModelShapes:
    # named_parameters() yields a tied (shared) parameter once, as the optimizers see it.
    params = tuple(
        ParamShape(param_name, tuple(p.shape), p.requires_grad)
        for param_name, p in module.named_parameters()
    )
    return ModelShapes(name, params, description)


def _read_config(path: Path, label: str) -> dict:
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
    return config


def hf_module(config: Mapping, label: str, purpose: str = "reading a Hugging Face config.json"):
    """The transformers model of a config.json's fields, built on the meta device (no weights).

    The class is the config's first ``architectures`` entry (``AutoModel`` without one).
    """
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(
            f"Invalid model config {label}: {purpose} needs transformers (pip install 'lion8bit[hf]')"
        )
    import transformers

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        with quiet_transformers():
            hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
            architectures = config.get("architectures") or []
            model_class = getattr(transformers, architectures[0], None) if architectures else None
            with torch.device("meta"):
                if model_class is not None:
                    return model_class(hf_config)
                return transformers.AutoModel.from_config(hf_config)
    except Exception as error:  # transformers raises many kinds; the user needs one line
        raise ValueError(
            f"Invalid model config {label}: transformers could not build it ({type(error).__name__}: {error})"
        ) from None


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings off (its loggers write to stderr, where errors get one line)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        yield
        return
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _import_file(path: str):
    # As `python path/file.py` would run it: its directory first on sys.path, so the file can
    # import its siblings (examples/train_char_lm.py imports examples/_common.py).
    file_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if file_spec is None or not Path(path).is_file():
        raise ImportError(f"no file {path}")
    module = importlib.util.module_from_spec(file_spec)
    directory = str(Path(path).resolve().parent)
    sys.path.insert(0, directory)
    try:
        file_spec.loader.exec_module(module)
    finally:
        sys.path.remove(directory)
    return module


def _function_module(spec: str) -> torch.nn.Module:
    module_name, _, function_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            module = _import_file(module_name)
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
    return built


@dataclass(frozen=True, eq=False)
class Model:
    """A model as the budget sees it: its parameter shapes and, when it has one, its module.

    ``module`` is the ``nn.Module`` that activations are measured on (on the meta device,
    or the caller's own module); ``None`` for bare shapes. A catalog model's module is built by
    transformers from its config on first use.
    """

    shapes: ModelShapes
    build: Callable[[], torch.nn.Module] | None = None

    @functools.cached_property
    def module(self) -> torch.nn.Module | None:
        return None if self.build is None else self.build()


def _built(module: torch.nn.Module, name: str, description: str) -> Model:
    return Model(_module_shapes(module, name, description), lambda: module)


def resolve_model(model) -> Model:
    """Resolve what ``compare`` accepts (see :func:`model_shapes`) into shapes and a module."""
    if isinstance(model, Model):
        return model
    if isinstance(model, torch.nn.Module):
        return _built(model, type(model).__name__, type(model).__name__)
    if isinstance(model, (str, Path)):
        text = str(model)
        if text.lower() in CATALOG:
            name = text.lower()
            return Model(catalog_model(name), functools.partial(
                hf_module, CATALOG[name], name, "measuring the activations of a catalog model"
            ))
        path = Path(text)
        if path.exists() or text.endswith(".json"):
            module = hf_module(_read_config(path, text), text)
            return _built(module, text, f"{type(module).__name__} from {text}")
        if ":" in text and not text.startswith(":") and not text.endswith(":"):
            module = _function_module(text)
            return _built(module, text, f"{type(module).__name__} from {text}")
        raise ValueError(
            f"Invalid model: {text!r} (not a catalog model, a config.json path or module:function; "
            "see lion8bit budget --list)"
        )
    return Model(_shapes_of(model))


def model_shapes(model) -> ModelShapes:
    """Resolve what ``compare`` accepts into parameter shapes.

    ``model``: a catalog name (``CATALOG``), a Hugging Face config.json path (or a directory
    holding one; needs transformers, built on the meta device), ``"module:function"`` or
    ``"path/file.py:function"`` returning an ``nn.Module`` (called on the meta device), an
    ``nn.Module``, a ``ModelShapes``, a mapping name -> shape, or an iterable of shapes / tensors
    (or a resolved ``Model``).
    """
    return resolve_model(model).shapes


def _shapes_of(model) -> ModelShapes:
    if isinstance(model, ModelShapes):
        return model
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


