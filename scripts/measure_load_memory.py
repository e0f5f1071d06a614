#!/usr/bin/env python
"""Peak memory of loading a PT model on W ranks, against the expected `track_weights / W + shared`.

    python scripts/measure_load_memory.py                    # builds an n=8 model of ~600 MB, W = 1 and 2
    python scripts/measure_load_memory.py --model DIR --world-sizes 1 2 4

For every W it starts `torchrun --nproc-per-node W` on this script; each rank loads the model with
`distributed_config=DistributedConfig(tp_size=W)` (W=1 takes the same slice-reading path) and reports how far its
resident set grew during the load: peak RSS (VmHWM, reset before the load) minus RSS before it, so the interpreter,
torch and transformers are not counted (a load of a tiny model first pages in the code and starts the process group).
Parameters are touched after the load, since loaders may hand out lazily mapped file pages. `transformers` is the
same checkpoint through transformers' own loader in one process, for comparison. Ratio = peak growth / expected
bytes; the target is <= 1.05. Linux only (/proc).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


MB = 2**20


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def expected_bytes(model_dir: Path) -> tuple[int, int]:
    """(track-stacked bytes, shared bytes) of the checkpoint, from the safetensors headers."""
    from modeling_ptt import PTConfig, PTForCausalLM
    from modeling_ptt.distributed_ptt import SafetensorsRows

    with torch.device("meta"):
        track_names = set(PTForCausalLM(PTConfig.from_pretrained(model_dir)).track_stacked_parameter_names())
    sizes = {"track": 0, "shared": 0}
    for file in model_dir.glob("*.safetensors"):
        for name, entry in SafetensorsRows(str(file)).entries.items():
            begin, end = entry["data_offsets"]
            sizes["track" if name in track_names else "shared"] += end - begin
    return sizes["track"], sizes["shared"]


def child(args) -> None:
    """One rank: load and report the growth of its resident set."""
    import torch.distributed as dist
    from transformers import DistributedConfig

    from modeling_ptt import PTForCausalLM

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = {} if args.plain else dict(distributed_config=DistributedConfig(tp_size=world_size))
    # the same load of a tiny model first: code pages, lazy imports and the process group are then in place already
    PTForCausalLM.from_pretrained(args.warmup, **parallel)
    before = rss_kib("VmRSS")
    reset_peak_rss()
    model = PTForCausalLM.from_pretrained(args.model, **parallel)
    with torch.no_grad():  # a loader may hand out lazily mapped file pages: count them as the forward will
        for param in model.parameters():
            param.sum()
    peak, after = rss_kib("VmHWM"), rss_kib("VmRSS")
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    rank = dist.get_rank() if dist.is_initialized() else 0
    record = dict(world_size=world_size, rank=rank, plain=args.plain, peak_growth=(peak - before) * 1024,
                  resident_growth=(after - before) * 1024, parameter_bytes=loaded)
    with open(f"{args.out}.rank{rank}", "w") as f:
        json.dump(record, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def build(path: Path, width: int = 1024, vocab_size: int = 16384) -> None:
    from modeling_ptt import PTConfig, PTForCausalLM

    config = PTConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=8, num_tracks=8, track_block_depth=4)
    PTForCausalLM(config).save_pretrained(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a saved PT model (default: build an n=8 one)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = Path(tmp) / "ptt-n8"
            build(model_dir)
        warmup_dir = Path(tmp) / "warmup"
        build(warmup_dir, width=128, vocab_size=256)
        track, shared = expected_bytes(model_dir)
        print(f"{model_dir}: track-stacked {track / MB:.1f} MB, shared {shared / MB:.1f} MB")
        runs = [("transformers", 1, [sys.executable])] + [
            (f"W={w}", w, [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={w}"])
            for w in args.world_sizes
        ]
        print(f"{'load':>12} {'rank':>4} {'expected MB':>11} {'peak growth MB':>14} {'ratio':>6} {'params MB':>9}")
        for label, world_size, launcher in runs:
            expected = track / world_size + shared
            for rank, record in enumerate(load(label, world_size, launcher, model_dir, warmup_dir, Path(tmp))):
                print(f"{label:>12} {rank:>4} {expected / MB:>11.1f} {record['peak_growth'] / MB:>14.1f} "
                      f"{record['peak_growth'] / expected:>6.3f} {record['parameter_bytes'] / MB:>9.1f}")


def load(label: str, world_size: int, launcher: list[str], model_dir: Path, warmup_dir: Path, tmp: Path) -> list:
    """Every rank's record of one load, run as `launcher` on this script's `child`."""
    out = tmp / label
    command = [*launcher, __file__, "--child", "--model", str(model_dir), "--warmup", str(warmup_dir),
               "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    subprocess.run(command + (["--plain"] if label == "transformers" else []), env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in range(world_size)]


if __name__ == "__main__":
    main()
