"""The fused CPU scan: `rnnkit.engine.scan` with its time loop in C++, for the built-in cells.

Same contract and the same numbers as the pure-torch engine (`tests/test_fused.py` holds them equal):
per step one matrix product for U h_{t-1} into a reused buffer, then one hand-written elementwise pass
over the batch rows (the cell's gates, zoneout, padding, the outputs), saving what the backward reads;
the backward runs one elementwise pass and one product per step, and forms dU as one large product
after the loop. The C++ mirrors `rnnkit/cells/*.py` line by line (`cells.h`).

    supports(opts, xi, state0, weight_hh, bias_hh, params)   True when the fused path can run this scan
    scan(opts, xi, state0, weight_hh, bias_hh, params)       same signature and result as engine.scan
    supports_projected / scan_projected(opts, x, weight_ih, bias_ih, ...)   the same with xi = F.linear(x, ...)
                                                             computed inside the node (engine.project_scan)
    build(verbose=False)                                     compile now (the install step may call it)
    bernoulli(shape, p, dtype)                               fast 0/1 masks (zoneout), see random.h
    release_pool()                                           hand the kernel's kept buffers back (pool.h)
    forget_shapes()                                          start the table of whole product shapes afresh

Speed (docs/benchmarks.md): with enough batch rows each thread runs the whole time loop on its own rows
("lanes", scan.h); large buffers come from a pool kept between calls (pool.h), so a step does not fault
in fresh pages; layer norm is done per row inside the loop; products on the faster of MKL/oneDNN (route.py).

Built on first use with torch.utils.cpp_extension (JIT, for this machine's CPU: extension.py), cached in
torch's extension folder or in $RNNKIT_EXT_DIR; torch's file lock makes concurrent builds safe. If the build
fails, one warning says why and `supports` answers False, so the engine runs its pure-torch path.
RNNKIT_NO_FUSED=1 turns the fused path off; RNNKIT_GEMM_ROUTE pins the products' route (route.py).
"""
from __future__ import annotations

import os
import threading
import warnings

import torch
import torch.nn.functional as F

from ..cells import ElmanCell, GRUCell, LayerNormCell, LSTMCell
from ..numerics import hand_backward
from . import extension, route

__all__ = ["available", "bernoulli", "build", "forget_shapes", "release_pool", "scan", "scan_projected", "supports",
           "supports_projected"]

_DTYPES = (torch.float32, torch.float64)
_CELL_CODES = {"tanh": 0, "relu": 1, "lstm": 2, "gru": 3}      # scan.h's CellKind

UNAVAILABLE = "the fused CPU kernel is unavailable"     # the warning when it does not build (benchmarks look for it)
_lock = threading.Lock()
_loaded: dict = {"ops": None, "error": None}


# -- the build ---------------------------------------------------------------------------------------

def _disabled() -> bool:
    return os.environ.get("RNNKIT_NO_FUSED", "").strip() not in ("", "0")


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension now; returns torch.ops.rnnkit_fused.
    Raises on failure, unlike the lazy loader, which warns once and falls back."""
    with _lock:
        if _loaded["ops"] is not None:
            return _loaded["ops"]
        extension.load(verbose)
        _loaded["ops"] = torch.ops.rnnkit_fused
        route.apply_env(_loaded["ops"])                # RNNKIT_GEMM_ROUTE, when set
        return _loaded["ops"]


def _ops():
    """The compiled operators, building them on first use; None (after one warning) if that fails."""
    if _loaded["ops"] is not None or _loaded["error"] is not None:
        return _loaded["ops"]
    try:
        return build()
    except Exception as e:  # noqa: BLE001  (any build failure: compiler missing, build error, ...)
        _loaded["error"] = e
        warnings.warn(f"rnnkit: {UNAVAILABLE} ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else e!r}); the engine runs "
                      "its pure-torch path. Set RNNKIT_NO_FUSED=1 to silence this.", RuntimeWarning,
                      stacklevel=3)
        return None


def available() -> bool:
    """True when the fused path is switched on and its extension builds and loads."""
    return not _disabled() and _ops() is not None


def bernoulli(shape, p: float, dtype=torch.float32, generator=None, device=None) -> torch.Tensor:
    """A tensor of 0/1, each 1 with probability p, like torch.empty(shape).bernoulli_(p); on CPU drawn
    by a vectorised counter-based generator (random.h), about 10x faster. Its seed comes from torch's
    generator, so torch.manual_seed makes it reproducible. Off the CPU, or without the kernel:
    bernoulli_ itself."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and dtype in _DTYPES and not _disabled() and _ops() is not None:
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
        return _ops().bernoulli_mask(list(shape), float(p), seed, dtype)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(p, generator=generator)


