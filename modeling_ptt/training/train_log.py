"""What a training run writes as it goes: `train_log.jsonl` (one record per logged step) and its loss curve."""

import json
import math
import os
import time
from pathlib import Path

import torch

from .parallelize import Layout


LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss_curve.png"


class TrainLog:
    """`train_log.jsonl`, written by the main process: one record per logged step, training losses averaged over
    the steps since the last record and over the data-parallel replicas (one reduction per record)."""

    def __init__(self, path: Path, layout: Layout, tokens_per_step: int):
        self.path, self.layout, self.tokens_per_step = path, layout, tokens_per_step
        self.restart_window()

    def restart_window(self) -> None:
        self.losses, self.aux_losses, self.window_start = [], [], time.perf_counter()

    def start(self, resumed_step: int | None) -> None:
        """A fresh log, or the log of a resumed run cut after its checkpoint's step (later lines are redone)."""
        if self.layout.is_main_process:
            kept = [r for r in read_log(self.path) if r["step"] <= resumed_step] if resumed_step is not None else []
            partial = self.path.with_name(f"{self.path.name}.partial")  # renamed over the log: a kill keeps one of two
            partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(partial, self.path)

    def write(self, record: dict) -> None:
        if self.layout.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def add_step(self, loss: torch.Tensor, aux_loss: torch.Tensor | None) -> None:
        self.losses.append(loss)
        if aux_loss is not None:
            self.aux_losses.append(aux_loss)

    def write_window(self, step: int, lr: float, val_loss: float | None) -> None:
        """The record of the steps since the last one (every process takes part: it reduces over the replicas)."""
        tokens_per_s = self.tokens_per_step * len(self.losses) / (time.perf_counter() - self.window_start)
        losses = self.layout.mean(torch.stack(self.losses + self.aux_losses))
        loss, aux_losses = losses[: len(self.losses)], losses[len(self.losses) :]
        record = {"step": step, "loss": sum(loss) / len(loss), "val_loss": val_loss,
                  "val_ppl": math.exp(val_loss) if val_loss is not None else None, "tokens_per_s": tokens_per_s,
                  "lr": lr, "tokens": self.tokens_per_step * step}
        if aux_losses:
            record["aux_loss"] = sum(aux_losses) / len(aux_losses)
        self.write(record)
        self.restart_window()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_log(log_path: Path, png_path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r["loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r["val_loss"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "training loss"), (val, "validation loss")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label.startswith("val") else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
