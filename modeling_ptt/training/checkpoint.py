"""Training checkpoints that a kill at any moment leaves whole, that load without unpickling anything, and that
resume in any layout: one format for one process, data parallel, FSDP2, track parallel and their mesh.

    save_checkpoint(output_dir, step, model, optimizer, layout, scheduler=..., state=...)  # collective
    load_checkpoint(path, model, optimizer, layout, scheduler=...) -> state                 # collective
    find_resumable(output_dir)      # the newest checkpoint-N with a complete manifest, or None
    clean_leftovers(output_dir)     # collective; once at start, before find_resumable
    verify(path)                    # CheckpointError naming the directory and each missing/changed file

What a checkpoint holds, each file read with safetensors or JSON, never with pickle:

    *.safetensors          the model's and AdamW's tensors, every rank writing its own shards with
                           torch.distributed.checkpoint (its sharding in the files' metadata); every tensor is stored
                           as what it is globally (a rank's tracks as its part of the whole track-stacked tensor), so
                           any number of ranks in any layout reads back the parts it holds
    schedule.json          the LR scheduler's state, the optimizer's param groups (learning rates) and an fp16
                           gradient scaler's state
    rng/rank-{rank}.safetensors  every process's torch (CPU, CUDA) and numpy generator states; Python's in the
                           metadata
    trainer_state.json     the caller's progress (step, data position, ...) and the number of processes
    manifest.json          every file's size and sha256, written last

A checkpoint is a directory `checkpoint-{step}` in the run's output directory. Only a whole one ever has that name
(`save_atomically`):

1. it creates `.saving-checkpoint-{step}` and calls `write_fn(directory)` on every process, which writes that
   process's files into it (any layout, subdirectories included);
2. the main process fsyncs every file and writes `manifest.json` LAST: every file's size and sha256;
3. it renames the directory to `checkpoint-{step}` (moving an existing one of that step aside first);
4. it rotates: every other `checkpoint-*` is renamed to `.deleting-checkpoint-*` and only then deleted.

Whatever a kill leaves behind carries a dot name that resume ignores, and `clean_leftovers` tidies it on the next
start: a `.deleting-*` is removed, a `.saving-*` is removed unless its manifest was written, in which case it is
whole and is renamed into place (the kill came between steps 2 and 3).

The collective functions call `torch.distributed.barrier()` when a process group is initialized and must then be
called by every process; the main process (rank 0) does the renames and deletions, so `output_dir` must be on a
filesystem every process sees.

For tests, the environment variable PTT_CHECKPOINT_KILL_AT=`{phase}@{step}` SIGKILLs the main process when the
save of `step` reaches `phase` (one of `KILL_PHASES`), the moments in between the steps above.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import CheckpointException, HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from .parallelize import Layout, unwrap


PREFIX = "checkpoint-"
SAVING = ".saving-"
DELETING = ".deleting-"
MANIFEST = "manifest.json"
SCHEDULE = "schedule.json"
TRAINER_STATE = "trainer_state.json"
KILL_AT_ENV = "PTT_CHECKPOINT_KILL_AT"
# before-manifest: files written, no manifest; before-rename: manifest written; before-rotate: renamed into place;
# rotating: an older checkpoint renamed aside; deleting: some of its files deleted
KILL_PHASES = ("before-manifest", "before-rename", "before-rotate", "rotating", "deleting")


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, damaged, or does not fit what it is loaded into."""


# ------------------------------------------------------------------------------------------- the directory protocol


