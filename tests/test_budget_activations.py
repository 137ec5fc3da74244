"""Activations in the memory budget: measured on fake tensors, checked against real tensors.

The reference everywhere is the same measurement made on real CPU tensors
(``budget_peak_rss.saved_for_backward``: a saved_tensors_hooks pack hook, storages once, the
model's own tensors aside), on models built independently here with transformers / torch.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lion8bit import budget
from lion8bit.budget import GIB, compare
from lion8bit.budget.activations import config_activations

transformers = pytest.importorskip("transformers")
from budget_peak_rss import saved_for_backward  # noqa: E402  (tests/ helper, needs transformers)

ROOT = Path(__file__).resolve().parents[1]
transformers.logging.set_verbosity_error()

# Small configs of the catalog's families (a partial position table, grouped-query attention,
# a non-square image grid is not needed: ViT takes square images).
TINY = {
    "gpt2": dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=101, n_positions=64,
                 n_embd=32, n_layer=2, n_head=2),
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=131, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=64),
    "vit": dict(architectures=["ViTForImageClassification"], model_type="vit", hidden_size=32,
                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                num_labels=10),
}
BATCH = {"gpt2": (3, 40), "llama": (2, 64), "vit": (3, None)}
# --dtype -> (param dtype, autocast to bf16), as the budget defines them (docs/budget.md)
DTYPES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "mixed": (torch.bfloat16, True)}


def _real_hf(fields: dict, dtype: str, checkpointing: str = "none"):
    """The transformers model of ``fields`` with real weights, and its training loss."""
    fields = dict(fields)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    model = getattr(transformers, fields["architectures"][0])(config).to(DTYPES[dtype][0]).train()
    if checkpointing == "full":
        # transformers' own switch, not the budget's: an independent way to checkpoint each block
        # (gradient_checkpointing_enable before transformers 5.x renamed it)
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    return model


def _real_hf_saved(name: str, dtype: str, checkpointing: str = "none", layers: int | None = None) -> int:
    fields = dict(TINY[name])
    if layers is not None:
        fields[budget.LAYERS_FIELD[fields["model_type"]]] = layers
    model = _real_hf(fields, dtype, checkpointing)
    batch_size, seq_len = BATCH[name]
    param_dtype, autocast = DTYPES[dtype]

    def make_loss():
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            if name == "vit":
                pixels = torch.randn(batch_size, 3, 32, 32, dtype=param_dtype)
                return model(pixel_values=pixels, labels=torch.randint(0, 10, (batch_size,))).loss
            ids = torch.randint(0, fields["vocab_size"], (batch_size, seq_len))
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    return saved_for_backward(model, make_loss)[1]


def _config_file(tmp_path, name: str, **overrides) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**TINY[name], **overrides}))
    return str(path)


def _measured(tmp_path, name: str, dtype: str, checkpointing: str = "none", **overrides):
    batch_size, seq_len = BATCH[name]
    result = compare(_config_file(tmp_path, name, **overrides), dtype, ["lion8bit"], batch_size=batch_size,
                     seq_len=seq_len, checkpointing=checkpointing)
    return result.activations


# ---------------------------------------------------------------------------------------------
# item 1: the measurement equals the same measurement on real tensors


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(TINY))
def test_fake_measurement_equals_real_tensors(tmp_path, name, dtype):
    """Fake tensors dispatch to the kernels real CPU tensors run, so the bytes are equal, not close."""
    measured = _measured(tmp_path, name, dtype)
    assert measured.held == _real_hf_saved(name, dtype) > 0
    assert measured.recomputed == 0


@pytest.mark.parametrize("name", list(TINY))
def test_checkpointing_holds_what_transformers_checkpointing_holds(tmp_path, name):
    """held: what autograd keeps with every block checkpointed (transformers' own switch here);
    recomputed: what one block adds without checkpointing beyond what it adds with it."""
    measured = _measured(tmp_path, name, "fp32", "full")
    assert measured.held == _real_hf_saved(name, "fp32", "full")
    per_block = _real_hf_saved(name, "fp32", layers=2) - _real_hf_saved(name, "fp32", layers=1)
    per_block_kept = (_real_hf_saved(name, "fp32", "full", layers=2)
                      - _real_hf_saved(name, "fp32", "full", layers=1))
    assert measured.recomputed == per_block - per_block_kept > 0
    assert measured.nbytes == measured.held + measured.recomputed < _measured(tmp_path, name, "fp32").held


class _CharModel(torch.nn.Module):
    """examples/train_char_lm.py's shape in small: token + position embeddings, two blocks, a head."""

    def __init__(self, vocab=23, context=16, dim=32):
        super().__init__()
        pytest.importorskip("tqdm")  # examples/_common.py's progress bar
        sys.path.insert(0, str(ROOT / "examples"))
        try:
            from train_char_lm import Block
        finally:
            sys.path.remove(str(ROOT / "examples"))
        self.token, self.position = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(context, dim)
        self.blocks = torch.nn.Sequential(Block(dim, 2), Block(dim, 2))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.blocks(self.token(idx) + self.position(torch.arange(idx.shape[1]))))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_module_of_ones_own_is_measured_on_fake_copies(dtype):
    """An nn.Module with real weights: measured without running it, and left as it was."""
    torch.manual_seed(0)
    model = _CharModel().eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    measured = compare(model, dtype, ["lion8bit"], batch_size=4, seq_len=16).activations
    assert not model.training and all(torch.equal(before[n], p) for n, p in model.state_dict().items())

    param_dtype, autocast = DTYPES[dtype]
    model.to(param_dtype).train()

    def make_loss():
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits = model(torch.randint(0, 23, (4, 16)))
            return F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 23, (64,)))

    assert measured.held == saved_for_backward(model, make_loss)[1]


