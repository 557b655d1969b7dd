"""The engine: one cell scanned over time, with backpropagation through time as one autograd Function.

Shapes: T time, B batch, H hidden size, G the cell's number of gate blocks. (A projected LSTM's h has
P < H units, its c H: U is then (G*H, P); its cell takes W_hr as a param, so this loop is unchanged.)

Forward, for t in time order (or reversed):
    gh_t   = U (h_{t-1} * r) + b_hh            r: variational recurrent-dropout mask, or 1
    s~_t   = cell.step(xi_t, gh_t, s_{t-1})    s = (h,) or (h, c); xi = V x + b_ih comes in hoisted
    s_t    = s~_t + z_t * (s_{t-1} - s~_t)     zoneout: z_t the share of the old state kept, or 0
    s_t    = s_{t-1} + m_t * (s_t - s_{t-1})   m_t = 1 on real steps, 0 on padding (state is kept)
    out_t  = m_t * h_t                         padded steps output zeros

Backward runs the same lines in reverse, each line's gradient written under it. The gradient that
reaches h_t (through out_t and through s_{t+1}) is what the trace records as ||dL/dh_t||. The
weight gradients are formed after the loop as one product over all steps:
    dU = sum_t dgh_t^T (h_{t-1} * r),   db_hh = sum_t dgh_t,   and d xi_t is returned to autograd,
which forms dV = sum_t dxi_t^T x_t the same way. Truncated BPTT with k: the gradient carried from
step i to step i-1 (in processing order) is cut whenever i is a multiple of k, as if the state were
detached every k steps (with padding, every k of each row's own steps: `truncation_cuts`); the forward
is unchanged. k >= T is full BPTT.

Gradients of gradients (create_graph=True) go through `unrolled`, the same loop in autograd ops
(numerics.hand_backward), and so does everything under torch.func or forward-mode AD (`_scan`);
under torch.compile the scan is one eager call (`numerics.opaque_to_compile`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from . import _fused
from .cells.base import check_step, derived_backward, has_hand_backward
from .numerics import hand_backward, opaque_to_compile, trace_norm, under_torch_func


@dataclass
class TraceSlot:
    """What the engine records for one layer and direction. Filled by forward, then by backward."""
    hidden: Tensor | None = None        # (T, B, H) every h_t
    cell: Tensor | None = None          # (T, B, H) every c_t (LSTM)
    gates: Tensor | None = None         # (T, B, G*H) gate activations
    grad_norm: Tensor | None = None     # (T, B) ||dL/dh_t||, NaN until backward has run


@dataclass
class ScanOptions:
    """Everything about one scan that is not a differentiable tensor."""
    cell: object
    reverse: bool = False
    mask: Tensor | None = None          # (T, B, 1) float, 1 on real steps
    truncate: int | None = None         # truncated BPTT length k
    rec_mask: Tensor | None = None      # (B, H) recurrent dropout mask, already scaled by 1/(1-p)
    zone: tuple | None = None           # per state: (T or 1, B or 1, H or 1) share of old state kept
    trace: TraceSlot | None = field(default=None)
    keep: bool = True                   # keep what a backward needs: set by scan() from the grad mode

    def keeps(self, needs_input_grad) -> bool:
        """Whether a scan's Function keeps what its backward (or the trace) needs."""
        return (self.keep and any(needs_input_grad)) or self.trace is not None


def _recorded(opts: ScanOptions) -> ScanOptions:
    """opts, with keep = whether an autograd graph is recorded (off under torch.no_grad, inference_mode).
    A Function's ctx.needs_input_grad still reads True there for inputs that require grad (a model's
    weights), so without this an inference pass kept a training step's buffers: LSTM B=64 T=100 H=256
    peaked at 70 MB under no_grad, 39 MB with frozen weights. Not the caller's to turn off: a graph
    recorded without them could not run its backward."""
    grad = torch.is_grad_enabled()
    return opts if opts.keep == grad else replace(opts, keep=grad)


