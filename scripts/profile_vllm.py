"""Where a vLLM decode step spends its time: torch's profiler inside the worker (rank 0).

    .venv-vllm/bin/python scripts/profile_vllm.py                  # W=1, PT against vLLM's Llama, compiled
    .venv-vllm/bin/python scripts/profile_vllm.py --enforce-eager
    .venv-vllm/bin/python scripts/profile_vllm.py --tensor-parallel-size 2 --models pt pt_tensor_parallel

The models are `benchmark_vllm.py`'s (same shape flags). Each engine generates one warm-up request, then the profiled
one (a 16-token prompt, 64 new tokens); the table lists the operators by self time, and the summary line the GEMM
calls (`onednn_mm` on CPU), the all_reduces and the total, per generated token (the prefill included).
"""

import argparse
import os
import tempfile
from pathlib import Path

import benchmark_vllm


def start_profiler(worker) -> None:
    import torch

    worker.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    worker.profiler.__enter__()


def stop_profiler(worker) -> tuple[str, dict]:
    worker.profiler.__exit__(None, None, None)
    averages = worker.profiler.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
    return table, {event.key: (event.count, event.self_cpu_time_total) for event in averages}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--models", nargs="+", choices=list(benchmark_vllm.MODELS), default=["pt", "llama"])
    args, shape_argv = parser.parse_known_args(argv)
    shape = benchmark_vllm.parse_args(["--tensor-parallel-size", "1", *shape_argv])  # W=1 unless given
    shape.num_tracks = shape.num_tracks or max(2, shape.tensor_parallel_size)
    world_size = shape.tensor_parallel_size
    if world_size > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(core) for core in range(world_size)))
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of the functions above
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with tempfile.TemporaryDirectory() as tmp:
        paths = benchmark_vllm.save_models(shape, Path(tmp))
        for name in args.models:
            checkpoint, hf_overrides = benchmark_vllm.MODELS[name]
            llm = LLM(model=str(paths[checkpoint]), tensor_parallel_size=world_size, dtype="float32",
                      max_model_len=1024, enforce_eager=args.enforce_eager, skip_tokenizer_init=True, seed=0,
                      kv_cache_memory_bytes=shape.kv_cache_mib << 20, hf_overrides=hf_overrides)
            prompt = TokensPrompt(prompt_token_ids=list(range(1, 17)))
            params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
            llm.generate([prompt], params, use_tqdm=False)
            llm.collective_rpc(start_profiler)
            llm.generate([prompt], params, use_tqdm=False)
            table, events = llm.collective_rpc(stop_profiler)[0]
            llm.llm_engine.engine_core.shutdown()
            gemm_calls, gemm_us = events.get("_C::onednn_mm", (0, 0.0))
            reduces = [value for key, value in events.items() if "allreduce" in key.replace("_", "").lower()]
            reduce_calls, reduce_us = sum(calls for calls, _ in reduces), sum(self_us for _, self_us in reduces)
            total_us = sum(self_us for _, self_us in events.values())
            steps = args.new_tokens
            print(f"===== {name}: per generated token {gemm_calls / steps:.0f} GEMM calls, {gemm_us / steps / 1e3:.2f} ms "
                  f"in GEMMs, {reduce_calls / steps:.0f} all_reduce calls, {reduce_us / steps / 1e3:.2f} ms in them, "
                  f"{total_us / steps / 1e3:.2f} ms in all\n{table}", flush=True)


if __name__ == "__main__":  # vLLM starts its workers by spawn: they re-import this module
    main()
