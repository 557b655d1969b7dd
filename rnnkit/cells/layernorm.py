"""Layer normalisation of the recurrent pre-activation, as a cell that wraps another cell.

    gh_t = LN(U h_{t-1} + b_hh) * gamma + beta       normalised over its G*H features
    xi_t = LN(V x_t + b_ih) * gamma_x + beta_x       with normalize_input=True

params = (gamma, beta), each (G*H,), or with normalize_input (gamma, beta, gamma_x, beta_x): the
scan then receives xi raw; any params after these are the inner cell's (a projected LSTM's W_hr). The
fused CPU kernel normalises each row of xi inside its time loop; the pure-torch engine calls
`prepare_input` first, which normalises all steps at once with autograd and leaves (gamma, beta, and
the inner cell's) for the steps. Hand backward of LN, with xhat the normalised input and s its
standard deviation:  dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import derived_backward, has_hand_backward

EPS = 1e-5


class LayerNormCell:
    def __init__(self, inner, normalize_input: bool = False):
        self.inner = inner
        self.normalize_input = bool(normalize_input)
        self.name = f"ln_{getattr(inner, 'name', type(inner).__name__)}"
        self._hand = has_hand_backward(inner)
        self.num_gates = inner.num_gates
        self.num_states = inner.num_states
        self.shared_preactivation = False

    def prepare_input(self, xi, params):
        """(xi, the params the steps take): xi's layer norm over all steps when the cell owns it."""
        if not self.normalize_input:
            return xi, params
        return F.layer_norm(xi, xi.shape[-1:], params[2], params[3], EPS), (*params[:2], *params[4:])

    def step(self, xi, gh, state, params):
        gamma, beta, inner = params[0], params[1], tuple(params[2:])
        dev = gh - gh.mean(1, keepdim=True)
        inv = torch.rsqrt((dev * dev).mean(1, keepdim=True) + EPS)    # (not .var: it warns on a batch of 0)
        xhat = dev * inv
        y = xhat * gamma + beta
        new, saved = self.inner.step(xi, y, state, inner)
        return new, (saved if self._hand else (xi, y, state), xhat, inv)

    def step_backward(self, d_state, saved, params):
        gamma, inner = params[0], tuple(params[2:])
        inner_saved, xhat, inv = saved
        backward = self.inner.step_backward if self._hand else self._derived
        d_xi, d_y, d_prev, d_inner = backward(d_state, inner_saved, inner)
        dxhat = d_y * gamma
        d_gh = inv * (dxhat - dxhat.mean(1, keepdim=True)
                      - xhat * (dxhat * xhat).mean(1, keepdim=True))
        return d_xi, d_gh, d_prev, ((d_y * xhat).sum(0), d_y.sum(0), *d_inner)

    def _derived(self, d_state, saved, params):
        return derived_backward(self.inner, d_state, saved, params)

    def gates(self, saved):
        gates = getattr(self.inner, "gates", None)
        return gates(saved[0]) if self._hand and callable(gates) else None
