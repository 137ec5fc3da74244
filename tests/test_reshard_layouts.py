"""Other layouts of the optimizer state into and out of FSDP2 (gloo, CPU, 2 ranks): checkpoints
of lion8bit before global blocks (8-bit absmax per shard, shape (shards, blocks per shard)) load
exactly where their blocks are the whole parameter's and are refused, loading nothing, where shard
boundaries cut blocks; full state dicts that do not fit the optimizer (block size, min_8bit_size,
truncated absmax or 4-bit codes) raise naming the problem and load nothing; and lion-pytorch's
state is exported from an FSDP2 optimizer, and bitsandbytes' and lion-pytorch's loaded into one,
as unsharded. One job of 2 ranks runs them all. Checkpoints of this lion8bit at other world
sizes: tests/test_reshard.py.
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
    checkpoint_state,
    differences,
    full_state,
    load_checkpoint,
    make_fsdp_model,
    spawn,
    synthetic_steps,
    train,
)

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
]


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
        "per-shard checkpoints": _per_shard_checkpoints(rank, world_size, root),
        "bad inputs": _bad_inputs(rank, world_size),
        "interop": _interop(rank, world_size, OPTIONS),
        "interop 4bit": _interop(rank, world_size, {**OPTIONS, **FOUR_BIT}),
    }


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return spawn(_two_ranks, 2, root, root=str(root))


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
