"""rnnkit.trace against an independent reference: a Python loop of torch.nn cells with copied weights
and retain_grad() on every h_t. k = layer * num_directions + direction."""
import pytest
import torch
from torch import nn

import rnnkit as rk
from helpers import (KINDS, as_tuple, assert_close, build, gate_activations, reference_run, torch_cell,
                     weighted_loss)

TOL = 1e-5
T, B, I, H = 7, 3, 3, 4
PICK = [0, 3, 5]                                    # the loss reads the outputs at these steps


def loss_of(out, state, with_final: bool):
    """Outputs at several steps, and (optionally) every final state."""
    return weighted_loss(out[PICK], state if with_final else (), gen_seed=5)


def reference_norms(states_k) -> torch.Tensor:
    """(T, B) ||dL/dh_t|| from the reference's retained gradients (None: no gradient reached h_t)."""
    return torch.stack([torch.zeros(B) if s[0].grad is None else s[0].grad.norm(dim=1) for s in states_k])


@pytest.mark.parametrize("with_final", [True, False])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("kind", KINDS)
def test_grad_norm_equals_reference(kind, layers, bidirectional, with_final):
    m = build(kind, rk, I, H, num_layers=layers, bidirectional=bidirectional)
    x = torch.randn(T, B, I)
    with rk.trace(m) as tr:
        out, state = m(x)
        assert torch.isnan(tr.grad_norm[0]).all()                  # filled only by backward
        loss_of(out, state, with_final).backward()
    keep = []
    out_r, state_r = reference_run(kind, m, x, keep=keep)
    loss_of(out_r, state_r, with_final).backward()
    D = 2 if bidirectional else 1
    assert len(tr.grad_norm) == len(keep) == layers * D
    for k, states_k in enumerate(keep):
        assert tr.grad_norm[k].shape == (T, B)
        assert_close(tr.grad_norm[k], reference_norms(states_k), TOL, f"grad_norm[{k}]")
        assert_close(tr.hidden[k], torch.stack([s[0] for s in states_k]), TOL, f"hidden[{k}]")
    if not bidirectional:                                          # h_6 is read only by the final state
        last = torch.stack([g[T - 1] for g in tr.grad_norm])
        assert bool((last > 0).all()) if with_final else bool((last == 0).all())


def masked_reference(kind, m, x, lengths):
    """Single layer, right padding: padded steps keep the state and output zeros."""
    cell, n = torch_cell(kind, m, 0, 0), 2 if kind == "lstm" else 1
    mask = (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2)      # (T, B, 1)
    state, states, outs = tuple(torch.zeros(B, H) for _ in range(n)), [], []
    for t in range(T):
        new = as_tuple(cell(x[t], state if n == 2 else state[0]))
        state = tuple(torch.where(mask[t], a, b) for a, b in zip(new, state))
        state[0].retain_grad()
        states.append(state)
        outs.append(state[0] * mask[t])
    return torch.stack(outs), tuple(s.unsqueeze(0) for s in state), states


@pytest.mark.parametrize("kind", KINDS)
def test_grad_norm_with_lengths_equals_masked_reference(kind):
    m = build(kind, rk, I, H)
    x, lengths = torch.randn(T, B, I), torch.tensor([2, 7, 1])
    with rk.trace(m) as tr:
        out, state = m(x, lengths=lengths)
        loss_of(out, state, True).backward()
    out_r, state_r, states = masked_reference(kind, m, x, lengths)
    assert_close(out, out_r, TOL, "output")
    loss_of(out_r, state_r, True).backward()
    assert_close(tr.grad_norm[0], reference_norms(states), TOL, "grad_norm")


@pytest.mark.parametrize("kind", ("lstm", "gru"))
def test_cell_states_and_gate_activations_equal_reference(kind):
    m = build(kind, rk, I, H, bidirectional=True)
    x = torch.randn(T, B, I)
    with rk.trace(m) as tr, torch.no_grad():
        m(x)
        keep = []
        reference_run(kind, m, x, keep=keep)
    p = dict(m.named_parameters())
    for d, sfx in enumerate(("_l0", "_l0_reverse")):
        hs = torch.stack([s[0] for s in keep[d]])                     # (T, B, H)
        zero = torch.zeros(1, B, H)
        h_prev = torch.cat((zero, hs[:-1])) if d == 0 else torch.cat((hs[1:], zero))
        xi = x @ p["weight_ih" + sfx].t() + p["bias_ih" + sfx]
        gh = h_prev @ p["weight_hh" + sfx].t() + p["bias_hh" + sfx]
        assert tr.gates[d].shape == (T, B, (4 if kind == "lstm" else 3) * H)
        assert_close(tr.gates[d], gate_activations(kind, xi, gh, H), TOL, f"gates[{d}]")
        if kind == "lstm":
            assert_close(tr.cell[d], torch.stack([s[1] for s in keep[d]]), TOL, f"cell[{d}]")
        else:
            assert tr.cell[d] is None


