"""Kill scripts/train.py at named and at random moments, resume it after every kill, and compare the end with an
uninterrupted run: the final weights must be bitwise equal and the logged losses equal (fp32, CPU).

    PYTHONPATH=scripts:tests python tests/support/kill_soak.py --kills 20 --seed 0

prints what every kill hit (what it left on disk) and exits 1 on any difference. tests/test_checkpoints.py runs a
few kills of the same kind.

Every run is a process forked from a server that imported train once (multiprocessing's forkserver): a run costs
its training, not the imports. A kill is that process's SIGKILL, either after a random delay or at a named phase of
a save (`checkpoints.KILL_AT_ENV`). After every kill each `checkpoint-*` directory must be whole (read here file
by file, independently of `checkpoints.verify`) and no checkpoint older than the one resumed from may be left.
"""

import argparse
import json
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train
from helpers import SUPPORT, TESTS, TRAIN_ARGS, child_env, write_small_corpus
from modeling_ptt.training import checkpoint as checkpoints
from modeling_ptt.training.train_log import LOG_NAME, read_log


# a checkpoint after every step, so that random moments often fall into a save or a rotation
RUN_ARGS = [*TRAIN_ARGS, "--save-every", "1", "--log-every", "1", "--eval-every", "5", "--eval-blocks", "4"]
# one process: torch.distributed.checkpoint's one shard of the model's and AdamW's tensors
CHECKPOINT_FILES = {
    checkpoints.MANIFEST, "shard-00001-model-00001-of-00001.safetensors", checkpoints.SCHEDULE,
    checkpoints.TRAINER_STATE, "rng/rank-0.safetensors",
}


@dataclass(frozen=True)
class Kill:
    """SIGKILL when the save of `step` reaches `phase` (one of checkpoints.KILL_PHASES); or, without a phase,
    `fraction` of a step's time after the run logged `step` (what follows a logged step: its save, any evaluation,
    the next step's training), the step's time measured live from the line before, as the load on the machine
    varies."""

    phase: str | None = None
    step: int = 0
    fraction: float = 0.0

    def __str__(self) -> str:
        return f"{self.phase}@{self.step}" if self.phase else f"{self.fraction:.2f} of a step after step {self.step}"


def run_train_quietly(argv: list[str], env: dict, log_path: str) -> None:
    """The forked process: train.py's main with its output in `log_path`."""
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(env)
    train.main(argv)


class Runner:
    """Starts `scripts/train.py --data CORPUS --output-dir OUT ARGS [--resume]` as forked processes."""

    def __init__(self, corpus: Path, args: list[str], timeout_s: float):
        self.corpus, self.args, self.timeout_s = corpus, args, timeout_s
        self.context = multiprocessing.get_context("forkserver")
        # train.py's loss plot at the end of a run imports pyplot: once, in the server, too. (A server already
        # running, started by an earlier caller, keeps what it imported: runs are then slower.)
        self.context.set_forkserver_preload([__name__, "matplotlib.pyplot"])
        # the server takes this process's environment when it starts, but not its sys.path (Python 3.11 drops it)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(child_env(PYTHONPATH=os.pathsep.join([str(TESTS), str(SUPPORT)])))
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        ready = self.context.Process(target=int)  # returns once the server has imported: a run's time is its own
        ready.start()
        ready.join()

    def run(self, output_dir: Path, resume: bool, kill: Kill | None = None) -> int:
        """The exit code: 0 finished, -SIGKILL killed. A timed kill's step must be at least two after the one the
        run resumes from."""
        argv = ["--data", str(self.corpus), "--output-dir", str(output_dir), *self.args, *["--resume"] * resume]
        env = {checkpoints.KILL_AT_ENV: str(kill)} if kill is not None and kill.phase else {}
        log_path = output_dir.parent / f"{output_dir.name}.log"
        process = self.context.Process(target=run_train_quietly, args=(argv, env, str(log_path)))
        started = time.time()
        process.start()
        if kill is not None and kill.phase is None:
            before = self._wait_for_step(process, output_dir / LOG_NAME, kill.step - 1, started)
            logged = self._wait_for_step(process, output_dir / LOG_NAME, kill.step, started)
            if before is not None and logged is not None:
                process.join(kill.fraction * (logged - before))
                if process.exitcode is None:
                    process.kill()
        process.join(self.timeout_s)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise TimeoutError(f"train.py {' '.join(argv)} ran over {self.timeout_s}s; its output: {log_path}")
        if process.exitcode not in (0, -signal.SIGKILL):
            output = log_path.read_text()[-3000:] if log_path.exists() else "(none)"
            raise RuntimeError(f"train.py {' '.join(argv)} failed ({process.exitcode}), its output:\n{output}")
        return process.exitcode

    def _wait_for_step(self, process, log_path: Path, step: int, started: float) -> float | None:
        """When the run logged `step` (None if it ended before): a log of this run, not the one it resumes."""
        deadline = started + self.timeout_s
        while process.exitcode is None and time.time() < deadline:
            try:
                if log_path.stat().st_mtime >= started and f'{{"step": {step},' in log_path.read_text():
                    return time.time()
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        return None


