"""logcumsumexp for the log-space scan (parallel.log_scan), with derivatives of every order that torch's op
lacks: its double backward takes the log of the incoming gradient (NaN where that is exactly zero), and its
forward-mode derivative drops entries far below the running maximum. `logcumsumexp_for` picks, per call,
the form that is right under the transforms at work.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .numerics import forward_mode_or_functionalized, recording_graph, transformed


class LogCumSumExp(torch.autograd.Function):
    """torch.logcumsumexp along dim, whose backward differentiates again without NaN.

    torch's backward takes the log of the incoming gradient (split by sign), so a second derivative
    (create_graph=True) is NaN wherever that gradient is exactly zero: a loss on the last step only, or
    padding. Here, with y = logcumsumexp(x), the same gradient dx_s = sum_{t>=s} g_t exp(x_s - y_t) is
    formed as exp(x_s - y_s) S_s with S_s = g_s + exp(y_s - y_{s+1}) S_{s+1}: every factor at most 1
    (y rises along dim), no log of g, a loop over dim's length (a log-scan chunk: LOG_CHUNK steps) in
    autograd ops. On CPU always: torch's backward there measured 4x slower (T = 4096 as 64 chunks, B = 8,
    H = 256: forward and backward 130 against 540 ms); elsewhere (a GPU, where the loop's 64 steps would
    be launch-bound) only when the backward is itself differentiated, else torch's own formula
    (torch_first_order). Written for torch.func too (setup_context, a generated vmap rule, a jvp by the
    same kind of loop: dy_t = exp(y_{t-1} - y_t) dy_{t-1} + exp(x_t - y_t) dx_t), as torch's op under a
    gradient penalty taken with torch.func was NaN in the same places. Its jvp sees no outer tangent in
    the saved tensors (torch's limit for a Function), so forward over forward (jacfwd of jacfwd) would be
    wrong: logcumsumexp_for takes logcumsumexp_ops under forward-mode AD and functionalize."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, dim: int, torch_first_order: bool) -> Tensor:
        return torch.logcumsumexp(x, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.dim, ctx.torch_first_order = inputs
        ctx.save_for_backward(x, output)
        ctx.save_for_forward(x, output)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, y = ctx.saved_tensors
        if ctx.torch_first_order and not torch.is_grad_enabled():     # first order: torch's formula
            with torch.enable_grad():
                xx = x.detach().requires_grad_()
                return torch.autograd.grad(torch.logcumsumexp(xx, ctx.dim), xx, g)[0], None, None
        xs, ys, gs = x.unbind(ctx.dim), y.unbind(ctx.dim), g.unbind(ctx.dim)
        total = gs[-1]
        dx = [torch.exp(xs[-1] - ys[-1]) * total]
        for s in range(len(xs) - 2, -1, -1):
            total = gs[s] + torch.exp(ys[s] - ys[s + 1]) * total
            dx.append(torch.exp(xs[s] - ys[s]) * total)
        return torch.stack(dx[::-1], ctx.dim), None, None

    @staticmethod
    def jvp(ctx, dx: Tensor, *_):
        x, y = ctx.saved_tensors
        xs, ys, dxs = x.unbind(ctx.dim), y.unbind(ctx.dim), dx.unbind(ctx.dim)
        dy = [dxs[0]]                                                  # y_0 = x_0
        for t in range(1, len(xs)):
            dy.append(torch.exp(ys[t - 1] - ys[t]) * dy[-1] + torch.exp(xs[t] - ys[t]) * dxs[t])
        return torch.stack(dy, ctx.dim)


def logcumsumexp_ops(x: Tensor, dim: int) -> Tensor:
    """logcumsumexp in plain autograd ops whose derivatives of every order, forward or reverse mode, are
    exact: y_t = c_t + log S_t, S_t = e^{c_{t-1} - c_t} S_{t-1} + e^{x_t - c_t}, with c = logcumsumexp(x) taken
    without derivatives (y does not depend on c: any c gives the same function; this one keeps every factor
    at most 1). For forward-mode AD and functionalize, where the Function cannot serve (see LogCumSumExp):
    torch's own forward-mode derivative of logcumsumexp loses the entries more than ~30 below the running
    maximum (jvp of arange(40) with tangents 1: 1.2e-4 at index 0, not 1), a loop over the chunk."""
    c = torch.logcumsumexp(x.detach(), dim)
    c = c.masked_fill(c == -torch.inf, 0)               # a run of -inf first: S = 0 there, y = log 0 = -inf
    xs, cs = x.unbind(dim), c.unbind(dim)
    S = torch.exp(xs[0] - cs[0])
    ys = [cs[0] + torch.log(S)]
    for t in range(1, len(xs)):
        S = torch.exp(cs[t - 1] - cs[t]) * S + torch.exp(xs[t] - cs[t])
        ys.append(cs[t] + torch.log(S))
    return torch.stack(ys, dim)


def logcumsumexp_for(*tensors):
    """The logcumsumexp (x, dim) -> y for a call on these tensors. torch.compile, jit.trace and export take
    torch's op (they record ops; no Function there); forward-mode AD and functionalize logcumsumexp_ops;
    everything else (torch.func's reverse-mode transforms too) LogCumSumExp, by its own backward except
    off the CPU in first order outside torch.func."""
    if torch.compiler.is_compiling() or recording_graph():
        return torch.logcumsumexp
    if forward_mode_or_functionalized(*tensors):
        return logcumsumexp_ops
    torch_first = tensors[0].device.type != "cpu" and not transformed(*tensors)

    def lcse(x: Tensor, dim: int) -> Tensor:
        return LogCumSumExp.apply(x, dim, torch_first)
    return lcse
