"""The extras beyond torch.nn, each against a reference loop written from its equation:
recurrent (variational) dropout, zoneout, layer normalisation, learnable initial state, left padding."""
import warnings

import pytest
import torch
from torch import nn

import rnnkit as rk
from helpers import (KINDS, as_tuple, assert_close, build, cell_step, layer_norm_reference, pair,
                     torch_cell, weighted_loss)

TOL = 1e-5
T, B, I, H = 6, 4, 3, 5


def grads(loss, module, x):
    return torch.autograd.grad(loss, [x, *module.parameters()], allow_unused=True, materialize_grads=True)


def assert_all_close(xs, ys, tol=TOL, what=""):
    for i, (a, b) in enumerate(zip(xs, ys, strict=True)):
        assert_close(a, b, tol, f"{what}[{i}]")


def loop(kind, module, x, rec_mask=None, zone=None):
    """Single layer, one direction: gh = U (h * rec_mask) + b_hh, then zoneout h = z h_prev + (1-z) h~."""
    p = dict(module.named_parameters())
    state = tuple(torch.zeros(x.shape[1], H) for _ in range(2 if kind == "lstm" else 1))
    outs = []
    for t in range(x.shape[0]):
        h = state[0] if rec_mask is None else state[0] * rec_mask
        new = cell_step(kind, x[t] @ p["weight_ih_l0"].t() + p["bias_ih_l0"],
                        h @ p["weight_hh_l0"].t() + p["bias_hh_l0"], state)
        if zone is not None:
            new = tuple(z * s + (1 - z) * n for z, s, n in zip(zone, state, new))
        state = new
        outs.append(state[0])
    return torch.stack(outs), tuple(s.unsqueeze(0) for s in state)


# -- defaults -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_extras_are_off_by_default_and_outputs_equal_torch(kind):
    ref, mine = pair(kind, I, H, num_layers=2, backend="engine")
    assert mine.recurrent_dropout == 0 and not any(mine.zoneout)
    assert not mine.layer_norm and not mine.learn_initial_state
    assert list(mine.state_dict()) == list(ref.state_dict())
    assert mine.training
    x = torch.randn(T, B, I)
    out_r, st_r = ref(x)
    out_m, st_m = mine(x)
    assert_close(out_m, out_r, TOL, "output")
    assert_all_close(as_tuple(st_m), as_tuple(st_r), what="state")


# -- recurrent dropout ----------------------------------------------------------------------------------

def _observable_rnn(p):
    """relu RNN with V = U = I and no bias: h_t = relu(x_t + mask * h_{t-1}), so the mask shows."""
    m = rk.RNN(H, H, nonlinearity="relu", bias=False, recurrent_dropout=p)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.eye(H))
        m.weight_hh_l0.copy_(torch.eye(H))
    return m


def test_recurrent_dropout_draws_one_mask_per_sequence_for_all_steps():
    m, x = _observable_rnn(0.5), torch.ones(T, B, H)
    with torch.no_grad():
        out, _ = m(x)                                                # (T, B, H)
    kept = 2.0 ** torch.arange(1, T + 1).view(T, 1, 1) - 1       # h_t = 1 + 2 h_{t-1}: 1, 3, 7, ...
    dropped = (out == 1).all(0)                                    # (B, H): h_t = x_t at every step
    assert bool((dropped | (out == kept).all(0)).all())            # every unit: one mask, all steps
    assert 0 < int(dropped.sum()) < B * H
    assert not bool((dropped == dropped[0]).all())                 # a mask per sequence, not per batch
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x)[0], torch.arange(1.0, T + 1).view(T, 1, 1).expand(T, B, H))


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_dropout_equals_reference_loop_with_the_same_mask(kind):
    p = 0.4
    m = build(kind, rk, I, H, recurrent_dropout=p)
    x = torch.randn(T, B, I, requires_grad=True)
    torch.manual_seed(9)
    out, state = m(x)
    torch.manual_seed(9)
    mask = torch.empty(B, H).bernoulli_(1 - p) / (1 - p)
    assert 0 < int((mask == 0).sum()) < B * H
    out_r, state_r = loop(kind, m, x, rec_mask=mask)
    assert_close(out, out_r, TOL, "output")
    assert_all_close(as_tuple(state), state_r, what="state")
    assert_all_close(grads(weighted_loss(out, state), m, x), grads(weighted_loss(out_r, state_r), m, x),
                     what="grad")
    m.eval()
    assert_close(m(x)[0], loop(kind, m, x)[0], TOL, "eval: no dropout")


