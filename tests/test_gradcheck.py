"""torch.autograd.gradcheck in float64: each cell's hand backward, the engine's scan (masks, reverse,
truncation), every extra through the layers, and a user's cell with no backward of its own."""
import pytest
import torch
import torch.nn.functional as F
from helpers import KINDS, as_tuple, cell_step, reference_run, weighted_loss
from torch.autograd import gradcheck
from torch.func import functional_call

import rnnkit as rk
from rnnkit.cells import ElmanCell, GRUCell, LayerNormCell, LSTMCell
from rnnkit.engine import ScanOptions, scan

D64 = torch.float64
T, B, H = 5, 3, 3
LENGTHS = torch.tensor([3, 5, 1])                         # unsorted, one full and one of length 1
CELL_KINDS = KINDS + ("ln_rnn_tanh", "ln_lstm", "ln_gru")


def make_cell(kind: str):
    if kind.startswith("ln_"):
        return LayerNormCell(make_cell(kind[3:]))
    if kind.startswith("rnn"):
        return ElmanCell(kind[4:])
    return {"lstm": LSTMCell, "gru": GRUCell}[kind]()


def rand(*shape):
    return torch.randn(*shape, dtype=D64, requires_grad=True)


def scan_inputs(kind: str, T_: int = T, bias: bool = True):
    """xi, weight_hh, bias_hh, state0, params for one scan of `kind` in float64."""
    cell = make_cell(kind)
    GH = cell.num_gates * H
    state0 = tuple(rand(B, H) for _ in range(cell.num_states))
    params = (rand(GH), rand(GH)) if kind.startswith("ln_") else ()
    return cell, rand(T_, B, GH), rand(GH, H), rand(GH) if bias else None, state0, params


def length_mask(padding: str | None, T_: int = T):
    """(T, B, 1) float64 mask, 1 on real steps, built here independently of rnnkit."""
    if padding is None:
        return None
    t = torch.arange(T_).unsqueeze(1)
    real = t < LENGTHS if padding == "right" else t >= T_ - LENGTHS
    return real.to(D64).unsqueeze(2)


def scan_fn(cell, n_state: int, run=scan, **opts):
    """The scan as a function of its tensors; run: engine.scan, or a route of it (engine.pure_scan)."""
    def f(xi, w, b, *rest):
        out, final = run(ScanOptions(cell, **opts), xi, tuple(rest[:n_state]), w, b, tuple(rest[n_state:]))
        return (out, *final)
    return f


def scan_args(xi, w, b, state0, params):
    return (xi, w, b, *state0, *params)


# -- (a) one step: the hand backward ---------------------------------------------------------------

class HandStep(torch.autograd.Function):
    """One cell step whose backward is the cell's own step_backward."""

    @staticmethod
    def forward(ctx, cell, n, xi, gh, *rest):
        new, saved = cell.step(xi, gh, tuple(rest[:n]), tuple(rest[n:]))
        ctx.cell, ctx.saved, ctx.params, ctx.n = cell, saved, tuple(rest[n:]), n
        return tuple(new)

    @staticmethod
    def backward(ctx, *d_new):
        d_xi, d_gh, d_prev, d_p = ctx.cell.step_backward(d_new, ctx.saved, ctx.params)
        d_prev = tuple(torch.zeros_like(d_new[0]) if d is None else d for d in d_prev)
        return (None, None, d_xi, d_gh, *d_prev, *d_p)


def step_inputs(kind: str):
    cell, xi, w, b, state0, params = scan_inputs(kind, T_=1)
    return cell, xi[0].detach().requires_grad_(), rand(B, cell.num_gates * H), state0, params


def textbook_step(kind, xi, gh, state, params):
    if kind.startswith("ln_"):
        gh = F.layer_norm(gh, gh.shape[-1:], params[0], params[1])
        kind = kind[3:]
    return cell_step(kind, xi, gh, state)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_hand_backward_gradcheck(kind):
    cell, xi, gh, state, params = step_inputs(kind)
    assert gradcheck(lambda *a: HandStep.apply(cell, len(state), *a), (xi, gh, *state, *params))


