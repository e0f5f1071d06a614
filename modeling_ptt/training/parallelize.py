"""How one training job spreads a PT model over its processes: one `(data, tracks)` mesh for every layout.

The `P` processes form a 2-D `DeviceMesh` `("data", "tracks")` of shape `(P / W, W)`, `W` the track-parallel size
(`--track-parallel`, 1 without it). The `W` ranks of one row are a track group: they hold the tracks
`placement.track_range(t, W, n)` each and a replica of the shared embedding, final norm and LM head, and the model's
merges all_reduce over the row (`PTTrackSync`'s f/g pair, so gradients come out as one process's). The rows are
data-parallel replicas: they read different batches, and DDP, or FSDP2 with `fsdp=True`, over each column (the
ranks that hold the same tracks) averages their gradients. The ranks of a row read the same batches and are never
wrapped in DDP together: DDP would broadcast one rank's tracks to the others and average different tracks'
gradients. Plain data parallelism is the same mesh with `W = 1`; one process is the mesh of one.

    layout = Layout(track_parallel=2, num_tracks=config.num_tracks, fsdp=True)   # starts the process group
    model = init_from_scratch(config, seed, layout.tracks).to(layout.device)
    model = parallelize_ptt(model, layout)          # apply_track_parallel, then apply_ddp or apply_fsdp
    ... loss.backward(); clip_grad_norm_(model, 1.0, layout); optimizer.step()

Per optimizer step a track-parallel job runs, besides the merges (`2*ceil(L/D)` all_reduces per micro-batch forward
and backward, `4L` in tensor_parallel mode, one more for a PT-MoE's load-balancing loss): one all_reduce of the
tracks' squared gradient norms for clipping, the data axis's gradient reduction (DDP's buckets, or FSDP2's
all-gathers and reduce-scatters) when there is more than one row, and the loss's reduction over the rows for a log.
"""

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import get_total_norm

from ..configuration_ptt import PTConfig
from ..modeling_parallel_track import PTForCausalLM
from ..placement import check_track_split, materialize_buffers, rank_device, start_process_group, track_range


def check_layout(num_processes: int, track_parallel: int, num_tracks: int, fsdp: bool = False,
                 mixed_precision: str = "no") -> None:
    """A layout that cannot work fails here, on every rank, before the process group starts or any weight exists."""
    check_track_split(num_tracks, track_parallel, f"--track-parallel {track_parallel}")
    if num_processes % track_parallel:
        raise ValueError(f"--track-parallel {track_parallel} does not divide the {num_processes} launched processes: "
                         f"the (data, tracks) mesh needs a multiple of {track_parallel} processes")
    if fsdp and num_processes == track_parallel:
        raise ValueError(f"FSDP2 shards over the data-parallel replicas, and {num_processes} processes with "
                         f"--track-parallel {track_parallel} make one replica: nothing to shard over (drop --fsdp, "
                         f"or launch a multiple of {track_parallel} processes)")
    # a gradient scaler skips a step when it sees an inf in its own gradients: only plain DDP gives every rank the
    # same (whole, reduced) gradients, so only there do all ranks skip alike
    if mixed_precision == "fp16" and track_parallel > 1:
        raise ValueError("--mixed-precision fp16 with --track-parallel: fp16's loss scaler would skip steps on some "
                         "ranks and not others; use bf16 or no")
    if mixed_precision == "fp16" and fsdp:
        raise ValueError("--mixed-precision fp16 with FSDP2: fp16's loss scaler would skip steps on some ranks (each "
                         "sees only its shard of the gradients) and not others; use bf16 or no")


class Layout:
    """Where this process sits in the job's `(data, tracks)` mesh, and which tracks it holds (see the module doc).

    Attributes: `device`, `mesh` (None in one process), `track_parallel` (W), `num_replicas` (P / W),
    `replica_index` (the row), `track_index` (the column), `tracks` (this rank's), `fsdp`, `is_main_process`.
    """

    def __init__(self, track_parallel: int, num_tracks: int, fsdp: bool = False, mixed_precision: str = "no"):
        num_processes = int(os.environ.get("WORLD_SIZE", "1"))
        check_layout(num_processes, track_parallel, num_tracks, fsdp, mixed_precision)
        self.track_parallel, self.fsdp = track_parallel, fsdp
        self.num_replicas = num_processes // track_parallel
        if num_processes > 1:
            self.device = start_process_group()
            self.mesh = init_device_mesh(self.device.type, (self.num_replicas, track_parallel),
                                         mesh_dim_names=("data", "tracks"))
            self.track_index, self.replica_index = self.mesh.get_local_rank("tracks"), self.mesh.get_local_rank("data")
        else:
            self.device, self.mesh = rank_device(), None
            self.track_index = self.replica_index = 0
        self.tracks = track_range(self.track_index, track_parallel, num_tracks)
        self.is_main_process = num_processes == 1 or dist.get_rank() == 0

    @property
    def track_group(self) -> dist.ProcessGroup | None:
        """The ranks that hold the other tracks of this rank's replica (None when this rank holds them all)."""
        return self.mesh.get_group("tracks") if self.track_parallel > 1 else None

    @property
    def data_group(self) -> dist.ProcessGroup | None:
        """The ranks that hold the same tracks in the other replicas (None with one replica)."""
        return self.mesh.get_group("data") if self.num_replicas > 1 else None

    def mean(self, values: torch.Tensor) -> list[float]:
        """The mean over the data-parallel replicas of each of `values` (one all_reduce over "data")."""
        values = values.detach().float().clone()
        if self.num_replicas > 1:
            dist.all_reduce(values, group=self.data_group)
        return (values / self.num_replicas).tolist()

    def gather_tracks(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate the track group's local-track `tensor`s along `dim` (the track dim)."""
        if self.track_parallel == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.track_parallel)]
        dist.all_gather(parts, tensor.contiguous(), group=self.track_group)
        return torch.cat(parts, dim)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def module_seed(seed: int, module_name: str) -> int:
    """A seed of its own for every module, so a module's draw does not depend on what was drawn before it."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{module_name}".encode()).digest()[:8], "little")


def init_from_scratch(config: PTConfig, seed: int, tracks: range) -> PTForCausalLM:
    """A freshly initialised model on the CPU that holds only the tracks `tracks` of every track-stacked tensor.

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


