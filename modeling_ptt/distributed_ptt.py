"""Track parallelism: the tracks of a PT model spread over the ranks of a `torchrun` / `accelerate launch` job.

With `W` processes, rank `r` owns the tracks `placement.track_range(r, W, n)` (`W` divides `num_tracks = n`; see
`placement`): it holds that slice of every track-stacked tensor and a full copy of the shared ones. The forward is the single-device forward; only `PTTrackSync.merge` differs, with
one all_reduce per merge. This module holds what surrounds it: working out `W` from transformers' own keywords,
joining the process group, and reading each rank's slices from safetensors.

Why not transformers' tensor-parallel loader (`distributed_config=DistributedConfig(tp_size=W)` with a `tp_plan`
whose style shards dim 0), tried on transformers 5.17 and 5.24: a style registered in `ALL_PARALLEL_STYLES` whose
`shard_param` wraps each track tensor as a `Shard(0)` DTensor does load the right slices on both, but
  - the loader finds a rank's slice from the parameter's DTensor placements, so the parameters stay DTensors after
    loading and the forward fails on them ("aten.mul.Tensor got mixed torch.Tensor and DTensor"). Computing on plain
    tensors means swapping them to local ones around every forward (`_use_local_dtensor_params`, what transformers'
    own styles do) or converting them after `from_pretrained` returns, which needs an overridden `from_pretrained`
    anyway;
  - a DTensor `Shard(0)` accepts uneven splits (6 tracks on 4 ranks gives 2, 2, 2, 0 tracks) where PT needs a clear
    error naming `n` and `W` before anything loads, and setting `PTTrackSync`'s process group and local track count
    would take a style whose `install_forward` sets attributes instead of wrapping a forward;
  - the plan resolution and loading internals it relies on are private and changed between 5.17 and 5.24
    (`model.tp_plan` vs `_resolve_parallel_plans`, the registry class, the shard-on-read path), and generation's
    own tensor-parallel code keys off `colwise` key projections (`get_kv_heads_per_rank`), which PT would not have.
So `PTPreTrainedModel.from_pretrained` takes the same keywords (`distributed_config`, `tp_size`, `tp_plan="auto"`)
and loads with `load_track_parallel` below: the model is built on the meta device, and every rank reads only its
slices of the safetensors files (one file or a sharded index; see `SafetensorsRows` for why not `safe_open`), so no
rank materialises the full model. Parameters are plain tensors afterwards.

Generation adds no collective beyond the merges. After a merge's all_reduce every rank holds bit-identical merged
states (the reduction result is computed once per element and shared, and the shared embedding/norm/head then run
the same kernels on the same inputs), so every rank computes the same logits and, from the same RNG state, picks
the same tokens: there is nothing to broadcast. Sampling therefore needs the same RNG state on every rank:
torch seeds every process differently, so loading copies rank 0's RNG state to all ranks (one broadcast, once), and
loading and the forward draw no random numbers. Seed with the same value everywhere (`transformers.set_seed(s)`),
never `s + rank`, and draw from torch's RNG the same way on every rank between load and generate. Ranks on
hardware that computes the shared layers differently (mixed GPU models) could diverge.

Faults: a rank that dies makes the collectives of the others fail (gloo: at once, when the peer's connection
closes) or time out after the process-group timeout, so the survivors raise and exit instead of hanging. The
timeout is `from_pretrained(..., process_group_timeout=seconds)`, else the environment variable
`PTT_PROCESS_GROUP_TIMEOUT` (seconds), else torch's default (30 min gloo, 10 min NCCL); it applies when this module
starts the process group. On NCCL, torch's watchdog (`TORCH_NCCL_ASYNC_ERROR_HANDLING`, on by default) enforces it.
"""

import copy
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import GenerationConfig, PreTrainedConfig
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file, logging

from .placement import check_track_split, materialize_buffers, rank_device, start_process_group, track_range


logger = logging.get_logger(__name__)
TIMEOUT_ENV = "PTT_PROCESS_GROUP_TIMEOUT"
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