def _vjp_pair(kind, step_fn):
    """Gradients of <random cotangent, new state> by the hand backward and by autograd of step_fn."""
    cell, xi, gh, state, params = step_inputs(kind)
    inputs = (xi, gh, *state, *params)
    n = len(state)
    hand = HandStep.apply(cell, n, *inputs)
    ref = step_fn(cell, xi, gh, state, params)
    cot = [torch.randn_like(h) for h in hand]
    g_hand = torch.autograd.grad(hand, inputs, cot, allow_unused=True, materialize_grads=True)
    g_ref = torch.autograd.grad(ref, inputs, cot, allow_unused=True, materialize_grads=True)
    return hand, ref, g_hand, g_ref


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_step_and_backward_match_textbook_equations(kind):
    hand, ref, g_hand, g_ref = _vjp_pair(kind, lambda c, xi, gh, s, p: textbook_step(kind, xi, gh, s, p))
    for a, b in zip(hand, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(g_hand, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", CELL_KINDS)
def test_cell_hand_backward_matches_autograd_of_cell_step(kind, request):
    _, _, g_hand, g_ref = _vjp_pair(kind, lambda c, xi, gh, s, p: c.step(xi, gh, s, p)[0])
    for a, b in zip(g_hand, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", CELL_KINDS)
def test_scan_one_step_gradcheck(kind, bias):
    cell, xi, w, b, state0, params = scan_inputs(kind, T_=1, bias=bias)
    args = (xi, w, b, *state0, *params) if bias else (xi, w, *state0, *params)
    f = scan_fn(cell, len(state0))
    assert gradcheck(f if bias else (lambda xi_, w_, *r: f(xi_, w_, None, *r)), args)


# -- (b) the scan over a sequence: masks and direction ------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("padding", [None, "right", "left"])
@pytest.mark.parametrize("kind", KINDS + ("ln_gru",))
def test_scan_gradcheck(kind, padding, reverse):
    cell, xi, w, b, state0, params = scan_inputs(kind)
    f = scan_fn(cell, len(state0), reverse=reverse, mask=length_mask(padding))
    assert gradcheck(f, scan_args(xi, w, b, state0, params))


def test_second_backward_through_one_graph():
    """gradcheck back-propagates several times through one graph: the engine must allow it."""
    m = rk.GRU(2, 3, backend="engine")
    x = torch.randn(4, 1, 2, requires_grad=True)
    out, _ = m(x)
    (g1,) = torch.autograd.grad(out.sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g1, g2)


# -- (c) truncated BPTT -------------------------------------------------------------------------------

def reference_truncated(kind, xi, w, b, state0, k, reverse, mask):
    """Autograd loop over processing order that detaches the state every k steps; with a mask, each row
    before its own k-th, 2k-th ... real step (padding steps are not counted)."""
    state, outs = state0, [None] * xi.shape[0]
    own = torch.zeros(xi.shape[1], 1, dtype=xi.dtype)                   # real steps so far, per row
    for i, t in enumerate(range(T - 1, -1, -1) if reverse else range(T)):
        if k is not None and mask is None and i and i % k == 0:
            state = tuple(s.detach() for s in state)
        elif k is not None and mask is not None:
            cut = [bool(mask[t, r] and own[r] and own[r] % k == 0) for r in range(xi.shape[1])]
            state = tuple(torch.stack([s[r].detach() if c else s[r] for r, c in enumerate(cut)]) for s in state)
            own = own + mask[t]
        new = cell_step(kind, xi[t], state[0] @ w.t() + b, state)
        if mask is not None:
            new = tuple(p + mask[t] * (s - p) for s, p in zip(new, state))
        outs[t] = new[0] if mask is None else new[0] * mask[t]
        state = new
    return (torch.stack(outs), *state)


def _grads(f, args):
    outs = f(*args)
    loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=D64)).sum()
               for o in outs)
    return torch.autograd.grad(loss, args), outs


