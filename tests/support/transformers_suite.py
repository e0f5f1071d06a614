"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) for the installed transformers.

They come from the sdist of the installed version on PyPI, which ships `tests/test_modeling_common.py` and
`tests/test_configuration_common.py` but not the files those import (`generation/test_utils.py`,
`exporters/test_export.py`, `utils/test_configuration_utils.py`), nor `causal_lm_tester.py` or the per-model test
files. `make test` runs `python tests/support/transformers_suite.py fetch` at install time (PyPI is reachable then,
never while the tests run): it downloads the sdist with pip and unpacks its `tests/*.py` into `.transformers-tests/`
(git-ignored), with the version in `.transformers-tests/VERSION`.

`load()` imports the unpacked files as the package `transformers_tests` (their imports are relative) and stands in
for the three files the sdist lacks, each only where the sdist lacks it:
  - `GenerationTesterMixin`: its `generate` tests are not in the sdist; the stand-in is the class the common suite's
    `test_generation_tester_mixin_inheritance` asks generative models' testers to inherit, with one test that skips,
    saying so (PT's generation is tested by tests/test_generation.py and tests/test_oracles.py).
  - `ExportTesterMixin` (the base of `ModelTesterMixin`): its `torch.export` tests are not in the sdist either; the
    stand-in has one test that skips, saying so.
  - `config_common_kwargs` (`ConfigTester.check_config_arguments_init`): values of `PreTrainedConfig`'s common fields
    that differ from their defaults, which the test checks a config keeps.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest
import transformers


ROOT = Path(__file__).resolve().parents[2]
SUITE_DIR = Path(os.environ.get("TRANSFORMERS_TESTS_DIR", ROOT / ".transformers-tests"))
PACKAGE = "transformers_tests"
MAKE_HINT = "`make transformers-tests` (which `make test` runs) downloads them"


def fetch(directory: Path = SUITE_DIR) -> None:
    """Unpack `tests/*.py` of the sdist of the installed transformers into `directory/transformers_tests/`, unless it
    already holds that version's."""
    version = transformers.__version__
    stamp = directory / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == version:
        return
    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"transformers=={version}", "-d", download],
            check=True,
        )
        (sdist,) = Path(download).glob("transformers-*.tar.gz")
        shutil.rmtree(directory, ignore_errors=True)
        target = directory / PACKAGE
        target.mkdir(parents=True)
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/tests/"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.isfile() and relative != member.name and relative.endswith(".py") and ".." not in relative:
                    (target / relative).parent.mkdir(parents=True, exist_ok=True)
                    (target / relative).write_bytes(archive.extractfile(member).read())
    if not (target / "test_modeling_common.py").is_file():
        raise SystemExit(f"transformers {version}'s sdist has no tests/test_modeling_common.py")
    # the repository's tests/ is a package (relative imports; `test_configuration_common` even reads its __init__.py),
    # whose empty __init__.py the sdist leaves out
    (target / "__init__.py").touch()
    stamp.write_text(version + "\n")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def unavailable(message: str):
    """Skip the module that needs the suite; in CI, where `make test` fetches it, fail instead."""
    if in_ci():
        pytest.fail(f"CI: {message}", pytrace=False)
    pytest.skip(message, allow_module_level=True)


class GenerationTesterMixin:
    """Stand-in: transformers' sdist has no tests/generation/test_utils.py."""

    def test_generation_tests_available(self):
        self.skipTest(f"transformers {transformers.__version__}'s sdist has no tests/generation/test_utils.py: its "
                      "generate() tests are not run (tests/test_generation.py and tests/test_oracles.py cover PT's)")


class ExportTesterMixin:
    """Stand-in: transformers' sdist has no tests/exporters/test_export.py."""

    def test_export_tests_available(self):
        self.skipTest(f"transformers {transformers.__version__}'s sdist has no tests/exporters/test_export.py: its "
                      "torch.export tests are not run")


# Common `PreTrainedConfig` fields set to values other than their defaults.
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
    "tokenizer_class": "BertTokenizerFast",
    "bos_token_id": 6,
    "pad_token_id": 7,
    "eos_token_id": 8,
}

STAND_INS = {
    "generation/test_utils.py": {"GenerationTesterMixin": GenerationTesterMixin},
    "exporters/test_export.py": {"ExportTesterMixin": ExportTesterMixin},
    "utils/test_configuration_utils.py": {"config_common_kwargs": config_common_kwargs},
}


def load(directory: Path = SUITE_DIR) -> types.ModuleType:
    """The package `transformers_tests` with `test_modeling_common` and `test_configuration_common` imported (or a
    skip, a failure in CI, where the suite of the installed transformers is missing)."""
    version, stamp = transformers.__version__, directory / "VERSION"
    if not stamp.is_file():
        unavailable(f"transformers' common tests are not in {directory}: {MAKE_HINT}")
    if stamp.read_text().strip() != version:
        unavailable(f"{directory} holds the common tests of transformers {stamp.read_text().strip()}, not of the "
                    f"installed {version}: {MAKE_HINT}")
    try:
        importlib.import_module("parameterized")
    except ImportError as error:
        unavailable(f"transformers' common tests need `parameterized` ({error}): pip install -e .[dev]")
    source = directory / PACKAGE
    if PACKAGE not in sys.modules:
        sys.path.insert(0, str(directory))
        importlib.import_module(PACKAGE)
        for relative, names in STAND_INS.items():
            if (source / relative).is_file():
                continue
            parts = relative.removesuffix(".py").split("/")
            for depth in range(1, len(parts) + 1):
                name = ".".join([PACKAGE, *parts[:depth]])
                if name not in sys.modules:
                    module = types.ModuleType(name)
                    if depth < len(parts):
                        module.__path__ = []
                    sys.modules[name] = module
            vars(sys.modules[".".join([PACKAGE, *parts])]).update(names)
    package = sys.modules[PACKAGE]
    importlib.import_module(f"{PACKAGE}.test_configuration_common")
    importlib.import_module(f"{PACKAGE}.test_modeling_common")
    return package


if __name__ == "__main__":
    if sys.argv[1:2] != ["fetch"]:
        raise SystemExit(f"usage: {sys.argv[0]} fetch [DIRECTORY]")
    fetch(Path(sys.argv[2]) if len(sys.argv) > 2 else SUITE_DIR)
