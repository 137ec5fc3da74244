"""Resharding: checkpoints saved at one world size load exactly at another (gloo, CPU).

8-bit momentum lives in the whole parameter's blocks (lion8bit/shard_blocks.py) and checkpoints
hold one absmax tensor of all of them (lion8bit/reshard.py), so the state read back at any world
size is the state saved, tensor by tensor, and training goes on as if never interrupted. One
chain of jobs: 2 ranks save; 3 ranks load that (2 -> 3) and save; 4 ranks load the 2-rank one
(2 -> 4, and into a 2x2 HSDP mesh) and save; 2 ranks load the 3-rank one (3 -> 2); 1 rank loads
the 4-rank one (4 -> 1, sharded and unsharded) and the 2-rank one. Shapes are chosen so that
shard boundaries cut blocks at every world size.
"""

import os

import pytest
import torch
import torch.distributed as dist

from lion8bit import Lion
from lion8bit import momentum as mom

from distributed_helpers import (
    FOUR_BIT,
    LR,
    OPTIONS,
    Aligned,
    Net,
    UserMLP,
    checkpoint_state,
    differences,
    fsdp_trajectories,
    full_state,
    load_checkpoint,
    make_fsdp_model,
    spawn,
    train,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]

# The sequence that failed (6 steps of this MLP with Lion8bit's defaults on 2 ranks, dcp.save,
# dcp.load on 3 ranks and on 1), and the small Net with 8-bit and bf16 state (fp32 state is stored
# like bf16, elementwise) and the options that key on element indices (stochastic rounding) or
# reduce over the whole parameter (caution).
CASES = {
    "user-mlp": (UserMLP, torch.float32, dict(lr=1e-3, state="8bit")),
    "net-8bit": (
        Net, torch.bfloat16, dict(OPTIONS, state="8bit", cautious_factor=0.3, stochastic_rounding=True)
    ),
    "net-bf16": (
        Net, torch.float32, dict(OPTIONS, state="bf16", stochastic_rounding=True, cautious_factor=0.0)
    ),
    # packed codes and bf16 absmax in blocks of 32, cut at odd offsets (mid.bias: 41 on 2 ranks,
    # 27 on 3, 21 and 63 on 4), and always-stochastic momentum rounding with bf16 params to nearest
    "net-4bit": (Net, torch.bfloat16, dict(OPTIONS, **FOUR_BIT, cautious_factor=0.3)),
}
SAVED_STEPS, CONTINUED_STEPS = 6, 3


def build(case: str, seed: int = 0, mesh=None, shard: bool = True):
    """A model of the case (sharded per layer and at the root unless ``shard`` is False) and its
    optimizer; ``mesh``: None (all ranks) or an HSDP mesh."""
    from torch.distributed.fsdp import fully_shard

    model_class, dtype, options = CASES[case]
    torch.manual_seed(seed)
    model = model_class().to(dtype)
    if shard:
        for layer in [m for m in model.modules() if isinstance(m, torch.nn.Linear)] + [model]:
            fully_shard(layer, mesh=mesh)
    return model, Lion(model.parameters(), **options)


