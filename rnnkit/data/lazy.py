"""A module imported when one of its attributes is first read.

    pd = LazyModule("pandas")      # at module level: costs nothing until pd.read_csv(...) is reached

pandas costs every rnnkit command 0.24 s of start-up when imported at module level, and most commands
never read a CSV. The proxy keeps `pd.` usable everywhere a module would be (function bodies, except
clauses, and annotations that typing.get_type_hints resolves), without putting anything in sys.modules
before the real import.
"""
from __future__ import annotations

import importlib


class LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
