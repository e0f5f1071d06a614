"""Uptraining (`scripts/train.py --uptrain-from`, modeling_ptt.training.uptraining): a PT model from a trained dense
one. The student starts as its teacher, a short run lowers the distillation loss and exports an ordinary PT folder,
a kill and resume changes nothing, and two track-parallel ranks train what one process trains."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from helpers import TRAIN_ARGS, randomize_, run_without_package, tiny_llama, tiny_model
from modeling_ptt import PTForCausalLM
from modeling_ptt.training import checkpoint as checkpoints
from modeling_ptt.training.data import prepare_data
from modeling_ptt.training.train_log import LOG_NAME, read_log
from modeling_ptt.training.trainer import training_function
from modeling_ptt.training.uptraining import distillation_loss, load_teacher, student_from_teacher
from test_parallel_training import assert_logs_close, launch, losses
from train import parse_args

# the student of a 2-layer teacher: 2 tracks merged once, after the last layer (from 4 merges in tensor-parallel mode)
STUDENT = ["--num-tracks", "2", "--track-block-depth", "2", "--block-size", "32", "--batch-size", "4",
           "--warmup-steps", "2", "--eval-blocks", "4", "--log-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def teacher_dir(corpus, tmp_path_factory) -> Path:
    """A dense model (one track) trained for a few steps by train.py, saved with its tokenizer."""
    out = tmp_path_factory.mktemp("teacher")
    training_function(parse_args(["--data", str(corpus), "--output-dir", str(out), *TRAIN_ARGS, "--num-tracks", "1",
                                  "--max-steps", "6", "--eval-every", "6", "--eval-blocks", "4"]))
    return out


def uptrain(corpus: Path, teacher_dir: Path, output_dir: Path, *extra: str) -> dict:
    return training_function(parse_args(["--data", str(corpus), "--uptrain-from", str(teacher_dir), "--output-dir",
                                         str(output_dir), *STUDENT, *extra]))


@pytest.fixture(scope="module")
def batch(corpus, teacher_dir) -> torch.Tensor:
    _, _, val_blocks, _ = prepare_data(parse_args(["--data", str(corpus), "--tokenizer", str(teacher_dir),
                                                   "--block-size", "32"]))
    return val_blocks[:8]


def test_the_student_starts_as_its_teacher(teacher_dir, batch):
    """Step 0 of the conversion: the teacher in tensor-parallel layout, its logits (atol 1e-5); a rank's student holds
    its slice of every track-stacked tensor."""
    teacher = load_teacher(teacher_dir)
    student = student_from_teacher(teacher, 2, range(2))
    assert student.config.sync_mode == "tensor_parallel"
    with torch.no_grad():
        torch.testing.assert_close(student(batch).logits, teacher(batch).logits, atol=1e-5, rtol=0)
    second = student_from_teacher(teacher, 2, range(1, 2))
    for name in student.track_stacked_parameter_names():
        assert torch.equal(second.get_parameter(name), student.get_parameter(name)[1:2]), name


def test_teachers_are_dense_llamas_or_one_track_pt_models(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert type(load_teacher(tmp_path / "llama")).__name__ == "LlamaForCausalLM"
    tiny_model().save_pretrained(tmp_path / "pt")
    with pytest.raises(ValueError, match="num_tracks=4 with sync_mode='track_block'"):
        load_teacher(tmp_path / "pt")


def test_uptraining_lowers_the_distillation_loss_and_exports_an_ordinary_pt_model(corpus, teacher_dir, batch,
                                                                                 tmp_path):
    """From a teacher with random weights (std 0.2; the few-step teacher's logits are nearly uniform, so its block-mode
    student is nearly the same function already) and with the distillation term weighted up, so that it dominates."""
    teacher = randomize_(load_teacher(teacher_dir))
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(tmp_path / "teacher")
    out = tmp_path / "uptrained"
    uptrain(corpus, tmp_path / "teacher", out, "--max-steps", "8", "--eval-every", "8", "--distill-weight", "10",
            "--lr", "1e-3")
    converted = student_from_teacher(teacher, 2, range(2))
    converted.set_sync_schedule(track_block_depth=2, sync_mode="track_block")
    uptrained = PTForCausalLM.from_pretrained(out)
    assert (uptrained.config.num_tracks, uptrained.config.track_block_depth) == (2, 2)
    assert uptrained.config.sync_mode == "track_block"
    with torch.no_grad():
        teacher_logits = teacher(batch).logits
        before = distillation_loss(converted(batch).logits, teacher_logits)
        after = distillation_loss(uptrained(batch).logits, teacher_logits)
    assert after < 0.9 * before, (before, after)
    assert (out / "tokenizer.json").is_file()
    torch.save({"batch": batch, "logits": uptrained(batch).logits.detach()}, tmp_path / "expected.pt")
    result = run_without_package(f"""
        import torch
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(expected["batch"]).logits, expected["logits"], atol=1e-5, rtol=0)
        print("remote code OK")
        """, cwd=tmp_path)
    assert "remote code OK" in result.stdout, result.stderr[-3000:]


def test_a_killed_and_resumed_uptraining_equals_an_uninterrupted_one(corpus, teacher_dir, tmp_path):
    """With merges removed at mid-run (`--merge-schedule 1,2`), so that the resumed job must pick up the stage."""
    common = ["--max-steps", "6", "--eval-every", "3", "--merge-schedule", "1,2"]
    straight = tmp_path / "straight"
    uptrain(corpus, teacher_dir, straight, *common)
    split = tmp_path / "split"
    uptrain(corpus, teacher_dir, split, *common, "--save-every", "3", "--stop-at-step", "3")
    assert checkpoints.find_resumable(split).name == "checkpoint-3"
    uptrain(corpus, teacher_dir, split, *common, "--save-every", "3", "--resume")

    def logged(run):
        return [(r["step"], r["loss"], r["val_loss"]) for r in read_log(run / LOG_NAME)]

    assert logged(split) == logged(straight)
    expected = load_file(straight / "model.safetensors")
    for name, tensor in load_file(split / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name


def test_track_parallel_uptraining_equals_one_process(corpus, teacher_dir, tmp_path):
    common = ["--data", str(corpus), "--uptrain-from", str(teacher_dir), *STUDENT, "--max-steps", "3",
              "--eval-every", "3", "--merge-schedule", "1,2,2"]
    single = tmp_path / "single"
    training_function(parse_args([*common, "--output-dir", str(single)]))
    parallel = tmp_path / "parallel"
    launch(tmp_path, 2, [*common, "--output-dir", str(parallel), "--track-parallel", "2"])
    assert_logs_close(losses(parallel), losses(single))
    expected = load_file(single / "model.safetensors")
    for name, tensor in load_file(parallel / "model.safetensors").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("extra, message", [
    (["--hidden-size", "64"], "hidden_size cannot be set"),
    (["--merge-schedule", "1,2,1"], "ending at track_block_depth=2"),
], ids=["shape-override", "schedule-end"])
def test_settings_the_teacher_fixes_or_a_bad_schedule_are_refused(corpus, teacher_dir, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        uptrain(corpus, teacher_dir, tmp_path / "out", "--max-steps", "2", *extra)

