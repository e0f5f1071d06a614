"""What scripts/benchmark.py measures and how: the variants, the ranks, the models, one request, the timed runs.

    plan_variants(...)          the variants: a merge schedule of the PT weights, the PT-MoE model or the Llama
    start_world(device)         this process's rank, under a launcher or alone
    build_models(args, ...)     a seeded Llama, its exact PT track layout and the PT-MoE model, loaded per rank
    bare_all_reduce(args, ...)  the unit cost of one merge, alone
    measure(args, ...)          the untimed probes (collectives, memory, outputs), then the timed, interleaved repeats
    profile_decode(args, ...)   where a decode step's time goes, under torch.profiler
    moe_summary(args, models)   what pt_moe ran and its active parameters

`args` is scripts/benchmark.py's parsed command line; the rows it returns are benchmark_report's.
"""

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import DistributedConfig, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import Cache, DynamicCache, StaticCache

# sibling modules of scripts/ by name (Python puts a script's own folder on sys.path); the model code from the
# installed package
from benchmark_report import spread, throughput_spread
from collectives import CollectiveCounter
from modeling_ptt import PTConfig, PTForCausalLM
from modeling_ptt.distributed_ptt import init_track_parallel
from modeling_ptt.modeling_parallel_track import CACHE_FIELD


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
        return PTConfig.sync_point_count(layers, self.track_block_depth, self.sync_mode)


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
    """Run the PT model under the variant's merge schedule, then restore the model's own."""
    if variant.model == "llama":
        yield
        return
    saved = model.config.track_block_depth, model.config.sync_mode
    model.set_sync_schedule(track_block_depth=variant.track_block_depth, sync_mode=variant.sync_mode)
    try:
        yield
    finally:
        model.set_sync_schedule(*saved)


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


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The model shape flags that `llama_config` and the training benchmark read, with the default shape of the
    W=2 CPU measurements."""
    shape = parser.add_argument_group("model shape (defaults: the W=2 CPU shape of docs/performance/w2.md)")
    shape.add_argument("--layers", type=int, default=16)
    shape.add_argument("--hidden-size", type=int, default=512)
    shape.add_argument("--intermediate-size", type=int, default=3072)
    shape.add_argument("--heads", type=int, default=8)
    shape.add_argument("--kv-heads", type=int, default=2)
    shape.add_argument("--vocab-size", type=int, default=8192)
    shape.add_argument("--num-tracks", type=int, default=2)


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
    sparse = any(variant.model == "pt_moe" for variant in variants)
    if world.size == 1:
        models = build_in_place(args, world.device, sparse)
    else:
        models = load_per_rank(args, world, sparse, any(variant.model == "llama" for variant in variants))
    if "pt_moe" in models and args.experts_implementation:
        models["pt_moe"].set_experts_implementation(args.experts_implementation)
    return models


def build_in_place(args, device: torch.device, sparse: bool) -> dict[str, torch.nn.Module]:
    dtype = getattr(torch, args.dtype)
    with torch.device(device):
        torch.manual_seed(args.seed)
        llama = LlamaForCausalLM(llama_config(args)).to(dtype)
        pt = PTForCausalLM.from_llama(llama, args.num_tracks)
        models = {"pt": pt.eval(), "llama": llama.eval()}
        if sparse:
            models["pt_moe"] = seeded_moe(args, pt.config).to(dtype).eval()
    return models


def load_per_rank(args, world: World, sparse: bool, llama: bool) -> dict[str, torch.nn.Module]:
    # every rank reads rank 0's files: one machine, or a --workdir that all machines share
    workdir = world.gather(tempfile.mkdtemp(prefix="ptt-benchmark-", dir=args.workdir) if world.rank == 0 else None)[0]
    if world.rank == 0:
        torch.manual_seed(args.seed)
        dense = LlamaForCausalLM(llama_config(args))
        dense.save_pretrained(f"{workdir}/llama")
        pt = PTForCausalLM.from_llama(dense, args.num_tracks)
        pt.save_pretrained(f"{workdir}/pt")
        if sparse:
            seeded_moe(args, pt.config).save_pretrained(f"{workdir}/pt_moe")
        del dense, pt
    world.barrier()
    parallel = dict(distributed_config=DistributedConfig(tp_size=world.size), dtype=getattr(torch, args.dtype),
                    attn_implementation=args.attn_implementation)
    models = {"pt": PTForCausalLM.from_pretrained(f"{workdir}/pt", **parallel).eval()}
    if llama:
        models["llama"] = LlamaForCausalLM.from_pretrained(f"{workdir}/llama", **parallel).eval()
    if sparse:
        models["pt_moe"] = PTForCausalLM.from_pretrained(f"{workdir}/pt_moe", **parallel).eval()
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return models


def local_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shard of a DTensor, its tracks of a PT model)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


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


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # "5" resets the process's peak RSS (VmHWM), Linux >= 4.0
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident_bytes("VmHWM")


def resident_bytes(field: str) -> int | None:
    """`VmRSS` (now) or `VmHWM` (the peak since the last reset) of this process, from Linux's /proc; None elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def check(name: str, value: torch.Tensor, reference: torch.Tensor, dtype: str) -> dict:
    """Two computations of the same logits, compared by relative error (max |a - b| / max |b|)."""
    error = ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
    tolerance = TOLERANCE[getattr(torch, dtype)]
    return {"name": name, "relative_error": error, "tolerance": tolerance, "passed": error <= tolerance,
            "argmax_agreement": (value.argmax(-1) == reference.argmax(-1)).float().mean().item()}


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


