"""The fused scan with the layer's input projection inside its node (engine.project_scan, what every
layer runs): xi = x W_ih^T computed in the node, b_ih added per row in the loop and its gradient summed
there. Held to the pure engine fed F.linear(x, W_ih, b_ih), over the cells and options of test_fused.py,
and gradchecked in float64."""
from __future__ import annotations

import pytest
import torch
from test_fused import (
    CELL_KINDS,
    assert_same,
    needs_kernel,
    options,
    pure_scan,
    scan_inputs,
)
from torch.autograd import gradcheck
from torch.nn.functional import linear

import rnnkit as rk
import rnnkit.layers
from rnnkit import _fused, engine

I_ = 4                                                    # input size


def projected_inputs(kind, dtype, bias_ih=True, seed=3, **sizes):
    cell, xi, w, b, state0, params = scan_inputs(kind, dtype, seed=seed, **sizes)
    T_, B_, W = xi.shape
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T_, B_, I_, generator=g, dtype=dtype).requires_grad_()
    w_ih = (torch.randn(W, I_, generator=g, dtype=dtype) * I_ ** -0.5).requires_grad_()
    b_ih = torch.randn(W, generator=g, dtype=dtype).requires_grad_() if bias_ih else None
    return cell, x, w_ih, b_ih, w, b, state0, params


def run(projected: bool, kind, dtype, bias_ih=True, **opt):
    cell, x, w_ih, b_ih, w, b, state0, params = projected_inputs(kind, dtype, bias_ih)
    opts = options(cell, dtype, **opt)
    if projected:
        assert _fused.supports_projected(opts, x, w_ih, b_ih, state0, w, b, params)
        out, final = _fused.scan_projected(opts, x, w_ih, b_ih, state0, w, b, params)
    else:
        out, final = pure_scan(opts, linear(x, w_ih, b_ih), state0, w, b, params)
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g, dtype=dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=dtype)).sum() for s in final)
    loss.backward()
    got = {"out": out, "d_x": x.grad, "d_w_ih": w_ih.grad, "d_w": w.grad, "d_b": b.grad,
           "d_b_ih": None if b_ih is None else b_ih.grad}
    got.update({f"final{j}": s for j, s in enumerate(final)})
    got.update({f"d_s{j}": s.grad for j, s in enumerate(state0)})
    got.update({f"d_p{j}": p.grad for j, p in enumerate(params)})
    return got


OPTS = [dict(), dict(reverse=True, padding="left", zone="train", rec=True),
        dict(padding="right", truncate=2, zone="eval")]