@pytest.mark.parametrize("k", [T, T + 3])
@pytest.mark.parametrize("kind", KINDS)
def test_truncate_at_least_T_passes_gradcheck_and_equals_full_bptt(kind, k):
    cell, xi, w, b, state0, _ = scan_inputs(kind)
    args = scan_args(xi, w, b, state0, ())
    mask = length_mask("right")
    assert gradcheck(scan_fn(cell, len(state0), truncate=k, mask=mask), args)
    g_trunc, _ = _grads(scan_fn(cell, len(state0), truncate=k, mask=mask), args)
    g_full, _ = _grads(scan_fn(cell, len(state0), mask=mask), args)
    for a, b_ in zip(g_trunc, g_full, strict=True):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_truncate_below_T_equals_detaching_reference(kind, k, reverse, padding):
    cell, xi, w, b, state0, _ = scan_inputs(kind)
    args, mask = scan_args(xi, w, b, state0, ()), length_mask(padding)
    g, outs = _grads(scan_fn(cell, len(state0), truncate=k, reverse=reverse, mask=mask), args)
    g_ref, outs_ref = _grads(lambda xi_, w_, b_, *s: reference_truncated(kind, xi_, w_, b_, s, k, reverse, mask),
                             args)
    for a, b_ in zip(outs + g, outs_ref + g_ref, strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-10)
    g_full, _ = _grads(scan_fn(cell, len(state0), reverse=reverse, mask=mask), args)
    assert float((g[1] - g_full[1]).abs().max()) > 1e-6       # truncation changes dL/dU


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_gradient_is_not_the_full_gradient(kind):
    cell, xi, w, b, state0, _ = scan_inputs(kind)
    f = scan_fn(cell, len(state0), truncate=2)
    assert not gradcheck(f, scan_args(xi, w, b, state0, ()), raise_exception=False)