def synthetic_steps(model, optimizer, steps) -> None:
    """Steps with grads that depend only on (step, param), not on the mesh: FSDP's average of
    per-rank grads is not exact at every world size (3 ranks: (x + x + x) / 3 may not be x)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for step in steps:
        for index, param in enumerate(model.parameters()):
            generator = torch.Generator().manual_seed(7919 * step + index)
            grad = torch.randn(param.shape, generator=generator).to(param.dtype)
            if isinstance(param, DTensor):
                grad = distribute_tensor(grad, param.device_mesh, param.placements)
            param.grad = grad
        optimizer.step()
        optimizer.zero_grad()


def _full_state_dicts(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(model, options=options),
        "optim": get_optimizer_state_dict(model, optimizer, options=options),
    }


def _cut_blocks(model, optimizer) -> int:
    from lion8bit.shard_blocks import cut_blocks

    group = optimizer.param_groups[0]
    block_size = mom.absmax_block(group["state"], group["block_size"])
    return sum(len(cut_blocks(p, block_size)) for p in model.parameters() if hasattr(p, "device_mesh"))


def _save(rank, world_size, root):
    """2 ranks: train each case on per-rank data, save (dcp and a full state dict), keep the
    whole state, then continue with mesh-independent grads and keep that too."""
    import torch.distributed.checkpoint as dcp

    for case in CASES:
        model, optimizer = build(case)
        train(model, optimizer, rank, range(SAVED_STEPS))
        dcp.save(checkpoint_state(model, optimizer), checkpoint_id=os.path.join(root, "2", case))
        full_dicts = _full_state_dicts(model, optimizer)
        saved = full_state(model, optimizer)
        synthetic_steps(model, optimizer, range(CONTINUED_STEPS))
        continued = full_state(model, optimizer)
        if rank == 0:
            record = dict(full=full_dicts, saved=saved, continued=continued)
            torch.save(record, os.path.join(root, f"{case}.pt"))
        dist.barrier()
    return True


def _load(rank, world_size, root, source, save_as=None, mesh_shape=None, shard=True):
    """Per case: load the checkpoint saved by ``source`` ranks, through dcp.load and through a
    full state dict, into a fresh model (other initial weights); what differs from the saved
    whole state, and from its continuation after the same steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = None
    if mesh_shape is not None:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    reports = {}
    for case in CASES:
        expected = torch.load(os.path.join(root, f"{case}.pt"), weights_only=True)
        model, optimizer = build(case, seed=1, mesh=mesh, shard=shard)
        load_checkpoint(model, optimizer, os.path.join(root, source, case))
        report = reports[case] = {
            "cut blocks": _cut_blocks(model, optimizer),
            "dcp": differences(full_state(model, optimizer), expected["saved"]),
        }
        if save_as:
            dcp.save(checkpoint_state(model, optimizer), checkpoint_id=os.path.join(root, save_as, case))
        synthetic_steps(model, optimizer, range(CONTINUED_STEPS))
        report["continued"] = differences(full_state(model, optimizer), expected["continued"])
        model, optimizer = build(case, seed=1, mesh=mesh, shard=shard)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, expected["full"]["model"], options=options)
        set_optimizer_state_dict(model, optimizer, expected["full"]["optim"], options=options)
        report["full state dict"] = differences(full_state(model, optimizer), expected["saved"])
    return reports


# Item 3 at 3 and 4 ranks (2 ranks: tests/test_distributed.py): bit-identical to unsharded.
TRAJECTORY_CONFIGS = [
    dict(state="8bit", cautious_factor=0.3, stochastic_rounding=True, dtype=torch.bfloat16),
    dict(state="8bit", block_size=64, cautious_weight_decay=True, cautious_factor=0.0),
    dict(state="bf16", cautious_factor=0.3, stochastic_rounding=True),
    dict(state="fp32", stochastic_rounding=True, dtype=torch.bfloat16),
    # 4 ranks: mid.bias's block [32, 64) is cut in three (21 | 42 | 63), the middle shard inside it
    dict(FOUR_BIT, cautious_factor=0.3, stochastic_rounding=True, dtype=torch.bfloat16),
    dict(FOUR_BIT, cautious_weight_decay=True, cautious_factor=0.0, maximize=True),
]
HSDP_CONFIGS = [
    dict(state="8bit", cautious_factor=0.3, stochastic_rounding=True, dtype=torch.bfloat16),
    dict(FOUR_BIT, cautious_factor=0.3, stochastic_rounding=True, dtype=torch.bfloat16),
]


class Eligibility(torch.nn.Module):
    """big.weight (70x64 = 4480 elements) takes 8-bit momentum, small.weight (63x64 = 4032) fp32,
    by the default min_8bit_size of 4096 applied to the whole parameter; their shards on 4 ranks
    (1152 / 1024 elements) or 2 (2240 / 2048) are all under it (pytorch/ao#4912 decides by the
    local size)."""

    def __init__(self):
        super().__init__()
        self.big = torch.nn.Linear(64, 70)
        self.small = torch.nn.Linear(64, 63)


