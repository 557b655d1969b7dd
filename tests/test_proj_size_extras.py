"""rk.LSTM(proj_size=P), continued from test_proj_size.py: the engine's extras against reference loops
written here from torch.nn.LSTM's own steps (left padding, truncate, trace, recurrent dropout, zoneout,
layer norm, learned initial state, dropout between layers), and the stream step by step."""
import pytest
import torch
import torch.nn.functional as F
from test_proj_size import (
    D64,
    LENGTHS,
    B,
    H,
    I,
    P,
    T,
    assert_close,
    assert_same_grads,
    loss_of,
    pair,
)
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit as rk
from rnnkit import _fused
from rnnkit import diagnostics as dg

# -- the engine's extras against reference loops of torch.nn.LSTM steps ---------------------------------

def ref_steps(ref, x, h, c, rec=None, zone=None, lengths=None):
    """torch.nn.LSTM (one layer, one direction) step by step from (h, c) (1, B, .): recurrent dropout
    rec (B, P) on the h that U sees, zoneout shares zone = (z_h, z_c) each (T, B, .) or (1, 1, 1), and
    right padding that keeps the state and outputs zeros. Returns out (T, B, P), h_n, c_n, the hs."""
    outs, hs = [], []
    for t in range(x.shape[0]):
        h_in = h if rec is None else h * rec
        _, (h_new, c_new) = ref(x[t:t + 1], (h_in, c))
        if zone is not None:
            zh, zc = (z[t] if z.shape[0] > 1 else z[0] for z in zone)
            h_new, c_new = h_new + zh * (h - h_new), c_new + zc * (c - c_new)
        if lengths is not None:
            m = (t < lengths).to(x.dtype).view(1, -1, 1)
            h_new, c_new = h + m * (h_new - h), c + m * (c_new - c)
            outs.append(m[0] * h_new[0])
        else:
            outs.append(h_new[0])
        hs.append(h_new)
        h, c = h_new, c_new
    return torch.stack(outs), h, c, hs


def zeros_state(x):
    return torch.zeros(1, x.shape[1], P, dtype=x.dtype), torch.zeros(1, x.shape[1], H, dtype=x.dtype)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_left_padding_gives_each_sequence_what_it_gets_alone(bidirectional):
    ref, mine = pair(1, bidirectional)
    x = torch.randn(T, B, I, dtype=D64)
    out, (h, c) = mine(x, lengths=LENGTHS, padding="left")
    loss_of(out, (h, c)).backward()
    g = torch.Generator().manual_seed(7)
    w_out, w_h, w_c = (torch.randn(s.shape, generator=g, dtype=D64) for s in (out, h, c))
    total = 0.0
    for b, n in enumerate(LENGTHS.tolist()):
        o_b, (h_b, c_b) = ref(x[T - n:, b:b + 1])
        assert_close(out[T - n:, b], o_b[:, 0], 1e-12, "out")
        assert not out[:T - n, b].any()                              # padding outputs zeros
        assert_close(h[:, b], h_b[:, 0], 1e-12, "h_n")
        assert_close(c[:, b], c_b[:, 0], 1e-12, "c_n")
        total = total + (o_b[:, 0] * w_out[T - n:, b]).sum() + (h_b[:, 0] * w_h[:, b]).sum() \
            + (c_b[:, 0] * w_c[:, b]).sum()
    total.backward()
    assert_same_grads(ref, mine, 1e-10)


@pytest.mark.parametrize("lengths", [None, LENGTHS])
def test_truncate_is_the_state_detached_every_k_steps(lengths):
    """truncate=k: the same forward, and the gradient of a run whose state is detached before every
    k-th step of each sequence's own steps (torch.nn.LSTM on chunks of k, each sequence alone)."""
    k = 2
    ref, mine = pair(1)
    x = torch.randn(T, B, I, dtype=D64)
    out, (h, c) = mine(x, lengths=lengths, truncate=k)
    loss_of(out, (h, c)).backward()
    g = torch.Generator().manual_seed(7)
    w_out, w_h, w_c = (torch.randn(s.shape, generator=g, dtype=D64) for s in (out, h, c))
    total = 0.0
    for b in range(B):
        n = T if lengths is None else int(lengths[b])
        state, outs = None, []
        for lo in range(0, n, k):                          # detached before steps k, 2k, ... of its own
            state = None if state is None else tuple(s.detach() for s in state)
            o, state = ref(x[lo:min(n, lo + k), b:b + 1], state)
            outs.append(o)
        o_b, (h_b, c_b) = torch.cat(outs), state
        assert_close(out[:n, b], o_b[:, 0], 1e-12, "out")
        assert_close(h[:, b], h_b[:, 0], 1e-12, "h_n")
        assert_close(c[:, b], c_b[:, 0], 1e-12, "c_n")
        total = total + (o_b[:, 0] * w_out[:n, b]).sum() + (h_b[:, 0] * w_h[:, b]).sum() \
            + (c_b[:, 0] * w_c[:, b]).sum()
    total.backward()
    assert_same_grads(ref, mine, 1e-10)