@needs_kernel
@pytest.mark.parametrize("opt", OPTS, ids=["plain", "extras", "truncated"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_projected_equals_pure_engine_on_the_projection(kind, opt, ln_centring):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        assert_same(run(True, kind, dtype, **opt), run(False, kind, dtype, **opt), tol, f"{kind} {dtype} {opt}")


@needs_kernel
@pytest.mark.parametrize("kind", ["rnn_tanh", "lnx_gru", "lstm"])
def test_projected_without_input_bias_or_input_gradient(kind):
    assert_same(run(True, kind, torch.float64, bias_ih=False), run(False, kind, torch.float64, bias_ih=False),
                1e-10, kind)
    cell, x, w_ih, b_ih, w, b, state0, params = projected_inputs(kind, torch.float64)
    opts = options(cell, torch.float64)
    x = x.detach()                                        # the first layer's data: no d_x is formed
    out, _ = _fused.scan_projected(opts, x, w_ih, b_ih, state0, w, b, params)
    out.sum().backward()
    assert x.grad is None and w_ih.grad is not None and b_ih.grad is not None


@needs_kernel
@pytest.mark.parametrize("opt", [dict(), dict(reverse=True, padding="left", zone="train", rec=True)],
                         ids=["plain", "extras"])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_projected_gradcheck(kind, opt, ln_centring):
    sizes = dict(T_=4, B_=3, H_=3)
    cell, x, w_ih, b_ih, w, b, state0, params = projected_inputs(kind, torch.float64, **sizes)
    opts = options(cell, torch.float64, **sizes, **opt)
    n = len(state0)

    def f(x_, w_ih_, b_ih_, w_, b_, *rest):
        out, final = _fused.scan_projected(opts, x_, w_ih_, b_ih_, tuple(rest[:n]), w_, b_, tuple(rest[n:]))
        return (out, *final)

    assert gradcheck(f, (x, w_ih, b_ih, w, b, *state0, *params))


@needs_kernel
def test_project_scan_routes_supported_scans_through_the_node_and_others_through_linear():
    cell, x, w_ih, b_ih, w, b, state0, params = projected_inputs("gru", torch.float64)
    opts = options(cell, torch.float64)
    out, _ = engine.project_scan(opts, x, w_ih, b_ih, state0, w, b, params)
    assert type(out.grad_fn).__name__ == "_FusedScanBackward"
    bad = [(x, w_ih[:, :-1], b_ih), (x, w_ih, b_ih[:-1]), (x.float(), w_ih, b_ih), (x[0], w_ih, b_ih)]
    for args in bad:                                       # refused; engine.project_scan then lets
        assert not _fused.supports_projected(opts, *args, state0, w, b, params)  # F.linear / scan say why
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        engine.project_scan(opts, x, w_ih[:, :-1], b_ih, state0, w, b, params)


FROZEN = {                                                # parameter names left without requires_grad
    "all trainable": (),
    "b_hh frozen": ("bias_hh_l0",),
    "b_ih frozen": ("bias_ih_l0",),
    "norms frozen": ("ln_ih_weight_l0", "ln_ih_bias_l0", "ln_hh_weight_l0", "ln_hh_bias_l0"),
    "only beta_x": "all but ln_ih_bias_l0",
    "only b_ih": "all but bias_ih_l0",
    "only b_hh": "all but bias_hh_l0",
}
FROZEN_CASES = [(f, True) for f in FROZEN] + [(f, False) for f in ("all trainable", "norms frozen", "only beta_x")]


@needs_kernel
@pytest.mark.parametrize(("frozen", "bias"), FROZEN_CASES, ids=[f"{f}, bias={b}" for f, b in FROZEN_CASES])
@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
def test_layer_norm_layers_with_frozen_parameters_equal_the_pure_engine(cls, frozen, bias, monkeypatch,
                                                                        ln_centring):
    """A layer with layer_norm (both norms in the kernel's loop; for Elman and LSTM one fused pair, whose
    backward forms d b_hh, d b_ih and d beta_x only when wanted) with some parameters frozen, or without
    biases, in float64: every output and every gradient that exists equals the pure engine's, and the
    frozen parameters get none."""
    torch.manual_seed(5)
    layer = getattr(rk, cls)(3, 4, layer_norm=True, bias=bias, backend="engine").double()
    with torch.no_grad():
        for p in layer.parameters():                      # norms' gamma, beta away from 1, 0
            p.add_(torch.randn_like(p) * 0.5)
    names = dict(layer.named_parameters())
    spec = FROZEN[frozen]
    if isinstance(spec, str):
        spec = tuple(n for n in names if n != spec.removeprefix("all but "))
    for n in spec:
        names[n].requires_grad_(False)
    x = torch.randn(7, 3, 3, dtype=torch.float64, requires_grad=frozen == "all trainable")
    fused_calls, scan_projected = [], _fused.scan_projected

    def fused(*args):
        fused_calls.append(1)
        return scan_projected(*args)

    def pure(opts, x_, w_ih, b_ih, state0, w_hh, b_hh, params=()):
        return engine.pure_scan(opts, linear(x_, w_ih, b_ih), state0, w_hh, b_hh, params)

    def step(fn):
        monkeypatch.setattr(rnnkit.layers, "project_scan", fn)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, state = layer(x)
        final = state if isinstance(state, tuple) else (state,)
        g = torch.Generator().manual_seed(9)
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
        loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum() for s in final)
        loss.backward()
        got = {"out": out, "d_x": x.grad, **{f"final{j}": s for j, s in enumerate(final)}}
        got.update({f"d {n}": p.grad for n, p in layer.named_parameters()})
        return got

    monkeypatch.setattr(_fused, "scan_projected", fused)
    got, ref = step(engine.project_scan), step(pure)
    assert fused_calls, "the layer did not run the fused kernel"
    assert_same(got, ref, 1e-10, f"{cls} {frozen} bias={bias}")
    for n, p in layer.named_parameters():
        assert (got[f"d {n}"] is None) == (not p.requires_grad), n
