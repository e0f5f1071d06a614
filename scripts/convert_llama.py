#!/usr/bin/env python
"""Convert a dense Llama checkpoint into PT track layout (`sync_mode="tensor_parallel"`, same logits).

    python scripts/convert_llama.py IN_DIR OUT_DIR --num-tracks N

The output is a `save_pretrained` directory with remote code: `AutoModelForCausalLM.from_pretrained(OUT_DIR,
trust_remote_code=True)` loads it anywhere. The tokenizer in IN_DIR, if any, is copied along.
"""

import argparse
import sys
from pathlib import Path

from transformers import AutoTokenizer, LlamaForCausalLM

from modeling_ptt import PTForCausalLM
from script_io import check_output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input_dir", type=Path, help="a LlamaForCausalLM save_pretrained directory")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--num-tracks", type=int, required=True)
    args = parser.parse_args()

    if not (args.input_dir / "config.json").is_file():
        sys.exit(f"error: {args.input_dir} is not a model directory (no config.json)")
    check_output_dir(args.output_dir, "the converted model")
    llama = LlamaForCausalLM.from_pretrained(args.input_dir)
    try:
        model = PTForCausalLM.from_llama(llama, num_tracks=args.num_tracks)
    except ValueError as error:
        sys.exit(f"error: cannot split {args.input_dir} into {args.num_tracks} tracks: {error}")
    model.save_pretrained(args.output_dir)
    if (args.input_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(args.input_dir).save_pretrained(args.output_dir)
    print(f"{args.input_dir} -> {args.output_dir}: {args.num_tracks} tracks, sync_mode=tensor_parallel")


if __name__ == "__main__":
    main()
