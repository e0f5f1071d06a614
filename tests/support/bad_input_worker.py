"""One rank of a track-parallel job fed bad input (started by `torchrun` from tests/test_bad_input.py).

The model comes in as remote code with `distributed_config=DistributedConfig(tp_size=W)`. The rank records the error
each bad input raises on it, then runs one good forward (which merges with the other ranks, so it returns only if
the ranks are still in step), and writes `OUT/rank{r}.json`: the test checks that every rank raised the same errors.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, DistributedConfig


def error_of(call) -> str | None:
    try:
        call()
    except (ValueError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--truncated", required=True, help="the same model with a truncated model.safetensors")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    parallel = dict(trust_remote_code=True, distributed_config=DistributedConfig(tp_size=int(os.environ["WORLD_SIZE"])))
    model = AutoModelForCausalLM.from_pretrained(args.model, **parallel)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        observed = {
            "token_id": error_of(lambda: model(torch.tensor([[1, model.config.vocab_size]]))),
            "empty_prompt": error_of(lambda: model.generate(ids[:, :0], max_new_tokens=2)),
            "attention_mask": error_of(lambda: model(ids, attention_mask=torch.ones(1, 2, dtype=torch.long))),
            "truncated": error_of(lambda: AutoModelForCausalLM.from_pretrained(args.truncated, **parallel)),
        }
        observed["good_forward_after"] = model(ids).logits.sum().item()
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(observed, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
