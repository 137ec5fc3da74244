"""The memory-budget tool: catalog shapes, byte counts against what optimizers allocate, the CLI."""

import functools
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import lion_pytorch
import pytest
import torch

import lion8bit
from lion8bit import budget
from lion8bit import momentum as mom
from lion8bit.budget import GIB, compare

ROOT = Path(__file__).resolve().parents[1]

# Published parameter totals (external facts, not outputs of this code):
# GPT-2, Llama, Mistral: the Hugging Face model repos' safetensors totals (tied embeddings once);
# ViT: torchvision's weight metadata (num_params of ViT_B_16 / ViT_L_16 IMAGENET1K_V1 at 224 px,
# ViT_H_14 IMAGENET1K_SWAG_E2E_V1 at 518 px; our vit-h-14 is the 224 px model, checked there
# against transformers below).
PUBLISHED = [
    ("gpt2", {}, 124_439_808),
    ("gpt2-medium", {}, 354_823_168),
    ("gpt2-large", {}, 774_030_080),
    ("gpt2-xl", {}, 1_557_611_200),
    ("llama-2-7b", {}, 6_738_415_616),
    ("llama-2-13b", {}, 13_015_864_320),
    ("llama-2-70b", {}, 68_976_648_192),
    ("llama-3-8b", {}, 8_030_261_248),
    ("mistral-7b", {}, 7_241_732_096),
    ("vit-b-16", {}, 86_567_656),
    ("vit-l-16", {}, 304_326_632),
    ("vit-h-14", {"image_size": 518}, 633_470_440),
]


@pytest.mark.parametrize("name, overrides, total", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_catalog_totals_equal_published(name, overrides, total):
    config = {**budget.CATALOG[name], **overrides}
    shapes = budget.FAMILIES[config["model_type"]](config)
    assert sum(p.numel for p in shapes) == total


def test_catalog_lists_the_issue_models():
    wanted = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b", "llama-2-13b",
              "llama-2-70b", "llama-3-8b", "mistral-7b", "vit-b-16", "vit-l-16", "vit-h-14"}
    assert wanted <= set(budget.CATALOG)


def _sorted_shapes(model: budget.ModelShapes):
    return sorted(p.shape for p in model.params)


@pytest.mark.parametrize("name", list(budget.CATALOG))
def test_catalog_shapes_equal_transformers_meta_build(name, tmp_path):
    """Our shape code and transformers' model classes agree tensor by tensor (via config.json)."""
    pytest.importorskip("transformers")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(budget.CATALOG[name]))
    built = budget.model_shapes(str(path))
    assert _sorted_shapes(built) == _sorted_shapes(budget.catalog_model(name))


@pytest.mark.parametrize("layers, name", [(32, "llama-2-7b"), (40, "llama-2-13b")])
def test_dense_family_contains_llama2(layers, name):
    assert budget.dense_transformer(layers).params == budget.catalog_model(name).params


# ---------------------------------------------------------------------------------------------
# exactness: predicted state bytes == bytes of the state tensors the optimizers allocate


def _tiny_gpt2():
    # vocab 101 x 64: a partial last absmax block; n_positions 64 x 64 = 4096, exactly min_8bit_size.
    config = dict(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    return {p.name: torch.nn.Parameter(torch.randn(p.shape)) for p in budget.gpt2_shapes(config)}


def _tiny_llama():
    # grouped-query attention (k/v 2048 elements, under min_8bit_size), untied head of
    # 131 x 64 (a partial last absmax block)
    config = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1)
    return {p.name: torch.nn.Parameter(torch.randn(p.shape)) for p in budget.llama_shapes(config)}


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 5), torch.nn.Flatten(), torch.nn.Linear(32 * 4 * 4, 65),
        torch.nn.Linear(65, 70),
    )


class _TiedMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(300, 40)
        self.hidden = torch.nn.Linear(40, 200)
        self.out = torch.nn.Linear(40, 300, bias=False)
        self.out.weight = self.embed.weight  # tied: one tensor, one state


MODELS = {"gpt2-tiny": _tiny_gpt2, "llama-tiny": _tiny_llama, "cnn": _cnn, "tied-mlp": _TiedMLP}

def _lion8bit(kind, params, rules):
    return lion8bit.Lion(params, state=kind, min_8bit_size=rules.min_8bit_size, block_size=rules.block_size)


