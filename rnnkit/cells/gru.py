"""GRU cell, exactly as torch.nn.GRU defines it (reset gate applied after the recurrent product).

    [xr, xz, xn] = V x_t + b_ih         [hr, hz, hn] = U h_{t-1} + b_hh
    r = sigmoid(xr + hr)                z = sigmoid(xz + hz)
    n = tanh(xn + r * hn)
    h_t = (1 - z) * n + z * h_{t-1}

Backward, mirroring the forward in reverse:
    dn = dh (1 - z),  dz = dh (h_{t-1} - n),  dh_{t-1} (direct) = dh z
    dan = dn (1 - n^2),  dr = dan * hn
    d[xr, xz, xn] = [dr r(1-r), dz z(1-z), dan]
    d[hr, hz, hn] = [dr r(1-r), dz z(1-z), dan * r]
"""
from __future__ import annotations

import torch


class GRUCell:
    name = "gru"
    num_gates = 3
    num_states = 1
    shared_preactivation = False

    def step(self, xi, gh, state, params=()):
        h_prev = state[0]
        H = h_prev.shape[-1]
        rz = torch.sigmoid(xi[:, :2 * H] + gh[:, :2 * H])     # (B, 2H)
        r, z = rz.chunk(2, 1)
        hn = gh[:, 2 * H:]
        n = torch.tanh(torch.addcmul(xi[:, 2 * H:], r, hn))
        h = torch.addcmul(n, z, h_prev - n)
        return (h,), (rz, n, hn, h_prev)

    def step_backward(self, d_state, saved, params=()):
        dh = d_state[0]
        rz, n, hn, h_prev = saved
        H = n.shape[1]
        r, z = rz[:, :H], rz[:, H:]
        dn = torch.addcmul(dh, dh, z, value=-1)                       # dh (1 - z)
        dan = torch.addcmul(dn, dn * n, n, value=-1)                  # dn (1 - n^2)
        d_xi = torch.cat((dan * hn, dh * (h_prev - n), dan), 1)      # (B, 3H), r z blocks not yet scaled
        d_xi[:, :2 * H] *= rz - rz * rz                               # sigmoid' of r and z
        d_gh = d_xi.clone()
        d_gh[:, 2 * H:] *= r
        return d_xi, d_gh, (dh * z,), ()

    def gates(self, saved):
        rz, n = saved[0], saved[1]
        return torch.cat((rz, n), 1)
