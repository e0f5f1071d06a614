"""How `train.py` spreads one training job over its processes: data parallel through accelerate, or track parallel.

Data parallel (`DataParallel`): every process holds the whole model; accelerate wraps it in DDP, which averages every
gradient over all processes once per optimizer step.

Track parallel (`TrackParallel`, `--track-parallel W`): the processes form a 2-D `DeviceMesh` `(data, tracks)` of
shape `(P / W, W)`, `P` the process count. The `W` ranks of one row are a track group: rank `t` of the row holds the
tracks `[t*n/W, (t+1)*n/W)` and a replica of the shared embedding, final norm and LM head, and the model's merges
all_reduce over the row (`PTTrackSync`'s f/g pair, so gradients come out as one process's). The rows are data-parallel
replicas: they read different batches, and DDP over each column (the ranks that hold the same tracks) averages their
gradients. The ranks of a row read the same batches and are never wrapped in DDP together: DDP would broadcast one
rank's tracks to the others and average different tracks' gradients.

Per optimizer step a track-parallel job runs, besides the merges (`2*ceil(L/D)` all_reduces per micro-batch forward and
backward, `4L` in tensor_parallel mode, one more for a PT-MoE's load-balancing loss): one all_reduce of the tracks'
squared gradient norms for clipping, DDP's gradient buckets when there is more than one row, and the loss's
reduction over the rows for the log.
"""

import hashlib
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from modeling_ptt import PTConfig, PTForCausalLM


def check_layout(num_processes: int, track_parallel: int, num_tracks: int, mixed_precision: str) -> None:
    """A layout that cannot work fails here, on every rank, before the process group starts or any weight exists."""
    if track_parallel < 1:
        raise ValueError(f"--track-parallel {track_parallel}: must be at least 1")
    if num_tracks % track_parallel:
        divisors = [w for w in range(1, num_tracks + 1) if num_tracks % w == 0]
        raise ValueError(f"--track-parallel {track_parallel} does not divide num_tracks={num_tracks}: every rank "
                         f"must hold the same number of whole tracks (choose one of {divisors})")
    if num_processes % track_parallel:
        raise ValueError(f"--track-parallel {track_parallel} does not divide the {num_processes} launched processes: "
                         f"the (data, tracks) mesh needs a multiple of {track_parallel} processes")
    if mixed_precision == "fp16":
        raise ValueError("--mixed-precision fp16 with --track-parallel: fp16's loss scaler would skip steps on some "
                         "ranks and not others; use bf16 or no")


