"""How `train.py` spreads one training job over its processes: data parallel through accelerate, or over a mesh.

Data parallel (`DataParallel`): every process holds the whole model; accelerate wraps it in DDP, which averages every
gradient over all processes once per optimizer step, or, given an FSDP2 config (`--fsdp`, or an accelerate config
file with `fsdp_version: 2`) on GPUs, shards it with FSDP2.

Mesh (`MeshParallel`, `--track-parallel W`, and FSDP2 where accelerate does not apply it): the processes form a 2-D
`DeviceMesh` `(data, tracks)` of shape `(P / W, W)`, `P` the process count. The `W` ranks of one row are a track
group: rank `t` of the row holds the tracks `[t*n/W, (t+1)*n/W)` and a replica of the shared embedding, final norm
and LM head, and the model's merges all_reduce over the row (`PTTrackSync`'s f/g pair, so gradients come out as one
process's). The rows are data-parallel replicas: they read different batches, and DDP, or FSDP2 with `--fsdp`, over
each column (the ranks that hold the same tracks) averages their gradients. The ranks of a row read the same batches
and are never wrapped in DDP together: DDP would broadcast one rank's tracks to the others and average different
tracks' gradients.

Per optimizer step a track-parallel job runs, besides the merges (`2*ceil(L/D)` all_reduces per micro-batch forward and
backward, `4L` in tensor_parallel mode, one more for a PT-MoE's load-balancing loss): one all_reduce of the tracks'
squared gradient norms for clipping, the data axis's gradient reduction (DDP's buckets, or FSDP2's all-gathers and
reduce-scatters) when there is more than one row, and the loss's reduction over the rows for the log.
"""

import hashlib
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import parse_flag_from_env
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import get_total_norm

import checkpoints  # a sibling module of scripts/
from modeling_ptt import PTConfig, PTForCausalLM


SCHEDULE_STATE = "schedule.json"  # the LR scheduler's state and the optimizer's param groups (learning rates)


