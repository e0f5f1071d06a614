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
saved by rank 0 and loaded by every rank as its tracks' slices, as the PT model is. It is merged at the same D as
pt_D{--moe-depth}, pt_D8 by default, and the report gives pt_moe / pt_D{D} for TTFT, TPOT and throughput; the issue's
target is a throughput of at least 0.9x (so latencies of at most 1/0.9 = 1.11x). --experts-implementation picks
transformers' experts kernel (eager, batched_mm, grouped_mm; default: transformers' own default).

With W ranks (`torchrun --nproc-per-node W`, or `accelerate launch`) every rank holds n/W tracks and a merge is one
all_reduce; the Llama runs transformers' DTensor tensor parallelism. A request is a prefill of P tokens at batch B
(its latency is the TTFT) and greedy decoding of T new tokens with a KV cache (the median step is the TPOT); the
throughput is generated tokens per second of a whole request at a larger batch. The variants take turns within
every repeat, so a drift of the machine hits them all alike; ratios are taken within this one run.

    python scripts/benchmark.py --quick                                    # seconds: the CI smoke test
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 scripts/benchmark.py --out results/w2
    python scripts/benchmark.py --experts 8 --variants pt_D8 pt_moe            # PT-MoE against dense PT, one device
    python scripts/benchmark.py --num-tracks 8 --kv-heads 8 --out results/w1
    python scripts/benchmark.py --device cuda --dtype bfloat16 --cache static --compile ...   (see gpu_check.sh)

Writes PREFIX.json (everything, including the exact command, versions and the counted collectives), PREFIX.md
(the table) and PREFIX.png (latency against D, with the TP, bound and transformers lines). Exits 1 if the outputs
of PT in tensor-parallel layout and of the Llama disagree (or compiled and eager ones), after writing the files.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from tqdm.auto import tqdm
from transformers import DistributedConfig, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from collectives import CollectiveCounter
from modeling_ptt import PTConfig, PTForCausalLM
from modeling_ptt.distributed_ptt import init_track_parallel
from modeling_ptt.modeling_ptt import CACHE_FIELD
from script_io import check_output_dir


ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "modeling_ptt/benchmark/1"
# --quick: a tiny model and workload for the CI smoke test; flags given explicitly still win.
QUICK = dict(layers=4, hidden_size=64, intermediate_size=128, heads=4, kv_heads=2, vocab_size=128, num_tracks=2,
             batch=1, prompt_len=8, new_tokens=4, throughput_batch=2, warmup=1, repeats=2)
# pt_moe's throughput must be at least this share of the dense PT model's at the same D (issue 7)
MOE_THROUGHPUT_TARGET = 0.9
# Relative error of the logits (max |a - b| / max |b|) tolerated between two computations of the same function.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@dataclasses.dataclass(frozen=True)
class Variant:
    """What is measured: the PT weights (or the PT-MoE model) under one merge schedule, or the dense Llama."""

    name: str
    model: str  # "pt" | "pt_moe" | "llama"
    sync_mode: str | None = None
    track_block_depth: int | None = None

    def expected_merges(self, layers: int) -> int | None:
        """All-reduces of one PT forward when the tracks sit on several ranks (None for the Llama)."""
        if self.model == "llama":
            return None
        return 2 * layers if self.sync_mode == "tensor_parallel" else math.ceil(layers / self.track_block_depth)


def plan_variants(depths: list[int], layers: int, selected: list[str] | None, moe_depth: int | None) -> list[Variant]:
    """Every variant, or the `selected` ones; pt_moe only with a `moe_depth` (that is, when --experts is given)."""
    variants = [
        Variant("tensor_parallel", "pt", "tensor_parallel", 1),
        *(Variant(f"pt_D{depth}", "pt", "track_block", depth) for depth in depths),
        Variant("no_sync_bound", "pt", "track_block", layers),
        Variant("transformers_llama", "llama"),
        *([Variant("pt_moe", "pt_moe", "track_block", moe_depth)] if moe_depth else []),
    ]
    if selected is None:
        return variants
    known = {variant.name: variant for variant in variants}
    unknown = [name for name in selected if name not in known]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(known)} (pt_D* follow --depths, "
                         "pt_moe needs --experts)")
    return [known[name] for name in selected]


