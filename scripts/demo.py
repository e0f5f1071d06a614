#!/usr/bin/env python
"""The life of a PT model on real text, in minutes on a laptop CPU (what `make demo` runs).

Trains a small PT model (4 tracks, 4 layers, merged every D=2 layers) from scratch on the Shakespeare plays with
`scripts/train.py`, prints validation perplexity before and after next to the unigram baseline, reloads the saved
directory through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` (the model's own code saved
beside the weights, not this package), generates a few lines, and counts the sync points against tensor
parallelism. `--quick` is the short version CI runs.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from script_io import check_output_dir


SCRIPTS = Path(__file__).resolve().parent
PROMPTS = ["KING. My lords,", "Enter Hamlet.\n\n  Ham. To be, or not"]


def train_demo_model(output_dir: str, max_steps: int) -> dict:
    # a sibling script (Python puts this script's folder on sys.path), imported here rather than at the top: it
    # imports modeling_ptt, which the reload process must never see
    import train
    from modeling_ptt.training import trainer
    from modeling_ptt.training.train_log import LOG_NAME, PLOT_NAME

    print(f"== training a PT model on the Shakespeare plays ({max_steps} steps, {torch.get_num_threads()} threads)")
    summary = trainer.training_function(train.parse_args([
        "--output-dir", output_dir, "--max-steps", str(max_steps), "--num-tracks", "4", "--track-block-depth", "2",
        "--eval-every", str(max(max_steps // 5, 1)), "--log-every", "10",
        "--warmup-steps", str(max(max_steps // 20, 1)),
    ]))
    print(f"validation perplexity: {summary['val_ppl_before']:.1f} before training -> {summary['val_ppl']:.1f} after "
          f"{summary['training_tokens']:,} tokens (unigram baseline {summary['unigram_ppl']:.1f}); "
          f"training took {summary['wall_s']:.0f} s")
    print(f"log: {Path(output_dir, LOG_NAME)}, curve: {Path(output_dir, PLOT_NAME)}")
    return summary


def reload_and_generate(model_dir: str) -> None:
    """Runs in a fresh process that never imports `modeling_ptt`: the model's class comes from the code saved beside
    its weights, as on a machine that never installed this package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loading by path: never ask the Hub
    # transformers 5.x reads the model's config to pick a tokenizer: with remote code, that also needs the consent
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    print(f"\n== reloaded through AutoModelForCausalLM(trust_remote_code=True) as {type(model).__module__}."
          f"{type(model).__name__}")
    torch.manual_seed(0)
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=48, do_sample=True, temperature=0.8, top_k=40,
                                pad_token_id=tokenizer.eos_token_id)
        print(f"--- {prompt!r}\n{tokenizer.decode(output[0], skip_special_tokens=True)}")

    config = model.config  # the saved code's config class: it counts sync points as PTConfig does
    tensor_parallel = config.sync_point_count(config.num_hidden_layers, config.track_block_depth, "tensor_parallel")
    print(f"\n== sync points per forward with the tracks on {config.num_tracks} devices: "
          f"{config.num_sync_points} (PT, D={config.track_block_depth}) vs {tensor_parallel} "
          f"(tensor parallelism, 2 per layer)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (CI)")
    parser.add_argument("--output-dir", default=str(SCRIPTS.parent / "outputs" / "demo"))
    parser.add_argument("--max-steps", type=int, help="default: 1000, or 150 with --quick")
    parser.add_argument("--reload-only", action="store_true", help="only reload OUTPUT_DIR and generate")
    args = parser.parse_args(argv)
    if args.reload_only:
        return reload_and_generate(args.output_dir)

    check_output_dir(args.output_dir, "the demo model")
    started = time.perf_counter()
    summary = train_demo_model(args.output_dir, args.max_steps or (150 if args.quick else 1000))
    subprocess.run([sys.executable, __file__, "--reload-only", "--output-dir", args.output_dir], check=True)
    print(f"demo wall time {time.perf_counter() - started:.0f} s")
    if not summary["val_ppl"] < summary["unigram_ppl"]:
        raise SystemExit(f"the model did not learn: perplexity {summary['val_ppl']:.1f} is not below the unigram "
                         f"baseline {summary['unigram_ppl']:.1f}")


if __name__ == "__main__":
    main()