def release_pool() -> int:
    """Hand the buffers the kernel keeps between calls back to the system; returns the bytes freed. (The
    pool holds at most 1 GiB of free blocks, and three times the most it had in use at once: for a loop
    over many shapes in turn, torch.ops.rnnkit_fused.set_pool_peak_multiple(0) lifts the latter.)"""
    if _disabled() or _ops() is None:
        return 0
    held = int(_ops().pool_held_bytes())
    _ops().release_pool()
    return held


def forget_shapes() -> None:
    """Start afresh the kernel's table of matrix-product shapes that oneDNN gets whole (rnnkit/_fused/
    shapes.cpp): after its first 64 shapes a process takes in at most 96 more, and a long-lived one that has
    trained many models (a notebook, a sweep) runs a later model's input projections and weight gradients in
    cut blocks (up to 15% slower at small sizes). Each shape taken whole is a kernel oneDNN compiles and keeps
    (0.5-1.5 MB), which this does not free."""
    if _disabled() or _ops() is None:
        return
    ops = _ops()
    ops.set_exact_shapes(ops.set_exact_shapes(0))           # the size it had (0 returns it), the table cleared


# -- which scans it runs -----------------------------------------------------------------------------

def _cell_code(cell) -> tuple[int, bool] | None:
    """(CellKind code, layer norm) for the built-in cells (exact types: a subclass may change the math,
    as ProjectedLSTMCell, proj_size > 0, does), None for anything else: the pure-torch path runs it."""
    ln = type(cell) is LayerNormCell
    inner = cell.inner if ln else cell
    if type(inner) is ElmanCell:
        return _CELL_CODES[inner.nonlinearity], ln
    if type(inner) in (LSTMCell, GRUCell):
        return _CELL_CODES[inner.name], ln
    return None


def _fits(t, shape: tuple) -> bool:
    """t is a tensor broadcastable to `shape` without adding dimensions."""
    return (isinstance(t, torch.Tensor) and t.dim() == len(shape)
            and all(s in (1, n) for s, n in zip(t.shape, shape)))


def supports(opts, xi, state0, weight_hh, bias_hh, params=()) -> bool:
    """True when the fused kernel runs this scan: a built-in cell, float32/float64 CPU tensors of one
    dtype and the shapes the engine expects, and an extension that built. Cheap after the first call."""
    if _disabled() or not isinstance(xi, torch.Tensor) or xi.dim() != 3:
        return False
    return _supports(opts, *xi.shape, [xi], state0, weight_hh, bias_hh, params)


def supports_projected(opts, x, weight_ih, bias_ih, state0, weight_hh, bias_hh, params=()) -> bool:
    """supports() for scan(opts, F.linear(x, weight_ih, bias_ih), ...): x (T, B, I), weight_ih (G*H, I)."""
    if _disabled() or not all(isinstance(t, torch.Tensor) for t in (x, weight_ih)):
        return False
    if x.dim() != 3 or weight_ih.dim() != 2 or weight_ih.shape[1] != x.shape[2]:
        return False
    if bias_ih is not None and (not isinstance(bias_ih, torch.Tensor) or tuple(bias_ih.shape) != weight_ih.shape[:1]):
        return False
    tensors = [x, weight_ih] + ([] if bias_ih is None else [bias_ih])
    return _supports(opts, x.shape[0], x.shape[1], weight_ih.shape[0], tensors, state0, weight_hh, bias_hh, params)


