"""One rank of a `scripts/train.py` job under torchrun, recording what the test compares with one process.

It runs `train.main` unchanged, and around two of its helpers records, in `OUT/rank{r}.pt`: the collectives of every
optimizer step (`train_step`, counted by scripts/collectives.py) and this rank's parameters when training ends (just
before `export` gathers them).

    torchrun --nproc-per-node 2 parallel_train_worker.py OUT -- <train.py arguments>
"""

import os
import sys

import torch
import torch.distributed as dist

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
        recorded["tracks"] = parallel.tracks
        recorded["parameters"] = {name: param.detach().clone() for name, param in local.named_parameters()}
        return export(model, parallel, *args, **kwargs)

    train.train_step, train.export = counted_train_step, recorded_export
    train.main(argv)
    torch.save(recorded, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
