#!/usr/bin/env python
"""The uptraining measurement's table and plot, from the run folders `scripts/uptraining_runs.sh` writes.

    python scripts/uptraining_report.py RESULTS_DIR [--plot docs/uptraining.png]

RESULTS_DIR holds `teacher_s{seed}` (the dense model), `scratch_d{D}_s{seed}` (PT trained from scratch) and
`uptrain_d{D}_s{seed}` / `uptrain_gradual_d{D}_s{seed}` (PT uptrained from that seed's teacher): each a training output
folder with its `train_log.jsonl`. The teacher converted to block mode with no training is the uptraining run's
step 0. Prints a markdown table of validation perplexity (mean ± std over seeds) against training tokens.
"""

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

RUN = re.compile(r"(?P<kind>teacher|scratch|uptrain_gradual|uptrain)(?:_d(?P<depth>\d+))?_s(?P<seed>\d+)")
LABELS = {
    "teacher": "dense teacher (1 track)",
    "converted": "teacher converted to D={depth}, no training",
    "uptrain": "uptrained to D={depth}, distilled",
    "uptrain_gradual": "uptrained to D={depth}, distilled, merges removed gradually",
    "scratch": "PT D={depth} from scratch",
}


def evaluations(folder: Path) -> list[tuple[int, float]]:
    """(training tokens, validation perplexity) of every evaluated step."""
    records = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [(record["tokens"], record["val_ppl"]) for record in records if record.get("val_ppl") is not None]


def curves(results: Path) -> dict[tuple[str, int | None], dict[int, list[tuple[int, float]]]]:
    """{(kind, depth): {seed: [(tokens, perplexity), ...]}}, uptraining counted from its teacher's tokens."""
    found = defaultdict(dict)
    for folder in sorted(results.iterdir()):
        match = RUN.fullmatch(folder.name)
        if not match or not (folder / "train_log.jsonl").is_file():
            continue
        kind, seed = match["kind"], int(match["seed"])
        depth = int(match["depth"]) if match["depth"] else None
        found[(kind, depth)][seed] = evaluations(folder)
    for (kind, depth), by_seed in list(found.items()):
        if not kind.startswith("uptrain"):
            continue
        for seed, points in by_seed.items():
            start = found[("teacher", None)][seed][-1][0]
            by_seed[seed] = [(start + tokens, ppl) for tokens, ppl in points]
            if kind == "uptrain":
                found[("converted", depth)][seed] = by_seed[seed][:1]
    return found


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    found = curves(args.results)
    order = ["teacher", "converted", "uptrain", "uptrain_gradual", "scratch"]
    rows = sorted(found, key=lambda key: (key[1] or 0, order.index(key[0])))
    print("| model | training tokens | seeds | validation perplexity |")
    print("|---|---:|---:|---:|")
    for kind, depth in rows:
        by_seed = found[(kind, depth)]
        tokens = {points[-1][0] for points in by_seed.values()}
        print(f"| {LABELS[kind].format(depth=depth)} | {', '.join(f'{t:,}' for t in sorted(tokens))} | "
              f"{len(by_seed)} | {summary([points[-1][1] for points in by_seed.values()])} |")
    if args.plot:
        plot(found, args.plot)


def plot(found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for (kind, depth), by_seed in sorted(found.items(), key=lambda item: (item[0][1] or 0, item[0][0])):
        label = LABELS[kind].format(depth=depth)
        steps = sorted(set.intersection(*(set(tokens for tokens, _ in points) for points in by_seed.values())))
        means = [statistics.mean(dict(points)[tokens] for points in by_seed.values()) for tokens in steps]
        if kind == "converted":
            axis.scatter(steps, means, marker="x", s=60, label=label, zorder=3)
        else:
            axis.plot(steps, means, label=label, linestyle="-" if kind != "scratch" else "--")
    # the part where the runs differ: from half the teacher's tokens on, up to the converted, untrained models
    teacher_tokens = max(points[-1][0] for points in found[("teacher", None)].values())
    shown = [ppl for by_seed in found.values() for points in by_seed.values() for tokens, ppl in points
             if tokens >= teacher_tokens / 2]
    axis.set_xlim(left=teacher_tokens / 2)
    axis.set_ylim(0.95 * min(shown), 1.05 * max(shown))
    axis.set_xlabel("training tokens (uptraining counted after its teacher's)")
    axis.set_ylabel("validation perplexity (mean over seeds)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
