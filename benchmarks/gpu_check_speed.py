"""The GPU check's speed parts (benchmarks/gpu_check.py): the problems' shapes, the optimizers
timed, CUDA-event timing, the copy floor's bandwidth, kernel launches per step from
torch.profiler, and the speed tables."""

from __future__ import annotations

import gc
import importlib.util
import inspect
import statistics
import time

import torch
from gpu_check_report import BETAS, GIB, LR, STATES, WEIGHT_DECAY, Deadline, Report, Skip, _fmt, dtype_name

import lion8bit

# -- speed -----------------------------------------------------------------------------------------


def gpt2_small_shapes(layers: int = 12, width: int = 768, vocab: int = 50257, context: int = 1024) -> list:
    """GPT-2 small's parameters (the LM head is tied to the token embedding): 124,439,808 in 148."""
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return shapes + [(width,), (width,)]


def llama2_7b_layer_shapes(width: int = 4096, ffn: int = 11008) -> list:
    """One Llama-2-7B decoder layer: attention q, k, v, o; MLP gate, up, down; two RMSNorms."""
    return [(width, width)] * 4 + [(ffn, width), (ffn, width), (width, ffn), (width,), (width,)]


def problems(cuda: bool) -> list[tuple[str, list]]:
    found = [("tensor-256M", [(16384, 16384)]), ("gpt2-small", gpt2_small_shapes()),
             ("llama2-7b-layer", llama2_7b_layer_shapes())]
    numels = {name: sum(torch.Size(s).numel() for s in shapes) for name, shapes in found}
    counts = {name: len(shapes) for name, shapes in found}
    assert numels["gpt2-small"] == 124_439_808 and counts["gpt2-small"] == 148, (numels, counts)
    assert numels["llama2-7b-layer"] == 202_383_360 and counts["llama2-7b-layer"] == 9, (numels, counts)
    assert numels["tensor-256M"] == 2**28
    return found if cuda else [("tensor-64K (dry run)", [(256, 256)])]


def _lion8bit(state: str, backend: str, **extra):
    return lambda params: lion8bit.Lion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, state=state,
                                        backend=backend, **extra)


def _adamw(**kind):
    return lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01, **kind)


def _lion_pytorch_triton(params):
    if params[0].device.type != "cuda":
        raise Skip("dry run: peers are timed on CUDA only")
    if importlib.util.find_spec("lion_pytorch") is None or importlib.util.find_spec("triton") is None:
        raise Skip("lion-pytorch (with triton) not installed")
    import lion_pytorch

    return lion_pytorch.Lion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, use_triton=True)


