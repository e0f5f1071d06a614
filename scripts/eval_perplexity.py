#!/usr/bin/env python
"""Evaluate a saved PT model directory with lm-eval (EleutherAI's harness) on the held-out Shakespeare text, offline.

This runs the real `lm-eval` client, `--model hf --model_args pretrained=DIR,trust_remote_code=True`, on the local
perplexity task `configuration/lm_eval/shakespeare_ppl.yaml`, with its `data_files` pointed at the held-out split
that `scripts/train.py` wrote beside the model (`DIR/validation.jsonl`), and prints the command and the metrics.

    pip install -e ".[eval]"
    python scripts/eval_perplexity.py outputs/demo
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


ROOT = Path(__file__).resolve().parent.parent
TASK_YAML = ROOT / "configuration" / "lm_eval" / "shakespeare_ppl.yaml"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def lm_eval_command(model_dir: Path, include_path: Path, output_path: Path, max_length: int, limit: int | None,
                    batch_size: int, device: str) -> list[str]:
    model_args = f"pretrained={model_dir},trust_remote_code=True,max_length={max_length}"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
               "--include_path", str(include_path), "--tasks", "shakespeare_ppl", "--device", device,
               "--batch_size", str(batch_size), "--output_path", str(output_path)]
    return command + (["--limit", str(limit)] if limit else [])


def evaluate(model_dir: Path, data: Path | None = None, max_length: int | None = None, limit: int | None = None,
             batch_size: int = 1, device: str = "cpu") -> dict:
    """Run lm-eval on `model_dir`; returns {metric: value} for the shakespeare_ppl task."""
    model_dir = model_dir.resolve()
    data = (data or model_dir / "validation.jsonl").resolve()
    for path, what in ((model_dir / "config.json", "a saved model"), (data, "the held-out jsonl")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected {what} (scripts/train.py writes both)")
    if max_length is None:
        # the positions the model was trained on; lm-eval would otherwise roll windows of max_position_embeddings
        training_args = model_dir / "training_args.json"
        if training_args.is_file():
            max_length = json.loads(training_args.read_text())["block_size"]
        else:
            max_length = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]

    task = yaml.safe_load(TASK_YAML.read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(data)
    with tempfile.TemporaryDirectory() as tmp:
        include_path, output_path = Path(tmp, "tasks"), Path(tmp, "results")
        include_path.mkdir()
        (include_path / TASK_YAML.name).write_text(yaml.safe_dump(task, sort_keys=False))
        command = lm_eval_command(model_dir, include_path, output_path, max_length, limit, batch_size, device)
        print("$", " ".join(command), flush=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run(command, check=True, env=env)
        results_files = sorted(output_path.rglob("results_*.json"))
        if not results_files:
            raise RuntimeError(f"lm-eval wrote no results_*.json under {output_path}")
        results = json.loads(results_files[-1].read_text())["results"]["shakespeare_ppl"]
    return {metric: results[f"{metric},none"] for metric in METRICS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a save_pretrained directory written by scripts/train.py")
    parser.add_argument("--data", type=Path, help="jsonl with a 'text' field (default: MODEL_DIR/validation.jsonl)")
    parser.add_argument("--max-length", type=int, help="context window (default: the block size it was trained on)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N documents")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="what lm-eval runs the model on (cpu, cuda, ...)")
    args = parser.parse_args(argv)
    metrics = evaluate(args.model_dir, args.data, args.max_length, args.limit, args.batch_size, args.device)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
