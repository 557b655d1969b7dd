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
"""
from __future__ import annotations

import torch


class LSTMCell:
    name = "lstm"
    num_gates = 4
    num_states = 2
    shared_preactivation = True

    def step(self, xi, gh, state, params=()):
        h_prev, c_prev = state
        H = h_prev.shape[-1]
        pre = xi if gh is None else xi + gh                   # (B, 4H) pre-activation
        act = torch.sigmoid(pre)
        act[:, 2 * H:3 * H] = torch.tanh(pre[:, 2 * H:3 * H])
        i, f, g, o = act.chunk(4, 1)
        c = torch.addcmul(f * c_prev, i, g)                   # (B, H)
        tc = torch.tanh(c)
        h = o * tc
        return (h, c), (act, c_prev, tc)

    def step_backward(self, d_state, saved, params=()):
        dh, dc = d_state
        act, c_prev, tc = saved
        i, f, g, o = act.chunk(4, 1)
        do = dh * tc
        dct = dh * o * (1 - tc * tc)
        dc = dct if dc is None else dc + dct
        d_act = torch.cat((dc * g, dc * c_prev, dc * i, do), 1)          # (B, 4H)
        slope = act * (1 - act)                                           # sigmoid'
        H = dh.shape[-1]
        slope[:, 2 * H:3 * H] = 1 - g * g                                 # tanh' for the g block
        d_pre = d_act * slope
        return d_pre, d_pre, (None, dc * f), ()

    def gates(self, saved):
        return saved[0]