def test_elman_trace_has_no_gates():
    m = rk.RNN(I, H)
    with rk.trace(m) as tr:
        m(torch.randn(T, B, I))
    assert tr.gates[0] is None and tr.cell[0] is None and tr.hidden[0].shape == (T, B, H)


@pytest.mark.parametrize("backend,tol", [("engine", 1e-6), ("auto", TOL)])
@pytest.mark.parametrize("kind", KINDS)
def test_tracing_changes_no_output_or_gradient(kind, backend, tol):
    m = build(kind, rk, I, H, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
    x = torch.randn(B, T, I)

    def run():
        m.zero_grad()
        out, state = m(x)
        loss_of(out.transpose(0, 1), state, True).backward()
        return [out.detach(), *(s.detach() for s in as_tuple(state))] + [p.grad.clone() for p in m.parameters()]

    plain = run()
    with rk.trace(m):
        traced = run()
    for a, b in zip(traced, plain, strict=True):
        assert_close(a, b, tol, "traced vs plain")


class EncoderDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = rk.GRU(I, H)
        self.dec = rk.LSTM(H, 5, bidirectional=True)

    def forward(self, x):
        y, _ = self.enc(x)
        return self.dec(y)


def test_trace_by_name_with_two_recurrent_layers():
    model, x = EncoderDecoder(), torch.randn(T, B, I)
    with rk.trace(model) as tr:
        out, state = model(x)
        loss_of(out, state, True).backward()
    with pytest.raises(AttributeError, match=r"2 recurrent layers \(enc, dec\).*tr\[name\]"):
        tr.hidden
    with pytest.raises(AttributeError, match="pick one with tr"):
        tr.grad_norm
    assert tr["dec"].cell[1].shape == (T, B, 5) and tr["dec"].gates[0].shape == (T, B, 20)
    assert_close(tr["dec"].hidden[1], out[..., 5:], TOL, "dec reverse hidden")
    keep = []                                                          # reference for the encoder
    y_r, _ = reference_run("gru", model.enc, x, keep=keep)
    out_r, state_r = model.dec(y_r)
    loss_of(out_r, state_r, True).backward()
    assert_close(tr["enc"].hidden[0], y_r, TOL, "enc hidden")
    assert_close(tr["enc"].grad_norm[0], reference_norms(keep[0]), TOL, "enc grad_norm")


def test_trace_keeps_the_latest_call_and_stops_after_the_block():
    m = rk.GRU(I, H)
    x1, x2, x3 = (torch.randn(T, B, I) for _ in range(3))
    with rk.trace(m) as tr:
        m(x1)
        out2, _ = m(x2)
    assert_close(tr.hidden[0], out2, 0.0, "latest call")
    m(x3)
    assert_close(tr.hidden[0], out2, 0.0, "after the block")


def test_trace_of_a_module_without_recurrent_layers_is_an_error():
    with pytest.raises(ValueError, match="Linear contains no rnnkit"):
        with rk.trace(nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("make", [lambda: rk.LSTM(3, 4), lambda: rk.MinGRU(3, 4)], ids=["lstm", "mingru"])
def test_a_trace_kept_open_holds_only_the_latest_call(make):
    """Was: every call's hidden, cell and gates kept (an LSTM(8, 64), T=200, B=16 grew ~4.7 MB a call)."""
    import gc
    import weakref
    m = make()
    with rk.trace(m) as tr:
        m(torch.randn(5, 2, 3))
        first = weakref.ref(tr.hidden[0])
        for _ in range(3):
            m(torch.randn(6, 2, 3))
        gc.collect()
        assert first() is None and tr.hidden[0].shape == (6, 2, 4)


def test_nested_traces_and_copies_made_inside_one():
    """The inner trace of the same layer records while open, then the outer one again (was: the inner
    exit switched the outer off); a deep copy made inside a trace is not traced (was: traced for good)."""
    import copy
    m = rk.GRU(3, 4)
    with rk.trace(m) as outer:
        with rk.trace(m) as inner:
            m(torch.randn(5, 1, 3))
            twin = copy.deepcopy(m)
        m(torch.randn(7, 1, 3))
        assert inner.hidden[0].shape[0] == 5 and outer.hidden[0].shape[0] == 7
        assert twin._trace_sink is None
    assert m._trace_sink is None


def test_truncate_takes_any_integer_type():
    import numpy as np
    m, x = rk.GRU(2, 3), torch.randn(5, 1, 2)
    want = m(x, truncate=2)[0]
    for k in (np.int64(2), torch.tensor(2)):
        assert torch.equal(m(x, truncate=k)[0], want)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="truncate must be a positive int"):
            m(x, truncate=bad)
