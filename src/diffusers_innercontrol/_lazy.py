# Copyright 2026 The diffusers-innercontrol authors. Apache-2.0.
"""Public names imported on first use (PEP 562), for the package's `__init__`s."""

import importlib
from typing import Callable, Dict, Tuple


def lazy_exports(package: str, namespace: dict, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for `package`, whose names in `exports` ({name: module, relative to `package` when
    it starts with a dot}) are imported when first asked for and then kept in `namespace` (its globals)."""

    def __getattr__(name):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        namespace[name] = value  # once imported, a plain module attribute
        return value

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
