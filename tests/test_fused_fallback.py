"""What the fused CPU scan hands back to the pure-torch engine: scans it does not support (user cells,
half precision, other devices, mixed dtypes, empty sequences, per-unit masks) are refused by
supports(); RNNKIT_NO_FUSED switches it off; a failed build warns once and falls back. The scan itself
is held to the engine in test_fused.py."""
from __future__ import annotations

import warnings

import pytest
import torch
from test_fused import B, H, T

from rnnkit import _fused
from rnnkit.cells import GRUCell, LayerNormCell, LSTMCell
from rnnkit.engine import ScanOptions

# -- what the fused path hands back to the engine ------------------------------------------------------

class _UserCell(GRUCell):
    """A subclass may change the math: never fused."""


def _refused(cell=None, dtype=torch.float32, device="cpu", **change):
    cell = cell or LSTMCell()
    W = cell.num_gates * H
    args = dict(xi=torch.zeros(T, B, W, dtype=dtype, device=device), w=torch.zeros(W, H), b=torch.zeros(W),
                state0=(torch.zeros(B, H),) * cell.num_states, params=())
    args.update(change)
    opts = ScanOptions(cell, mask=args.pop("mask", None))
    return not _fused.supports(opts, args["xi"], args["state0"], args["w"], args["b"], args["params"])


def test_unsupported_scans_are_refused():
    assert _refused(_UserCell())
    assert _refused(LayerNormCell(_UserCell()))
    assert _refused(dtype=torch.float16)
    assert _refused(dtype=torch.bfloat16)
    assert _refused(device="meta")                               # stands in for CUDA
    assert _refused(w=torch.zeros(4 * H, H, dtype=torch.float64))   # mixed dtypes
    assert _refused(xi=torch.zeros(0, B, 4 * H))                 # empty sequence
    assert _refused(mask=torch.ones(T, B, H))                    # a per-unit padding mask


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("RNNKIT_NO_FUSED", "1")
    assert _refused()
    assert not _fused.available()


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.delenv("RNNKIT_NO_FUSED", raising=False)
    monkeypatch.setattr(_fused, "_loaded", {"ops": None, "error": None})

    def broken_build(verbose=False):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(_fused, "build", broken_build)
    with pytest.warns(RuntimeWarning, match="compiler exploded"):
        assert _refused(LSTMCell(), w=torch.zeros(4 * H, H))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # the second time: silent
        assert _refused()