@opaque_to_compile
def scan(opts: ScanOptions, xi: Tensor, state0: tuple, weight_hh: Tensor, bias_hh: Tensor | None,
         params: tuple = ()):
    """Run `opts.cell` over xi (T, B, G*H) from state0. Returns (out (T, B, H), final state tuple).

    The built-in cells on CPU run the same loop compiled (`rnnkit/_fused`, held equal to this file by
    tests/test_fused.py); everything else, and any machine where it did not build, runs `_Scan`.
    """
    plain = under_torch_func(xi, weight_hh, bias_hh, *state0, *params, traced=opts.trace is not None)
    return _scan(_recorded(opts), xi, state0, weight_hh, bias_hh, params, plain)


@opaque_to_compile
def project_scan(opts: ScanOptions, x: Tensor, weight_ih: Tensor, bias_ih: Tensor | None, state0: tuple,
                 weight_hh: Tensor, bias_hh: Tensor | None, params: tuple = ()):
    """scan(opts, F.linear(x, weight_ih, bias_ih), ...): what a layer runs, x (T, B, I). On the fused
    path the projection is part of the scan's node (its bias added and its gradient summed per row in the
    loop); elsewhere it is the projection, then `scan`."""
    plain = under_torch_func(x, weight_ih, bias_ih, weight_hh, bias_hh, *state0, *params,
                             traced=opts.trace is not None)
    opts = _recorded(opts)
    if not plain and _fused.supports_projected(opts, x, weight_ih, bias_ih, state0, weight_hh, bias_hh, params):
        return _fused.scan_projected(opts, x, weight_ih, bias_ih, state0, weight_hh, bias_hh, params)
    xi = torch.nn.functional.linear(x, weight_ih, bias_ih)
    return _scan(opts, xi, state0, weight_hh, bias_hh, params, plain)


def _scan(opts, xi, state0, weight_hh, bias_hh, params, plain: bool):
    """plain: under torch.func or forward-mode AD (numerics.under_torch_func), the loop in autograd ops."""
    if not plain and _fused.supports(opts, xi, state0, weight_hh, bias_hh, params):
        return _fused.scan(opts, xi, state0, weight_hh, bias_hh, params)
    return pure_scan(opts, xi, state0, weight_hh, bias_hh, params, autograd=plain)


def pure_scan(opts: ScanOptions, xi: Tensor, state0: tuple, weight_hh: Tensor, bias_hh: Tensor | None,
              params: tuple = (), autograd: bool = False):
    """`scan` on the pure-torch path, whatever the machine: the reference the fused kernel is held to.
    autograd=True: the loop as plain autograd ops (`unrolled`)."""
    prepare = getattr(opts.cell, "prepare_input", None)     # work a cell does on all steps at once
    if prepare is not None:
        xi, params = prepare(xi, tuple(params))
    if autograd:
        res = unrolled(opts, xi, state0, weight_hh, bias_hh, params)
    else:
        res = _Scan.apply(opts, len(state0), xi, weight_hh, bias_hh, *state0, *params)
    return res[0], tuple(res[1:])


def processing_order(T: int, reverse: bool) -> range:
    """Time steps in the order a scan runs them: T-1 down to 0 when reverse."""
    return range(T - 1, -1, -1) if reverse else range(T)


def _at(z: Tensor, t: int) -> Tensor:
    return z[t] if z.shape[0] != 1 else z[0]


def truncation_cuts(opts: ScanOptions) -> tuple[int | None, Tensor | None]:
    """Where truncated BPTT detaches the state, as (every, rows); (None, None): no truncation. Without a
    mask every = k: before every k-th step in processing order (not the first). With a mask, rows
    (T, B, 1) in time order, 1 before each row's k-th, 2k-th ... real step: a row's own steps are
    counted, so padding neither cuts its gradient (a cut inside right padding would stop all of h_n's)
    nor shifts the cuts (left padding, the reverse direction): a sequence gets the gradient it gets alone."""
    k, mask = opts.truncate, opts.mask
    if k is None or mask is None:
        return k, None
    real = (mask != 0).flip(0) if opts.reverse else mask != 0          # processing order
    own = torch.cumsum(real, 0) - real.long()                          # real steps before this one
    cut = real & (own > 0) & (own % k == 0)
    return None, (cut.flip(0) if opts.reverse else cut).to(mask.dtype)


