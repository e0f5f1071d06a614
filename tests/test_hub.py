"""Push to and pull from a Hub (the local one in `hub_server.py`): complete remote-code repos, bit-identical weights in
a process that cannot import this package, revision pinning, offline reloads from the cache, the model card, and the
errors users see.

`HF_ENDPOINT` is read when huggingface_hub is imported, so everything that reaches the Hub through the default
endpoint (transformers' `from_pretrained`/`push_to_hub`, the scripts) runs in a subprocess with its own `HF_ENDPOINT`,
`HF_HOME` and `HF_HUB_OFFLINE`; this process talks to the server only through `HfApi(endpoint=...)`.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import model_card
import push_to_hub
from helpers import ROOT, SUPPORT
from hub_server import HubServer
from modeling_ptt import PTConfig, PTForCausalLM


# every module of the package but the engine integrations is remote code: save_pretrained copies it beside the weights
INTEGRATIONS = {"vllm_ptt.py", "peft_ptt.py"}
REMOTE_CODE = {path.name for path in (ROOT / "modeling_ptt").glob("*.py")} - {"__init__.py"} - INTEGRATIONS


TOKEN, USER = "hf_test_token", "tester"
REPO, METHOD_REPO = f"{USER}/tiny-ptt", f"{USER}/tiny-ptt-method"
SENTENCES = [
    "Shall I compare thee to a summer's day?",
    "Thou art more lovely and more temperate.",
    "Rough winds do shake the darling buds of May.",
]
INPUT_IDS = [[5, 17, 42, 99, 3, 250, 7, 61]]
SUBPROCESS_TIMEOUT = 240


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def save_tiny_model(path: Path, seed: int, tokenizer: PreTrainedTokenizerFast) -> PTForCausalLM:
    torch.manual_seed(seed)
    config = PTConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, num_tracks=2, track_block_depth=2,
                      max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    model = PTForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def run(args: list[str], env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


class Hub:
    """The running server, its client, and the environments of the processes that use it."""

    def __init__(self, server: HubServer, tmp: Path):
        self.server = server
        self.tmp = tmp
        self.api = HfApi(endpoint=server.url, token=TOKEN)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "PYTHONPATH"}
        base.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp / "hf_home"), HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0",
                    HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error",
                    OMP_NUM_THREADS=str(torch.get_num_threads()))
        self.pull_env = base  # no path to this repo: only the Hub's copy of the code can load the model
        self.push_env = {**base, "PYTHONPATH": str(ROOT)}

    def pull(self, jobs: list[dict], offline: bool = False) -> list[dict]:
        """Run `hub_pull_worker.py` in a fresh process outside the repo; one summary per job."""
        spec = self.tmp / "jobs.json"
        spec.write_text(json.dumps({"input_ids": INPUT_IDS, "text": SENTENCES[0], "jobs": jobs}))
        env = {**self.pull_env, "HF_HUB_OFFLINE": "1" if offline else "0"}
        result = run([str(SUPPORT / "hub_pull_worker.py"), str(spec)], env, cwd=self.tmp)
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    # The server is on 127.0.0.1, so this module runs even where HF_HUB_OFFLINE=1 is set for the whole suite:
    # huggingface_hub reads the flag at each request.
    with HubServer(tmp / "repos", {TOKEN: USER}) as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield Hub(server, tmp)


@pytest.fixture(scope="module")
def published(hub):
    """Two versions of one model pushed to REPO (v1 by the command line, private; v2 through `push`), v1 again to
    branch `dev`, and a model pushed with `PTForCausalLM.push_to_hub` to METHOD_REPO."""
    tokenizer = tiny_tokenizer()
    v1_dir, v2_dir, method_dir = hub.tmp / "v1", hub.tmp / "v2", hub.tmp / "method"
    v1 = save_tiny_model(v1_dir, seed=1, tokenizer=tokenizer)
    (v1_dir / "train_log.jsonl").write_text("\n".join([
        json.dumps({"step": 10, "loss": 5.5, "lr": 3e-4, "tokens_per_s": 1000.0, "dataset": "shakespeare"}),
        "not json: a torn line",
        json.dumps({"step": 20, "loss": 4.25, "val_loss": 4.5, "lr": 1e-4, "tokens_per_s": 1200.0}),
        json.dumps({"step": 30, "loss": 4.0, "val_loss": 4.75, "tokens_per_s": 1100.0}),
    ]))
    (v1_dir / "benchmark.json").write_text(json.dumps({
        "device": "cpu", "speedup_vs_tensor_parallel": 1.75,
        "results": [{"mode": "track_block", "ms_per_token": 12.5}, {"mode": "tensor_parallel", "ms_per_token": 21.9}],
    }))
    (v1_dir / "optimizer.pt").write_bytes(b"local training state, not for the Hub")
    pushed = run([str(ROOT / "scripts" / "push_to_hub.py"), str(v1_dir), REPO, "--private"], hub.push_env, hub.tmp)
    assert "left local: optimizer.pt" in pushed.stdout
    commit_v1 = pushed.stdout.split("commit ")[1].split(":")[0]

    v2 = save_tiny_model(v2_dir, seed=2, tokenizer=tokenizer)
    commit_v2 = push_to_hub.push(v2_dir, REPO, commit_message="v2", api=hub.api).oid
    commit_dev = push_to_hub.push(v1_dir, REPO, revision="dev", api=hub.api).oid

    method = save_tiny_model(method_dir, seed=3, tokenizer=tokenizer)
    run(["-c", "import sys; from modeling_ptt import PTForCausalLM; "
               "PTForCausalLM.from_pretrained(sys.argv[1]).push_to_hub(sys.argv[2])", str(method_dir), METHOD_REPO],
        hub.push_env, hub.tmp)
    return {"v1": v1, "v2": v2, "method": method, "tokenizer": tokenizer, "v1_dir": v1_dir, "v2_dir": v2_dir,
            "commit_v1": commit_v1, "commit_v2": commit_v2, "commit_dev": commit_dev}


@pytest.fixture(scope="module")
def pulled(hub, published):
    """One fresh process pulls main, the v1 commit, branch dev and the push_to_hub repo; a second one, offline,
    loads main and v1 again from its cache while the server counts requests."""
    jobs = [
        {"repo": REPO, "revision": None, "out": str(hub.tmp / "main.safetensors")},
        {"repo": REPO, "revision": published["commit_v1"], "out": str(hub.tmp / "v1.safetensors")},
        {"repo": REPO, "revision": "dev", "out": str(hub.tmp / "dev.safetensors")},
        {"repo": METHOD_REPO, "revision": None, "out": str(hub.tmp / "method.safetensors")},
    ]
    online = hub.pull(jobs)
    requests_before = len(hub.server.log)
    offline_jobs = [{**job, "out": job["out"].replace(".safetensors", "-offline.safetensors")} for job in jobs[:2]]
    offline = hub.pull(offline_jobs, offline=True)
    return {"online": online, "offline": offline, "offline_requests": len(hub.server.log) - requests_before}


def assert_same_model(path: str, model: PTForCausalLM, tokenizer: PreTrainedTokenizerFast | None = None):
    """Pulled weights bit-identical to `model`'s, and logits identical (same kernels, same thread count)."""
    pulled = load_file(path)
    logits, tokens = pulled.pop("__logits__"), pulled.pop("__tokens__", None)
    state = model.state_dict()
    assert sorted(pulled) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(pulled[name], tensor), f"{name} differs after the round trip"
    with torch.no_grad():
        assert torch.equal(logits, model(torch.tensor(INPUT_IDS)).logits)
    if tokenizer is not None:
        assert tokens is not None, "the repo's tokenizer did not load through AutoTokenizer"
        assert tokens.tolist() == tokenizer(SENTENCES[0]).input_ids


