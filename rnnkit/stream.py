"""Streaming inference: one observation at a time, for online prediction.

    y_t, state = rk.stream.step(layer, x_t, state)     # functional: the layer's own cell and weights
    s = rk.Stream(layer, batch_size=1)                   # keeps the state between calls, fast
    y_t = s(x_t); s.state; s.reset()

`step` runs, for each stacked layer k, exactly what the engine runs at one time step:
    xi = V_k x_t + b_ih,  gh = U_k h_{t-1} + b_hh,  (h_t, c_t) = layer._cell.step(xi, gh, state)
so it cannot disagree with the layer's math: fed a sequence one step at a time it gives the layer's
output (tests/test_stream.py). It works for rk.RNN, rk.LSTM, rk.GRU (with layer_norm, zoneout and
learn_initial_state) and rk.MinGRU, rk.MinLSTM. Streaming is inference: dropout and recurrent dropout
are off, zoneout keeps its expected share of the old state (the layer's eval behaviour); a layer in
training mode with any of these on is refused (call layer.eval()). Bidirectional layers are refused:
their backward direction starts at the end of the sequence, which a stream never sees.

`Stream` is the fast path. Per call it does one addmm per layer and a few in-place elementwise ops
on preallocated buffers, under torch.inference_mode, with no validation beyond a shape check:
  - all states live in one buffer [x | h_1 | h_2 | ...] (B, I + L*H), so layer k reads its input
    and its previous state as one contiguous window [h_{k-1} | h_k] and one product with the
    stacked weight [V_k U_k]^T (I_k + H, G*H) gives its whole pre-activation;
  - LSTM: gates reordered to (i, f, o, g) so one sigmoid_ covers three gates and one tanh_ the fourth;
    c.mul_(f).addcmul_(i, g); h = o * tanh(c) written straight into the buffer. On CPU in float32/64
    (not projected) the whole step is one call into the fused kernel (rnnkit/_fused/stream.cpp: the
    product, then the gates, c and h in one loop), ~8x torch.nn.LSTM on a length-1 sequence at H <= 128;
    the first such Stream builds that kernel if it is not built yet (once per machine, cached;
    RNNKIT_NO_FUSED=1 keeps the torch ops);
  - GRU: columns [r, -z, x_n, h_n] (the z block negated, so its sigmoid is 1 - z; x and h parts of n
    kept apart, as torch.nn.GRU needs r * (U_n h + b_hn)); n = tanh(x_n + r * h_n); h.lerp_(n, 1 - z)
    (on CPU in float32/64 one call into the fused kernel, as the LSTM's);
  - Elman: tanh or relu of the product, into the buffer.
The stacked weights are rebuilt when any parameter or buffer (a parametrization's too) changes (its version
counter or storage)
or any torch.optim step was taken (fused optimizer steps write without counting a version), so an
optimizer step or load_state_dict between calls is picked up; weights that a forward pre-hook computes
(torch.nn.utils.prune, the hook-based weight_norm and spectral_norm) are computed as forward would.
The kernels are in rnnkit/stream_kernels.py. Other cells (layer_norm, zoneout, a
user's cell, the min cells) run `step`'s per-layer code on the same buffers.
A projected LSTM (proj_size P) streams too: its h_k in the buffer has P units (its c_k H), the LSTM
kernel ends with h = W_hr (o * tanh(c)).
Shapes: B batch, I input size, H hidden size (P for h when projected), L layers, G gate blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.optim.optimizer import register_optimizer_step_post_hook

from .boundary import autocast_input, check_state, h_size, positive_int
from .cells import LayerNormCell
from .cells.base import check_step, has_hand_backward
from .layers import _Recurrent
from .minimal import _MinRecurrent
from .stream_kernels import KERNELS, GenericKernel, fast_kind

# -- what one stacked layer computes --------------------------------------------------------------------

class _Sub:
    """One stacked layer's cell and weights (V, b_ih, U, b_hh), its layer-norm and zoneout extras."""

    def __init__(self, layer, k: int):
        w = lambda name: getattr(layer, f"{name}_l{k}", None)  # noqa: E731
        self.V, self.b_ih, self.U, self.b_hh = w("weight_ih"), w("bias_ih"), w("weight_hh"), w("bias_hh")
        self.ln = bool(getattr(layer, "layer_norm", False))
        self.cell = LayerNormCell(layer._cell) if self.ln else layer._cell
        self.W_hr = w("weight_hr")                                              # projected LSTM (P, H)
        self.params = ((w("ln_hh_weight"), w("ln_hh_bias")) if self.ln else ()) + (
            () if self.W_hr is None else (self.W_hr,))
        self.ln_ih = (w("ln_ih_weight"), w("ln_ih_bias")) if self.ln else None
        zone = getattr(layer, "zoneout", ())
        self.zone = tuple(zone) if any(zone) else None
        self.checked = False                                                   # the cell's step result, once

    def __call__(self, x: Tensor, state: tuple) -> tuple:
        """The new state from x (B, I_k) and state (tuple of (B, H)), as the engine's step."""
        xi = F.linear(x, self.V, self.b_ih)                                    # (B, G*H)
        if self.ln:
            xi = F.layer_norm(xi, xi.shape[-1:], *self.ln_ih)
        if self.U is None:                                                     # min cells: no U
            res = self.cell.step(xi, None, state, self.params)
        else:
            gh = F.linear(state[0], self.U, self.b_hh)                         # (B, G*H)
            if has_hand_backward(self.cell) and self.cell.shared_preactivation:
                res = self.cell.step(xi + gh, None, state, self.params)        # as the engine fuses it
            else:
                res = self.cell.step(xi, gh, state, self.params)
        if not self.checked:
            check_step(self.cell, res, state)
            self.checked = True
        new = res[0]
        if self.zone is not None:                                              # eval zoneout
            new = tuple(n + z * (p - n) for n, p, z in zip(new, state, self.zone))
        return tuple(new)


