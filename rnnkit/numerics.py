"""Floating-point settings the recurrent loops need."""
from __future__ import annotations

import contextlib

import torch

_DENORMAL = torch.tensor(1e-40)     # below float32's smallest normal number (1.2e-38)


@contextlib.contextmanager
def flushing_denormals(on: bool = True):
    """Flush denormal floats to zero inside, then restore the caller's setting.

    A gradient carried back through many steps decays geometrically, and with a loss on the last step
    only (many-to-one) most of it sinks into denormals, which x86 CPUs process ~100x slower: training
    steps were measured 4-5x slower at T = 200. Values that small carry nothing a float32 loss can see.
    """
    switch = on and float(_DENORMAL * 1.0) != 0.0 and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if switch:
            torch.set_flush_denormal(False)
