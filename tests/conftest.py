"""Fixtures shared by the test files; shared functions live in `helpers.py`, worker scripts in `support/`."""

from pathlib import Path

import pytest
import torch

from helpers import TINY, write_small_corpus


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))