def resumable_step(output_dir: Path) -> int:
    """The step the next run resumes from (0: none); a save killed after its manifest was written counts, as the
    next start renames it into place."""
    saved = [checkpoints.checkpoint_step(path.with_name(path.name[len(checkpoints.SAVING) :]))
             for path in output_dir.glob(f"{checkpoints.SAVING}*") if (path / checkpoints.MANIFEST).exists()]
    return max(checkpoint_steps(output_dir) + saved, default=0)


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(step for path in output_dir.glob(f"{checkpoints.PREFIX}*")
                  if path.is_dir() and (step := checkpoints.checkpoint_step(path)) is not None)


def assert_whole(path: Path) -> None:
    """Every file of a training checkpoint is there and reads completely (a check of its own, not the manifest's)."""
    names = {file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file()}
    assert names == CHECKPOINT_FILES, f"{path} holds {sorted(names)}, not {sorted(CHECKPOINT_FILES)}"
    for name in names:
        if name.endswith(".json"):
            json.loads((path / name).read_text())
        else:
            with safe_open(path / name, framework="pt") as handle:
                for key in handle.keys():
                    handle.get_tensor(key)
    step = json.loads((path / checkpoints.TRAINER_STATE).read_text())["step"]
    assert path.name == f"{checkpoints.PREFIX}{step}", f"{path} holds the state of step {step}"


def kill_and_resume(runner: Runner, output_dir: Path, kills: Iterable[Kill]) -> list[dict]:
    """Run with each kill in turn, each run resuming from what the previous one left, then run to the end. After
    every kill: each `checkpoint-*` is whole and the newest is no older than the one the run resumed from."""
    events = []
    for kill in kills:
        before = checkpoint_steps(output_dir)
        started = time.perf_counter()
        code = runner.run(output_dir, resume=bool(before), kill=kill)
        after = checkpoint_steps(output_dir)
        for step in after:
            assert_whole(checkpoints.checkpoint_path(output_dir, step))
        assert not before or (after and after[-1] >= before[-1]), f"{kill}: checkpoints {before} -> {after}"
        events.append({
            "kill": str(kill), "killed": code == -signal.SIGKILL, "run_s": round(time.perf_counter() - started, 2),
            "resumed_from": before[-1] if before else None, "checkpoints": after,
            "leftovers": sorted(path.name for path in output_dir.glob(f".*{checkpoints.PREFIX}*")),
        })
    code = runner.run(output_dir, resume=bool(checkpoint_steps(output_dir)))
    assert code == 0
    leftovers = list(output_dir.glob(f".*{checkpoints.PREFIX}*"))
    assert not leftovers, f"a run that finished left {leftovers}"
    return events


def differences(straight: Path, killed: Path) -> list[str]:
    """What differs between two finished runs: final weights (bitwise) and the logged losses."""
    expected, got = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    problems = [f"weight {name} differs" for name in sorted(expected.keys() | got.keys())
                if name not in expected or name not in got or not torch.equal(expected[name], got[name])]

    def losses(run: Path) -> list:
        return [(r["step"], r["loss"], r["val_loss"]) for r in read_log(run / LOG_NAME)]

    if losses(straight) != losses(killed):
        problems.append(f"the logs differ:\n{losses(straight)}\n{losses(killed)}")
    return problems


def hit(event: dict) -> str:
    """What the process was doing when it was killed, read from what it left on disk."""
    if not event["killed"]:
        return "not killed (finished first)"
    if any(name.startswith(checkpoints.SAVING) for name in event["leftovers"]):
        return "writing a checkpoint"
    if any(name.startswith(checkpoints.DELETING) for name in event["leftovers"]):
        return "removing an older checkpoint"
    if len(event["checkpoints"]) > 1:
        return "between a checkpoint's rename and the rotation"
    return "training, evaluating, starting or exporting"


def random_kills(output_dir: Path, count: int, seed: int) -> Iterator[Kill]:
    """Half at a random phase of a save a few steps ahead of the newest checkpoint, half at a random moment of the
    next few steps; drawn lazily, each after the previous kill's run."""
    draw = random.Random(seed)
    for _ in range(count):
        newest = resumable_step(output_dir)
        if draw.random() < 0.5:
            phase = draw.choice(checkpoints.KILL_PHASES)
            # a fresh run's first save has nothing to rotate
            first = 2 if newest == 0 and phase in ("rotating", "deleting") else newest + 1
            yield Kill(phase=phase, step=draw.randint(first, newest + 3))
        else:
            yield Kill(step=newest + draw.randint(2, 4), fraction=draw.random())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=200, help="at least 4 per kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--work-dir", type=Path, help="default: a temporary directory, removed afterwards")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as temporary:
        work = args.work_dir or Path(temporary)
        runner = Runner(write_small_corpus(work / "corpus"), [*RUN_ARGS, "--max-steps", str(args.max_steps)],
                        args.timeout_s)
        runner.run(work / "straight", resume=False)
        killed = work / "killed"
        killed.mkdir()
        events = kill_and_resume(runner, killed, random_kills(killed, args.kills, args.seed))
        problems = differences(work / "straight", killed)

    for event in events:
        print(json.dumps({**event, "hit": hit(event)}))
    summary = {
        "kills": sum(event["killed"] for event in events),
        "hits": Counter(hit(event) for event in events),
        "bitwise_equal_to_uninterrupted_run": not problems,
    }
    print(json.dumps(summary, indent=2))
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