# -- zoneout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,zoneout", [("rnn_tanh", 0.3), ("rnn_relu", 0.5), ("gru", 0.25),
                                          ("lstm", 0.3), ("lstm", (0.2, 0.6))])
def test_zoneout_in_eval_is_the_expected_value(kind, zoneout):
    m = build(kind, rk, I, H, zoneout=zoneout).eval()
    x = torch.randn(T, B, I, requires_grad=True)
    out, state = m(x)
    zone = zoneout if isinstance(zoneout, tuple) else (zoneout, zoneout)
    out_r, state_r = loop(kind, m, x, zone=zone)
    assert_close(out, out_r, TOL, "output")
    assert_all_close(as_tuple(state), state_r, what="state")
    assert_all_close(grads(weighted_loss(out, state), m, x), grads(weighted_loss(out_r, state_r), m, x),
                     what="grad")


@pytest.mark.parametrize("kind", ("rnn_tanh", "gru"))
def test_zoneout_in_training_keeps_each_unit_or_updates_it(kind):
    m = build(kind, rk, I, H, zoneout=0.3)
    x = torch.randn(T, 8, I)
    with torch.no_grad():
        out, _ = m(x)                                              # (T, 8, H)
        cell = torch_cell(kind, m, 0, 0)
        prev = torch.cat((torch.zeros(1, 8, H), out[:-1]))
        cand = torch.stack([cell(x[t], prev[t]) for t in range(T)])
    kept = (out - prev).abs() < 1e-7
    updated = (out - cand).abs() < 1e-6
    assert bool((kept | updated).all())
    share = float((kept & ~updated).float().mean())
    assert 0.15 < share < 0.45                                      # about z = 0.3
    assert not bool((kept == kept[0]).all())                        # a fresh mask at every step


# -- layer normalisation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_layer_norm_equals_reference_loop(kind):
    m = build(kind, rk, I, H, layer_norm=True)
    G = {"lstm": 4, "gru": 3}.get(kind, 1)
    names = ["ln_ih_weight_l0", "ln_ih_bias_l0", "ln_hh_weight_l0", "ln_hh_bias_l0"]
    params = dict(m.named_parameters())
    for n in names:
        assert params[n].shape == (G * H,)
        assert torch.equal(params[n], torch.full((G * H,), 1.0 if "weight" in n else 0.0))
        with torch.no_grad():
            params[n].copy_(torch.randn(G * H))
    x = torch.randn(T, B, I, requires_grad=True)
    out, state = m(x)
    out_r, state_r = layer_norm_reference(kind, m, x)
    assert_close(out, out_r, TOL, "output")
    assert_all_close(as_tuple(state), tuple(s.unsqueeze(0) for s in state_r), what="state")
    assert_all_close(grads(weighted_loss(out, state), m, x),
                     grads(weighted_loss(out_r, tuple(s.unsqueeze(0) for s in state_r)), m, x), what="grad")


def test_layer_norm_parameters_for_every_layer_and_direction():
    m = rk.GRU(I, H, num_layers=2, bidirectional=True, layer_norm=True)
    ln = sorted(n for n, _ in m.named_parameters() if n.startswith("ln_"))
    assert len(ln) == 16 and "ln_hh_bias_l1_reverse" in ln and "ln_ih_weight_l0" in ln


