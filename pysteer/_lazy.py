"""Lazy public names for a package: ``__getattr__`` / ``__dir__`` that import a submodule the first
time one of its names is used (so ``import pysteer`` and ``pysteer --help`` stay light)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, namespace: dict, table: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: ``table`` maps a public name to the submodule that
    defines it (a name that is the submodule itself, ``"recipes": "pysteer.recipes"``, gives the
    module). A loaded name is kept in ``namespace`` (the package's ``globals()``)."""

    def __getattr__(name: str):
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(target)
        value = module if target.endswith("." + name) else getattr(module, name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted([*namespace, *table])

    return __getattr__, __dir__
