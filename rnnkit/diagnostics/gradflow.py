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

from ..boundary import h_size


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
    exploding = both the geometric mean and the median of r exceed `min_factor` (sustained growth).
    vanished_at: steps back at which the norm is first exactly 0 (float32 underflow, or units saturated
    so that no gradient passes), None if never; the factors stop there (further ratios are 0/0). At 1
    the gradient is gone after a single step: the one factor is 0, and so are both statistics."""
    geometric_mean: float
    median: float
    exploding: bool
    min_factor: float
    vanished_at: int | None = None

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
    zero = _first_zero(back)
    back = back[:zero] if zero is not None else back
    return back[1:] / back[:-1]


def _first_zero(back: np.ndarray) -> int | None:
    """Steps back at which the norm is first 0 (or NaN), None if never."""
    zero = np.nonzero(~(back > 0))[0]
    return int(zero[0]) if len(zero) else None


def explosion(profile: np.ndarray, min_factor: float = 1.01) -> Explosion:
    """Detects a gradient that grows step after step going back in time."""
    back = steps_back(profile)
    if len(back) < 2 or not np.isfinite(back[0]) or back[0] <= 0:
        raise ValueError(f"explosion: need T >= 2 and a positive finite gradient at the last step; got "
                         f"T={len(back)}, last={back[0] if len(back) else None}")
    r = growth_factors(profile)
    vanished_at = _first_zero(back)
    if len(r) == 0:                               # 0 one step back: the gradient is gone, factor 0
        return Explosion(0.0, 0.0, False, min_factor, vanished_at)
    geo = float(np.exp(np.mean(np.log(r))))
    med = float(np.median(r))
    return Explosion(geo, med, bool(geo > min_factor and med > min_factor), min_factor, vanished_at)


def jacobian_norms(layer: nn.RNNBase, x: Tensor, hx=None) -> JacobianNorms:
    """||dh_T/dh_t|| for one input sequence x (T, I) through a one-layer, one-direction recurrent
    layer (rnnkit's or torch.nn's), by autograd. For the LSTM, h_t is perturbed with c_t held fixed
    (the path through c_t is counted through c_{t+1} onwards only via h). The sequence is copied H
    times so that one backward pass with the identity as output gradient gives every row of every
    Jacobian at once. Returns norms for k = 0..T-1 steps back. An LSTM with proj_size P feeds back the
    projected h_t: its Jacobians are P x P."""
    if layer.num_layers != 1 or layer.bidirectional:
        raise ValueError("jacobian_norms: needs a layer with num_layers=1 and bidirectional=False")
    if x.dim() != 2 or x.shape[1] != layer.input_size:
        raise ValueError(f"jacobian_norms: x must be one sequence (T, {layer.input_size}), "
                         f"got shape {tuple(x.shape)}")
    H = h_size(layer)                                                         # units of h_t
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
        J = torch.zeros(H, H, dtype=x.dtype) if g is None else g[0].detach()  # (H, H) = dh_T/dh_t
        spec.append(float(torch.linalg.matrix_norm(J, ord=2)))
        frob.append(float(torch.linalg.matrix_norm(J)))
    return JacobianNorms(tuple(spec), tuple(frob))


def _initial_state(layer, hx, B, x):
    if hx is None:
        h = torch.zeros(1, B, h_size(layer), dtype=x.dtype, device=x.device)
        if isinstance(layer, nn.LSTM):
            return h, torch.zeros(1, B, layer.hidden_size, dtype=x.dtype, device=x.device)
        return h
    if isinstance(hx, tuple):
        return tuple(h.reshape(1, 1, -1).expand(1, B, -1).contiguous() for h in hx)
    return hx.reshape(1, 1, -1).expand(1, B, -1).contiguous()
