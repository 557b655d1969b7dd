"""Which path backend="auto" layers take, process-wide or in one thread's block: `set_default_backend`,
`backend_scope`, `auto_backend` (re-exported by rnnkit.layers, where they have always been imported from).
"""
from __future__ import annotations

import contextlib
import threading

AUTO_CHOICES = ("auto", "engine")        # what backend="auto" may be set to run (set_default_backend, scopes)
_AUTO = {"runs": "auto"}                 # what backend="auto" layers do: "auto" as above, or "engine"
_SCOPED = threading.local()              # backend_scope's setting, this thread only (None: _AUTO's)


def set_default_backend(name: str) -> str:
    """What layers built with backend="auto" (the default) run, process-wide, from their next call:
    "engine" (rnnkit's engine for every configuration) or "auto" (torch's fused kernel for a plain
    configuration, the engine otherwise; the default). Layers built with "engine" or "native" keep
    theirs. Returns the previous setting, to restore it:

        before = rk.set_default_backend("engine")
        try: ...
        finally: rk.set_default_backend(before)
    """
    before, _AUTO["runs"] = _AUTO["runs"], _checked_backend(name)
    return before


@contextlib.contextmanager
def backend_scope(name: str | None):
    """Inside the block and in this thread only, backend="auto" layers run `name` ("auto" or "engine";
    None: the process-wide setting). Trainer.fit runs in one, so fits in two threads cannot undo each
    other's choice or leave theirs behind."""
    before = getattr(_SCOPED, "runs", None)
    _SCOPED.runs = None if name is None else _checked_backend(name)
    try:
        yield
    finally:
        _SCOPED.runs = before


def _checked_backend(name) -> str:
    if name not in AUTO_CHOICES:
        raise ValueError(f"default backend must be 'auto' or 'engine', got {name!r} ('native' is a "
                         "per-layer choice: backend='native')")
    return name


def auto_backend() -> str:
    """What backend="auto" layers run now, in this thread: "auto" or "engine"."""
    return getattr(_SCOPED, "runs", None) or _AUTO["runs"]
