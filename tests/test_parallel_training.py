"""scripts/train.py (modeling_ptt.training) across processes: track parallelism (`--track-parallel W`) against one process.

Every multi-process test starts a real launcher (torchrun) on gloo with `OMP_NUM_THREADS=1` per rank and a hard
timeout. The oracle is `train.py` in this process with the same seed and global batch: each rank of the launched job
records its parameters when training ends and the collectives of every optimizer step
(tests/support/parallel_train_worker.py).
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import LAUNCH_TIMEOUT_S, ROOT, SUPPORT, TRAIN_ARGS, child_env, free_port, run_launcher
from modeling_ptt import PTConfig
from modeling_ptt.training import checkpoint as checkpoints, init_from_scratch, trainer
from modeling_ptt.training.train_log import LOG_NAME, read_log
from modeling_ptt.training.trainer import config_values, training_function
from train import parse_args


WORKER = SUPPORT / "parallel_train_worker.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
MOE = ["--config", str(ROOT / "configuration" / "ptt-tiny-moe.json"), "--num-hidden-layers", "4"]
# clipping at 0.1 is active on every step of these runs (their gradient norms start above 1)
STEPS = ["--max-steps", "3", "--log-every", "1", "--eval-every", "3", "--eval-blocks", "4", "--max-grad-norm", "0.1",
         "--gradient-accumulation-steps", "2"]


def launch(tmp_path: Path, processes: int, args: list[str]) -> list[dict]:
    out = tmp_path / "ranks"
    out.mkdir()
    run_launcher([str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}", str(WORKER), str(out), "--", *args],
                 child_env(), timeout_s=120)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(processes)]


def losses(run: Path) -> list:
    return [(r["step"], r["loss"], r.get("aux_loss"), r["val_loss"]) for r in read_log(run / LOG_NAME)]


def assert_logs_close(got: list, expected: list) -> None:
    assert [r[0] for r in got] == [r[0] for r in expected]
    for a, b in zip(got, expected):
        for x, y in zip(a[1:], b[1:]):
            assert (x is None) == (y is None)
            if x is not None:
                assert x == pytest.approx(y, rel=1e-5, abs=1e-6), (a, b)


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_track_parallel_training_equals_one_process(corpus, tmp_path, model):
    """2 ranks x 1 track each == 1 process x 2 tracks, for AdamW steps with gradient accumulation and clipping: the same
    losses (fp32, rel 1e-5), every rank's track slices and its replica of the shared weights equal to the one
    process's weights, the shared weights bit-identical on both ranks, the same exported model. PT-MoE trains with
    its load-balancing loss, which must then be the mean over both ranks' routers."""
    common = ["--data", str(corpus), *TRAIN_ARGS, *STEPS, *(MOE if model == "moe" else [])]
    single = tmp_path / "single"
    training_function(parse_args([*common, "--output-dir", str(single)]))
    tp = tmp_path / "tp"
    ranks = launch(tmp_path, 2, [*common, "--output-dir", str(tp), "--track-parallel", "2"])

    assert_logs_close(losses(tp), losses(single))
    expected = load_file(single / "model.safetensors")
    for rank, seen in enumerate(ranks):
        assert seen["tracks"] == range(rank, rank + 1)
        for name, param in seen["parameters"].items():
            full = expected[name]
            want = full[rank : rank + 1] if param.shape != full.shape else full
            torch.testing.assert_close(param, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank} {name}: {m}")
    shared = [name for name, param in ranks[0]["parameters"].items() if param.shape == expected[name].shape]
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(shared)
    for name in shared:
        assert torch.equal(ranks[0]["parameters"][name], ranks[1]["parameters"][name]), name
    exported = load_file(tp / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-6)

    # collectives per optimizer step: per micro-batch one all_reduce per merge forward and per dispatch backward
    # (and one for PT-MoE's aux loss), then one for the clipping norm; one replica, so no loss reduction
    config = PTConfig(**config_values(parse_args(common)))
    micro_batches = 2
    per_micro_batch = 2 * config.num_sync_points + (model == "moe")
    for seen in ranks:
        assert seen["step_collectives"] == [{"c10d.allreduce_": micro_batches * per_micro_batch + 1}] * 3


