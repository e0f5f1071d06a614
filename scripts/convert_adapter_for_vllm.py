#!/usr/bin/env python
"""Write a PT model's LoRA adapter (saved by PEFT) in the layout of vLLM's PT model, which serves it.

    python scripts/convert_adapter_for_vllm.py ADAPTER_DIR OUT_DIR
    vllm serve MODEL_DIR --enable-lora --lora-modules my-adapter=OUT_DIR

vLLM's PT model holds each track's projections as layers of their own, so every `[tracks, ...]` LoRA factor becomes
one factor per track (`modeling_ptt.peft_ptt.adapter_for_vllm`). Adapters of PT-MoE's experts are not served.
"""

import argparse
import sys
from pathlib import Path

from modeling_ptt.peft_ptt import ADAPTER_CONFIG, adapter_for_vllm
from script_io import check_output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", type=Path, help="a PEFT LoRA adapter of a PT model (save_pretrained)")
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args()

    if not (args.adapter_dir / ADAPTER_CONFIG).is_file():
        sys.exit(f"error: {args.adapter_dir} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    check_output_dir(args.output_dir, "the converted adapter")
    try:
        adapter_for_vllm(args.adapter_dir, args.output_dir)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"{args.adapter_dir} -> {args.output_dir}: one LoRA factor per track, for vLLM")


if __name__ == "__main__":
    main()
