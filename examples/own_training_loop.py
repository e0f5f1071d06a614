import json
import os
import sys

import torch

from modeling_ptt import PTConfig, check_batch
from modeling_ptt.training import (Layout, clip_grad_norm_, find_resumable, init_from_scratch, load_checkpoint,
                                   parallelize_ptt, save_checkpoint)

# python own_training_loop.py, or torchrun --nproc-per-node P own_training_loop.py [OUTPUT_DIR [W [fsdp]]]
output_dir = sys.argv[1] if len(sys.argv) > 1 else "own_loop"
config = PTConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_tracks=2, track_block_depth=2)
# the (data, tracks) mesh: W ranks share one model's tracks; P/W replicas, FSDP2-sharded over "data" with fsdp
layout = Layout(int(sys.argv[2]) if len(sys.argv) > 2 else 1, config.num_tracks, fsdp="fsdp" in sys.argv[3:])
model = parallelize_ptt(init_from_scratch(config, seed=0, tracks=layout.tracks).to(layout.device), layout)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
data = torch.randint(0, config.vocab_size, (8, 4, 32), generator=torch.Generator().manual_seed(0))  # 8 steps x 4
check_batch(config, data.flatten(0, 1))  # bad ids fail here, on the CPU: a training forward on a GPU reads none

resumable = find_resumable(output_dir)  # the newest whole checkpoint: a kill at any moment leaves one
start = load_checkpoint(resumable, model, optimizer, layout)["step"] if resumable else 0
for step in range(start, int(os.environ.get("STOP_AT", len(data)))):
    batch = data[step].chunk(layout.num_replicas)[layout.replica_index].to(layout.device)  # a track group: one batch
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    loss.backward()
    clip_grad_norm_(model, 1.0, layout)  # the whole model's norm, over tracks and shards
    optimizer.step()
    optimizer.zero_grad()
    mean_loss = layout.mean(loss[None])[0]  # over the data-parallel replicas
    if layout.is_main_process:
        print(json.dumps({"step": step + 1, "loss": mean_loss}))
    if step + 1 == 4:
        save_checkpoint(output_dir, step + 1, model, optimizer, layout)