def _eligibility(mesh_shape):
    """Whole states of Eligibility on a mesh and unsharded after the same steps, and the
    format of each param's momentum."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = ("replicate", "shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = Eligibility()
    unsharded = copy.deepcopy(model)
    for layer in (model.big, model.small, model):
        fully_shard(layer, mesh=mesh)
    optimizer, reference = Lion(model.parameters(), lr=1e-3), Lion(unsharded.parameters(), lr=1e-3)
    synthetic_steps(model, optimizer, range(3))
    synthetic_steps(unsharded, reference, range(3))
    formats = {name: mom.stored_format(optimizer.state[p]) for name, p in model.named_parameters()}
    return {
        "differences": differences(full_state(model, optimizer), full_state(unsharded, reference)),
        "formats": formats,
        "local sizes": {name: p.to_local().numel() for name, p in model.named_parameters()},
    }


def _three_ranks(rank, world_size, root):
    return {
        "load": _load(rank, world_size, root, source="2", save_as="3"),
        "trajectories": fsdp_trajectories(rank, world_size, TRAJECTORY_CONFIGS, steps=4),
    }


def _four_ranks(rank, world_size, root):
    return {
        "load": _load(rank, world_size, root, source="2", save_as="4"),
        "load hsdp": _load(rank, world_size, root, source="2", mesh_shape=(2, 2)),
        "trajectories": fsdp_trajectories(rank, world_size, TRAJECTORY_CONFIGS, steps=4),
        "hsdp": fsdp_trajectories(rank, world_size, HSDP_CONFIGS, steps=4, mesh_shape=(2, 2)),
        "eligibility": {str(shape): _eligibility(shape) for shape in [(4,), (2, 2)]},
    }


def _one_rank(rank, world_size, root):
    return {
        "load": _load(rank, world_size, root, source="4"),
        "load unsharded": _load(rank, world_size, root, source="4", shard=False),
        "load from 2": _load(rank, world_size, root, source="2"),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    spawn(_save, 2, root, root=str(root))
    return root


@pytest.fixture(scope="module")
def three(root):
    return spawn(_three_ranks, 3, root, root=str(root))


@pytest.fixture(scope="module")
def four(root):
    return spawn(_four_ranks, 4, root, root=str(root))


@pytest.fixture(scope="module")
def two(root, three):
    return spawn(_two_ranks, 2, root, root=str(root))


@pytest.fixture(scope="module")
def one(root, four):
    return spawn(_one_rank, 1, root, root=str(root))


def test_the_issues_sequence_loads_on_3_ranks_and_on_1(three, one):
    """6 steps of the MLP on 2 ranks, dcp.save, dcp.load on 3 ranks and on 1: the state read
    back is the saved one (it failed with 'Size mismatch ... momentum_absmax' before)."""
    for reports in (three, one):
        for rank_report in reports:
            key = "load" if len(reports) == 3 else "load from 2"
            assert rank_report[key]["user-mlp"]["dcp"] == [], rank_report[key]["user-mlp"]


RESHARDS = {  # name: (fixture, report key)
    "2 -> 3": ("three", "load"),
    "2 -> 4": ("four", "load"),
    "2 -> 2x2 HSDP": ("four", "load hsdp"),
    "3 -> 2": ("two", "load"),
    "4 -> 1": ("one", "load"),
    "4 -> 1 unsharded": ("one", "load unsharded"),
    "2 -> 1": ("one", "load from 2"),
}


@pytest.mark.parametrize("reshard", RESHARDS)
@pytest.mark.parametrize("case", CASES)
def test_loading_at_another_world_size_reads_back_the_saved_state(request, reshard, case):
    """Params and every optimizer state tensor, gathered, equal the saved ones bit for bit,
    through dcp.load and through a full state dict; and the same steps after loading give the
    same state as after saving."""
    fixture, key = RESHARDS[reshard]
    for rank_report in request.getfixturevalue(fixture):
        report = rank_report[key][case]
        assert report["dcp"] == [] and report["full state dict"] == [] and report["continued"] == [], report


def test_shard_boundaries_cut_blocks_at_every_world_size(three, four, two):
    """The cases above are not the easy ones: the 8-bit params' shards cut blocks."""
    for reports in (three, four, two):
        for case in ("user-mlp", "net-8bit", "net-4bit"):
            assert reports[0]["load"][case]["cut blocks"] > 0, case


@pytest.mark.parametrize("world", ["3", "4"])
@pytest.mark.parametrize("index", range(len(TRAJECTORY_CONFIGS)), ids=[str(c) for c in TRAJECTORY_CONFIGS])
def test_fsdp2_is_bit_identical_to_unsharded_training_at_3_and_4_ranks(three, four, world, index):
    for rank_report in {"3": three, "4": four}[world]:
        assert rank_report["trajectories"][index]["differences"] == [], rank_report["trajectories"][index]