MAKERS = {
    "adamw": lambda params, rules: torch.optim.AdamW(params, lr=1e-3),
    "sgd": lambda params, rules: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
    "lion-pytorch": lambda params, rules: lion_pytorch.Lion(params, lr=1e-4),
    "bnb-adamw8bit": lambda params, rules: bnb.optim.AdamW8bit(params, min_8bit_size=rules.min_8bit_size),
    "bnb-lion8bit": lambda params, rules: bnb.optim.Lion8bit(params, min_8bit_size=rules.min_8bit_size),
    **{
        key: functools.partial(_lion8bit, kind)
        for key, kind in (
            ("lion8bit", "8bit"), ("lion8bit-4bit", "4bit"), ("lion8bit-bf16", "bf16"), ("lion8bit-fp32", "fp32")
        )
    },
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RULES = [budget.Rules(), budget.Rules(min_8bit_size=100, block_size=64)]


def _params_of(model):
    if isinstance(model, torch.nn.Module):
        return list(model.parameters())
    return list(model.values())


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared ones, like bnb's qmaps, once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _state_tensors(optimizer):
    return [v for entry in optimizer.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]


def _one_step(model, key, rules):
    params = _params_of(model)
    optimizer = MAKERS[key](params, rules)
    for param in params:
        if param.requires_grad:
            param.grad = torch.randn_like(param)
    optimizer.step()
    return optimizer


# min_8bit_size and block_size apply to lion8bit's kinds and (min_8bit_size only) bitsandbytes'
CASES = [
    (model_name, key, dtype, rules)
    for model_name in MODELS
    for key in MAKERS
    for dtype in DTYPES
    for rules in (RULES if key not in ("adamw", "sgd", "lion-pytorch") else RULES[:1])
]


@pytest.mark.parametrize(
    "model_name, key, dtype, rules",
    CASES,
    ids=[f"{m}-{k}-{d}-min{r.min_8bit_size}-block{r.block_size}" for m, k, d, r in CASES],
)
def test_predicted_bytes_equal_allocated(model_name, key, dtype, rules):
    model = MODELS[model_name]()
    if isinstance(model, torch.nn.Module):
        model.to(DTYPES[dtype])
    else:
        model = {name: torch.nn.Parameter(p.detach().to(DTYPES[dtype])) for name, p in model.items()}
    optimizer = _one_step(model, key, rules)
    row = compare(model, dtype, [key], min_8bit_size=rules.min_8bit_size,
                  block_size=rules.block_size).row(key)
    params = _params_of(model)
    assert row.state == _storage_bytes(_state_tensors(optimizer))
    assert row.weights == _storage_bytes(params)
    assert row.grads == _storage_bytes(p.grad for p in params)
    assert row.paged == 0


@pytest.mark.parametrize("key", ["adamw", "bnb-adamw8bit", "lion8bit", "lion8bit-bf16"])
def test_mixed_counts_bf16_model_plus_fp32_master(key):
    """dtype="mixed" is: bf16 weights and grads, fp32 master weights stepped by the optimizer."""
    model = _cnn().to(torch.bfloat16)
    master = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer = MAKERS[key](master, budget.Rules())
    for m, p in zip(master, model.parameters(), strict=True):
        m.grad = p.grad.float()  # the transient cast the step uses, not counted
    optimizer.step()
    row = compare(model, "mixed", [key]).row(key)
    assert row.weights == _storage_bytes(list(model.parameters()) + master)
    assert row.grads == _storage_bytes(p.grad for p in model.parameters())
    assert row.state == _storage_bytes(_state_tensors(optimizer))


@pytest.mark.parametrize("key", ["adamw", "bnb-lion8bit", "lion8bit"])
@pytest.mark.parametrize("dtype", ["fp32", "mixed"])
def test_frozen_params_count_as_weights_only(key, dtype):
    model = _cnn()
    for p in model[0].parameters():
        p.requires_grad_(False)
    optimizer = _one_step(model, key, budget.Rules())
    row = compare(model, dtype, [key]).row(key)
    frozen = sum(p.numel() for p in model[0].parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    assert row.state == _storage_bytes(_state_tensors(optimizer))
    # fp32: 4-byte weights and grads; mixed: 2-byte weights and grads, 4-byte master copies
    # of the trainable weights only
    if dtype == "fp32":
        assert (row.weights, row.grads) == (4 * (frozen + n_trainable), 4 * n_trainable)
    else:
        assert (row.weights, row.grads) == (2 * (frozen + n_trainable) + 4 * n_trainable, 2 * n_trainable)


def test_paged_row_moves_the_large_tensors_momentum_to_paged():
    """paged.py pages tensors of at least PAGED_MIN_NUMEL elements; the rest stays on the device."""

    model = budget.catalog_model("gpt2")
    result = compare(model, "bf16", ["lion8bit", "paged-lion8bit"])
    plain, paged = result.row("lion8bit"), result.row("paged-lion8bit")

    def state_of(p):
        return compare([p.shape], "bf16", ["lion8bit"]).row("lion8bit").state

    large = [state_of(p) for p in model.params if p.numel >= mom.PAGED_MIN_NUMEL]
    small = [state_of(p) for p in model.params if p.numel < mom.PAGED_MIN_NUMEL]
    assert large and small, "gpt2 has both (LayerNorm and biases are small)"
    assert paged.paged == sum(large)
    assert paged.state == sum(small) + max(large)
    assert paged.paged + sum(small) == plain.state
    assert (paged.weights, paged.grads) == (plain.weights, plain.grads)


# ---------------------------------------------------------------------------------------------
# what fits


def test_fit_boundary_is_exact():
    row = compare("llama-2-7b", "bf16", ["lion8bit"]).row("lion8bit")
    exact = row.total / GIB  # a power-of-two division: exact in float64
    at = compare("llama-2-7b", "bf16", ["lion8bit"], gpu_gb=[exact]).fits[exact][0]
    assert at.fits and at.free == 0
    below = exact - 1 / GIB
    assert not compare("llama-2-7b", "bf16", ["lion8bit"], gpu_gb=[below]).fits[below][0].fits
    with_activations = compare("llama-2-7b", "bf16", ["lion8bit"], gpu_gb=[exact], activation_gb=0.5)
    assert with_activations.fits[exact][0].free == -GIB // 2


@pytest.mark.parametrize("gpu", [8.0, 24.0, 80.0])
@pytest.mark.parametrize("dtype", ["fp32", "mixed"])
def test_largest_fits_are_the_largest(gpu, dtype):
    result = compare("gpt2", dtype, budget.DEFAULT_OPTIMIZERS, gpu_gb=[gpu], activation_gb=2.0)
    room = (gpu - 2.0) * GIB
    for fit in result.fits[gpu]:
        total = {name: budget.budget_row(budget.catalog_model(name), fit.optimizer, dtype).total
                 for name in budget.CATALOG}
        fitting = [name for name in budget.CATALOG if total[name] <= room]
        assert fit.largest_catalog_params == max(budget.catalog_model(n).n_params for n in fitting)
        assert total[fit.largest_catalog_model] <= room
        layers = fit.largest_dense_layers
        dense = [budget.budget_row(budget.dense_transformer(n), fit.optimizer, dtype).total
                 for n in (layers, layers + 1)]
        assert dense[0] <= room < dense[1]
        assert fit.largest_dense_params == budget.dense_transformer(layers).n_params


def test_lion8bit_fits_more_than_adamw():
    fits = compare("llama-2-7b", "mixed", ["adamw", "lion8bit"], gpu_gb=[80]).fits[80.0]
    adamw, ours = fits
    assert ours.largest_dense_params > adamw.largest_dense_params
    assert ours.fits and not adamw.fits


# ---------------------------------------------------------------------------------------------
# models from files and functions

MODULE_SOURCE = """
import torch
DEVICES = []

def build():
    model = torch.nn.Sequential(torch.nn.Linear(5000, 300), torch.nn.Linear(300, 7))
    DEVICES.append(next(model.parameters()).device.type)
    return model

def not_a_module():
    return 3

def broken():
    raise RuntimeError("no such layer")
"""


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    path = tmp_path / "budget_models.py"
    path.write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


@pytest.mark.parametrize("form", ["module", "file"])
def test_module_function_is_built_on_meta(model_file, form):
    spec = "budget_models:build" if form == "module" else f"{model_file}:build"
    shapes = budget.model_shapes(spec)
    assert shapes.n_params == 5000 * 300 + 300 + 300 * 7 + 7
    if form == "module":
        assert sys.modules["budget_models"].DEVICES == ["meta"]


def test_hf_config_without_transformers_says_so(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(budget.CATALOG["gpt2"]))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs transformers \(pip install 'lion8bit\[hf\]'\)"):
        budget.model_shapes(str(path))


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ValueError, match=r"needs matplotlib \(pip install 'lion8bit\[plot\]'\)"):
        compare("gpt2").plot(tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# the console script


def _bad_config(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nomodel.json").write_text('{"hidden_size": 3}')
    (tmp_path / "unknown.json").write_text('{"model_type": "no-such-architecture"}')
    (tmp_path / "unreadable").mkdir()


BAD_ARGS = [
    (["budget", "no-such-model"], "not a catalog model"),
    (["budget", "{tmp}/bad.json"], "not a JSON file"),
    (["budget", "{tmp}/nomodel.json"], "no \"model_type\""),
    (["budget", "{tmp}/unknown.json"], "transformers could not build it"),
    (["budget", "{tmp}/missing.json"], "cannot read it"),
    (["budget", "{tmp}/unreadable"], "cannot read it"),
    (["budget", "budget_models:not_a_module"], "not an nn.Module"),
    (["budget", "budget_models:broken"], "raised RuntimeError: no such layer"),
    (["budget", "budget_models:nothing"], "has no function"),
    (["budget", "no_such_module_xyz:build"], "cannot import"),
    (["budget", "gpt2", "--gpu-gb", "-3"], "Invalid gpu_gb: -3"),
    (["budget", "gpt2", "--gpu-gb", "0"], "Invalid gpu_gb: 0"),
    (["budget", "gpt2", "--gpu-gb", "nan"], "Invalid gpu_gb"),
    (["budget", "gpt2", "--activation-gb", "-1"], "Invalid activation_gb: -1"),
    (["budget", "gpt2", "--gpu-gb", "big"], "invalid float value"),
    (["budget", "gpt2", "--dtype", "fp16"], "invalid choice"),
    (["budget", "gpt2", "--optimizers", "adam"], "invalid choice"),
    (["budget", "gpt2", "--plot", "{tmp}/no/such/dir/x.png"], "No such file or directory"),
    (["budget"], "give a MODEL"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(a[1:]) for a, _ in BAD_ARGS])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, model_file, capsys):
    if "unknown.json" in argv[-1]:
        pytest.importorskip("transformers")
    _bad_config(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = budget.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.slow  # a fresh process each
@pytest.mark.parametrize("command", [[sys.executable, "-m", "lion8bit"], ["lion8bit"]],
                         ids=["python-m", "console"])
def test_console_entry_exit_codes(command):
    if command == ["lion8bit"]:
        script = shutil.which("lion8bit", path=str(Path(sys.executable).parent))
        if script is None:
            pytest.skip("the lion8bit console script is not installed (pip install -e .)")
        command = [script]
    bad = subprocess.run(command + ["budget", "no-such-model"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "Invalid model" in bad.stderr


def test_list_names_every_catalog_model_and_optimizer(capsys):
    assert budget.main(["budget", "--list"]) == 0
    out = capsys.readouterr().out
    for name in list(budget.CATALOG) + list(budget.OPTIMIZERS):
        assert re.search(rf"^  {re.escape(name)} ", out, re.M), name


def test_json_output_is_exact_and_consistent(capsys):
    argv = ["budget", "llama-2-7b", "--json", "--gpu-gb", "24", "80", "--activation-gb", "1.5"]
    assert budget.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["params"] == 6_738_415_616
    result = compare("llama-2-7b", gpu_gb=[24, 80], activation_gb=1.5)
    assert data == json.loads(json.dumps(result.to_dict()))
    assert (data["activation_bytes"], data["activation_source"]) == (3 * GIB // 2, "given")
    for row in data["rows"]:
        assert row["activations"] == 3 * GIB // 2
        assert row["total"] == row["weights"] + row["grads"] + row["state"] + row["activations"]
    assert [gpu["gpu_gib"] for gpu in data["gpus"]] == [24.0, 80.0]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "budget.png"
    assert budget.main(["budget", "gpt2", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _docs_examples():
    """The ```console blocks of docs/budget.md: a `lion8bit budget` command and its output."""
    text = (ROOT / "docs" / "budget.md").read_text()
    blocks = re.findall(r"```console\n\$ (lion8bit budget [^\n]+)\n(.*?)```", text, re.S)
    # measuring activations also measures the candidates for "largest model": tens of seconds
    return [
        pytest.param(command, output, id=command, marks=[pytest.mark.slow] * ("--batch-size" in command))
        for command, output in blocks
    ]


def test_docs_show_examples_with_and_without_activations():
    commands = [param.values[0] for param in _docs_examples()]
    assert any("--batch-size" not in c for c in commands)
    measured = [c for c in commands if "--batch-size" in c]
    assert any("--checkpointing full" in c for c in measured)
    assert any("--checkpointing" not in c for c in measured)


@pytest.mark.parametrize("command, output", _docs_examples())
def test_docs_examples_are_the_tools_output(command, output, capsys):
    """docs/budget.md's examples are these commands' output, verbatim."""
    assert budget.main(shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out == output
