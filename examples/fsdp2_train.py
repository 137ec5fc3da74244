"""Train a small MLP sharded with FSDP2 (fully_shard) and Lion8bit; save and resume with DCP.

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_train.py
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_train.py --steps 100 --checkpoint ckpt
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_train.py --steps 100 --checkpoint ckpt --resume

Runs on CPU with gloo (or one GPU per rank with NCCL); without torchrun it runs as a single
process. Each rank holds a shard of every weight, and Lion8bit keeps 8-bit momentum for that
shard only: the state bytes per rank printed at the end are about the total divided by the
number of ranks. A checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import debug as dtensor_debug
from tqdm import tqdm

from lion8bit import Lion


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument(
        "--state", choices=["8bit", "4bit", "bf16", "fp32"], default="8bit", help="momentum storage (default: 8bit)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="weight decay (default: 0.1)")
    parser.add_argument(
        "--cautious-factor",
        type=float,
        default=1.0,
        help="1.0 = off; below 1 masks updates against the gradient (default: 1.0)",
    )
    parser.add_argument("--width", type=int, default=512, help="hidden width of the MLP (default: 512)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per rank and step (default: 64)")
    parser.add_argument(
        "--checkpoint", metavar="DIR", help="save model + optimizer here at the end (torch.distributed.checkpoint)"
    )
    parser.add_argument("--resume", action="store_true", help="load --checkpoint before training")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default: 0)")
    parser.add_argument("--quick", action="store_true", help="a few steps of a smaller model (for tests)")
    args = parser.parse_args()
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint DIR")
    if args.quick:
        args.steps, args.width = min(args.steps, 20), min(args.width, 128)
    return args


def init_distributed() -> torch.device:
    """gloo on CPU or NCCL on GPUs under torchrun; a one-process group otherwise."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class MLP(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [torch.nn.Linear(64, width), torch.nn.Linear(width, width), torch.nn.Linear(width, 1)]
        )

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.nn.functional.gelu(layer(x))
        return self.layers[-1](x)


def batch(step: int, rank: int, size: int, device):
    """A regression task, different samples on every rank and step (reproducible on resume)."""
    generator = torch.Generator().manual_seed(1_000_003 * step + rank)
    x = torch.randn(size, 64, generator=generator)
    y = (x.sum(1, keepdim=True) / 8).sin()  # a smooth target: x.sum / 8 has unit variance
    return x.to(device), y.to(device)


def checkpoint_state(model, optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def train(args, device) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)  # the same initial weights on every rank before sharding
    model = MLP(args.width).to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = Lion(
        model.parameters(),
        lr=args.lr,
        weight_decay=args.weight_decay,
        state=args.state,
        cautious_factor=args.cautious_factor,
    )

    first_step = 0
    if args.resume:
        state = checkpoint_state(model, optimizer)
        dcp.load(state, checkpoint_id=args.checkpoint)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"])
        first_step = next(iter(optimizer.state.values()))["step"]

    losses = []
    started = time.perf_counter()
    progress = tqdm(range(first_step, first_step + args.steps), disable=rank != 0, desc=f"FSDP2 x{world_size}")
    for step in progress:
        x, y = batch(step, rank, args.batch_size, device)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == first_step + args.steps - 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # the loss over all ranks, every 10 steps only
            losses.append(mean_loss.item() / world_size)
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
    elapsed = time.perf_counter() - started

    if args.checkpoint:
        writer = dcp.FileSystemWriter(args.checkpoint, overwrite=True)
        with warnings.catch_warnings():
            # A resumed run saves over the checkpoint it started from, on purpose.
            warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
            dcp.save(checkpoint_state(model, optimizer), storage_writer=writer)

    local_params = sum(p.to_local().numel() for p in model.parameters())
    # The momentum (codes) is a DTensor placed like its param; the 8-bit absmax, while training,
    # a plain tensor of the blocks this rank's shard overlaps (state_dict() gathers the layout
    # that reshards, lion8bit/reshard.py).
    state_bytes = sum(
        (value.to_local() if hasattr(value, "to_local") else value).nbytes
        for entry in optimizer.state.values()
        for value in entry.values()
        if torch.is_tensor(value)
    )
    report = torch.tensor([local_params, state_bytes], dtype=torch.int64, device=device)
    reports = [torch.zeros_like(report) for _ in range(world_size)]
    dist.all_gather(reports, report)
    if rank == 0:
        total_params = sum(p.numel() for p in model.parameters())
        print(
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps ({elapsed:.1f} s), "
            f"{world_size} rank(s), state={args.state}"
        )
        for index, (params, nbytes) in enumerate(r.tolist() for r in reports):
            print(
                f"rank {index}: {params:,} of {total_params:,} params, optimizer state {nbytes:,} bytes "
                f"({nbytes / params:.3f} B/param)"
            )
        if args.checkpoint:
            print(f"saved model + optimizer to {args.checkpoint} (step {first_step + args.steps})")


def shut_down_distributed() -> None:
    """destroy_process_group with nothing left that holds the process group, so that it joins
    gloo's threads now rather than at interpreter exit.

    The model's DTensors reach the group through their DeviceMesh, and DTensor's sharding
    propagation caches keep those meshes after the model is gone (torch 2.13). Left alive to
    exit, gloo's threads aborted one resumed 3-rank run of this script in 17 on a loaded 2-core
    machine ("terminate called without an active exception", SIGABRT after the checkpoint was
    saved); cleared, the group is freed by destroy_process_group and no run aborted.
    """
    clear_caches = getattr(dtensor_debug, "_clear_sharding_prop_cache", None)
    if clear_caches is not None:
        clear_caches()
    gc.collect()  # the meshes, their groups and the FSDP2 state sit in reference cycles
    dist.destroy_process_group()


def main():
    args = parse_args()
    device = init_distributed()
    train(args, device)  # returns with the model and optimizer out of scope
    shut_down_distributed()


if __name__ == "__main__":
    main()
