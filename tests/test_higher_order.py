"""Gradients of gradients (create_graph=True) through every hand-written backward: the engine's scan
(fused kernel and pure torch), the layers with their extras, and the min cells' blocked scan; and the
same layers under torch.func's transforms (grad, vmap, jacrev), where they run as plain autograd ops.

A hand backward builds no graph, so before numerics.hand_backward a gradient penalty through an
engine layer silently lost its own gradient. Checked here by float64 gradgradcheck and against
torch.nn's autograd (backend="native") with the same weights."""
import pytest
import torch
from helpers import KINDS, pair
from test_gradcheck import (
    EXTRAS,
    ScaledMinimalCell,
    _minimal_inputs,
    layer,
    layer_fn,
    length_mask,
    rand,
    reference_truncated,
    scan_args,
    scan_fn,
    scan_inputs,
)
from torch.autograd import gradgradcheck

import rnnkit as rk
from rnnkit import _fused, engine, parallel
from rnnkit.minimal import MinGRUCell, MinLSTMCell

D64 = torch.float64
ROUTES = {"fused": engine.scan, "pure": engine.pure_scan}


@pytest.fixture(params=list(ROUTES))
def route(request):
    if request.param == "fused" and not _fused.available():
        pytest.skip("the fused kernel is not available here")
    return request.param


# -- the scan ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,padding,reverse", [
    ("rnn_tanh", None, False), ("rnn_relu", "left", True), ("lstm", "right", False), ("gru", "left", False),
    ("gru", None, True), ("ln_lstm", "right", True)])
def test_scan_gradgradcheck(route, kind, padding, reverse):
    cell, xi, w, b, state0, params = scan_inputs(kind)
    f = scan_fn(cell, len(state0), ROUTES[route], reverse=reverse, mask=length_mask(padding))
    assert gradgradcheck(f, scan_args(xi, w, b, state0, params))


def _second_order(f, args):
    """Gradients w.r.t. args of sum(dL/dargs ** 2), L a fixed random weighting of f's outputs."""
    outs = f(*args)
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=D64)).sum() for o in outs)
    grads = torch.autograd.grad(loss, args, create_graph=True)
    return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), args)


@pytest.mark.parametrize("kind,reverse,padding", [("lstm", False, "right"), ("gru", True, None),
                                                  ("gru", True, "right"), ("rnn_tanh", False, "left")])
def test_truncated_second_order_equals_detaching_reference(route, kind, reverse, padding):
    """Truncated BPTT is defined as autograd through a loop that detaches the state every k steps; a
    second derivative through it is that loop's too (not gradgradcheck's: a detached state's value
    still moves with the inputs)."""
    cell, xi, w, b, state0, _ = scan_inputs(kind)
    args, mask = scan_args(xi, w, b, state0, ()), length_mask(padding)
    got = _second_order(scan_fn(cell, len(state0), ROUTES[route], truncate=2, reverse=reverse, mask=mask), args)
    want = _second_order(lambda xi_, w_, b_, *s: reference_truncated(kind, xi_, w_, b_, s, 2, reverse, mask), args)
    full = _second_order(scan_fn(cell, len(state0), ROUTES[route], reverse=reverse, mask=mask), args)
    for a, b_ in zip(got, want, strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-10)
    assert float((got[1] - full[1]).abs().max()) > 1e-6       # the truncation is in the second order too


def test_user_cell_without_backward_gradgradcheck():
    xi, w, b, state0, params = _minimal_inputs()
    f = scan_fn(ScaledMinimalCell(), 1, engine.pure_scan, mask=length_mask("right"))
    assert gradgradcheck(f, scan_args(xi, w, b, state0, params))


# -- the layers, with every extra ---------------------------------------------------------------------

@pytest.mark.parametrize("extra", ["layer_norm", "zoneout_eval", "zoneout_train", "recurrent_dropout"])
@pytest.mark.parametrize("kind", ("rnn_tanh", "lstm", "gru"))
def test_extra_gradgradcheck_through_layer(kind, extra):
    kw, mode, seed = EXTRAS[extra]
    m = layer(kind, num_layers=1, **kw)
    m.train(mode == "train")
    names = [n for n, _ in m.named_parameters()]
    ps = [(torch.randn_like(p) * 0.6).requires_grad_() for p in m.parameters()]
    assert gradgradcheck(layer_fn(m, names, seed), (rand(3, 2, 2), *ps), fast_mode=True)


