"""Where a PT model's tracks go: the one statement of the placement, for every user of it.

With `W` ranks on the track axis (`W` divides `num_tracks = n`), rank `r` owns the `n/W` consecutive tracks
`[r*n/W, (r+1)*n/W)`: it holds that slice of every track-stacked tensor (dim 0) and a whole copy of the shared ones
(embedding, final norm, LM head). The inference loader (`distributed_ptt`), the training layouts
(`modeling_ptt.training`), the vLLM model (`vllm_ptt`) and the benchmarks all place tracks through this module, and
start their process groups and materialise models built on the meta device through it too.

It imports only torch: `distributed_ptt` imports it, so `save_pretrained` copies it as remote code.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def check_track_split(num_tracks: int, world_size: int, setting: str) -> None:
    """`W` must divide `n`: every rank owns the same number of whole tracks. `setting` is how the caller's user chose
    `W` (e.g. `"tp_size=3"`, `"--track-parallel 3"`), which the error names."""
    if world_size < 1:
        raise ValueError(f"{setting}: must be at least 1")
    if num_tracks % world_size:
        divisors = [w for w in range(1, num_tracks + 1) if num_tracks % w == 0]
        raise ValueError(f"{setting} does not divide num_tracks={num_tracks}: every rank must hold the same number "
                         f"of whole tracks (choose one of {divisors})")


def track_range(rank: int, world_size: int, num_tracks: int) -> range:
    """The tracks rank `rank` of `world_size` owns on the track axis."""
    per_rank = num_tracks // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def rank_device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` where CUDA is available, else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")


def start_process_group(timeout: timedelta | None = None) -> torch.device:
    """Join the launcher's (`torchrun`, `accelerate launch`) process group unless this process already has: NCCL on
    `cuda:LOCAL_RANK`, gloo on the CPU, so the same code runs on either. Returns this process's device."""
    device = rank_device()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"timeout": timeout} if timeout is not None else {}))
    return device


def materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Compute the non-persistent buffers (RoPE `inv_freq`) of a model built on the meta device whose parameters
    were put in place by hand: they are in no state dict, so the model's own `_init_weights` computes them, as
    transformers' loader does."""
    for module in model.modules():
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