def test_push_uploads_a_complete_remote_code_repo(hub, published):
    files = set(hub.api.list_repo_files(REPO, revision=published["commit_v1"]))
    assert files == {".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json", "train_log.jsonl", "benchmark.json"} | REMOTE_CODE
    config = json.loads(Path(hub.api.hf_hub_download(REPO, "config.json", revision=published["commit_v1"],
                                                     cache_dir=hub.tmp / "inspect")).read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_parallel_track.PTForCausalLM"
    assert hub.api.model_info(REPO).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.server.url, token=False).model_info(REPO)


def test_every_push_is_a_new_commit_and_branches_resolve(hub, published):
    commits = {published["commit_v1"], published["commit_v2"], published["commit_dev"]}
    assert len(commits) == 3
    assert hub.api.model_info(REPO).sha == published["commit_v2"]
    assert hub.api.model_info(REPO, revision="dev").sha == published["commit_dev"]
    history = [commit.commit_id for commit in hub.api.list_repo_commits(REPO)]
    assert history[:2] == [published["commit_v2"], published["commit_v1"]] and len(history) == 3  # + initial
    # a commit id is the sha1 of the commit document the server stored: change anything and it changes
    stored = hub.tmp / "repos" / REPO / "commits" / f"{published['commit_v2']}.json"
    assert hashlib.sha1(stored.read_bytes()).hexdigest() == published["commit_v2"]
    # pushing unchanged files makes no commit (huggingface_hub compares git blob ids from preupload)
    assert push_to_hub.push(published["v2_dir"], REPO, api=hub.api).oid == published["commit_v2"]


