"""Layer normalisation of the recurrent pre-activation, as a cell that wraps another cell.

    gh_t = LN(U h_{t-1} + b_hh) * gamma + beta       normalised over its G*H features

(The input pre-activation V x_t + b_ih is normalised by the layer before the loop, where autograd
handles it.) params = (gamma, beta), each (G*H,). Hand backward of LN, with xhat the normalised
input and s its standard deviation:  dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / s.
"""
from __future__ import annotations

import torch

EPS = 1e-5


class LayerNormCell:
    def __init__(self, inner):
        self.inner = inner
        self.name = f"ln_{inner.name}"
        self.num_gates = inner.num_gates
        self.num_states = inner.num_states
        self.shared_preactivation = False

    def step(self, xi, gh, state, params):
        gamma, beta = params
        mu = gh.mean(1, keepdim=True)
        inv = torch.rsqrt(gh.var(1, unbiased=False, keepdim=True) + EPS)
        xhat = (gh - mu) * inv
        new, saved = self.inner.step(xi, xhat * gamma + beta, state, ())
        return new, (saved, xhat, inv)

    def step_backward(self, d_state, saved, params):
        gamma, _ = params
        inner_saved, xhat, inv = saved
        d_xi, d_y, d_prev, _ = self.inner.step_backward(d_state, inner_saved, ())
        dxhat = d_y * gamma
        d_gh = inv * (dxhat - dxhat.mean(1, keepdim=True)
                      - xhat * (dxhat * xhat).mean(1, keepdim=True))
        return d_xi, d_gh, d_prev, ((d_y * xhat).sum(0), d_y.sum(0))

    def gates(self, saved):
        return self.inner.gates(saved[0])
