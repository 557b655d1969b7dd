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
