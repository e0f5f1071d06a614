"""modeling_ptt.training in a loop of one's own: examples/own_training_loop.py (docs/training_library.md) on 2 CPU
processes (gloo, torchrun) against the same script in one process, the oracle: equal losses (fp32, rel 1e-5), also
across a save, a stop and a resume."""

import json
import sys
from pathlib import Path

import pytest

from helpers import ROOT, child_env, run_launcher


EXAMPLE = ROOT / "examples" / "own_training_loop.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def logged_losses(stdout: str) -> dict[int, float]:
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {record["step"]: record["loss"] for record in records}


def test_the_docs_show_the_example_as_it_is():
    page = (ROOT / "docs" / "training_library.md").read_text(encoding="utf-8")
    assert f"```python\n{EXAMPLE.read_text(encoding='utf-8')}```" in page


@pytest.mark.parametrize("layout", [["2"], ["1", "fsdp"]], ids=["tracks", "fsdp"])
def test_own_loop_on_two_processes_equals_one_process(tmp_path, layout):
    """Track parallel (2 ranks of one track each) and FSDP2 over 2 data-parallel replicas: 4 steps, a checkpoint, the
    job stopped; a new job resumes from the checkpoint and makes steps 5 to 8. Every step's loss equals one process's
    straight through the 8 steps."""
    alone = run_launcher([sys.executable, str(EXAMPLE), str(tmp_path / "alone")], child_env(), timeout_s=120)
    expected = logged_losses(alone.stdout)
    assert list(expected) == list(range(1, 9))

    launch = [str(TORCHRUN), "--standalone", "--nproc-per-node=2", str(EXAMPLE), str(tmp_path / "two"), *layout]
    first = run_launcher(launch, child_env(STOP_AT="4"), timeout_s=60)
    assert (tmp_path / "two" / "checkpoint-4").is_dir()
    resumed = run_launcher(launch, child_env(), timeout_s=60)
    got = logged_losses(first.stdout) | logged_losses(resumed.stdout)
    assert list(logged_losses(resumed.stdout)) == [5, 6, 7, 8]  # it resumed, and did not start again
    assert got.keys() == expected.keys()
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), step
