#!/usr/bin/env python
"""PT against tensor parallelism, the no-sync bound and transformers' own TP: TTFT, TPOT and throughput.

One dense Llama is built from a seed and turned into its exact track layout (`PTForCausalLM.from_llama`), so every
variant runs the same weights with the same parameter count; a variant only changes when the tracks are merged:

    tensor_parallel      PT weights, sync_mode="tensor_parallel": 2L merges, i.e. dense TP on our kernels
    pt_D1 ... pt_D8      PT, merged every D layers: ceil(L/D) merges
    no_sync_bound        PT merged only after the last layer (D = L): PT's compute alone, the limit no D beats
    transformers_llama   the dense Llama, with transformers' own TP under a launcher (DistributedConfig(tp_size=W))
    pt_moe               with --experts E only: PT-MoE, every layer sparse, merged every --moe-depth layers (8)

pt_moe is the dense PT model with every FFN replaced by E experts per track of which each token uses the top k
(--experts-per-tok, 2), each of width `intermediate_size_per_track // k`: a token runs as many FFN parameters as in
the dense PT model, so both have the same ACTIVE parameter count but for the routers (n * E * d per layer, the only
extra). Its weights are drawn from the seed (a PT-MoE has no dense counterpart to convert) and, under a launcher,
saved by rank 0 and loaded by every rank as its tracks' slices, as the PT model is. The report gives pt_moe /
pt_D{--moe-depth} for TTFT, TPOT and throughput; the target is a throughput of at least 0.9x (so latencies of at most
1/0.9 = 1.11x). --experts-implementation picks transformers' experts kernel (eager, batched_mm, grouped_mm; default:
transformers' own default); one run times one kernel.

With W ranks (`torchrun --nproc-per-node W`, or `accelerate launch`) every rank holds n/W tracks and a merge is one
all_reduce; the Llama runs transformers' DTensor tensor parallelism. A request is a prefill of P tokens at batch B
(its latency is the TTFT) and greedy decoding of T new tokens with a KV cache (the median step is the TPOT); the
throughput is generated tokens per second of a whole request at a larger batch. The variants take turns within
every repeat, so a drift of the machine hits them all alike; ratios are taken within this one run.

--preset NAME sets the defaults of a named comparison (flags given explicitly still win):

    single_device   one device: does batching the tracks cost anything? PT with 8 tracks merged every 8 layers
                    against transformers' Llama holding the same weights (Llama / PT >= 1.0: they cost nothing)
    moe             PT-MoE against the dense PT model with the same active parameters, both merged every 2 layers:
                    AFM PT-MoE's proportions (tamm 0.2.0) at a quarter of its width, 4 tracks, top-2 of 8 experts

    python scripts/benchmark.py --quick                                    # seconds: the CI smoke test
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 scripts/benchmark.py --out results/w2
    python scripts/benchmark.py --preset single_device --out results/w1
    python scripts/benchmark.py --preset moe --experts-implementation eager
    torchrun --standalone --nproc-per-node 2 scripts/benchmark.py --preset moe   # the tracks split over 2 ranks
    python scripts/benchmark.py --device cuda --dtype bfloat16 --cache static --compile ...   (see gpu_check.sh)

Writes PREFIX.json (everything, including the exact command, versions and the counted collectives), PREFIX.md
(the table) and PREFIX.png (latency against D, with the TP, bound and transformers lines). Exits 1 if the outputs
of PT in tensor-parallel layout and of the Llama disagree (or compiled and eager ones), after writing the files.

The measuring lives in benchmark_harness.py, the report (ratios, targets, table, plot) in benchmark_report.py.
"""

import argparse
import os
import sys
from pathlib import Path

import torch.distributed as dist

# sibling modules of scripts/ by name: Python puts a script's own folder on sys.path
from benchmark_harness import (
    Prompts,
    add_shape_arguments,
    bare_all_reduce,
    build_models,
    measure,
    moe_summary,
    plan_variants,
    profile_decode,
    start_world,
)
from benchmark_report import add_ratios, environment, exact_command, plot_title, pt_targets, write_files, write_table
from script_io import check_output_dir


SCHEMA = "modeling_ptt/benchmark/1"
# --quick: a tiny model and workload for the CI smoke test; flags given explicitly still win.
QUICK = dict(layers=4, hidden_size=64, intermediate_size=128, heads=4, kv_heads=2, vocab_size=128, num_tracks=2,
             batch=1, prompt_len=8, new_tokens=4, throughput_batch=2, warmup=1, repeats=2)