@pytest.mark.parametrize("checkpointing", ["none", "full"])
@pytest.mark.parametrize("name", list(TINY))
def test_extrapolating_from_two_layers_is_exact(tmp_path, name, checkpointing):
    """The largest-model search measures catalog configs at 1 and 2 layers and extrapolates."""
    fields = {**TINY[name], budget.LAYERS_FIELD[TINY[name]["model_type"]]: 5}
    batch_size, seq_len = BATCH[name]
    direct = _measured(tmp_path, name, "mixed", checkpointing, **fields)
    extrapolated = config_activations(fields, name, batch_size=batch_size, seq_len=seq_len, dtype="mixed",
                                      checkpointing=checkpointing)
    assert (extrapolated.held, extrapolated.recomputed) == (direct.held, direct.recomputed)


# ---------------------------------------------------------------------------------------------
# item 2: verdicts, JSON and plot include activations


def test_rows_and_verdicts_include_activations(tmp_path):
    path = _config_file(tmp_path, "gpt2")
    # 0.05 GiB: no catalog model or dense transformer fits, so none is measured
    plain = compare(path, "mixed", ["adamw", "lion8bit"], gpu_gb=[0.05])
    measured = compare(path, "mixed", ["adamw", "lion8bit"], gpu_gb=[0.05], batch_size=3, seq_len=40)
    assert measured.activation_source == "measured" and plain.activation_source == "not counted"
    assert measured.activation_bytes == measured.activations.nbytes > 0
    for before, row in zip(plain.rows, measured.rows, strict=True):
        assert row.activations == measured.activation_bytes
        assert row.total == before.total + measured.activation_bytes
        assert row.bytes_per_param == before.bytes_per_param
    for fit, row in zip(measured.fits[0.05], measured.rows, strict=True):
        assert fit.free == round(0.05 * GIB) - row.total and fit.fits


@pytest.mark.slow
def test_largest_models_fit_with_their_own_activations(tmp_path):
    """The largest dense transformer fits with its activations (measured at the same batch),
    one layer more does not; same for the catalog's choice."""
    gpu = 1.0
    result = compare(_config_file(tmp_path, "llama"), "mixed", ["lion8bit"], gpu_gb=[gpu], batch_size=2,
                     seq_len=64)
    fit = result.fits[gpu][0]

    def total(shapes, config):
        activations = config_activations(config, shapes.name, batch_size=2, seq_len=64, dtype="mixed",
                                         checkpointing="none").nbytes
        return budget.budget_row(shapes, "lion8bit", "mixed", activations=activations).total

    layers = fit.largest_dense_layers
    assert layers >= 1
    assert total(budget.dense_transformer(layers), budget.dense_config(layers)) <= gpu * GIB
    assert total(budget.dense_transformer(layers + 1), budget.dense_config(layers + 1)) > gpu * GIB
    fitting = [name for name in budget.CATALOG if budget.CATALOG[name]["model_type"] != "vit"
               and total(budget.catalog_model(name), budget.CATALOG[name]) <= gpu * GIB]
    best = max(fitting, key=lambda name: budget.catalog_model(name).n_params, default=None)
    assert fit.largest_catalog_model == best


