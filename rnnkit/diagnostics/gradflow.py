"""How the gradient travels back through time: profiles, memory horizon, explosion, Jacobian norms.

BPTT multiplies the gradient by one Jacobian dh_t/dh_{t-1} = diag(g'(a_t)) U per step back, so
||dL/dh_t|| read from a trace shows directly whether that product shrinks (vanishing) or grows
(exploding) over distance. Conventions: a *profile* is a NumPy array (T,) indexed by time t, and
"steps back" k = T - 1 - t counts back from the last step (k = 0 is the last step).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Horizon:
    """steps: how many steps back from the last step the gradient norm first falls below
    `threshold` x its value at the last step. If it never does, steps = length and censored = True
    (the memory reaches at least the whole sequence)."""
    steps: int
    censored: bool
    threshold: float
    length: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Explosion:
    """Step-to-step growth factor r_k = ||dL/dh_{T-1-k-1}|| / ||dL/dh_{T-1-k}|| going back in time.
    exploding = both the geometric mean and the median of r exceed `min_factor` (sustained growth)."""
    geometric_mean: float
    median: float
    exploding: bool
    min_factor: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class JacobianNorms:
    """||dh_T/dh_{T-k}|| for k = 0..T-1 steps back (k = 0 is the identity, norm 1)."""
    spectral: tuple[float, ...]       # largest singular value
    frobenius: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"spectral": list(self.spectral), "frobenius": list(self.frobenius)}


def grad_profile(grad_norm: Tensor) -> np.ndarray:
    """Mean over the batch of a trace's per-example ||dL/dh_t||: (T, B) -> (T,)."""
    g = torch.as_tensor(grad_norm).detach().double()
    if g.dim() != 2:
        raise ValueError(f"grad_profile: expected tr.grad_norm[k] of shape (T, B), got {tuple(g.shape)}")
    if torch.isnan(g).all():
        raise ValueError("grad_profile: the trace holds no gradient yet; call loss.backward() inside "
                         "the `with rnnkit.trace(...)` block first")
    return g.mean(1).cpu().numpy()                                             # (T,)


def steps_back(profile: np.ndarray) -> np.ndarray:
    """The profile reordered by steps back: out[k] = profile[T-1-k]."""
    return np.asarray(profile, dtype=float)[::-1].copy()


def memory_horizon(profile: np.ndarray, threshold: float = 1e-3) -> Horizon:
    """Steps back at which the gradient norm first falls below threshold x its last-step value.
    Meaningful when the loss is on the last output only (then the last step holds all of it)."""
    back = steps_back(profile)                                                 # (T,)
    T = len(back)
    if T < 2 or not np.isfinite(back[0]) or back[0] <= 0:
        raise ValueError(f"memory_horizon: need T >= 2 and a positive finite gradient at the last "
                         f"step; got T={T}, last={back[0] if T else None}")
    below = np.nonzero(back[1:] < threshold * back[0])[0]
    if len(below) == 0:
        return Horizon(T, True, threshold, T)
    return Horizon(int(below[0]) + 1, False, threshold, T)


def growth_factors(profile: np.ndarray) -> np.ndarray:
    """r_k = norm one step further back / norm at k, for k = 0, 1, ... up to where the norm
    underflows to 0 (float32 gradients that vanish end as exact zeros; ratios past that are undefined)."""
    back = steps_back(profile)
    zero = np.nonzero(~(back > 0))[0]
    back = back[: zero[0]] if len(zero) else back
    return back[1:] / back[:-1]


def explosion(profile: np.ndarray, min_factor: float = 1.01) -> Explosion:
    """Detects a gradient that grows step after step going back in time."""
    r = growth_factors(profile)
    if len(r) == 0:
        raise ValueError("explosion: need at least 2 steps with a positive gradient norm")
    geo = float(np.exp(np.mean(np.log(r))))
    med = float(np.median(r))
    return Explosion(geo, med, bool(geo > min_factor and med > min_factor), min_factor)


def jacobian_norms(layer: nn.RNNBase, x: Tensor, hx=None) -> JacobianNorms:
    """||dh_T/dh_t|| for one input sequence x (T, I) through a one-layer, one-direction recurrent
    layer (rnnkit's or torch.nn's), by autograd. For the LSTM, h_t is perturbed with c_t held fixed
    (the path through c_t is counted through c_{t+1} onwards only via h). The sequence is copied H
    times so that one backward pass with the identity as output gradient gives every row of every
    Jacobian at once. Returns norms for k = 0..T-1 steps back."""
    if layer.num_layers != 1 or layer.bidirectional:
        raise ValueError("jacobian_norms: needs a layer with num_layers=1 and bidirectional=False")
    if x.dim() != 2 or x.shape[1] != layer.input_size:
        raise ValueError(f"jacobian_norms: x must be one sequence (T, {layer.input_size}), "
                         f"got shape {tuple(x.shape)}")
    H = layer.hidden_size
    xb = x.unsqueeze(1).expand(-1, H, -1)                                      # (T, H copies, I)
    state = _initial_state(layer, hx, H, x)
    hs = []
    for t in range(x.shape[0]):
        xt = xb[t:t + 1].transpose(0, 1) if layer.batch_first else xb[t:t + 1]
        _, state = layer(xt, state)
        if isinstance(state, tuple):
            state = (state[0].detach().requires_grad_() if t == 0 else state[0], state[1])
            hs.append(state[0])
        else:
            state = state.detach().requires_grad_() if t == 0 else state
            hs.append(state)
    eye = torch.eye(H, dtype=x.dtype, device=x.device).unsqueeze(0)            # (1, H, H)
    grads = torch.autograd.grad(hs[-1], hs, grad_outputs=eye, allow_unused=True)
    spec, frob = [], []
    for g in reversed(grads):                                                  # k = 0, 1, ...
        J = torch.zeros(H, H) if g is None else g[0].detach()                  # (H, H) = dh_T/dh_t
        spec.append(float(torch.linalg.matrix_norm(J, ord=2)))
        frob.append(float(torch.linalg.matrix_norm(J)))
    return JacobianNorms(tuple(spec), tuple(frob))


def _initial_state(layer, hx, B, x):
    if hx is None:
        z = torch.zeros(1, B, layer.hidden_size, dtype=x.dtype, device=x.device)
        return (z, z.clone()) if isinstance(layer, nn.LSTM) else z
    if isinstance(hx, tuple):
        return tuple(h.reshape(1, 1, -1).expand(1, B, -1).contiguous() for h in hx)
    return hx.reshape(1, 1, -1).expand(1, B, -1).contiguous()
