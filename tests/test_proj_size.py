"""rk.LSTM(proj_size=P): torch.nn's projected LSTM, h_t = W_hr (o * tanh(c_t)) with P units.

Held against torch.nn.LSTM with copied weights (both ways) on the native path and the engine, and
against gradcheck on the engine; the extras and the stream are in test_proj_size_extras.py.
Shapes: T time, B batch, I input, H hidden, P projected.
"""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit as rk
from rnnkit import _fused
from rnnkit import diagnostics as dg
from rnnkit.boundary import LayerShapeError
from rnnkit.cells import LayerNormCell, LSTMCell, ProjectedLSTMCell
from rnnkit.engine import ScanOptions

D64 = torch.float64
T, B, I, H, P = 6, 3, 4, 5, 3
LENGTHS = torch.tensor([4, 6, 1])                         # unsorted, one full, one of length 1
TOL = {D64: 1e-10, torch.float32: 1e-5}


def pair(num_layers=1, bidirectional=False, batch_first=False, dtype=D64, backend="engine", **kw):
    """(torch.nn.LSTM, rk.LSTM) with torch.nn's weights loaded into rnnkit's."""
    ref = nn.LSTM(I, H, num_layers, batch_first=batch_first, bidirectional=bidirectional, proj_size=P,
                  dtype=dtype)
    mine = rk.LSTM(I, H, num_layers, batch_first=batch_first, bidirectional=bidirectional, proj_size=P,
                   dtype=dtype, backend=backend, **kw)
    mine.load_state_dict(ref.state_dict(), strict=not kw)
    return ref, mine


