#!/usr/bin/env python
"""PT-MoE against the dense PT model with the same ACTIVE parameters, on one device.

The PT-MoE model has `--experts` experts of width `--expert-width` per track on every layer and uses `--top-k` of
them per token; the dense PT model has the same tracks, attention and depth with a per-track FFN of width
`top_k * expert_width`, so both run the same FFN parameters per token (the MoE adds only its routers). Both models run
the same forward over a `batch x seq_len` prompt (prefill) and a few cached one-token steps (decode), the MoE once
per experts implementation of transformers' experts interface (`--experts-implementations`), alternating between all
of them in every repeat. The script prints the median throughput of each and the ratio MoE / dense, by the wall clock
and by the CPU time of the (single) compute thread, which a machine shared with other jobs inflates far less. Run
with `OMP_NUM_THREADS=1` for the CPU-time figures to cover all the work.

The defaults are AFM PT-MoE's proportions (tamm 0.2.0) at a quarter of its width: attention width per track d/4,
4 query and 4 KV heads per track, expert width 1.4375 d (2944 / 2048) and a dense FFN of top_k * expert_width.
"""

import argparse
import statistics
import time

import torch

from modeling_ptt import PTConfig, PTForCausalLM
from modeling_ptt.modeling_ptt import CACHE_FIELD


CLOCKS = {"wall": time.perf_counter, "thread cpu": time.thread_time}


def build(args, sparse: bool) -> PTForCausalLM:
    n = args.num_tracks
    moe = dict(num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width)
    config = PTConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads_per_track * n, num_key_value_heads=args.kv_heads_per_track * n,
        head_dim=args.hidden_size // (args.heads_per_track * n), num_tracks=n, track_block_depth=args.block_depth,
        intermediate_size=n * args.top_k * args.expert_width, max_position_embeddings=args.seq_len + args.decode_steps,
        bos_token_id=None, eos_token_id=None, **(moe if sparse else {}),
    )
    return PTForCausalLM(config).to(args.dtype).eval()


def active_parameters(model: PTForCausalLM) -> int:
    """Parameters a token uses: all of them but the experts it is not routed to."""
    config = model.config
    unused_share = 1 - config.num_experts_per_tok / config.num_experts if config.num_experts else 0.0
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return sum(p.numel() for p in model.parameters()) - round(experts * unused_share)


def seconds(run) -> dict[str, float]:
    """`run()`'s duration by every clock."""
    start = {name: clock() for name, clock in CLOCKS.items()}
    run()
    return {name: clock() - start[name] for name, clock in CLOCKS.items()}


@torch.no_grad()
def prefill(model: PTForCausalLM, input_ids: torch.Tensor) -> dict[str, float]:
    return seconds(lambda: model(input_ids, use_cache=False, logits_to_keep=1))


@torch.no_grad()
def decode(model: PTForCausalLM, input_ids: torch.Tensor, steps: int) -> dict[str, float]:
    out = model(input_ids, logits_to_keep=1)

    def steps_from_prompt():
        nonlocal out
        for _ in range(steps):
            out = model(out.logits.argmax(-1), **{CACHE_FIELD: getattr(out, CACHE_FIELD)})

    return seconds(steps_from_prompt)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-tracks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block-depth", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--heads-per-track", type=int, default=4)
    parser.add_argument("--kv-heads-per-track", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8, help="experts per track")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-width", type=int, default=736)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--experts-implementations", nargs="+", default=["grouped_mm", "eager"],
                        choices=["grouped_mm", "batched_mm", "eager"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    dense, moe = build(args, sparse=False), build(args, sparse=True)
    input_ids = torch.randint(0, args.vocab_size, (args.batch, args.seq_len))
    for name, model in (("dense", dense), ("moe", moe)):
        print(f"{name:5s}: {active_parameters(model):,} active of {sum(p.numel() for p in model.parameters()):,} "
              f"parameters")
    print(f"{args.num_tracks} tracks x {args.layers} layers, d={args.hidden_size}; MoE: top-{args.top_k} of "
          f"{args.experts} experts of width {args.expert_width} per track; dense: FFN width "
          f"{args.top_k * args.expert_width} per track; batch {args.batch} x {args.seq_len} tokens; {args.dtype}, "
          f"{torch.get_num_threads()} threads")

    # (name, model, experts implementation); the MoE model switches implementation between its runs
    variants = [("dense", dense, None)] + [(f"moe {impl}", moe, impl) for impl in args.experts_implementations]
    timings = {(name, phase): [] for name, _, _ in variants for phase in ("prefill", "decode")}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, model, experts_implementation in variants:
            if experts_implementation is not None:
                model.set_experts_implementation(experts_implementation)
            for phase, timing in (("prefill", prefill(model, input_ids)),
                                  ("decode", decode(model, input_ids, args.decode_steps))):
                if repeat:
                    timings[name, phase].append(timing)

    tokens = {"prefill": args.batch * args.seq_len, "decode": args.batch * args.decode_steps}
    for phase in ("prefill", "decode"):
        for clock in CLOCKS:
            throughput = {
                name: tokens[phase] / statistics.median(t[clock] for t in timings[name, phase])
                for name, _, _ in variants
            }
            moe_figures = ", ".join(
                f"{name} {throughput[name]:6.0f} tok/s = {throughput[name] / throughput['dense']:.3f}x"
                for name, _, _ in variants[1:]
            )
            print(f"{phase:7s} ({clock:10s}, median of {args.repeats}): dense {throughput['dense']:6.0f} tok/s; "
                  f"{moe_figures}")

if __name__ == "__main__":
    main()
