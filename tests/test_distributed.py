"""Track parallelism: tracks on 2 gloo ranks give the single-process answers with ceil(L/D) all_reduces per forward.

The multi-process tests start real launchers (`torchrun`, `accelerate launch`) with `OMP_NUM_THREADS=1` per rank and
a hard timeout, so a hang fails instead of stalling CI. One torchrun job checks both tiny models (n=2 in one
safetensors file, n=4 as a sharded index) under three sync layouts; the tests below read what each rank recorded
and compare it with the same checkpoint loaded in this process.
"""

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig, PreTrainedTokenizerFast, set_seed

from helpers import AFM_OPTIONS, LAUNCH_TIMEOUT_S, ROOT, SUPPORT, child_env, free_port, run_launcher, tiny_model
from modeling_ptt import PTForCausalLM


WORKER = SUPPORT / "track_parallel_worker.py"
BIN = Path(sys.executable).parent
VARIANTS = [{}, {"track_block_depth": 1}, {"sync_mode": "tensor_parallel"}]  # L=5: 3, 5 and 10 merges
WORLD_SIZE = 2
MODELS = ("n2", "n4", "moe")


def tiny_pt(num_tracks: int, seed: int = 0, **overrides) -> PTForCausalLM:
    return tiny_model(seed, num_tracks=num_tracks, **{"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
                                                      **overrides})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("track_parallel")
    tiny_pt(2, seed=2).save_pretrained(root / "n2")
    tiny_pt(4, seed=4).save_pretrained(root / "n4", max_shard_size="20KB")  # several files and an index
    tiny_pt(2, seed=6, **AFM_OPTIONS).save_pretrained(root / "moe")  # experts, QK-norm, NoPE: no extra collective
    input_ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :3], attention_mask[0, :3] = 0, 0  # left padding
    torch.save({"input_ids": input_ids, "attention_mask": attention_mask}, root / "inputs.pt")
    return root


@pytest.fixture(scope="module")
def ranks(checkpoints):
    """What each of the 2 ranks of one torchrun job observed, keyed by `model_dir#variant`."""
    out = checkpoints / "observed"
    out.mkdir()
    run_launcher(
        [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={WORLD_SIZE}", str(WORKER), "check",
         "--models", *(str(checkpoints / name) for name in MODELS), "--inputs", str(checkpoints / "inputs.pt"),
         "--variants", json.dumps(VARIANTS), "--out", str(out)],
        child_env(),
    )
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def cases():
    return [(name, index) for name in MODELS for index in range(len(VARIANTS))]


def reference(checkpoints, name: str, index: int) -> PTForCausalLM:
    """The oracle: the same checkpoint in one process, through transformers' own loader."""
    return PTForCausalLM.from_pretrained(checkpoints / name, **VARIANTS[index]).eval()


def observed(ranks, checkpoints, name, index):
    return [rank[f"{checkpoints / name}#{index}"] for rank in ranks]


@pytest.mark.parametrize("name", MODELS)
def test_each_rank_holds_plain_tensors_of_its_own_tracks(ranks, checkpoints, name):
    full = reference(checkpoints, name, 0)
    per_rank = full.config.num_tracks // WORLD_SIZE
    for rank, seen in enumerate(observed(ranks, checkpoints, name, 0)):
        assert seen["class_module"].startswith("transformers_modules."), "loaded as remote code"
        assert seen["dtensor_parameters"] == []
        assert seen["local_tracks"] == [per_rank] and seen["has_process_group"] == [True]
        own = full.model.layers[0].self_attn.q_proj.weight[rank * per_rank : (rank + 1) * per_rank]
        assert torch.equal(seen["q_proj_0"], own)
        assert torch.equal(seen["embed"], full.model.embed_tokens.weight)  # shared tensors are replicated