def apply_track_parallel(model: PTForCausalLM, layout: Layout) -> None:
    """The model's merges all_reduce over the track group (its f/g pair); nothing to do when a rank holds all."""
    model.place_tracks(layout.track_group, len(layout.tracks))


def apply_ddp(model: PTForCausalLM, layout: Layout) -> DistributedDataParallel:
    """DDP over "data": the replicas of the same tracks average their gradients."""
    # the buffers (RoPE) are computed alike everywhere: nothing to broadcast before every forward
    return DistributedDataParallel(model, process_group=layout.data_group, forward_sync_buffers=False,
                                   device_ids=[layout.device.index] if layout.device.type == "cuda" else None)


def apply_fsdp(model: PTForCausalLM, layout: Layout) -> PTForCausalLM:
    """FSDP2 (`fully_shard`) on every decoder layer and the root, over "data" only: a rank's track slices are
    sharded among the ranks that hold the same tracks. Build the optimizer afterwards, over the sharded parameters."""
    track_names = set(model.track_stacked_parameter_names())
    track_stacked = {id(param) for name, param in model.named_parameters() if name in track_names}

    def placement(param: torch.nn.Parameter) -> Shard | None:
        # a rank's few tracks (often one) would split unevenly along dim 0: shard a layer's tensors by rows
        return Shard(1) if id(param) in track_stacked else None

    for layer in model.model.layers:
        fully_shard(layer, mesh=layout.mesh["data"], shard_placement_fn=placement)
    fully_shard(model, mesh=layout.mesh["data"])
    return model


def parallelize_ptt(model: PTForCausalLM, layout: Layout) -> torch.nn.Module:
    """The model (on `layout.device`, holding `layout.tracks`) placed on the mesh: its tracks over "tracks", and
    DDP or FSDP2 over "data" when there are replicas. Build the optimizer over the returned model's parameters."""
    apply_track_parallel(model, layout)
    if layout.num_replicas == 1:
        return model
    return apply_fsdp(model, layout) if layout.fsdp else apply_ddp(model, layout)


def unwrap(model: torch.nn.Module) -> PTForCausalLM:
    """The model inside a DDP wrapper (FSDP2 shards the model in place: it is its own)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Run one micro-batch's backward inside: the data axis reduces its gradients only if `enabled` (the last
    micro-batch of an optimizer step)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    with model.no_sync() if isinstance(model, DistributedDataParallel) and not enabled else nullcontext():
        yield


def full_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of `grads` together, as a plain tensor (FSDP2's DTensor shards reduce over "data")."""
    if not grads:
        return torch.zeros(())
    norm = get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, layout: Layout) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient, as `torch.nn.utils.clip_grad_norm_` on one process would: the
    ranks' track parts are disjoint, so their squared norms add up (one all_reduce); the shared part is the same on
    every rank of a track group and counts once. Returns the norm before clipping."""
    model = unwrap(model)
    track_names = set(model.track_stacked_parameter_names())
    named = [(name, param.grad) for name, param in model.named_parameters() if param.grad is not None]
    squared = full_norm([grad for name, grad in named if name in track_names]).square()
    if layout.track_parallel > 1:
        dist.all_reduce(squared, group=layout.track_group)
    total = (squared + full_norm([grad for name, grad in named if name not in track_names]).square()).sqrt()
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
    for _, grad in named:
        (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(coefficient)
    return total


def full_model(model: torch.nn.Module, layout: Layout) -> PTForCausalLM | None:
    """The whole model on the main process, for `save_pretrained` (None elsewhere; every process takes part): its
    tensors gathered one at a time, from the data shards, then from the tracks."""
    model = unwrap(model)
    track_names = set(model.track_stacked_parameter_names())
    state_dict = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        tensor = layout.gather_tracks(tensor, 0) if name in track_names else tensor
        if layout.is_main_process:
            state_dict[name] = tensor.detach().cpu()
    if not layout.is_main_process:
        return None
    with torch.device("meta"):
        whole = PTForCausalLM(model.config)
    whole.load_state_dict(state_dict, assign=True)
    if model.config.tie_word_embeddings:
        whole.tie_weights()
    materialize_buffers(whole, torch.device("cpu"))
    whole.generation_config = model.generation_config
    return whole
