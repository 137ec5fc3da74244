"""Resharding: checkpoints saved at one world size load exactly at another (gloo, CPU).

8-bit momentum lives in the whole parameter's blocks (lion8bit/shard_blocks.py) and checkpoints
hold one absmax tensor of all of them (lion8bit/reshard.py), so the state read back at any world
size is the state saved, tensor by tensor, and training goes on as if never interrupted. One
chain of jobs: 2 ranks save; 3 ranks load that (2 -> 3) and save; 4 ranks load the 2-rank one
(2 -> 4, and into a 2x2 HSDP mesh) and save; 2 ranks load the 3-rank one (3 -> 2); 1 rank loads
the 4-rank one (4 -> 1, sharded and unsharded) and the 2-rank one. Shapes are chosen so that
shard boundaries cut blocks at every world size. Older lion8bit's per-shard checkpoints, state
dicts that do not fit, and peers' state: tests/test_reshard_layouts.py.
"""

import os

import pytest
import torch
import torch.distributed as dist

from lion8bit import Lion
from lion8bit import momentum as mom

from distributed_helpers import (
    FOUR_BIT,
    OPTIONS,
    Net,
    UserMLP,
    checkpoint_state,
    differences,
    fsdp_trajectories,
    full_state,
    load_checkpoint,
    spawn,
    synthetic_steps,
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


def _two_ranks(rank, world_size, root):
    return {"load": _load(rank, world_size, root, source="3")}


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
