"""PT served by vLLM against the same weights in tensor-parallel mode and against vLLM's own dense Llama.

    python scripts/benchmark_vllm.py --out docs/performance/vllm            # CPU: W=2 (and W=1) on 2 cores
    python scripts/benchmark_vllm.py --device cuda --tensor-parallel-size 8 --hidden-size 4096 ...   # GPUs

Models, all of one shape (random weights: speed does not depend on them):
  - "pt": PT with `track_block_depth` D (ceil(L/D) all_reduces per forward),
  - "pt_vocab_parallel_head": "pt" with its LM head's vocabulary split over the ranks (one all_gather of the
    logits per step instead of the whole head's matmul on every rank; W > 1 only),
  - "pt_tensor_parallel": the same weights with `sync_mode="tensor_parallel"` (2L all_reduces, dense maths),
  - "llama": vLLM's own `LlamaForCausalLM` of equal d, H, K, I, L, run with vLLM's tensor parallelism
    (2L all_reduces plus a vocab-parallel embedding and LM head).
Two request mixes, the paper's two regimes scaled down: long prompt / short answer and short prompt / long answer.
Per mix: TTFT (latency of one request with max_tokens=1), TPOT ((latency with max_tokens=N - TTFT) / (N - 1)) and
request throughput (a batch of requests submitted together). Engines run one after another, in order and then in
reverse order (each started twice, its repeats interleaved over the mixes); medians (and the 10th-90th percentile
spread) are taken over both; ratios are of medians, against "pt_tensor_parallel" and "llama" of the same run. Every
group runs in each of `--modes`: "eager" (`enforce_eager=True`) and "compiled" (vLLM's default compilation: on CPU
one Inductor compile of the whole model; on GPUs piecewise compilation and CUDA graphs). At W=1, PT (the rank holds
all tracks) is compared with the Llama of equal size.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


MIXES = {"long_prompt_short_answer": (256, 8), "short_prompt_long_answer": (16, 64)}
# name: (checkpoint, vLLM hf_overrides)
MODELS = {
    "pt": ("pt", {}),
    "pt_vocab_parallel_head": ("pt", {"lm_head_placement": "vocab_parallel"}),
    "pt_tensor_parallel": ("pt_tensor_parallel", {}),
    "llama": ("llama", {}),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--skip-single", action="store_true", help="skip the W=1 comparison")
    parser.add_argument("--num-tracks", type=int, default=None, help="default: the tensor-parallel size")
    parser.add_argument("--track-block-depth", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--num-hidden-layers", type=int, default=16)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-key-value-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--batch", type=int, default=8, help="requests per throughput measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="KV cache per worker")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["pt", "pt_tensor_parallel"],
                        help="the engines to run at W > 1 (ratios are given where both sides ran)")
    parser.add_argument("--single-models", nargs="+", choices=["pt", "llama"], default=["pt", "llama"],
                        help="the engines to run at W=1")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--out", type=Path, default=Path("benchmark-results/vllm"))
    return parser.parse_args(argv)


def save_models(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    """The three checkpoints: PT at D, the same weights in tensor-parallel mode, a Llama of equal shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_ptt import PTConfig, PTForCausalLM

    shape = dict(vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                 num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
                 num_key_value_heads=args.num_key_value_heads, head_dim=args.head_dim,
                 max_position_embeddings=1024)
    torch.manual_seed(0)
    num_tracks = args.num_tracks or args.tensor_parallel_size
    pt = PTForCausalLM(PTConfig(**shape, num_tracks=num_tracks, track_block_depth=args.track_block_depth))
    paths = {name: root / name for name in ("pt", "pt_tensor_parallel", "llama")}
    pt.save_pretrained(paths["pt"])
    pt.config.sync_mode = "tensor_parallel"
    pt.save_pretrained(paths["pt_tensor_parallel"])
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(paths["llama"])
    return paths


def latency(llm, prompt, max_tokens: int, batch: int = 1) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    llm.generate([prompt] * batch, params, use_tqdm=False)
    return time.perf_counter() - start


def measure(llm, prompt_len: int, answer_len: int, batch: int) -> dict[str, float]:
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=[(7 * i + 3) % 1000 + 1 for i in range(prompt_len)])
    ttft = latency(llm, prompt, 1)
    full = latency(llm, prompt, answer_len)
    return {"ttft_s": ttft, "tpot_s": (full - ttft) / (answer_len - 1),
            "throughput_req_s": batch / latency(llm, prompt, answer_len, batch)}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[int(q * 10) - 1] if len(values) > 1 else values[0]


