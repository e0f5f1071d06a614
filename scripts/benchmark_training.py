#!/usr/bin/env python
"""Training-step cost of the three ways to put one PT model on W processes, measured in one run.

    torchrun --nproc-per-node 2 scripts/benchmark_training.py --output docs/performance/training_w2

  - track_parallel: `--track-parallel W` with the model's own track blocks (D, default 8): every rank holds n/W
    tracks, 2*ceil(L/D) merge/dispatch all_reduces per micro-batch;
  - no_sync_bound: the same with D=L, the tracks merged only after the last layer (2 all_reduces per micro-batch):
    the least communication track parallelism can do, so what is left of its step time is compute. It is the
    bound track_parallel is measured against (how much its merges every D layers cost), not a model to train;
  - tensor_parallel: the same, with `sync_mode="tensor_parallel"` (dense maths, Megatron's placement): 4L;
  - data_parallel: every rank holds the whole model, reads 1/W of the batch, and DDP averages the gradients.

Each step is one AdamW step over the same global batch with gradient clipping, through the training code of
`modeling_ptt.training` (`Layout`, `parallelize_ptt`, `clip_grad_norm_`). The variants are built and warmed up one after the other and then timed in turns, one step of each
per round, so that a load from other jobs that changes during the run falls on all of them alike. Reported per
variant, medians over the measured steps: step time, tokens/s, the collectives one step runs (counted at the
dispatcher; DDP runs its bucket all_reduces through a communication hook, the default `allreduce_hook`, so that
they reach the dispatcher, and the hook also counts them), and per rank the bytes of weights, gradients and AdamW
state and the peak memory of building and warming up the variant, as growth over its start: on CUDA of the peak
allocated, on Linux CPUs of the peak resident set (the kernel's peak count is restarted for every variant, after
what was freed went back to the OS). Ratios are against tensor_parallel and, when measured, no_sync_bound in
the same run.
"""

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from benchmark_harness import add_shape_arguments, peak_memory_bytes, reset_peak_memory, resident_bytes
from collectives import CollectiveCounter
from modeling_ptt import PTConfig
from modeling_ptt.placement import start_process_group
from modeling_ptt.training import Layout, clip_grad_norm_, init_from_scratch, parallelize_ptt


VARIANTS = ("track_parallel", "no_sync_bound", "tensor_parallel", "data_parallel")


def model_config(args, variant: str) -> PTConfig:
    return PTConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_tracks=args.num_tracks, track_block_depth=args.layers if variant == "no_sync_bound" else args.depth,
        sync_mode="tensor_parallel" if variant == "tensor_parallel" else "track_block",
    )


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes this rank holds of weights, gradients and optimizer state."""
    tensor_bytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    params = list(model.parameters())
    return {
        "weights": tensor_bytes(params),
        "gradients": tensor_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer": tensor_bytes([v for state in optimizer.state.values() for v in state.values()
                                   if torch.is_tensor(v) and v.dim() > 0]),
    }


def restart_peak_resident() -> int | None:
    """Hand what earlier variants freed back to the OS and restart the kernel's peak-RSS count; the RSS now."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_memory(torch.device("cpu"))
    return resident_bytes("VmRSS")


def prepare(args, variant: str, world_size: int) -> tuple:
    """Build and warm up `variant`; its step function and what was measured of it (all but the step time)."""
    resident_at_start = restart_peak_resident()
    config = model_config(args, variant)
    track_parallel = 1 if variant == "data_parallel" else world_size
    layout = Layout(track_parallel, config.num_tracks)
    if layout.device.type == "cuda":
        reset_peak_memory(layout.device)
        allocated_at_start = torch.cuda.memory_allocated(layout.device)
    model = parallelize_ptt(init_from_scratch(config, args.seed, layout.tracks).to(layout.device), layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    buckets = None
    if isinstance(model, DistributedDataParallel):  # its built-in bucket all_reduces run in C++, unseen by the counter
        buckets = {"count": 0}

        def counted_allreduce(state, bucket):
            buckets["count"] += 1
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counted_allreduce)
    model.train()
    generator = torch.Generator().manual_seed(args.seed)
    global_batch = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator)
    # the rows of one track group read the same batch; data-parallel replicas split it
    batch = global_batch.chunk(layout.num_replicas)[layout.replica_index].to(layout.device)

    def step() -> None:
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        clip_grad_norm_(model, 1.0, layout)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    for _ in range(args.warmup):
        step()
    if buckets is not None:  # DDP rebuilds its buckets after the first step: count those of the counted one
        buckets["count"] = 0
    with CollectiveCounter() as counter:
        step()
    result = {
        "collectives_per_step": dict(counter.ops),
        "bytes_per_rank": state_bytes(model, optimizer),
        "merges_per_forward": config.num_sync_points if track_parallel > 1 else 0,
    }
    if buckets is not None:
        result["ddp_bucket_all_reduces_per_step"] = buckets["count"]
    if layout.device.type == "cuda":
        result["peak_allocated_growth_bytes"] = peak_memory_bytes(layout.device) - allocated_at_start
    elif resident_at_start is not None:
        result["peak_resident_growth_bytes"] = peak_memory_bytes(layout.device) - resident_at_start
    return step, layout.device, result