def _bitsandbytes(params):
    if params[0].device.type != "cuda":
        raise Skip("dry run: peers are timed on CUDA only")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes not installed")
    import bitsandbytes

    return bitsandbytes.optim.Lion8bit(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


def capturable() -> bool:
    return "capturable" in inspect.signature(lion8bit.Lion).parameters


def optimizers(cuda: bool, models: bool) -> dict:
    """label -> (state kind, factory, captured in a CUDA graph)."""
    backend = "triton" if cuda else "cpu"
    found = {f"lion8bit {backend} {state}": (state, _lion8bit(state, backend), False) for state in STATES}
    if models and cuda:
        paged = _lion8bit("8bit", backend, paged=True)
        found[f"lion8bit {backend} 8bit paged"] = ("8bit paged", paged, False)
        if capturable():
            graphed = _lion8bit("8bit", backend, capturable=True)
            found[f"lion8bit {backend} 8bit graph"] = ("8bit", graphed, True)
            found["AdamW fused graph"] = ("2 x param", _adamw(fused=True, capturable=True), True)
    found["AdamW fused"] = ("2 x param", _adamw(fused=True), False)
    found["AdamW foreach"] = ("2 x param", _adamw(foreach=True), False)
    found["lion-pytorch triton"] = ("param", _lion_pytorch_triton, False)
    found["bitsandbytes Lion8bit"] = ("8bit", _bitsandbytes, False)
    return found


def time_steps(step, device: str, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls after ``warmup`` calls: CUDA events on a GPU."""
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def copy_gbps(device: str, nbytes: int) -> float:
    """GB/s (read + write) of a device-to-device copy of ``nbytes``: the floor's bandwidth."""
    source = torch.ones(nbytes // 4, device=device)
    target = torch.empty_like(source)
    times = time_steps(lambda: target.copy_(source), device, warmup=2, iters=10)
    return 2 * nbytes / (statistics.median(times) / 1e3) / 1e9


def count_launches(step, device: str) -> tuple[int | None, int | None]:
    """(kernels, copies and memsets) on the GPU during one call, from torch.profiler."""
    if device != "cuda":
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as recorded:
        step()
        torch.cuda.synchronize()
    names = [event.name for event in recorded.events() if event.device_type == DeviceType.CUDA]
    copies = sum(name.startswith(("Memcpy", "Memset")) for name in names)
    if not names:
        return None, None  # the profiler saw nothing on the device (no CUPTI?)
    return len(names) - copies, copies


def graph_replay(optimizer):
    """The optimizer's step captured in a CUDA graph (after warm-up steps on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    optimizer._gpu_check_graph = graph  # keeps the graph alive with the optimizer
    return graph.replay


def state_nbytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for entry in optimizer.state.values() for v in entry.values()
               if isinstance(v, torch.Tensor))


def make_params(shapes: list, dtype: torch.dtype, device: str) -> list:
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shapes:
        draw = dict(generator=generator, device=device, dtype=dtype)
        param = torch.nn.Parameter(torch.randn(shape, **draw).mul_(0.02))
        param.grad = torch.randn(shape, **draw).mul_(1e-3)
        params.append(param)
    return params


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def speed_part(report: Report, deadline: Deadline, part: str, cuda: bool, names: list) -> str:
    device = "cuda" if cuda else "cpu"
    warmup, iters = (3, 10 if part == "speed-tensor" else 20) if cuda else (1, 3)
    lines = report.section(part)
    if not lines:
        lines += ["Median step ms over the timed steps (p20-p80); floor = bytes the update moves (params "
                  "read and written, grads read, state read and written) / the bandwidth of a device-to-"
                  "device copy measured just before (1 GiB on CUDA); x AdamW fused = this step / fused "
                  "AdamW's, same problem and run; kernels = GPU kernels per step (copies and memsets apart).",
                  "",
                  "| problem | params | optimizer | state | median ms | p20-p80 | floor ms | x floor | "
                  "x AdamW fused | GB/s | kernels (copies) |",
                  "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    if not cuda:
        built = ", ".join(f"{n} ({len(s)} tensors)" for n, s in problems(True) if n in names)
        note = (f"dry run: skipped {', '.join(names)} (built their shapes: {built}), kernel counts, paged "
                "state and CUDA graphs (CUDA only)")
        if part == "speed-models":
            raise Skip(note)
        note = "timed a 64K-element fp32 CPU problem only (no GPU figure); " + note
    for name, shapes in problems(cuda):
        if name not in names and cuda:
            continue
        for dtype in (torch.float32, torch.bfloat16) if cuda else (torch.float32,):
            if deadline.over():
                report.add(part=part, case=name, param_dtype=dtype_name(dtype), status="not run",
                           detail="part budget spent")
                continue
            bandwidth = copy_gbps(device, GIB if cuda else 16 * 2**20)
            params = make_params(shapes, dtype, device)
            param_bytes = sum(p.numel() * p.element_size() for p in params)
            adamw_ms = None
            for label, (state, factory, graphed) in optimizers(cuda, models=part == "speed-models").items():
                row = dict(part=part, case=name, param_dtype=dtype_name(dtype), state=state, optimizer=label)
                if deadline.over():
                    report.add(**row, status="not run", detail="part budget spent")
                    continue
                try:
                    optimizer = factory(params)
                    step = graph_replay(optimizer) if graphed else optimizer.step
                    times = time_steps(step, device, warmup, iters)
                    kernels, copies = count_launches(step, device)
                    moved = 3 * param_bytes + 2 * state_nbytes(optimizer)  # p read + written, g read
                    median = statistics.median(times)
                    floor = moved / (bandwidth * 1e6)
                    if label == "AdamW fused":
                        adamw_ms = median
                    row.update(
                        status="ok", median_ms=median,
                        p20_ms=_percentile(times, 0.2), p80_ms=_percentile(times, 0.8),
                        floor_ms=floor, x_floor=median / floor, bytes_moved=moved, gbps=moved / median / 1e6,
                        copy_gbps=bandwidth, kernels_per_step=kernels, copies_per_step=copies,
                        detail="dry run: CPU, not a GPU figure" if not cuda else "",
                    )
                except Skip as skip:
                    row.update(status="skipped", detail=str(skip))
                except Exception as error:  # one optimizer failing must not lose the others
                    row.update(status="error", detail=f"{type(error).__name__}: {error}"[:300])
                finally:
                    optimizer = step = None
                    release(device)
                report.add(**row)
                took = f" {row['median_ms']:.3f} ms" if row["status"] == "ok" else ""
                print(f"   {name} {dtype_name(dtype)} {label}: {row['status']}{took} {row.get('detail', '')}",
                      flush=True)
            for row in report.rows:
                if row["part"] == part and row["case"] == name and row["param_dtype"] == dtype_name(dtype):
                    if adamw_ms and row.get("median_ms"):
                        row["x_adamw_fused"] = row["median_ms"] / adamw_ms
                    lines.append(_speed_line(row))
            params = None
            release(device)
            report.write()
    return "" if cuda else note


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _speed_line(row: dict) -> str:
    if row["status"] != "ok":
        return (f"| {row['case']} | {row['param_dtype']} | {row.get('optimizer', '')} | "
                f"{row.get('state', '')} | "
                f"{row['status']}: {row.get('detail', '')} | | | | | | |")
    launches = "n/a"
    if row["kernels_per_step"] is not None:
        launches = f"{row['kernels_per_step']} ({row['copies_per_step']})"
    return (f"| {row['case']} | {row['param_dtype']} | {row['optimizer']} | {row['state']} | "
            f"{row['median_ms']:.3f} | {row['p20_ms']:.3f}-{row['p80_ms']:.3f} | {row['floor_ms']:.3f} | "
            f"{row['x_floor']:.2f} | {_fmt(row.get('x_adamw_fused'))} | {row['gbps']:.0f} | {launches} |")
