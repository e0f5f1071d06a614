#!/usr/bin/env python
"""PROJECTION (not a measurement) of TTFT and TPOT on W GPUs: tensor parallelism against PT, for the paper's 30B shape.

With W = n = 8 every GPU runs one track, and a track's share of a layer is exactly a tensor-parallel rank's share
(H/W heads, K/W KV heads, I/W FFN columns, the full width d): TP and PT do the same compute per rank. They differ in
the all-reduces of B x S x d activations per forward: 2L for TP, ceil(L/D) for PT. So

    latency = fixed + L * layer + syncs * all_reduce(B * S * d * bytes) + all_gather(logits)   (same gather for both)

`layer` and `fixed` (embedding, final norm, the LM head's vocab shard at logits_to_keep=1) come from
  - "measured": timed on the current device with PT's own layers, one track's slice of the shape, eager PyTorch:
    per-layer time = (t(3 layers) - t(1 layer)) / 2, medians of repeats; decode steps run with a KV cache of P tokens;
  - "roofline": max(FLOPs / (peak * efficiency), bytes / (HBM bandwidth * efficiency)) with H100 SXM figures.
The all-reduce cost model (ring algorithm, as NCCL uses for these sizes):

    all_reduce(bytes) = latency + 2 (W-1)/W * bytes / bus_bandwidth,  all_gather(bytes) = latency + (W-1)/W * bytes/bw

Defaults: 8x H100 SXM over NVLink 4 / NVSwitch: latency 15 us per collective (NCCL small-message all-reduce),
bus bandwidth 360 GB/s (NCCL all_reduce busbw for large messages; the links give 450 GB/s per direction). Every
parameter is a flag. The paper's numbers (vLLM, 8x H100, 30B, D=8) are printed beside the projection, together
with the all-reduce latency and bandwidth that the paper's own TP-to-PT differences imply if compute is unchanged.

    python scripts/project_multi_gpu.py                          # measure here, print both sources
    python scripts/project_multi_gpu.py --device cuda --dtype bfloat16 --json projection.json
    python scripts/project_multi_gpu.py --compute roofline       # no measurement: seconds
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from modeling_ptt import PTConfig, PTForCausalLM
from modeling_ptt.modeling_parallel_track import CACHE_FIELD
from modeling_ptt.placement import check_track_split
from script_io import check_output_file, read_json_file


ROOT = Path(__file__).resolve().parent.parent
# Wang et al. 2026, vLLM on 8x H100, 30B, D=8 (TTFT at 1024 input tokens; throughput at 4096 in / 128 out).
PAPER = {
    "tensor_parallel": {"ttft_ms": 69.0, "tpot_ms": 8.80, "throughput_tok_s": 865.0},
    "pt_D8": {"ttft_ms": 54.0, "tpot_ms": 8.42, "throughput_tok_s": 1141.0},
}
PAPER_DEPTH = 8  # the D of the paper's PT rows
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def track_slice_config(config: PTConfig, world_size: int, layers: int) -> PTConfig:
    """One rank's share of every layer (one track when W = n) as a one-track model with `layers` layers; the
    vocabulary is the LM head's shard (V/W rows, as a vocab-parallel head holds; an embedding lookup costs the
    same at any vocabulary size)."""
    return PTConfig(
        vocab_size=math.ceil(config.vocab_size / world_size),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size // world_size,
        num_hidden_layers=layers,
        num_attention_heads=config.num_attention_heads // world_size,
        num_key_value_heads=max(1, config.num_key_value_heads // world_size),
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=config.rope_parameters,
        max_position_embeddings=config.max_position_embeddings,
        num_tracks=1,
        track_block_depth=1,
    )


def time_model(model, args, device) -> tuple[float, float]:
    """Median seconds of a prefill of B x P tokens, and of a decode step after a prefill of P tokens."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=generator).to(device)
    token = prompt[:, -1:]
    prefill, decode = [], []
    with torch.no_grad():
        for repeat in range(args.warmup + args.repeats):
            sync()
            start = time.perf_counter()
            cache = getattr(model(prompt, use_cache=True, logits_to_keep=1), CACHE_FIELD)
            sync()
            prefilled = time.perf_counter()
            steps = []
            for _ in range(args.decode_steps):
                step_start = time.perf_counter()
                model(token, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
                sync()
                steps.append(time.perf_counter() - step_start)
            if repeat >= args.warmup:
                prefill.append(prefilled - start)
                decode.append(statistics.median(steps))
    return statistics.median(prefill), statistics.median(decode)


def measured_compute(config: PTConfig, args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    times = {}
    for layers in (1, 3):
        torch.manual_seed(0)
        with torch.device(device):
            model = PTForCausalLM(track_slice_config(config, args.world_size, layers)).to(dtype).eval()
        times[layers] = time_model(model, args, device)
        del model
    layer = [(times[3][i] - times[1][i]) / 2 for i in (0, 1)]
    fixed = [times[1][i] - layer[i] for i in (0, 1)]
    threads = f"{device} ({torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    return {"source": f"measured on {name}, {args.dtype}, eager", "layer_prefill_s": layer[0],
            "layer_decode_s": layer[1], "fixed_prefill_s": fixed[0], "fixed_decode_s": fixed[1]}


def roofline_compute(config: PTConfig, args) -> dict:
    """Per-rank time of one layer and of the head, from FLOPs and bytes at the given efficiencies."""
    w, d, hd, b, p = args.world_size, config.hidden_size, config.head_dim, args.batch, args.prompt_len
    heads, kv_heads = config.num_attention_heads / w, max(1, config.num_key_value_heads // w)
    params = 2 * d * heads * hd + 2 * d * kv_heads * hd + 3 * d * config.intermediate_size / w
    size = BYTES[args.dtype]

    def seconds(flops, bytes_moved):
        return max(flops / (args.peak_tflops * 1e12 * args.flops_efficiency),
                   bytes_moved / (args.hbm_tbps * 1e12 * args.bandwidth_efficiency))

    attention_prefill = 2 * 2 * b * heads * p * p * hd / 2  # QK^T and PV, causal half
    attention_decode = 2 * 2 * b * heads * p * hd
    kv_bytes = 2 * b * kv_heads * p * hd * size
    head_params = d * math.ceil(config.vocab_size / w)
    return {
        "source": f"roofline: {args.peak_tflops:g} TFLOP/s x {args.flops_efficiency:g}, {args.hbm_tbps:g} TB/s x "
                  f"{args.bandwidth_efficiency:g}, {args.dtype}",
        "layer_prefill_s": seconds(2 * params * b * p + attention_prefill, params * size + 4 * b * p * d * size),
        "layer_decode_s": seconds(2 * params * b + attention_decode, params * size + kv_bytes),
        "fixed_prefill_s": seconds(2 * head_params * b, head_params * size),
        "fixed_decode_s": seconds(2 * head_params * b, head_params * size),
    }


def collective_s(bytes_moved: float, world_size: int, comm: dict, factor: float) -> float:
    return comm["latency_us"] * 1e-6 + factor * (world_size - 1) / world_size * bytes_moved / (
        comm["bus_bandwidth_gbps"] * 1e9)


def project(config: PTConfig, compute: dict, comm: dict, args) -> dict:
    size, w = BYTES[args.dtype], args.world_size
    layers = config.num_hidden_layers
    logits_gather = collective_s(args.batch * config.vocab_size * size, w, comm, 1.0)
    rows = {}
    schedules = [("tensor_parallel", layers, "tensor_parallel")] + [(f"pt_D{d}", d, "track_block") for d in args.depths]
    for name, depth, sync_mode in schedules:
        syncs = PTConfig.sync_point_count(layers, depth, sync_mode)
        row = {"syncs": syncs}
        for phase, tokens, key in (("prefill", args.prompt_len, "ttft"), ("decode", 1, "tpot")):
            all_reduce = collective_s(args.batch * tokens * config.hidden_size * size, w, comm, 2.0)
            compute_s = compute[f"fixed_{phase}_s"] + layers * compute[f"layer_{phase}_s"]
            comm_s = syncs * all_reduce + logits_gather
            row[f"{key}_ms"] = 1000 * (compute_s + comm_s)
            row[f"{key}_comm_share"] = comm_s / (compute_s + comm_s)
            row[f"all_reduce_{phase}_us"] = 1e6 * all_reduce
        rows[name] = row
    for row in rows.values():
        row["ttft_vs_tp"] = row["ttft_ms"] / rows["tensor_parallel"]["ttft_ms"]
        row["tpot_vs_tp"] = row["tpot_ms"] / rows["tensor_parallel"]["tpot_ms"]
    return rows


def implied_by_paper(config: PTConfig, args) -> dict:
    """If TP and PT D=8 computed the same, the paper's differences are (2L - ceil(L/8)) all-reduces: solve for the
    latency (decode: B x d, bandwidth negligible) and the bus bandwidth (prefill: B x 1024 x d)."""
    layers, size, w = config.num_hidden_layers, BYTES["bfloat16"], args.world_size
    saved = (PTConfig.sync_point_count(layers, PAPER_DEPTH, "tensor_parallel")
             - PTConfig.sync_point_count(layers, PAPER_DEPTH, "track_block"))
    per_decode_s = (PAPER["tensor_parallel"]["tpot_ms"] - PAPER["pt_D8"]["tpot_ms"]) / 1000 / saved
    per_prefill_s = (PAPER["tensor_parallel"]["ttft_ms"] - PAPER["pt_D8"]["ttft_ms"]) / 1000 / saved
    prefill_bytes = 1 * 1024 * config.hidden_size * size
    bandwidth = 2 * (w - 1) / w * prefill_bytes / max(per_prefill_s - per_decode_s, 1e-12)
    return {"saved_all_reduces": saved, "decode_all_reduce_us": 1e6 * per_decode_s,
            "prefill_all_reduce_us": 1e6 * per_prefill_s, "implied_bus_bandwidth_gbps": bandwidth / 1e9}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configuration" / "ptt-30b.json"))
    parser.add_argument("--world-size", type=int, default=8, help="GPUs W (one track each when W = num_tracks)")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=1024, help="P: input tokens (TTFT) and KV context (TPOT)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    comm = parser.add_argument_group("all-reduce cost model (defaults: 8x H100 SXM, NVLink 4 / NVSwitch, NCCL)")
    comm.add_argument("--latency-us", type=float, default=15.0)
    comm.add_argument("--bus-bandwidth-gbps", type=float, default=360.0)
    compute = parser.add_argument_group("per-layer compute")
    compute.add_argument("--compute", choices=["measured", "roofline", "both"], default="both")
    compute.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    compute.add_argument("--warmup", type=int, default=1)
    compute.add_argument("--repeats", type=int, default=3)
    compute.add_argument("--decode-steps", type=int, default=8)
    compute.add_argument("--measured", help="reuse the measured compute of an earlier --json instead of timing")
    compute.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    compute.add_argument("--flops-efficiency", type=float, default=0.6)
    compute.add_argument("--hbm-tbps", type=float, default=3.35, help="H100 SXM HBM3")
    compute.add_argument("--bandwidth-efficiency", type=float, default=0.7)
    parser.add_argument("--json", help="write inputs, assumptions and projections here")
    return parser


def compute_sources(config: PTConfig, args, parser: argparse.ArgumentParser) -> list[dict]:
    """The per-layer compute to project from: measured here (or taken from an earlier --json), the roofline, or both."""
    sources = []
    if args.compute in ("measured", "both") and args.measured:
        measured = [entry for entry in json.loads(Path(args.measured).read_text())["compute"]
                    if entry["source"].startswith("measured")]
        if not measured:
            parser.error(f"--measured {args.measured}: holds no measured compute (write it with --compute measured)")
        sources.append(measured[0])
    elif args.compute in ("measured", "both"):
        sources.append(measured_compute(config, args))
    if args.compute in ("roofline", "both"):
        sources.append(roofline_compute(config, args))
    return sources


def print_assumptions(config: PTConfig, args) -> None:
    print("PROJECTION, not a measurement. Assumptions:")
    print(f"  shape {Path(args.config).name}: L={config.num_hidden_layers} d={config.hidden_size} "
          f"H={config.num_attention_heads} K={config.num_key_value_heads} I={config.intermediate_size} "
          f"V={config.vocab_size}; W={args.world_size} GPUs, {config.num_tracks // args.world_size} track(s) per GPU")
    print(f"  batch {args.batch}, prompt {args.prompt_len} tokens (TTFT), decode with {args.prompt_len} tokens of "
          f"context (TPOT), {args.dtype} activations")
    print("  TP and PT do identical compute per GPU; they differ only in all-reduces (TP 2L, PT ceil(L/D)); both "
          "gather the vocab-parallel logits once")
    print("  all_reduce(bytes) = latency + 2(W-1)/W * bytes / bus bandwidth (ring), all_gather: (W-1)/W; no overlap "
          "of communication with compute; no serving-engine overhead (scheduler, sampling, CPU launch gaps)")


def print_projection(comm: dict, rows: dict) -> None:
    print(f"  all-reduce: {comm['latency_us']:.1f} us + bytes / {comm['bus_bandwidth_gbps']:.0f} GB/s "
          f"({comm['name']})")
    print(f"    {'':16} {'syncs':>5} {'TTFT ms':>9} {'/TP':>5} {'comm%':>6} {'TPOT ms':>9} {'/TP':>5} "
          f"{'comm%':>6} | paper TTFT  TPOT")
    for name, row in rows.items():
        paper = PAPER.get(name, {})
        paper_text = f"{paper['ttft_ms']:>10.1f} {paper['tpot_ms']:>5.2f}" if paper else f"{'–':>10} {'–':>5}"
        print(f"    {name:16} {row['syncs']:>5} {row['ttft_ms']:>9.2f} {row['ttft_vs_tp']:>5.2f} "
              f"{100 * row['ttft_comm_share']:>5.1f}% {row['tpot_ms']:>9.3f} {row['tpot_vs_tp']:>5.2f} "
              f"{100 * row['tpot_comm_share']:>5.1f}% | {paper_text}")


def print_paper(config: PTConfig, implied: dict) -> None:
    paper_ratio = {key: PAPER["pt_D8"][key] / PAPER["tensor_parallel"][key] for key in ("ttft_ms", "tpot_ms")}
    paper_throughput = PAPER["pt_D8"]["throughput_tok_s"] / PAPER["tensor_parallel"]["throughput_tok_s"]
    print(f"\npaper (vLLM, 8x H100, 30B): PT D=8 / TP: TTFT {paper_ratio['ttft_ms']:.2f}, TPOT "
          f"{paper_ratio['tpot_ms']:.3f}; throughput 4096 in / 128 out "
          f"{PAPER['tensor_parallel']['throughput_tok_s']:.0f} -> {PAPER['pt_D8']['throughput_tok_s']:.0f} tok/s "
          f"({100 * (paper_throughput - 1):+.1f} %), 1024 in / 4096 out -6.6 % (not projected: "
          "it depends on the engine's batching)")
    print(f"if TP and PT computed the same, the paper's {implied['saved_all_reduces']} saved all-reduces cost "
          f"{implied['decode_all_reduce_us']:.1f} us each in decode (latency) and "
          f"{implied['prefill_all_reduce_us']:.0f} us each in prefill ({1024 * config.hidden_size * 2 / 1e6:.1f} MB: "
          f"bus bandwidth {implied['implied_bus_bandwidth_gbps']:.0f} GB/s)")


def main():
    parser = build_parser()
    args = parser.parse_args()
    if args.json:
        check_output_file(args.json, "the projection")
    config = PTConfig(**read_json_file(args.config, "--config"))
    try:
        check_track_split(config.num_tracks, args.world_size, f"--world-size {args.world_size}")
    except ValueError as error:
        parser.error(str(error))
    sources = compute_sources(config, args, parser)
    print_assumptions(config, args)
    implied = implied_by_paper(config, args)
    comm_models = [
        {"name": "flags", "latency_us": args.latency_us, "bus_bandwidth_gbps": args.bus_bandwidth_gbps},
        {"name": "implied by the paper's own TP -> PT D=8 differences (reproduces its D=8 deltas by construction)",
         "latency_us": implied["decode_all_reduce_us"], "bus_bandwidth_gbps": implied["implied_bus_bandwidth_gbps"]},
    ]
    results = {"assumptions": vars(args), "compute": sources, "comm_models": comm_models, "projection": [],
               "paper": PAPER, "implied_by_paper": implied}
    for compute_source in sources:
        print(f"\ncompute: {compute_source['source']}")
        ms = {key: 1e3 * value for key, value in compute_source.items() if key.endswith("_s")}
        print(f"  per layer: prefill {ms['layer_prefill_s']:.3f} ms, decode {ms['layer_decode_s']:.3f} ms; fixed: "
              f"prefill {ms['fixed_prefill_s']:.3f} ms, decode {ms['fixed_decode_s']:.3f} ms")
        for comm in comm_models:
            rows = project(config, compute_source, comm, args)
            results["projection"].append({"compute": compute_source["source"], "comm": comm, "rows": rows})
            print_projection(comm, rows)
    print_paper(config, implied)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