def test_pull_is_bit_identical_in_a_process_without_the_package(hub, published, pulled):
    main, v1, dev, method = pulled["online"]
    for job in pulled["online"]:
        assert job["module"].startswith("transformers_modules."), job  # the repo's code, not an installed package
        assert REMOTE_CODE <= set(job["files"])
    assert main["commit"] == published["commit_v2"]
    assert v1["commit"] == published["commit_v1"]  # a pinned old revision gives the old weights
    assert dev["commit"] == published["commit_dev"]
    tokenizer = published["tokenizer"]
    assert_same_model(str(hub.tmp / "main.safetensors"), published["v2"], tokenizer)
    assert_same_model(str(hub.tmp / "v1.safetensors"), published["v1"], tokenizer)
    assert_same_model(str(hub.tmp / "dev.safetensors"), published["v1"], tokenizer)


def test_push_to_hub_method_gives_a_loadable_repo(hub, published, pulled):
    files = set(hub.api.list_repo_files(METHOD_REPO))
    assert {"config.json", "model.safetensors"} | REMOTE_CODE <= files
    assert not INTEGRATIONS & files  # engine integrations, not model code: a pulled model never needs vLLM or PEFT
    assert_same_model(str(hub.tmp / "method.safetensors"), published["method"])


def test_second_load_works_offline_from_the_cache(hub, published, pulled):
    main, v1 = pulled["offline"]
    assert pulled["offline_requests"] == 0
    assert (main["commit"], v1["commit"]) == (published["commit_v2"], published["commit_v1"])
    assert_same_model(str(hub.tmp / "main-offline.safetensors"), published["v2"], published["tokenizer"])
    assert_same_model(str(hub.tmp / "v1-offline.safetensors"), published["v1"], published["tokenizer"])


def test_model_card_parses_and_describes_the_model(hub, published):
    card = ModelCard.load(hub.api.hf_hub_download(REPO, "README.md", revision=published["commit_v1"],
                                                  cache_dir=hub.tmp / "inspect"))
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert "parallel-track" in data["tags"]
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["shakespeare"]  # named by the training log
    text = card.text
    params = sum(p.numel() for p in published["v1"].parameters())
    assert f"| Parameters | {params:,} |" in text
    assert "| Sync points per forward | 2 (tensor parallelism: 8 = 2 x layers, 4x fewer) |" in text
    assert "| Attention heads: total / per track | 4 / 2 |" in text
    assert "| KV heads: total / per track | 2 / 1 |" in text
    assert "(1 unreadable line(s) skipped)" in text
    assert "| Final validation loss | 4.75 (step 30) |" in text
    assert "| Best validation loss | 4.5 (step 20) |" in text
    assert "| Throughput, median over the log (tokens/s) | 1100 |" in text
    assert "| speedup_vs_tensor_parallel | 1.75 |" in text
    assert "| tensor_parallel | 21.9 |" in text
    assert f'from_pretrained(\n    "{REPO}", trust_remote_code=True, distributed_config=DistributedConfig(tp_size=2)' in text
    assert "torchrun --nproc-per-node 2" in text and "accelerate launch --num_processes 2" in text