def _check_streamable(layer) -> None:
    """Refuse, with what to do, a layer that cannot be streamed (or not in its current mode)."""
    name = type(layer).__name__
    if not isinstance(layer, (_Recurrent, _MinRecurrent)):
        kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
        hint = "; build the rnnkit layer of the same name and copy the weights over with load_state_dict" \
            if isinstance(layer, torch.nn.RNNBase) else ""
        if getattr(layer, "proj_size", 0):
            hint += f" (rk.LSTM takes proj_size={layer.proj_size} too)"
        raise TypeError(f"stream: expected an rnnkit RNN, LSTM, GRU, MinGRU or MinLSTM layer, got {kind}{hint}")
    if layer.bidirectional:
        raise ValueError(f"stream: {name} is bidirectional; its backward direction starts at the end "
                         "of the sequence, which a stream never sees. Stream a unidirectional layer.")
    random = _random_extras(layer)
    if layer.training and random:
        raise ValueError(f"stream: {name} is in training mode with {', '.join(random)}; streaming runs "
                         "the layer's inference function: call layer.eval() first")


def _subs(layer) -> list[_Sub]:
    """Its stacked layers as _Sub objects, from the weights its forward would use now."""
    _reparametrize(layer)
    return [_Sub(layer, k) for k in range(layer.num_layers)]


_REPARAMETRIZATIONS = (prune.BasePruningMethod, WeightNorm, SpectralNorm)


def _reparametrize(layer) -> None:
    """Run the forward pre-hooks that compute a weight from others (torch.nn.utils.prune's masks, the
    hook-based weight_norm and spectral_norm), as the layer's forward would before reading it: a stream
    reads the weights without calling forward. (torch.nn.utils.parametrize needs nothing: its weights are
    computed when read.)"""
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, _REPARAMETRIZATIONS):
            hook(layer, ())


def _random_extras(layer) -> list[str]:
    """The extras that draw random masks in training mode (streaming runs their eval behaviour)."""
    random = [f"dropout={layer.dropout}"] if layer.dropout and layer.num_layers > 1 else []
    if getattr(layer, "recurrent_dropout", 0.0):
        random.append(f"recurrent_dropout={layer.recurrent_dropout}")
    if any(getattr(layer, "zoneout", ())):
        random.append(f"zoneout={layer.zoneout}")
    return random


def _default_state(layer, B: int, like: Tensor) -> tuple:
    """(L, B, H) zeros (or the learned initial state) per state component."""
    if isinstance(layer, _Recurrent):
        return tuple(layer._default_state(B, like))
    return (like.new_zeros(layer.num_layers, B, layer.hidden_size),)