def track_parallel_size(kwargs: dict) -> int | None:
    """Pop transformers' tensor-parallel keywords from `from_pretrained` kwargs; return `W`, or None if absent.

    `distributed_config=DistributedConfig(tp_size=W)` is the documented knob; the older `tp_size=W` and
    `tp_plan="auto"` are accepted too. Without a size, `W` is the launcher's `WORLD_SIZE`.
    """
    distributed_config = kwargs.pop("distributed_config", None)
    tp_plan = kwargs.pop("tp_plan", None)
    tp_size = kwargs.pop("tp_size", None)
    if distributed_config is None and tp_plan is None and tp_size is None:
        return None
    if distributed_config is not None:
        if tp_plan is not None or tp_size is not None:
            raise ValueError("Pass either `distributed_config` or the standalone `tp_plan`/`tp_size`, not both.")
        if isinstance(distributed_config, dict):
            tp_plan, tp_size = distributed_config.get("tp_plan"), distributed_config.get("tp_size")
        else:
            tp_plan, tp_size = distributed_config.tp_plan, distributed_config.tp_size
        for field in ("dp_size", "fsdp_size", "pp_size", "ep_size"):
            size = distributed_config.get(field) if isinstance(distributed_config, dict) else getattr(
                distributed_config, field, None)
            if size not in (None, 1):
                raise ValueError(f"DistributedConfig.{field}={size}: a PT model supports track parallelism only "
                                 "(tp_size); data, pipeline and expert parallelism are not implemented.")
    if tp_plan not in (None, "auto"):
        raise ValueError(f"tp_plan={tp_plan!r}: a PT model has one fixed plan (its tracks are split over the ranks); "
                         "pass tp_plan='auto' or only tp_size.")
    world_size = tp_size if tp_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tp_size={world_size!r}: must be a positive integer")
    return world_size


def process_group_timeout(seconds: float | None = None) -> timedelta | None:
    """The process-group timeout: the argument, else `$PTT_PROCESS_GROUP_TIMEOUT`, else None (torch's default)."""
    if seconds is None and os.environ.get(TIMEOUT_ENV):
        try:
            seconds = float(os.environ[TIMEOUT_ENV])
        except ValueError:
            raise ValueError(f"${TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: must be a number of seconds") from None
    if seconds is None:
        return None
    if seconds <= 0:
        raise ValueError(f"process_group_timeout={seconds}: must be a positive number of seconds")
    return timedelta(seconds=seconds)


def init_track_parallel(
    world_size: int, timeout: timedelta | None = None
) -> tuple[dist.ProcessGroup | None, int, torch.device]:
    """Join (or start) the launcher's process group; return it, this rank and this rank's device.

    NCCL with `cuda:LOCAL_RANK` where CUDA is available, gloo on the CPU otherwise: the same code either way. A group
    the caller started already is used as it is (its timeout too). `W=1` needs no group: every track is local.
    """
    if world_size == 1:
        return None, 0, rank_device()
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(f"tp_size={world_size} needs {world_size} processes started by `torchrun` or "
                           f"`accelerate launch` (environment variables {missing} are not set).")
    device = start_process_group(timeout)
    if dist.get_world_size() != world_size:
        raise ValueError(f"tp_size={world_size} but the job has {dist.get_world_size()} processes: launch exactly "
                         f"tp_size processes (replicas of a track-parallel model are not supported).")
    synchronize_rng_state(dist.group.WORLD, device)
    return dist.group.WORLD, dist.get_rank(), device


def synchronize_rng_state(group: dist.ProcessGroup, device: torch.device) -> None:
    """Give every rank rank 0's torch RNG state (CPU, and this rank's GPU), once, when the model loads.

    torch seeds each fresh process differently, so without this an unseeded `generate(do_sample=True)` would draw
    different tokens on different ranks, and the ranks would go on to merge the states of different sequences.
    """
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    for index, state in enumerate(states):
        shared = state.to(device)
        dist.broadcast(shared, src=dist.get_global_rank(group, 0), group=group)
        states[index] = shared.cpu()
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


