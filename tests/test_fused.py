"""The fused CPU scan (rnnkit/_fused) against the pure-torch engine it replaces: forward outputs, final
states, every gradient and every trace field, across cells x direction x padding x truncation x
recurrent dropout x zoneout x trace, in float64 (1e-6) and float32 (1e-5; both relative to a tensor's
largest entry where that exceeds 1); a float64 gradcheck of its autograd Function. The cases it must
hand back to the engine are in test_fused_fallback.py.

If the extension cannot be built here, the tests that need it are skipped with the reason."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch.autograd import gradcheck

import rnnkit as rk
import rnnkit.layers
from rnnkit import _fused, engine
from rnnkit.cells import ElmanCell, GRUCell, LayerNormCell, LSTMCell
from rnnkit.engine import ScanOptions, TraceSlot

T, B, H = 6, 4, 5
LENGTHS = torch.tensor([3, 6, 1, 4])                   # unsorted; one full, one of length 1
CELL_KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru", "ln_rnn_tanh", "ln_lstm", "ln_gru", "lnx_rnn_tanh", "lnx_lstm",
              "lnx_gru")                                # lnx: LN of xi too, inside the kernel's loop
TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


def _why_unavailable() -> str | None:
    if not _fused.available():
        err = _fused._loaded["error"]
        return "RNNKIT_NO_FUSED is set" if err is None else f"fused kernel did not build: {err!r}"[:300]
    return None


needs_kernel = pytest.mark.skipif(_why_unavailable() is not None, reason=str(_why_unavailable()))


def make_cell(kind: str):
    if kind.startswith("ln_"):
        return LayerNormCell(make_cell(kind[3:]))
    if kind.startswith("lnx_"):
        return LayerNormCell(make_cell(kind[4:]), normalize_input=True)
    if kind.startswith("rnn"):
        return ElmanCell(kind[4:])
    return {"lstm": LSTMCell, "gru": GRUCell}[kind]()


def pure_scan(opts, xi, state0, w, b, params=()):
    """The pure-torch engine, called directly (whatever engine.scan dispatches to)."""
    return engine.pure_scan(opts, xi, state0, w, b, params)


def length_mask(padding, dtype, T_=T, lengths=LENGTHS):
    if padding is None:
        return None
    t = torch.arange(T_).unsqueeze(1)
    real = t < lengths if padding == "right" else t >= T_ - lengths
    return real.to(dtype).unsqueeze(2)


def scan_inputs(kind, dtype, bias=True, seed=0, T_=T, B_=B, H_=H):
    """cell, xi, w, b, state0, params with requires_grad, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    cell = make_cell(kind)
    W = cell.num_gates * H_

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    n_params = 2 if kind.startswith("ln_") else 4 if kind.startswith("lnx_") else 0
    params = tuple(r(W, scale=0.5) for _ in range(n_params))
    return (cell, r(T_, B_, W), r(W, H_, scale=H_ ** -0.5), r(W) if bias else None,
            tuple(r(B_, H_) for _ in range(cell.num_states)), params)


def options(cell, dtype, reverse=False, padding=None, truncate=None, rec=False, zone=None, trace=False,
            T_=T, B_=B, H_=H, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = cell.num_states
    zones = None
    if zone == "train":                                   # per-unit 0/1 masks, as in training
        zones = tuple((torch.rand(T_, B_, H_, generator=g) < 0.3).to(dtype) for _ in range(n))
    elif zone == "eval":                                  # the expected share, broadcast
        zones = tuple(torch.full((1, 1, 1), 0.2 + 0.1 * j, dtype=dtype) for j in range(n))
    rec_mask = (torch.rand(B_, H_, generator=g) < 0.7).to(dtype) / 0.7 if rec else None
    lengths = LENGTHS if B_ == B and T_ == T else torch.randint(1, T_ + 1, (B_,), generator=g)
    return ScanOptions(cell, reverse=reverse, mask=length_mask(padding, dtype, T_, lengths),
                       truncate=truncate, rec_mask=rec_mask, zone=zones, trace=TraceSlot() if trace else None)


def run(fn, kind, dtype, loss_on=("out", "final"), bias=True, **opt):
    """One forward and backward of `fn`; returns every number the two paths must agree on."""
    cell, xi, w, b, state0, params = scan_inputs(kind, dtype, bias)
    opts = options(cell, dtype, **opt)
    out, final = fn(opts, xi, state0, w, b, params)
    g = torch.Generator().manual_seed(7)
    loss = 0
    if "out" in loss_on:
        loss = loss + (out * torch.randn(out.shape, generator=g, dtype=dtype)).sum()
    if "final" in loss_on:
        loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=dtype)).sum() for s in final)
    loss.backward()
    got = {"out": out, **{f"final{j}": s for j, s in enumerate(final)}, "d_xi": xi.grad, "d_w": w.grad}
    got.update({f"d_s{j}": s.grad for j, s in enumerate(state0)})
    got.update({f"d_p{j}": p.grad for j, p in enumerate(params)})
    if b is not None:
        got["d_b"] = b.grad
    if opts.trace is not None:
        tr = opts.trace
        got.update(hidden=tr.hidden, cell=tr.cell, gates=tr.gates, grad_norm=tr.grad_norm)
    return got