@contextlib.contextmanager
def merge_schedule(model: torch.nn.Module, variant: Variant):
    """Run the PT model under the variant's merge schedule: the forward reads these two config fields each call."""
    if variant.model == "llama":
        yield
        return
    config = model.config
    saved = config.sync_mode, config.track_block_depth
    config.sync_mode, config.track_block_depth = variant.sync_mode, variant.track_block_depth
    try:
        yield
    finally:
        config.sync_mode, config.track_block_depth = saved


# --- the ranks and the models ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class World:
    size: int
    rank: int
    device: torch.device

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def gather(self, value) -> list:
        """`value` of every rank, in rank order (a list of one without a launcher)."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values


def start_world(device: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if size == 1:
        return World(1, 0, torch.device(device))
    # the process group and device of PT's track-parallel loading, so the prompts land where the tracks do
    _, rank, track_device = init_track_parallel(size)
    if track_device.type != device:
        raise SystemExit(f"--device {device}: under a launcher the tracks load onto {track_device} (cuda:LOCAL_RANK "
                         "whenever CUDA is visible; CUDA_VISIBLE_DEVICES= keeps them on the CPU)")
    return World(size, rank, track_device)


def llama_config(args) -> LlamaConfig:
    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden_size // args.heads,
        max_position_embeddings=args.prompt_len + args.new_tokens + 8,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = args.attn_implementation
    return config


def moe_config(args, dense: PTConfig) -> PTConfig:
    """The dense PT config with every layer sparse: per track, `args.experts` experts of width I/k (I: the dense FFN
    width per track, k: `args.experts_per_tok`), so the k experts a token uses hold the dense FFN's parameters."""
    top_k = args.experts_per_tok  # divides the width: parse_args checked it
    config = PTConfig.from_dict({**dense.to_dict(), "num_experts": args.experts, "num_experts_per_tok": top_k,
                                 "moe_intermediate_size": dense.intermediate_size_per_track // top_k,
                                 "mlp_layer_types": ["sparse"] * dense.num_hidden_layers})
    config._attn_implementation = dense._attn_implementation  # not in to_dict(); the same attention kernel as PT's
    return config


def seeded_moe(args, dense: PTConfig) -> PTForCausalLM:
    torch.manual_seed(args.seed)
    return PTForCausalLM(moe_config(args, dense))


def build_models(args, world: World, variants: list[Variant]) -> dict[str, torch.nn.Module]:
    """`{"pt": ..., "llama": ...}`: a seeded dense Llama and its exact track layout, the same weights both ways, and
    `"pt_moe"` (seeded) when a variant runs it.

    One process builds them in place. Under a launcher rank 0 saves them, and every rank loads its share the way a
    user would: PT and PT-MoE read their tracks' slices (`distributed_config`), the Llama goes through transformers'
    own TP.
    """
    dtype = getattr(torch, args.dtype)
    sparse = any(variant.model == "pt_moe" for variant in variants)
    if world.size == 1:
        with torch.device(world.device):
            torch.manual_seed(args.seed)
            llama = LlamaForCausalLM(llama_config(args)).to(dtype)
            pt = PTForCausalLM.from_llama(llama, args.num_tracks)
            models = {"pt": pt.eval(), "llama": llama.eval()}
            if sparse:
                models["pt_moe"] = seeded_moe(args, pt.config).to(dtype).eval()
        return with_experts_implementation(args, models)

    # every rank reads rank 0's files: one machine, or a --workdir that all machines share
    workdir = world.gather(tempfile.mkdtemp(prefix="ptt-benchmark-", dir=args.workdir) if world.rank == 0 else None)[0]
    if world.rank == 0:
        torch.manual_seed(args.seed)
        llama = LlamaForCausalLM(llama_config(args))
        llama.save_pretrained(f"{workdir}/llama")
        pt = PTForCausalLM.from_llama(llama, args.num_tracks)
        pt.save_pretrained(f"{workdir}/pt")
        if sparse:
            seeded_moe(args, pt.config).save_pretrained(f"{workdir}/pt_moe")
        del llama, pt
    world.barrier()
    parallel = dict(distributed_config=DistributedConfig(tp_size=world.size), dtype=dtype,
                    attn_implementation=args.attn_implementation)
    models = {"pt": PTForCausalLM.from_pretrained(f"{workdir}/pt", **parallel).eval()}
    if any(variant.model == "llama" for variant in variants):
        models["llama"] = LlamaForCausalLM.from_pretrained(f"{workdir}/llama", **parallel).eval()
    if sparse:
        models["pt_moe"] = PTForCausalLM.from_pretrained(f"{workdir}/pt_moe", **parallel).eval()
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return with_experts_implementation(args, models)


