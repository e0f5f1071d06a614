#!/usr/bin/env python
"""Load a PT model from the Hub the way any user would, and generate a few tokens.

    python scripts/pull_from_hub.py REPO_ID [--revision REV] [--prompt TEXT] [--max-new-tokens N]

Nothing of this package is used: the model comes through `AutoModelForCausalLM.from_pretrained(REPO_ID,
trust_remote_code=True, revision=REV)` with the repo's own modelling code, and the tokenizer (when the repo has one)
through `AutoTokenizer`. The endpoint comes from `HF_ENDPOINT`; with `HF_HUB_OFFLINE=1` it loads from the cache only.
A missing repo, revision or file exits with huggingface_hub's error and what it means.
"""

import argparse
import sys
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(repo_id: str, revision: str | None):
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True, revision=revision).eval()
    try:
        # trust_remote_code: AutoTokenizer reads config.json, whose auto_map points at the repo's code
        tokenizer = AutoTokenizer.from_pretrained(repo_id, revision=revision, trust_remote_code=True)
    except (OSError, ValueError):  # a repo may hold a model only; generation then runs on token ids
        tokenizer = None
    return model, tokenizer


def explain(err: Exception, repo_id: str, revision: str | None) -> str:
    """The huggingface_hub error behind `err` (transformers wraps them in OSError), in one line of what it means."""
    cause = err
    while cause is not None and not isinstance(cause, (RepositoryNotFoundError, RevisionNotFoundError,
                                                         EntryNotFoundError)):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, RepositoryNotFoundError):
        return f"no repository {repo_id!r} on the Hub (or it is private and no token was given)"
    if isinstance(cause, RevisionNotFoundError):
        return f"repository {repo_id!r} has no revision {revision!r} (branch, tag or full commit id)"
    if isinstance(cause, EntryNotFoundError):
        return f"repository {repo_id!r} at {revision or 'main'} lacks a file the model needs: {cause}"
    return str(err)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id")
    parser.add_argument("--revision", default=None, help="branch or commit id (default: main)")
    parser.add_argument("--prompt", default="The", help="text prompt, when the repo has a tokenizer")
    parser.add_argument("--input-ids", type=int, nargs="+", default=None, help="token ids instead of --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    try:
        model, tokenizer = load(args.repo_id, args.revision)
    except (OSError, ValueError) as err:
        sys.exit(f"pull_from_hub: cannot load {args.repo_id}@{args.revision or 'main'}: "
                 f"{explain(err, args.repo_id, args.revision)}")
    config = model.config
    # the cache keeps every file under snapshots/<commit id>/: the commit the revision resolved to
    commit = Path(hf_hub_download(args.repo_id, "config.json", revision=args.revision)).parent.name
    print(f"loaded {args.repo_id} @ {commit} as {type(model).__module__}.{type(model).__name__}")
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{config.num_tracks} tracks x {config.num_hidden_layers} layers, D={config.track_block_depth}: "
          f"{config.num_sync_points} sync points per forward; {parameters:,} parameters")
    if args.input_ids is not None or tokenizer is None:
        input_ids = torch.tensor([args.input_ids or [1, 2, 3]])
    else:
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print("greedy tokens:", output[0].tolist())
    if tokenizer is not None:
        print("text:", repr(tokenizer.decode(output[0])))


if __name__ == "__main__":
    main()