def assert_same(a: dict, b: dict, tol: float, what: str):
    """Equal within tol times the larger of 1 and the tensor's largest entry (float32 cannot promise an
    absolute 1e-5 on a gradient of size 300, whose last bit is worth 3e-5)."""
    assert a.keys() == b.keys(), what
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, f"{what}: {k} present on one path only"
            continue
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, f"{what}: {k}"
        d = float((a[k].detach() - b[k].detach()).abs().max()) if a[k].numel() else 0.0
        scale = max(1.0, float(b[k].detach().abs().max())) if b[k].numel() else 1.0
        assert d <= tol * scale, f"{what}: {k} differs by {d:.3g} > {tol:g} x {scale:.3g}"


def fused_scan(opts, xi, state0, w, b, params=()):
    assert _fused.supports(opts, xi, state0, w, b, params), "fused path refused a supported scan"
    return _fused.scan(opts, xi, state0, w, b, params)


# -- equality with the pure-torch engine ---------------------------------------------------------------

GRID = list(itertools.product([False, True], [None, "right", "left"], [None, 2], [False, True],
                              [None, "train"], [False, True]))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_equals_engine_over_option_grid(kind, dtype, ln_centring):
    """Every combination of reverse x padding x truncation x recurrent dropout x zoneout x trace."""
    for reverse, padding, truncate, rec, zone, trace in GRID:
        opt = dict(reverse=reverse, padding=padding, truncate=truncate, rec=rec, zone=zone, trace=trace)
        assert_same(run(fused_scan, kind, dtype, **opt), run(pure_scan, kind, dtype, **opt), TOL[dtype],
                    f"{kind} {dtype} {opt}")


@needs_kernel
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_equals_engine_with_broadcast_zoneout_no_bias_and_partial_losses(kind, ln_centring):
    for opt in (dict(zone="eval", padding="right"), dict(loss_on=("out",), bias=False, truncate=1),
                dict(loss_on=("final",), reverse=True, trace=True), dict(truncate=T + 2, zone="eval")):
        for dtype in TOL:
            assert_same(run(fused_scan, kind, dtype, **opt), run(pure_scan, kind, dtype, **opt), TOL[dtype],
                        f"{kind} {dtype} {opt}")


@contextlib.contextmanager
def two_threads(lanes: int):
    """Two intra-op threads and the kernel's lane setting (scan.h: fewest rows a lane gets, 0 = off)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    old = _fused.build().set_min_lane_rows(lanes)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _fused.build().set_min_lane_rows(old)


def big_run(kind, dtype, T_, B_, H_, **opt):
    """Fused and pure runs of one larger scan: (fused results, pure results)."""
    cell, xi, w, b, state0, params = scan_inputs(kind, dtype, T_=T_, B_=B_, H_=H_)
    opts = options(cell, dtype, T_=T_, B_=B_, H_=H_, **opt)
    outs = []
    for fn in (fused_scan, pure_scan):
        for t in (xi, w, b, *state0, *params):
            t.grad = None
        out, final = fn(opts, xi, state0, w, b, params)
        (out.sum() + final[0].square().sum()).backward()
        got = {"out": out, "final": final[0], "d_xi": xi.grad.clone(), "d_w": w.grad.clone(),
               "d_b": b.grad.clone()}
        got.update({f"d_state0_{j}": s.grad.clone() for j, s in enumerate(state0)})     # d_h0, and the LSTM's d_c0
        got.update({f"d_p{j}": p.grad.clone() for j, p in enumerate(params)})
        if opts.trace is not None:
            got["grad_norm"] = opts.trace.grad_norm
        outs.append(got)
    return outs


@needs_kernel
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_equals_engine_over_enough_steps_to_pack_the_weight(kind):
    """float32 scans of at least kMinStepsToPack (8) steps multiply by an MKL-packed U, forward and backward."""
    for opt in (dict(), dict(reverse=True, padding="right", rec=True, truncate=5)):
        assert_same(*big_run(kind, torch.float32, 12, 5, 33, **opt), 1e-5, f"{kind} {opt}")


@needs_kernel
def test_layer_norm_lstm_forms_its_gates_again_unless_the_trace_keeps_them(monkeypatch):
    """Under both norms (xi normalised in the loop) the LSTM's forward keeps no (T, B, 4H) gates buffer:
    the backward forms each row's gates again from the saved xhat and xhat_x (cells.h: lstm_gates_again).
    The kernel's act has one step's slot without a trace and T with one (the trace records the gates);
    the gradients of both ways are the same to the bit (the backward forms the gates by the forward's own
    expression), and equal the pure engine's."""
    seen, ops = [], _fused._ops()

    class Spy:                                            # the kernel's ops, its forward watched
        def __getattr__(self, name):
            return getattr(ops, name)

        def forward(self, *args, **kw):
            res = ops.forward(*args, **kw)
            seen.append((kw.get("gates"), res[3].shape[0]))   # res[3]: act
            return res

    monkeypatch.setitem(_fused._loaded, "ops", Spy())
    opt = {"reverse": True, "padding": "right", "zone": "train"}
    for dtype, tol in TOL.items():
        seen.clear()
        grads = {}
        for trace in (False, True):
            got = run(fused_scan, "lnx_lstm", dtype, trace=trace, **opt)
            grads[trace] = {k: v for k, v in got.items() if k.startswith("d_") or k in ("out", "final0", "final1")}
        assert seen == [(False, 1), (True, T)], seen
        for k, g in grads[False].items():                 # the forward's own expression: the same bits
            assert torch.equal(g, grads[True][k]), f"{dtype} {k}: gates formed again differ from those kept"
        ref = run(pure_scan, "lnx_lstm", dtype, **opt)
        assert_same(grads[False], {k: ref[k] for k in grads[False]}, tol, f"{dtype} against the pure engine")


