"""One rank of a `scripts/train.py` job under torchrun, recording what the test compares with one process.

It runs `train.main` unchanged, and around two of its helpers records, in `OUT/rank{r}.pt`: the collectives of every
optimizer step (`train_step`, counted by scripts/collectives.py) and this rank's parameters (its FSDP shards, if
sharded) when training ends (just before `export` gathers them).

    torchrun --nproc-per-node 2 parallel_train_worker.py OUT -- <train.py arguments>
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import train
from collectives import CollectiveCounter


def main():
    out, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    recorded = {"step_collectives": []}
    train_step, export = train.train_step, train.export

    def counted_train_step(*args, **kwargs):
        with CollectiveCounter() as counter:
            result = train_step(*args, **kwargs)
        recorded["step_collectives"].append(dict(counter.ops))
        return result

    def recorded_export(model, parallel, *args, **kwargs):
        local = model.module if hasattr(model, "module") else model
        if isinstance(local, FSDPModule):
            local.reshard()  # FSDP2 keeps the root's parameters gathered after a forward (here the last evaluation)
        recorded["tracks"] = parallel.tracks
        recorded["parameter_types"] = {name: type(param).__name__ for name, param in local.named_parameters()}
        recorded["parameters"] = {name: (param.to_local() if isinstance(param, DTensor) else param).detach().clone()
                                  for name, param in local.named_parameters()}
        return export(model, parallel, *args, **kwargs)

    train.train_step, train.export = counted_train_step, recorded_export
    train.main(argv)
    torch.save(recorded, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
