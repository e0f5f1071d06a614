"""modeling_ptt.training.checkpoint: kills at any moment leave only whole checkpoints, resume is exact after each, nothing
is unpickled on load, and an incomplete or corrupt checkpoint is refused naming its directory and the file."""

import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kill_soak
from helpers import TRAIN_ARGS
from modeling_ptt.training import checkpoint as checkpoints
from modeling_ptt.training.trainer import training_function
from train import parse_args


# a one-process checkpoint's tensors: torch.distributed.checkpoint's one shard
SHARD = "shard-00001-model-00001-of-00001.safetensors"
STEPS = ["--max-steps", "8", "--log-every", "1", "--eval-every", "4", "--eval-blocks", "4", "--save-every", "4"]


def run_train(corpus: Path, output_dir: Path, *extra: str) -> dict:
    return training_function(parse_args(["--data", str(corpus), "--output-dir", str(output_dir), *TRAIN_ARGS, *STEPS,
                                         *extra]))


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 8-step run, and the same run stopped after step 4 with its checkpoint."""
    base = tmp_path_factory.mktemp("runs")
    run_train(corpus, base / "straight")
    run_train(corpus, base / "stopped", "--stop-at-step", "4")
    return {"straight": base / "straight", "stopped": base / "stopped"}


def copy_of_stopped_run(runs, tmp_path) -> tuple[Path, Path]:
    output_dir = shutil.copytree(runs["stopped"], tmp_path / "run")
    return output_dir, checkpoints.checkpoint_path(output_dir, 4)


def test_kills_at_every_phase_of_a_save_and_at_random_moments_resume_exactly(corpus, tmp_path):
    """train.py in a child process, SIGKILLed at each phase of a save (files written, manifest written, renamed,
    an old checkpoint moved aside, half deleted) and twice at a random moment of a step, resumed after each: every
    `checkpoint-*` stays whole, the leftovers are what that phase leaves, and the end is bitwise the
    uninterrupted run's."""
    runner = kill_soak.Runner(corpus, [*kill_soak.RUN_ARGS, "--max-steps", "14"], timeout_s=120)
    runner.run(tmp_path / "straight", resume=False)
    killed = tmp_path / "killed"
    killed.mkdir()
    phases = [
        # (kill, checkpoints and leftovers it leaves: the run resumed from the checkpoint the previous one left)
        (kill_soak.Kill("before-manifest", 2), [1], [".saving-checkpoint-2"]),
        (kill_soak.Kill("before-rename", 4), [3], [".saving-checkpoint-4"]),  # whole: renamed into place next
        (kill_soak.Kill("before-rotate", 5), [3, 4, 5], []),
        (kill_soak.Kill("rotating", 6), [4, 5, 6], [".deleting-checkpoint-3"]),
        (kill_soak.Kill("deleting", 8), [8], [".deleting-checkpoint-7"]),
    ]
    # a random moment after step 10's log line, before step 11's; then one after step 12's
    draw = random.Random()
    random_moments = [kill_soak.Kill(step=step, fraction=draw.random()) for step in (10, 12)]
    events = kill_soak.kill_and_resume(runner, killed, [kill for kill, _, _ in phases] + random_moments)

    for (kill, steps, leftovers), event in zip(phases, events):
        assert event["killed"], f"{kill} was not reached"
        assert (event["checkpoints"], event["leftovers"]) == (steps, leftovers), event
    assert not (killed / ".deleting-checkpoint-7" / checkpoints.MANIFEST).exists()  # killed part-way through
    assert all(event["killed"] for event in events[len(phases) :]), events
    assert kill_soak.differences(tmp_path / "straight", killed) == []


