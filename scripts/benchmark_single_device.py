#!/usr/bin/env python
"""One device: does batching the tracks cost anything? PT (n tracks) against transformers' Llama of identical size.

A thin entry point to scripts/benchmark.py, which measures this among its variants: one process, PT with 8 tracks
merged every 8 layers against transformers' `LlamaForCausalLM` holding the same weights, prefill (TTFT), decode
(TPOT) and throughput at a larger batch, medians of interleaved repeats, and the ratios Llama/PT (>= 1.0: batched
tracks cost nothing). Every benchmark.py flag passes through and overrides these defaults.

    python scripts/benchmark_single_device.py
    python scripts/benchmark_single_device.py --device cuda --dtype bfloat16 --hidden-size 2048 --heads 16 ...
"""

import sys

from benchmark import main  # this script's directory is on sys.path


SINGLE_DEVICE = ["--num-tracks", "8", "--kv-heads", "8", "--variants", "pt_D8", "transformers_llama"]


if __name__ == "__main__":
    sys.exit(main(SINGLE_DEVICE + sys.argv[1:]))