def module_seed(seed: int, module_name: str) -> int:
    """A seed of its own for every module, so a module's draw does not depend on what was drawn before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{module_name}".encode()).digest()[:8], "little")


def init_from_scratch(config: PTConfig, seed: int, tracks: range) -> PTForCausalLM:
    """A freshly initialised model that holds only the tracks `tracks` of every track-stacked tensor.

    The model is built on the meta device; then, one module at a time, its full tensors are drawn on the CPU by the
    model's own `_init_weights` from a generator seeded by `(seed, module name)`, and only the slice `tracks` is kept.
    So every rank holds exactly its slice of what one process draws with `tracks=range(num_tracks)`, whatever the
    number of ranks, and no rank ever holds more than one module's full tensors beyond its own slices.
    """
    with torch.device("meta"):
        model = PTForCausalLM(config)
    track_names = set(model.track_stacked_parameter_names())
    for module_name, module in model.named_modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not own or not any(tensor.is_meta for tensor in own):
            continue
        module.to_empty(device="cpu", recurse=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(seed, module_name))
            model._init_weights(module)
        for leaf, param in module._parameters.items():
            if param is not None and f"{module_name}.{leaf}".removeprefix(".") in track_names:
                module._parameters[leaf] = torch.nn.Parameter(param.detach()[tracks.start : tracks.stop].clone())
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


class DataParallel:
    """Every process trains the whole model; accelerate's DDP averages the gradients (the default mode)."""

    def __init__(self, mixed_precision: str, gradient_accumulation_steps: int):
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        has_accelerator = torch.accelerator.is_available()
        self.accelerator = Accelerator(
            # accelerate's torchrun launcher on a machine without GPUs: data parallel over gloo on the CPU (without
            # cpu=True every process would believe it trains alone)
            cpu=launched > 1 and not has_accelerator,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
        if self.accelerator.num_processes != launched:
            raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but accelerate runs "
                               f"{self.accelerator.num_processes}: every process would train its own model")
        self.device = self.accelerator.device
        self.num_replicas = self.accelerator.num_processes
        self.replica_index = self.accelerator.process_index
        self.is_main_process = self.accelerator.is_main_process
        self.tracks: range | None = None

    def track_range(self, num_tracks: int) -> range:
        self.tracks = range(num_tracks)  # every process holds every track
        return self.tracks

    def prepare(self, model, optimizer, scheduler):
        model, optimizer = self.accelerator.prepare(model, optimizer)
        # stepped by hand once per optimizer step (a prepared scheduler steps once per process)
        self.accelerator.register_for_checkpointing(scheduler)
        return model, optimizer

    def accumulate(self, model):
        return self.accelerator.accumulate(model)

    @property
    def sync_gradients(self) -> bool:
        return self.accelerator.sync_gradients

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, model, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, value: torch.Tensor) -> float:
        """The mean over the data-parallel replicas (the loss of the whole global batch)."""
        return self.accelerator.reduce(value.detach().float(), "mean").item()

    def gather_tracks(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor

    def full_model(self, model) -> PTForCausalLM | None:
        """The whole trained model on the main process (None elsewhere), for `save_pretrained`."""
        return self.accelerator.unwrap_model(model) if self.is_main_process else None

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()


class TrackParallel:
    """The tracks over the "tracks" axis of a `(data, tracks)` mesh, DDP over the "data" axis (see the module doc)."""

    def __init__(self, track_parallel: int, mixed_precision: str, gradient_accumulation_steps: int):
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if num_processes > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.track_parallel = track_parallel
        self.num_replicas = num_processes // track_parallel
        if num_processes > 1:
            self.mesh = init_device_mesh(self.device.type, (self.num_replicas, track_parallel),
                                         mesh_dim_names=("data", "tracks"))
            self.track_group, self.data_group = self.mesh.get_group("tracks"), self.mesh.get_group("data")
            self.track_index, self.replica_index = self.mesh.get_local_rank("tracks"), self.mesh.get_local_rank("data")
        else:
            self.mesh = self.track_group = self.data_group = None
            self.track_index = self.replica_index = 0
        self.is_main_process = num_processes == 1 or dist.get_rank() == 0
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if mixed_precision == "bf16" \
            else nullcontext()
        self.accumulation_steps = gradient_accumulation_steps
        self.micro_steps = 0
        self.tracks: range | None = None
        self.track_params: set[int] = set()

    def track_range(self, num_tracks: int) -> range:
        per_rank = num_tracks // self.track_parallel
        self.tracks = range(self.track_index * per_rank, (self.track_index + 1) * per_rank)
        return self.tracks

    def prepare(self, model: PTForCausalLM, optimizer, scheduler):
        model.place_tracks(self.track_group if self.track_parallel > 1 else None, len(self.tracks))
        names = set(model.track_stacked_parameter_names())
        self.track_params = {id(param) for name, param in model.named_parameters() if name in names}
        if self.num_replicas > 1:
            # the buffers (RoPE) are computed alike everywhere: nothing to broadcast before every forward
            model = DistributedDataParallel(model, process_group=self.data_group, broadcast_buffers=False,
                                            device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model, optimizer

    @property
    def sync_gradients(self) -> bool:
        return self.micro_steps % self.accumulation_steps == 0

    @contextmanager
    def accumulate(self, model):
        """One micro-batch; DDP reduces the gradients only on the last one of an optimizer step."""
        self.micro_steps += 1
        skip_sync = not self.sync_gradients and isinstance(model, DistributedDataParallel)
        with model.no_sync() if skip_sync else nullcontext(), self.autocast:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def clip_grad_norm_(self, model, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: the ranks' track parts are disjoint, so their squared norms
        add up (one all_reduce); the shared part is the same on every rank and counts once."""
        params = [param for param in model.parameters() if param.grad is not None]
        track = [param.grad for param in params if id(param) in self.track_params]
        shared = [param.grad for param in params if id(param) not in self.track_params]
        squared = get_total_norm(track).square() if track else torch.zeros((), device=self.device)
        if self.track_group is not None:
            dist.all_reduce(squared, group=self.track_group)
        total = (squared + get_total_norm(shared).square()).sqrt()
        clip_grads_with_norm_(params, max_norm, total)
        return total

    def mean(self, value: torch.Tensor) -> float:
        value = value.detach().float().clone()
        if self.num_replicas > 1:
            dist.all_reduce(value, group=self.data_group)
        return value.item() / self.num_replicas

    def gather_tracks(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate the ranks' local-track `tensor`s of one track group along `dim` (the track dim)."""
        if self.track_group is None or self.track_parallel == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.track_parallel)]
        dist.all_gather(parts, tensor.contiguous(), group=self.track_group)
        return torch.cat(parts, dim)

    def full_model(self, model) -> PTForCausalLM | None:
        """The whole model, gathered from the first row's ranks one tensor at a time, on the main process."""
        model = model.module if isinstance(model, DistributedDataParallel) else model
        names = set(model.track_stacked_parameter_names())
        state_dict = {}
        for name, tensor in model.state_dict().items():
            tensor = self.gather_tracks(tensor, 0) if name in names else tensor
            if self.is_main_process:
                state_dict[name] = tensor.detach().cpu()
        if not self.is_main_process:
            return None
        with torch.device("meta"):
            full = PTForCausalLM(model.config)
        full.load_state_dict(state_dict, assign=True)
        if model.config.tie_word_embeddings:
            full.tie_weights()
        for buffer_owner in full.modules():  # RoPE's non-persistent buffers are not in the state dict
            if any(buffer.is_meta for buffer in buffer_owner.buffers(recurse=False)):
                buffer_owner.to_empty(device="cpu", recurse=False)
                full._init_weights(buffer_owner)
        full.generation_config = model.generation_config
        return full

    def wait_for_everyone(self) -> None:
        if dist.is_initialized():
            dist.barrier()

