"""Training PT models: the layouts (data parallel, FSDP2, track parallel and their `(data, tracks)` mesh), kill-safe
checkpoints, the data and the loop of `scripts/train.py`, as a library for your own training loop.

Not part of the remote code (`save_pretrained` copies the model's modules only), and not imported by
`import modeling_ptt`: it needs the `train` extra (`pip install modeling-ptt[train]`).

    layout = Layout(track_parallel=2, num_tracks=config.num_tracks, fsdp=False)  # joins torchrun's process group
    model = parallelize_ptt(init_from_scratch(config, seed, layout.tracks).to(layout.device), layout)
    optimizer = torch.optim.AdamW(model.parameters())
    ... loss.backward(); clip_grad_norm_(model, 1.0, layout); optimizer.step(); optimizer.zero_grad()
    save_checkpoint(output_dir, step, model, optimizer, layout)   # load_checkpoint(find_resumable(output_dir), ...)

Modules: `parallelize` (the mesh and the `apply_*` steps), `checkpoint`, `data`, `optim`, `train_log`, `trainer`
(`Trainer`, `training_function`). See docs/training_library.md.
"""

from .checkpoint import CheckpointError, clean_leftovers, find_resumable, load_checkpoint, save_checkpoint
from .parallelize import (
    Layout,
    apply_ddp,
    apply_fsdp,
    apply_track_parallel,
    clip_grad_norm_,
    full_model,
    gradient_sync,
    init_from_scratch,
    parallelize_ptt,
)


__all__ = [
    "CheckpointError",
    "Layout",
    "apply_ddp",
    "apply_fsdp",
    "apply_track_parallel",
    "clean_leftovers",
    "clip_grad_norm_",
    "find_resumable",
    "full_model",
    "gradient_sync",
    "init_from_scratch",
    "load_checkpoint",
    "parallelize_ptt",
    "save_checkpoint",
]
