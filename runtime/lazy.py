"""PEP 562 exports, imported on first use: a package's `__getattr__` and `__dir__` from a table of public
name -> submodule, so that importing the package imports none of them (and not torch, unless a name that
needs it is used)."""
from __future__ import annotations

import importlib
import sys


def exports(package: str, table: dict[str, str], modules=frozenset()):
    """(`__getattr__`, `__dir__`) for `package`. Names in `modules` are submodules themselves; the others are
    attributes of theirs. Each is cached in the package once imported, so later lookups skip `__getattr__`."""
    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        mod = importlib.import_module(module, package)
        value = mod if name in modules else getattr(mod, name)
        vars(sys.modules[package])[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