def timed_repeats(args, world: World, variants: list[Variant], models: dict, forwards: dict, requests: Requests,
                  prompts: Prompts, bar) -> dict[str, dict[str, list[float]]]:
    """Per variant, the TTFT and decode-step samples (seconds) and throughputs (tokens/s) after the warm-up. The
    variants take turns within every repeat, so a drift of the machine hits them all alike."""
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
    return samples


def measure(args, world: World, variants: list[Variant], models: dict) -> tuple[list[dict], list[dict]]:
    """A row per variant (see benchmark_report) and the output checks: PT in tensor-parallel layout against the
    Llama with the same weights, and with --compile every compiled forward against its eager self."""
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

    samples = timed_repeats(args, world, variants, models, forwards, requests, prompts, bar)
    bar.close()
    for row in rows:
        mine = samples[row["name"]]
        row["ttft_ms"] = spread(mine["ttft"])
        row["tpot_ms"] = spread(mine["tpot"])
        row["throughput_tokens_per_s"] = throughput_spread(mine["throughput"])
        row["median_ms_per_rank"] = world.gather({"ttft": row["ttft_ms"]["median"], "tpot": row["tpot_ms"]["median"]})
    return rows, checks


def profile_decode(args, world: World, variants: list[Variant], models: dict, prompt: torch.Tensor) -> dict:
    """Where a decode step's time goes, per variant (eager): its wall time without the profiler, and under
    torch.profiler the time in collectives and in ATen ops (compute); the rest is Python and dispatch."""
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
        result[variant.name] = decode_step_cost(profiler.key_averages(), steps, *runs)
    return result


def decode_step_cost(events, steps: int, wall_ms: float, profiled_wall_ms: float) -> dict:
    """Milliseconds per decode step in collectives, in ATen ops and in the rest, from the profiler's events.

    Gloo runs a collective on its own thread ("gloo:*" events, whose duration includes waiting for the other rank)
    while the calling thread waits outside any op, so the c10d ops' own time is only the hand-off: a gloo collective
    is timed by its "gloo:" event, other backends' by their c10d / functional op.
    """
    self_ms = {event.key: event.self_cpu_time_total / 1000 / steps for event in events}
    gloo = sum(event.cpu_time_total / 1000 / steps for event in events if event.key.startswith("gloo:"))
    dispatched = sum(ms for op, ms in self_ms.items() if op.startswith(("c10d::", "_c10d_functional::")))
    aten = sum(ms for op, ms in self_ms.items() if op.startswith("aten::"))
    collectives = gloo or dispatched
    return {
        "wall_ms_per_step": wall_ms, "profiled_wall_ms_per_step": profiled_wall_ms, "collectives_ms": collectives,
        "aten_ms": aten, "other_ms": wall_ms - collectives - aten,
        "top_ops_ms": dict(sorted(self_ms.items(), key=lambda item: -item[1])[:8]),
    }