# --preset: the defaults of a named comparison (described in the docstring); they win over --quick's.
PRESETS = {
    "single_device": dict(num_tracks=8, kv_heads=8, variants=["pt_D8", "transformers_llama"]),
    # AFM PT-MoE at a quarter of its width: attention width per track d/4, 4 query and 4 KV heads per track, expert
    # width 1.4375 d (intermediate_size / num_tracks / experts_per_tok)
    "moe": dict(num_tracks=4, layers=4, hidden_size=512, heads=16, kv_heads=16, intermediate_size=5888,
                vocab_size=4096, experts=8, experts_per_tok=2, depths=[2], moe_depth=2, variants=["pt_D2", "pt_moe"],
                batch=4, prompt_len=256, new_tokens=17, out="benchmark-results/moe"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    work = parser.add_argument_group("workload")
    work.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8], help="PT track block depths D")
    work.add_argument("--variants", nargs="+", help="a subset of the variant names (default: all)")
    moe = parser.add_argument_group("PT-MoE (the pt_moe variant, run only when --experts is given)")
    moe.add_argument("--experts", type=int, default=None, help="E: experts per track, every layer sparse")
    moe.add_argument("--experts-per-tok", type=int, default=2, help="k: experts a token uses (of its track's E)")
    moe.add_argument("--moe-depth", type=int, default=8, help="D of pt_moe and of the dense pt_D it is compared to")
    moe.add_argument("--experts-implementation", default=None, choices=["eager", "batched_mm", "grouped_mm"],
                     help="transformers' experts kernel (default: transformers' default)")
    work.add_argument("--batch", type=int, default=1, help="batch of the TTFT/TPOT requests")
    work.add_argument("--prompt-len", type=int, default=128, help="P: prompt tokens of the prefill")
    work.add_argument("--new-tokens", type=int, default=32, help="T: tokens generated per request (T-1 decode steps)")
    work.add_argument("--throughput-batch", type=int, default=8, help="batch of the throughput request (0: skip)")
    work.add_argument("--warmup", type=int, default=2)
    work.add_argument("--repeats", type=int, default=10)
    work.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("execution")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    run.add_argument("--attn-implementation", default="sdpa")
    run.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    run.add_argument("--compile", action="store_true", help="torch.compile the forwards (use with --cache static)")
    run.add_argument("--compile-mode", default=None, help='default: "reduce-overhead" on CUDA, torch\'s default on CPU')
    run.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True)")
    run.add_argument("--workdir", default=None,
                     help="under a launcher: where rank 0 saves the checkpoints the ranks load (default: a temp dir)")
    run.add_argument("--preset", choices=sorted(PRESETS), help="the defaults of a named comparison (see above)")
    run.add_argument("--quick", action="store_true", help=f"tiny model and workload for a smoke test: {QUICK}")
    run.add_argument("--out", default=None, help="prefix of the .json/.md/.png files (default benchmark-results/wW)")
    run.add_argument("--profile", action="store_true",
                     help="also break one request's decode steps down with torch.profiler (collectives/compute/rest)")
    run.add_argument("--note", default="", help="free text stored with the results (e.g. machine conditions)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick or args.preset:
        parser.set_defaults(**{**(QUICK if args.quick else {}), **PRESETS.get(args.preset, {})})
        args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checked here, on every rank, rather than when rank 0 builds the model while the others wait for it."""
    if args.compile and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("--compile is supported with one process only")
    if args.compile and args.cache != "static":
        parser.error("--compile needs --cache static (a dynamic cache changes shape every step)")
    if args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if args.device == "cuda" else "default"
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill token, then decode steps)")
    if any(depth < 1 for depth in args.depths):
        parser.error("--depths must be positive")
    if args.experts is None:
        return
    if args.experts < 1:
        parser.error("--experts must be positive")
    if args.moe_depth not in args.depths:
        parser.error(f"--moe-depth {args.moe_depth} must be one of --depths {args.depths}: pt_moe is compared to "
                     f"pt_D{args.moe_depth}")
    if not 1 <= args.experts_per_tok <= args.experts:
        parser.error(f"--experts-per-tok {args.experts_per_tok} must be between 1 and --experts {args.experts}")
    width = args.intermediate_size // args.num_tracks
    if width % args.experts_per_tok:
        parser.error(f"--experts-per-tok {args.experts_per_tok} must divide the FFN width per track {width} "
                     f"(--intermediate-size / --num-tracks): the k experts a token uses make up that width")


def describe_model(args, models: dict) -> dict:
    return dict(layers=args.layers, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                heads=args.heads, kv_heads=args.kv_heads, vocab_size=args.vocab_size, num_tracks=args.num_tracks,
                dtype=args.dtype, attn_implementation=args.attn_implementation, moe=moe_summary(args, models))


def describe_workload(args) -> dict:
    return dict(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                throughput_batch=args.throughput_batch, warmup=args.warmup, repeats=args.repeats, depths=args.depths,
                cache=args.cache, compile=args.compile, compile_mode=args.compile_mode if args.compile else None,
                quick=args.quick)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = start_world(args.device)
    prefix = Path(args.out or f"benchmark-results/w{world.size}")
    if world.rank == 0:  # the one that writes: before minutes of measuring, not after
        check_output_dir(prefix.parent, "the benchmark results")
    variants = plan_variants(args.depths, args.layers, args.variants, args.moe_depth if args.experts else None)
    models = build_models(args, world, variants)
    load_before = os.getloadavg()[0]
    all_reduce = bare_all_reduce(args, world)
    rows, checks = measure(args, world, variants, models)
    profiled = None
    if args.profile:
        profiled = world.gather(profile_decode(args, world, variants, models, Prompts.draw(args, world.device).prompt))

    report = {
        "schema": SCHEMA,
        "command": exact_command(),
        "environment": {**environment(world.device, world.size), "load_average_1min_before": load_before},
        "model": describe_model(args, models),
        "workload": describe_workload(args),
        "variants": rows,
        "bare_all_reduce_ms": all_reduce,
        "decode_profile_per_rank": profiled,
        "checks": checks,
        "note": args.note,
    }
    add_ratios(rows, "tensor_parallel")
    targets = pt_targets(rows, world.size)
    report["ratios"] = {target["name"]: target["value"] for target in targets}
    report["targets"] = targets
    failed = [item["name"] for item in checks if not item["passed"]]
    if world.rank == 0:
        table = write_table(report)
        write_files(prefix, report, table, plot_title(report))
        print(table, flush=True)
        print(f"wrote {prefix}.json, .md, .png", flush=True)
        if failed:
            print(f"OUTPUT MISMATCH: {failed}", file=sys.stderr, flush=True)
    if world.size > 1:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
