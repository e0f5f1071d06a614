"""The files the scripts read and write, checked before they do any work.

A path a script cannot write to ends it at once with an error that names the path, instead of after minutes of work,
or (as with `save_pretrained` given a file, which only logs) not at all. Nothing is created here, so a script that
fails later leaves no empty directory behind. A JSON input that is not JSON is named too.
"""

import json
import os
from pathlib import Path


def read_json_file(path: str | os.PathLike, what: str):
    """The JSON content of `path`; a file that is not JSON is a ValueError naming it (json names only the line)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} {path} is not a JSON file: {err}") from None


def unwritable_dir(path: Path) -> str | None:
    """Why `path` cannot be (or be made) a directory this process writes in; None if it can."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return "it exists and is not a directory" if existing == path else f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Exit non-zero, naming `path`, unless it is a directory this process may write in or create."""
    path = Path(path)
    if reason := unwritable_dir(path):
        raise SystemExit(f"error: cannot write {what} to {path}: {reason}")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Exit non-zero, naming `path`, unless it is a file this process may write or create."""
    path = Path(path)
    if path.is_dir():
        reason = "it is a directory"
    elif path.exists():
        reason = None if os.access(path, os.W_OK) else "it is not writable"
    else:
        reason = unwritable_dir(path.parent)
    if reason:
        raise SystemExit(f"error: cannot write {what} to {path}: {reason}")
    return path