def run_group(args, paths: dict[str, Path], names: list[str], world_size: int, compiled: bool) -> tuple[dict, dict]:
    """One engine at a time (several vLLM engines at once do not fit a shared machine's memory): start it, run the
    repeats with the mixes interleaved, shut it down. The engines run in order and then in reverse order (an engine
    that runs later was measured faster here whatever it was); medians and 10th/90th percentiles per model and mix
    pool both runs."""
    from vllm import LLM

    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    runs = {name: {mix: [] for mix in MIXES} for name in names}
    for name in [*names, *reversed(names)]:
        checkpoint, hf_overrides = MODELS[name]
        llm = LLM(model=str(paths[checkpoint]), tensor_parallel_size=world_size, dtype=dtype, max_model_len=1024,
                  enforce_eager=not compiled, skip_tokenizer_init=True, seed=0,
                  kv_cache_memory_bytes=args.kv_cache_mib << 20, hf_overrides=hf_overrides)
        for repeat in range(args.repeats + 1):  # the first round warms the engine up and is dropped
            for mix, (prompt_len, answer_len) in MIXES.items():
                result = measure(llm, prompt_len, answer_len, args.batch)
                if repeat:
                    runs[name][mix].append(result)
        llm.llm_engine.engine_core.shutdown()

    def summary(statistic) -> dict:
        return {name: {mix: {key: statistic([run[key] for run in by_repeat]) for key in by_repeat[0]}
                       for mix, by_repeat in by_mix.items()} for name, by_mix in runs.items()}

    spread = {"p10": summary(lambda values: percentile(values, 0.1)),
              "p90": summary(lambda values: percentile(values, 0.9))}
    return summary(statistics.median), spread


def ratios(medians: dict, pairs: list[tuple[str, str]]) -> dict:
    """model / baseline per mix, for the pairs that both ran: below 1 is better for TTFT and TPOT, above 1 for
    throughput."""
    return {f"{model} / {baseline}": {mix: {key: medians[model][mix][key] / medians[baseline][mix][key]
                                             for key in medians[model][mix]} for mix in MIXES}
            for model, baseline in pairs if model in medians and baseline in medians}


def markdown(report: dict) -> str:
    lines = [f"# PT in vLLM ({report['device']})", "", f"Shape: `{json.dumps(report['shape'])}`", ""]
    for group, result in report["groups"].items():
        lines += [f"## {group}", "", "Medians, with the 10th-90th percentile range of the repeats.", "",
                  "| model | mix | TTFT ms | TPOT ms | throughput req/s |", "|---|---|---|---|---|"]
        low, high = result["spread"]["p10"], result["spread"]["p90"]
        for name, by_mix in result["medians"].items():
            for mix, m in by_mix.items():
                cells = [f"{m[key] * scale:.{digits}f} ({low[name][mix][key] * scale:.{digits}f}-"
                         f"{high[name][mix][key] * scale:.{digits}f})"
                         for key, scale, digits in (("ttft_s", 1e3, 1), ("tpot_s", 1e3, 2), ("throughput_req_s", 1, 2))]
                lines.append(f"| {name} | {mix} | " + " | ".join(cells) + " |")
        lines += ["", "| ratio | mix | TTFT | TPOT | throughput |", "|---|---|---|---|---|"]
        for label, by_mix in result["ratios"].items():
            for mix, r in by_mix.items():
                lines.append(f"| {label} | {mix} | {r['ttft_s']:.3f} | {r['tpot_s']:.3f} | "
                             f"{r['throughput_req_s']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (s)"), ("throughput_req_s", "throughput (req/s)")]
    groups = list(report["groups"].items())
    fig, axes = plt.subplots(len(groups), len(keys), figsize=(4 * len(keys), 3.2 * len(groups)), squeeze=False)
    for row, (group, result) in zip(axes, groups):
        names = list(result["medians"])
        for ax, (key, label) in zip(row, keys):
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                values = [result["medians"][name][mix][key] for mix in MIXES]
                ax.bar([x + i * width for x in range(len(MIXES))], values, width, label=name)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(MIXES))], [m.replace("_", " ") for m in MIXES],
                          fontsize=7)
            ax.set_title(f"{group}: {label}", fontsize=9)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    W = args.tensor_parallel_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_models(args, Path(tmp))
        shape = json.loads((paths["pt"] / "config.json").read_text())
        report = {"device": args.device, "repeats": args.repeats, "batch": args.batch, "mixes": MIXES,
                  "shape": {key: shape[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                        "num_attention_heads", "num_key_value_heads", "head_dim",
                                                        "vocab_size", "num_tracks", "track_block_depth")},
                  "groups": {}}
        for mode in args.modes:
            compiled = mode == "compiled"
            if W > 1:
                if args.device == "cpu":
                    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in range(W))
                medians, spread = run_group(args, paths, args.models, W, compiled)
                report["groups"][f"W={W}, {mode}"] = {"medians": medians, "spread": spread, "ratios": ratios(
                    medians, [("pt", "pt_tensor_parallel"), ("pt", "llama"), ("pt_vocab_parallel_head", "pt")])}
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            if not args.skip_single:
                medians, spread = run_group(args, paths, args.single_models, 1, compiled)
                report["groups"][f"W=1, {mode}"] = {"medians": medians, "spread": spread,
                                                    "ratios": ratios(medians, [("pt", "llama")])}
    (args.out / "benchmark_vllm.json").write_text(json.dumps(report, indent=2))
    (args.out / "benchmark_vllm.md").write_text(markdown(report))
    plot(report, args.out / "benchmark_vllm.png")
    print(markdown(report))
    return report


if __name__ == "__main__":  # vLLM starts its workers by spawn: they re-import this module
    main()