@pytest.mark.parametrize("name,index", cases())
def test_logits_equal_the_single_process_model(ranks, checkpoints, inputs_of, name, index):
    with torch.no_grad():
        expected = reference(checkpoints, name, index)(**inputs_of).logits
    first, second = observed(ranks, checkpoints, name, index)
    torch.testing.assert_close(first["logits"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(first["logits_grad"], expected, atol=1e-5, rtol=0)
    assert torch.equal(first["logits"], second["logits"]), "ranks must hold bit-identical logits"


@pytest.mark.parametrize("name,index", cases())
def test_one_all_reduce_per_merge_and_one_per_dispatch_in_backward(ranks, checkpoints, name, index):
    """Forward: one all_reduce per merge; backward: one per dispatch (a block's start), none for the merges. So a
    training micro-batch costs 2*ceil(L/D) in track_block mode and 4L in tensor_parallel mode; PT-MoE adds one for
    its load-balancing loss, averaged over every rank's routers."""
    config = reference(checkpoints, name, index).config
    L = config.num_hidden_layers
    merges = 2 * L if config.sync_mode == "tensor_parallel" else math.ceil(L / config.track_block_depth)
    aux_loss = 1 if name == "moe" else 0
    for seen in observed(ranks, checkpoints, name, index):
        assert seen["collectives_no_grad"] == {"c10d.allreduce_": merges}
        assert seen["collectives_grad"] == {"c10d.allreduce_": merges + aux_loss}
        assert seen["collectives_backward"] == {"c10d.allreduce_": merges}


@pytest.mark.parametrize("name,index", cases())
def test_gradients_equal_the_single_process_model(ranks, checkpoints, inputs_of, name, index):
    """Each rank's gradients of its track slices, and of the shared embedding, norm and head, equal the single-process
    model's (fp32), and the ranks' shared gradients are bit-identical: a merge's replicated gradient is not summed
    again, and a dispatch's partial one is summed once."""
    model = reference(checkpoints, name, index)
    labels = inputs_of["input_ids"].masked_fill(inputs_of["attention_mask"] == 0, -100)
    output = model(**inputs_of, labels=labels)
    output.loss.backward()
    track_names = set(model.track_stacked_parameter_names())
    per_rank = model.config.num_tracks // WORLD_SIZE
    seen = observed(ranks, checkpoints, name, index)
    for rank, result in enumerate(seen):
        torch.testing.assert_close(result["loss"], output.loss.detach(), atol=1e-6, rtol=1e-6)
        assert result["grads"].keys() == {name for name, p in model.named_parameters() if p.grad is not None}
        for param_name, param in model.named_parameters():
            expected = param.grad[rank * per_rank : (rank + 1) * per_rank] if param_name in track_names else param.grad
            torch.testing.assert_close(result["grads"][param_name], expected, atol=1e-6, rtol=1e-4,
                                       msg=lambda m: f"rank {rank}, {param_name}: {m}")
    for param_name in set(seen[0]["grads"]) - track_names:
        assert torch.equal(seen[0]["grads"][param_name], seen[1]["grads"][param_name]), param_name


def test_the_collective_counter_sees_functional_and_c10d_collectives(ranks):
    for rank in ranks:
        assert rank["counter_self_check"] == {"_c10d_functional.all_reduce": 1, "c10d.allreduce_": 1}


@pytest.mark.parametrize("name", MODELS)
def test_generate_adds_no_collective_beyond_the_merges(ranks, checkpoints, name):
    config = reference(checkpoints, name, 0).config
    for seen in observed(ranks, checkpoints, name, 0):
        assert seen["greedy_forwards"] == 6  # one forward per new token
        merges = math.ceil(config.num_hidden_layers / config.track_block_depth)
        assert seen["greedy_collectives"] == {"c10d.allreduce_": 6 * merges}


@pytest.mark.parametrize("name", MODELS)
def test_generate_gives_the_single_process_tokens_on_every_rank(ranks, checkpoints, inputs_of, name):
    model = reference(checkpoints, name, 0)
    kwargs = dict(**inputs_of, max_new_tokens=6)
    expected = {
        "greedy": model.generate(**kwargs, do_sample=False),
        "beam": model.generate(**kwargs, do_sample=False, num_beams=3),
        "static": model.generate(**kwargs, do_sample=False, cache_implementation="static"),
    }
    set_seed(1234)
    expected["seeded_sample"] = model.generate(**kwargs, do_sample=True)
    assert torch.equal(expected["static"], expected["greedy"])
    first, second = observed(ranks, checkpoints, name, 0)
    for mode, tokens in expected.items():
        assert torch.equal(first[mode], tokens), mode
        assert torch.equal(second[mode], tokens), mode
    # no seed set, and the worker gives each rank its own RNG state before every load: the ranks still agree,
    # because loading gave every rank rank 0's RNG state
    assert torch.equal(first["unseeded_sample"], second["unseeded_sample"])


@pytest.mark.parametrize("name", ["n2", "n4"])
def test_kv_cache_holds_only_the_local_tracks_kv_heads(ranks, checkpoints, name):
    config = reference(checkpoints, name, 0).config
    for seen in observed(ranks, checkpoints, name, 0):
        assert len(seen["kv_shapes"]) == config.num_hidden_layers
        for batch, kv_heads, seq_len, head_dim in seen["kv_shapes"]:
            assert (batch, kv_heads, seq_len, head_dim) == (2, config.num_key_value_heads // WORLD_SIZE, 9, 4)
        assert seen["partial_save_refused"]


@pytest.fixture(scope="module")
def inputs_of(checkpoints):
    return torch.load(checkpoints / "inputs.pt")


# --- one process: the same loader with W=1, and the errors -------------------------------------------------------


@pytest.mark.parametrize("name", ["n2", "n4"])
@pytest.mark.parametrize("auto", [False, True])
def test_single_rank_track_parallel_load_equals_the_plain_load(checkpoints, inputs_of, name, auto):
    load = (lambda path, **kw: AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw)) if auto \
        else PTForCausalLM.from_pretrained
    plain = load(checkpoints / name)
    sliced = load(checkpoints / name, distributed_config=DistributedConfig(tp_size=1))
    assert not dist.is_initialized()
    sliced_state, plain_state = sliced.state_dict(), plain.state_dict()
    assert sliced_state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        assert torch.equal(sliced_state[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(sliced(**inputs_of).logits, plain(**inputs_of).logits, atol=1e-5, rtol=0)
    assert torch.equal(sliced.generate(**inputs_of, max_new_tokens=4, do_sample=False),
                       plain.generate(**inputs_of, max_new_tokens=4, do_sample=False))


def test_the_base_model_loads_from_a_checkpoint_with_a_head(checkpoints, inputs_of):
    from modeling_ptt import PTModel

    plain = PTModel.from_pretrained(checkpoints / "n4")
    sliced = PTModel.from_pretrained(checkpoints / "n4", distributed_config=DistributedConfig(tp_size=1))
    with torch.no_grad():
        torch.testing.assert_close(sliced(**inputs_of).last_hidden_state, plain(**inputs_of).last_hidden_state,
                                   atol=1e-5, rtol=0)


def test_dtypes_are_read_and_cast_like_the_plain_load(checkpoints, tmp_path):
    tiny_pt(2).to(torch.bfloat16).save_pretrained(tmp_path)  # 2-byte elements on disk
    for path, kwargs in ((tmp_path, {}), (checkpoints / "n2", {"dtype": torch.bfloat16})):
        plain = PTForCausalLM.from_pretrained(path, **kwargs)
        sliced = PTForCausalLM.from_pretrained(path, tp_size=1, **kwargs)
        assert sliced.dtype == plain.dtype == torch.bfloat16
        sliced_state = sliced.state_dict()
        for key, value in plain.state_dict().items():
            assert torch.equal(sliced_state[key], value), key


def test_tied_embeddings_stay_tied(tmp_path, inputs_of):
    model = tiny_pt(2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = PTForCausalLM.from_pretrained(tmp_path, tp_size=1)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs_of).logits, model(**inputs_of).logits, atol=1e-5, rtol=0)


def test_w_not_dividing_the_tracks_fails_before_anything_loads(checkpoints, tmp_path):
    shutil.copy(checkpoints / "n4" / "config.json", tmp_path / "config.json")  # no weights at all: nothing is read
    with pytest.raises(ValueError, match=r"tp_size=3 does not divide num_tracks=4"):
        PTForCausalLM.from_pretrained(tmp_path, distributed_config=DistributedConfig(tp_size=3))
    assert not dist.is_initialized()


def test_checkpoint_whose_track_dim_disagrees_with_its_config(checkpoints, tmp_path):
    shutil.copytree(checkpoints / "n4", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["num_tracks"] = 2
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.\d+\..*dim 0 \(tracks\).*num_tracks=2"):
        PTForCausalLM.from_pretrained(tmp_path / "model", distributed_config=DistributedConfig(tp_size=1))


def test_several_ranks_without_a_launcher_is_a_clear_error(checkpoints, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        PTForCausalLM.from_pretrained(checkpoints / "n2", distributed_config=DistributedConfig(tp_size=2))


def test_process_group_timeout_comes_from_the_argument_or_the_environment(monkeypatch):
    from modeling_ptt.distributed_ptt import process_group_timeout

    monkeypatch.delenv("PTT_PROCESS_GROUP_TIMEOUT", raising=False)
    assert process_group_timeout() is None  # torch's default
    monkeypatch.setenv("PTT_PROCESS_GROUP_TIMEOUT", "7.5")
    assert process_group_timeout().total_seconds() == 7.5
    assert process_group_timeout(3).total_seconds() == 3
    monkeypatch.setenv("PTT_PROCESS_GROUP_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="PTT_PROCESS_GROUP_TIMEOUT"):
        process_group_timeout()


def test_a_custom_tp_plan_is_refused(checkpoints):
    with pytest.raises(ValueError, match="tp_plan"):
        PTForCausalLM.from_pretrained(checkpoints / "n2", tp_plan={"model.layers.*.self_attn.q_proj": "colwise"})


# --- faults ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_rank_that_dies_or_hangs_mid_generate_makes_the_other_exit(checkpoints, fault):
    """Rank 1 SIGKILLs (or SIGSTOPs) itself at the 3rd token; rank 0 must exit non-zero, never hang.

    Started by hand rather than by torchrun: torchrun would itself terminate the survivor when rank 1 dies, which
    would hide whether the model's collectives fail on their own. A stopped rank keeps its connections open, so
    only the process-group timeout ($PTT_PROCESS_GROUP_TIMEOUT, here 5 s) ends the wait.
    """
    timeout_s, port = 5, free_port()
    ranks = []
    for rank in range(WORLD_SIZE):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), PTT_PROCESS_GROUP_TIMEOUT=str(timeout_s))
        ranks.append(subprocess.Popen(
            [sys.executable, str(WORKER), "die", "--fault", fault, "--models", str(checkpoints / "n4"),
             "--inputs", str(checkpoints / "inputs.pt"), "--out", str(checkpoints)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    survivor, victim = ranks
    try:
        # wait until the victim is gone (killed) or frozen (stopped)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while time.monotonic() < deadline and victim.poll() is None and not is_stopped(victim.pid):
            time.sleep(0.1)
        assert victim.poll() is not None or is_stopped(victim.pid), "rank 1 never reached its fault"
        faulted_at = time.monotonic()
        bound_s = timeout_s + 25  # the timeout, plus slack for 2 contended cores
        try:
            returncode = survivor.wait(timeout=bound_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still running {bound_s}s after rank 1's {fault}")
        output = survivor.stdout.read()
        assert returncode != 0, output[-3000:]
        assert "generate returned" not in output
        assert "RuntimeError" in output or "DistBackendError" in output, output[-3000:]
        print(f"rank 0 exited {returncode} {time.monotonic() - faulted_at:.1f}s after rank 1's {fault}")
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()


def is_stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("T")
    except (FileNotFoundError, IndexError):
        return False


# --- the launch scripts -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "[UNK] [PAD] the track runs on its own rank and merges with every other track after a block".split()
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    path = tmp_path_factory.mktemp("generate") / "model"
    model = tiny_pt(4, seed=5, vocab_size=len(words), pad_token_id=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def test_accelerate_launch_runs_generate_on_two_processes(model_with_tokenizer):
    path, model, tokenizer = model_with_tokenizer
    prompt = "the track runs on"
    expected = tokenizer.decode(model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=8,
                                               do_sample=False)[0], skip_special_tokens=True)
    done = run_launcher(
        [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configuration/accelerate/cpu_2proc.yaml"),
         "--main_process_port", str(free_port()), str(ROOT / "scripts/generate.py"), "--model", str(path),
         "--prompt", prompt, "--max-new-tokens", "8"],
        child_env(),
    )
    printed = [line for line in done.stdout.splitlines() if line.strip()]
    assert printed == [expected], "only rank 0 prints, and it prints the single-process text"