def test_resume_and_reload_unpickle_nothing(runs, corpus, tmp_path, monkeypatch):
    """With pickle and `torch.load(weights_only=False)` refusing to run, resuming the stopped run and loading its
    final model and tokenizer still work, and end bitwise equal to the uninterrupted run."""
    from transformers import AutoTokenizer

    from modeling_ptt import PTForCausalLM

    output_dir, _ = copy_of_stopped_run(runs, tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a load path unpickled")

    class RefusingUnpickler(pickle.Unpickler):
        def load(self):
            refuse()

    unsafe_load = torch.load

    def weights_only_load(*args, weights_only=None, **kwargs):
        # torch's own default when `weights_only` is not given
        default = kwargs.get("pickle_module") is None and not os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
        if not (default if weights_only is None else weights_only):
            refuse()
        return unsafe_load(*args, weights_only=True, **kwargs)

    for module, name, replacement in [(pickle, "load", refuse), (pickle, "loads", refuse),
                                      (pickle, "Unpickler", RefusingUnpickler), (torch, "load", weights_only_load),
                                      (torch.serialization, "load", weights_only_load)]:
        monkeypatch.setattr(module, name, replacement)
    saved = io.BytesIO()
    torch.save({"lr": 1.0}, saved)
    for unpickle in (lambda: pickle.loads(pickle.dumps(1)), lambda: torch.load(io.BytesIO(saved.getvalue()),
                                                                                weights_only=False)):
        with pytest.raises(AssertionError, match="unpickled"):  # the trap works
            unpickle()

    run_train(corpus, output_dir, "--resume")
    model = PTForCausalLM.from_pretrained(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    monkeypatch.undo()

    assert tokenizer.decode(tokenizer("My lord.")["input_ids"]) == "My lord."
    expected = load_file(runs["straight"] / "model.safetensors")
    loaded = model.state_dict()
    assert expected.keys() <= loaded.keys()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: (c / checkpoints.MANIFEST).unlink(), "is incomplete: it has no manifest.json"),
        (lambda c: (c / SHARD).unlink(), f"{SHARD} is missing"),
        (lambda c: (c / "rng" / "rank-0.safetensors").unlink(), "rng/rank-0.safetensors is missing"),
    ],
    ids=["no-manifest", "tensors-missing", "rng-missing"],
)
def test_resume_from_an_incomplete_checkpoint_names_what_is_missing(runs, corpus, tmp_path, damage, message):
    output_dir, checkpoint = copy_of_stopped_run(runs, tmp_path)
    damage(checkpoint)
    with pytest.raises(checkpoints.CheckpointError, match=message) as error:
        run_train(corpus, output_dir, "--resume", str(checkpoint))
    assert str(checkpoint) in str(error.value)
    with pytest.warns(UserWarning, match=message):  # and a bare --resume passes it over
        assert checkpoints.find_resumable(output_dir) is None


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def overwrite_with_garbage(file: Path) -> None:
    file.write_bytes(bytes(range(256)) * (file.stat().st_size // 256) + b"x" * (file.stat().st_size % 256))


def rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest agree with the files, as if they had been saved damaged: the reader's own error shows."""
    manifest = json.loads((checkpoint / checkpoints.MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"size": (checkpoint / name).stat().st_size,
                                   "sha256": checkpoints._sha256(checkpoint / name)}
    (checkpoint / checkpoints.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "name, damage, message",
    [
        (SHARD, truncate, f"{SHARD} has .* bytes where the manifest lists"),
        (SHARD, overwrite_with_garbage, f"{SHARD} is not what was saved"),
        (SHARD, overwrite_with_garbage, r"cannot load its model and optimizer shards"),
        (SHARD, truncate, r"cannot load its model and optimizer shards"),
        (checkpoints.SCHEDULE, lambda f: f.write_text('{"scheduler": {}}'), "cannot load schedule.json"),
        (checkpoints.SCHEDULE, lambda f: f.write_text("not json"), "cannot load schedule.json"),
    ],
    ids=["tensors-truncated", "tensors-garbage", "tensors-garbage-saved-so", "tensors-truncated-saved-so",
         "optimizer-groups-gone", "schedule-not-json"],
)
def test_resume_from_a_corrupt_checkpoint_names_the_directory_and_the_file(runs, corpus, tmp_path, name, damage,
                                                                           message):
    output_dir, checkpoint = copy_of_stopped_run(runs, tmp_path)
    damage(checkpoint / name)
    if message.startswith("cannot load"):
        rewrite_manifest(checkpoint)
    with pytest.raises(checkpoints.CheckpointError, match=message) as error:
        run_train(corpus, output_dir, "--resume", str(checkpoint))
    assert f"checkpoint {checkpoint}" in str(error.value)


def test_leftovers_are_tidied_and_a_save_killed_after_its_manifest_is_kept(tmp_path):
    """What each kind of killed save leaves, and what the next start makes of it; resume takes the newest whole."""
    def write(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(b"0123456789")

    for step in (1, 2, 3):
        checkpoints.save_atomically(tmp_path, step, write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]  # rotation keeps the newest
    assert checkpoints.verify(tmp_path / "checkpoint-3")["files"] == {
        "weights.bin": {"size": 10, "sha256": checkpoints._sha256(tmp_path / "checkpoint-3" / "weights.bin")}}

    # killed after the manifest (whole, renamed into place), before it (removed), and during a deletion (removed)
    shutil.copytree(tmp_path / "checkpoint-3", tmp_path / ".saving-checkpoint-5")
    shutil.copytree(tmp_path / "checkpoint-3", tmp_path / ".saving-checkpoint-6")
    (tmp_path / ".saving-checkpoint-6" / checkpoints.MANIFEST).unlink()
    shutil.copytree(tmp_path / ".saving-checkpoint-6", tmp_path / ".deleting-checkpoint-2")
    # damaged from outside (not by a kill): skipped with a warning, and left for a person to look at
    shutil.copytree(tmp_path / "checkpoint-3", tmp_path / "checkpoint-7")
    (tmp_path / "checkpoint-7" / "weights.bin").write_bytes(b"012")

    checkpoints.clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-5", "checkpoint-7"]
    with pytest.warns(UserWarning, match="checkpoint-7 is incomplete or damaged: weights.bin has 3 bytes"):
        assert checkpoints.find_resumable(tmp_path) == tmp_path / "checkpoint-5"


def test_a_checkpoint_of_the_old_data_parallel_format_is_refused_naming_it(corpus, tmp_path):
    """The single-file format of 0.2.0's data-parallel mode (one process without --track-parallel wrote it) does not
    resume: the error names the format and the last version that reads it."""
    def write_old_format(directory: Path) -> None:
        for name in checkpoints.OLD_FORMAT:
            (directory / name).write_text("{}")
        (directory / checkpoints.TRAINER_STATE).write_text(json.dumps({"step": 4, "position": 4, "num_processes": 1}))

    checkpoints.save_atomically(tmp_path, 4, write_old_format)
    with pytest.raises(checkpoints.CheckpointError, match=r"single-file format .* modeling-ptt 0\.2\.0 is the last "
                                                          r"version to read"):
        run_train(corpus, tmp_path, "--resume")