def loss_of(out, state, seed=7):
    """A loss that weighs every output and state entry differently (so no gradient is a plain sum)."""
    g = torch.Generator().manual_seed(seed)
    parts = [out, *state]
    return sum((p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum() for p in parts)


def assert_close(a, b, tol, what=""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max abs difference {err:.3g} > {tol}"


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def assert_same_grads(ref, mine, tol):
    g_ref, g_mine = grads(ref), grads(mine)
    assert set(g_ref) <= set(g_mine) and any("weight_hr" in n for n in g_ref)
    for n, g in g_ref.items():
        assert_close(g_mine[n], g, tol, n)


# -- parity with torch.nn.LSTM ---------------------------------------------------------------------------

def test_parameters_state_dict_and_shapes_are_torch_nns_both_ways():
    ref, mine = pair(2, True)
    assert [(n, p.shape) for n, p in mine.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert mine.weight_hr_l1_reverse.shape == (P, H) and mine.weight_hh_l0.shape == (4 * H, P)
    assert mine.weight_ih_l1.shape == (4 * H, 2 * P)
    back = nn.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=D64)
    with torch.no_grad():
        for p in mine.parameters():
            p.uniform_(-1, 1)
    back.load_state_dict(mine.state_dict())                       # rnnkit -> torch.nn, strict
    for n, p in back.named_parameters():
        assert torch.equal(p, getattr(mine, n))
    assert "proj_size=3" in repr(mine)


MODES = ("dense", "hx", "lengths", "packed")


def _run(module, x, hx, mode, batch_first, is_ref):
    """Forward in `mode`: lengths through torch.nn as a packed sequence, through rnnkit as lengths=."""
    if mode == "lengths" and is_ref:
        packed = pack_padded_sequence(x, LENGTHS, batch_first, enforce_sorted=False)
        out, state = module(packed, hx)
        return pad_packed_sequence(out, batch_first, total_length=T)[0], state
    if mode == "lengths":
        return module(x, hx, lengths=LENGTHS)
    if mode == "packed":
        out, state = module(pack_padded_sequence(x, LENGTHS, batch_first, enforce_sorted=False), hx)
        return out.data, state
    return module(x, hx)


@pytest.mark.parametrize("backend", ["engine", "native", "auto"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (1, True), (2, False), (2, True)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_matches_torch_nn_float64(backend, layers, bidirectional, batch_first, mode):
    _check_parity(backend, layers, bidirectional, batch_first, mode, D64)


@pytest.mark.parametrize("backend", ["engine", "native"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_torch_nn_float32(backend, mode):
    _check_parity(backend, 2, True, True, mode, torch.float32)


def _check_parity(backend, layers, bidirectional, batch_first, mode, dtype):
    ref, mine = pair(layers, bidirectional, batch_first, dtype, backend)
    LD = layers * (2 if bidirectional else 1)
    x0 = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
    h0 = (torch.randn(LD, B, P, dtype=dtype), torch.randn(LD, B, H, dtype=dtype)) if mode == "hx" else None
    results = []
    for module, is_ref in ((ref, True), (mine, False)):
        x = x0.clone().requires_grad_()
        hx = None if h0 is None else tuple(s.clone().requires_grad_() for s in h0)
        out, (h_n, c_n) = _run(module, x, hx, mode, batch_first, is_ref)
        loss_of(out, (h_n, c_n)).backward()
        results.append((out, h_n, c_n, x.grad, hx))
    tol = TOL[dtype]
    (o1, h1, c1, gx1, hx1), (o2, h2, c2, gx2, hx2) = results
    assert h2.shape == (LD, B, P) and c2.shape == (LD, B, H) and o2.shape[-1] == P * LD // layers
    for a, b, what in ((o2, o1, "out"), (h2, h1, "h_n"), (c2, c1, "c_n"), (gx2, gx1, "dx")):
        assert_close(a, b, tol, what)
    if hx1 is not None:
        assert_close(hx2[0].grad, hx1[0].grad, tol, "dh0")
        assert_close(hx2[1].grad, hx1[1].grad, tol, "dc0")
    assert_same_grads(ref, mine, tol)


def test_unbatched_input_and_default_backend_engine():
    ref, mine = pair(2, backend="auto")
    x = torch.randn(T, I, dtype=D64)
    before = rk.set_default_backend("engine")
    try:
        out, (h, c) = mine(x)
    finally:
        rk.set_default_backend(before)
    r_out, (r_h, r_c) = ref(x)
    assert out.shape == (T, P) and h.shape == (2, P) and c.shape == (2, H)
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        assert_close(a, b, 1e-12)


def test_engine_runs_the_pure_loop_never_the_fused_kernel(monkeypatch):
    """The fused kernel has no projection: a projected configuration is ineligible there (cleanly False,
    no exception) and the engine takes its pure-torch path, also with layer norm."""
    def boom(*a, **k):
        raise AssertionError("the fused kernel was called for a projected LSTM")
    W_ih, b = torch.randn(4 * H, I), torch.randn(4 * H)
    x, state0 = torch.randn(T, B, I), (torch.randn(B, P), torch.randn(B, H))
    U, W_hr = torch.randn(4 * H, P), torch.randn(P, H)
    for cell, params in ((ProjectedLSTMCell(), (W_hr,)),
                         (LayerNormCell(ProjectedLSTMCell(), True), (b, b, b, b, W_hr))):
        opts = ScanOptions(cell)
        assert _fused.supports_projected(opts, x, W_ih, b, state0, U, b, params) is False
        assert _fused.supports(opts, x @ W_ih.t(), state0, U, b, params) is False
    monkeypatch.setattr(_fused, "scan", boom)
    monkeypatch.setattr(_fused, "scan_projected", boom)
    for kw in ({}, {"layer_norm": True}):
        _, mine = pair(backend="engine", dtype=torch.float32, **kw)
        out, _ = mine(torch.randn(T, B, I), lengths=LENGTHS, truncate=2)
        out.sum().backward()


# -- gradcheck of the engine path ------------------------------------------------------------------------

def _gradcheck_layer(mine, x, hx, **fwd):
    names = [n for n, _ in mine.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mine.parameters()]

    def f(x_, h0, c0, *ps):
        out, (h, c) = functional_call(mine, dict(zip(names, ps)), (x_, (h0, c0)), fwd)
        return out, h, c
    return gradcheck(f, (x, *hx, *params), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["plain", "bi-2layers-lengths", "left-padding", "layer-norm-zoneout-eval"])
def test_gradcheck_engine(case):
    torch.manual_seed(3)
    Tg, Bg, Ig, Hg, Pg = 4, 2, 2, 3, 2
    kw = {"layer_norm": True, "zoneout": (0.3, 0.2)} if case == "layer-norm-zoneout-eval" else {}
    L, bi = (2, True) if case == "bi-2layers-lengths" else (1, False)
    mine = rk.LSTM(Ig, Hg, L, bidirectional=bi, proj_size=Pg, dtype=D64, backend="engine", **kw).eval()
    with torch.no_grad():
        for p in mine.parameters():
            p.uniform_(-0.8, 0.8)
    LD = L * (2 if bi else 1)
    x = torch.randn(Tg, Bg, Ig, dtype=D64, requires_grad=True)
    hx = (torch.randn(LD, Bg, Pg, dtype=D64, requires_grad=True),
          torch.randn(LD, Bg, Hg, dtype=D64, requires_grad=True))
    fwd = {}
    if case in ("bi-2layers-lengths", "left-padding"):
        fwd = {"lengths": torch.tensor([2, 4]), "padding": "left" if case == "left-padding" else "right"}
    assert any("weight_hr" in n for n, _ in mine.named_parameters())
    assert _gradcheck_layer(mine, x, hx, **fwd)


def test_gradgradcheck_engine_create_graph():
    torch.manual_seed(5)
    mine = rk.LSTM(2, 3, proj_size=2, dtype=D64, backend="engine")
    x = torch.randn(3, 2, 2, dtype=D64, requires_grad=True)
    h0, c0 = torch.randn(1, 2, 2, dtype=D64), torch.randn(1, 2, 3, dtype=D64)
    w_hr = mine.weight_hr_l0.detach().clone().requires_grad_()

    def f(x_, w):
        out, _ = functional_call(mine, {"weight_hr_l0": w}, (x_, (h0, c0)), strict=False)
        return out
    assert gradgradcheck(f, (x, w_hr), eps=1e-6, atol=1e-6)


def test_torch_func_grad_equals_autograd():
    _, mine = pair(2, True)
    x = torch.randn(T, B, I, dtype=D64)
    params = {n: p.detach() for n, p in mine.named_parameters()}
    g = torch.func.grad(lambda ps: loss_of(*functional_call(mine, ps, (x,))))(params)
    loss_of(*mine(x)).backward()
    for n, p in mine.named_parameters():
        assert_close(g[n], p.grad, 1e-12, n)


# -- diagnostics -----------------------------------------------------------------------------------------

def test_diagnostics_take_a_projected_rk_lstm_as_torch_nns():
    ref = nn.LSTM(3, 5, proj_size=2, dtype=D64)
    for backend in ("engine", "native"):
        mine = rk.LSTM(3, 5, proj_size=2, dtype=D64, backend=backend)
        mine.load_state_dict(ref.state_dict())
        x = torch.randn(6, 3, dtype=D64)
        a, b = dg.jacobian_norms(mine, x), dg.jacobian_norms(ref, x)
        assert len(a.spectral) == 6
        assert a.spectral == pytest.approx(b.spectral, rel=1e-10, abs=1e-14)
        assert a.frobenius == pytest.approx(b.frobenius, rel=1e-10, abs=1e-14)
        sa, sb = dg.recurrent_spectra(mine), dg.recurrent_spectra(ref)
        assert [(s.gate, s.shape) for s in sa] == [(s.gate, s.shape) for s in sb]
        assert [v for s in sa for v in s.singular_values] == pytest.approx([v for s in sb for v in s.singular_values])


# -- what is refused, and how ----------------------------------------------------------------------------

@pytest.mark.parametrize("proj,pattern", [(5, r"proj_size has to be smaller than hidden_size"),
                                          (-1, r"proj_size should be a positive integer or zero")])
def test_bad_proj_size_is_refused_as_torch_nn_refuses_it(proj, pattern):
    with pytest.raises(ValueError, match=pattern):
        nn.LSTM(I, H, proj_size=proj)
    with pytest.raises(ValueError, match=pattern):
        rk.LSTM(I, H, proj_size=proj)


@pytest.mark.parametrize("backend", ["engine", "native"])
def test_an_h0_of_hidden_size_units_is_refused_naming_proj_size(backend):
    _, mine = pair(backend=backend)
    x = torch.randn(T, B, I, dtype=D64)
    bad = (torch.zeros(1, B, H, dtype=D64), torch.zeros(1, B, H, dtype=D64))
    with pytest.raises(LayerShapeError, match=r"h_0 must have shape \(1, 3, 3\) "
                                              r"\(num_layers\*num_directions, batch, proj_size\), got \(1, 3, 5\)"):
        mine(x, bad)
    with pytest.raises(RuntimeError, match=r"c_0 must have shape \(1, 3, 5\).*hidden_size\), got \(1, 3, 3\)"):
        mine(x, (bad[0][..., :P], bad[0][..., :P]))


def test_native_backend_still_refuses_engine_only_configurations():
    _, mine = pair(backend="native")
    with pytest.raises(ValueError, match=r"backend='native' cannot run this configuration"):
        mine(torch.randn(T, B, I, dtype=D64), truncate=2)


def test_plain_lstm_cell_is_unchanged_and_still_fused_eligible_by_type():
    assert type(LSTMCell()) is not ProjectedLSTMCell and isinstance(ProjectedLSTMCell(), LSTMCell)
    assert _fused._cell_code(LSTMCell()) is not None and _fused._cell_code(ProjectedLSTMCell()) is None


# -- from a review of the change ----------------------------------------------------------------------

def test_projected_cell_alone_says_how_to_build_it():
    with pytest.raises(TypeError, match=r"ProjectedLSTMCell needs W_hr.*rk.LSTM\(input_size, hidden_size, proj_size=P\)"):
        rk.Recurrent(rk.cells.ProjectedLSTMCell(), 3, 5)(torch.randn(4, 2, 3))


@pytest.mark.parametrize("name", ["weight_hr_l0", "bias_ih_l0"])
def test_vmap_over_any_weight_takes_the_engine_on_auto(name):
    """backend="auto" looked at the input and weight_hh_l0 only: vmap over W_hr (or a bias) reached
    torch's LSTM kernel, which has no batching rule."""
    torch.manual_seed(0)
    m, x = rk.LSTM(3, 5, proj_size=2), torch.randn(6, 2, 3)
    params = dict(m.named_parameters())

    def f(w):
        return torch.func.functional_call(m, {**params, name: w}, (x,))[0]

    ws = torch.randn(4, *params[name].shape)
    assert torch.allclose(torch.func.vmap(f)(ws), torch.stack([f(w) for w in ws]), atol=1e-6)