class MergeAcrossRanks(torch.autograd.Function):
    """Megatron's "g": all_reduce(SUM) of the ranks' partial track sums forward, identity backward.

    Everything after a merge is replicated: every rank computes the same loss from the same merged state, so the
    gradient arriving at the merge is already complete on every rank, and each local track takes it as it is.
    (`torch.distributed.nn.functional.all_reduce` all-reduces it again, which makes it W times too big.)
    """

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        dist.all_reduce(partial, group=group)  # in place: `partial` is the fresh sum of the local tracks
        ctx.mark_dirty(partial)
        return partial

    @staticmethod
    def backward(ctx, grad_merged: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_merged, None


class DispatchToRanks(torch.autograd.Function):
    """Megatron's "f", the conjugate of `MergeAcrossRanks`: identity forward, all_reduce(SUM) backward.

    The replicated state a block starts from feeds every rank's tracks; each rank's backward sees only its own
    tracks' share of its gradient, so one all_reduce completes it, and the embedding's gradient is then complete and
    identical on every rank.
    """

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return hidden_states.view_as(hidden_states)

    @staticmethod
    def backward(ctx, grad_local: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad_local.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def checkpoint_files(path: str, hub_kwargs: dict, required: bool = True) -> list[str]:
    """The safetensors files of a checkpoint: the shards its index names, or the single `model.safetensors`.

    Without either: an OSError, or `[]` when not `required` (a checkpoint in another format).
    """
    index = cached_file(path, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if index is None:
        single = cached_file(path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if single is None and required:
            raise OSError(f"{path} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}: track-parallel "
                          "loading reads safetensors checkpoints only.")
        return [] if single is None else [single]
    try:
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise OSError(f"{index} is not a safetensors index (JSON with a 'weight_map' of tensor names to files): "
                      f"{type(err).__name__}: {err}") from None
    return [cached_file(path, shard, **hub_kwargs) for shard in shards]


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}


def is_int_list(value, length: int | None = None) -> bool:
    return (isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)
            and (length is None or len(value) == length))


class SafetensorsRows:
    """The tensors of one safetensors file, of which only the requested rows (dim-0 indices) are ever read.

    Rows `[a, b)` of a row-major tensor are one contiguous byte range, so a rank reads its tracks with one `readinto`
    into its own tensor. Not `safetensors.safe_open(...).get_slice`: that maps the whole file and hands out views of
    the mapping, so a rank's resident set grows by the page-cache pages its slices touch, which the kernel maps in
    2 MiB folios that straddle the neighbouring ranks' slices (measured: 1.23x the expected bytes on one of 2 ranks),
    and the file's pages are counted again in every rank.
    """

    def __init__(self, path: str):
        """Read and check the header: a file that is truncated, or whose header is not what safetensors writes, is
        refused here, naming the file, before any tensor is read."""
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise self.corrupt(f"it has {size} bytes, fewer than the 8 of a header size")
            header_size = struct.unpack("<Q", prefix)[0]
            if header_size > size - 8:
                raise self.corrupt(f"its first 8 bytes announce a {header_size}-byte header, but the file has {size} "
                                   "bytes")
            try:
                header = json.loads(f.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise self.corrupt(f"its header is not JSON ({err})") from None
        if not isinstance(header, dict):
            raise self.corrupt("its header is not a JSON object")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_size
        self.entries = header
        self.check_layout(size - self.data_start)

    def corrupt(self, reason: str) -> OSError:
        return OSError(f"{self.path} is not a valid safetensors file (truncated or corrupt?): {reason}")

    def check_layout(self, data_size: int) -> None:
        """What safetensors itself checks: every tensor has a known dtype and a byte range that fits its shape, and
        the ranges lie back to back and cover the data exactly; a short file names the tensor it cuts."""
        for name, entry in self.entries.items():
            if not (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
                    and is_int_list(entry.get("shape")) and is_int_list(entry.get("data_offsets"), length=2)):
                raise self.corrupt(f"header entry {name!r} is not a tensor's dtype (one of "
                                   f"{list(SAFETENSORS_DTYPES)}), shape and data_offsets: {str(entry)[:200]}")
        end_of_previous = 0
        for name, entry in sorted(self.entries.items(), key=lambda item: item[1]["data_offsets"]):
            begin, end = entry["data_offsets"]
            if begin != end_of_previous or end - begin != math.prod(entry["shape"]) * self.dtype(name).itemsize:
                raise self.corrupt(f"tensor {name!r} has data_offsets {[begin, end]}, which do not follow the previous "
                                   f"tensor (ending at {end_of_previous}) or do not fit shape {entry['shape']}")
            if end > data_size:
                raise self.corrupt(f"tensor {name!r} ends at byte {end} of the data, but the file holds {data_size}: "
                                   "it is truncated")
            end_of_previous = end
        if end_of_previous != data_size:
            raise self.corrupt(f"its tensors end at byte {end_of_previous} of the data, but {data_size} bytes follow "
                               "the header")

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.entries[name]["dtype"]]

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.entries[name]["shape"])

    def read(self, file, name: str, rows: range | None = None) -> torch.Tensor:
        """Rows `rows` of tensor `name` (all of it when None), from the open binary `file`."""
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if rows is not None:
            row_bytes = (end - begin) // shape[0]
            begin, end = begin + rows.start * row_bytes, begin + rows.stop * row_bytes
            shape[0] = len(rows)
        tensor = torch.empty(shape, dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        file.seek(self.data_start + begin)
        if file.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - begin:
            raise OSError(f"{self.path}: tensor {name!r} is truncated")
        return tensor


def iter_track_slices(
    files: list[str],
    model_name: Callable[[str], str | None],
    expected: dict[str, torch.Size],
    track_names: set[str],
    tracks: range,
    device: torch.device,
    dtype: torch.dtype | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(model name, tensor) of the tensors named in `expected`, one at a time: for track-stacked ones (`track_names`)
    only the slice `tracks` of dim 0.

    `model_name` maps a checkpoint name to the model's (None: not this model's, skip it). Every shape is checked
    against `expected` (the full, unsplit shapes) and every dtype against `check_floating_point` before its bytes are
    read; floating-point tensors are cast to `dtype` (None: kept as stored). A caller that copies each tensor into
    place holds one tensor beyond its model at any time.
    """
    num_tracks = next(expected[name][0] for name in track_names)
    for path in files:
        checkpoint = SafetensorsRows(path)
        unexpected = []
        with open(path, "rb") as file:
            for stored_name in checkpoint.keys():
                name = model_name(stored_name)
                if name is None:
                    continue
                if name not in expected:  # as transformers does: reported, the rest loads
                    unexpected.append(stored_name)
                    continue
                shape = checkpoint.shape(stored_name)
                if name in track_names and (len(shape) == 0 or shape[0] != num_tracks):
                    raise ValueError(f"{path}: tensor {stored_name!r} has shape {tuple(shape)}, whose dim 0 (tracks) "
                                     f"disagrees with the config's num_tracks={num_tracks}")
                if shape != expected[name]:
                    raise ValueError(f"{path}: tensor {stored_name!r} has shape {tuple(shape)}, the config implies "
                                     f"{tuple(expected[name])}")
                check_floating_point(checkpoint, stored_name, dtype)
                tensor = checkpoint.read(file, stored_name, tracks if name in track_names else None)
                if dtype is not None:
                    tensor = tensor.to(dtype)
                yield name, tensor.to(device)
        if unexpected:
            logger.warning(f"{path}: {len(unexpected)} tensors are not weights of this PT model and were not loaded: "
                           f"{unexpected[:10]}")


def check_floating_point(checkpoint: SafetensorsRows, name: str, dtype: torch.dtype | None) -> None:
    """Every weight of a PT model is floating point: a float dtype other than the requested one is a cast, an
    integer or boolean tensor is a broken or foreign checkpoint, which a cast would turn into silently wrong weights."""
    stored = checkpoint.dtype(name)
    if not stored.is_floating_point:
        # what the load casts to: the requested dtype, else ("auto") the checkpoint's own floating dtype
        loaded_as = dtype or next((checkpoint.dtype(other) for other in checkpoint.keys()
                                   if checkpoint.dtype(other).is_floating_point), torch.get_default_dtype())
        raise ValueError(f"{checkpoint.path}: tensor {name!r} is stored as {stored}, but the model loads it as "
                         f"{loaded_as}: a PT checkpoint holds floating-point tensors only, and a cast would give "
                         "wrong weights")


def check_safetensors_checkpoint(model_class, path: str, kwargs: dict) -> None:
    """Before transformers' own load of a `model_class`: read the headers of the checkpoint's safetensors files (not
    their data) and refuse a truncated or corrupt file, or a non-float tensor that would load into the model, naming
    the file and tensor.

    transformers would report the first as a bare safetensors error that names no file, and load the second cast to
    float. A tensor that is none of the model's it reports as unexpected and leaves alone, and so does this check.
    A quantized checkpoint (`quantization_config` in the call or the config) holds integer tensors by design, which
    its quantizer reads. A `state_dict`, `gguf_file`, `variant` or non-safetensors checkpoint is left to
    transformers.
    """
    if path is None or any(kwargs.get(name) is not None for name in ("state_dict", "gguf_file", "variant",
                                                                     "quantization_config")) or \
            kwargs.get("use_safetensors") is False:
        return
    hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if kwargs.get(name) is not None}
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    loads = None
    for file in checkpoint_files(path, hub_kwargs, required=False):
        checkpoint = SafetensorsRows(file)
        for name in checkpoint.keys():
            if checkpoint.dtype(name).is_floating_point:
                continue
            loads = loads or model_tensor_names(model_class, path, kwargs.get("config"), hub_kwargs)
            if loads(name):
                check_floating_point(checkpoint, name, dtype if isinstance(dtype, torch.dtype) else None)


def model_tensor_names(model_class, path: str, config, hub_kwargs: dict) -> Callable[[str], bool]:
    """Whether transformers loads a checkpoint tensor of a given name into a `model_class` of the checkpoint's config
    (or the `config` passed): one of its parameters or buffers, with the base model's prefix stripped or prepended as
    transformers' loader does between a base model and a model with a head. None for a quantized model: its tensors
    are its quantizer's format."""
    if not isinstance(config, PreTrainedConfig):
        config = model_class.config_class.from_pretrained(config if config is not None else path, **hub_kwargs)
    if getattr(config, "quantization_config", None) is not None:
        return lambda name: False
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config))
    names, prefix = set(model.state_dict()), f"{model.base_model_prefix}."
    return lambda name: name in names or name.removeprefix(prefix) in names or prefix + name in names