def check_layout(num_processes: int, track_parallel: int, num_tracks: int, mixed_precision: str, fsdp: bool) -> None:
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
    if fsdp and num_processes == track_parallel:
        raise ValueError(f"FSDP2 shards over the data-parallel replicas, and {num_processes} processes with "
                         f"--track-parallel {track_parallel} make one replica: nothing to shard over (drop --fsdp, "
                         f"or launch a multiple of {track_parallel} processes)")
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

    def __init__(self, mixed_precision: str, gradient_accumulation_steps: int, fsdp: bool = False):
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        has_accelerator = torch.accelerator.is_available()
        self.fsdp = fsdp
        # asked for on the command line rather than by an accelerate config file (which sets it up itself)
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["PTDecoderLayer"]
        ) if fsdp and not parse_flag_from_env("ACCELERATE_USE_FSDP") else None
        self.accelerator = Accelerator(
            # accelerate's torchrun launcher on a machine without GPUs: data parallel over gloo on the CPU (without
            # cpu=True every process would believe it trains alone)
            cpu=launched > 1 and not has_accelerator,
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            fsdp_plugin=plugin,
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

    def prepare(self, model, optimizer):
        # not the scheduler: it is stepped by hand once per optimizer step (a prepared one steps once per process)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.fsdp:
            check_sharded(model)
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

    def mean(self, values: torch.Tensor) -> list[float]:
        """The mean over the data-parallel replicas of each of `values` (losses of the whole global batch)."""
        return self.accelerator.reduce(values.detach().float(), "mean").tolist()

    def gather_tracks(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor

    def full_model(self, model) -> PTForCausalLM | None:
        """The whole trained model on the main process (None elsewhere), for `save_pretrained`."""
        if not self.fsdp:
            return self.accelerator.unwrap_model(model) if self.is_main_process else None
        state_dict = self.accelerator.get_state_dict(model)  # gathers the shards: every process takes part
        return model_from_state_dict(model.config, state_dict, model.generation_config) if self.is_main_process \
            else None

    def save_state(self, directory: Path, model, optimizer, scheduler, state: dict) -> None:
        """Collective; files that load without unpickling. Without FSDP the main process writes the whole state
        (`checkpoints.write_training_state`); FSDP2 on GPUs writes every rank's shards as the mesh modes do (so such
        a checkpoint also resumes in them, and they in it)."""
        if self.fsdp:
            save_sharded_state(directory, model, optimizer, scheduler, state, plain_view, self.is_main_process,
                               self.accelerator.scaler)
        else:
            checkpoints.write_training_state(directory, self.accelerator.unwrap_model(model), optimizer, scheduler,
                                             state, self.accelerator.scaler)

    def load_state(self, directory: Path, model, optimizer, scheduler) -> None:
        if self.fsdp:
            load_sharded_state(directory, model, optimizer, scheduler, plain_view, self.accelerator.scaler)
        else:
            checkpoints.read_training_state(directory, self.accelerator.unwrap_model(model), optimizer, scheduler,
                                            self.accelerator.scaler)

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()


class MeshParallel:
    """A `(data, tracks)` mesh: the tracks split over the "tracks" axis, and over the "data" axis either DDP or, with
    `shard=True`, FSDP2 (`fully_shard` on every `PTDecoderLayer` and the root, over "data" only: a rank's track
    slices are sharded among the ranks that hold the same tracks). See the module doc."""

    def __init__(self, track_parallel: int, shard: bool, mixed_precision: str, gradient_accumulation_steps: int):
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if num_processes > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.track_parallel = track_parallel
        self.num_replicas = num_processes // track_parallel
        self.shard = shard
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
        self.track_param_names: set[str] = set()

    def track_range(self, num_tracks: int) -> range:
        per_rank = num_tracks // self.track_parallel
        self.tracks = range(self.track_index * per_rank, (self.track_index + 1) * per_rank)
        return self.tracks

    def prepare(self, model: PTForCausalLM, optimizer):
        model.place_tracks(self.track_group if self.track_parallel > 1 else None, len(self.tracks))
        self.track_param_names = set(model.track_stacked_parameter_names())
        if self.num_replicas == 1:
            return model, optimizer
        if not self.shard:
            # the buffers (RoPE) are computed alike everywhere: nothing to broadcast before every forward
            model = DistributedDataParallel(model, process_group=self.data_group, forward_sync_buffers=False,
                                            device_ids=[self.device.index] if self.device.type == "cuda" else None)
            return model, optimizer
        names = {id(param): name for name, param in model.named_parameters()}
        track_stacked = {id(param) for name, param in model.named_parameters() if name in self.track_param_names}

        def placement(param: torch.nn.Parameter) -> Shard | None:
            # a rank's few tracks (often one) would split unevenly along dim 0: shard a layer's tensors by rows
            return Shard(1) if id(param) in track_stacked else None

        for layer in model.model.layers:
            fully_shard(layer, mesh=self.mesh["data"], shard_placement_fn=placement)
        fully_shard(model, mesh=self.mesh["data"])
        check_sharded(model)
        sharded = dict(model.named_parameters())  # fully_shard swapped every parameter for a DTensor shard
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(param)]] for param in group["params"]]
        return model, optimizer

    @property
    def sync_gradients(self) -> bool:
        return self.micro_steps % self.accumulation_steps == 0

    @contextmanager
    def accumulate(self, model):
        """One micro-batch; the data axis reduces the gradients only on the last one of an optimizer step."""
        self.micro_steps += 1
        skip_sync = nullcontext()
        if isinstance(model, DistributedDataParallel) and not self.sync_gradients:
            skip_sync = model.no_sync()
        elif isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(self.sync_gradients)
        with skip_sync, self.autocast:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def clip_grad_norm_(self, model, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the whole model's gradient: the ranks' track parts are disjoint, so their squared norms
        add up (one all_reduce); the shared part is the same on every rank of a track group and counts once."""
        named = [(name, param.grad) for name, param in unwrap(model).named_parameters() if param.grad is not None]
        track = [grad for name, grad in named if name in self.track_param_names]
        shared = [grad for name, grad in named if name not in self.track_param_names]
        squared = full_norm(track).square()
        if self.track_parallel > 1:
            dist.all_reduce(squared, group=self.track_group)
        total = (squared + full_norm(shared).square()).sqrt()
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for _, grad in named:
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coefficient)
        return total

    def mean(self, values: torch.Tensor) -> list[float]:
        """The mean over the data-parallel replicas of each of `values` (one all_reduce over "data")."""
        values = values.detach().float().clone()
        if self.num_replicas > 1:
            dist.all_reduce(values, group=self.data_group)
        return (values / self.num_replicas).tolist()

    def gather_tracks(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate the ranks' local-track `tensor`s of one track group along `dim` (the track dim)."""
        if self.track_parallel == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.track_parallel)]
        dist.all_gather(parts, tensor.contiguous(), group=self.track_group)
        return torch.cat(parts, dim)

    def full_model(self, model) -> PTForCausalLM | None:
        """The whole model on the main process, gathered one tensor at a time (from the data shards, then from the
        tracks); None elsewhere."""
        model = unwrap(model)
        state_dict = {}
        for name, tensor in model.state_dict().items():
            tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            tensor = self.gather_tracks(tensor, 0) if name in self.track_param_names else tensor
            if self.is_main_process:
                state_dict[name] = tensor
        return model_from_state_dict(model.config, state_dict, model.generation_config) if self.is_main_process \
            else None

    def global_view(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (of the parameter `name`) as what it is globally: a rank's track slice as its `Shard(0)` of a
        DTensor over the "tracks" axis (so a checkpoint holds every tensor whole, whatever W wrote it), an FSDP2
        shard as its DTensor, and an FSDP2 shard of a track slice as a DTensor over both axes."""
        tensor = tensor.detach()
        if self.track_parallel == 1 or name not in self.track_param_names or tensor.dim() == 0:
            return tensor
        if not isinstance(tensor, DTensor):
            return DTensor.from_local(tensor, self.mesh["tracks"], [Shard(0)], run_check=False)
        # FSDP2's rows of the rank's tracks: the same rows of all tracks are spread over the "tracks" axis
        shape = torch.Size([tensor.shape[0] * self.track_parallel, *tensor.shape[1:]])
        return DTensor.from_local(tensor.to_local(), self.mesh, [Shard(1), Shard(0)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def save_state(self, directory: Path, model, optimizer, scheduler, state: dict) -> None:
        save_sharded_state(directory, unwrap(model), optimizer, scheduler, state, self.global_view,
                           self.is_main_process)

    def load_state(self, directory: Path, model, optimizer, scheduler) -> None:
        load_sharded_state(directory, unwrap(model), optimizer, scheduler, self.global_view)

    def wait_for_everyone(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def sharded_state(model, optimizer, global_view) -> dict[str, torch.Tensor]:
    """The model's and AdamW's tensors by name, each as `global_view(parameter name, tensor)` gives it. The tensors
    share storage with the live ones: loading into them loads the model."""
    if isinstance(model, FSDPModule):
        model.reshard()  # FSDP2 keeps the root's parameters gathered after a forward: back to the shards
    named = dict(model.named_parameters())
    state = {f"model.{name}": global_view(name, param) for name, param in named.items()}
    for name, param in named.items():
        if not optimizer.state[param]:  # a fresh AdamW creates its state at the first step: create it now
            optimizer.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param.detach()),
                                          exp_avg_sq=torch.zeros_like(param.detach()))
        for key, value in optimizer.state[param].items():
            state[f"optimizer.{name}.{key}"] = global_view(name, value)
    return state


def save_sharded_state(directory: Path, model, optimizer, scheduler, state: dict, global_view,
                       is_main_process: bool, scaler=None) -> None:
    """Collective: every rank writes its own shards of `sharded_state`, as safetensors files that carry
    torch.distributed.checkpoint's sharding in their metadata (nothing is pickled), and its generator states; the
    main process the scheduler, the optimizer's learning rates (and an fp16 scaler) as JSON."""
    dcp.save(sharded_state(model, optimizer, global_view),
             storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))
    checkpoints.write_rng_states(directory)
    if is_main_process:
        groups = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
        schedule = {"scheduler": scheduler.state_dict(), "param_groups": groups}
        if scaler is not None:
            schedule["scaler"] = scaler.state_dict()
        checkpoints.write_json(directory / SCHEDULE_STATE, schedule)
        checkpoints.write_trainer_state(directory, state)


