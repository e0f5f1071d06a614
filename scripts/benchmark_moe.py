#!/usr/bin/env python
"""One device: PT-MoE against the dense PT model with the same ACTIVE parameters (issue 7: throughput >= 0.9x).

A thin entry point to scripts/benchmark.py, which measures this as its `pt_moe` variant: every layer sparse, top-2
of 8 experts per track of width `intermediate_size_per_track / 2`, so a token runs the dense PT model's FFN
parameters (the routers are the only extra), against pt_D2, both merged every 2 layers; prefill (TTFT), decode
(TPOT) and throughput at a larger batch, medians of interleaved repeats, and the ratios pt_moe / pt_D2. The shape is
AFM PT-MoE's proportions (tamm 0.2.0) at a quarter of its width: 4 tracks, attention width per track d/4, 4 query
and 4 KV heads per track, expert width 1.4375 d (736 at d=512). Every benchmark.py flag passes through and overrides
these defaults; one run times one experts kernel, so compare kernels with one run per --experts-implementation:

    python scripts/benchmark_moe.py                                   # transformers' default kernel (grouped_mm)
    python scripts/benchmark_moe.py --experts-implementation eager    # the faster one on CPU
    torchrun --nproc-per-node 2 scripts/benchmark_moe.py              # the tracks split over 2 ranks
"""

import sys

from benchmark import main  # this script's directory is on sys.path


MOE = ["--num-tracks", "4", "--layers", "4", "--hidden-size", "512", "--heads", "16", "--kv-heads", "16",
       "--intermediate-size", "5888", "--vocab-size", "4096", "--experts", "8", "--experts-per-tok", "2",
       "--depths", "2", "--moe-depth", "2", "--variants", "pt_D2", "pt_moe",
       "--batch", "4", "--prompt-len", "256", "--new-tokens", "17", "--out", "benchmark-results/moe"]


if __name__ == "__main__":
    sys.exit(main(MOE + sys.argv[1:]))
