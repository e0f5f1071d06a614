"""Start ONE vLLM engine on a model directory, run every offline check against it, print the answers as JSON.

Run as `python vllm_engine_worker.py JOB.json` (a child process, so the test can kill the engine's whole process
group on a hang). The job gives the model directory, tensor_parallel_size, vLLM's hf_overrides and the prompts
(token ids), and optionally a LoRA adapter folder that every request then names. The answers:
greedy tokens of every prompt alone and of all prompts in one batch, prompt logprobs, two seeded samples, the
collectives each rank ran per model forward (eager engines), what each rank loaded, whether vLLM compiled the model
and which quantization method every linear layer got.
"""

import collections
import functools
import json
import resource
import sys


def count_collectives(worker) -> None:
    """Installed in every worker by `collective_rpc`: tally the tensor-parallel group's collectives run inside each
    model forward and each logits computation (the engine's own broadcasts between steps are not counted)."""
    from vllm.distributed.parallel_state import GroupCoordinator

    model = worker.model_runner.get_model()
    tally = {"forward": [], "compute_logits": []}
    active: list[collections.Counter] = []

    def counted(op_name):
        original = getattr(GroupCoordinator, op_name)

        def wrapper(group, *args, **kwargs):
            if active and group.unique_name.startswith("tp"):
                active[-1][op_name] += 1
            return original(group, *args, **kwargs)

        return wrapper

    for op_name in ("all_reduce", "all_gather", "gather", "reduce_scatter", "broadcast"):
        setattr(GroupCoordinator, op_name, counted(op_name))

    def window(name, method):
        def wrapper(*args, **kwargs):
            active.append(collections.Counter())
            try:
                return method(*args, **kwargs)
            finally:
                tally[name].append(dict(active.pop()))

        return wrapper

    model.forward = window("forward", model.forward)
    model.compute_logits = window("compute_logits", model.compute_logits)
    worker.collective_tally = tally


def read_collectives(worker) -> dict:
    return worker.collective_tally


def loaded_weights(worker) -> dict:
    """What this rank loaded: its tracks and layers, the shape of every checkpoint tensor it read (vLLM's CPU linear
    layers repack their weights after loading, so the parameters no longer show it), the bytes it read, its peak
    RSS."""
    model = worker.model_runner.get_model()
    return {
        "tracks": [model.local_tracks.start, model.local_tracks.stop],
        "layers": [model.model.stage_layers.start, model.model.stage_layers.stop],
        "shapes": model.read_shapes,
        "bytes_read": model.bytes_read,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def compile_state(worker) -> dict:
    """Whether vLLM compiled the model in this worker: the compilation mode, and the decorated module's own state (a
    compiled artifact loaded from vLLM's cache would show as `aot_compiled_fn`; the tests give each engine an empty
    cache)."""
    from vllm.compilation.counter import compilation_counter

    model = worker.model_runner.get_model().model
    return {
        "mode": worker.vllm_config.compilation_config.mode.name,
        "models_seen": compilation_counter.num_models_seen,
        "do_not_compile": bool(getattr(model, "do_not_compile", True)),
        "compiled": bool(getattr(model, "compiled", False) or getattr(model, "aot_compiled_fn", None) is not None),
    }


def quantized_layers(worker) -> dict:
    """The quantization method of every linear layer and fused-MoE expert layer of this rank."""
    from vllm.model_executor.layers.linear import LinearBase

    methods = {}
    for name, module in worker.model_runner.get_model().named_modules():
        if isinstance(module, LinearBase) or type(module).__name__ == "RoutedExperts":
            methods[name] = type(module.quant_method).__name__
    return methods


def main(job_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    job = json.loads(open(job_path).read())
    lora = LoRARequest("adapter", 1, job["lora"]) if job.get("lora") else None
    llm = LLM(model=job["model"], tensor_parallel_size=job["tensor_parallel_size"],
              pipeline_parallel_size=job.get("pipeline_parallel_size", 1), dtype=job.get("dtype", "float32"),
              enforce_eager=job.get("enforce_eager", True), quantization=job.get("quantization"),
              max_model_len=job["max_model_len"], seed=0, hf_overrides=job["hf_overrides"],
              enable_lora=lora is not None, max_lora_rank=job.get("max_lora_rank", 16))
    generate = functools.partial(llm.generate, use_tqdm=False, lora_request=lora)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    pt_model = job.get("pt_model", True)
    answers = {"loaded": llm.collective_rpc(loaded_weights) if pt_model else None,
               "compile_state": llm.collective_rpc(compile_state) if pt_model else None,
               "quantized_layers": llm.collective_rpc(quantized_layers)}

    # compiled graphs run the collectives without calling the Python wrappers that count them
    count = job.get("enforce_eager", True)
    if count:
        llm.collective_rpc(count_collectives)
    answers["solo"] = [generate([prompt], greedy)[0].outputs[0].token_ids for prompt in prompts]
    answers["collectives"] = llm.collective_rpc(read_collectives) if count else None
    answers["batch"] = [out.outputs[0].token_ids for out in generate(prompts, greedy)]

    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    answers["prompt_logprobs"] = [
        [None] + [next(iter(position.values())).logprob for position in out.prompt_logprobs[1:]]
        for out in generate(prompts, scoring)
    ]
    sampling = [SamplingParams(temperature=1.0, max_tokens=job["max_tokens"], seed=seed, ignore_eos=True)
                for seed in (1, 1, 2)]
    answers["sampled"] = [generate(prompts[:1], params)[0].outputs[0].token_ids
                          for params in sampling]
    print("ANSWERS " + json.dumps(answers), flush=True)


if __name__ == "__main__":  # vLLM starts its workers by spawn: they re-import this module
    main(sys.argv[1])
