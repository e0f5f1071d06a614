"""The model card of a PT model pushed to the Hub, rendered from `model_cards/ptt.md` (Jinja2, through
`huggingface_hub.ModelCard.from_template`).

Reads from the model directory:
    config.json        architecture table (tracks, block depth, heads per track, sync points)
    *.safetensors      parameter count, from the headers only
    train_log.jsonl    optional: one JSON object per line with any of `step`, `loss`, `val_loss`, `tokens_per_s`,
                       `lr`, `tokens`, `dataset`; unreadable lines are skipped and counted
    benchmark.json     optional: any JSON object; scalars become a key/value table, lists of objects become tables
A file that is absent (or holds nothing usable) leaves its section out of the card.

Kept out of `modeling_ptt/`: it imports huggingface_hub and Jinja2, which remote code must not need.
"""

import json
import math
import re
import statistics
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open


TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "ptt.md"
TRAINING_LOG = "train_log.jsonl"
BENCHMARK = "benchmark.json"
MAX_TABLE_ROWS = 40
TAGS = ["parallel-track", "ptt", "custom_code", "text-generation"]


def fmt(value) -> str:
    """A number as a card shows it: integers with separators, floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|").replace("\n", " ")
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def per_track(total: int, share: int) -> str:
    return f"{fmt(total)} / {fmt(share)}"


def count_parameters(weight_files: list[Path]) -> int:
    """Parameters stored in the safetensors files (a tied LM head is stored once and counted once)."""
    total = 0
    for path in weight_files:
        with safe_open(path, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def architecture(config, num_parameters: int) -> dict:
    n, syncs = config.num_tracks, config.num_sync_points
    tp_syncs = config.sync_point_count(config.num_hidden_layers, config.track_block_depth, "tensor_parallel")
    fewer = f", {tp_syncs / syncs:.3g}x fewer" if syncs < tp_syncs else ""
    rows = [
        ("Tracks", fmt(n)),
        ("Track block depth D (layers between merges)", fmt(config.track_block_depth)),
        ("Sync mode", f"`{config.sync_mode}`"),
        ("Layers per track", fmt(config.num_hidden_layers)),
        ("Hidden size (every track carries the full residual stream)", fmt(config.hidden_size)),
        ("Attention heads: total / per track", per_track(config.num_attention_heads,
                                                         config.num_attention_heads_per_track)),
        ("KV heads: total / per track", per_track(config.num_key_value_heads, config.num_key_value_heads_per_track)),
        ("Head dim", fmt(config.head_dim)),
        ("FFN width: total / per track", per_track(config.intermediate_size, config.intermediate_size_per_track)),
        ("Vocabulary", fmt(config.vocab_size)),
        ("Max positions", fmt(config.max_position_embeddings)),
        ("Parameters", fmt(num_parameters)),
        ("Sync points per forward", f"{syncs} (tensor parallelism: {tp_syncs} = 2 x layers{fewer})"),
    ]
    return {"num_tracks": n, "track_block_depth": config.track_block_depth, "sync_points": syncs,
            "tp_sync_points": tp_syncs, "rows": rows}


def read_training_log(path: Path) -> dict | None:
    """Training facts from a JSONL log; None when the file is absent or holds no usable record."""
    if not path.is_file():
        return None
    records, skipped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1

    def series(key: str) -> list[tuple]:
        return [(r.get("step"), r[key]) for r in records if is_number(r.get(key))]

    def at(step) -> str:
        return f" (step {fmt(step)})" if is_number(step) else ""

    rows = []
    if steps := series("step"):
        rows.append(("Last logged step", fmt(max(s for _, s in steps))))
    if tokens := series("tokens"):
        rows.append(("Training tokens", fmt(max(t for _, t in tokens))))
    if loss := series("loss"):
        rows.append(("Final training loss", fmt(loss[-1][1]) + at(loss[-1][0])))
    if val := series("val_loss"):
        best = min(val, key=lambda sv: sv[1])
        rows.append(("Final validation loss", fmt(val[-1][1]) + at(val[-1][0])))
        rows.append(("Best validation loss", fmt(best[1]) + at(best[0])))
    if speed := series("tokens_per_s"):
        rows.append(("Throughput, median over the log (tokens/s)", fmt(statistics.median(v for _, v in speed))))
    if lr := series("lr"):
        rows.append(("Peak learning rate", fmt(max(v for _, v in lr))))
    datasets = sorted({r["dataset"] for r in records if isinstance(r.get("dataset"), str)})
    if not rows:
        return None
    return {"source": path.name, "rows": rows, "skipped": skipped, "datasets": datasets}


def read_benchmark(path: Path) -> dict | None:
    """A benchmark JSON of any shape as card tables; None when absent, unparsable or empty."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    rows, tables = [], []

    def walk(value, name: str):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            flat = [flatten(item) for item in value]
            columns = list(dict.fromkeys(key for item in flat for key in item))
            body = [[fmt(item.get(c, "")) for c in columns] for item in flat[:MAX_TABLE_ROWS]]
            tables.append({"name": name or "results", "columns": columns, "rows": body,
                           "truncated": len(flat) > MAX_TABLE_ROWS})
        elif isinstance(value, list):
            rows.append((name, ", ".join(fmt(item) for item in value)))
        elif value is not None:
            rows.append((name or "value", fmt(value)))

    walk(data, "")
    if not rows and not tables:
        return None
    return {"source": path.name, "rows": rows[:MAX_TABLE_ROWS], "tables": tables}


def flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = ", ".join(fmt(item) for item in value)
        else:
            flat[name] = value
    return flat


def build_model_card(model_dir: Path, repo_id: str, config, files: list[str], license: str = "apache-2.0",
                     datasets: list[str] | None = None, prompt: str = "The") -> ModelCard:
    """The card of `model_dir` pushed as `repo_id`; `files` are the repo's file names (weights among them)."""
    model_dir = Path(model_dir)
    weights = [model_dir / name for name in files if name.endswith(".safetensors")]
    training = read_training_log(model_dir / TRAINING_LOG)
    benchmark = read_benchmark(model_dir / BENCHMARK)
    datasets = sorted(set(datasets or []) | set(training["datasets"] if training else []))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        license=license,
        datasets=datasets or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        repo_id=repo_id,
        arch=architecture(config, count_parameters(weights)),
        training=training,
        benchmark=benchmark,
        has_tokenizer=any(name in files for name in ("tokenizer.json", "tokenizer.model", "vocab.json")),
        prompt=prompt,
        files=sorted(set(files) | {"README.md"}),
    )
    # optional sections leave runs of blank lines behind; Markdown needs at most one
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))