def test_image_models_are_compared_with_image_models(tmp_path):
    result = compare(_config_file(tmp_path, "vit"), "mixed", ["lion8bit"], gpu_gb=[2.0], batch_size=2)
    fit = result.fits[2.0][0]
    assert fit.largest_dense_layers is None
    best = fit.largest_catalog_model
    assert best is None or budget.CATALOG[best]["model_type"] == "vit"


def test_json_has_integer_activation_fields(tmp_path, capsys):
    path = _config_file(tmp_path, "gpt2")
    argv = ["budget", path, "--json", "--gpu-gb", "0.05", "--batch-size", "3", "--seq-len", "40",
            "--checkpointing", "full"]
    assert budget.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    expected = compare(path, gpu_gb=[0.05], batch_size=3, seq_len=40, checkpointing="full")
    assert data == json.loads(json.dumps(expected.to_dict()))
    assert (data["batch_size"], data["seq_len"], data["checkpointing"]) == (3, 40, "full")
    assert type(data["activation_bytes"]) is int and data["activation_bytes"] == expected.activations.nbytes
    assert data["activations"]["held_after_forward"] + data["activations"]["recomputed_block"] == (
        data["activation_bytes"]
    )
    for row in data["rows"]:
        assert row["total"] == row["weights"] + row["grads"] + row["state"] + row["activations"]


def test_text_says_when_activations_are_not_counted(tmp_path, capsys):
    path = _config_file(tmp_path, "gpt2")
    assert budget.main(["budget", path, "--gpu-gb", "0.05"]) == 0
    assert "activations: NOT COUNTED" in capsys.readouterr().out
    assert budget.main(["budget", path, "--gpu-gb", "0.05", "--batch-size", "3", "--seq-len", "40"]) == 0
    out = capsys.readouterr().out
    assert "NOT COUNTED" not in out and "activations: measured for one training step on 3 x 40 tokens" in out