def test_trace_records_h_c_gates_and_grad_norm_of_the_projected_h():
    ref, mine = pair(1)
    x = torch.randn(T, B, I, dtype=D64)
    with rk.trace(mine) as tr:
        out, state = mine(x, lengths=LENGTHS)
        loss_of(out, state).backward()
    r_out, r_h, r_c, hs = ref_steps(ref, x, *zeros_state(x), lengths=LENGTHS)
    assert tr.hidden[0].shape == (T, B, P) and tr.cell[0].shape == (T, B, H) and tr.gates[0].shape == (T, B, 4 * H)
    assert_close(tr.hidden[0], torch.cat(hs), 1e-12, "hidden")
    loss = loss_of(r_out, (r_h, r_c))
    d_hs = torch.autograd.grad(loss, hs)
    assert_close(tr.grad_norm[0], torch.cat(d_hs).norm(dim=2), 1e-10, "grad_norm")
    prof = dg.grad_profile(tr.grad_norm[0])
    assert prof.shape == (T,)
    assert 0.0 <= dg.gate_saturation(tr.gates[0], "lstm").overall <= 1.0


def test_recurrent_dropout_masks_the_projected_h_before_u():
    ref, mine = pair(1, recurrent_dropout=0.4)
    mine.train()
    x = torch.randn(T, B, I, dtype=D64)
    torch.manual_seed(11)
    out, (h, c) = mine(x)
    loss_of(out, (h, c)).backward()
    torch.manual_seed(11)
    rec = torch.empty(B, P, dtype=D64).bernoulli_(0.6) / 0.6                  # the layer's draw, replayed
    assert 0 < (rec == 0).sum() < rec.numel()
    r_out, r_h, r_c, _ = ref_steps(ref, x, *zeros_state(x), rec=rec)
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        assert_close(a, b, 1e-12)
    loss_of(r_out, (r_h, r_c)).backward()
    assert_same_grads(ref, mine, 1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_zoneout_keeps_shares_of_the_projected_h_and_of_c(training):
    zh, zc = 0.3, 0.2
    ref, mine = pair(1, zoneout=(zh, zc))
    mine.train(training)
    x = torch.randn(T, B, I, dtype=D64)
    torch.manual_seed(12)
    out, (h, c) = mine(x)
    loss_of(out, (h, c)).backward()
    if training:
        torch.manual_seed(12)
        zone = (_fused.bernoulli((T, B, P), zh, D64), _fused.bernoulli((T, B, H), zc, D64))
    else:
        zone = (torch.full((1, 1, 1), zh, dtype=D64), torch.full((1, 1, 1), zc, dtype=D64))
    r_out, r_h, r_c, _ = ref_steps(ref, x, *zeros_state(x), zone=zone)
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        assert_close(a, b, 1e-12)
    loss_of(r_out, (r_h, r_c)).backward()
    assert_same_grads(ref, mine, 1e-10)


def test_layer_norm_against_a_hand_written_loop():
    """LN(V x + b_ih) * gx + bx + LN(U h + b_hh) * g + b, gates, c, and h = W_hr (o * tanh c)."""
    mine = rk.LSTM(I, H, proj_size=P, layer_norm=True, dtype=D64, backend="engine")
    with torch.no_grad():
        for p in mine.parameters():
            p.uniform_(-0.7, 0.7)
    x = torch.randn(T, B, I, dtype=D64)
    h0, c0 = torch.randn(1, B, P, dtype=D64), torch.randn(1, B, H, dtype=D64)
    out, (h_n, c_n) = mine(x, (h0, c0), lengths=LENGTHS)
    loss_of(out, (h_n, c_n)).backward()
    ps = {n: p.detach().clone().requires_grad_() for n, p in mine.named_parameters()}
    h, c, outs = h0[0], c0[0], []
    xi = F.layer_norm(F.linear(x, ps["weight_ih_l0"], ps["bias_ih_l0"]), (4 * H,),
                      ps["ln_ih_weight_l0"], ps["ln_ih_bias_l0"])
    for t in range(T):
        gh = F.layer_norm(F.linear(h, ps["weight_hh_l0"], ps["bias_hh_l0"]), (4 * H,),
                          ps["ln_hh_weight_l0"], ps["ln_hh_bias_l0"])
        i, f, g, o = (xi[t] + gh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = (torch.sigmoid(o) * torch.tanh(c_new)) @ ps["weight_hr_l0"].t()
        m = (t < LENGTHS).to(D64).unsqueeze(1)
        h, c = h + m * (h_new - h), c + m * (c_new - c)
        outs.append(m * h)
    r_out = torch.stack(outs)
    for a, b in ((out, r_out), (h_n[0], h), (c_n[0], c)):
        assert_close(a, b, 1e-12)
    loss_of(r_out, (h.unsqueeze(0), c.unsqueeze(0))).backward()
    for n, p in mine.named_parameters():
        assert_close(p.grad, ps[n].grad, 1e-10, n)


@pytest.mark.parametrize("packed", [False, True])
def test_learned_initial_state_has_p_units_for_h(packed):
    ref, mine = pair(2, True, learn_initial_state=True, backend="auto")
    assert mine.initial_h.shape == (4, P) and mine.initial_c.shape == (4, H)
    with torch.no_grad():
        mine.initial_h.uniform_(-1, 1)
        mine.initial_c.uniform_(-1, 1)
    x = torch.randn(T, B, I, dtype=D64)
    h0 = mine.initial_h.detach().clone().requires_grad_()
    c0 = mine.initial_c.detach().clone().requires_grad_()
    hx = (h0.unsqueeze(1).expand(4, B, P), c0.unsqueeze(1).expand(4, B, H))
    if packed:
        xp = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
        (out, state), (r_out, r_state) = mine(xp), ref(xp, hx)
        out, r_out = out.data, r_out.data
    else:
        (out, state), (r_out, r_state) = mine(x, truncate=T), ref(x, hx)        # truncate=T: the engine
    for a, b in ((out, r_out), (state[0], r_state[0]), (state[1], r_state[1])):
        assert_close(a, b, 1e-12)
    loss_of(out, state).backward()
    loss_of(r_out, r_state).backward()
    assert_close(mine.initial_h.grad, h0.grad, 1e-10, "initial_h")
    assert_close(mine.initial_c.grad, c0.grad, 1e-10, "initial_c")
    assert_same_grads(ref, mine, 1e-10)


def test_dropout_between_layers_as_torch_layers_with_f_dropout():
    """num_layers=2, dropout=p on the engine: layer 0, F.dropout of its (T, B, 2P) output, layer 1."""
    ref, mine = pair(2, True, dropout=0.5)
    mine.train()
    lay0 = nn.LSTM(I, H, bidirectional=True, proj_size=P, dtype=D64)
    lay1 = nn.LSTM(2 * P, H, bidirectional=True, proj_size=P, dtype=D64)
    sd = ref.state_dict()
    lay0.load_state_dict({k.replace("_l0", "_l0"): v for k, v in sd.items() if "_l0" in k})
    lay1.load_state_dict({k.replace("_l1", "_l0"): v for k, v in sd.items() if "_l1" in k})
    x = torch.randn(T, B, I, dtype=D64)
    torch.manual_seed(13)
    out, (h, c) = mine(x)
    torch.manual_seed(13)
    mid, (h0_, c0_) = lay0(x)
    dropped = F.dropout(mid, 0.5, True)
    assert (dropped == 0).any()
    r_out, (h1_, c1_) = lay1(dropped)
    for a, b in ((out, r_out), (h, torch.cat((h0_, h1_))), (c, torch.cat((c0_, c1_)))):
        assert_close(a, b, 1e-12)


# -- streaming -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"layer_norm": True}, {"zoneout": (0.2, 0.3)},
                                {"learn_initial_state": True}], ids=["plain", "ln", "zoneout", "initial"])
