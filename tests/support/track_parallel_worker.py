"""One rank of a track-parallel test job (started by `torchrun` or by hand from tests/test_distributed.py).

It imports no model code from this repository (only the collective counter of scripts/): the model comes in as remote code through
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True, distributed_config=DistributedConfig(tp_size=W))`,
the way a user's launch script gets it. It writes what it observed to `OUT/rank{r}.pt`; the test compares that with
a single-process run.

    scenario "check": per model dir, logits, loss and gradients, collective counts of the forward and the backward,
                      generation, KV-cache shapes.
    scenario "die": rank 1 kills (or stops) itself during generate(); rank 0 must fail, not hang.
"""

import argparse
import json
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, DistributedConfig, LogitsProcessor, LogitsProcessorList, set_seed

from collectives import CollectiveCounter  # a measuring tool from scripts/, not model code


def cache_of(output):
    return getattr(output, "cache", None) or output.past_key_values


def count_forward_calls(model) -> list:
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def counter_sees_functional_collectives() -> dict:
    """The counter's own check: a functional collective (what DTensor code issues) is counted too."""
    import torch.distributed._functional_collectives as functional

    with CollectiveCounter() as counter:
        functional.wait_tensor(functional.all_reduce(torch.ones(2), "sum", dist.group.WORLD))
        dist.all_reduce(torch.ones(2))
    return dict(counter.ops)


def check(model_dir: str, inputs: dict, variants: list[dict], world_size: int) -> dict:
    observed = {}
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    for index, overrides in enumerate(variants):
        # as in fresh processes, every rank's RNG state is its own before the load (which must align them); else
        # the seed set below for the previous checkpoint would leave the ranks agreeing anyway
        torch.manual_seed(1 + int(os.environ["RANK"]))
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, trust_remote_code=True, distributed_config=DistributedConfig(tp_size=world_size), **overrides
        )
        result = {
            "class_module": type(model).__module__,
            "dtensor_parameters": [name for name, p in model.named_parameters() if isinstance(p, DTensor)],
            "local_tracks": [m.num_local_tracks for m in model.modules() if hasattr(m, "num_local_tracks")],
            "has_process_group": [m.process_group is not None for m in model.modules() if hasattr(m, "process_group")],
            "q_proj_0": model.model.layers[0].self_attn.q_proj.weight.detach().clone(),
            "embed": model.model.embed_tokens.weight.detach().clone(),
        }
        with torch.no_grad(), CollectiveCounter() as counter:
            result["logits"] = model(input_ids, attention_mask=attention_mask).logits
        result["collectives_no_grad"] = dict(counter.ops)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        with CollectiveCounter() as counter:  # the autograd-aware merge
            output = model(input_ids, attention_mask=attention_mask, labels=labels)
        result["collectives_grad"] = dict(counter.ops)
        result["logits_grad"] = output.logits.detach()
        result["loss"] = output.loss.detach()
        with CollectiveCounter() as counter:
            output.loss.backward()
        result["collectives_backward"] = dict(counter.ops)
        result["grads"] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

        if index == 0:  # generation is the same for every variant; once is enough
            forwards = count_forward_calls(model)
            generate = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6)
            with CollectiveCounter() as counter:
                result["greedy"] = model.generate(**generate, do_sample=False)
            result["greedy_collectives"] = dict(counter.ops)
            result["greedy_forwards"] = len(forwards)
            result["unseeded_sample"] = model.generate(**generate, do_sample=True)
            set_seed(1234)
            result["seeded_sample"] = model.generate(**generate, do_sample=True)
            result["beam"] = model.generate(**generate, do_sample=False, num_beams=3)
            result["static"] = model.generate(**generate, do_sample=False, cache_implementation="static")
            with torch.no_grad():
                cache = cache_of(model(input_ids, attention_mask=attention_mask, use_cache=True))
            result["kv_shapes"] = [tuple(layer.keys.shape) for layer in cache.layers]
            try:
                model.save_pretrained(os.path.join(os.environ.get("TMPDIR", "/tmp"), "never-written"))
                result["partial_save_refused"] = False
            except ValueError:
                result["partial_save_refused"] = True
        observed[f"{model_dir}#{index}"] = result
    return observed


class FaultAtStep(LogitsProcessor):
    """Send this process `sig` when generation reaches step `step`: SIGKILL is a crash, SIGSTOP a hang."""

    def __init__(self, step: int, sig: signal.Signals):
        self.step, self.sig, self.calls = step, sig, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.step:
            os.kill(os.getpid(), self.sig)
        return scores


def die(model_dir: str, inputs: dict, world_size: int, fault: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, distributed_config=DistributedConfig(tp_size=world_size)
    )
    sig = signal.SIGKILL if fault == "kill" else signal.SIGSTOP
    processors = LogitsProcessorList([FaultAtStep(3, sig)] if dist.get_rank() == 1 else [])
    print("generating", flush=True)
    model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=100,
                   min_new_tokens=100, do_sample=False, logits_processor=processors)
    print("generate returned although a rank died", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=["check", "die"])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--inputs", required=True, help="torch.save'd dict with input_ids and attention_mask")
    parser.add_argument("--variants", default="[{}]", help="JSON list of config overrides, one load each")
    parser.add_argument("--out", required=True)
    parser.add_argument("--fault", choices=["kill", "stop"], default="kill", help="what happens to rank 1 (die)")
    args = parser.parse_args()
    world_size = int(os.environ["WORLD_SIZE"])
    inputs = torch.load(args.inputs)
    if args.scenario == "die":
        die(args.models[0], inputs, world_size, args.fault)
        return
    observed = {}
    for model_dir in args.models:
        observed.update(check(model_dir, inputs, json.loads(args.variants), world_size))
    observed["counter_self_check"] = counter_sees_functional_collectives()  # the models started the process group
    torch.save(observed, os.path.join(args.out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
