"""The stream's hand-fused per-step kernels (rnnkit.stream.Stream's fast path; its docstring says what
each does and why). Each kernel is built from one stacked layer's weights (`stream._Sub`) and views of the
stream's buffers: `window` (B, I_k + H) = [x_k | h_k], `h` (B, H) and the other states `rest`; calling
it advances that layer by one time step in place.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import _fused
from .boundary import autocasting
from .cells import ElmanCell, GRUCell, LSTMCell, ProjectedLSTMCell
from .layers import _Recurrent


def fast_kind(layer) -> str | None:
    """Which hand-fused kernel fits: only torch.nn's exact cells with no extras."""
    if not isinstance(layer, _Recurrent) or layer.layer_norm or any(layer.zoneout):
        return None
    return {LSTMCell: "lstm", ProjectedLSTMCell: "lstm", GRUCell: "gru", ElmanCell: "rnn"}.get(type(layer._cell))


def _stacked(sub, rows: list[tuple[Tensor | None, Tensor | None]], bias: list[Tensor]):
    """[V U] row blocks -> (I_k + H, N) transposed weight and (N,) bias; None blocks are zeros (H: h's
    units, P for a projected LSTM)."""
    I, H = sub.V.shape[1], sub.U.shape[1]
    blocks = []
    for v, u in rows:
        n = (v if v is not None else u).shape[0]
        v = v if v is not None else sub.V.new_zeros(n, I)
        u = u if u is not None else sub.U.new_zeros(n, H)
        blocks.append(torch.cat((v, u), 1))
    return torch.cat(blocks, 0).t().contiguous(), torch.cat(bias, 0)


def _fused_step(window: Tensor, name: str = "stream_lstm"):
    """The fused kernel's one-call step `name` (rnnkit/_fused/stream.cpp: stream_lstm, stream_gru) for a CPU
    float32/float64 stream, None where it does not apply or the kernel is unavailable (the torch-op step
    then runs)."""
    if window.device.type != "cpu" or window.dtype not in (torch.float32, torch.float64) or not _fused.available():
        return None
    return getattr(_fused.build(), name)


def _bias(b: Tensor | None, n: int, like: Tensor) -> Tensor:
    return like.new_zeros(n) if b is None else b


class LSTMKernel:
    """One addmm into (i, f, o, g); sigmoid_ on i, f, o; tanh_ on g; c = f c + i g; h = o tanh(c);
    projected (sub.W_hr, (P, H)): m = o tanh(c), h = m W_hr^T (one mm into a buffer, copied into h)."""

    def __init__(self, sub, window, h, rest):
        H = sub.U.shape[0] // 4
        V, U = sub.V.chunk(4, 0), sub.U.chunk(4, 0)                           # i, f, g, o blocks
        b = (_bias(sub.b_ih, 4 * H, sub.V) + _bias(sub.b_hh, 4 * H, sub.V)).chunk(4)
        order = (0, 1, 3, 2)
        self.W, self.b = _stacked(sub, [(V[j], U[j]) for j in order], [b[j] for j in order])
        self.window, self.h, self.c = window, h, rest[0]
        self.P = window.new_empty(window.shape[0], 4 * H)                      # (B, 4H)
        self.sig, self.tanh = self.P[:, :3 * H], self.P[:, 3 * H:]
        self.i, self.f, self.o = self.P[:, :H], self.P[:, H:2 * H], self.P[:, 2 * H:3 * H]
        self.tc = window.new_empty(window.shape[0], H)
        self.W_hr = None if sub.W_hr is None else sub.W_hr.t().contiguous()   # (H, P)
        self.m = None if self.W_hr is None else window.new_empty(window.shape[0], H)   # o tanh(c), projected
        self.hp = None if self.W_hr is None else window.new_empty(h.shape)
        self.fused = _fused_step(window) if self.W_hr is None else None   # the whole step in one C++ call

    def __call__(self):
        if self.fused is not None:
            self.fused(self.window, self.W, self.b, self.P, self.c, self.h)
            return
        torch.addmm(self.b, self.window, self.W, out=self.P)
        self.sig.sigmoid_()
        self.tanh.tanh_()
        self.c.mul_(self.f).addcmul_(self.i, self.tanh)
        torch.tanh(self.c, out=self.tc)
        if self.W_hr is None:
            torch.mul(self.o, self.tc, out=self.h)
        else:
            torch.mm(torch.mul(self.o, self.tc, out=self.m), self.W_hr, out=self.hp)
            self.h.copy_(self.hp)


class GRUKernel:
    """One addmm into [r, -z, x_n, h_n]; sigmoid_ gives r and 1 - z; n = tanh(x_n + r h_n);
    h.lerp_(n, 1 - z) = z h + (1 - z) n."""

    def __init__(self, sub, window, h, rest):
        H = sub.U.shape[1]
        V, U = sub.V.chunk(3, 0), sub.U.chunk(3, 0)                           # r, z, n blocks
        bi, bh = _bias(sub.b_ih, 3 * H, sub.V).chunk(3), _bias(sub.b_hh, 3 * H, sub.V).chunk(3)
        rows = [(V[0], U[0]), (-V[1], -U[1]), (V[2], None), (None, U[2])]
        self.W, self.b = _stacked(sub, rows, [bi[0] + bh[0], -(bi[1] + bh[1]), bi[2], bh[2]])
        self.window, self.h = window, h
        self.P = window.new_empty(window.shape[0], 4 * H)                      # (B, 4H)
        self.rz = self.P[:, :2 * H]
        self.r, self.w, self.xn, self.hn = (self.P[:, j * H:(j + 1) * H] for j in range(4))
        self.n = window.new_empty(window.shape[0], H)
        self.fused = _fused_step(window, "stream_gru")                  # the whole step in one C++ call

    def __call__(self):
        if self.fused is not None:
            self.fused(self.window, self.W, self.b, self.P, self.h)
            return
        torch.addmm(self.b, self.window, self.W, out=self.P)
        self.rz.sigmoid_()
        torch.addcmul(self.xn, self.r, self.hn, out=self.n).tanh_()
        self.h.lerp_(self.n, self.w)


class ElmanKernel:
    """h = tanh or relu of one addmm."""

    def __init__(self, sub, window, h, rest):
        H = sub.U.shape[1]
        self.W, self.b = _stacked(sub, [(sub.V, sub.U)], [_bias(sub.b_ih, H, sub.V) + _bias(sub.b_hh, H, sub.V)])
        self.window, self.h = window, h
        self.P = window.new_empty(window.shape[0], H)
        self.relu = sub.cell.nonlinearity == "relu"

    def __call__(self):
        torch.addmm(self.b, self.window, self.W, out=self.P)
        if self.relu:
            torch.clamp(self.P, min=0, out=self.h)
        else:
            torch.tanh(self.P, out=self.h)


class GenericKernel:
    """Any other cell: `step`'s per-layer code, reading from and writing to the stream's buffers."""

    def __init__(self, sub, window, h, rest):
        self.sub, self.h, self.rest = sub, h, rest
        self.x = window[:, :window.shape[1] - h.shape[1]]

    def __call__(self):
        # under autocast the weights' dtype, as forward
        amp = torch.autocast(self.x.device.type, enabled=False) if autocasting(self.x) else contextlib.nullcontext()
        with amp:
            new = self.sub(self.x, (self.h, *self.rest))
        for dst, src in zip((self.h, *self.rest), new):
            dst.copy_(src)


KERNELS = {"lstm": LSTMKernel, "gru": GRUKernel, "rnn": ElmanKernel}    # by fast_kind; others: GenericKernel
