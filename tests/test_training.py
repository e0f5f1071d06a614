"""scripts/train.py and modeling_ptt.training: bad data, exact resume, atomic checkpoints, the saved model, DDP under accelerate, the demo."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from modeling_ptt import PTForCausalLM
from modeling_ptt.training import checkpoint as checkpoints, init_from_scratch
from modeling_ptt.training.data import BlockSampler, prepare_data
from modeling_ptt.training.train_log import LOG_NAME, PLOT_NAME, read_log
from modeling_ptt.training.trainer import build_config, training_function, validation_loss

from helpers import ROOT, TRAIN_ARGS, child_env, free_port, require, run_launcher
from train import parse_args


def run_train(corpus: Path, output_dir: Path, *extra: str) -> dict:
    return training_function(parse_args(["--data", str(corpus), "--output-dir", str(output_dir), *TRAIN_ARGS, *extra]))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: (d / "empty.txt").write_text("  \n") and d / "empty.txt", "is empty"),
        (lambda d: (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1")) and d / "latin1.txt",
         "is not UTF-8"),
        (lambda d: (d / "short.txt").write_text("Too short.\n" * 3) and d / "short.txt", "shorter than one block"),
    ],
    ids=["missing", "empty", "not-utf8", "shorter-than-a-block"],
)
def test_bad_data_names_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        training_function(parse_args(["--data", str(path), "--output-dir", str(tmp_path / "out"), *TRAIN_ARGS]))
    assert path.name in str(error.value)


def test_resume_continues_exactly(corpus, tmp_path):
    """8 steps straight == 4 steps, a killed save, resume, 4 more: same losses and weights (fp32 CPU, bitwise)."""
    common = ["--max-steps", "8", "--log-every", "1", "--eval-every", "2", "--gradient-accumulation-steps", "2",
              "--eval-blocks", "4"]
    straight = tmp_path / "straight"
    run_train(corpus, straight, *common)

    split = tmp_path / "split"
    run_train(corpus, split, *common, "--save-every", "4", "--stop-at-step", "4")
    assert checkpoints.find_resumable(split).name == "checkpoint-4"
    assert not (split / "config.json").exists()  # a stopped job exports nothing
    # a save killed half-way leaves its temporary directory behind: resume must ignore it
    killed = split / f"{checkpoints.SAVING}checkpoint-6"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"truncated")
    run_train(corpus, split, *common, "--save-every", "4", "--resume")

    def losses(run):
        return [(r["step"], r["loss"], r["val_loss"]) for r in read_log(run / LOG_NAME)]

    assert [step for step, _, _ in losses(split)] == list(range(9))
    assert losses(split) == losses(straight)
    weights_straight = load_file(straight / "model.safetensors")
    weights_split = load_file(split / "model.safetensors")
    assert weights_straight.keys() == weights_split.keys()
    for name, tensor in weights_straight.items():
        assert torch.equal(tensor, weights_split[name]), name


def test_output_loads_through_auto_classes(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    summary = run_train(corpus, out, "--max-steps", "20", "--eval-every", "10", "--lr", "1e-2")
    records = read_log(out / LOG_NAME)
    assert {"step", "loss", "val_loss", "val_ppl", "tokens_per_s", "lr"} <= set(records[-1])
    assert records[-1]["val_loss"] == summary["val_loss"] < summary["val_loss_before"]
    assert (out / PLOT_NAME).stat().st_size > 0
    assert (out / "modeling_parallel_track.py").exists() and (out / "configuration_ptt.py").exists()

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.num_tracks == 2 and model.config.vocab_size == len(tokenizer)
    # the reloaded model scores the held-out blocks as training last did
    _, _, val_blocks, _ = prepare_data(parse_args(["--data", str(corpus), "--tokenizer", str(out), *TRAIN_ARGS]))
    reloaded = validation_loss(model, val_blocks[:64], 4, torch.device("cpu"))
    assert reloaded == pytest.approx(summary["val_loss"], abs=1e-5)
    text = tokenizer.decode(tokenizer("My lord, the king.")["input_ids"])
    assert text == "My lord, the king."


# PT-MoE without its load-balancing term, which is computed per process and so differs from one process's
MOE_WITHOUT_AUX_LOSS = ["--config", str(ROOT / "configuration" / "ptt-tiny-moe.json"), "--num-hidden-layers", "4",
                        "--router-aux-loss-coef", "0"]


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_ddp_two_processes_match_one_process(corpus, tmp_path, model):
    """`accelerate launch` with 2 CPU processes (gloo) x batch 2 == 1 process x batch 4: DDP averages gradients of
    the same 4 blocks per step (the sampler gives process r the r-th half of the single process's batch). PT-MoE
    also ends with the experts' token shares, computed through the DDP-wrapped model."""
    common = ["--data", str(corpus), *TRAIN_ARGS, "--max-steps", "3", "--log-every", "1", "--eval-every", "3",
              "--eval-blocks", "4", *(MOE_WITHOUT_AUX_LOSS if model == "moe" else [])]
    # accelerate's multi-process launcher is torchrun (`--cpu` alone would start one process); without GPUs
    # train.py runs the processes on the CPU over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    ddp = tmp_path / "ddp"
    run_launcher([*launch, str(ROOT / "scripts" / "train.py"), *common, "--output-dir", str(ddp),
                  "--batch-size", "2"], child_env(), timeout_s=180)
    single = tmp_path / "single"
    training_function(parse_args([*common, "--output-dir", str(single), "--batch-size", "4"]))

    ddp_log, single_log = read_log(ddp / LOG_NAME), read_log(single / LOG_NAME)
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == [0, 1, 2, 3]
    for a, b in zip(ddp_log[1:], single_log[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-5)
    assert ddp_log[-1]["val_loss"] == pytest.approx(single_log[-1]["val_loss"], rel=1e-5)


def test_demo_quick(tmp_path):
    """The README's main command in its one-minute mode: trains, beats the unigram baseline, reloads as remote code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # the reload must come from the saved code, not from this checkout
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--quick", "--output-dir",
                             str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "reloaded through AutoModelForCausalLM(trust_remote_code=True) as transformers_modules." in result.stdout
    assert "2 (PT, D=2) vs 8 (tensor parallelism" in result.stdout
    records = read_log(tmp_path / "demo" / LOG_NAME)
    assert records[-1]["val_ppl"] < records[0]["val_ppl"] / 5


def test_datasets_dataset_as_data(corpus, tmp_path):
    """A 🤗 datasets dataset (here a saved directory) trains like the same text given as files."""
    datasets = require("datasets")
    texts = [path.read_text(encoding="utf-8") for path in sorted(corpus.glob("*.txt"))]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / "dataset")
    args = ["--max-steps", "2", "--eval-blocks", "4"]
    from_dataset = training_function(parse_args(["--dataset", str(tmp_path / "dataset"), "--output-dir",
                                                 str(tmp_path / "a"), *TRAIN_ARGS, *args]))
    from_files = run_train(corpus, tmp_path / "b", *args)
    assert from_dataset["val_loss"] == from_files["val_loss"]


def test_pt_moe_trains_and_logs_its_aux_loss_and_expert_shares(corpus, tmp_path):
    """The logged loss and aux_loss of step 1 are the untrained model's on the first batch (replayed from the seed),
    and the summary's expert shares are the saved model's top-k choices on the validation blocks, counted here."""
    moe = ["--config", str(ROOT / "configuration" / "ptt-tiny-moe.json"), "--num-hidden-layers", "4",
           "--eval-blocks", "8"]
    out = tmp_path / "moe"
    summary = run_train(corpus, out, *moe, "--max-steps", "12", "--log-every", "1", "--eval-every", "12",
                        "--lr", "1e-2")
    assert summary["val_loss"] < summary["val_loss_before"]

    args = parse_args(["--data", str(corpus), "--output-dir", str(out), *TRAIN_ARGS, *moe])
    set_seed(args.seed)  # what train() does before it reads the data
    tokenizer, train_blocks, val_blocks, _ = prepare_data(args)
    config = build_config(args, tokenizer)
    model = init_from_scratch(config, args.seed, range(config.num_tracks)).train()
    first = train_blocks[BlockSampler(len(train_blocks), args.batch_size, 1, 0, args.seed).indices(0)]
    with torch.no_grad():
        expected = model(input_ids=first, labels=first, use_cache=False)
    step_1 = next(record for record in read_log(out / LOG_NAME) if record["step"] == 1)
    assert step_1["aux_loss"] == pytest.approx(expected.aux_loss.item(), rel=1e-5)
    assert step_1["loss"] == pytest.approx(expected.loss.item(), rel=1e-5)

    trained = PTForCausalLM.from_pretrained(out).eval()
    config = trained.config
    counts = torch.zeros(config.mlp_layer_types.count("sparse"), config.num_tracks, config.num_experts)
    for batch in val_blocks[: args.eval_blocks].split(args.batch_size):
        with torch.no_grad():
            router_logits = trained(batch, use_cache=False, output_router_logits=True).router_logits
        for layer, layer_logits in enumerate(router_logits):  # [tracks, tokens, experts]
            for track, logits in enumerate(layer_logits):
                chosen = logits.topk(config.num_experts_per_tok, dim=-1).indices.flatten()
                counts[layer, track] += torch.bincount(chosen, minlength=config.num_experts)
    torch.testing.assert_close(torch.tensor(summary["expert_token_shares"]), counts / counts.sum(-1, keepdim=True))