@needs_kernel
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru", "ln_lstm"])
def test_equals_engine_with_broadcast_and_strided_output_gradients(kind):
    """out.sum() sends a scalar expanded to (T, B, H); a loss on out.transpose(0, 1) a strided gradient.
    The kernel reads both in place."""
    weights = torch.randn(B, T, H, dtype=torch.float64)
    losses = {"sum": lambda out: out.sum(), "strided": lambda out: (out.transpose(0, 1) * weights).sum()}
    for name, loss_fn in losses.items():
        got = []
        for fn in (fused_scan, pure_scan):
            cell, xi, w, b, state0, params = scan_inputs(kind, torch.float64)
            out, _ = fn(options(cell, torch.float64, padding="left"), xi, state0, w, b, params)
            loss_fn(out).backward()
            got.append({"d_xi": xi.grad, "d_w": w.grad, "d_h0": state0[0].grad})
        assert_same(*got, 1e-6, f"{kind} {name}")


@needs_kernel
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_inference_without_grad_equals_engine(kind):
    cell, xi, w, b, state0, params = scan_inputs(kind, torch.float32)
    opts = options(cell, torch.float32, padding="right", zone="eval")
    with torch.inference_mode():
        a = fused_scan(opts, xi, state0, w, b, params)
        r = pure_scan(opts, xi, state0, w, b, params)
    for x, y in zip((a[0], *a[1]), (r[0], *r[1]), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


@needs_kernel
def test_layers_through_the_fused_path_equal_the_engine(monkeypatch):
    """Integration: a 2-layer bidirectional LSTM with lengths, learned initial state and zoneout, with
    rnnkit.layers' scan routed through the fused path (the projection inside its node), against the same
    layer on the pure engine."""
    torch.manual_seed(0)
    layer = rk.LSTM(3, 7, num_layers=2, bidirectional=True, batch_first=True, zoneout=0.1,
                    learn_initial_state=True, backend="engine").eval()
    x = torch.randn(5, 9, 3)
    lengths = torch.tensor([9, 2, 5, 1, 7])

    def pure(opts, x_, w_ih, b_ih, state0, w_hh, b_hh, params=()):
        return pure_scan(opts, torch.nn.functional.linear(x_, w_ih, b_ih), state0, w_hh, b_hh, params)

    def step(fn):
        monkeypatch.setattr(rnnkit.layers, "project_scan", fn)
        layer.zero_grad()
        out, (h, c) = layer(x, lengths=lengths)
        (out.square().sum() + h.sum() + c.sum()).backward()
        return [out, h, c] + [p.grad.clone() for p in layer.parameters()]

    for a, r in zip(step(engine.project_scan), step(pure), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-5)


# -- gradcheck of the fused Function -------------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("opt", [dict(), dict(reverse=True, padding="left", zone="train", rec=True)],
                         ids=["plain", "extras"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_fused_scan_gradcheck(kind, opt, ln_centring):
    cell, xi, w, b, state0, params = scan_inputs(kind, torch.float64, T_=4, B_=3, H_=3)
    opts = options(cell, torch.float64, T_=4, B_=3, H_=3, **opt)
    n = len(state0)

    def f(xi_, w_, b_, *rest):
        out, final = fused_scan(opts, xi_, tuple(rest[:n]), w_, b_, tuple(rest[n:]))
        return (out, *final)

    assert gradcheck(f, (xi, w, b, *state0, *params))