def checkpoint_path(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{PREFIX}{step}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-{step}` directory name, None for any other name."""
    digits = path.name[len(PREFIX) :]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def save_atomically(output_dir: str | os.PathLike, step: int, write_fn: Callable[[Path], None]) -> Path:
    """Collective: `write_fn(directory)` writes every process's files, then the directory becomes `checkpoint-{step}`
    and every other checkpoint is removed (see the module docstring for why a kill at any moment is safe)."""
    output_dir = Path(output_dir)
    final = checkpoint_path(output_dir, step)
    staging = output_dir / f"{SAVING}{final.name}"
    main = _rank() == 0
    if main:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    _barrier()
    write_fn(staging)
    _barrier()
    if main:
        _kill_point("before-manifest", step)
        _write_manifest(staging)
        _kill_point("before-rename", step)
        if final.exists():
            _move_aside(final)
        os.rename(staging, final)
        _fsync_directory(output_dir)
        _kill_point("before-rotate", step)
        older = [path for path in output_dir.iterdir()
                 if path != final and path.is_dir() and checkpoint_step(path) is not None]
        for old in sorted(older, key=checkpoint_step):
            _remove(_move_aside(old), step)
    _barrier()
    return final


def find_resumable(output_dir: str | os.PathLike) -> Path | None:
    """The newest `checkpoint-{step}` whose manifest is complete and whose files have the sizes it lists (hashes are
    checked when it is read); a damaged one is skipped with a warning."""
    candidates = [(checkpoint_step(path), path) for path in Path(output_dir).glob(f"{PREFIX}*") if path.is_dir()]
    for _, path in sorted(((step, path) for step, path in candidates if step is not None), reverse=True):
        try:
            verify(path, hashes=False)
            return path
        except CheckpointError as error:
            warnings.warn(f"not resuming from it: {error}", stacklevel=2)
    return None


def verify(path: str | os.PathLike, hashes: bool = True) -> dict:
    """The manifest of the whole checkpoint at `path`; a CheckpointError naming the directory and every file that
    is missing, of another size or (with `hashes`) of other content than the manifest lists."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / MANIFEST).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {MANIFEST}, which a save writes last (the save was "
            "interrupted, or the directory was not written by modeling_ptt.training.checkpoint)"
        )
    with _reading(path, MANIFEST):
        manifest = json.loads((path / MANIFEST).read_text())
        files = {name: (entry["size"], entry["sha256"]) for name, entry in manifest["files"].items()}
    problems = []
    for name, (size, sha256) in sorted(files.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes where the manifest lists {size}")
        elif hashes and _sha256(file) != sha256:
            problems.append(f"{name} is not what was saved (its sha256 differs from the manifest's)")
    if problems:
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {'; '.join(problems)}")
    return manifest


def clean_leftovers(output_dir: str | os.PathLike) -> None:
    """Collective: remove what killed saves and rotations left behind; a save killed after its manifest was written
    is whole, and is renamed into place."""
    output_dir = Path(output_dir)
    if _rank() == 0 and output_dir.is_dir():
        for path in sorted(output_dir.glob(f"{SAVING}{PREFIX}*")):
            final = output_dir / path.name[len(SAVING) :]
            if not final.exists() and _is_whole(path):
                os.rename(path, final)
            else:
                shutil.rmtree(path)
        for path in output_dir.glob(f"{DELETING}{PREFIX}*"):
            shutil.rmtree(path)
        _fsync_directory(output_dir)
    _barrier()


def _is_whole(path: Path) -> bool:
    try:
        verify(path, hashes=False)
        return True
    except CheckpointError:
        return False


def _write_manifest(directory: Path) -> None:
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
        files[file.relative_to(directory).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    for subdirectory in (p for p in directory.rglob("*") if p.is_dir()):
        _fsync_directory(subdirectory)
    # written under another name and renamed, so a manifest is either absent or complete
    partial = directory / f"{MANIFEST}.partial"
    with open(partial, "w") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(partial, directory / MANIFEST)
    _fsync_directory(directory)


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{DELETING}{path.name}")
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(path, aside)
    _fsync_directory(path.parent)
    return aside


def _remove(path: Path, step: int) -> None:
    _kill_point("rotating", step)
    for index, file in enumerate(sorted(p for p in path.rglob("*") if p.is_file())):
        file.unlink()
        if index == 0:
            _kill_point("deleting", step)
    shutil.rmtree(path)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _kill_point(phase: str, step: int) -> None:
    if os.environ.get(KILL_AT_ENV) == f"{phase}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _reading(directory: Path, name: str) -> Iterator[None]:
    """Any error while reading one file of a checkpoint names the checkpoint and the file."""
    try:
        yield
    except CheckpointError:
        raise
    # torch.distributed.checkpoint gathers its ranks' errors into a CheckpointException, a BaseException
    except (Exception, CheckpointException) as error:
        raise CheckpointError(f"checkpoint {directory}: cannot load {name}: {type(error).__name__}: {error}") from error


# ------------------------------------------------------------------------------------------- the training state


# the files only the single-file format of data-parallel training had (modeling-ptt 0.2.0 and before)
OLD_FORMAT = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json")
LAST_OLD_FORMAT_READER = "modeling-ptt 0.2.0"


def save_checkpoint(output_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, layout: Layout, scheduler=None, state: dict | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Collective: the model (as `parallelize_ptt` returned it), its AdamW state, the scheduler, an fp16 scaler,
    every process's generator states and `state` (JSON: step, data position, ...) as `checkpoint-{step}` in
    `output_dir`, whole after a kill at any moment. Returns its path."""
    def write(directory: Path) -> None:
        with _one_process_is_fine():
            dcp.save(_tensors(model, optimizer, layout),
                     storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True))
        write_rng_states(directory)
        if layout.is_main_process:
            groups = [{key: value for key, value in group.items() if key != "params"}
                      for group in optimizer.param_groups]
            write_json(directory / SCHEDULE, {
                "scheduler": scheduler.state_dict() if scheduler is not None else None, "param_groups": groups,
                "scaler": scaler.state_dict() if scaler is not None else None})
            write_trainer_state(directory, {"step": step, **(state or {})})

    return save_atomically(output_dir, step, write)


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    layout: Layout, scheduler=None, scaler: torch.amp.GradScaler | None = None) -> dict:
    """Collective: load what `save_checkpoint` wrote, by any number of processes in any layout (each reads the parts
    of the tensors it holds), into the given objects; return its `state` (with `step`). The checkpoint is verified
    first, hashes included; every error names the directory and the file."""
    path = Path(path)
    files = verify(path)["files"]
    if SCHEDULE not in files and set(OLD_FORMAT) <= set(files):
        raise CheckpointError(
            f"checkpoint {path} is in the single-file format of data-parallel training ({', '.join(OLD_FORMAT)}), "
            f"which {LAST_OLD_FORMAT_READER} is the last version to read: finish or export the run with that version "
            "(pip install modeling-ptt==0.2.0), or start it again")
    for name in (SCHEDULE, TRAINER_STATE):
        if name not in files:
            raise CheckpointError(f"checkpoint {path} has no {name} (it holds {', '.join(sorted(files))}): it was "
                                  "not written by save_checkpoint")
    with _reading(path, "its model and optimizer shards (*.safetensors)"), _one_process_is_fine():
        dcp.load(_tensors(model, optimizer, layout), storage_reader=HuggingFaceStorageReader(str(path)))
    schedule = read_json(path, SCHEDULE)
    with _reading(path, SCHEDULE):
        if scheduler is not None:
            scheduler.load_state_dict(schedule["scheduler"])
        for group, saved in zip(optimizer.param_groups, schedule["param_groups"], strict=True):
            group.update(saved)
        if scaler is not None:
            scaler.load_state_dict(schedule["scaler"])
    read_rng_states(path)
    state = read_json(path, TRAINER_STATE)
    del state["num_processes"]
    return state


@contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every save and load without a process group that it assumes one
    process: that is what such a job is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: Layout) -> dict[str, torch.Tensor]:
    """The model's and AdamW's tensors by name, each as it is globally (`_global_view`). They share storage with the
    live ones: loading into them loads the model and the optimizer."""
    if isinstance(model, FSDPModule):
        model.reshard()  # FSDP2 keeps the root's parameters gathered after a forward: back to the shards
    model = unwrap(model)
    track_names = set(model.track_stacked_parameter_names())
    named = dict(model.named_parameters())
    tensors = {f"model.{name}": _global_view(param, name in track_names, layout) for name, param in named.items()}
    for name, param in named.items():
        if not optimizer.state[param]:  # a fresh AdamW creates its state at the first step: create it now
            optimizer.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param.detach()),
                                          exp_avg_sq=torch.zeros_like(param.detach()))
        for key, value in optimizer.state[param].items():
            tensors[f"optimizer.{name}.{key}"] = _global_view(value, name in track_names, layout)
    return tensors


def _global_view(tensor: torch.Tensor, is_track_stacked: bool, layout: Layout) -> torch.Tensor:
    """A rank's track slice as its `Shard(0)` of a DTensor over the "tracks" axis (so a checkpoint holds every
    tensor whole, whatever W wrote it), an FSDP2 shard as its own DTensor, and an FSDP2 shard of a track slice as a
    DTensor over both axes."""
    tensor = tensor.detach()
    if layout.track_parallel == 1 or not is_track_stacked or tensor.dim() == 0:
        return tensor
    if not isinstance(tensor, DTensor):
        return DTensor.from_local(tensor, layout.mesh["tracks"], [Shard(0)], run_check=False)
    # FSDP2's rows of the rank's tracks: the same rows of all tracks are spread over the "tracks" axis
    shape = torch.Size([tensor.shape[0] * layout.track_parallel, *tensor.shape[1:]])
    return DTensor.from_local(tensor.to_local(), layout.mesh, [Shard(1), Shard(0)], run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The caller's progress a checkpoint holds (`trainer_state.json`), after checking that the checkpoint is whole
    (sizes only: the loaders check the hashes of what they read)."""
    path = Path(path)
    if TRAINER_STATE not in verify(path, hashes=False)["files"]:
        raise CheckpointError(f"checkpoint {path} has no {TRAINER_STATE}")
    return read_json(path, TRAINER_STATE)


def write_trainer_state(directory: Path, state: dict) -> None:
    """`state` (JSON: step, data position, ...) with the number of processes that wrote the checkpoint."""
    write_json(directory / TRAINER_STATE, {**state, "num_processes": _world_size()})


def write_rng_states(directory: Path) -> None:
    """This process's generator states (call it on every process). In a subdirectory of their own, where a reader
    that takes every safetensors file of the checkpoint for weights (torch.distributed.checkpoint's) does not look."""
    path = directory / _rng_name(_rank())
    path.parent.mkdir(exist_ok=True)
    _save_rng_states(path)


def read_rng_states(path: Path) -> None:
    """Restore this process's generator states from a checkpoint the caller has verified. A generator's state belongs
    to one process of one layout: resumed on another number of processes, every process keeps the state its seed
    gave it, and the main process says so."""
    saved_processes = read_json(path, TRAINER_STATE)["num_processes"]  # verified by the caller
    if saved_processes != _world_size():
        if _rank() == 0:
            warnings.warn(f"checkpoint {path} was saved by {saved_processes} processes, this job has "
                          f"{_world_size()}: the random generators restart from the seed", stacklevel=2)
        return
    name = _rng_name(_rank())
    if not (path / name).is_file():
        raise CheckpointError(f"checkpoint {path} has no {name}: it was saved without this process's generators")
    with _reading(path, name):
        _load_rng_states(path / name)


def _rng_name(rank: int) -> str:
    return f"rng/rank-{rank}.safetensors"


def read_json(directory: Path, name: str):
    """The JSON file `name` of a checkpoint; an error names the checkpoint and the file."""
    with _reading(directory, name):
        return json.loads((directory / name).read_text())


def write_json(path: Path, value) -> None:
    try:
        text = json.dumps(value, indent=1)
    except TypeError as error:  # e.g. a tensor-valued learning rate: say what could not be stored
        raise CheckpointError(f"cannot store {path.name} as JSON: {error}") from None
    path.write_text(text)


def _save_rng_states(path: Path) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{index}": state for index, state in enumerate(torch.cuda.get_rng_state_all())}
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    metadata = {
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([kind, int(position), int(has_gauss), float(cached_gaussian)]),
    }
    save_file(tensors, path, metadata=metadata)


def _load_rng_states(path: Path) -> None:
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(name.split(".")[1]), state) for name, state in tensors.items() if name.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        for index, state in cuda[: torch.cuda.device_count()]:
            torch.cuda.set_rng_state(state, index)
    kind, position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss_next))