def unrolled(opts: ScanOptions, xi: Tensor, state0: tuple, weight_hh: Tensor, bias_hh: Tensor | None,
             params: tuple = ()):
    """The scan in plain autograd ops, step by step, truncation as a detached state: (out, *final state).
    What a create_graph=True backward differentiates (numerics.hand_backward); xi and params as `_Scan`
    takes them (after the cell's `prepare_input`)."""
    seqs, state, _ = _unroll(opts, xi, weight_hh, bias_hh, tuple(state0), tuple(params), False,
                             has_hand_backward(opts.cell), truncation_cuts(opts))
    return (seqs[0] if opts.mask is None else seqs[0] * opts.mask, *state)


def _unroll(opts: ScanOptions, xi, weight_hh, bias_hh, state: tuple, params: tuple, keep: bool, hand: bool,
            cuts: tuple = (None, None)):
    """The forward loop: (seqs, final state, saved steps), seqs[j] (T, B, H) state component j after
    each step. cuts (truncation_cuts): where to detach the state."""
    cell, mask, zone, rec = opts.cell, opts.mask, opts.zone, opts.rec_mask
    T, n = xi.shape[0], len(state)
    Ut = weight_hh.t().contiguous()                           # (H, G*H) once, not per step
    fused = hand and cell.shared_preactivation                # the cell only uses xi + gh:
    if fused and bias_hh is not None:                         # fold b_hh into the hoisted product
        xi = xi + bias_hh                                     # (T, B, G*H)
    seq = [[None] * T for _ in range(n)]                       # seq[j][t] = state component j after t
    saved = [None] * T
    every, rows = cuts
    for i, t in enumerate(processing_order(T, opts.reverse)):
        if every and i > 0 and i % every == 0:
            state = tuple(s.detach() for s in state)
        elif rows is not None:                                 # the same values; no gradient on cut rows
            state = tuple(torch.addcmul(s, rows[t], s.detach() - s) for s in state)
        hr = state[0] if rec is None else state[0] * rec
        if fused:                                              # pre-activation in one product
            res = cell.step(torch.addmm(xi[t], hr, Ut), None, state, params)
        else:
            gh = hr @ Ut if bias_hh is None else torch.addmm(bias_hh, hr, Ut)   # (B, G*H)
            res = cell.step(xi[t], gh, state, params)
        if i == 0:
            check_step(cell, res, state)
        new, sv = res
        if zone is not None:
            new = tuple(s_ + _at(z, t) * (p - s_) for s_, p, z in zip(new, state, zone))
        if mask is not None:
            new = tuple(p + mask[t] * (s_ - p) for s_, p in zip(new, state))
        if keep:
            saved[t] = sv if hand else (xi[t], gh, state)
        for j in range(n):
            seq[j][t] = new[j]
        state = new
    return [torch.stack(s) for s in seq], state, saved


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, opts: ScanOptions, n: int, xi, weight_hh, bias_hh, *rest):
        state, params = tuple(rest[:n]), tuple(rest[n:])
        keep = opts.keeps(ctx.needs_input_grad)
        hand = has_hand_backward(opts.cell)
        seqs, state, saved = _unroll(opts, xi, weight_hh, bias_hh, state, params, keep, hand)
        out = seqs[0] if opts.mask is None else seqs[0] * opts.mask
        if opts.trace is not None:
            _record_forward(opts.trace, opts.cell, seqs, saved, hand)
        if keep:
            ctx.opts, ctx.n, ctx.hand, ctx.saved_steps = opts, n, hand, saved
            ctx.save_for_backward(xi, weight_hh, bias_hh, *rest, *seqs)   # xi: for create_graph's replay
        return (out, *state)

    @staticmethod
    def _replay(ctx):
        xi, weight_hh, bias_hh, *tensors = ctx.saved_tensors
        rest = tensors[:-ctx.n]
        args = (ctx.opts, ctx.n, xi, weight_hh, bias_hh, *rest)
        return unrolled(ctx.opts, xi, rest[:ctx.n], weight_hh, bias_hh, rest[ctx.n:]), args

    @staticmethod
    @hand_backward(lambda ctx: _Scan._replay(ctx), records=lambda ctx: ctx.opts.trace is not None)
    def backward(ctx, d_out, *d_final):
        return _Scan._backward(ctx, d_out, *d_final)

    @staticmethod
    def _backward(ctx, d_out, *d_final):
        opts, n, hand = ctx.opts, ctx.n, ctx.hand
        cell, mask, zone, rec = opts.cell, opts.mask, opts.zone, opts.rec_mask
        every, rows = truncation_cuts(opts)
        xi, weight_hh, bias_hh, *tensors = ctx.saved_tensors
        state0, params, seqs = tensors[:n], tuple(tensors[n:-n]), tensors[-n:]
        T, H = xi.shape[0], weight_hh.shape[1]
        gn = opts.trace.grad_norm if opts.trace is not None else None
        if d_out is not None and mask is not None:
            d_out = d_out * mask
        d_state = [d if d is not None else None for d in d_final]
        dxi, dgh = [None] * T, [None] * T
        d_params = [torch.zeros_like(p) for p in params]
        order = list(processing_order(T, opts.reverse))
        for i in range(T - 1, -1, -1):
            t = order[i]
            dh = d_state[0]
            if d_out is not None:
                dh = d_out[t] if dh is None else dh + d_out[t]
            if dh is None:
                dh = torch.zeros_like(seqs[0][0])
            if gn is not None:
                gn[t] = trace_norm(dh, 1)
            d_new = [dh, *d_state[1:]]
            d_pass = [None] * n                                # gradient reaching s_{t-1} around the cell
            if mask is not None:
                m = mask[t]
                d_pass = [None if d is None else d - d * m for d in d_new]
                d_new = [None if d is None else d * m for d in d_new]
            if zone is not None:
                zs = [_at(z, t) for z in zone]
                d_pass = [_add(dp, None if d is None else d * z) for dp, d, z in zip(d_pass, d_new, zs)]
                d_new = [None if d is None else d - d * z for d, z in zip(d_new, zs)]
            if hand:
                d_xi, d_gh, d_direct, d_p = cell.step_backward(tuple(d_new), ctx.saved_steps[t], params)
            else:
                d_xi, d_gh, d_direct, d_p = derived_backward(cell, tuple(d_new), ctx.saved_steps[t], params)
            dxi[t], dgh[t] = d_xi, d_gh
            for acc, g in zip(d_params, d_p):
                acc += g
            rest = [_add(d_direct[j], d_pass[j]) for j in range(n)]
            if rec is None and rest[0] is not None:
                rest[0] = torch.addmm(rest[0], d_gh, weight_hh)   # (B, H) through U, added in place
            else:
                d_hr = d_gh @ weight_hh
                rest[0] = _add(rest[0], d_hr if rec is None else d_hr * rec)
            d_state = rest
            if every and i % every == 0 and i > 0:
                d_state = [None] * n                           # truncation: the state was "detached" here
            elif rows is not None:                             # per row (padding): its own k-th steps
                d_state = [None if d is None else d - d * rows[t] for d in d_state]
        d_xi_all = torch.stack(dxi)                            # (T, B, G*H)
        d_gh_all = d_xi_all if cell.shared_preactivation else torch.stack(dgh)
        h_prev = _previous_h(seqs[0], state0[0], opts.reverse)   # (T, B, H)
        if rec is not None:
            h_prev = h_prev * rec
        g2 = d_gh_all.reshape(-1, d_gh_all.shape[-1])
        d_U = g2.t() @ h_prev.reshape(-1, H) if ctx.needs_input_grad[3] else None
        d_b = g2.sum(0) if bias_hh is not None and ctx.needs_input_grad[4] else None
        d_s0 = [torch.zeros_like(s) if d is None else d for d, s in zip(d_state, state0)]
        return (None, None, d_xi_all, d_U, d_b, *d_s0, *d_params)


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _previous_h(hs: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """h_{t-1} as seen by step t: the state before it in processing order."""
    if reverse:
        return torch.cat((hs[1:], h0.unsqueeze(0)), 0)
    return torch.cat((h0.unsqueeze(0), hs[:-1]), 0)


def _record_forward(slot: TraceSlot, cell, seqs, saved, hand: bool) -> None:
    slot.hidden = seqs[0].detach()
    slot.cell = seqs[1].detach() if len(seqs) > 1 else None
    gates = getattr(cell, "gates", None)
    if hand and callable(gates) and saved[0] is not None:
        g = [gates(s) for s in saved]
        slot.gates = None if g[0] is None else torch.stack(g).detach()
    slot.grad_norm = torch.full(seqs[0].shape[:2], float("nan"), dtype=seqs[0].dtype,
                                device=seqs[0].device)
