"""Where people train: the Hugging Face Trainer, Accelerate, Lightning, plain loops.

On CPU, offline: models are built from configs, data is generated. The recipes of
docs/trainers.md are executed as written (on a tiny GPT-2 and a few batches), and the
Trainer's traps that the page warns about are checked against the installed transformers.
lion8bit.param_groups, which every recipe uses: tests/test_param_groups.py.
"""

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lion8bit

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs" / "trainers.md"


# -- shared fixtures for the trainers -----------------------------------------------------------

VOCAB, CONTEXT = 128, 16


def tiny_gpt2(seed: int = 0, dropout: float = 0.1):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def token_dataset(count: int = 16, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (count, CONTEXT), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def differing(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ in any bit (or in dtype / shape); all of them if the keys differ."""
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b))
    return [k for k in a if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))]


def optimizer_state(optimizer) -> dict:
    """Every state tensor of a (possibly wrapped) optimizer, keyed by param order and name."""
    inner = getattr(optimizer, "optimizer", optimizer)
    state = {
        f"{i}.{k}": v
        for i, entry in enumerate(inner.state.values())
        for k, v in entry.items()
        if torch.is_tensor(v)
    }
    assert state, "the optimizer has no state: it never stepped"
    return state


# -- Hugging Face Trainer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_example():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tqdm")  # examples/_common.py's progress bar
    sys.path.insert(0, str(EXAMPLES))
    import hf_trainer

    return hf_trainer


def example_setup(hf_example, tmp_path, *extra):
    args = hf_example.parse_args(
        ["--quick", "--data", "synthetic", "--output-dir", str(tmp_path / "a"), *extra]
    )
    import _common as common
    import train_char_lm

    data, chars = train_char_lm.encode(common.synthetic_text(20_000))
    train_set = hf_example.CharChunks(data, args.context)

    def new_model():
        return hf_example.build_model(len(chars), args.context, args.dim, args.layers, args.heads, args.seed)

    return args, train_set, new_model


@pytest.mark.parametrize(
    "route",
    [[], ["--optim-args", "beta2=0.98,cautious_factor=0.5,embedding_state=fp32"]],
    ids=["optimizer_cls_and_kwargs", "subclass"],
)
def test_trainer_resume_from_checkpoint_is_bit_identical(hf_example, tmp_path, route):
    args, train_set, new_model = example_setup(hf_example, tmp_path, *route)
    straight = hf_example.make_trainer(
        args, new_model(), train_set, None, eval_strategy="no", max_steps=8, save_steps=4, logging_steps=100
    )
    straight.train()

    resumed = hf_example.make_trainer(
        args,
        new_model(),
        train_set,
        None,
        eval_strategy="no",
        max_steps=8,
        save_steps=4,
        logging_steps=100,
        output_dir=str(tmp_path / "b"),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))

    assert resumed.state.global_step == straight.state.global_step == 8
    params_a, params_b = straight.model.state_dict(), resumed.model.state_dict()
    assert not differing(params_a, params_b)
    assert resumed.model.lm_head.weight is resumed.model.transformer.wte.weight  # still tied after loading
    assert not differing(optimizer_state(straight.optimizer), optimizer_state(resumed.optimizer))
    assert differing(new_model().state_dict(), params_b)  # it trained at all


def test_trainer_routes_build_the_same_optimizer(hf_example, tmp_path):
    options = "beta1=0.95,beta2=0.98,embedding_state=fp32"
    kw_args, train_set, new_model = example_setup(
        hf_example, tmp_path, "--betas", "0.95,0.98", "--embedding-state", "fp32"
    )
    sub_args, _, _ = example_setup(hf_example, tmp_path, "--optim-args", options)
    built = []
    for args in (kw_args, sub_args):
        trainer = hf_example.make_trainer(args, new_model(), train_set, None, eval_strategy="no")
        built.append(getattr(trainer.create_optimizer(), "optimizer", trainer.optimizer))
    assert type(built[1]) is lion8bit.Lion and type(built[0]) is lion8bit.Lion8bit
    options_of = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in built]
    assert options_of[0] == options_of[1]
    assert [g["betas"] for g in built[0].param_groups] == [(0.95, 0.98)] * 3
    assert [g["lr"] for g in built[0].param_groups] == [kw_args.lr] * 3


def test_optim_args_errors_name_the_item(hf_example):
    with pytest.raises(ValueError, match="Invalid optim_args item: 'betas=0.9'"):
        hf_example.parse_optim_args("beta1=0.9,betas=0.9")
    with pytest.raises(ValueError, match="Invalid flag value: 'yes'"):
        hf_example.parse_optim_args("skip_nonfinite=yes")
    assert hf_example.parse_optim_args("beta2=0.98, embedding_state=none, stochastic_rounding=True") == {
        "beta2": 0.98,
        "embedding_state": None,
        "stochastic_rounding": True,
    }


def test_trainer_traps_the_docs_warn_about(tmp_path):
    """What docs/trainers.md says the installed Trainer does: if transformers changes, the page must."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    # optim="lion_8bit" and the other Lion names: bitsandbytes' Lion with the Adam betas.
    pytest.importorskip("bitsandbytes")
    for optim in ("lion_8bit", "paged_lion_8bit", "lion_32bit", "paged_lion_32bit"):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), optim=optim, report_to="none", use_cpu=True
        )
        cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
        assert cls.__module__.startswith("bitsandbytes") and kwargs["betas"] == (0.9, 0.999), (optim, kwargs)

    # optimizer_cls_and_kwargs without "params": the kwargs' weight decay loses to
    # TrainingArguments.weight_decay (default 0) and TrainingArguments.learning_rate is ignored.
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), learning_rate=5e-5, report_to="none", use_cpu=True
    )
    trainer = transformers.Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=token_dataset(),
        optimizer_cls_and_kwargs=(lion8bit.Lion8bit, {"lr": 3e-4, "weight_decay": 1.0}),
    )
    groups = trainer.create_optimizer().param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert [g["lr"] for g in groups] == [3e-4, 3e-4]


