"""Importing this makes `modeling_ptt` unimportable in the current process, even where it is installed (editable,
as in CI): a child process that imports it first can only use the code saved beside a model's weights, as on a
user's machine that never installed this package."""

import importlib.abc
import sys


class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_ptt":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: only the saved remote code may be used)")
        return None


sys.meta_path.insert(0, BlockPackage())