def test_activation_gb_overrides_the_measurement(model_file, capsys):
    """--activation-gb is used as given; the model is not run (this one cannot be)."""
    argv = ["budget", "activation_models:data_dependent", "--json", "--gpu-gb", "8", "--batch-size", "2",
            "--seq-len", "8", "--activation-gb", "1.5"]
    assert budget.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["activation_bytes"], data["activation_source"]) == (3 * GIB // 2, "given")
    assert "activations" not in data and data["batch_size"] == 2


def test_plot_stacks_activations(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "budget.png"
    argv = ["budget", _config_file(tmp_path, "gpt2"), "--gpu-gb", "0.05", "--batch-size", "3", "--seq-len",
            "40", "--plot", str(path)]
    assert budget.main(argv) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# item 4: bad input is one line and exit code 2

MODULE_SOURCE = """
import torch


class Tokens(torch.nn.Module):
    def __init__(self, vocab=50, context=16, dim=8, blocks=True):
        super().__init__()
        self.token, self.position = torch.nn.Embedding(vocab, dim), torch.nn.Embedding(context, dim)
        self.layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU())
                                            for _ in range(2 if blocks else 0)])
        self.head = torch.nn.Linear(dim, vocab)

    def hidden(self, idx):
        return self.layers(self.token(idx) + self.position(torch.arange(idx.shape[1], device=idx.device)))

    def forward(self, idx):
        return self.head(self.hidden(idx))


class DataDependent(Tokens):
    def forward(self, idx):
        hidden = self.hidden(idx)
        return self.head(hidden[hidden > 0].view(idx.shape[0], -1, hidden.shape[-1]))


class Item(Tokens):
    def forward(self, idx):
        hidden = self.hidden(idx)
        return self.head(hidden * hidden.abs().max().item())


def tokens():
    return Tokens()


def no_blocks():
    return Tokens(blocks=False)


def data_dependent():
    return DataDependent()


def item():
    return Item()


def linear_first():
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
"""


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    (tmp_path / "activation_models.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))


TOKENS = ["budget", "activation_models:tokens", "--gpu-gb", "1"]
BAD_ARGS = [
    (TOKENS + ["--batch-size", "0", "--seq-len", "8"], "Invalid batch_size: 0 (expected a positive integer)"),
    (TOKENS + ["--batch-size", "-2", "--seq-len", "8"], "Invalid batch_size: -2"),
    (TOKENS + ["--batch-size", "2", "--seq-len", "0"], "Invalid seq_len: 0 (expected a positive integer)"),
    (TOKENS + ["--batch-size", "2", "--seq-len", "-1"], "Invalid seq_len: -1"),
    (TOKENS + ["--batch-size", "two", "--seq-len", "8"], "invalid int value: 'two'"),
    (TOKENS + ["--batch-size", "2"], "takes token sequences (give --seq-len)"),
    (TOKENS + ["--seq-len", "8"], "Invalid batch_size: none given"),
    (TOKENS + ["--checkpointing", "full"], "Invalid batch_size: none given"),
    (TOKENS + ["--checkpointing", "some"], "invalid choice: 'some'"),
    # positions past the position embedding's 16 rows: caught without values
    (TOKENS + ["--batch-size", "2", "--seq-len", "17"],
     "Invalid seq_len: 17 is beyond the context of activation_models:tokens (16 positions)"),
    (["budget", "{gpt2}", "--batch-size", "2", "--seq-len", "65"],
     "Invalid seq_len: 65 is beyond the context of {gpt2} (64 positions)"),
    (["budget", "{vit}", "--batch-size", "2", "--seq-len", "8"],
     "takes 3 x 32 x 32 images, not token sequences"),
    (["budget", "activation_models:no_blocks", "--batch-size", "2", "--seq-len", "8",
      "--checkpointing", "full"], "has no repeated blocks to checkpoint"),
    (["budget", "activation_models:data_dependent", "--batch-size", "2", "--seq-len", "8"],
     "cannot run on fake tensors: aten.index.Tensor failed "
     "(DynamicOutputShapeException: aten.nonzero.default)"),
    (["budget", "activation_models:item", "--batch-size", "2", "--seq-len", "8"],
     "cannot run on fake tensors: aten._local_scalar_dense.default failed"),
    (["budget", "activation_models:linear_first", "--batch-size", "2", "--seq-len", "8"],
     "cannot tell what activation_models:linear_first takes as input"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(a[1:]) for a, _ in BAD_ARGS])
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, model_file, capsys):
    paths = {"{gpt2}": _config_file(tmp_path, "gpt2"), "{vit}": _config_file(tmp_path, "vit")}
    for key, path in paths.items():
        argv = [a.replace(key, path) for a in argv]
        message = message.replace(key, path)
    try:
        code = budget.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err, err
    if "fake tensors" in message or "cannot tell" in message:
        assert "--activation-gb" in err


def test_bare_shapes_cannot_be_measured():
    with pytest.raises(ValueError, match="bare shapes have no forward pass"):
        compare({"w": (4, 4)}, batch_size=2, seq_len=3)


def test_catalog_activations_without_transformers_say_so(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs transformers \(pip install 'lion8bit\[hf\]'\)"):
        compare("gpt2", batch_size=1, seq_len=8)


# ---------------------------------------------------------------------------------------------
# item 3: reality on CPU, full-size models (a subprocess each, so that VmHWM is this step's)

# (what budget_peak_rss.py builds, the budget's model, batch, seq_len)
REAL = [
    ("gpt2", "gpt2", 2, 256),
    ("charlm", "examples/train_char_lm.py:budget_model", 32, 64),
    ("vit-b-16", "vit-b-16", 4, None),
]
# The same hook on real tensors sees what the fake run sees (equal to the byte so far): the issue
# asks for 5%.
SAVED_TOLERANCE = 0.05
# The peak of a steady step whose grads stay allocated (zero_grad(set_to_none=False), as with
# gradient accumulation) against weights + grads + state + activations: backward's temporaries
# come on top (GPT-2's logits gradient, 4 x 256 x 50257 fp32, is 0.19 GiB; 1.15x the budget at
# batch 4 in docs/budget.md). The issue asks for 20%.
PEAK_TOLERANCE = 0.20


@pytest.mark.slow
@pytest.mark.parametrize("probe, model, batch_size, seq_len", REAL, ids=[r[0] for r in REAL])
def test_real_step_matches_the_budget(probe, model, batch_size, seq_len):
    args = [probe, str(batch_size)] + ([str(seq_len)] if seq_len else []) + ["--grads", "kept"]
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "budget_peak_rss.py"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    real = json.loads(result.stdout.splitlines()[-1])
    row = compare(model, "fp32", ["lion8bit"], batch_size=batch_size, seq_len=seq_len).row("lion8bit")
    assert abs(row.activations - real["saved"]) <= SAVED_TOLERANCE * real["saved"], (row.activations, real)
    assert abs(real["peak"] - real["before"] - row.total) <= PEAK_TOLERANCE * row.total, (row, real)
