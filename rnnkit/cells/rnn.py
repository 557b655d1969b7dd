"""Elman RNN cell (seeds 001, 002, 004).

    h_t = g(V x_t + U h_{t-1} + b)        g = tanh or relu
    y_t = W h_t + b'                      (the output weights W live in the model heads)

torch.nn names: V = weight_ih_l{k}, U = weight_hh_l{k}, b = bias_ih_l{k} + bias_hh_l{k}.
Backward: with a_t the pre-activation, dL/da_t = dL/dh_t * g'(a_t), and g' is read off h_t:
tanh' = 1 - h_t^2; relu passes dL/dh_t where h_t > 0 (or NaN, as torch's relu backward does) and
0 where h_t <= 0. The engine then adds U^T dL/da_t to dL/dh_{t-1}.
"""
from __future__ import annotations

import torch


class ElmanCell:
    num_gates = 1
    num_states = 1
    shared_preactivation = True

    def __init__(self, nonlinearity: str = "tanh"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        self.name = f"rnn_{nonlinearity}"

    def step(self, xi, gh, state, params=()):
        a = xi if gh is None else xi + gh                     # (B, H) pre-activation
        h = torch.tanh(a) if self.nonlinearity == "tanh" else torch.relu(a)
        return (h,), h

    def step_backward(self, d_state, h, params=()):
        dh = d_state[0]
        if self.nonlinearity == "tanh":
            da = dh * (1 - h * h)
        else:
            da = dh.masked_fill(h <= 0, 0)                    # a select, as torch's relu backward
        return da, da, (None,), ()

    def gates(self, saved):
        return None
