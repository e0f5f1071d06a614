#!/usr/bin/env python
"""Generate text with a PT model, in one process or with its tracks spread over the processes of a launcher.

    python scripts/generate.py --model DIR --prompt "Once upon a time"
    torchrun --nproc-per-node 2 scripts/generate.py --model DIR --prompt "Once upon a time"
    accelerate launch --config_file configuration/accelerate/cpu_2proc.yaml scripts/generate.py --model DIR --prompt ...

Under a launcher with W processes every rank loads only its `num_tracks / W` tracks
(`distributed_config=DistributedConfig(tp_size=W)`), all ranks compute the same tokens, and only rank 0 prints.
"""

import argparse
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig, set_seed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved PT model: directory or Hub id")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="the same on every rank, so all ranks draw the same tokens")
    parser.add_argument("--dtype", default="auto", help='"auto" (the checkpoint\'s), "float32", "bfloat16", ...')
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a rank waits for the others before failing (default $PTT_PROCESS_GROUP_TIMEOUT, "
                             "else torch's)")
    args = parser.parse_args()

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = {}
    if world_size > 1:
        parallel = dict(distributed_config=DistributedConfig(tp_size=world_size), process_group_timeout=args.timeout)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=args.dtype, **parallel)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)  # its config names our code

    set_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    sampling = dict(do_sample=True, temperature=args.temperature) if args.do_sample else dict(do_sample=False)
    with torch.inference_mode():
        tokens = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(tokenizer.decode(tokens[0], skip_special_tokens=True), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