def test_card_leaves_out_what_the_directory_does_not_hold(tmp_path):
    tokenizer = tiny_tokenizer()
    save_tiny_model(tmp_path, seed=0, tokenizer=tokenizer)
    (tmp_path / "benchmark.json").write_text("{ truncated")
    (tmp_path / "train_log.jsonl").write_text("garbage\n[1, 2]\n")
    config, files = push_to_hub.repo_files(tmp_path)
    text = str(model_card.build_model_card(tmp_path, "someone/model", config, files))
    assert "## Architecture" in text and "## Usage" in text
    assert "## Training" not in text and "## Benchmark" not in text


@pytest.mark.parametrize("breakage, message", [
    ("no_config", "has no config.json"),
    ("llama", "model_type='llama', not a PT model"),
    ("bad_layout", "PTConfig.num_attention_heads=3: must be divisible by num_tracks=2"),
    ("no_modeling", "modeling_parallel_track.py is missing"),
    ("no_conversion", "imports a module that is missing"),
    ("no_weights", "has no model.safetensors"),
    ("no_auto_map", "has no auto_map['AutoModelForCausalLM']"),
    ("auto_map_removed", "has no auto_map['AutoConfig']"),  # PTConfig would fill it in; the uploaded file would not
    ("tokenizer_without_vocabulary", "has tokenizer files (tokenizer_config.json) but no vocabulary"),
])
def test_push_refuses_incomplete_directories(tmp_path, breakage, message):
    save_tiny_model(tmp_path, seed=0, tokenizer=tiny_tokenizer())
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    if breakage == "no_config":
        config_file.unlink()
    elif breakage == "auto_map_removed":
        del config["auto_map"]
        config_file.write_text(json.dumps(config))
    elif breakage in ("llama", "bad_layout", "no_auto_map"):
        config.update({"llama": {"model_type": "llama"}, "bad_layout": {"num_attention_heads": 3},
                       "no_auto_map": {"auto_map": {"AutoConfig": "configuration_ptt.PTConfig"}}}[breakage])
        config_file.write_text(json.dumps(config))
    elif breakage == "no_modeling":
        (tmp_path / "modeling_parallel_track.py").unlink()
    elif breakage == "no_conversion":
        (tmp_path / "conversion_ptt.py").unlink()
    elif breakage == "no_weights":
        (tmp_path / "model.safetensors").unlink()
    elif breakage == "tokenizer_without_vocabulary":
        (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as refusal:
        push_to_hub.main([str(tmp_path), "someone/model"])  # refused before any request is made
    assert "refusing to push" in str(refusal.value) and message in str(refusal.value)


def test_hub_errors_are_huggingface_hubs_own(hub, published):
    with pytest.raises(RepositoryNotFoundError):
        hub.api.hf_hub_download(f"{USER}/no-such-model", "config.json", cache_dir=hub.tmp / "inspect")
    with pytest.raises(RevisionNotFoundError):
        hub.api.hf_hub_download(REPO, "config.json", revision="no-such-branch", cache_dir=hub.tmp / "inspect")
    with pytest.raises(EntryNotFoundError):
        hub.api.hf_hub_download(REPO, "no_such_file.json", cache_dir=hub.tmp / "inspect")


@pytest.mark.parametrize("repo, revision, message", [
    (f"{USER}/no-such-model", None, f"no repository '{USER}/no-such-model' on the Hub"),
    (REPO, "no-such-branch", f"repository '{REPO}' has no revision 'no-such-branch'"),
])
def test_pull_script_names_missing_repos_and_revisions(hub, published, repo, revision, message):
    args = [str(ROOT / "scripts" / "pull_from_hub.py"), repo] + (["--revision", revision] if revision else [])
    result = run(args, hub.pull_env, hub.tmp, check=False)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_push_script_explains_a_missing_token(hub, published):
    env = {k: v for k, v in hub.push_env.items() if k != "HF_TOKEN"}
    result = run([str(ROOT / "scripts" / "push_to_hub.py"), str(published["v2_dir"]), f"{USER}/other"], env,
                 hub.tmp, check=False)
    assert result.returncode == 1
    assert "the Hub refused" in result.stderr and "set HF_TOKEN" in result.stderr, result.stderr
