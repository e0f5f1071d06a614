"""Training checkpoints that a kill at any moment leaves whole, and that load without unpickling anything.

A checkpoint is a directory `checkpoint-{step}` in the run's output directory. Only a whole one ever has that name:

1. `save_checkpoint` creates `.saving-checkpoint-{step}` and calls `write_fn(directory)` on every process, which
   writes that process's files into it (any layout, subdirectories included);
2. the main process fsyncs every file and writes `manifest.json` LAST: every file's size and sha256;
3. it renames the directory to `checkpoint-{step}` (moving an existing one of that step aside first);
4. it rotates: every other `checkpoint-*` is renamed to `.deleting-checkpoint-*` and only then deleted.

Whatever a kill leaves behind carries a dot name that resume ignores, and `clean_leftovers` tidies it on the next
start: a `.deleting-*` is removed, a `.saving-*` is removed unless its manifest was written, in which case it is
whole and is renamed into place (the kill came between steps 2 and 3).

    save_checkpoint(output_dir, step, write_fn)   # collective; returns the checkpoint's path
    find_resumable(output_dir)                    # the newest checkpoint-N with a complete manifest, or None
    verify(path)                                  # CheckpointError naming the directory and each missing/changed file
    clean_leftovers(output_dir)                   # collective; once at start, before find_resumable
    write_training_state(...), read_training_state(path, ...)  # the single-process / DDP trainer's own files
    write_rng_states(directory), read_rng_states(path)         # every process's own generator states
    write_json(path, value), read_json(directory, name)        # a checkpoint's JSON files, errors naming them

The functions marked collective call `torch.distributed.barrier()` when a process group is initialized and must
then be called by every process; the main process (rank 0) does the renames and deletions, so `output_dir` must be
on a filesystem every process sees. `write_fn` may itself be collective (e.g. `torch.distributed.checkpoint.save`).

The trainer's files (`write_training_state`), each read with safetensors or JSON, never with pickle:

    model.safetensors      the unwrapped model's state dict (tied weights stored once)
    optimizer.safetensors  the optimizer's state tensors, named `{param_index}.{key}`
    optimizer.json         its param groups and non-tensor state
    scheduler.json         the LR scheduler's state dict
    scaler.json            the fp16 gradient scaler's state dict (only with one)
    rng/rank-{rank}.safetensors  every process's torch (CPU, CUDA) and numpy generator states; Python's in
                           the metadata
    trainer_state.json     the caller's progress (step, data position, ...) and the number of processes

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
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model


PREFIX = "checkpoint-"
SAVING = ".saving-"
DELETING = ".deleting-"
MANIFEST = "manifest.json"
MODEL = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER = "optimizer.json"
SCHEDULER = "scheduler.json"
SCALER = "scaler.json"
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


def save_checkpoint(output_dir: str | os.PathLike, step: int, write_fn: Callable[[Path], None]) -> Path:
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
            "interrupted, or the directory was not written by scripts/checkpoints.py)"
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
    except Exception as error:
        raise CheckpointError(f"checkpoint {directory}: cannot load {name}: {type(error).__name__}: {error}") from error


# ------------------------------------------------------------------------------------------- the trainer's state


def write_training_state(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """A `write_fn` for `save_checkpoint` (call it on every process): model, optimizer, scheduler, scaler and
    `state` (JSON: step, data position, ...) from the main process, the RNG states from every process. `model` is
    unwrapped (not the DDP wrapper); under data parallelism every process holds the same model and optimizer."""
    rank = _rank()
    if rank == 0:
        save_model(model, str(directory / MODEL))
        tensors, rest = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, directory / OPTIMIZER_TENSORS)
        write_json(directory / OPTIMIZER, rest)
        write_json(directory / SCHEDULER, scheduler.state_dict())
        if scaler is not None:
            write_json(directory / SCALER, scaler.state_dict())
        write_trainer_state(directory, state)
    write_rng_states(directory)


def read_training_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
) -> dict:
    """Load what `write_training_state` wrote into the given objects (on every process; `model` unwrapped) and
    return its `state`. The checkpoint is verified first, hashes included; every error names the directory and the
    file."""
    path = Path(path)
    files = verify(path)["files"]

    def file(name: str) -> Path:
        if name not in files:
            raise CheckpointError(
                f"checkpoint {path} has no {name} (it holds {', '.join(sorted(files))}): it was not written by "
                f"write_training_state{' with a gradient scaler' if name == SCALER else ''}"
            )
        return path / name

    with _reading(path, TRAINER_STATE):
        state = json.loads(file(TRAINER_STATE).read_text())
    with _reading(path, MODEL):
        device = next(model.parameters()).device
        load_model(model, file(MODEL), strict=True, device=str(device))
    with _reading(path, OPTIMIZER_TENSORS):
        tensors = load_file(file(OPTIMIZER_TENSORS))
    with _reading(path, OPTIMIZER):
        rest = json.loads(file(OPTIMIZER).read_text())
        optimizer.load_state_dict(_join_optimizer_state(tensors, rest, optimizer.state_dict()))
    with _reading(path, SCHEDULER):
        scheduler.load_state_dict(json.loads(file(SCHEDULER).read_text()))
    if scaler is not None:
        with _reading(path, SCALER):
            scaler.load_state_dict(json.loads(file(SCALER).read_text()))
    read_rng_states(path)
    del state["num_processes"]
    return state


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


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """`Optimizer.state_dict()` -> (its state tensors by `{param_index}.{key}`, everything else for JSON)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        scalars[str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[str(index)][key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict, current: dict) -> dict:
    """The inverse of `_split_optimizer_state`. JSON turns tuples (AdamW's betas) into lists: give them back the
    types the optimizer's own groups have."""
    state = {int(index): dict(values) for index, values in rest["state"].items()}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    groups = []
    for index, group in enumerate(rest["param_groups"]):  # a count mismatch is load_state_dict's error to raise
        own = current["param_groups"][index] if index < len(current["param_groups"]) else {}
        groups.append({key: tuple(value) if isinstance(own.get(key), tuple) else value for key, value in group.items()})
    return {"state": state, "param_groups": groups}


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
