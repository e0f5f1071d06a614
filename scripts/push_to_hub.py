#!/usr/bin/env python
"""Push a saved PT model directory to the Hugging Face Hub with its remote code and a generated model card.

    python scripts/push_to_hub.py DIR REPO_ID [--revision BRANCH] [--private] [--commit-message MSG]

DIR is what `PTForCausalLM.save_pretrained` wrote (plus, optionally, a tokenizer, `train_log.jsonl` and
`benchmark.json`). One commit uploads: config.json, the safetensors weights (and their index when sharded),
generation_config.json, the remote-code modules `auto_map` names and every module they import relatively, the
tokenizer files, the training log and benchmark JSON, and README.md, the card rendered from `model_cards/ptt.md`.
Anything else in DIR (optimizer states, other checkpoints, a README.md) stays local.

The endpoint comes from `HF_ENDPOINT` and the token from the usual places (`HF_TOKEN`, `hf auth login`).
Files the Hub already holds with the same content are not uploaded again.
"""

import argparse
import json
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from transformers.dynamic_module_utils import get_relative_import_files

from model_card import BENCHMARK, TRAINING_LOG, build_model_card  # a sibling: this script's folder is on sys.path
from modeling_ptt import PTConfig


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")
TOKENIZER_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class NotAModelDir(ValueError):
    """DIR cannot be pushed as a PT model; the message says which file and why."""


def load_pt_config(model_dir: Path) -> PTConfig:
    """The PT config of `model_dir`, or NotAModelDir naming what is wrong with its config.json."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise NotAModelDir(f"{model_dir} has no config.json: not a saved model directory")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise NotAModelDir(f"{config_file} is not valid JSON: {err}") from err
    if raw.get("model_type") != PTConfig.model_type:
        raise NotAModelDir(f"{config_file} has model_type={raw.get('model_type')!r}, not a PT model "
                           f"(model_type={PTConfig.model_type!r})")
    try:
        return PTConfig.from_pretrained(model_dir)
    except ValueError as err:  # PTConfig names the field that cannot work
        raise NotAModelDir(f"{config_file}: {err}") from err


def remote_code_files(model_dir: Path, auto_map: dict) -> list[str]:
    """The modules `auto_map` names and, recursively, every module they import relatively."""
    modules = sorted({f"{reference.split('.')[0]}.py" for reference in auto_map.values()})
    files = set(modules)
    for module in modules:
        if not (model_dir / module).is_file():
            raise NotAModelDir(f"{model_dir / module} is missing: config.json's auto_map names it and the repo "
                               "needs it to load with trust_remote_code (save the model with save_pretrained)")
        try:
            files.update(Path(path).name for path in get_relative_import_files(model_dir / module))
        except FileNotFoundError as err:
            raise NotAModelDir(f"{module} imports a module that is missing from {model_dir}: {err.filename}") from err
    return sorted(files)


def weight_files(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [shard for shard in shards if not (model_dir / shard).is_file()]
        if missing:
            raise NotAModelDir(f"{index.name} names shards missing from {model_dir}: {', '.join(missing)}")
        return [index.name, *shards]
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise NotAModelDir(f"{model_dir} has no model.safetensors (nor a model.safetensors.index.json): save the "
                       "weights with save_pretrained, which writes safetensors")


def tokenizer_files(model_dir: Path) -> list[str]:
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if present and not any(name in present for name in TOKENIZER_VOCABULARIES):
        raise NotAModelDir(f"{model_dir} has tokenizer files ({', '.join(present)}) but no vocabulary "
                           f"({' or '.join(TOKENIZER_VOCABULARIES)}): save the tokenizer with save_pretrained")
    return present


def repo_files(model_dir: Path) -> tuple[PTConfig, list[str]]:
    """The PT config of `model_dir` and the files of it that make a complete repo; raises NotAModelDir."""
    if not model_dir.is_dir():
        raise NotAModelDir(f"{model_dir} is not a directory")
    config = load_pt_config(model_dir)
    auto_map = getattr(config, "auto_map", None) or {}  # only a save writes it: this is what config.json holds
    for auto_class in ("AutoConfig", "AutoModelForCausalLM"):
        if auto_class not in auto_map:
            raise NotAModelDir(f"{model_dir / 'config.json'} has no auto_map[{auto_class!r}]: without it the "
                               "repo cannot load with trust_remote_code")
    optional = [name for name in ("generation_config.json", TRAINING_LOG, BENCHMARK) if (model_dir / name).is_file()]
    files = ["config.json", *weight_files(model_dir), *remote_code_files(model_dir, auto_map),
             *tokenizer_files(model_dir), *optional]
    return config, files


def push(model_dir: Path, repo_id: str, revision: str | None = None, private: bool = False,
         commit_message: str | None = None, license: str = "apache-2.0", datasets: list[str] | None = None,
         api: HfApi | None = None):
    """Create the repo (and branch) when needed and upload the model as one commit; returns the `CommitInfo`.

    `api` defaults to `HfApi()` (endpoint from `HF_ENDPOINT`, token from the usual places)."""
    config, files = repo_files(model_dir)
    left_local = sorted(p.name for p in model_dir.iterdir() if p.name not in files)
    print(f"uploading {', '.join(files)} and a generated README.md" +
          (f"; left local: {', '.join(left_local)}" if left_local else ""))
    api = api or HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    card = build_model_card(model_dir, repo_id, config, files, license=license, datasets=datasets)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=model_dir / name) for name in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or f"Upload PT model ({config.num_tracks} tracks, D={config.track_block_depth})",
        revision=revision,
    )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a directory written by PTForCausalLM.save_pretrained")
    parser.add_argument("repo_id", help="namespace/name on the Hub (created if it does not exist)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if absent)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps "
                                                                "its visibility)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--license", default="apache-2.0", help="license identifier for the card")
    parser.add_argument("--dataset", action="append", default=[], help="a dataset the model was trained on "
                                                                       "(repeatable; Hub dataset id)")
    args = parser.parse_args(argv)

    try:
        commit = push(args.model_dir, args.repo_id, args.revision, args.private, args.commit_message, args.license,
                      args.dataset)
    except NotAModelDir as err:
        sys.exit(f"push_to_hub: refusing to push: {err}")
    except HfHubHTTPError as err:
        hint = ""
        if err.response is not None and err.response.status_code == 401:
            hint = "\n(not authenticated: set HF_TOKEN or run `hf auth login` with a token that may write)"
        sys.exit(f"push_to_hub: the Hub refused {args.repo_id}: {err}{hint}")
    print(f"pushed {args.model_dir} to {commit.repo_url.repo_id} @ {args.revision or 'main'}")
    print(f"commit {commit.oid}: {commit.commit_url}")


if __name__ == "__main__":
    main()
