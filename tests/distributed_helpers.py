"""Shared by the multi-process tests (not a test file): the gloo job runner, the models, and
ways to read the whole (gathered) state of an FSDP2 run to compare it with an unsharded one.

Each job spawns its ranks (one thread each) with a FileStore rendezvous (no ports), runs
everything it checks, and returns plain values to the parent, which asserts. A job that fails
or hangs is killed: no process outlives its test.
"""

from __future__ import annotations

import copy
import datetime
import gc
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch.distributed.tensor import debug as dtensor_debug

from lion8bit import Lion
from lion8bit import momentum as mom

JOB_TIMEOUT = 300  # seconds for a whole job; a healthy one takes 5-40 s on a loaded 2-core box
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
STATE_KINDS = ["8bit", "bf16", "fp32"]
# The default backend, as for the other kinds: "cpu" here, the fused step users get.
# min_8bit_size=1: the (1,) bias takes 4-bit state too, a shard of one element.
FOUR_BIT = dict(state="4bit", min_8bit_size=1)
LR = 1e-2
OPTIONS = dict(lr=LR, betas=(0.9, 0.99), weight_decay=0.1, min_8bit_size=64)


# -- the job runner --------------------------------------------------------------------------


def spawn(worker, world_size: int, tmp_path, **kwargs) -> list:
    """Run ``worker(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks; their results."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    store = tmp_path / f"store-{worker.__name__}-{world_size}-{time.monotonic_ns()}"
    processes = [
        context.Process(
            target=_rank_main, args=(worker, rank, world_size, str(store), results, kwargs), daemon=True
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    outcomes, failed = {}, True
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise TimeoutError(f"{worker.__name__}: ranks {missing} did not finish in {JOB_TIMEOUT} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                crashed = [
                    r for r, p in enumerate(processes) if p.exitcode not in (None, 0) and r not in outcomes
                ]
                if crashed:
                    raise RuntimeError(f"{worker.__name__}: rank {crashed[0]} died with exit code "
                                       f"{processes[crashed[0]].exitcode}") from None
                continue
            if not ok:
                raise AssertionError(f"{worker.__name__}: rank {rank} failed:\n{value}")
            outcomes[rank] = value
        failed = False
    finally:
        for process in processes:
            if failed and process.is_alive():
                process.kill()
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    return [outcomes[rank] for rank in range(world_size)]


def _rank_main(worker, rank, world_size, store_path, results, kwargs):
    try:
        torch.set_num_threads(1)
        if sys.platform == "linux" and os.path.exists("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
        )
        results.put((rank, True, worker(rank, world_size, **kwargs)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            # Free the group now, not at exit: examples/fsdp2_train.py's shut_down_distributed.
            getattr(dtensor_debug, "_clear_sharding_prop_cache", lambda: None)()
            gc.collect()
            dist.destroy_process_group()


def run_script(args, timeout=JOB_TIMEOUT):
    """Run a command in its own process group; on timeout kill the group (torchrun's workers too)."""
    process = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{args} did not finish within {timeout} s:\n{output}") from None
    assert process.returncode == 0, output
    return output


# -- the models ----------------------------------------------------------------------------------


class Net(torch.nn.Module):
    """Shapes chosen against min_8bit_size=64, blocks of 256 and shards along dim 0:

    - inp.weight 64x32 (8-bit): 2 shards of 1024 (4 ranks: 512) elements, whole blocks; 3 ranks
      (22/22/20 rows) cut blocks;
    - inp.bias 64 (8-bit): one block, cut into 2, 3 or 4 pieces;
    - mid.weight 81x64, mid.bias 81 (8-bit): shards cut blocks (81 rows split 41/40, 27 x 3,
      21/21/21/18);
    - out.weight 1x81 (8-bit): one row, so every rank but the first holds an empty shard;
    - out.bias (1,): fp32 momentum under min_8bit_size.
    """

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(32, 64)
        self.mid = torch.nn.Linear(64, 81)
        self.out = torch.nn.Linear(81, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


class UserMLP(torch.nn.Module):
    """The issue's model: Linear(300, 200) -> Linear(200, 256) -> Linear(256, 96)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(300, 200), torch.nn.ReLU(), torch.nn.Linear(200, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 96),
        )

    def forward(self, x):
        return self.layers(x)


class Aligned(torch.nn.Module):
    """Every shard boundary on a block boundary for 2 ranks (blocks of 256): 64x32 and 128x64
    weights split into 4 and 16 whole blocks per shard, no biases."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(32, 64, bias=False)
        self.out = torch.nn.Linear(64, 128, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def make_fsdp_model(seed=0, mesh=None, model_class=Net, dtype=torch.float32):
    """The model sharded per layer (mesh None: FSDP over all ranks; a 2-D mesh: HSDP), and an
    unsharded copy."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = model_class().to(dtype)
    unsharded = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, unsharded


def inputs(model, step: int, rank: int, rows: int = 8) -> torch.Tensor:
    """A batch for ``model`` (in its dtype) that depends on the step and rank only."""
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, first.in_features, generator=generator).to(first.weight.dtype)


def train_step(model, optimizer, x):
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def train(model, optimizer, rank, steps, same_data=False):
    for step in steps:
        train_step(model, optimizer, inputs(model, step, 0 if same_data else rank))


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


def full(tensor):
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def state_bytes(optimizer, local=True) -> int:
    from lion8bit.sharded import local as local_of

    return sum(
        (local_of(value) if local else value).nbytes
        for entry in optimizer.state.values()
        for value in entry.values()
        if isinstance(value, torch.Tensor)
    )


# -- whole states --------------------------------------------------------------------------------


def full_state(model, optimizer) -> dict:
    """Params and optimizer state of the whole model, gathered on every rank: {"param NAME": ...,
    "state NAME KEY": ...}; through get_optimizer_state_dict(full_state_dict=True) for a sharded
    model, the optimizer's own state_dict for an unsharded one (the same keys: the optimizer's
    checkpoint layout is the unsharded one)."""
    snapshot = {f"param {name}": full(p.detach()).clone() for name, p in model.named_parameters()}
    if any(hasattr(p, "device_mesh") for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        states = get_optimizer_state_dict(model, optimizer, options=options)["state"]
    else:
        packed = optimizer.state_dict()["state"]
        states = {name: packed[i] for i, (name, _) in enumerate(model.named_parameters()) if i in packed}
    for name, entry in states.items():
        for key, value in entry.items():
            snapshot[f"state {name} {key}"] = value.clone() if torch.is_tensor(value) else value
    return snapshot


def differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ: tensors in dtype, shape or any bit (-0.0 != 0.0), others by ==."""
    if a.keys() != b.keys():
        return [f"keys {sorted(a.keys() ^ b.keys())}"]
    return [key for key in a if not _same(a[key], b[key])]


def _same(a, b) -> bool:
    if not torch.is_tensor(a) or not torch.is_tensor(b):
        return torch.is_tensor(a) == torch.is_tensor(b) and a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(integer), b.contiguous().view(integer))


# -- torch.distributed.checkpoint ----------------------------------------------------------------


def checkpoint_state(model, optimizer, flatten=False):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer, options=options),
    }


