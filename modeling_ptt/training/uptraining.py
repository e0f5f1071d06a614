"""Uptraining: a PT model from a trained dense model, without pretraining from scratch.

`PTForCausalLM.from_llama` puts a dense Llama into PT's tensor-parallel layout: `n` tracks, merged after every
sublayer (`2L` merges), that compute the dense model exactly. The same weights in block mode (merged every `D` layers,
`ceil(L/D)` merges) are a different function, and a worse model at first. `Uptrainer` trains them on in block mode,
distilling from the dense model they came from:

    loss = LM loss + distill_weight * KL(teacher || student)      (per token, over every position)

with the merges removed on a schedule: `merge_schedule` lists the block depths the student goes through, each for an
equal share of the steps, ending at the model's `track_block_depth` (by default it starts there). Everything else is
the `Trainer`'s (data, layouts, kill-safe checkpoints, export): an uptraining run resumes like any other, and
`--track-parallel W` gives each rank its student tracks while every rank holds the dense teacher whole.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, LlamaForCausalLM

from ..configuration_ptt import PTConfig
from ..modeling_parallel_track import PTForCausalLM
from .parallelize import unwrap
from .trainer import CONFIG_OVERRIDES, Trainer, config_values


def load_teacher(path: str | Path) -> LlamaForCausalLM:
    """A dense model as transformers' Llama: a `LlamaForCausalLM` folder, or the folder of a PT model that is a dense
    one (one track; see `PTForCausalLM.to_llama`)."""
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "llama":
        return LlamaForCausalLM.from_pretrained(path)
    if model_type == PTConfig.model_type:
        return PTForCausalLM.from_pretrained(path).to_llama()
    raise ValueError(f"--uptrain-from {path}: a {model_type!r} model; uptraining starts from a dense Llama "
                     "(model_type 'llama') or a PT model with num_tracks=1")


def student_from_teacher(teacher: LlamaForCausalLM, num_tracks: int, tracks: range) -> PTForCausalLM:
    """The teacher in PT's tensor-parallel layout (its logits), holding only the tracks `tracks`."""
    student = PTForCausalLM.from_llama(teacher, num_tracks)
    if len(tracks) < num_tracks:
        for name in student.track_stacked_parameter_names():
            module_name, _, leaf = name.rpartition(".")
            module = student.get_submodule(module_name)
            module._parameters[leaf] = torch.nn.Parameter(module._parameters[leaf].detach()[tracks.start : tracks.stop]
                                                          .clone())
    return student


def merge_stages(schedule: list[int] | None, track_block_depth: int) -> list[int]:
    """The block depths of `--merge-schedule`, checked: positive, ending at the model's `track_block_depth`."""
    stages = list(schedule or [track_block_depth])
    if any(depth < 1 for depth in stages) or stages[-1] != track_block_depth:
        raise ValueError(f"--merge-schedule {','.join(map(str, stages))}: positive block depths ending at "
                         f"track_block_depth={track_block_depth}")
    return stages


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over every position."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1).flatten(0, -2),
                    F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, -2), log_target=True,
                    reduction="batchmean")


class Uptrainer(Trainer):
    """`Trainer` that starts from `args.uptrain_from` (see the module doc): `args.num_tracks` and
    `args.track_block_depth` (or the `--config` file's) shape the student, the teacher everything else."""

    def __init__(self, args):
        fixed_by_teacher = sorted(field for field in CONFIG_OVERRIDES
                                  if field not in ("num_tracks", "track_block_depth")
                                  and getattr(args, field, None) is not None)
        if fixed_by_teacher or args.output_proj_scale != 1.0:
            raise ValueError(f"--uptrain-from: the student takes its shape and weights from the teacher, so "
                             f"{', '.join(fixed_by_teacher) or '--output-proj-scale'} cannot be set")
        args.tokenizer = args.tokenizer or args.uptrain_from
        self.teacher = load_teacher(args.uptrain_from)
        super().__init__(args)
        self.teacher.to(self.layout.device).eval().requires_grad_(False)
        self.stages = merge_stages(args.merge_schedule, self.target_depth)

    def init_model(self) -> PTForCausalLM:
        if len(self.tokenizer) > self.teacher.config.vocab_size:
            raise ValueError(f"--tokenizer has {len(self.tokenizer)} tokens, more than the teacher's "
                             f"vocab_size={self.teacher.config.vocab_size}")
        values = config_values(self.args)
        student = student_from_teacher(self.teacher, values["num_tracks"], self.layout.tracks)
        self.target_depth = values["track_block_depth"]
        student.set_sync_schedule(track_block_depth=self.target_depth, sync_mode="track_block")
        return student

    def stage(self) -> int:
        """The block depth of the current step."""
        return self.stages[min(self.step * len(self.stages) // self.args.max_steps, len(self.stages) - 1)]

    def set_stage(self) -> None:
        student = unwrap(self.model)
        if (student.config.sync_mode, student.config.track_block_depth) != ("track_block", self.stage()):
            student.set_sync_schedule(track_block_depth=self.stage(), sync_mode="track_block")

    def forward(self, batch: torch.Tensor):
        self.set_stage()
        outputs = super().forward(batch)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch, use_cache=False).logits
        outputs.loss = outputs.loss + self.args.distill_weight * distillation_loss(outputs.logits, teacher_logits)
        return outputs

    @torch.no_grad()
    def evaluate(self) -> float:
        self.set_stage()
        return super().evaluate()