@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_stream_and_step_equal_the_full_forward(kw, dtype):
    mine = rk.LSTM(I, H, 2, proj_size=P, dtype=dtype, **kw).eval()
    with torch.no_grad():
        for p in mine.parameters():
            p.uniform_(-0.6, 0.6)
    x = torch.randn(T, B, I, dtype=dtype)
    out, (h, c) = mine(x)
    tol = 1e-12 if dtype == D64 else 1e-6
    s = rk.Stream(mine, batch_size=B)
    assert s._fast == ("lstm" if kw in ({}, {"learn_initial_state": True}) else None)
    state = None
    for t in range(T):
        y = s(x[t])
        y2, state = mine.step(x[t], state)
        assert y.shape == (B, P)
        assert_close(y, out[t], tol, f"stream y_{t}")
        assert_close(y2, out[t], tol, f"step y_{t}")
    assert_close(s.state[0], h, tol, "stream h")
    assert_close(s.state[1], c, tol, "stream c")
    assert_close(state[0], h, tol, "step h")
    assert_close(state[1], c, tol, "step c")


def test_stream_reset_takes_a_projected_state_and_names_proj_size_when_wrong():
    mine = rk.LSTM(I, H, 2, proj_size=P, dtype=D64).eval()
    h0, c0 = torch.randn(2, 1, P, dtype=D64), torch.randn(2, 1, H, dtype=D64)
    x = torch.randn(T, 1, I, dtype=D64)
    out, _ = mine(x, (h0, c0))
    s = rk.Stream(mine, state=(h0[:, 0], c0[:, 0]))                  # unbatched (L, P), (L, H)
    for t in range(T):
        assert_close(s(x[t, 0]), out[t, 0], 1e-12)
    with pytest.raises(ValueError, match=r"h must have shape \(2, 1, 3\) \(num_layers, batch, proj_size\)"):
        s.reset((torch.zeros(2, 1, H, dtype=D64), c0))
    with pytest.raises(ValueError, match=r"c must have shape \(2, 1, 5\) \(num_layers, batch, hidden_size\)"):
        mine.step(x[0], (h0, h0))


def test_stream_of_a_torch_nn_projected_lstm_points_to_rk_lstm():
    with pytest.raises(TypeError, match=r"build the rnnkit layer.*rk.LSTM takes proj_size=2 too"):
        rk.Stream(nn.LSTM(3, 4, proj_size=2))
