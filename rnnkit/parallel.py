"""The first-order linear recurrence over time, for cells whose gates see only x_t (minGRU, minLSTM).

    h_t = a_t * h_{t-1} + b_t          elementwise; a_t in (0, 1]; a_t, b_t functions of x_t only

Because a_t and b_t depend on x_t alone, they are known for every step before the recurrence runs.
Unrolled, h_t = A_t h_0 + sum_{s<=t} (A_t / A_s) b_s with A_t = a_1 ... a_t, and the gradient is the
same recurrence run backwards (the adjoint): with d_t = dL/dh_t the gradient reaching h_t directly
(from the output at t, or from h_T),

    g_t = d_t + a_{t+1} g_{t+1},   g_T = d_T            g_t: the total gradient reaching h_t
    dL/db_t = g_t,   dL/da_t = g_t h_{t-1},   dL/dh_0 = a_1 g_1

Two evaluations (tests/test_minimal.py checks both by gradcheck against a plain loop of the cell):

`log_scan`      Heinsen (2023): parallel over time, in log space, pure torch ops, autograd backward
                    a*_t = cumsum(log a)_t,   h_t = exp(a*_t + logcumsumexp(log b - a*)_t) + exp(a*_t) h_0
                Needs b_t > 0 (hence the paper's positive g); h_0 may have any sign (added outside the
                log). The paper's form, for GPUs. Its rounding error grows with |a*_t| (a* and the
                logcumsumexp cancel), so it runs in chunks of LOG_CHUNK steps (all at once), carrying
                the state from chunk to chunk in linear space (T / LOG_CHUNK small steps), in at least
                float32. In one piece it measured, MinGRU T = 4096: float32 output error 1.6e-4 and
                weight-gradient 5e-3 (relative), float16 and bfloat16 wrong outright (4.6, 4.3);
                in chunks 2.6e-6, 2.2e-7, and half precision at the blocked scan's level. torch's CPU
                logcumsumexp is slow: see docs/benchmarks.md.
`blocked_scan`  for CPUs, where that is measured to be slow: linear space (as exact as the loop), one
                autograd Function whose backward is hand-written and mirrors the forward. Time is cut
                into blocks of a few dozen steps; per block it projects the input (one addmm), asks the
                cell for a_t, b_t (a handful of elementwise ops on the whole block), and runs the
                recurrence (one fused op per step, in place). Everything a block touches stays in
                cache and nothing of size T is allocated but h (and dx); the backward recomputes
                a block's gates rather than keeping them: fresh memory costs page faults (measured
                at several microseconds per 4 kB page here), more than the recomputation. (The
                fused path below keeps x W^T instead from an input size of KEEP_MIN_INPUT: its
                memory is pooled, and the recomputed product costs 2 I multiply-adds an element;
                measured MinLSTM T = 4096 B = 8 H = 256, I = 64/128/256: 35/48/78 ms kept against
                39/58/106 recomputed, I = 16: 26.7 against 25.0.) The
                adjoint g_t is formed anyway, so the trace's ||dL/dh_t|| costs one norm per block.
                For minGRU / minLSTM on CPU (float32/64) each block's gates, recurrence and adjoint
                run as one C++ pass instead (rnnkit/_fused/minimal.cpp: lanes (b, j) split over
                threads, vectorised over j), and h, dx and the blocks' dP come from the kernel's
                buffer pool (pool.h), so a step after the first faults in no fresh pages; the
                torch-op blocks stay as reference and fallback.
`unrolled`      the same recurrence in plain autograd ops, one step at a time: what gradients of
                gradients (create_graph=True) differentiate, and what runs under torch.func.

A cell used by `blocked_scan` provides, on one block of pre-activations P = x W^T + bias (Tc, B, G*H):
    forward_block(P) -> (a, b, saved)              a, b (Tc, B, H), no autograd
    backward_block(db, da, saved) -> dP            the hand-derived gradient w.r.t. P
Shapes: T time, Tc steps in a block, B batch, I input size, H hidden size, G gate blocks.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _fused
from .engine import processing_order
from .logcumsumexp import logcumsumexp_for
from .numerics import hand_backward, opaque_to_compile, trace_norm, under_torch_func

# Pre-activations per block (float32: 4 bytes each), measured best on the 2-core box at T = 4096:
BLOCK_ELEMENTS = 1 << 17          # torch ops: ~a dozen passes over the block, so it must stay in L2
FUSED_BLOCK_ELEMENTS = 1 << 19    # the C++ pass reads the block once: fewer, larger products pay more
LOG_CHUNK = 64                    # log_scan's chunk: float32 error grows with the chunk's |sum log a|
# log_scan's floor under log a, per working dtype: a_t below e^floor (a forgetting gate shut to within
# 4e-18 in float32) counts as e^floor, which changes h_t by at most e^floor |h_{t-1}|, under float32's
# rounding of h_t while |h_{t-1}| < 1.4e10 |h_t| (float64: e^-708, its smallest normal's order). Without
# it one huge pre-activation put a* out of reach of the logcumsumexp it must cancel: MinGRU with
# log a = -2.6e29 at one step gave h = 1.0 where the recurrence gives 3.6e29 and 0.67 after it, and
# log a = -inf (a = 0) gave NaN.
LOG_A_FLOOR = {torch.float32: -40.0, torch.float64: -708.0}
KEEP_MIN_INPUT = 64               # the fused path keeps P for the backward from this input size I up


def log_scan(log_a: Tensor, log_b: Tensor, h0: Tensor | None = None, chunk: int = LOG_CHUNK) -> Tensor:
    """h from log a_t <= 0 and log b_t (T, B, H), h0 (B, H) or None (zeros). Heinsen 2023, in chunks.

    Within each chunk of `chunk` steps the log-space formula from a zero start (all chunks at once;
    a shorter last chunk separately, as padding would put zero gradients into logcumsumexp; its
    double backward is logcumsumexp.LogCumSumExp's, finite there); the state entering chunk k is carried from chunk
    k-1 in linear space (T / chunk small steps) and adds exp(a*_t) * carry. The cancellation between
    a* and the logcumsumexp then spans one chunk, not the whole sequence, and log a is floored
    (LOG_A_FLOOR) so that no one step puts it out of reach. Computed in at least float32 (half and
    bfloat16 are cast up and back)."""
    T, work = log_a.shape[0], torch.promote_types(log_a.dtype, torch.float32)
    la, lb, full = log_a.to(work).clamp(min=LOG_A_FLOOR[work]), log_b.to(work), T - T % chunk
    pieces = [(la[:full].unflatten(0, (-1, chunk)), lb[:full].unflatten(0, (-1, chunk)))] if full else []
    if full < T:
        pieces.append((la[full:].unsqueeze(0), lb[full:].unsqueeze(0)))
    carry = la.new_zeros(la.shape[1:]) if h0 is None else h0.to(work)   # (B, H) entering chunk k
    lcse = logcumsumexp_for(la, lb, carry)
    h = []
    for a, b in pieces:                                               # (n, C, B, H) each
        a_star = torch.cumsum(a, 1)                                   # log A within a chunk
        part = torch.exp(a_star + lcse(b - a_star, 1))               # from a zero start
        A = torch.exp(a_star)
        starts = []
        for p_end, a_end in zip(part[:, -1].unbind(0), A[:, -1].unbind(0)):   # each chunk's last step
            starts.append(carry)
            carry = torch.addcmul(p_end, a_end, carry)
        h.append(torch.addcmul(part, A, torch.stack(starts).unsqueeze(1)).flatten(0, 1))
    return (h[0] if len(h) == 1 else torch.cat(h)).to(log_a.dtype)


def reverse_total(a: Tensor, d: Tensor) -> Tensor:
    """The adjoint g_t = d_t + a_{t+1} g_{t+1}, g_T = d_T, for a, d (T, B, H), without autograd."""
    with torch.no_grad():
        end = d.new_zeros(d.shape[1:])                                # nothing after the last step
        return _adjoint(a, d, end, end, reverse=False)


@opaque_to_compile
def blocked_scan(cell, x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor,
                 mask: Tensor | None = None, reverse: bool = False, block: int | None = None,
                 grad_norm: Tensor | None = None) -> Tensor:
    """h (T, B, H) of `cell` over x (T, B, I) with pre-activations x W^T + bias, from h0 (B, H).

    mask (T, B, 1): 1 on real steps; padded steps keep the state (a = 1, b = 0). reverse: run from
    t = T-1 down to 0 (h stays in time order). grad_norm (T, B): filled with ||g_t|| by backward.
    """
    if mask is not None:
        mask = mask.to(x.dtype).contiguous()
    if under_torch_func(x, weight, bias, h0, traced=grad_norm is not None):
        return unrolled(cell, x, weight, bias, h0, mask, reverse)
    T, B = x.shape[:2]
    kind = fused_kind(cell, x)                                        # None: the torch-op blocks
    per_block = BLOCK_ELEMENTS if kind is None else FUSED_BLOCK_ELEMENTS
    Tc = block or max(1, per_block // max(1, B * weight.shape[0]))
    spans = [(lo, min(lo + Tc, T)) for lo in range(0, T, Tc)]
    keep = (kind is not None and x.shape[-1] >= KEEP_MIN_INPUT and torch.is_grad_enabled() and
            any(t is not None and t.requires_grad for t in (x, weight, bias, h0)))   # x W^T for the backward
    opts = (cell, kind, mask, reverse, spans, grad_norm, keep)
    return _BlockedScan.apply(opts, x.contiguous(), weight, bias, h0)


def unrolled(cell, x: Tensor, weight: Tensor, bias: Tensor | None, h0: Tensor, mask: Tensor | None,
             reverse: bool) -> Tensor:
    """blocked_scan in plain autograd ops, one step at a time: what a create_graph=True backward
    differentiates (numerics.hand_backward), and what runs under torch.func."""
    a, b = cell.coefficients(torch.nn.functional.linear(x, weight, bias))   # (T, B, H) each
    if mask is not None:
        a, b = torch.addcmul(1 - mask, a, mask), b * mask
    h, prev = [None] * x.shape[0], h0
    for t in processing_order(x.shape[0], reverse):
        h[t] = prev = torch.addcmul(b[t], a[t], prev)
    return torch.stack(h)


def _project(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """P = x W^T + bias for one block: (Tc, B, I) -> (Tc, B, G*H), one matrix product."""
    x2 = x.reshape(-1, x.shape[-1])                                   # (Tc*B, I)
    P = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    return P.view(*x.shape[:2], weight.shape[0])


def _routed_project(x: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
    """x W^T for one block of the fused path (the kernel adds the bias), on the kernel's product route
    (oneDNN where it measured faster than torch's BLAS: 2x on AMD EPYCs; a weight whose rows are not
    contiguous takes at::mm, so the callers make it contiguous once per scan); written into `out`
    (Tc, B, G*H) when given."""
    x2 = x.reshape(-1, x.shape[-1])
    if out is not None:
        _fused.build().routed_addmm_(out.view(x2.shape[0], weight.shape[0]), x2, weight.t(), 0.0)
        return out
    return _fused.build().routed_linear(x2, weight).view(*x.shape[:2], weight.shape[0])


def _coefficients(cell, x, weight, bias, m):
    a, b, saved = cell.forward_block(_project(x, weight, bias))      # (Tc, B, H) each
    if m is not None:                                                 # padded: a = 1, b = 0
        a = torch.addcmul(1 - m, a, m)
        b.mul_(m)
    return a, b, saved


class _BlockedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, opts, x, weight, bias, h0):
        cell, kind, mask, reverse, spans, _, keep = opts
        h = _empty(kind, (*x.shape[:2], h0.shape[-1]), x)            # (T, B, H)
        prev = h0
        c = None if kind is None else _kernel_bias(weight, bias)
        w = weight.contiguous()
        kept = _empty(kind, (*x.shape[:2], w.shape[0]), x) if keep else None   # (T, B, G*H)
        for lo, hi in (reversed(spans) if reverse else spans):
            m = None if mask is None else mask[lo:hi]
            if kind is not None:                                      # bias, gates, recurrence in C++
                P = _routed_project(x[lo:hi], w, None if kept is None else kept[lo:hi])
                _fused.build().min_forward(kind, reverse, P, c, prev.contiguous(), m, h[lo:hi])
                prev = h[lo] if reverse else h[hi - 1]
                continue
            a, b, _ = _coefficients(cell, x[lo:hi], weight, bias, m)
            prev = _recur(a, b, prev, h[lo:hi], reverse)
        ctx.opts = opts
        ctx.save_for_backward(x, weight, bias, h0, h, kept)         # kept: seen by checkpointing and
        return h                                                      # saved-tensor hooks

    @staticmethod
    def _replay(ctx):
        cell, _, mask, reverse, _, _, _ = ctx.opts
        x, weight, bias, h0, _, _ = ctx.saved_tensors
        return (unrolled(cell, x, weight, bias, h0, mask, reverse),), (ctx.opts, x, weight, bias, h0)

    @staticmethod
    @hand_backward(lambda ctx: _BlockedScan._replay(ctx), records=lambda ctx: ctx.opts[5] is not None)
    def backward(ctx, dh):
        return _BlockedScan._backward(ctx, dh)

    @staticmethod
    def _backward(ctx, dh):
        cell, kind, mask, reverse, spans, grad_norm, _ = ctx.opts
        x, weight, bias, h0, h, kept = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        dx = _empty(kind, x.shape, x) if need_x else None
        dW = torch.zeros_like(weight)
        g_next, a_next = h0.new_zeros(h0.shape), h0.new_zeros(h0.shape)   # g, a of the step processed next
        db_rows = x.new_zeros(x.shape[1], weight.shape[0])            # (B, G*H) dP summed over time
        c = None if kind is None else _kernel_bias(weight, bias)
        ops, w = (None, weight) if kind is None else (_fused.build(), weight.contiguous())
        for lo, hi in (spans if reverse else reversed(spans)):
            m = None if mask is None else mask[lo:hi]
            x2 = x[lo:hi].reshape(-1, x.shape[-1])                    # (Tc*B, I)
            dx2 = dx[lo:hi].view(-1, x.shape[-1]) if need_x else None
            if kind is None:
                dP, g_next, a_next = _block_backward(cell, reverse, x, weight, bias, h, h0, m, dh,
                                                     lo, hi, g_next, a_next, grad_norm)
                db_rows += dP.sum(0)
                dP = dP.view(-1, weight.shape[0])                     # (Tc*B, G*H)
                dW.addmm_(dP.t(), x2)
                if need_x:
                    torch.mm(dP, weight, out=dx2)
            else:                             # carry and db_rows in place; products on the kernel's route
                P = _routed_project(x[lo:hi], w) if kept is None else kept[lo:hi]
                dP = _fused_block_backward(kind, reverse, P, c, h, h0, m, dh, lo, hi,
                                           g_next, a_next, db_rows, grad_norm).view(-1, weight.shape[0])
                ops.routed_addmm_(dW, dP.t(), x2, 1.0)
                if need_x:
                    ops.routed_addmm_(dx2, dP, weight, 0.0)
        db = None if bias is None else db_rows.sum(0)
        return None, dx, dW, db, a_next * g_next                      # dL/dh0 = a_1 g_1


def _block_backward(cell, reverse, x, weight, bias, h, h0, m, dh, lo, hi, g_next, a_next, grad_norm):
    """dP of the block lo..hi in torch ops; returns it with the new carry (g, a of its first step)."""
    a, _, saved = _coefficients(cell, x[lo:hi], weight, bias, m)      # recomputed, not kept
    g = _adjoint(a, dh[lo:hi], g_next, a_next, reverse)               # (Tc, B, H) total dL/dh_t
    if grad_norm is not None:
        grad_norm[lo:hi] = trace_norm(g, 2)
    da = _times_previous(g, h, h0, lo, hi, reverse)                   # dL/da_t = g_t h_{t-1}
    db_ = g                                                           # dL/db_t = g_t
    if m is not None:
        da.mul_(m)
        db_ = g * m
    first = hi - 1 if reverse else lo                                 # first step in processing order
    return cell.backward_block(db_, da, saved), g[first - lo], a[first - lo]


def _fused_block_backward(kind, reverse, P, c, h, h0, m, dh, lo, hi, g_carry, a_carry,
                          db_rows, grad_norm):
    """The same in one C++ pass (rnnkit/_fused/minimal.cpp) from the block's x W^T, P (Tc, B, G*H);
    updates the carry and the per-row sums of dP (db_rows, (B, G*H)) in place. c: the bias the kernel
    adds to P. dh may have any strides (it is read as it is)."""
    start = hi == h.shape[0] if reverse else lo == 0                  # the block holds the first step
    before = h0 if start else (h[hi] if reverse else h[lo - 1])       # state before its first step
    dP = _empty(kind, P.shape, P)
    g = torch.empty_like(h[lo:hi]) if grad_norm is not None else None
    _fused.build().min_backward(kind, reverse, P, c, h[lo:hi], before.contiguous(), m, dh[lo:hi],
                                g_carry, a_carry, dP, db_rows, g)
    if grad_norm is not None:
        grad_norm[lo:hi] = trace_norm(g, 2)
    return dP


def _empty(kind: int | None, shape, like: Tensor) -> Tensor:
    """An uninitialised tensor of `like`'s dtype; on the kernel's path from its buffer pool (pool.h):
    h alone is T*B*H floats, and fresh memory is faulted in page by page on first touch (measured
    8.2k faults, ~6 ms of a 38 ms MinLSTM step at T = 4096, B = 8, H = 256)."""
    if kind is None:
        return like.new_empty(shape)
    return _fused.build().pooled_empty(list(shape), like.dtype)


def _kernel_bias(weight: Tensor, bias: Tensor | None) -> Tensor:
    """The bias as the kernel adds it to x W^T (zeros without one), detached and contiguous."""
    if bias is None:
        return weight.new_zeros(weight.shape[0])
    return bias.detach().contiguous()


# Cells whose block math rnnkit/_fused/minimal.cpp runs: exact type -> kernel code (filled in by
# minimal.py; a subclass may change the math, so it takes the torch path).
FUSED_KINDS: dict[type, int] = {}


def fused_kind(cell, x: Tensor) -> int | None:
    """The kernel code for this cell and input, or None for the torch-op path."""
    kind = FUSED_KINDS.get(type(cell))
    if kind is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    return kind if _fused.available() else None


def _recur(a, b, prev, out, reverse: bool):
    """out_t = a_t prev + b_t, step by step in processing order, written in place. Returns the last."""
    a_t, b_t, h_t = a.unbind(0), b.unbind(0), out.unbind(0)
    for t in processing_order(len(h_t), reverse):
        torch.addcmul(b_t[t], a_t[t], prev, out=h_t[t])                # (B, H)
        prev = h_t[t]
    return prev


def _adjoint(a, d, g_next, a_next, reverse: bool) -> Tensor:
    """g_t = d_t + a_{t+1} g_{t+1} over one block, against processing order; g_next, a_next: of the
    step processed just after the block (zeros at the end of the sequence)."""
    g = torch.empty_like(d)
    a_t, d_t, g_t = a.unbind(0), d.unbind(0), g.unbind(0)
    for t in (range(len(g_t)) if reverse else range(len(g_t) - 1, -1, -1)):
        torch.addcmul(d_t[t], a_next, g_next, out=g_t[t])             # (B, H)
        g_next, a_next = g_t[t], a_t[t]
    return g


def _times_previous(g, h, h0, lo: int, hi: int, reverse: bool) -> Tensor:
    """g_t h_{t-1} for the steps lo..hi-1, h_{t-1} the state before step t in processing order."""
    out = torch.empty_like(g)                                         # (Tc, B, H)
    if reverse:
        torch.mul(g[:-1], h[lo + 1:hi], out=out[:-1])
        torch.mul(g[-1], h0 if hi == h.shape[0] else h[hi], out=out[-1])
    else:
        torch.mul(g[1:], h[lo:hi - 1], out=out[1:])
        torch.mul(g[0], h0 if lo == 0 else h[lo - 1], out=out[0])
    return out
