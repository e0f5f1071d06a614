"""Fixtures shared by the test files; shared functions live in `helpers.py`, worker scripts in `support/`."""

from pathlib import Path

import pytest
import torch

from helpers import TINY, write_small_corpus


def pytest_configure(config):
    # the marks of transformers' common tests (test_transformers_common.py), which transformers' own conftest declares
    for mark in ("accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test", "slow",
                 "torch_compile_test"):
        config.addinivalue_line("markers", f"{mark}: a mark of transformers' common tests")


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))
