#!/usr/bin/env python
"""The PT model's life in seconds: build `ptt-tiny`, generate, save with remote code, reload through the Auto classes."""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from modeling_ptt import PTConfig, PTForCausalLM


ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configuration" / "ptt-tiny.json"))
    parser.add_argument("--output-dir", default=None, help="where to save the model (default: a temporary dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = PTConfig.from_json_file(args.config)
    model = PTForCausalLM(config).eval()
    print(f"{config.num_tracks} tracks x {config.num_hidden_layers} layers, merged every {config.track_block_depth}: "
          f"{config.num_sync_points} sync points per forward (tensor parallelism: {2 * config.num_hidden_layers})")
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")

    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    tokens = model.generate(prompt, max_new_tokens=10, do_sample=False)
    print("greedy tokens:", tokens[0].tolist())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir or tmp)
        model.save_pretrained(out)
        print("saved:", ", ".join(sorted(p.name for p in out.iterdir())))
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        again = reloaded.generate(prompt, max_new_tokens=10, do_sample=False)
        print(f"reloaded through AutoModelForCausalLM as {type(reloaded).__name__}: same tokens = {torch.equal(tokens, again)}")
        if not torch.equal(tokens, again):
            raise SystemExit("the reloaded model generated different tokens")


if __name__ == "__main__":
    main()