@pytest.mark.examples
@pytest.mark.slow
def test_hf_trainer_example_quick_run_and_resume(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import subprocess

    def run(*args):
        return subprocess.run(
            [sys.executable, str(EXAMPLES / "hf_trainer.py"), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = run("--quick", "--output-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert re.search(r"step 8: eval loss \d+\.\d+ nats/char", first.stdout), first.stdout
    assert (tmp_path / "checkpoint-4" / "optimizer.pt").exists() and (tmp_path / "checkpoint-8").exists()
    more = run("--quick", "--output-dir", str(tmp_path), "--resume", "--steps", "10")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "step 10: eval loss" in more.stdout and (tmp_path / "checkpoint-10").exists()
    assert "Lion8bit" in run("--help").stdout


# -- Accelerate ---------------------------------------------------------------------------------


def reset_accelerate():
    """Accelerate keeps one process-wide state; each test builds its own Accelerator."""
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


def loader():
    return torch.utils.data.DataLoader(token_dataset(), batch_size=4)


def _plain_loop(model, optimizer, loader, backward=lambda loss: loss.backward()):
    for batch in loader:
        loss = model(**batch).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def test_accelerate_prepare_matches_a_plain_loop_and_resumes_bit_identically(tmp_path):
    accelerate = pytest.importorskip("accelerate")

    def lion(model):
        return lion8bit.Lion8bit(lion8bit.param_groups(model, weight_decay=1.0), lr=1e-3)

    reset_accelerate()
    plain = tiny_gpt2(dropout=0.0)
    plain_opt = lion(plain)
    _plain_loop(plain, plain_opt, loader())
    _plain_loop(plain, plain_opt, loader())

    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_gpt2(dropout=0.0)
    model, optimizer, data = accelerator.prepare(model, lion(model), loader())
    assert isinstance(optimizer.optimizer, lion8bit.Lion8bit)
    _plain_loop(model, optimizer, data, accelerator.backward)
    accelerator.save_state(str(tmp_path / "state"))
    _plain_loop(model, optimizer, data, accelerator.backward)
    assert not differing(plain.state_dict(), accelerator.unwrap_model(model).state_dict())

    reset_accelerate()
    again = accelerate.Accelerator(cpu=True)
    resumed = tiny_gpt2(seed=1, dropout=0.0)
    resumed, resumed_opt, resumed_data = again.prepare(resumed, lion(resumed), loader())
    again.load_state(str(tmp_path / "state"))
    _plain_loop(resumed, resumed_opt, resumed_data, again.backward)
    assert not differing(plain.state_dict(), again.unwrap_model(resumed).state_dict())
    assert not differing(optimizer_state(plain_opt), optimizer_state(resumed_opt))
    assert differing(tiny_gpt2(dropout=0.0).state_dict(), plain.state_dict())  # it trained at all


def _accelerate_fsdp2_worker(rank, world_size):
    """Accelerate's FSDP2 preparation with lion8bit on one gloo rank, against an unsharded run."""
    import copy

    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world_size
    # Accelerate 1.16 turns FSDP on only for GPU process groups (AcceleratorState: MULTI_GPU and
    # the like, not MULTI_CPU); forcing the mode runs the same prepare path on CPU.
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    torch.manual_seed(0)
    # Every 8-bit tensor's shards hold whole blocks of 256, so sharded blocks are unsharded ones.
    model = nn.Sequential(nn.Embedding(64, 64), nn.Linear(64, 128), nn.LayerNorm(128), nn.Linear(128, 64))
    unsharded = copy.deepcopy(model)
    initial = copy.deepcopy(model)
    reference = lion8bit.Lion8bit(lion8bit.param_groups(unsharded, weight_decay=1.0), lr=1e-2)
    optimizer = lion8bit.Lion8bit(lion8bit.param_groups(model, weight_decay=1.0), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randint(64, (8, 4), generator=generator)  # the same batch on every rank
        accelerator.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        unsharded(x).pow(2).mean().backward()
        reference.step()
        reference.zero_grad()
    inner = optimizer.optimizer
    full = {name: p.full_tensor() for name, p in model.named_parameters()}
    return {
        "param types": sorted({type(p).__name__ for g in inner.param_groups for p in g["params"]}),
        "differ from unsharded": [n for n, p in unsharded.named_parameters() if not torch.equal(full[n], p)],
        "unmoved": [n for n, p in initial.named_parameters() if torch.equal(full[n], p)],
        "local code shapes": [
            tuple(inner.state[p]["momentum_codes"].to_local().shape) for p in inner.param_groups[0]["params"]
        ],
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_accelerate_fsdp2_prepare_steps_shards_bit_identically_to_unsharded(tmp_path):
    pytest.importorskip("accelerate")
    from test_distributed import spawn  # the gloo job runner of tests/test_distributed.py

    results = spawn(_accelerate_fsdp2_worker, 2, tmp_path)
    for result in results:
        assert result["param types"] == ["DTensor"]
        assert result["differ from unsharded"] == [] and result["unmoved"] == []
        assert result["local code shapes"] == [(64, 64), (32, 128)]  # Linear weights: half each


# -- Lightning ----------------------------------------------------------------------------------


@pytest.fixture
def lightning_run(tmp_path):
    """(LitGPT class, run(module, root, callbacks=..., ckpt_path=...) -> Trainer); each LitGPT
    records the first token of every batch it trains on."""
    L = pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning)")

    class LitGPT(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_gpt2(dropout=0.0)
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(int(batch["input_ids"][0, 0]))
            return self.model(**batch).loss

        def configure_optimizers(self):
            groups = lion8bit.param_groups(self, weight_decay=1.0)
            return lion8bit.Lion8bit(groups, lr=1e-3, betas=(0.9, 0.99))

    def run(module, root, *, callbacks=(), ckpt_path=None):
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks),
            default_root_dir=str(tmp_path / root),
        )
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
        return trainer

    return LitGPT, run


def test_lightning_fit_checkpoint_and_resume_are_bit_identical(lightning_run, tmp_path):
    import lightning as L

    LitGPT, run = lightning_run
    straight = LitGPT()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1, filename="{epoch}"
    )
    run(straight, "a", callbacks=[checkpoints])
    first_epoch = tmp_path / "ckpt" / "epoch=0.ckpt"
    assert first_epoch.exists()

    resumed = LitGPT()
    trainer = run(resumed, "b", ckpt_path=str(first_epoch))
    assert trainer.global_step == 8 and resumed.seen == straight.seen[4:]
    assert not differing(straight.state_dict(), resumed.state_dict())
    assert not differing(optimizer_state(straight.optimizers()), optimizer_state(resumed.optimizers()))
    assert differing(LitGPT().state_dict(), resumed.state_dict())  # it trained at all
    assert isinstance(trainer.optimizers[0], lion8bit.Lion8bit)


def test_lightning_mid_epoch_resume_restarts_the_loader(lightning_run, tmp_path):
    """What docs/trainers.md warns about: from a checkpoint inside an epoch, Lightning (2.6, a
    plain DataLoader) feeds the epoch's first batches again, so the run is not the uninterrupted one."""
    import lightning as L

    LitGPT, run = lightning_run
    straight = LitGPT()
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_train_steps=2, filename="{step}"
    )
    run(straight, "a", callbacks=[checkpoints])
    resumed = LitGPT()
    trainer = run(resumed, "b", ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    first_batches = straight.seen[:2]
    assert trainer.global_step == 8 and resumed.seen == first_batches + straight.seen[4:]
    assert differing(straight.state_dict(), resumed.state_dict())


# -- the recipes of docs/trainers.md, as written ------------------------------------------------


def recipes() -> list:
    """(title, code) of each ```python block in docs/trainers.md, with the heading it sits under;
    a block right after an ``<!-- not run: reason -->`` line is returned with its reason."""
    text = DOCS.read_text()
    found = []
    for match in re.finditer(
        r"(<!-- not run: (?P<reason>[^>]*) -->\n)?```python\n(?P<code>.*?)```", text, re.S
    ):
        heading = re.findall(r"^#+ (.*)$", text[: match.start()], re.M)[-1]
        found.append(pytest.param(match["code"], match["reason"], id=heading))
    return found


def test_docs_have_a_recipe_for_each_route():
    titles = [param.id for param in recipes()]
    for route in (
        "Hugging Face Trainer",
        "Trainer subclass",
        "Accelerate",
        "FSDP2",
        "Lightning",
        "Plain loop",
    ):
        assert any(route in title for title in titles), (route, titles)


def lion_optimizers(namespace: dict) -> list:
    """The lion8bit optimizers a recipe left behind: bare, wrapped (Accelerate), or in a trainer."""
    found = []
    for value in namespace.values():
        listed = getattr(value, "optimizers", None)  # Lightning's Trainer: a list
        for candidate in (
            value,
            getattr(value, "optimizer", None),
            *(listed if isinstance(listed, list) else []),
        ):
            inner = getattr(candidate, "optimizer", candidate)
            if isinstance(inner, lion8bit.Lion):
                found.append(inner)
    return found


@pytest.mark.parametrize("code, not_run", recipes())
def test_docs_recipe_runs(code, not_run, tmp_path, monkeypatch):
    if not_run:
        pytest.skip(f"docs/trainers.md marks it not run: {not_run}")
    for module in re.findall(r"^(?:from|import) (\w+)", code, re.M):
        pytest.importorskip(module)
    reset_accelerate()
    monkeypatch.chdir(tmp_path)
    model, dataset = tiny_gpt2(), token_dataset()
    namespace = {
        "model": model,
        "train_dataset": dataset,
        "loader": torch.utils.data.DataLoader(dataset, batch_size=8),
    }
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exec(compile(code, str(DOCS), "exec"), namespace)
    optimizers = lion_optimizers(namespace)
    assert optimizers, "the recipe builds no lion8bit optimizer"
    names = [g["name"] for g in optimizers[0].param_groups]
    assert names == ["decay", "no_decay", "embeddings"]  # through lion8bit.param_groups
    assert differing(before, model.state_dict()), "the recipe did not train the model"