def assert_shards_equal(seen: dict, expected: dict, num_shards: int, shard: int, tracks: range) -> None:
    """`seen` holds this rank's tracks `tracks` of every layer's tensor, and of every tensor then FSDP2's shard `shard`
    of `num_shards` (torch.chunk's pieces: a layer's tensors along dim 1, the others along dim 0)."""
    track_stacked = {name for name in expected if name.startswith("model.layers.")}
    for name, param in seen["parameters"].items():
        want = expected[name][tracks.start : tracks.stop] if name in track_stacked else expected[name]
        if num_shards > 1:
            assert seen["parameter_types"][name] == "DTensor", name
            want = want.chunk(num_shards, dim=1 if name in track_stacked else 0)[shard]
        torch.testing.assert_close(param, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", ["fsdp-accelerate", "2x2-ddp", "2x2-fsdp"])
def test_data_parallel_layouts_equal_one_process(corpus, tmp_path, layout):
    """FSDP2 over 2 processes (launched with accelerate's FSDP config file), and a (data, tracks) mesh of 2 x 2
    processes with DDP or FSDP2 over "data", each replica taking batch 2, == 1 process with batch 4: the same losses
    and weights, and every parameter of an FSDP2 run really is a sharded DTensor."""
    common = ["--data", str(corpus), *TRAIN_ARGS, *STEPS]
    single = tmp_path / "single"
    training_function(parse_args([*common, "--output-dir", str(single)]))
    out, run = tmp_path / "ranks", tmp_path / "run"
    out.mkdir()
    args = [*common, "--batch-size", "2", "--output-dir", str(run)]
    if layout == "fsdp-accelerate":
        launcher = [str(TORCHRUN.parent / "accelerate"), "launch", "--config_file",
                    str(ROOT / "configuration" / "accelerate" / "fsdp2_cpu_2proc.yaml"), "--main_process_port",
                    str(free_port())]
        processes = 2
    else:
        launcher, processes = [str(TORCHRUN), "--standalone", "--nproc-per-node=4"], 4
        args += ["--track-parallel", "2", *(["--fsdp"] if layout == "2x2-fsdp" else [])]
    run_launcher([*launcher, str(WORKER), str(out), "--", *args], child_env(), timeout_s=150)
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(processes)]

    assert_logs_close(losses(run), losses(single))
    expected = load_file(single / "model.safetensors")
    for rank, seen in enumerate(ranks):
        replica, track = (rank, 0) if processes == 2 else divmod(rank, 2)
        shards = 1 if layout == "2x2-ddp" else 2
        assert_shards_equal(seen, expected, shards, replica, seen["tracks"])
        assert seen["tracks"] == (range(2) if processes == 2 else range(track, track + 1))
    exported = load_file(run / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=1e-6)


def test_init_gives_every_rank_its_slice_of_the_single_process_draw():
    config = PTConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, num_tracks=4, mlp_layer_types=["dense", "sparse"], num_experts=2,
                      num_experts_per_tok=1, moe_intermediate_size=8)
    whole = init_from_scratch(config, seed=3, tracks=range(4)).state_dict()
    track_stacked = set(init_from_scratch(config, seed=3, tracks=range(4)).track_stacked_parameter_names())
    assert whole["model.layers.0.self_attn.q_proj.weight"].std() == pytest.approx(config.initializer_range, rel=0.2)
    assert not torch.equal(whole["model.layers.0.mlp.gate_proj.weight"], whole["model.layers.0.mlp.up_proj.weight"])
    for tracks in (range(0, 2), range(2, 4), range(3, 4)):
        part = init_from_scratch(config, seed=3, tracks=tracks).state_dict()
        assert part.keys() == whole.keys()
        for name, tensor in whole.items():
            want = tensor[tracks.start : tracks.stop] if name in track_stacked else tensor
            assert torch.equal(part[name], want), (tracks, name)
    other_seed = init_from_scratch(config, seed=4, tracks=range(4)).state_dict()
    assert not torch.equal(other_seed["lm_head.weight"], whole["lm_head.weight"])