def load_model(model, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])


def load_checkpoint(model, optimizer, path, flatten=False):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = checkpoint_state(model, optimizer, flatten)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)


# -- FSDP2 against unsharded ---------------------------------------------------------------------


def fsdp_trajectories(rank, world_size, configs, steps, mesh_shape=None):
    """Per config: an FSDP2 optimizer and an unsharded one fed the same (gathered) grads; their
    whole states after ``steps``, compared, and the all-reduces inside ``step()``."""
    from torch.distributed.device_mesh import init_device_mesh

    from lion8bit import sharded

    mesh = None
    if mesh_shape is not None:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
    reports = []
    for config in configs:
        config = dict(config)
        model_class, dtype = config.pop("model", Net), config.pop("dtype", torch.float32)
        kinds = config.pop("states", None)  # a state kind per step: the group's is changed in between
        model, unsharded = make_fsdp_model(mesh=mesh, model_class=model_class, dtype=dtype)
        options = {**OPTIONS, **config}
        optimizer, reference = Lion(model.parameters(), **options), Lion(unsharded.parameters(), **options)
        all_reduces = []  # (group size) of each all-reduce inside optimizer.step()
        original, counting_all_reduce = dist.all_reduce, _counting(dist.all_reduce, all_reduces)
        for step in range(steps):
            if kinds:
                optimizer.param_groups[0]["state"] = reference.param_groups[0]["state"] = kinds[step]
            model(inputs(model, step, rank)).square().mean().backward()
            for param, twin in zip(model.parameters(), unsharded.parameters(), strict=True):
                twin.grad = param.grad.full_tensor()
            dist.all_reduce = counting_all_reduce
            try:
                optimizer.step()
            finally:
                dist.all_reduce = original
            reference.step()
            optimizer.zero_grad()
            reference.zero_grad()
        reports.append({
            "config": {**config, "model": model_class.__name__, "dtype": str(dtype), "states": kinds},
            "differences": differences(full_state(model, optimizer), full_state(unsharded, reference)),
            "all_reduces_per_step": len(all_reduces) / steps,
            "all_reduce_group_sizes": sorted(set(all_reduces)),
            "state_bytes_local": state_bytes(optimizer),
            "state_bytes_unsharded": state_bytes(reference),
            "shard": sharded.shard_index(next(model.parameters())),
            "local_shapes_match": all(_local_shape_fits(param, optimizer.state[param]) for param in model.parameters()),
        })
    return reports




def _local_shape_fits(param, entry) -> bool:
    """Dense momentum and 8-bit codes have the local param's shape; 4-bit codes are the packed
    bytes of the blocks of 32 that overlap the shard."""
    from lion8bit import quant, sharded

    if mom.stored_format(entry) == "4bit":
        low, high = sharded.covered(sharded.flat_range(param), quant.BLOCK_SIZE_4BIT)
        return entry[mom.MOMENTUM_CODES].shape == (quant.packed_size(high - low),)
    key = mom.MOMENTUM if mom.MOMENTUM in entry else mom.MOMENTUM_CODES
    return sharded.local(entry[key]).shape == sharded.local(param).shape


def _counting(all_reduce, log: list):
    """``all_reduce`` that appends the size of each call's group to ``log``."""

    def counting_all_reduce(tensor, *args, group=None, **kwargs):
        log.append(dist.get_world_size(group))
        return all_reduce(tensor, *args, group=group, **kwargs)

    return counting_all_reduce