@pytest.mark.parametrize("route", ["fused", "pure"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kind", KINDS)
def test_truncated_gradient_of_a_sequence_does_not_depend_on_padding(kind, padding, route, monkeypatch):
    """A 4-step sequence beside a 7-step one (so padded by 3), truncate=2, bidirectional, loss on its
    outputs and final states: the gradients it sends to its input and to the weights equal those it
    gets alone. Was: cuts counted over padded time, so a cut inside right padding stopped all of h_n's
    gradient (x and W_hh gradients 0.0 for a GRU), and left padding or the reverse direction shifted
    the cuts."""
    if route == "pure":
        monkeypatch.setenv("RNNKIT_NO_FUSED", "1")
    m = layer(kind)
    x = torch.randn(7, 2, 2, dtype=D64)
    short = x[:4, 1] if padding == "right" else x[3:, 1]
    xb, xs = x.clone().requires_grad_(), short.clone().unsqueeze(1).requires_grad_()
    out, state = m(xb, lengths=torch.tensor([7, 4]), padding=padding, truncate=2)
    rows = out[:4, 1:] if padding == "right" else out[3:, 1:]
    weighted_loss(rows, tuple(s[:, 1:] for s in as_tuple(state))).backward()
    batched = [xb.grad[:4, 1:] if padding == "right" else xb.grad[3:, 1:]] + [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    out_a, state_a = m(xs, truncate=2)
    weighted_loss(out_a, state_a).backward()
    alone = [xs.grad] + [p.grad for p in m.parameters()]
    assert float(alone[0].abs().max()) > 1e-3
    for a, b_ in zip(batched, alone, strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_truncate_equals_detaching_reference(kind):
    m = layer(kind)
    x = torch.randn(7, 2, 2, dtype=D64)
    x_mine, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, state = m(x_mine, truncate=3)
    weighted_loss(out, state).backward()
    cells = {}
    out_r, state_r = reference_run(kind, m, x_ref, truncate=3, cells=cells)
    weighted_loss(out_r, state_r).backward()
    torch.testing.assert_close(out, out_r, rtol=0, atol=1e-12)
    torch.testing.assert_close(x_mine.grad, x_ref.grad, rtol=0, atol=1e-10)
    for k, cell in cells.items():
        sfx = f"_l{k // 2}" + ("_reverse" if k % 2 else "")
        for name, p in cell.named_parameters():
            torch.testing.assert_close(getattr(m, name + sfx).grad, p.grad, rtol=0, atol=1e-10)


# -- (d) every extra, through the layers ------------------------------------------------------------

def layer_fn(m, names, seed=None, **call):
    def f(x, *ps):
        if seed is not None:
            torch.manual_seed(seed)                            # the same random masks every call
        out, state = functional_call(m, dict(zip(names, ps)), (x,), call)
        return (out, *as_tuple(state))
    return f


def layer(kind, num_layers=2, **kw):
    lib = {"lstm": rk.LSTM, "gru": rk.GRU}.get(kind, rk.RNN)
    extra = {} if kind in ("lstm", "gru") else dict(nonlinearity=kind[4:])
    return lib(2, 2, num_layers=num_layers, bidirectional=True, **extra, **kw).double()


EXTRAS = {
    "layer_norm": (dict(layer_norm=True), "train", None),
    "zoneout_eval": (dict(zoneout=0.3), "eval", None),
    "zoneout_train": (dict(zoneout=0.3), "train", 11),
    "recurrent_dropout": (dict(recurrent_dropout=0.4), "train", 12),
    "learn_initial_state": (dict(learn_initial_state=True), "train", None),
    "learn_initial_state_native": (dict(learn_initial_state=True, backend="native"), "train", None),
    "all_with_lengths": (dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.3,
                              learn_initial_state=True), "train", 13),
}


@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("kind", ("rnn_tanh", "lstm", "gru"))
def test_extra_gradcheck_through_layer(kind, extra):
    kw, mode, seed = EXTRAS[extra]
    m = layer(kind, num_layers=2 if extra == "all_with_lengths" else 1, **kw)
    m.train(mode == "train")
    names = [n for n, _ in m.named_parameters()]
    ps = [(torch.randn_like(p) * 0.6).requires_grad_() for p in m.parameters()]   # LN gains not 1
    call = dict(lengths=torch.tensor([4, 2])) if extra == "all_with_lengths" else {}
    x = rand(4, 2, 2)                                          # (T, B, I)
    fast = extra == "all_with_lengths"                         # ~600 inputs: random projections
    assert gradcheck(layer_fn(m, names, seed, **call), (x, *ps), fast_mode=fast)


# -- (e) a user's cell with no step_backward ---------------------------------------------------------

class ScaledMinimalCell:
    """h_t = u * h_{t-1} + (1 - u) * tanh(s * xn + hn),  u = sigmoid(xu + hu); params = (s,)."""
    name = "scaled_minimal"
    num_gates = 2
    num_states = 1
    shared_preactivation = False

    def step(self, xi, gh, state, params):
        (s,) = params
        H_ = state[0].shape[-1]
        u = torch.sigmoid(xi[:, :H_] + gh[:, :H_])
        cand = torch.tanh(s * xi[:, H_:] + gh[:, H_:])
        return (u * state[0] + (1 - u) * cand,), None


def _minimal_inputs():
    return rand(T, B, 2 * H), rand(2 * H, H), rand(2 * H), (rand(B, H),), (rand(H),)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_user_cell_without_backward_gradcheck(padding, reverse):
    cell = ScaledMinimalCell()
    assert not hasattr(cell, "step_backward")
    xi, w, b, state0, params = _minimal_inputs()
    f = scan_fn(cell, 1, reverse=reverse, mask=length_mask(padding), truncate=None)
    assert gradcheck(f, scan_args(xi, w, b, state0, params))


def test_user_cell_forward_and_gradients_match_autograd_loop():
    cell = ScaledMinimalCell()
    xi, w, b, state0, params = _minimal_inputs()
    args = scan_args(xi, w, b, state0, params)

    def loop(xi_, w_, b_, h, s):
        hs = []
        for t in range(T):
            h = cell.step(xi_[t], h @ w_.t() + b_, (h,), (s,))[0][0]
            hs.append(h)
        return torch.stack(hs), h

    g, outs = _grads(scan_fn(cell, 1), args)
    g_ref, outs_ref = _grads(loop, args)
    for a, b_ in zip(outs + g, outs_ref + g_ref, strict=True):
        torch.testing.assert_close(a, b_, rtol=0, atol=1e-12)


class LeakyMinimalCell:
    """h_t = (h_{t-1} + tanh(xi + gh)) / 2, no params and no step_backward."""
    name = "leaky_minimal"
    num_gates = 1
    num_states = 1
    shared_preactivation = False

    def step(self, xi, gh, state, params=()):
        return ((state[0] + torch.tanh(xi + gh)) / 2,), None


def test_user_cell_without_backward_under_layer_norm_gradcheck():
    m = rk.Recurrent(LeakyMinimalCell(), 2, 2, layer_norm=True, dtype=D64)
    names = [n for n, _ in m.named_parameters()]
    ps = [(torch.randn_like(p) * 0.6).requires_grad_() for p in m.parameters()]
    assert gradcheck(layer_fn(m, names), (rand(4, 2, 2), *ps))