@pytest.mark.parametrize("index", range(len(HSDP_CONFIGS)), ids=[str(c) for c in HSDP_CONFIGS])
def test_hsdp_is_bit_identical_and_reduces_over_the_shard_dim_only(four, index):
    reports = [r["hsdp"][index] for r in four]
    config = HSDP_CONFIGS[index]
    for report in reports:
        assert report["differences"] == [], report
        # caution's counts, the cut blocks' maxima, and for 4-bit their codes: each on the shard
        # group of 2
        assert report["all_reduces_per_step"] == 1 + {"8bit": 1, "4bit": 2}[config["state"]]
        assert report["all_reduce_group_sizes"] == [2]
    assert [r["shard"] for r in reports] == [0, 1, 0, 1]  # ranks 0, 2 and 1, 3: replicas


def test_eligibility_follows_the_whole_parameter_on_two_meshes(four):
    for rank_report in four:
        for mesh, report in rank_report["eligibility"].items():
            assert report["formats"] == {
                "big.weight": "8bit", "big.bias": "fp32", "small.weight": "fp32", "small.bias": "fp32"
            }, mesh
            assert report["local sizes"]["big.weight"] < 4096, mesh  # the local size would say fp32
            assert report["differences"] == [], (mesh, report)


# -- checkpoints of lion8bit before global blocks (shape (shards, blocks per shard)) ---------------


def _per_shard_layout(optim_state: dict, model, shards: int, block_size: int = 256) -> dict:
    """A full optimizer state dict rewritten as lion8bit before global blocks saved it: each
    8-bit absmax as (shards, blocks of the largest shard), row i the blocks of shard i's own
    flat elements, zero-padded. Where shards hold whole blocks those are the whole parameter's
    blocks (copied); elsewhere the row is the block maxima of the shard's decoded momentum."""
    from lion8bit import quant
    from lion8bit.sharded import chunk_range

    shapes = {name: p.shape for name, p in model.named_parameters()}
    rewritten = {"param_groups": optim_state["param_groups"], "state": {}}
    for name, entry in optim_state["state"].items():
        entry = dict(entry)
        rewritten["state"][name] = entry
        if mom.MOMENTUM_ABSMAX not in entry:
            continue
        codes, absmax = entry[mom.MOMENTUM_CODES], entry[mom.MOMENTUM_ABSMAX]
        values = quant.dequantize_blockwise(codes, absmax, block_size).reshape(-1)
        row = codes.numel() // shapes[name][0]
        rows_of_shards = (chunk_range(0, shapes[name][0], shards, i) for i in range(shards))
        ranges = [(low * row, high * row) for low, high in rows_of_shards]
        rows = torch.zeros(shards, quant.num_blocks(ranges[0][1] - ranges[0][0], block_size))
        for i, (low, high) in enumerate(ranges):
            if low % block_size == 0:
                blocks = absmax[low // block_size : quant.num_blocks(high, block_size)]
            else:
                blocks = quant.blockwise_absmax(values[low:high], block_size)
            rows[i, : blocks.numel()] = blocks
        entry[mom.MOMENTUM_ABSMAX] = rows
    return rewritten


def _error(action, *args, **kwargs) -> str | None:
    """What ``action(*args, **kwargs)`` raised (a ValueError, or dcp's CheckpointException)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        action(*args, **kwargs)
    except (ValueError, CheckpointException) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _per_shard_checkpoints(rank, world_size, root):
    """The per-shard layout loads where its blocks are the whole parameter's (Aligned on 2
    ranks), from a full state dict and from a dcp checkpoint converted by torch's
    dcp_to_torch_save; where shard boundaries cut blocks (Net) it is refused, loading nothing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import distribute_tensor

    full_options = StateDictOptions(full_state_dict=True)
    report = {}
    for model_class in (Aligned, Net):
        name = model_class.__name__
        model, _ = make_fsdp_model(model_class=model_class)
        optimizer = Lion(model.parameters(), **OPTIONS)
        train(model, optimizer, rank, range(3))
        expected = full_state(model, optimizer)
        weights = get_model_state_dict(model, options=full_options)
        saved = get_optimizer_state_dict(model, optimizer, options=full_options)
        old = _per_shard_layout(saved, model, world_size)
        fresh, _ = make_fsdp_model(seed=1, model_class=model_class)
        fresh_optimizer = Lion(fresh.parameters(), **OPTIONS)
        train(fresh, fresh_optimizer, rank, range(1))
        set_model_state_dict(fresh, weights, options=full_options)
        before = full_state(fresh, fresh_optimizer)
        load = set_optimizer_state_dict
        report[f"{name} error"] = _error(load, fresh, fresh_optimizer, old, options=full_options)
        after = full_state(fresh, fresh_optimizer)
        report[f"{name} differences"] = differences(after, expected if name == "Aligned" else before)
        if name != "Aligned":
            continue
        # The same state saved by dcp as it was then: absmax DTensors (shards, blocks) placed Shard(0).
        state = checkpoint_state(model, optimizer)
        for fqn, entry in state["optim"]["state"].items():
            if mom.MOMENTUM_ABSMAX in entry:
                codes = entry[mom.MOMENTUM_CODES]
                rows = old["state"][fqn][mom.MOMENTUM_ABSMAX]
                entry[mom.MOMENTUM_ABSMAX] = distribute_tensor(rows, codes.device_mesh, codes.placements)
        path = os.path.join(root, "per-shard")
        dcp.save(state, checkpoint_id=path)
        report["dcp.load error"] = _error(load_checkpoint, fresh, fresh_optimizer, path)
        if rank == 0:
            dcp_to_torch_save(path, os.path.join(root, "per-shard.pt"))
        dist.barrier()
        converted = torch.load(os.path.join(root, "per-shard.pt"), weights_only=True)
        fresh, _ = make_fsdp_model(seed=1, model_class=model_class)
        fresh_optimizer = Lion(fresh.parameters(), **OPTIONS)
        set_model_state_dict(fresh, converted["model"], options=full_options)
        set_optimizer_state_dict(fresh, fresh_optimizer, converted["optim"], options=full_options)
        report["dcp_to_torch_save differences"] = differences(full_state(fresh, fresh_optimizer), expected)
    return report


