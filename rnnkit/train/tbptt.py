"""Stateful truncated BPTT over a long stream (seed 003: "update every k steps").

A stream of N steps (tokens or values) is cut into B contiguous parallel streams, one per batch row,
and walked in windows of k steps; the last window may be shorter. The recurrent state at the end of a
window starts the next one (carried), but the trainer detaches it at every window boundary, so the
gradient travels back at most k steps while the forward pass sees the whole history. Where a new
sequence (a document, a separate series) begins inside a stream, `starts` marks it and the state of
that row is reset to zero just before it.

    source = StreamBatches(tokens, batch_size=B, k=k)          # next-step targets: y_t = s_{t+1}
    def loss_fn(model, w, state):                              # w.x (B, k), state from last window
        out, state = run_segments(model.rnn, model.embed(w.x), state, w.starts)
        return F.cross_entropy(model.head(out).flatten(0, 1), w.y.flatten()), state
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError


@dataclass(frozen=True)
class Window:
    x: Tensor                   # (B, k) or (B, k, F) inputs, batch first
    y: Tensor                   # (B, k) or (B, k, F) targets
    starts: Tensor | None       # (B, k) bool: a new sequence begins at this step (reset before it)


class StreamBatches:
    """B parallel streams of a long sequence, walked in windows of k steps, in order, every epoch."""

    stateful = True

    def __init__(self, stream: Tensor, batch_size: int, k: int, targets: Tensor | None = None,
                 starts: Tensor | None = None):
        if k < 1 or batch_size < 1:
            raise UserError(f"TBPTT needs k >= 1 and batch_size >= 1, got k={k}, batch_size={batch_size}")
        shift = 1 if targets is None else 0
        x, y = (stream[:-1], stream[1:]) if targets is None else (stream, targets)
        if len(x) != len(y):
            raise UserError(f"stream has {len(x)} steps but targets have {len(y)}")
        n = len(x) // batch_size                                  # steps per parallel stream
        if n == 0:
            raise UserError(f"a stream of {len(stream)} steps is too short for {batch_size} parallel streams "
                            f"(needs at least {batch_size + shift}); lower the batch size")
        cut = n * batch_size
        self.x = x[:cut].reshape(batch_size, n, *x.shape[1:])     # (B, n[, F]) row b = chunk b
        self.y = y[:cut].reshape(batch_size, n, *y.shape[1:])     # (B, n[, F])
        self.starts = None if starts is None else starts[:cut].bool().reshape(batch_size, n)  # (B, n)
        self.k = k

    def __len__(self) -> int:
        return -(-self.x.shape[1] // self.k)

    def batches(self, generator: torch.Generator | None = None) -> list[Window]:
        n, k = self.x.shape[1], self.k
        return [Window(self.x[:, i:i + k], self.y[:, i:i + k],
                       None if self.starts is None else self.starts[:, i:i + k])
                for i in range(0, n, k)]


def detach_state(state):
    """Cut the graph behind a carried state (a tensor, a tuple of them, or None), keeping its values."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


def reset_state(state, mask: Tensor):
    """Zero the state of the batch rows where `mask` (B,) is True. States are (layers*dirs, B, H)."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        keep = (~mask).to(state.dtype).view(1, -1, *([1] * (state.dim() - 2)))  # (1, B, 1)
        return state * keep
    return type(state)(reset_state(s, mask) for s in state)


def run_segments(rnn, x: Tensor, state, starts: Tensor | None):
    """Run a batch-first recurrent layer over a window, resetting rows where `starts` (B, k) says a new
    sequence begins. Returns (out (B, k, H), final state), as the layer does."""
    if starts is None or not bool(starts.any()):
        return rnn(x, state)
    T = x.shape[1]
    cuts = sorted({0, *torch.nonzero(starts.any(0)).flatten().tolist()}) + [T]
    outs = []
    for a, b in zip(cuts, cuts[1:]):
        state = reset_state(state, starts[:, a])
        out, state = rnn(x[:, a:b], state)                       # out (B, b-a, H)
        outs.append(out)
    return torch.cat(outs, 1), state