def _check_state(layer, state, B: int, unbatched: bool, like: Tensor) -> tuple:
    """state in torch.nn's layout -> tuple of (L, B, H) tensors (validated: shape, and like's dtype)."""
    if state is None:
        return _default_state(layer, B, like)
    L, P, H = layer.num_layers, h_size(layer), layer.hidden_size
    want = tuple((L, n) if unbatched else (L, B, n) for n in (P, H)[:layer._cell.num_states])
    units = ("proj_size" if P != H else "hidden_size", "hidden_size")
    parts = check_state(f"stream: {type(layer).__name__}", state, layer._cell.num_states,
                        want, like.dtype, labels=("h", "c"), layout="num_layers", units=units)
    return tuple(s.unsqueeze(1) for s in parts) if unbatched else parts


def _check_input(layer, x_t) -> tuple[Tensor, bool]:
    name = type(layer).__name__
    if not isinstance(x_t, Tensor):
        raise TypeError(f"stream: x_t must be a torch.Tensor, got {type(x_t).__name__}")
    if x_t.dim() not in (1, 2) or x_t.shape[-1] != layer.input_size:
        raise ValueError(f"stream: {name} takes one time step x_t of shape (batch, {layer.input_size}) "
                         f"or ({layer.input_size},), got shape {tuple(x_t.shape)}")
    return (x_t.unsqueeze(0), True) if x_t.dim() == 1 else (x_t, False)


def step(layer, x_t: Tensor, state=None):
    """One time step of `layer`: x_t (B, I) or (I,), state in torch.nn's layout ((L, B, H), or the
    tuple (h, c) for the LSTM; None for the layer's initial state). Returns (y_t (B, H), new state).
    Differentiable (it is plain torch code), so it also serves online learning."""
    _check_streamable(layer)
    subs = _subs(layer)
    x, unbatched = _check_input(layer, x_t)
    x, state, amp = autocast_input(layer, x, state)                            # the layer's own dtype, as forward
    if x.dtype != layer.weight_ih_l0.dtype:
        raise TypeError(f"stream: x_t dtype {x.dtype} does not match the weights' {layer.weight_ih_l0.dtype}")
    state = _check_state(layer, state, x.shape[0], unbatched, x)
    finals = []
    with amp:
        for k, sub in enumerate(subs):
            new = sub(x, tuple(s[k] for s in state))
            finals.append(new)
            x = new[0]                                                         # (B, H) into layer k+1
    out = tuple(torch.stack([f[j] for f in finals]) for j in range(len(state)))   # (L, B, H) each
    if unbatched:
        x, out = x.squeeze(0), tuple(s.squeeze(1) for s in out)
    return x, (out if len(out) == 2 else out[0])


# -- the fast stateful stream ---------------------------------------------------------------------------

_OPTIMIZER_STEPS = [0]                 # optimizer steps taken in this process, once a Stream was built
_HOOKED = []


def _count_optimizer_steps() -> None:
    """Count every torch.optim step (a global post-hook, registered by the first Stream)."""
    if not _HOOKED:
        _HOOKED.append(register_optimizer_step_post_hook(
            lambda *_: _OPTIMIZER_STEPS.__setitem__(0, _OPTIMIZER_STEPS[0] + 1)))

_INFERENCE_GUARD = getattr(torch._C, "_InferenceMode", None)


def _inference_mode():
    """A fresh inference-mode guard for each call: one torch.inference_mode() object entered by two threads at
    once keeps only one of their guards, and the other thread stayed in inference mode after the call. torch's
    C++ guard itself where it is there (0.4 us to enter and leave, against 1.1 for torch.inference_mode())."""
    return _INFERENCE_GUARD(True) if _INFERENCE_GUARD is not None else torch.inference_mode()


