"""What several test files share: tiny models built from a seed (never downloaded), how tests start child
processes (workers live in `support/`), and how they require an optional extra."""

import importlib
import os
import signal
import socket
import subprocess
import sys
import textwrap

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_ptt import PTConfig, PTForCausalLM


TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SUPPORT = TESTS / "support"
LAUNCH_TIMEOUT_S = 60  # hard limit per multi-process job; each takes 15-30 s on 2 contended cores
TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=5,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
    num_tracks=4,
    track_block_depth=2,
)
# AFM's layer pattern in miniature on the suite's tiny shape (5 layers merged every 2, so the last block is shorter):
# sliding RoPE layers, a global NoPE layer, dense and sparse FFNs, QK-norm.
AFM_OPTIONS = dict(
    qk_norm=True, sliding_window=4, no_rope_layers=[1, 1, 1, 0, 1],
    layer_types=["sliding_attention"] * 3 + ["full_attention", "sliding_attention"],
    mlp_layer_types=["dense", "sparse", "dense", "sparse", "sparse"],
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
)
# a two-track, two-layer model small enough for a few CPU seconds
TRAIN_ARGS = ["--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2", "--num-attention-heads", "4",
        "--num-key-value-heads", "2", "--head-dim", "8", "--num-tracks", "2", "--track-block-depth", "1",
        "--vocab-size", "300", "--block-size", "32", "--batch-size", "4", "--warmup-steps", "2", "--no-progress"]
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
    "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
)


def write_small_corpus(directory: Path) -> Path:
    """The first 30k characters of two plays of the default corpus, as text files in `directory`."""
    from modeling_ptt.training.data import shakespeare_files

    directory.mkdir(parents=True, exist_ok=True)
    for path in shakespeare_files()[:2]:
        (directory / path.name).write_text(path.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return directory


def require(module: str, extra: str = "eval"):
    """Import `module` of an optional extra for a test: where it is missing the test skips, except in CI (`CI` set,
    as CI services do), where `make test` installs the extra and a failed install must not pass as skipped tests."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = f"{module} is missing ({error}): it comes with `pip install -e .[{extra}]`, which make test runs"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"CI: {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def tiny_config(**overrides) -> PTConfig:
    return PTConfig(**{**TINY, **overrides})


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Init-time weights leave norms at one and logits near uniform; random everything exercises every weight."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model


def tiny_model(seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> PTForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    return randomize_(PTForCausalLM(config)).eval()


def llama_config_like(config: PTConfig) -> LlamaConfig:
    return LlamaConfig(**{field: getattr(config, field) for field in LLAMA_FIELDS})


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(llama_config_like(tiny_config(**overrides)))).eval()


def run_without_package(code: str, cwd) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `modeling_ptt` is not importable and the Hub is off."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), "PYTHONNOUSERSITE": "1"}
    # `pip install -e` puts the package on sys.path through a .pth file: the child imports the blocker first
    preamble = f"import sys\nsys.path.insert(0, {str(SUPPORT)!r})\nimport block_package\n"
    return subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )


def child_env(**extra) -> dict:
    """A child's environment: one thread, offline, this checkout importable, no launcher variables but `extra`."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    # the checkout for the package, scripts/ for the measuring tools the workers share with the benchmark
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "scripts"), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_launcher(command: list[str], env: dict, timeout_s: float = LAUNCH_TIMEOUT_S,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run a launcher with a hard timeout; on a hang, kill its whole process group (the launcher AND its ranks).
    With `check`, a non-zero exit fails the test."""
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate()
        pytest.fail(f"{' '.join(command)} hung for {timeout_s}s:\n{stdout[-4000:]}\n{stderr[-4000:]}")
    assert launcher.returncode == 0 or not check, f"{' '.join(command)} failed:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