# -- learnable initial state ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ("engine", "native"))
@pytest.mark.parametrize("kind", KINDS)
def test_learn_initial_state_is_used_and_gets_gradients(kind, backend):
    mine = build(kind, rk, I, H, num_layers=2, bidirectional=True, learn_initial_state=True,
                 backend=backend)
    names = ("initial_h", "initial_c")[: 2 if kind == "lstm" else 1]
    for n in names:
        p = getattr(mine, n)
        assert p.shape == (4, H) and not bool(p.any())             # (L*D, H), zeros at start
        with torch.no_grad():
            p.copy_(torch.randn(4, H))
    ref = build(kind, nn, I, H, num_layers=2, bidirectional=True)
    ref.load_state_dict({k: v for k, v in mine.state_dict().items() if not k.startswith("initial_")})
    x = torch.randn(T, B, I)
    hx = tuple(getattr(mine, n).detach().unsqueeze(1).expand(4, B, H).contiguous() for n in names)
    out_r, st_r = ref(x, hx if len(hx) == 2 else hx[0])
    out, state = mine(x)
    assert_close(out, out_r, TOL, "output")
    weighted_loss(out, state).backward()
    for n in names:
        g = getattr(mine, n).grad
        assert g is not None and float(g.abs().min()) > 0, n
    mine.zero_grad(set_to_none=True)
    weighted_loss(*mine(x, tuple(h.clone() for h in hx) if len(hx) == 2 else hx[0].clone())).backward()
    assert all(getattr(mine, n).grad is None for n in names)       # a given hx replaces it


# -- left padding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_equals_each_sequence_alone(kind):
    ref, mine = pair(kind, I, H, num_layers=2, bidirectional=True)
    lengths = torch.tensor([3, T, 1, 4])
    x = torch.randn(T, B, I, requires_grad=True)                  # padding holds random values
    out, state = mine(x, lengths=lengths, padding="left")
    g = torch.Generator().manual_seed(4)
    w_out = torch.randn(out.shape, generator=g)
    w_st = [torch.randn(s.shape, generator=g) for s in as_tuple(state)]
    loss = (out * w_out).sum() + sum((s * w).sum() for s, w in zip(as_tuple(state), w_st))
    loss.backward()
    for b, L in enumerate(lengths.tolist()):
        pad = T - L
        assert bool((out[:pad, b] == 0).all()) and bool((x.grad[:pad, b] == 0).all())
        xb = x[pad:, b:b + 1].detach().clone().requires_grad_()
        out_b, st_b = ref(xb)
        assert_close(out[pad:, b], out_b[:, 0], TOL, f"output of sequence {b}")
        for s, sb in zip(as_tuple(state), as_tuple(st_b), strict=True):
            assert_close(s[:, b], sb[:, 0], TOL, f"final state of sequence {b}")
        loss_b = (out_b * w_out[pad:, b:b + 1]).sum() + sum(
            (sb * w[:, b:b + 1]).sum() for sb, w in zip(as_tuple(st_b), w_st))
        loss_b.backward()                                          # ref's grads add up over b
        assert_close(x.grad[pad:, b], xb.grad[:, 0], TOL, f"input grad of sequence {b}")
    for name, p in ref.named_parameters():
        assert_close(dict(mine.named_parameters())[name].grad, p.grad, TOL, f"grad of {name}")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cls", [rk.RNN, rk.LSTM, rk.GRU])
def test_layer_norm_on_an_empty_batch_is_silent(cls, fused, monkeypatch):
    """B = 0: empty outputs and zero gradients, and no warning (torch's var warned on 0 rows)."""
    if not fused:
        monkeypatch.setenv("RNNKIT_NO_FUSED", "1")
    layer = cls(3, 4, layer_norm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = layer(torch.randn(5, 0, 3))
        out.sum().backward()
    assert out.shape == (5, 0, 4)
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())