def load_sharded_state(directory: Path, model, optimizer, scheduler, global_view, scaler=None) -> None:
    """Load what `save_sharded_state` wrote, with any number of ranks: each reads the parts of the tensors it holds."""
    dcp.load(sharded_state(model, optimizer, global_view), storage_reader=HuggingFaceStorageReader(str(directory)))
    schedule = checkpoints.read_json(directory, SCHEDULE_STATE)
    scheduler.load_state_dict(schedule["scheduler"])
    for group, saved in zip(optimizer.param_groups, schedule["param_groups"], strict=True):
        group.update(saved)
    if scaler is not None:
        scaler.load_state_dict(schedule["scaler"])
    checkpoints.read_rng_states(directory)


def model_from_state_dict(config: PTConfig, state_dict: dict, generation_config) -> PTForCausalLM:
    """A whole model holding `state_dict`'s tensors (without copying them), for `save_pretrained`."""
    with torch.device("meta"):
        model = PTForCausalLM(config)
    model.load_state_dict({name: tensor.detach().cpu() for name, tensor in state_dict.items()}, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    for owner in model.modules():  # RoPE's non-persistent buffers are not in the state dict
        if any(buffer.is_meta for buffer in owner.buffers(recurse=False)):
            owner.to_empty(device="cpu", recurse=False)
            model._init_weights(owner)
    model.generation_config = generation_config
    return model


def plain_view(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as a checkpoint holds it when every rank holds every track (an FSDP2 shard is its own DTensor)."""
    return tensor.detach()


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of `grads` together, as a plain tensor (FSDP2's DTensor shards reduce over "data")."""
    if not grads:
        return torch.zeros(())
    norm = get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def check_sharded(model) -> None:
    """FSDP was asked for: every parameter must be a DTensor shard (accelerate silently trains unsharded where its
    FSDP does not apply, e.g. without GPUs)."""
    plain = [name for name, param in model.named_parameters() if not isinstance(param, DTensor)]
    if plain:
        raise RuntimeError(f"FSDP was requested but {len(plain)} parameters are not sharded (e.g. {plain[:3]}): "
                           "the model would train as a full replica on every process")