@pytest.mark.parametrize(
    "processes, track_parallel, extra, message",
    [
        (2, 3, [], r"--track-parallel 3 does not divide num_tracks=2"),
        (3, 2, [], r"--track-parallel 2 does not divide the 3 launched processes"),
        (1, 0, [], r"--track-parallel 0: must be at least 1"),
        (2, 2, ["--mixed-precision", "fp16"], r"fp16 .*--track-parallel"),
        (2, 2, ["--fsdp"], r"FSDP2 shards over .* 2 processes with --track-parallel 2 make one replica"),
    ],
    ids=["w-not-dividing-tracks", "w-not-dividing-processes", "w-zero", "fp16", "fsdp-without-replicas"],
)
def test_impossible_layouts_fail_before_any_process_group_or_weight(tmp_path, monkeypatch, processes, track_parallel,
                                                                    extra, message):
    """What every rank checks first: WORLD_SIZE says how many processes the launcher started, and no process group
    is started (this process has no peers, so starting one would hang)."""
    monkeypatch.setenv("WORLD_SIZE", str(processes))
    monkeypatch.setattr(trainer, "prepare_data", lambda args: pytest.fail("data read before the layout was checked"))
    with pytest.raises(ValueError, match=message):
        training_function(parse_args(["--output-dir", str(tmp_path), *TRAIN_ARGS, "--track-parallel",
                                      str(track_parallel), *extra]))
    assert not torch.distributed.is_initialized()


def test_every_rank_names_the_bad_layout_on_its_own(tmp_path):
    """Both ranks of a 2-process job fail by themselves, naming the numbers, without waiting for a peer. (Started by
    hand: torchrun would terminate the second rank as soon as the first one fails.)"""
    port = free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "train.py"), *TRAIN_ARGS, "--track-parallel", "4", "--output-dir",
             str(tmp_path)],
            env=child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    for process in ranks:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        assert process.returncode != 0
        assert "ValueError: --track-parallel 4 does not divide num_tracks=2" in output, output[-3000:]


RESUME = ["--max-steps", "4", "--log-every", "1", "--eval-every", "2", "--eval-blocks", "4",
          "--gradient-accumulation-steps", "2"]
FIRST_HALF = ["--save-every", "2", "--stop-at-step", "2"]


def train_on_two_ranks(tmp_path: Path, run: Path, args: list[str]) -> list[dict]:
    """What each rank recorded (tests/support/parallel_train_worker.py, drawing random numbers every step), when the
    run ends (parameters and generator states only where it exports: not for a run stopped early)."""
    out = Path(tempfile.mkdtemp(dir=tmp_path))
    run_launcher([str(TORCHRUN), "--standalone", "--nproc-per-node=2", str(WORKER), str(out), "--draw-random", "--",
                  *args, "--track-parallel", "2", "--output-dir", str(run)], child_env(), timeout_s=120)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def assert_same_generator_states(got: dict, expected: dict) -> None:
    assert torch.equal(got["torch"], expected["torch"])
    (kind, keys, *rest), (expected_kind, expected_keys, *expected_rest) = got["numpy"], expected["numpy"]
    assert (kind, rest) == (expected_kind, expected_rest) and (keys == expected_keys).all()
    assert got["python"] == expected["python"]