def _supports(opts, T, B, W, tensors, state0, weight_hh, bias_hh, params) -> bool:
    code = _cell_code(opts.cell)
    if code is None:
        return False
    G, n = opts.cell.num_gates, opts.cell.num_states
    if T == 0 or B == 0 or W % G or W == 0 or len(state0) != n:
        return False
    H = W // G
    dtype = tensors[0].dtype
    tensors = tensors + [weight_hh, *state0, *params] + ([] if bias_hh is None else [bias_hh])
    if any(not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    if dtype not in _DTYPES or tuple(weight_hh.shape) != (W, H):
        return False
    if bias_hh is not None and tuple(bias_hh.shape) != (W,):
        return False
    if any(tuple(s.shape) != (B, H) for s in state0):
        return False
    if len(params) != _num_params(opts.cell, code[1]) or any(tuple(p.shape) != (W,) for p in params):
        return False
    if not _options_fit(opts, T, B, H, n):
        return False
    return _ops() is not None


def _num_params(cell, ln: bool) -> int:
    """LN's (gamma, beta), and (gamma_x, beta_x) when the cell normalises xi itself."""
    return (4 if cell.normalize_input else 2) if ln else 0


def _options_fit(opts, T, B, H, n) -> bool:
    if opts.mask is not None and not _fits(opts.mask, (T, B, 1)):
        return False
    if opts.rec_mask is not None and not _fits(opts.rec_mask, (B, H)):
        return False
    if opts.zone is not None and (len(opts.zone) != n or not all(_fits(z, (T, B, H)) for z in opts.zone)):
        return False
    if opts.truncate is not None and (not isinstance(opts.truncate, int) or opts.truncate < 1):
        return False
    return all(t is None or t.device.type == "cpu" for t in (opts.mask, opts.rec_mask, *(opts.zone or ())))


# -- the scan ----------------------------------------------------------------------------------------

def scan(opts, xi, state0, weight_hh, bias_hh, params=()):
    """Run `opts.cell` over xi (T, B, G*H) from state0, as engine.scan does. Call only when `supports`."""
    n = len(state0)
    res = _FusedScan.apply(opts, n, xi, None, None, weight_hh, bias_hh, *state0, *params)
    return res[0], tuple(res[1:])


def scan_projected(opts, x, weight_ih, bias_ih, state0, weight_hh, bias_hh, params=()):
    """scan(opts, F.linear(x, weight_ih, bias_ih), ...) as one autograd node: x W_ih^T into a pooled
    buffer, b_ih added inside the loop (with b_hh, for Elman and LSTM without LN) and its gradient summed
    there (no pass over (T, B, G*H) to add the bias, nor one to sum its gradient). Call only when
    `supports_projected`."""
    n = len(state0)
    res = _FusedScan.apply(opts, n, x, weight_ih, bias_ih, weight_hh, bias_hh, *state0, *params)
    return res[0], tuple(res[1:])


def _options(opts, xi):
    """mask (T, B), rec (B, H), zoneout shares (T|1, B|1, H): contiguous, in xi's dtype, no grad."""
    T, B, W = xi.shape
    H = W // opts.cell.num_gates

    def prep(t, shape):
        return None if t is None else t.detach().to(xi.dtype).expand(shape).contiguous()

    mask = None if opts.mask is None else prep(opts.mask, (T, B, 1)).view(T, B)
    rec = prep(opts.rec_mask, (B, H))
    zone = [None, None]
    for j, z in enumerate(opts.zone or ()):
        zone[j] = prep(z, (z.shape[0], z.shape[1], H))
    return mask, rec, zone


def _record_forward(slot, code: int, hs, cs, act) -> None:
    """The trace, as engine._record_forward fills it: views of the saved buffers, no copies."""
    slot.hidden = hs.detach()
    slot.cell = None if cs is None else cs.detach()
    slot.gates = act.detach() if code in (_CELL_CODES["lstm"], _CELL_CODES["gru"]) else None
    slot.grad_norm = torch.full(hs.shape[:2], float("nan"), dtype=hs.dtype, device=hs.device)


def _c(t):
    return None if t is None else t.contiguous()


def _grad_out(d_out):
    """The gradient of out as the kernel reads it: rows along H may be broadcast (out.sum() sends a
    scalar expanded to (T, B, H), which need not be copied out); anything else is made contiguous."""
    if d_out is None or (d_out.dim() == 3 and d_out.stride(2) in (0, 1) and d_out.shape[2] > 1):
        return d_out
    return d_out.contiguous()


def _kernel_args(n: int, weight_hh, bias_hh, rest) -> tuple:
    """What the kernel takes of the scan's own arguments, contiguous: w, b, h0, c0, gamma, beta, gamma_x,
    beta_x (rest = state, then LN's params)."""
    state, params = rest[:n], rest[n:]
    gamma, beta, gamma_x, beta_x = (tuple(_c(p) for p in params) + (None,) * 4)[:4]
    return (weight_hh.contiguous(), _c(bias_hh), state[0].contiguous(), _c(state[1]) if n == 2 else None,
            gamma, beta, gamma_x, beta_x)


def _centered(t, dim: int):
    """t less its mean along dim. Under LN (cells.h: layernorm_rows) U, b_hh, W_ih and b_ih taken centred
    over their G*H rows (the kernel's own op, in double: scan.cpp) give products whose rows have zero mean
    (mean(U h + b) = mean(U) h + mean(b)), so the loop does not compute it; xi handed over as it is gets
    its rows centred here. No gradient correction follows: LN's gradient has zero mean along the row, so
    the centred and the given weights get the same gradients, and the backward's products through the
    centred U and W_ih (d_h = d_gh U, d_x = d_xi W_ih) lose nothing to the weights' offset."""
    return _ops().centered(t) if dim == 0 else (t - t.mean(dim, keepdim=True)).contiguous()


CENTRE_ROWS_PER_UNIT = 8


def _centres(ln: bool, rows: int, H: int) -> bool:
    """Whether a layer-normalised call takes its weights centred (above): that costs passes over U and
    W_ih, (G*H, H + I), each call, and saves a pass over each of its T*B rows, (T*B, G*H), per norm. Worth
    it from about CENTRE_ROWS_PER_UNIT rows per hidden unit (LSTM training step with layer_norm, centred
    over not: H = 64 at 2, 8, 32 rows a unit 1.085, 1.007, 0.968; H = 1024 1.051, 1.010, 1.008). A short
    call (a step at a time through the layer, T = B = 1) keeps its weights and computes the rows' means:
    LSTM H=2048 T=1 B=1 74 ms a call centring (15.6x plain), 4.7-4.9 ms without. The price is float32
    precision where the weights share a large offset: a short call then computes as the pure-torch
    engine does, with LN's mean taken after the product (U and b_hh + 10, T=6 B=4 H=64: outputs 3e-6 to
    4.3e-5 off float64, gradients up to 3.4e-4 of their largest entry, against 2.4e-7 and 3e-7 centred);
    without such an offset both are ~1e-6."""
    return ln and rows >= CENTRE_ROWS_PER_UNIT * H


_KERNEL_SAVED = 12                  # saved first: the kernel's outputs the backward reads, x2, its U and W_ih


class _FusedScan(torch.autograd.Function):
    """Saves what the kernel wrote for the backward, x2 (x as rows), the U and W_ih it multiplied by
    (centred under LN in a long call) and then the forward's own arguments, from which the backward takes
    the kernel's other inputs again and a create_graph replay starts."""

    @staticmethod
    def forward(ctx, opts, n: int, x, weight_ih, bias_ih, weight_hh, bias_hh, *rest):
        # weight_ih None: x is xi itself; else xi = x W_ih^T here, and b_ih goes to the kernel
        code, ln = _cell_code(opts.cell)
        keep = opts.keeps(ctx.needs_input_grad)
        w, b, h0, c0, gamma, beta, gamma_x, beta_x = _kernel_args(n, weight_hh, bias_hh, rest)
        centre = _centres(ln, x.shape[0] * x.shape[1], weight_hh.shape[1])
        if centre:
            w, b = _centered(w, 0), None if b is None else _centered(b, 0)
        x2 = xb = w_ih = None
        centre_x = centre and gamma_x is not None          # xi's LN here too
        if weight_ih is None:
            xi = _centered(x, -1) if centre_x else x.contiguous()
        else:
            x2 = x.reshape(-1, x.shape[2])
            w_ih = _centered(weight_ih, 0) if centre_x else weight_ih
            xi = _ops().pooled_mm(x2, w_ih.t()).view(x.shape[0], x.shape[1], weight_ih.shape[0])
            xb = _centered(bias_ih, 0) if centre_x and bias_ih is not None else _c(bias_ih)
        mask, rec, zone = _options(opts, xi)
        out, hs, cs, act, aux, hr, xhat, inv, xhat_x, inv_x, h_T, c_T = _ops().forward(
            code, ln, opts.reverse, keep, xi, w, b, h0, c0, gamma, beta, gamma_x, beta_x, xb, mask, rec, *zone,
            centred=centre, gates=opts.trace is not None)          # gates: the trace records every step's
        del xi                                                 # back to the pool now: d_xi reuses it
        if opts.trace is not None:
            _record_forward(opts.trace, code, hs, cs, act)
        if keep:
            ctx.save_for_backward(hs, cs, act, aux, hr, xhat, inv, xhat_x, inv_x, x2, w, w_ih,
                                  x, weight_ih, bias_ih, weight_hh, bias_hh, *rest)
            ctx.opts, ctx.code, ctx.ln, ctx.n, ctx.aux_opts = opts, code, ln, n, (mask, rec, *zone)
            ctx.set_materialize_grads(False)                   # an unused output sends None: skip it
        return (out, h_T) if n == 1 else (out, h_T, c_T)

    @staticmethod
    def _replay(ctx):
        """The forward again in autograd ops (engine.pure_scan), from the arguments it was given."""
        from ..engine import pure_scan  # engine imports this module
        args = ctx.saved_tensors[_KERNEL_SAVED:]
        x, weight_ih, bias_ih, weight_hh, bias_hh, *rest = args
        xi = x if weight_ih is None else F.linear(x, weight_ih, bias_ih)
        out, final = pure_scan(ctx.opts, xi, rest[:ctx.n], weight_hh, bias_hh, rest[ctx.n:], autograd=True)
        return (out, *final), (ctx.opts, ctx.n, *args)

    @staticmethod
    @hand_backward(lambda ctx: _FusedScan._replay(ctx), records=lambda ctx: ctx.opts.trace is not None)
    def backward(ctx, d_out, *d_final):
        return _FusedScan._backward(ctx, d_out, *d_final)

    @staticmethod
    def _backward(ctx, d_out, *d_final):
        opts, n = ctx.opts, ctx.n
        saved = ctx.saved_tensors
        hs, cs, act, aux, hr, xhat, inv, xhat_x, inv_x, x2, w_k, w_ih_k = saved[:_KERNEL_SAVED]
        x, w_ih, bias_ih, _, bias_hh, *rest = saved[_KERNEL_SAVED:]
        w, b, h0, c0, gamma, beta, gamma_x, beta_x = _kernel_args(n, w_k, bias_hh, rest)   # w_k: the forward's U
        mask, rec, zh, zc = ctx.aux_opts
        gn = opts.trace.grad_norm if opts.trace is not None else None
        d_hT, d_cT = _c(d_final[0]), (_c(d_final[1]) if n == 2 else None)
        need = ctx.needs_input_grad
        has_xb = w_ih is not None and bias_ih is not None      # the kernel added b_ih (forward's xb)
        need_w, need_b, need_xb, need_h0 = need[5], need[6] and b is not None, need[4] and has_xb, need[7]
        from ..engine import truncation_cuts  # engine imports this module
        every, rows = truncation_cuts(opts)                    # every k steps, or per row (padding)
        rows = None if rows is None else rows.to(hs.dtype).reshape(mask.shape).contiguous()
        d_xi, d_w, d_b, d_h0, d_c0, *d_ln, d_xb = _ops().backward(
            ctx.code, ctx.ln, opts.reverse, every or 0, w, b, h0, c0, gamma, beta, gamma_x, beta_x,
            mask, rec, zh, zc, rows, hs, cs, act, aux, hr, xhat, inv, xhat_x, inv_x, _grad_out(d_out), d_hT,
            d_cT, gn, need_w, need_b, need_xb, need_h0)
        states = (d_h0,) if n == 1 else (d_h0, d_c0)
        params = tuple(d_ln[:_num_params(opts.cell, ctx.ln)])
        if w_ih is None:
            return (None, None, d_xi, None, None, d_w, d_b, *states, *params)
        d2 = d_xi.view(-1, d_xi.shape[2])                      # through xi = x W_ih^T
        d_x = _ops().pooled_mm(d2, w_ih_k).view(x.shape) if need[2] else None
        d_w_ih = _ops().routed_mm(d2.t(), x2) if need[3] else None
        return (None, None, d_x, d_w_ih, d_xb if need_xb else None, d_w, d_b, *states, *params)