def _bad_inputs(rank, world_size):
    """A full state dict of the Net's 8-bit (or 4-bit) state loaded into optimizers it does not
    fit: the error, and whether anything changed."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    full_options = StateDictOptions(full_state_dict=True)

    def saved_and_truncated(options, key):
        model, _ = make_fsdp_model()
        optimizer = Lion(model.parameters(), **{**OPTIONS, **options})
        train(model, optimizer, rank, range(2))
        saved = get_optimizer_state_dict(model, optimizer, options=full_options)
        truncated = {"param_groups": saved["param_groups"], "state": dict(saved["state"])}
        entry = truncated["state"]["mid.weight"] = dict(saved["state"]["mid.weight"])
        entry[key] = entry[key][:-1]
        return saved, truncated

    saved, truncated = saved_and_truncated({}, mom.MOMENTUM_ABSMAX)
    _, truncated_codes = saved_and_truncated(FOUR_BIT, mom.MOMENTUM_CODES)
    cases = {
        "block size": (dict(block_size=64), saved),
        "min_8bit_size": (dict(min_8bit_size=128), saved),
        "truncated absmax": ({}, truncated),
        "truncated 4-bit codes": (FOUR_BIT, truncated_codes),
    }
    reports = {}
    for name, (options, state) in cases.items():
        target, _ = make_fsdp_model(seed=1)
        target_optimizer = Lion(target.parameters(), **{**OPTIONS, **options})
        train(target, target_optimizer, rank, range(1))
        before = full_state(target, target_optimizer)
        error = _error(set_optimizer_state_dict, target, target_optimizer, state, options=full_options)
        reports[name] = {"error": error, "changed": differences(before, full_state(target, target_optimizer))}
    return reports


def _interop(rank, world_size, options):
    """To lion-pytorch from an FSDP2 optimizer, and bitsandbytes / lion-pytorch state dicts into
    one, each against the same thing done unsharded (the optimizers' ``options``)."""
    import bitsandbytes as bnb
    import lion_pytorch

    from lion8bit.interop import to_lion_pytorch_state_dict

    report = {}
    model, twin = make_fsdp_model()
    optimizer, reference = Lion(model.parameters(), **options), Lion(twin.parameters(), **options)
    synthetic_steps(model, optimizer, range(2))
    synthetic_steps(twin, reference, range(2))
    exported, expected = to_lion_pytorch_state_dict(optimizer), to_lion_pytorch_state_dict(reference)
    report["export is sharded like the params"] = all(
        hasattr(entry["exp_avg"], "device_mesh") for entry in exported["state"].values()
    )
    gathered = {i: {"exp_avg": entry["exp_avg"].full_tensor()} for i, entry in exported["state"].items()}
    report["export differences"] = differences(
        {str(i): e["exp_avg"] for i, e in gathered.items()},
        {str(i): e["exp_avg"] for i, e in expected["state"].items()},
    )
    peer = lion_pytorch.Lion(model.parameters(), lr=LR)
    peer_reference = lion_pytorch.Lion(twin.parameters(), lr=LR)
    peer.load_state_dict(exported)
    peer_reference.load_state_dict(expected)
    synthetic_steps(model, peer, range(2, 3))
    synthetic_steps(twin, peer_reference, range(2, 3))
    report["lion-pytorch step differences"] = differences(
        {n: full_value(p) for n, p in model.named_parameters()}, dict(twin.named_parameters())
    )
    sources = {}
    bnb_params, peer_params = make_fsdp_model()[1], make_fsdp_model()[1]
    sources["bitsandbytes"] = bnb.optim.Lion8bit(bnb_params.parameters(), lr=LR, min_8bit_size=64)
    sources["lion-pytorch"] = lion_pytorch.Lion(peer_params.parameters(), lr=LR)
    for name, source in sources.items():
        synthetic_steps(bnb_params if name == "bitsandbytes" else peer_params, source, range(2))
        model, twin = make_fsdp_model(seed=1)
        optimizer, reference = Lion(model.parameters(), **options), Lion(twin.parameters(), **options)
        optimizer.load_state_dict(source.state_dict())
        reference.load_state_dict(source.state_dict())
        states = [{k: v for k, v in full_state(m, o).items() if k.startswith("state")} for m, o in
                  [(model, optimizer), (twin, reference)]]
        report[f"{name} differences"] = differences(*states)
        report[f"{name} quantized"] = mom.MOMENTUM_CODES in optimizer.state[next(model.parameters())]
    return report


def full_value(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _two_ranks(rank, world_size, root):
    return {
        "load": _load(rank, world_size, root, source="3"),
        "per-shard checkpoints": _per_shard_checkpoints(rank, world_size, root),
        "bad inputs": _bad_inputs(rank, world_size),
        "interop": _interop(rank, world_size, OPTIONS),
        "interop 4bit": _interop(rank, world_size, {**OPTIONS, **FOUR_BIT}),
    }


def test_per_shard_checkpoints_load_exactly_where_their_blocks_are_the_whole_parameters(two):
    for rank_report in two:
        report = rank_report["per-shard checkpoints"]
        assert report["Aligned error"] is None and report["Aligned differences"] == [], report
        assert report["dcp_to_torch_save differences"] == [], report
        # dcp.load itself compares the shapes before lion8bit sees them; docs/distributed.md says
        # how to convert such a checkpoint (dcp_to_torch_save, as above).
        assert "Size mismatch" in report["dcp.load error"] and mom.MOMENTUM_ABSMAX in report["dcp.load error"]


def test_per_shard_checkpoints_whose_shards_cut_blocks_are_refused_loading_nothing(two):
    for rank_report in two:
        report = rank_report["per-shard checkpoints"]
        error = report["Net error"]
        assert error.startswith("ValueError"), error
        assert "param_groups[0]['params'][1] of shape (64,)" in error, error
        assert "per-shard layout" in error and "would requantize" in error, error
        assert "Resume it on 2 shards with the lion8bit release that saved it" in error, error
        assert report["Net differences"] == [], report


BAD_INPUTS = {
    "block size": "block_size=256, this optimizer has block_size=64",
    "min_8bit_size": "min_8bit_size=64, this optimizer has min_8bit_size=128",
    "truncated absmax": "(81, 64): momentum_absmax has shape (20,), expected (21,)",
    "truncated 4-bit codes": "(81, 64): momentum_codes has shape (2591,), expected (2592,)",
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_problem_and_load_nothing(two, case):
    expected = BAD_INPUTS[case]
    for rank_report in two:
        report = rank_report["bad inputs"][case]
        assert report["error"].startswith("ValueError") and expected in report["error"], report
        assert report["changed"] == [], report


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_lion_pytorch_export_from_fsdp2_and_peer_checkpoints_into_fsdp2(two, kind):
    for rank_report in two:
        report = rank_report["interop" if kind == "8bit" else "interop 4bit"]
        assert report["export is sharded like the params"], report
        assert report["export differences"] == [] and report["lion-pytorch step differences"] == [], report
        for peer in ("bitsandbytes", "lion-pytorch"):
            assert report[f"{peer} differences"] == [] and report[f"{peer} quantized"], (peer, report)