def test_track_parallel_resume_continues_exactly(corpus, tmp_path):
    """2 ranks: 4 steps straight == 2 steps, a torch.distributed.checkpoint (every rank writes its own safetensors
    shards; nothing pickled), resume on 2 ranks, 2 more: the same losses and weights, bitwise, and every rank ends
    with the generator states (torch, numpy, Python) of the uninterrupted run. Every step draws from them, a different
    amount on each rank (as dropout or sampled data would), so a resume that restored no rank's states, or another
    rank's, would end elsewhere."""
    common = ["--data", str(corpus), *TRAIN_ARGS, *RESUME]
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight_ranks = train_on_two_ranks(tmp_path, straight, common)
    train_on_two_ranks(tmp_path, split, [*common, *FIRST_HALF])
    checkpoint = checkpoints.find_resumable(split)
    assert checkpoint.name == "checkpoint-2"
    # one safetensors shard per rank; the rest is JSON (nothing a loader would unpickle)
    names = sorted(path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*") if path.is_file())
    assert [name for name in names if not name.endswith(".safetensors")] == [
        checkpoints.MANIFEST, "schedule.json", checkpoints.TRAINER_STATE]
    assert [name for name in names if name.startswith("rng/")] == ["rng/rank-0.safetensors", "rng/rank-1.safetensors"]
    assert len(names) == 7
    resumed_ranks = train_on_two_ranks(tmp_path, split, [*common, "--save-every", "2", "--resume"])
    assert losses(split) == losses(straight)
    resumed = load_file(split / "model.safetensors")
    for name, tensor in load_file(straight / "model.safetensors").items():
        assert torch.equal(resumed[name], tensor), name
    assert not torch.equal(straight_ranks[0]["rng_states"]["torch"], straight_ranks[1]["rng_states"]["torch"])
    for got, expected in zip(resumed_ranks, straight_ranks, strict=True):
        assert_same_generator_states(got["rng_states"], expected["rng_states"])


def test_resume_with_another_global_batch_names_both_layouts(corpus, tmp_path):
    common = ["--data", str(corpus), *TRAIN_ARGS, "--max-steps", "4", "--eval-blocks", "4", "--track-parallel", "1"]
    training_function(parse_args([*common, "--output-dir", str(tmp_path), "--save-every", "2", "--stop-at-step", "2"]))
    with pytest.raises(ValueError, match=r"written by 1 data-parallel replicas x --batch-size 4 .* this job has 1 x 2"):
        training_function(parse_args([*common, "--output-dir", str(tmp_path), "--resume", "--batch-size", "2"]))


@pytest.fixture(scope="module")
def one_process_run(corpus, tmp_path_factory) -> Path:
    """The oracle of the kill tests: RESUME's 4 steps in this process with the global batch of 4."""
    run = tmp_path_factory.mktemp("one_process")
    training_function(parse_args(["--data", str(corpus), *TRAIN_ARGS, *RESUME, "--output-dir", str(run)]))
    return run


@pytest.mark.parametrize("layout", ["ddp", "fsdp", "tracks", "2x2-fsdp"])
def test_a_run_killed_while_saving_resumes_in_its_layout_and_in_one_process(corpus, tmp_path, one_process_run,
                                                                            layout):
    """Data parallel (2 processes), FSDP2 (2), track parallel (2 ranks of one track each) and FSDP2 over the replicas
    of a (data, tracks) mesh (2 x 2), with a global batch of 4 and a save every step: rank 0 SIGKILLed after step 3's
    files are written, before its manifest, leaves checkpoint-2 whole and the half-written save under a name resume
    ignores. Resumed in the same layout, and resumed by ONE process holding everything (same global batch), the run
    ends with the losses and weights of one process trained straight through (fp32, rel 1e-5)."""
    processes, extra = {"ddp": (2, []), "fsdp": (2, ["--fsdp"]), "tracks": (2, ["--track-parallel", "2"]),
                        "2x2-fsdp": (4, ["--track-parallel", "2", "--fsdp"])}[layout]
    replicas = processes // (2 if "--track-parallel" in extra else 1)
    run, alone = tmp_path / "run", tmp_path / "alone"
    common = ["--data", str(corpus), *TRAIN_ARGS, *RESUME, "--save-every", "1"]
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={processes}", str(ROOT / "scripts" / "train.py"),
               *common, *extra, "--batch-size", str(4 // replicas), "--output-dir", str(run)]
    killed = run_launcher(command, child_env(**{checkpoints.KILL_AT_ENV: "before-manifest@3"}), timeout_s=150,
                          check=False)
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert sorted(path.name for path in run.glob("*checkpoint-*")) == [".saving-checkpoint-3", "checkpoint-2"]
    saved = {path.relative_to(run / "checkpoint-2").as_posix() for path in (run / "checkpoint-2").rglob("*")}
    assert {f"rng/rank-{rank}.safetensors" for rank in range(processes)} <= saved
    shutil.copytree(run, alone)

    run_launcher([*command, "--resume"], child_env(), timeout_s=150)
    # every layout writes the one format: a single process reads each of them
    with pytest.warns(UserWarning, match=f"saved by {processes} processes, this job has 1"):
        training_function(parse_args([*common, "--output-dir", str(alone), "--resume"]))
    expected = load_file(one_process_run / "model.safetensors")
    for resumed_run in (run, alone):
        assert_logs_close(losses(resumed_run), losses(one_process_run))
        resumed = load_file(resumed_run / "model.safetensors")
        for name, tensor in expected.items():
            torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{resumed_run.name} {name}: {m}")
