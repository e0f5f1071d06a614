#!/usr/bin/env python
"""One device: does batching the tracks cost anything? PT (n tracks) against transformers' Llama of identical size.

Both models get the same d, H, K, I, L, vocabulary and attention back-end; PT runs its n tracks as batched matmuls.
For forward (prefill) and greedy generate() at each batch size, it times both models alternately, several repeats
after warm-up, and prints medians and the throughput ratio PT/Llama (1.0 = batched tracks are free).

    python scripts/benchmark_single_device.py                      # CPU defaults
    python scripts/benchmark_single_device.py --device cuda --dtype bfloat16 --hidden-size 2048 ...
"""

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_ptt import PTConfig, PTForCausalLM


def build_models(args) -> tuple[PTForCausalLM, LlamaForCausalLM]:
    shape = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 8,
    )
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    pt = PTForCausalLM(PTConfig(**shape, num_tracks=args.num_tracks, track_block_depth=args.track_block_depth))
    llama = LlamaForCausalLM(LlamaConfig(**shape))
    for model in (pt, llama):
        model.config._attn_implementation = args.attn_implementation
    assert sum(p.numel() for p in pt.parameters()) - sum(p.numel() for p in llama.parameters()) == (
        2 * args.layers * args.hidden_size * (args.num_tracks - 1)
    ), "the two models must differ only by the extra per-track norm vectors"
    return pt.to(args.device, dtype).eval(), llama.to(args.device, dtype).eval()


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(models: dict, work: dict, args) -> dict:
    """Alternate the models within every repeat so slow drifts of the machine hit both alike."""
    times = {name: [] for name in models}
    for repeat in range(args.warmup + args.repeats):
        for name, model in models.items():
            elapsed = timed(lambda: work["run"](model), args.device)
            if repeat >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    tokens = work["tokens"]
    return {
        "task": work["name"],
        "batch": work["batch"],
        **{f"{name}_median_s": medians[name] for name in models},
        **{f"{name}_tokens_per_s": tokens / medians[name] for name in models},
        "ratio_pt_over_llama": medians["llama"] / medians["pt"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-tracks", type=int, default=8)
    parser.add_argument("--track-block-depth", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--intermediate-size", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    pt, llama = build_models(args)
    models = {"pt": pt, "llama": llama}
    print(f"PT n={args.num_tracks} vs Llama: d={args.hidden_size} I={args.intermediate_size} L={args.layers} "
          f"H={args.heads} K={args.kv_heads} V={args.vocab_size}, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (medians)")
    results = []
    with torch.inference_mode():
        for batch in args.batch_sizes:
            prompt = torch.randint(0, args.vocab_size, (batch, args.prompt_len), device=args.device)
            short = prompt[:, :16]
            for work in (
                dict(name="forward", batch=batch, tokens=batch * args.prompt_len, run=lambda m: m(prompt)),
                dict(name="generate", batch=batch, tokens=batch * args.new_tokens,
                     run=lambda m: m.generate(short, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                              do_sample=False)),
            ):
                row = compare(models, work, args)
                results.append(row)
                print(f"{row['task']:>8} batch {batch:>2}: PT {row['pt_tokens_per_s']:9.1f} tok/s, "
                      f"Llama {row['llama_tokens_per_s']:9.1f} tok/s, ratio PT/Llama {row['ratio_pt_over_llama']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