def measure(args, variants: list[str], world_size: int) -> dict:
    prepared = {variant: prepare(args, variant, world_size) for variant in variants}
    times = {variant: [] for variant in variants}
    for _ in range(args.steps):
        for variant, (step, device, _) in prepared.items():
            dist.barrier()
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            times[variant].append(time.perf_counter() - started)
    results = {}
    for variant, (_, _, result) in prepared.items():
        median = statistics.median(times[variant])
        results[variant] = {"step_s": median, "step_s_all": times[variant],
                            "tokens_per_s": args.batch * args.seq_len / median, **result}
    return results


def markdown(results: dict, args, world_size: int) -> str:
    base_result = results["tensor_parallel"]
    base = base_result["step_s"]
    bound = results["no_sync_bound"]["step_s"] if "no_sync_bound" in results else None
    lines = [
        f"Training step, W={world_size} processes, L={args.layers}, d={args.hidden_size}, FFN {args.intermediate_size},"
        f" {args.heads} heads ({args.kv_heads} KV), n={args.num_tracks}, D={args.depth}, batch {args.batch} x "
        f"{args.seq_len} tokens (global), fp32, medians of {args.steps} steps, the variants timed in turns.",
        "",
        "| variant | step (s) | vs tensor_parallel | vs no_sync_bound | tokens/s | collectives per step "
        "| MiB per rank (weights+grads+AdamW) | peak MiB per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        counts = ", ".join(f"{op.split('.')[-1]} {n}" for op, n in sorted(r["collectives_per_step"].items())) or "-"
        if "ddp_bucket_all_reduces_per_step" in r:
            counts += f" ({r['ddp_bucket_all_reduces_per_step']} of them DDP's gradient buckets)"
        mib = sum(r["bytes_per_rank"].values()) / 2**20
        peak = r.get("peak_allocated_growth_bytes", r.get("peak_resident_growth_bytes"))
        versus_bound = "-" if bound is None else f"{r['step_s'] / bound:.3f}x"
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / base:.2f}x | {versus_bound} "
                     f"| {r['tokens_per_s']:.0f} | {counts} "
                     f"| {mib:.0f} | {'-' if peak is None else f'{peak / 2**20:.0f}'} |")
    peak_kind = "the growth of CUDA's peak allocated memory" if "peak_allocated_growth_bytes" in base_result else \
        "the growth of the peak resident set (rank 0; the first variant also pays the runtime's one-time allocations)"
    return "\n".join([*lines, "", f"Peak: {peak_kind} over the variant's start, while it is built and warmed up."]) \
        + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--depth", type=int, default=8, help="D of the track_parallel variant")
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences per optimizer step)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write OUTPUT.json and OUTPUT.md (rank 0)")
    args = parser.parse_args()
    if "tensor_parallel" not in args.variants:
        parser.error("--variants must include tensor_parallel: the ratios are taken against it")
    start_process_group()
    world_size = dist.get_world_size()
    results = measure(args, args.variants, world_size)
    if dist.get_rank() == 0:
        table = markdown(results, args, world_size)
        print(table)
        if args.output:
            Path(args.output).with_suffix(".json").write_text(json.dumps(
                {"args": vars(args), "world_size": world_size, "results": results}, indent=2))
            Path(args.output).with_suffix(".md").write_text(table)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
