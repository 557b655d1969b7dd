"""LSTM cell, torch.nn's gate order i, f, g, o.

    [i, f, g, o] = V x_t + U h_{t-1} + b       (blocks of H; V = weight_ih, U = weight_hh)
    i, f, o = sigmoid(.)   g = tanh(.)
    c_t = f * c_{t-1} + i * g
    h_t = o * tanh(c_t)

Backward, mirroring the forward in reverse (dc arrives from c_t's use at step t+1):
    do = dh * tanh(c_t)
    dc = dc + dh * o * (1 - tanh(c_t)^2)
    di = dc * g,  df = dc * c_{t-1},  dg = dc * i,  dc_{t-1} = dc * f
    pre-activation gradients: di*i(1-i), df*f(1-f), dg(1-g^2), do*o(1-o)

Projected LSTM (torch.nn.LSTM's proj_size P < H), `ProjectedLSTMCell`: the state is (h (B, P), c (B, H)),
    m_t = o * tanh(c_t)                 (B, H), what the plain cell calls h_t
    h_t = W_hr m_t                      (B, P), W_hr = weight_hr_l{k} (P, H); U = weight_hh is (4H, P)
W_hr comes in as the step's one param; backward: dm = dh W_hr, dW_hr = dh^T m, then the plain backward.
"""
from __future__ import annotations

import torch


class LSTMCell:
    name = "lstm"
    num_gates = 4
    num_states = 2
    shared_preactivation = True

    def step(self, xi, gh, state, params=()):
        c_prev = state[1]
        H = c_prev.shape[-1]                                  # (h_prev, state[0], has P units when projected)
        pre = xi if gh is None else xi + gh                   # (B, 4H) pre-activation
        sig = torch.sigmoid(pre)                              # i, f, o read from here; its g block unused
        g = torch.tanh(pre[:, 2 * H:3 * H])
        i, f, o = sig[:, :H], sig[:, H:2 * H], sig[:, 3 * H:]
        c = torch.addcmul(f * c_prev, i, g)                   # (B, H)
        tc = torch.tanh(c)
        h = o * tc
        return (h, c), (sig, g, c_prev, tc)

    def step_backward(self, d_state, saved, params=()):
        dh, dc = d_state
        sig, g, c_prev, tc = saved
        H = dh.shape[-1]
        i, f, o = sig[:, :H], sig[:, H:2 * H], sig[:, 3 * H:]
        do = dh * tc
        dct = dh * o * (1 - tc * tc)
        dc = dct if dc is None else dc + dct
        d_act = torch.cat((dc * g, dc * c_prev, dc * i, do), 1)          # (B, 4H)
        slope = sig - sig * sig                                           # sigmoid'
        slope[:, 2 * H:3 * H] = 1 - g * g                                 # tanh' for the g block
        d_pre = d_act * slope
        return d_pre, d_pre, (None, dc * f), ()

    def gates(self, saved):
        sig, g = saved[0], saved[1]
        H = g.shape[-1]
        return torch.cat((sig[:, :2 * H], g, sig[:, 3 * H:]), 1)          # i, f, g, o


class ProjectedLSTMCell(LSTMCell):
    """LSTM with a projected hidden state: h_t = W_hr (o * tanh(c_t)); params = (W_hr,) (P, H).
    Not the fused kernel's cell (its type is checked exactly): the engine runs it on its pure-torch path."""
    name = "lstm_proj"

    def step(self, xi, gh, state, params=()):
        if not params:
            raise TypeError("ProjectedLSTMCell needs W_hr (P, H) as its one param; rk.Recurrent gives a cell "
                            "none: build rk.LSTM(input_size, hidden_size, proj_size=P) instead")
        (m, c), saved = super().step(xi, gh, state)
        return (m @ params[0].t(), c), (*saved, m)          # h_t (B, P)

    def step_backward(self, d_state, saved, params=()):
        dh, dc = d_state
        w_hr, m = params[0], saved[-1]
        if dh is None:
            dh = m.new_zeros(m.shape[0], w_hr.shape[0])
        d_pre, _, d_prev, _ = super().step_backward((dh @ w_hr, dc), saved[:-1])
        return d_pre, d_pre, d_prev, (dh.t() @ m,)
