"""The Python blocks of README.md and of the docs/ pages work as written.

Every ```python block runs on its own in a fresh interpreter, offline, from a temporary directory that sees the
repository's `configuration/` folder, so relative paths resolve as they do from the repository root. A block that
needs something outside the repository says so on the line before its fence, e.g. `<!-- requires: launcher -->`
(invisible on GitHub); it is skipped with that reason, one test case per block, so skips show in the report.
Every block, skipped or not, must also import every name it uses.
"""

import ast
import builtins
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from helpers import ROOT, child_env


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REQUIREMENTS = {
    "hub": "a model repo on the Hugging Face Hub",
    "llama-checkpoint": "a Llama checkpoint",
    "launcher": "a launcher (torchrun or accelerate launch) and a saved model",
    "vllm": "the vLLM environment",
}
MARK = re.compile(r"<!--\s*requires:\s*(\S+?)\s*-->")
BLOCK_TIMEOUT_S = 300


class Block(NamedTuple):
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    requires: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def python_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if lines[index].strip() != "```python":
            index += 1
            continue
        start = index
        end = next((i for i in range(start + 1, len(lines)) if lines[i].strip() == "```"), None)
        assert end is not None, f"{page.name}:{start + 1}: the ```python fence is never closed"
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        mark = MARK.fullmatch(previous.strip())
        blocks.append(Block(page, start + 1, "\n".join(lines[start + 1:end]) + "\n", mark and mark.group(1)))
        index = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def undefined_names(code: str) -> list[str]:
    """Names a block reads but never imports, assigns or defines (order-blind: enough to catch a missing import)."""
    tree = ast.parse(code)
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            defined.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return sorted(used - defined)


def test_the_readme_has_blocks_that_run():
    readme = [block for block in BLOCKS if block.page.name == "README.md"]
    fences = sum(line.strip() == "```python" for line in (ROOT / "README.md").read_text().splitlines())
    assert len(readme) == fences
    assert any(block.requires is None for block in readme), "no README block would run"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_requires_mark_is_known_and_sits_on_a_python_block(page):
    lines = page.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        mark = MARK.search(line)
        if not mark:
            continue
        assert mark.group(1) in REQUIREMENTS, f"{page.name}:{number}: unknown requirement {mark.group(1)!r}"
        following = next((text.strip() for text in lines[number:] if text.strip()), "")
        assert following == "```python", f"{page.name}:{number}: the mark is not followed by a ```python block"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_block_imports_what_it_uses(block):
    assert undefined_names(block.code) == [], f"{block.name} uses names it does not import or define"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: block.name)
def test_block_runs(block, tmp_path):
    if block.requires is not None:
        pytest.skip(f"{block.name} needs {REQUIREMENTS[block.requires]}")
    (tmp_path / "configuration").symlink_to(ROOT / "configuration", target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-c", block.code], cwd=tmp_path, env=child_env(HF_HOME=str(tmp_path / "hf_home")),
        capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{block.name} failed:\n{block.code}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {heading_anchor(line.lstrip("#")) for line in page.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # https://..., mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(linked), f"{page.name} links to {target}, which has no such heading"