class Stream:
    """Keeps `layer`'s state between calls: `y_t = s(x_t)` with x_t (B, I) or, for batch_size 1, (I,).
    `s.state` reads the state in torch.nn's layout, `s.reset(state=None)` sets it (None: initial).

    Inference only: calls run under torch.inference_mode, so y_t carries no gradient (for online
    learning use `rk.stream.step`, plain differentiable torch code). x_t must have the weights' dtype.
    Parameter changes are picked up on the next call (an optimizer step, fused or not, load_state_dict,
    a new Parameter, pruning, layer.to(dtype or device) — the state is moved along); writes through `p.data`, and
    in-place writes to weights that are inference tensors (made under torch.inference_mode), bypass
    torch's version counter and need `s.refresh()`. A stream pickles and deep-copies (its layer and
    state; buffers are rebuilt). Under torch.autocast it computes in the weights' dtype, as the layer's
    engine does (`step` too: its state feeds back). An infinite input gives torch.nn's numbers on the CPU fused steps; the
    torch-op GRU step (CUDA, half precision, no compiler) turns ±inf into NaN (its one stacked product
    multiplies zero blocks by it)."""

    def __init__(self, layer, batch_size: int = 1, state=None):
        size = positive_int(batch_size)                                         # numpy ints too
        if size is None:
            raise ValueError(f"Stream: batch_size must be a positive int, got {batch_size!r}")
        _check_streamable(layer)
        self._setup(layer, size, state)

    def _setup(self, layer, size: int, state) -> None:
        self.layer, self.batch_size = layer, size
        self._fast = fast_kind(layer)
        self._random = bool(_random_extras(layer))                             # refused in training mode
        self._alloc(layer.weight_ih_l0, None)
        self._key, self._held = None, ()
        _count_optimizer_steps()
        self.reset(state)

    def _alloc(self, like: Tensor, keep: tuple | None) -> None:
        """State buffers in like's dtype and device; keep: the old buffers' values, moved along."""
        L, I, H, B = self.layer.num_layers, self.layer.input_size, self.layer.hidden_size, self.batch_size
        P = h_size(self.layer)                                                 # units of h (P < H: projected)
        with torch.inference_mode():
            self._buf = like.new_zeros(B, I + L * P)                           # [x | h_1 | ... | h_L]
            self._x = self._buf[:, :I]
            self._h = [self._buf[:, I + k * P:I + (k + 1) * P] for k in range(L)]   # (B, P) views
            self._rest = [like.new_zeros(L, B, H) for _ in range(self.layer._cell.num_states - 1)]
            if keep is not None:
                self._buf.copy_(keep[0])
                for r, old in zip(self._rest, keep[1:]):
                    r.copy_(old)
        self._shape, self._dtype = (B, I), like.dtype

    # -- state ------------------------------------------------------------------------------------------
    @property
    def state(self):
        """A copy of the state in torch.nn's layout: (L, B, H), or (h, c) for the LSTM."""
        self._sync()                                                           # layer.to(...) since
        parts = (torch.stack(self._h), *(r.clone() for r in self._rest))
        return parts if len(parts) == 2 else parts[0]

    def reset(self, state=None) -> None:
        """Set the state: None for the layer's initial state, or a state in torch.nn's layout
        ((L, B, H) each; (L, H) also at batch_size 1)."""
        self._sync()                                                           # layer.to(...) since
        first = state[0] if isinstance(state, (tuple, list)) and state else state
        unbatched = self.batch_size == 1 and isinstance(first, Tensor) and first.dim() == 2
        parts = _check_state(self.layer, state, self.batch_size, unbatched, self._buf)
        with torch.inference_mode():
            for k, h in enumerate(self._h):
                h.copy_(parts[0][k])
            for r, p in zip(self._rest, parts[1:]):
                r.copy_(p)

    def refresh(self) -> None:
        """Rebuild from the layer's parameters now (needed only after writes that bypass the version
        counter: through `p.data`, or in place to weights that are inference tensors)."""
        self._key = None

    # -- the hot call -----------------------------------------------------------------------------------
    def __call__(self, x_t: Tensor) -> Tensor:
        if self._version_key()[0] != self._key:
            self._build()
        with _inference_mode():
            if self._random and self.layer.training:
                _check_streamable(self.layer)                                  # raises: training mode
            unbatched = False
            if type(x_t) is not Tensor or x_t.shape != self._shape or x_t.dtype is not self._dtype:
                x_t, unbatched = self._check_x(x_t)
            self._x.copy_(x_t)
            for run in self._kernels:
                run()
        y = self._h[-1].clone()                                                # (B, H), a normal tensor
        return y[0] if unbatched else y

    def _sync(self) -> None:
        """Rebuild now if the layer changed since the last build (as a call would)."""
        if self._version_key()[0] != self._key:
            self._build()

    def _version_key(self):
        """What changes when a parameter or buffer (a pruning mask) does: the tensor itself, its version
        counter and storage; and the count of optimizer steps, since torch's fused optimizer steps
        (fused=True) write the parameters without counting a version. Inference tensors (built or loaded
        under inference_mode) keep no version counter: their storage only. The tensor is told by id(), and
        the last build holds the tensors it was keyed on, so that no new tensor can take an old one's id;
        without the id, a new Parameter (version 0) that the allocator put at the freed address of the one
        it replaced (it happened in 6 of 30 tries) read as unchanged, and the stream kept the old weights."""
        layer = self.layer
        params = [p for p in (layer.parameters() if layer._modules else layer._parameters.values())  # parametrizations
                  if p is not None]
        if layer._modules:                                                     # parametrizations' buffers too
            params += list(layer.buffers())
        elif layer._buffers:
            params += [b for b in layer._buffers.values() if b is not None]
        try:
            key = [(id(p), p._version, p.data_ptr()) for p in params]          # the hot path: no per-tensor test
        except RuntimeError:                                                   # an inference tensor's _version
            key = [(id(p), None if p.is_inference() else p._version, p.data_ptr()) for p in params]
        key.append(_OPTIMIZER_STEPS[0])
        return key, params

    def _check_x(self, x_t) -> tuple[Tensor, bool]:
        if not isinstance(x_t, Tensor):
            raise TypeError(f"Stream: x_t must be a torch.Tensor, got {type(x_t).__name__}")
        unbatched = self.batch_size == 1 and tuple(x_t.shape) == self._shape[1:]
        if not unbatched and tuple(x_t.shape) != self._shape:
            raise ValueError(f"Stream: x_t must have shape {self._shape} (batch_size, input_size)"
                             + (f" or {self._shape[1:]}" if self.batch_size == 1 else "")
                             + f", got {tuple(x_t.shape)}")
        if x_t.dtype != self._dtype:
            raise TypeError(f"Stream: x_t has dtype {x_t.dtype} but the layer's weights have {self._dtype}; "
                            f"convert x_t (x_t.to({self._dtype})) or the layer (layer.to(...))")
        return (x_t.unsqueeze(0) if unbatched else x_t), unbatched

    def _build(self) -> None:
        """Stacked weights and the per-layer kernels, from the layer's current parameters."""
        # the hooks set the weights they compute on the layer, as a forward under no_grad would: normal tensors
        # without a graph (deepcopy takes only leaves; a mask made under inference_mode cannot enter a graph).
        # A penalty on such a weight reads it after a forward, not after a stream call.
        with torch.inference_mode(False), torch.no_grad():
            subs = _subs(self.layer)
        # keyed after the hooks ran: spectral_norm's power iteration (training mode) writes its buffers, and
        # keyed before, the next call rebuilt, iterating again, a new weight at every step (forward: one a call)
        key, params = self._version_key()
        with _inference_mode():
            like = self.layer.weight_ih_l0
            if like.dtype != self._buf.dtype or like.device != self._buf.device:  # layer.to(...) since
                self._alloc(like, (self._buf, *self._rest))
            make = KERNELS.get(self._fast, GenericKernel)
            I, P = self.layer.input_size, h_size(self.layer)
            self._kernels = []
            for k, sub in enumerate(subs):
                lo = 0 if k == 0 else I + (k - 1) * P
                window = self._buf[:, lo:I + (k + 1) * P]                      # (B, I_k + P) [x_k | h_k]
                self._kernels.append(make(sub, window, self._h[k], [r[k] for r in self._rest]))
        self._key, self._held = key, params                                  # held: their ids stay theirs

    # -- copies -----------------------------------------------------------------------------------------
    def __getstate__(self):
        return {"layer": self.layer, "batch_size": self.batch_size, "state": self.state}

    def __setstate__(self, saved):
        self._setup(saved["layer"], saved["batch_size"], saved["state"])        # the call checks training mode

    def __repr__(self) -> str:
        return f"Stream({self.layer!r}, batch_size={self.batch_size})"