def checkpoint_to_model_names(model, expected: dict[str, torch.Size]) -> Callable[[str], str | None]:
    """transformers' naming rule: a base model (`PTModel`) loads the `model.*` tensors of a checkpoint saved with a
    head (`PTForCausalLM`) and leaves out the head's own."""
    prefix = f"{model.base_model_prefix}."
    is_base_model = model.base_model is model

    def model_name(name: str) -> str | None:
        if name in expected or not is_base_model:
            return name
        return name[len(prefix):] if name.startswith(prefix) else None

    return model_name


def load_track_parallel(model_class, path: str, world_size: int, kwargs: dict):
    """`from_pretrained` for `W = world_size` ranks: this rank's tracks and the shared tensors, nothing else."""
    timeout = process_group_timeout(kwargs.pop("process_group_timeout", None))
    config = kwargs.pop("config", None)
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else torch_dtype
    attn_implementation = kwargs.pop("attn_implementation", None)
    if kwargs.pop("device_map", None) is not None:
        raise ValueError("device_map and track parallelism (distributed_config/tp_size) are mutually exclusive: "
                         "each rank places its tracks on cuda:LOCAL_RANK, or on the CPU without CUDA.")
    for ignored in ("trust_remote_code", "adapter_kwargs", "_from_auto", "_from_pipeline", "low_cpu_mem_usage",
                    "use_safetensors", "weights_only"):  # what Auto classes pass, and what is moot here
        kwargs.pop(ignored, None)
    hub_kwargs = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
    if not isinstance(config, PreTrainedConfig):
        config, kwargs = model_class.config_class.from_pretrained(
            config if config is not None else path, return_unused_kwargs=True, **hub_kwargs, **kwargs
        )
    if kwargs.get("quantization_config") is not None or getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{path}: track parallelism loads full-precision checkpoints; quantized weights load in one "
                         "process (quantization_config without tp_size/distributed_config)")
    if kwargs:
        raise TypeError(f"from_pretrained with track parallelism does not support {sorted(kwargs)}")
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    # before any process group or byte of weights
    check_track_split(config.num_tracks, world_size, f"tp_size={world_size}")

    group, rank, device = init_track_parallel(world_size, timeout)
    tracks = track_range(rank, world_size, config.num_tracks)
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)

    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    state_dict = dict(iter_track_slices(
        checkpoint_files(path, hub_kwargs), checkpoint_to_model_names(model, expected), expected,
        set(model.track_stacked_parameter_names()), tracks, device, dtype,
    ))
    tied = (model._tied_weights_keys or {}) if config.tie_word_embeddings else {}
    for target, source in tied.items():  # a tied head is saved without its own copy
        state_dict.setdefault(target, state_dict.get(source))
    missing = sorted(name for name in expected if state_dict.get(name) is None)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:5]}")
    assign_tensors(model, state_dict)
    if tied:
        model.tie_weights()
    materialize_buffers(model, device)
    model.place_tracks(group, len(tracks))
    model.config.dtype = model.get_input_embeddings().weight.dtype

    try:
        model.generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs)
    except OSError:  # no generation_config.json: keep the one derived from the config
        pass
    return model.eval()


def assign_tensors(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Put the loaded tensors in place of the meta ones (`load_state_dict` would insist on the full track count)."""
    for name, tensor in state_dict.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
        else:
            module._buffers[leaf] = tensor
