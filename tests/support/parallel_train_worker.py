"""One rank of a `scripts/train.py` job under torchrun, recording what the test compares with one process.

It runs `train.main` unchanged, and around two methods of its `Trainer` records, in `OUT/rank{r}.pt`: the collectives
of every optimizer step (`train_step`, counted by scripts/collectives.py), and this rank's parameters (its FSDP
shards, if sharded) and generator states when training ends (just before `export` gathers the model).

With `--draw-random`, every step also draws from every generator a checkpoint restores (torch, numpy, Python), a
different amount on every rank, as dropout or sampled data would: then the generator states at the end show
whether a resume restored each process's own states.

    torchrun --nproc-per-node 2 parallel_train_worker.py OUT [--draw-random] -- <train.py arguments>
"""

import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import train
from collectives import CollectiveCounter
from modeling_ptt.training.trainer import Trainer


def main():
    out, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    draw_random = "--draw-random" in sys.argv[: sys.argv.index("--")]
    recorded = {"step_collectives": []}
    train_step, export = Trainer.train_step, Trainer.export

    def counted_train_step(self, *args, **kwargs):
        with CollectiveCounter() as counter:
            result = train_step(self, *args, **kwargs)
        recorded["step_collectives"].append(dict(counter.ops))
        if draw_random:
            rank = dist.get_rank()
            torch.rand(rank + 1)
            np.random.rand(rank + 2)
            random.choices(range(10), k=rank + 3)
        return result

    def recorded_export(self):
        local = self.model.module if hasattr(self.model, "module") else self.model
        if isinstance(local, FSDPModule):
            local.reshard()  # FSDP2 keeps the root's parameters gathered after a forward (here the last evaluation)
        recorded["tracks"] = self.layout.tracks
        recorded["parameter_types"] = {name: type(param).__name__ for name, param in local.named_parameters()}
        recorded["parameters"] = {name: (param.to_local() if isinstance(param, DTensor) else param).detach().clone()
                                  for name, param in local.named_parameters()}
        recorded["rng_states"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                  "python": random.getstate()}
        return export(self)

    Trainer.train_step, Trainer.export = counted_train_step, recorded_export
    train.main(argv)
    torch.save(recorded, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
