"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): gates that see only x_t, so the
whole sequence's recurrence h_t = a_t h_{t-1} + b_t is one scan over time (`parallel.py`).

    minGRU:   z_t = sigmoid(W_z x_t + b_z)          h~_t = g(W_h x_t + b_h)
              h_t = (1 - z_t) h_{t-1} + z_t h~_t                  a_t = 1 - z_t,   b_t = z_t h~_t
    minLSTM:  f_t = sigmoid(W_f x_t + b_f)   i_t = sigmoid(W_i x_t + b_i)   h~_t = g(W_h x_t + b_h)
              f'_t, i'_t = f_t / (f_t + i_t), i_t / (f_t + i_t)
              h_t = f'_t h_{t-1} + i'_t h~_t                       a_t = f'_t,      b_t = i'_t h~_t
    g(x) = x + 0.5 for x >= 0, sigmoid(x) for x < 0     (positive, so that log h~ exists)

f' and i' are computed stably from d = log(i / f) = softplus(-k_f) - softplus(-k_i):  f' = sigmoid(-d),
i' = sigmoid(d) (and in log space log f' = -softplus(d), log i' = -softplus(-d)).

Parameters per layer and direction (torch.nn's naming): `weight_ih_l{k}` = V, the blocks [W_z; W_h]
(2H, I) or [W_f; W_i; W_h] (3H, I), and `bias_ih_l{k}`; suffix `_reverse` for the backward direction.
There is no recurrent weight U: that is what makes the scan possible.

A cell object here follows the cell protocol of `cells/base.py` (step(xi, gh, state, params) with
xi = V x_t + b and gh = None) so that streaming (`stream.step`, `Stream`) runs it one step at a time;
`coefficients` and `log_coefficients` give a_t, b_t for all steps at once, for the scan.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .boundary import (
    PADDING,
    alone_with_packed,
    autocast_input,
    check_input,
    check_lengths,
    check_state,
    padded_input,
    repack_like,
    untraced,
)
from .cells.base import uniform_init_
from .engine import TraceSlot
from .layers import _Recurrent, param_suffix
from .numerics import trace_norm
from .parallel import FUSED_KINDS, blocked_scan, log_scan, reverse_total

SCANS = ("auto", "blocked", "log")


def g(x: Tensor) -> Tensor:
    """The paper's positive activation for h~: x + 0.5 for x >= 0, sigmoid(x) below, written as
    sigmoid(min(x, 0)) + max(x, 0) (on CPU several times faster than torch.where, backward included).
    At x = 0 autograd takes g' = sigmoid'(0) = 1/4 (clamp passes the gradient at its bound, relu does
    not), as the hand backwards do (_g_backward, minimal.cpp): with -relu(-x) it took 0, and a layer's
    gradient changed with create_graph and between its scans."""
    return torch.clamp(x, max=0).sigmoid() + F.relu(x)


# F.softplus(x) returns x itself above its threshold (20), an absolute error of log1p(e^-x), up to
# e^-20 = 2.1e-9: below float32's rounding of x there, but in float64 it puts up to 2e-9 into
# d = softplus(-k_f) - softplus(-k_i) (a difference, so absolute errors count) whenever a gate's
# pre-activation is below -20: f' and i' off by 2e-9 relative, the output by ~1e-10 over a sequence,
# where minimal.cpp (which forms f' and i' from exponentials) is exact. From 37 up x + log1p(e^-x)
# rounds to x in float64 (e^-37 < ulp(37) / 2), so the threshold moves there; exp(37) stays finite.
# Every softplus of this module takes it.
_SOFTPLUS_THRESHOLD = {torch.float64: 37.0}


def _softplus(x: Tensor) -> Tensor:
    """softplus(x) = log(1 + e^x), exact to the dtype's rounding (see _SOFTPLUS_THRESHOLD)."""
    return F.softplus(x, threshold=_SOFTPLUS_THRESHOLD.get(x.dtype, 20.0))


def log_g(x: Tensor) -> Tensor:
    """log g(x), computed without forming g(x) for x < 0; at x = 0 the sigmoid side (g'/g = 1/2, as g)."""
    return torch.where(x > 0, torch.log(F.relu(x) + 0.5), -_softplus(-x))


def _g_fast(x: Tensor) -> Tensor:
    """g(x) in three in-place-friendly ops, for the blocked scan (no autograd)."""
    return torch.clamp(x, max=0).sigmoid_().add_(torch.relu(x))


def _g_backward(dg: Tensor, gt: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """out = dL/dx from dg = dL/dg, gt = g(x) and x (or max(x, 0)): g' = 1 for x > 0, sigmoid'(x) =
    g (1 - g) for x < 0.
    As arithmetic (torch.where is branchy and slow on CPU): with s = min(g, 1/2) = sigmoid(min(x, 0)),
    g' = s (1 - s) + 3/4 [x > 0]."""
    torch.ops.aten.sigmoid_backward.grad_input(dg, gt.clamp(max=0.5), grad_input=out)
    return out.add_(torch.ops.aten.threshold_backward(dg, x, 0), alpha=0.75)


class MinGRUCell:
    """xi = [k_z, k_h] (.., 2H):  a = 1 - z,  b = z h~,  z = sigmoid(k_z),  h~ = g(k_h).

    Hand backward (for `parallel.blocked_scan`), from db = dL/db and da = dL/da:
        dz = db h~ - da,   dk_z = dz z (1 - z),   dh~ = db z,   dk_h = dh~ g'(k_h)
    """
    name = "mingru"
    num_gates = 2
    num_states = 1
    shared_preactivation = True

    def coefficients(self, xi: Tensor):
        k_z, k_h = xi.chunk(2, -1)
        z = torch.sigmoid(k_z)
        return 1 - z, z * g(k_h)

    def log_coefficients(self, xi: Tensor):
        k_z, k_h = xi.chunk(2, -1)
        return -_softplus(k_z), log_g(k_h) - _softplus(-k_z)

    def gates(self, xi: Tensor) -> Tensor:
        k_z, k_h = xi.chunk(2, -1)
        return torch.cat((torch.sigmoid(k_z), g(k_h)), -1)               # (.., 2H) z, h~

    def step(self, xi, gh, state, params=()):
        a, b = self.coefficients(xi)
        return (torch.addcmul(b, a, state[0]),), None                    # (B, H)

    def forward_block(self, P: Tensor):
        """In place on P: one sigmoid_ over [k_z | min(k_h, 0)] gives z and g's lower branch."""
        H = P.shape[-1] // 2
        r = torch.relu(P[..., H:])                                        # (Tc, B, H) max(k_h, 0)
        P[..., H:].clamp_(max=0)
        P.sigmoid_()
        z, gt = P[..., :H], P[..., H:].add_(r)                            # g = sigmoid(min) + max
        return torch.rsub(z, 1), z * gt, (z, gt, r)

    def backward_block(self, db: Tensor, da: Tensor, saved) -> Tensor:
        z, gt, k_h = saved                                                # k_h: max(k_h, 0), same sign
        H = z.shape[-1]
        dP = db.new_empty(*db.shape[:-1], 2 * H)                          # (Tc, B, 2H)
        dz = torch.mul(db, gt).sub_(da)
        torch.ops.aten.sigmoid_backward.grad_input(dz, z, grad_input=dP[..., :H])
        _g_backward(db * z, gt, k_h, dP[..., H:])
        return dP


class MinLSTMCell(MinGRUCell):
    """xi = [k_f, k_i, k_h] (.., 3H):  a = f' = sigmoid(-d),  b = i' h~ = sigmoid(d) g(k_h),
    with d = log(i / f) = softplus(-k_f) - softplus(-k_i).

    Hand backward, from db and da:  dd = f' i' (db h~ - da),  dk_f = -dd sigmoid(-k_f),
    dk_i = dd sigmoid(-k_i),  dh~ = db i',  dk_h = dh~ g'(k_h).
    """
    name = "minlstm"
    num_gates = 3

    @staticmethod
    def _d(k_f, k_i):
        return _softplus(-k_f) - _softplus(-k_i)                           # log(i / f)

    def coefficients(self, xi: Tensor):
        k_f, k_i, k_h = xi.chunk(3, -1)
        d = self._d(k_f, k_i)
        return torch.sigmoid(-d), torch.sigmoid(d) * g(k_h)

    def log_coefficients(self, xi: Tensor):
        k_f, k_i, k_h = xi.chunk(3, -1)
        d = self._d(k_f, k_i)
        return -_softplus(d), log_g(k_h) - _softplus(-d)

    def gates(self, xi: Tensor) -> Tensor:
        k_f, k_i, k_h = xi.chunk(3, -1)
        d = self._d(k_f, k_i)
        return torch.cat((torch.sigmoid(-d), torch.sigmoid(d), g(k_h)), -1)   # (.., 3H) f', i', h~

    def forward_block(self, P: Tensor):
        k_f, k_i, k_h = P.chunk(3, -1)                                    # (Tc, B, H) each
        a = torch.sigmoid(self._d(k_i, k_f))                              # f' = sigmoid(-d)
        gt = _g_fast(k_h)
        return a, torch.rsub(a, 1).mul_(gt), (P, a, gt)

    def backward_block(self, db: Tensor, da: Tensor, saved) -> Tensor:
        P, a, gt = saved
        k_f, k_i, k_h = P.chunk(3, -1)
        H = a.shape[-1]
        dP = db.new_empty(*db.shape[:-1], 3 * H)                          # (Tc, B, 3H)
        dd = torch.ops.aten.sigmoid_backward(torch.mul(db, gt).sub_(da), a)   # (db h~ - da) f' i'
        torch.mul(dd, torch.sigmoid(-k_f), out=dP[..., :H]).neg_()
        torch.mul(dd, torch.sigmoid(-k_i), out=dP[..., H:2 * H])
        _g_backward(db * torch.rsub(a, 1), gt, k_h, dP[..., 2 * H:])
        return dP


FUSED_KINDS.update({MinGRUCell: 0, MinLSTMCell: 1})      # rnnkit/_fused/minimal.cpp's MinKind


class _MinRecurrent(nn.Module):
    """Stacked, optionally bidirectional layers of a min cell, with rk.GRU's forward API."""

    def __getstate__(self):
        return untraced(super().__getstate__())

    def __init__(self, cell, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, scan: str = "auto"):
        super().__init__()
        name = type(self).__name__
        for arg, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
        if scan not in SCANS:
            raise ValueError(f"{name}: scan must be one of {SCANS}, got {scan!r}")
        self._cell, self.scan = cell, scan
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional = bool(bidirectional)
        self._trace_sink = None
        kw = dict(device=device, dtype=dtype)
        D, GH = self._directions(), cell.num_gates * hidden_size
        for layer in range(num_layers):
            I = input_size if layer == 0 else D * hidden_size
            for d in range(D):
                sfx = self._suffix(layer, d)
                self.register_parameter("weight_ih" + sfx, nn.Parameter(torch.empty(GH, I, **kw)))
                if self.bias:
                    self.register_parameter("bias_ih" + sfx, nn.Parameter(torch.empty(GH, **kw)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.parameters():
            uniform_init_(p, self.hidden_size)                           # U(-1/sqrt(H), 1/sqrt(H))

    _directions = _Recurrent._directions
    _suffix = staticmethod(param_suffix)

    def flatten_parameters(self) -> None:
        """Nothing to do (the weights are used as they are): here for code written for torch.nn's layers,
        which calls it (after DataParallel's replicas, before a packed forward)."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for n, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, n) != default:
                s += f", {n}={getattr(self, n)}"
        return s + ("" if self.scan == "auto" else f", scan={self.scan!r}")

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, input, hx=None, lengths=None, *, padding: str = "right"):
        """input (T, B, I) or (B, T, I) with batch_first, or (T, I) unbatched; hx (L*D, B, H) or None;
        lengths (B,) in [1, T]: padded steps (at the end, or at the start with padding="left") keep the
        state (a = 1, b = 0) and output 0. Returns out (T, B, D*H) and h_n (L*D, B, H), as rk.GRU. No
        `truncate`: the scan runs over the whole sequence at once."""
        if isinstance(input, PackedSequence):
            alone_with_packed(type(self).__name__, lengths, padding)
            padded, lens = pad_packed_sequence(input, batch_first=self.batch_first)
            out, h_n = self.forward(padded, hx, lens)
            return repack_like(out, lens, input, self.batch_first), h_n
        if padding not in PADDING:
            raise ValueError(f"{type(self).__name__}: padding must be 'right' or 'left', got {padding!r}")
        input, hx, amp = autocast_input(self, input, hx)
        with amp:
            return self._forward(input, hx, lengths, padding)

    def _forward(self, input, hx, lengths, padding):
        x, hx, lengths, unbatched = self._check(input, hx, lengths)
        if self.batch_first:
            x = x.transpose(0, 1)                                        # (T, B, I)
        x, mask = padded_input(x, lengths, padding)
        sink = self._trace_sink.new_call() if self._trace_sink is not None else None
        D, finals = self._directions(), []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                slot = None if sink is None else sink.slot(k)
                out, h_n = self._direction(x, hx[k], mask, self._suffix(layer, d), d == 1, slot)
                outs.append(out)
                finals.append(h_n)
            x = outs[0] if D == 1 else torch.cat(outs, 2)                # (T, B, D*H)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        out, h_n = (x.transpose(0, 1) if self.batch_first else x), torch.stack(finals)
        if unbatched:
            return out.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return out, h_n

    def _direction(self, x, h0, mask, sfx: str, reverse: bool, slot: TraceSlot | None):
        """One layer in one direction: x (T, B, I), h0 (B, H), mask (T, B, 1) or None.
        Returns out (T, B, H) in time order, zero on padded steps, and the final state (B, H)."""
        weight, bias = getattr(self, "weight_ih" + sfx), getattr(self, "bias_ih" + sfx, None)
        scan = self.scan if self.scan != "auto" else ("log" if x.is_cuda else "blocked")
        if slot is not None:
            _record_forward(slot, self._cell, F.linear(x.detach(), weight.detach(),
                                                       None if bias is None else bias.detach()))
        if scan == "blocked":
            gn = None if slot is None else slot.grad_norm
            h = blocked_scan(self._cell, x, weight, bias, h0, mask, reverse, grad_norm=gn)  # (T, B, H)
            h_n = h[0] if reverse else h[-1]
        else:
            h, h_n = self._log_direction(F.linear(x, weight, bias), h0, mask, reverse, slot)
        if slot is not None:
            slot.hidden = h.detach()
        return (h if mask is None else h * mask), h_n

    def _log_direction(self, pre, h0, mask, reverse: bool, slot):
        """Heinsen's log-space scan over the whole sequence (reversed: the flipped sequence)."""
        m = mask
        if reverse:                                       # padding then comes first: keeps h0
            pre, m = pre.flip(0), (None if mask is None else mask.flip(0))
        log_a, log_b = self._cell.log_coefficients(pre)                  # (T, B, H) each
        if m is not None:                                                # padded: a = 1, b = 0
            log_a = log_a * m
            log_b = log_b.masked_fill(m == 0, torch.finfo(pre.dtype).min / 2)
        h = log_scan(log_a, log_b, h0)                                   # (T, B, H) processing order
        if slot is not None and h.requires_grad:
            _hook_grad_norm(h, log_a.detach().exp(), slot.grad_norm, reverse)
        return (h.flip(0) if reverse else h), h[-1]

    def step(self, x_t, state=None):
        """One time step for streaming, sequentially (see rnnkit.stream.step): (y_t, h)."""
        from .stream import step  # stream imports this module
        return step(self, x_t, state)

    # -- validation at the boundary -------------------------------------------------------------------
    def _check(self, input, hx, lengths):
        name = type(self).__name__
        check_input(self, input)
        unbatched = input.dim() == 2
        x = input.unsqueeze(0 if self.batch_first else 1) if unbatched else input
        T, B = (x.shape[1], x.shape[0]) if self.batch_first else (x.shape[0], x.shape[1])
        LD, H = self.num_layers * self._directions(), self.hidden_size
        if hx is None:
            hx = x.new_zeros(LD, B, H)
        else:
            hx = check_state(name, hx, 1, (LD, H) if unbatched else (LD, B, H), x.dtype)[0]
            hx = hx.unsqueeze(1) if unbatched else hx
        if lengths is not None:
            lengths = check_lengths(name, lengths, B, T)
        return x, hx, lengths, unbatched


def _record_forward(slot: TraceSlot, cell, pre) -> None:
    """Gates (time order) and an empty grad_norm that backward fills."""
    with torch.no_grad():
        slot.gates = cell.gates(pre)                                     # (T, B, G*H)
    slot.cell = None
    slot.grad_norm = torch.full(pre.shape[:2], float("nan"), dtype=pre.dtype, device=pre.device)


def _hook_grad_norm(h, a, grad_norm, reverse: bool) -> None:
    """For the log scan: on backward, turn the gradient reaching h directly into the total one."""
    def record(d):                                                       # d (T, B, H), processing order
        norms = trace_norm(reverse_total(a, d), 2)                      # (T, B)
        grad_norm.copy_(norms.flip(0) if reverse else norms)

    h.register_hook(record)


class MinGRU(_MinRecurrent):
    """minGRU (Feng et al. 2024). Arguments and forward as rk.GRU: out, h_n = layer(x, hx, lengths,
    padding=...) (not `truncate`: the scan is over the whole sequence).
    scan: "blocked" (`parallel.blocked_scan`, the fast path on CPU), "log" (Heinsen's log-space scan,
    the paper's form, for GPUs) or "auto" (log on CUDA, blocked elsewhere). Both differentiate to any
    order (create_graph=True: gradient penalties), also where the gradient reaching some h_t is exactly
    zero (a loss on the last step, padding), where torch's own logcumsumexp double backward gives NaN
    (logcumsumexp.LogCumSumExp)."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, *, scan="auto"):
        super().__init__(MinGRUCell(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device, dtype, scan=scan)


class MinLSTM(_MinRecurrent):
    """minLSTM (Feng et al. 2024). Arguments and forward as MinGRU: out, h_n = layer(x, hx, lengths,
    padding=...) (no separate cell state: h_n only). scan: "auto", "blocked" or "log", as MinGRU."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, *, scan="auto"):
        super().__init__(MinLSTMCell(), input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device, dtype, scan=scan)