def with_experts_implementation(args, models: dict) -> dict:
    if "pt_moe" in models and args.experts_implementation:
        models["pt_moe"].set_experts_implementation(args.experts_implementation)
    return models


def local_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shard of a DTensor, its tracks of a PT model)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


# --- one request ----------------------------------------------------------------------------------------------


class Requests:
    """Prefill and greedy decode through one model, timed the way a server sees them.

    A static cache is allocated once per model and batch and reset for every request, so a compiled forward keeps
    seeing the same buffers; a dynamic cache is new for every request.
    """

    def __init__(self, args, device: torch.device):
        self.static = args.cache == "static"
        self.max_len = args.prompt_len + args.new_tokens
        self.device = device
        self.static_caches = {}

    def cache(self, key: str, model: torch.nn.Module, batch: int) -> Cache:
        if not self.static:
            return DynamicCache(config=model.config)
        if (key, batch) not in self.static_caches:
            self.static_caches[key, batch] = StaticCache(config=model.config, max_cache_len=self.max_len)
        cache = self.static_caches[key, batch]
        cache.reset()
        return cache

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @staticmethod
    def logits(forward, input_ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Logits of the last position (`logits_to_keep=1`, as generate() asks for them)."""
        return forward(input_ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache}).logits[:, -1]

    def run(self, forward, cache: Cache, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[float], float]:
        """Generate `new_tokens` greedily: the prefill's latency, each decode step's latency, the whole time."""
        self.sync()
        start = time.perf_counter()
        token = self.logits(forward, prompt, cache).argmax(-1, keepdim=True)
        self.sync()
        prefilled = time.perf_counter()
        steps = []
        for _ in range(new_tokens - 1):
            step_start = time.perf_counter()
            token = self.logits(forward, token, cache).argmax(-1, keepdim=True)
            self.sync()
            steps.append(time.perf_counter() - step_start)
        return prefilled - start, steps, time.perf_counter() - start

    def teacher_forced(self, forward, cache: Cache, prompt: torch.Tensor, follow: torch.Tensor) -> torch.Tensor:
        """Logits `[B, 1 + k, V]` of the prefill and of k decode steps fed the given tokens (comparable across
        models)."""
        # cloned: a CUDA-graph replay (torch.compile mode "reduce-overhead") overwrites the previous call's outputs
        outputs = [self.logits(forward, prompt, cache).clone()]
        for column in follow.unbind(1):
            outputs.append(self.logits(forward, column[:, None].contiguous(), cache).clone())  # no stride recompile
        return torch.stack(outputs, 1).float()


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # "5" resets the process's peak RSS (VmHWM), Linux >= 4.0
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def spread(samples_s: list[float]) -> dict:
    """Median and spread of latencies in milliseconds."""
    ms = sorted(1000 * sample for sample in samples_s)
    p10, p90 = (statistics.quantiles(ms, n=10, method="inclusive")[i] for i in (0, 8)) if len(ms) > 1 else ms * 2
    return {"median": statistics.median(ms), "p10": p10, "p90": p90, "min": ms[0], "max": ms[-1], "n": len(ms)}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


# --- the run --------------------------------------------------------------------------------------------------


def bare_all_reduce(args, world: World, repeats: int = 200) -> dict | None:
    """Latency of one all_reduce of a decode step's and of a prefill's activations, alone: the unit cost of a merge."""
    if world.size == 1:
        return None
    dtype = getattr(torch, args.dtype)
    result = {}
    for phase, tokens in (("decode", 1), ("prefill", args.prompt_len)):
        tensor = torch.zeros(args.batch, tokens, args.hidden_size, dtype=dtype, device=world.device)  # stays finite
        samples = []
        for index in range(repeats + 10):
            start = time.perf_counter()
            dist.all_reduce(tensor)
            if world.device.type == "cuda":
                torch.cuda.synchronize(world.device)
            if index >= 10:
                samples.append(time.perf_counter() - start)
        result[phase] = {"bytes": tensor.numel() * tensor.element_size(), **spread(samples)}
    return result


@dataclasses.dataclass(frozen=True)
class Prompts:
    """What every variant is fed, drawn from the seed: the same on every rank."""

    prompt: torch.Tensor  # [batch, P]: TTFT and TPOT requests
    follow: torch.Tensor  # [batch, 2]: tokens fed after the prompt when outputs are compared
    throughput: torch.Tensor | None  # [throughput_batch, P]

    @classmethod
    def draw(cls, args, device: torch.device) -> "Prompts":
        generator = torch.Generator().manual_seed(args.seed)

        def tokens(batch, length):
            return torch.randint(0, args.vocab_size, (batch, length), generator=generator).to(device)

        return cls(tokens(args.batch, args.prompt_len), tokens(args.batch, 2),
                   tokens(args.throughput_batch, args.prompt_len) if args.throughput_batch else None)


def compile_forwards(args, models: dict) -> dict:
    if not args.compile:
        return dict(models)
    for option in ("recompile_limit", "cache_size_limit"):  # every variant is its own set of guards
        if hasattr(torch._dynamo.config, option):
            setattr(torch._dynamo.config, option, 64)
    return {key: torch.compile(model, mode=args.compile_mode, fullgraph=args.fullgraph)
            for key, model in models.items()}


def probe(args, world: World, variant: Variant, model, forward, requests: Requests, prompts: Prompts):
    """Untimed: the collectives of a prefill and of a decode step (counted on the eager model; a compiled one runs
    the same collectives), the peak memory of a request at the largest batch, and the outputs to compare."""
    checks = []
    with merge_schedule(model, variant), torch.no_grad():
        cache = requests.cache(variant.model, model, args.batch)
        with CollectiveCounter() as prefill_count:
            token = requests.logits(model, prompts.prompt, cache).argmax(-1, keepdim=True)
        with CollectiveCounter() as decode_count:
            requests.logits(model, token, cache)
        eager = requests.teacher_forced(model, requests.cache(variant.model, model, args.batch), prompts.prompt,
                                        prompts.follow)
        reset_peak_memory(world.device)
        largest = prompts.throughput if prompts.throughput is not None else prompts.prompt
        requests.run(forward, requests.cache(variant.model, model, largest.shape[0]), largest, args.new_tokens)
        peak = peak_memory_bytes(world.device)
        if args.compile:
            compiled = requests.teacher_forced(forward, requests.cache(variant.model, model, args.batch),
                                               prompts.prompt, prompts.follow)
            checks.append(check(f"{variant.name}: compiled vs eager", compiled, eager, args.dtype))
    row = dict(
        name=variant.name,
        model=variant.model,
        sync_mode=variant.sync_mode,
        track_block_depth=variant.track_block_depth,
        expected_merges=variant.expected_merges(args.layers) if world.size > 1 else 0,
        collectives={"prefill": dict(prefill_count.ops), "decode": dict(decode_count.ops)},
        peak_memory_bytes_per_rank=world.gather(peak),
        weight_bytes_per_rank=world.gather(local_weight_bytes(model)),
        parameters=sum(p.numel() for p in model.parameters()) if world.size == 1 else None,
    )
    return row, eager, checks


def measure(args, world: World, variants: list[Variant], models: dict) -> tuple[list[dict], list[dict]]:
    requests, prompts = Requests(args, world.device), Prompts.draw(args, world.device)
    forwards = compile_forwards(args, models)
    bar = tqdm(total=len(variants) * (1 + args.warmup + args.repeats), desc=f"rank 0 of {world.size}",
               unit="request", disable=world.rank != 0, file=sys.stdout)

    rows, checks, eager = [], [], {}
    for variant in variants:
        row, eager[variant.name], variant_checks = probe(
            args, world, variant, models[variant.model], forwards[variant.model], requests, prompts)
        rows.append(row)
        checks += variant_checks
        bar.update()
    if "tensor_parallel" in eager and "transformers_llama" in eager:
        checks.append(check("PT tensor_parallel layout vs transformers Llama (same weights)",
                            eager["tensor_parallel"], eager["transformers_llama"], args.dtype))

    # Timed: the variants take turns within every repeat.
    samples = {variant.name: {"ttft": [], "tpot": [], "throughput": []} for variant in variants}
    for repeat in range(args.warmup + args.repeats):
        for variant in variants:
            model, forward = models[variant.model], forwards[variant.model]
            with merge_schedule(model, variant), torch.no_grad():
                world.barrier()
                ttft, steps, _ = requests.run(forward, requests.cache(variant.model, model, args.batch),
                                              prompts.prompt, args.new_tokens)
                if prompts.throughput is not None:
                    world.barrier()
                    _, _, whole = requests.run(forward, requests.cache(variant.model, model, args.throughput_batch),
                                               prompts.throughput, args.new_tokens)
            if repeat >= args.warmup:
                samples[variant.name]["ttft"].append(ttft)
                samples[variant.name]["tpot"].extend(steps)
                if prompts.throughput is not None:
                    samples[variant.name]["throughput"].append(args.throughput_batch * args.new_tokens / whole)
            bar.update()
    bar.close()

    for row in rows:
        mine = samples[row["name"]]
        row["ttft_ms"] = spread(mine["ttft"])
        row["tpot_ms"] = spread(mine["tpot"])
        row["throughput_tokens_per_s"] = (
            {"median": statistics.median(mine["throughput"]), "min": min(mine["throughput"]),
             "max": max(mine["throughput"]), "n": len(mine["throughput"])} if mine["throughput"] else None
        )
        row["median_ms_per_rank"] = world.gather({"ttft": row["ttft_ms"]["median"], "tpot": row["tpot_ms"]["median"]})
    return rows, checks


def profile_decode(args, world: World, variants: list[Variant], models: dict, prompt: torch.Tensor) -> dict:
    """Where a decode step's time goes, per variant (eager): its wall time without the profiler, and under
    torch.profiler the time in collectives and in ATen ops (compute); the rest is Python and dispatch.

    Collectives: gloo runs them on its own thread ("gloo:*" events, whose duration includes waiting for the other
    rank), while the calling thread waits outside any op; the c10d ops' own time is only the hand-off. So a gloo
    collective is timed by its "gloo:" event, other backends by their c10d / functional op.
    """
    from torch.profiler import ProfilerActivity, profile

    requests, steps, result = Requests(args, world.device), args.new_tokens - 1, {}

    def decode(model, cache, token):
        for _ in range(steps):
            token = requests.logits(model, token, cache).argmax(-1, keepdim=True)
        requests.sync()

    for variant in variants:
        model = models[variant.model]
        with merge_schedule(model, variant), torch.no_grad():
            runs = []
            for profiled in (False, True):
                cache = requests.cache(variant.model, model, args.batch)
                token = requests.logits(model, prompt, cache).argmax(-1, keepdim=True)
                world.barrier()
                start = time.perf_counter()
                with profile(activities=[ProfilerActivity.CPU]) if profiled else contextlib.nullcontext() as profiler:
                    decode(model, cache, token)
                runs.append(1000 * (time.perf_counter() - start) / steps)
        events = profiler.key_averages()
        self_ms = {event.key: event.self_cpu_time_total / 1000 / steps for event in events}
        gloo = sum(event.cpu_time_total / 1000 / steps for event in events if event.key.startswith("gloo:"))
        dispatched = sum(ms for op, ms in self_ms.items() if op.startswith(("c10d::", "_c10d_functional::")))
        aten = sum(ms for op, ms in self_ms.items() if op.startswith("aten::"))
        collectives = gloo or dispatched
        result[variant.name] = {
            "wall_ms_per_step": runs[0], "profiled_wall_ms_per_step": runs[1], "collectives_ms": collectives,
            "aten_ms": aten, "other_ms": runs[0] - collectives - aten,
            "top_ops_ms": dict(sorted(self_ms.items(), key=lambda item: -item[1])[:8]),
        }
    return result


def check(name: str, value: torch.Tensor, reference: torch.Tensor, dtype: str) -> dict:
    error = relative_error(value, reference)
    tolerance = TOLERANCE[getattr(torch, dtype)]
    return {"name": name, "relative_error": error, "tolerance": tolerance, "passed": error <= tolerance,
            "argmax_agreement": (value.argmax(-1) == reference.argmax(-1)).float().mean().item()}


def ratios_and_targets(rows: list[dict], world_size: int) -> tuple[dict, list[dict]]:
    """Ratios against tensor_parallel, the bound, the Llama and, for pt_moe, the dense PT at its D (medians of this
    run), and the issues' targets."""
    by_name = {row["name"]: row for row in rows}

    def ratio(name, baseline, metric):
        if name not in by_name or baseline not in by_name:
            return None
        return by_name[name][f"{metric}_ms"]["median"] / by_name[baseline][f"{metric}_ms"]["median"]

    def throughput_ratio(name, baseline):
        throughputs = [(by_name.get(key) or {}).get("throughput_tokens_per_s") for key in (name, baseline)]
        return throughputs[0]["median"] / throughputs[1]["median"] if all(throughputs) else None

    for row in rows:
        row["ttft_vs_tensor_parallel"] = ratio(row["name"], "tensor_parallel", "ttft")
        row["tpot_vs_tensor_parallel"] = ratio(row["name"], "tensor_parallel", "tpot")
        row["throughput_vs_tensor_parallel"] = throughput_ratio(row["name"], "tensor_parallel")

    measured_depths = [row["track_block_depth"] for row in rows if row["name"].startswith("pt_D")]
    if not measured_depths:
        return {}, []
    deepest = f"pt_D{max(measured_depths)}"  # the targets are for D = 8
    targets = []  # (name, value, limit, whether the value must be at least the limit rather than at most)
    if world_size > 1:
        for metric, limit in (("tpot", 0.50), ("ttft", 0.75)):
            targets.append((f"{deepest} {metric.upper()} / tensor_parallel", ratio(deepest, "tensor_parallel", metric),
                            limit, False))
        for metric in ("tpot", "ttft"):
            targets.append((f"{deepest} {metric.upper()} / no_sync_bound", ratio(deepest, "no_sync_bound", metric),
                            1.10, False))
    for metric in ("ttft", "tpot"):  # a speed-up: >= 1.0 means PT is at least as fast as transformers' Llama
        targets.append((f"{metric.upper()} transformers_llama / {deepest}", ratio("transformers_llama", deepest,
                                                                                  metric), 1.0, True))
    speed_up = throughput_ratio(deepest, "transformers_llama")
    if speed_up is not None:
        targets.append((f"throughput {deepest} / transformers_llama", speed_up, 1.0, True))
    if "pt_moe" in by_name:  # against the dense PT model with the same active parameters, merged at the same D
        dense = f"pt_D{by_name['pt_moe']['track_block_depth']}"
        for metric in ("ttft", "tpot"):
            targets.append((f"pt_moe {metric.upper()} / {dense}", ratio("pt_moe", dense, metric),
                            1 / MOE_THROUGHPUT_TARGET, False))
        targets.append((f"throughput pt_moe / {dense}", throughput_ratio("pt_moe", dense), MOE_THROUGHPUT_TARGET,
                        True))
    targets = [
        dict(name=name, value=value, target=f"{'>=' if at_least else '<='} {limit:.2f}",
             met=None if value is None else (value >= limit if at_least else value <= limit))
        for name, value, limit, at_least in targets
    ]
    ratios = {target["name"]: target["value"] for target in targets}
    return ratios, targets


# --- what was run, where --------------------------------------------------------------------------------------


def exact_command() -> dict:
    command = {"argv": shlex.join([Path(sys.executable).name, *sys.argv])}
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun / accelerate launch: record the launcher's line
        with contextlib.suppress(OSError):
            launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
            command["launcher"] = shlex.join(part.decode() for part in launcher if part)
    command["environment"] = {name: os.environ[name] for name in (
        "OMP_NUM_THREADS", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "PYTHONPATH") if name in os.environ}
    return command


def environment(world: World) -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    info = {
        "device": str(world.device),
        "device_name": torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads_per_rank": torch.get_num_threads(),
        "world_size": world.size,
        "backend": dist.get_backend() if world.size > 1 else None,
        "load_average_1min": os.getloadavg()[0],
        "hostname": platform.node(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "modeling_ptt_git": git.stdout.strip() or None,
        },
    }
    return info


def describe_moe(moe: dict | None) -> list[str]:
    """The table's note on what pt_moe ran (none without pt_moe)."""
    if not moe:
        return []
    return ["", f"pt_moe: every layer sparse, top-{moe['experts_per_tok']} of {moe['experts']} experts of width "
            f"{moe['moe_intermediate_size']} per track (the dense FFN width per track / k), merged every "
            f"{moe['track_block_depth']} layers, experts implementation {moe['experts_implementation']}; "
            f"{moe['active_parameters_per_rank']:,} active parameters per rank against the dense PT model's "
            f"{moe['dense_parameters_per_rank']:,} (the difference: the routers)."]


def write_table(report: dict) -> str:
    model, workload, env = report["model"], report["workload"], report["environment"]
    lines = [
        f"W={env['world_size']} ({env['backend'] or 'one process'}) on {env['device_name']}, "
        f"{env['torch_threads_per_rank']} thread(s) per rank, {model['dtype']}; L={model['layers']} "
        f"d={model['hidden_size']} "
        f"FFN={model['intermediate_size']} heads={model['heads']} KV heads={model['kv_heads']} V={model['vocab_size']} "
        f"n={model['num_tracks']}; prefill P={workload['prompt_len']} at batch {workload['batch']}, "
        f"{workload['new_tokens']} new tokens, throughput at batch {workload['throughput_batch']}; "
        f"{workload['repeats']} repeats after {workload['warmup']} warm-up, medians [p10-p90]; "
        f"{workload['cache']} cache{', torch.compile' if workload['compile'] else ''}; load average "
        f"{env['load_average_1min_before']:.1f} -> {env['load_average_1min']:.1f} on {env['cpu_count']} CPUs.",
        *describe_moe(model["moe"]),
        "",
        "| variant | merges/forward (counted) | TTFT ms | TTFT / TP | TPOT ms | TPOT / TP | throughput tok/s | "
        "tput / TP | peak mem/rank MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    for row in report["variants"]:
        counted = row["collectives"]["prefill"]
        collectives = ", ".join(f"{count} {op.split('.')[-1]}" for op, count in sorted(counted.items())) or "0"
        peak = [p for p in row["peak_memory_bytes_per_rank"] if p is not None]
        lines.append(
            f"| {row['name']} | {collectives} | {fmt(row['ttft_ms']['median'])} [{fmt(row['ttft_ms']['p10'])}–"
            f"{fmt(row['ttft_ms']['p90'])}] | {fmt(row['ttft_vs_tensor_parallel'])} | {fmt(row['tpot_ms']['median'])} "
            f"[{fmt(row['tpot_ms']['p10'])}–{fmt(row['tpot_ms']['p90'])}] | {fmt(row['tpot_vs_tensor_parallel'])} | "
            f"{fmt((row['throughput_tokens_per_s'] or {}).get('median'), 1)} | "
            f"{fmt(row['throughput_vs_tensor_parallel'])} | {fmt(max(peak) / 2**20, 0) if peak else '–'} |"
        )
    if report["bare_all_reduce_ms"]:
        lines += [""] + [
            f"Bare all_reduce of the {phase} activations ({cost['bytes']:,} bytes), alone: median {cost['median']:.3f} "
            f"ms [p10 {cost['p10']:.3f}, p90 {cost['p90']:.3f}, max {cost['max']:.1f}] over {cost['n']}."
            for phase, cost in report["bare_all_reduce_ms"].items()
        ]
    if report["decode_profile_per_rank"]:
        lines += ["", "Decode step, rank 0 (ms per step): wall time without the profiler; collectives (including "
                  "waiting for the other ranks) and ATen compute from torch.profiler; the rest is Python and "
                  "dispatch (negative when the profiler inflated the ops more than that):", "",
                  "| variant | wall | collectives | ATen compute | rest |", "|---|---|---|---|---|"]
        for name, cost in report["decode_profile_per_rank"][0].items():
            lines.append(f"| {name} | {cost['wall_ms_per_step']:.2f} | {cost['collectives_ms']:.2f} | "
                         f"{cost['aten_ms']:.2f} | {cost['other_ms']:.2f} |")
    lines += ["", "| target | value | required | met |", "|---|---|---|---|"]
    for target in report["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[target["met"]]
        lines.append(f"| {target['name']} | {fmt(target['value'], 3)} | {target['target']} | {met} |")
    lines += ["", "| output check | relative error | tolerance | passed |", "|---|---|---|---|"]
    for item in report["checks"]:
        lines.append(f"| {item['name']} | {item['relative_error']:.2e} | {item['tolerance']:.0e} | "
                     f"{'yes' if item['passed'] else '**NO**'} |")
    command = report["command"]
    lines += ["", f"Command: `{command.get('launcher') or command['argv']}`"
              + (f" with {command['environment']}" if command["environment"] else "")]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {row["name"]: row for row in report["variants"]}
    pt_rows = sorted((row for row in report["variants"] if row["name"].startswith("pt_D")),
                     key=lambda row: row["track_block_depth"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, title in zip(axes, ("ttft", "tpot"), ("TTFT (prefill)", "TPOT (decode step)")):
        if pt_rows:
            depths = [row["track_block_depth"] for row in pt_rows]
            medians = [row[f"{metric}_ms"]["median"] for row in pt_rows]
            low = [m - row[f"{metric}_ms"]["p10"] for m, row in zip(medians, pt_rows)]
            high = [row[f"{metric}_ms"]["p90"] - m for m, row in zip(medians, pt_rows)]
            axis.errorbar(depths, medians, yerr=[low, high], marker="o", capsize=3, label="PT (median, p10–p90)")
            axis.set_xscale("log", base=2)
            axis.set_xticks(depths, [str(d) for d in depths])
        if "pt_moe" in by_name:
            row = by_name["pt_moe"]
            axis.plot([row["track_block_depth"]], [row[f"{metric}_ms"]["median"]], "s", color="tab:green",
                      label="PT-MoE, same active parameters")
        for name, style, label in (("tensor_parallel", "--", "tensor parallel (PT weights)"),
                                   ("no_sync_bound", ":", "no-sync bound (D = L)"),
                                   ("transformers_llama", "-.", "transformers Llama (its TP)")):
            if name in by_name:
                axis.axhline(by_name[name][f"{metric}_ms"]["median"], linestyle=style, color="gray"
                             if name != "transformers_llama" else "tab:red", label=label)
        axis.set_xlabel("track block depth D")
        axis.set_ylabel("ms (median)")
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    env, model = report["environment"], report["model"]
    figure.suptitle(f"W={env['world_size']}, {env['device_name']}, {model['dtype']}, L={model['layers']} "
                    f"d={model['hidden_size']} n={model['num_tracks']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_argument_group("model shape (defaults: the W=2 CPU target shape of the benchmark issue)")
    shape.add_argument("--layers", type=int, default=16)
    shape.add_argument("--hidden-size", type=int, default=512)
    shape.add_argument("--intermediate-size", type=int, default=3072)
    shape.add_argument("--heads", type=int, default=8)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--vocab-size", type=int, default=8192)
    shape.add_argument("--num-tracks", type=int, default=2)
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
    run.add_argument("--quick", action="store_true", help=f"tiny model and workload for a smoke test: {QUICK}")
    run.add_argument("--out", default=None, help="prefix of the .json/.md/.png files (default benchmark-results/wW)")
    run.add_argument("--profile", action="store_true",
                     help="also break one request's decode steps down with torch.profiler (collectives/compute/rest)")
    run.add_argument("--note", default="", help="free text stored with the results (e.g. machine conditions)")
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)

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
    # checked here, on every rank, rather than when rank 0 builds the model while the others wait for it
    if args.experts is not None:
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
    return args


def moe_summary(args, models: dict) -> dict | None:
    """What pt_moe ran, and its active parameters against the dense PT model's, on this rank (tracks split over the
    ranks, embedding and head on every one)."""
    if "pt_moe" not in models:
        return None
    moe = models["pt_moe"]
    config = moe.config
    experts = sum(p.numel() for name, p in moe.named_parameters() if ".experts." in name)
    unused = experts * (config.num_experts - config.num_experts_per_tok) // config.num_experts
    return dict(experts=config.num_experts, experts_per_tok=config.num_experts_per_tok,
                moe_intermediate_size=config.moe_intermediate_size, track_block_depth=args.moe_depth,
                experts_implementation=config._experts_implementation,
                active_parameters_per_rank=sum(p.numel() for p in moe.parameters()) - unused,
                dense_parameters_per_rank=sum(p.numel() for p in models["pt"].parameters()))


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
        "environment": {**environment(world), "load_average_1min_before": load_before},
        "model": dict(layers=args.layers, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                      heads=args.heads, kv_heads=args.kv_heads, vocab_size=args.vocab_size,
                      num_tracks=args.num_tracks, dtype=args.dtype, attn_implementation=args.attn_implementation,
                      moe=moe_summary(args, models)),
        "workload": dict(batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                         throughput_batch=args.throughput_batch, warmup=args.warmup, repeats=args.repeats,
                         depths=args.depths, cache=args.cache, compile=args.compile,
                         compile_mode=args.compile_mode if args.compile else None, quick=args.quick),
        "variants": rows,
        "bare_all_reduce_ms": all_reduce,
        "decode_profile_per_rank": profiled,
        "checks": checks,
        "note": args.note,
    }
    report["ratios"], report["targets"] = ratios_and_targets(rows, world.size)
    failed = [item["name"] for item in checks if not item["passed"]]
    if world.rank == 0:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        table = write_table(report)
        prefix.with_suffix(".md").write_text(table)
        plot(report, prefix.with_suffix(".png"))
        print(table, flush=True)
        print(f"wrote {prefix}.json, .md, .png", flush=True)
        if failed:
            print(f"OUTPUT MISMATCH: {failed}", file=sys.stderr, flush=True)
    if world.size > 1:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