def _penalised_gradients(m, x):
    """Gradients of a WGAN-GP-style loss: the outputs' loss plus the squared norm of d(loss)/dx."""
    out, state = m(x)
    h_n = state[0] if isinstance(state, tuple) else state
    loss = out.pow(2).mean() + h_n.sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    m.zero_grad()
    x.grad = None
    (loss + gx.pow(2).sum()).backward()
    return [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("dtype,tol", [(D64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_penalty_equals_torch_nn(kind, dtype, tol):
    ref, mine = pair(kind, 3, 5, num_layers=2, backend="engine")
    ref, mine = ref.to(dtype), mine.to(dtype)
    x = torch.randn(6, 2, 3, dtype=dtype, requires_grad=True)
    got, want = _penalised_gradients(mine, x), _penalised_gradients(ref, x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert float(want[-1].abs().max()) > 1e-3                 # the penalty's term is there to lose


def test_trace_under_create_graph_records_the_same_gradient_norms():
    m = rk.GRU(2, 4, backend="engine", dtype=D64)
    x = torch.randn(5, 3, 2, dtype=D64, requires_grad=True)
    norms = []
    for create_graph in (False, True):
        with rk.trace(m) as tr:
            out, _ = m(x)
            torch.autograd.grad(out.pow(2).sum(), x, create_graph=create_graph)
        norms.append(tr.grad_norm[0].clone())
    assert not torch.isnan(norms[0]).any()
    torch.testing.assert_close(norms[1], norms[0], rtol=0, atol=1e-12)


# -- the min cells' blocked scan ----------------------------------------------------------------------

@pytest.mark.parametrize("minroute", ["fused", "torch"])
@pytest.mark.parametrize("cell", [MinGRUCell(), MinLSTMCell()], ids=["mingru", "minlstm"])
@pytest.mark.parametrize("reverse,masked", [(False, False), (True, True)])
def test_blocked_scan_gradgradcheck(cell, reverse, masked, minroute, monkeypatch):
    if minroute == "torch":
        monkeypatch.setattr(parallel, "FUSED_KINDS", {})
    T, B, I, H = 5, 2, 2, 3
    G = cell.num_gates
    x, W = rand(T, B, I), rand(G * H, I)
    b, h0 = rand(G * H), rand(B, H)
    mask = (torch.arange(T)[:, None] < torch.tensor([5, 2])).to(D64).unsqueeze(2) if masked else None
    f = lambda x, W, b, h0: parallel.blocked_scan(cell, x, W, b, h0, mask, reverse, 2)
    assert gradgradcheck(f, (x, W, b, h0))


def test_min_layer_gradient_penalty_equals_log_scan():
    """The blocked scan (hand backward, CPU default) against the log-space scan (plain autograd)."""
    blocked = rk.MinGRU(3, 4, num_layers=2, dtype=D64)
    logs = rk.MinGRU(3, 4, num_layers=2, dtype=D64, scan="log")
    logs.load_state_dict(blocked.state_dict())
    x = torch.randn(6, 2, 3, dtype=D64, requires_grad=True)
    for a, b in zip(_penalised_gradients(blocked, x), _penalised_gradients(logs, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


# -- torch.func -----------------------------------------------------------------------------------------

FUNC_LAYERS = {
    "gru_ln": lambda: rk.GRU(3, 4, layer_norm=True, dtype=D64),
    "lstm_engine_2layers": lambda: rk.LSTM(3, 4, num_layers=2, backend="engine", dtype=D64),
    "rnn_zoneout_eval": lambda: rk.RNN(3, 4, zoneout=0.3, dtype=D64).eval(),
    "mingru": lambda: rk.MinGRU(3, 4, dtype=D64),
    "minlstm_log": lambda: rk.MinLSTM(3, 4, dtype=D64, scan="log"),     # torch.logcumsumexp under torch.func
}


def _loss(m, params, x):
    return torch.func.functional_call(m, params, (x,))[0].pow(2).sum()


@pytest.mark.parametrize("name", FUNC_LAYERS)
def test_torch_func_grad_and_per_sample_grads_equal_autograd(name):
    m = FUNC_LAYERS[name]()
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(6, 3, 3, dtype=D64)
    g = torch.func.grad(lambda p: _loss(m, p, x))(params)
    m.zero_grad()
    m(x)[0].pow(2).sum().backward()
    for k, p in m.named_parameters():
        torch.testing.assert_close(g[k], p.grad, rtol=1e-12, atol=1e-12)
    per_sample = torch.func.vmap(torch.func.grad(lambda p, xb: _loss(m, p, xb.unsqueeze(1))),
                                 in_dims=(None, 1))(params, x)
    for b in range(x.shape[1]):
        m.zero_grad()
        m(x[:, b:b + 1])[0].pow(2).sum().backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(per_sample[k][b], p.grad, rtol=1e-12, atol=1e-12)


def test_torch_func_jacobian_of_the_final_state_equals_autograd():
    """dh_T/dh_0, the quantity whose norm vanishes or explodes, by jacrev and by torch.autograd."""
    m = rk.GRU(3, 4, backend="engine", dtype=D64)
    x = torch.randn(8, 2, 3, dtype=D64)
    h_T = lambda h0: m(x, h0)[1]
    h0 = torch.randn(1, 2, 4, dtype=D64)
    torch.testing.assert_close(torch.func.jacrev(h_T)(h0), torch.autograd.functional.jacobian(h_T, h0),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [lambda: rk.GRU(3, 4), lambda: rk.MinGRU(3, 4)], ids=["gru", "mingru"])
def test_trace_inside_torch_func_is_refused(make):
    m = make()
    params = {k: v.detach() for k, v in m.named_parameters()}
    with rk.trace(m), pytest.raises(ValueError, match="trace cannot record inside torch.func"):
        torch.func.grad(lambda p: _loss(m, p, torch.randn(5, 2, 3)))(params)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_jvp_equals_torch_nn(kind):
    """torch.func.jvp and torch.autograd.forward_ad's dual tensors, against torch.nn's forward mode."""
    import torch.autograd.forward_ad as fwAD
    ref, mine = pair(kind, 3, 4, num_layers=2, backend="engine")
    ref, mine = ref.double(), mine.double()
    x = torch.randn(5, 2, 3, dtype=D64)
    v = torch.randn_like(x)
    want = torch.func.jvp(lambda x_: ref(x_)[0], (x,), (v,))[1]
    torch.testing.assert_close(torch.func.jvp(lambda x_: mine(x_)[0], (x,), (v,))[1], want, rtol=1e-12, atol=1e-12)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(mine(fwAD.make_dual(x, v))[0]).tangent
    torch.testing.assert_close(tangent, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm", "mingru"])
@pytest.mark.parametrize("fused", [True, False])
def test_batched_backward_equals_one_by_one(kind, fused, monkeypatch):
    """is_grads_batched=True and jacobian(vectorize=True) run the backward under torch's (legacy) vmap;
    the hand backwards then take the replay. Was: 'Batching rule not implemented for
    rnnkit_fused::backward' (and min_backward, aten::addcmul.out on the pure route of the min layers)."""
    if not fused:
        monkeypatch.setenv("RNNKIT_NO_FUSED", "1")
    make = {"rnn": rk.RNN, "gru": rk.GRU, "lstm": rk.LSTM}.get(kind)
    m = (make(3, 4, backend="engine") if make else rk.MinGRU(3, 4)).to(D64)
    x = torch.randn(5, 2, 3, dtype=D64, requires_grad=True)
    out = m(x)[0][-1]                                                   # (2, 4)
    basis = torch.eye(8, dtype=D64).view(8, 2, 4)
    (batched,) = torch.autograd.grad(out, x, basis, is_grads_batched=True, retain_graph=True)
    one_by_one = torch.stack([torch.autograd.grad(out, x, e, retain_graph=True)[0] for e in basis])
    torch.testing.assert_close(batched, one_by_one, rtol=0, atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda x_: m(x_)[0][-1], x, vectorize=True)
    torch.testing.assert_close(jac.reshape(8, *x.shape), one_by_one, rtol=0, atol=1e-12)
