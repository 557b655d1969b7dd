"""torch.nn-compatible recurrent layers: `RNN`, `LSTM`, `GRU`, and `trace`.

Each layer *is* its torch.nn counterpart (a subclass), so constructor arguments, defaults, parameter
names (weight_ih_l{k} = V, weight_hh_l{k} = U, bias_ih_l{k}, bias_hh_l{k}, suffix _reverse for the
backward direction) and the state_dict are torch.nn's, and weights move both ways.

A plain configuration with no trace runs torch's native fused kernel (oneDNN / cuDNN), which gives
the same numbers; everything else runs rnnkit's engine: `lengths` with left padding, truncated BPTT,
the trace, and the extras (all off by default):
    recurrent_dropout  variational dropout on h_{t-1} before U: one mask per sequence (Gal & Ghahramani)
    zoneout            each unit keeps its previous state with this probability (Krueger et al.);
                       a float, or (z_h, z_c) for the LSTM
    layer_norm         layer normalisation of V x_t + b_ih and of U h_{t-1} + b_hh (Ba et al.)
    learn_initial_state  h_0 (and c_0) are parameters, used when no hx is given
`backend="engine"` forces the engine, `backend="native"` forbids it (an error if the configuration
needs it). `set_default_backend("engine")` makes every backend="auto" layer run the engine, process-wide
(on CPU with the fused kernel the engine's training step is faster than torch's: docs/benchmarks.md);
the CLI's `--backend engine` sets it for one command (backend_scope: in its thread).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _fused
from .backends import AUTO_CHOICES, auto_backend, backend_scope, set_default_backend  # noqa: F401 (re-exported)
from .boundary import (
    PADDING,
    alone_with_packed,
    autocast_input,
    autocasting,
    check_input,
    check_lengths,
    check_state,
    check_truncate,
    h_size,
    padded_input,
    repack_like,
    untraced,
)
from .cells import (
    ElmanCell,
    GRUCell,
    LayerNormCell,
    LSTMCell,
    ProjectedLSTMCell,
    uniform_init_,
)
from .engine import ScanOptions, project_scan
from .numerics import transformed

_BACKENDS = ("auto", "engine", "native")


def param_suffix(layer: int, direction: int) -> str:
    """torch.nn's parameter-name suffix: _l{layer}, plus _reverse for the backward direction."""
    return f"_l{layer}" + ("_reverse" if direction else "")


class _Recurrent:
    """The engine path and the extras, shared by RNN, LSTM and GRU (mixed in before torch.nn's class)."""

    def __getstate__(self):
        return untraced(super().__getstate__())

    def _setup_extras(self, recurrent_dropout, zoneout, layer_norm, learn_initial_state, backend):
        if not 0.0 <= float(recurrent_dropout) < 1.0:
            raise ValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout}")
        rates = tuple(zoneout) if isinstance(zoneout, Sequence) and not isinstance(zoneout, str) else (zoneout,) * self._cell.num_states
        if len(rates) != self._cell.num_states or not all(
                isinstance(z, (int, float)) and not isinstance(z, bool) and 0.0 <= z < 1.0 for z in rates):
            raise ValueError(f"zoneout must be a float in [0, 1) or {self._cell.num_states} such floats "
                             f"(one per state), got {zoneout!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.recurrent_dropout, self.zoneout = float(recurrent_dropout), tuple(float(z) for z in rates)
        self.layer_norm, self.learn_initial_state, self.backend = bool(layer_norm), bool(learn_initial_state), backend
        self._trace_sink = None
        D, G, H = self._directions(), self._cell.num_gates, self.hidden_size
        kw = dict(device=self.weight_ih_l0.device, dtype=self.weight_ih_l0.dtype)
        if self.layer_norm:
            for layer in range(self.num_layers):
                for d in range(D):
                    for part in ("ih", "hh"):
                        for kind in ("weight", "bias"):
                            self.register_parameter(f"ln_{part}_{kind}{self._suffix(layer, d)}",
                                                    nn.Parameter(torch.empty(G * H, **kw)))
        if self.learn_initial_state:
            for name, n in zip(("initial_h", "initial_c"), self._state_sizes()):
                self.register_parameter(name, nn.Parameter(torch.empty(self.num_layers * D, n, **kw)))
        self._reset_extras()

    def step(self, x_t, state=None):
        """One time step for streaming inference: (y_t, state), state in torch.nn's layout.
        See `rnnkit.Stream` for an object that keeps the state between calls."""
        from .stream import step  # stream builds on this module
        return step(self, x_t, state)

    # -- parameters ---------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        for w in self._flat_weights:
            if w is not None:
                uniform_init_(w, self.hidden_size)
        if hasattr(self, "_trace_sink"):
            self._reset_extras()

    def _reset_extras(self) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("ln_"):
                    p.fill_(1.0 if "_weight_" in name else 0.0)
                elif name.startswith("initial_"):
                    p.zero_()

    def _directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _state_sizes(self) -> tuple:
        """Units of each state component: h_t has proj_size (a projected LSTM) or hidden_size, c_t hidden_size."""
        return (h_size(self),) + (self.hidden_size,) * (self._cell.num_states - 1)

    _suffix = staticmethod(param_suffix)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        extras = [f"recurrent_dropout={self.recurrent_dropout}"] if self.recurrent_dropout else []
        if any(self.zoneout):
            extras.append(f"zoneout={self.zoneout}")
        extras += [n for n in ("layer_norm", "learn_initial_state") if getattr(self, n)]
        return s + "".join(", " + e for e in extras) + ("" if self.backend == "auto" else f", backend={self.backend!r}")

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, input, hx=None, lengths=None, *, padding: str = "right", truncate: int | None = None):
        """Same as torch.nn's forward, plus:
        lengths: (B,) ints in [1, T]; steps past an example's length are padding (left padding when
            padding="left"): the state is kept through them and the output there is zero.
        truncate: k for truncated BPTT inside the sequence (gradient cut every k steps, counted
            over each sequence's own steps: padding neither cuts nor shifts the cuts).
        """
        truncate = check_truncate(type(self).__name__, truncate)
        if isinstance(input, PackedSequence):
            alone_with_packed(type(self).__name__, lengths, padding)
            if self._needs_engine(padding, truncate):
                padded, lens = pad_packed_sequence(input, batch_first=self.batch_first)
                out, state = self.forward(padded, hx, lens, truncate=truncate)
                return repack_like(out, lens, input, self.batch_first), state
            return super().forward(input, self._packed_state(hx, int(input.batch_sizes[0]), input.data))
        if self._needs_engine(padding, truncate, (input, *(hx if isinstance(hx, (tuple, list)) else (hx,)))):
            input, hx, amp = autocast_input(self, input, hx)
            x, hx, lengths, unbatched = self._check(input, hx, lengths, padding)
            with amp:
                out, state = self._engine_forward(x, hx, lengths, padding, truncate)
        else:                                            # torch.nn's kernels: its own autocast rules
            x, hx, lengths, unbatched = self._check(input, hx, lengths, padding, not autocasting(input))
            out, state = self._native_forward(x, hx, lengths)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state)
        return out, (state if self._cell.num_states == 2 else state[0])

    def _needs_engine(self, padding, truncate, inputs=()) -> bool:
        rec = self.training and self.recurrent_dropout > 0
        needs = (self._trace_sink is not None or padding == "left" or truncate is not None
                 or self.layer_norm or any(self.zoneout) or rec)
        if self.backend == "native" and needs:
            raise ValueError("backend='native' cannot run this configuration (trace, left padding, "
                             "truncate or an extra is on); use backend='auto' or 'engine'")
        weights = (getattr(self, n) for n in self._flat_weights_names)
        if self.backend == "auto" and transformed(*inputs, *weights):   # torch.func on the input, state or any
            return True                      # weight: torch's kernels have no vmap rule; the engine's ops do
        return needs or self.backend == "engine" or (self.backend == "auto" and auto_backend() == "engine")

    def _native_forward(self, x, hx, lengths):
        hx = hx if self._cell.num_states == 2 else hx[0]
        if lengths is None or lengths.numel() == 0:              # no sequence to pack in an empty batch
            out, state = super().forward(x, hx)
        else:
            T = x.shape[1 if self.batch_first else 0]
            packed = pack_padded_sequence(x, lengths.cpu(), self.batch_first, enforce_sorted=False)
            out, state = super().forward(packed, hx)
            out, _ = pad_packed_sequence(out, batch_first=self.batch_first, total_length=T)
        return out, (state if isinstance(state, tuple) else (state,))

    def _engine_forward(self, x, hx, lengths, padding, truncate):
        if self.batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[:2]
        x, mask = padded_input(x, lengths, padding)
        D = self._directions()
        cell = LayerNormCell(self._cell, normalize_input=True) if self.layer_norm else self._cell
        sink = self._trace_sink.new_call() if self._trace_sink is not None else None
        finals = []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k, sfx = layer * D + d, self._suffix(layer, d)
                w = lambda name: getattr(self, name + sfx, None)  # noqa: E731
                params = ()
                if self.layer_norm:              # LN of xi too: in the fused loop, or before the pure one
                    params = (w("ln_hh_weight"), w("ln_hh_bias"), w("ln_ih_weight"), w("ln_ih_bias"))
                if w("weight_hr") is not None:   # projected LSTM: W_hr is the cell's param (h_t = W_hr m_t)
                    params += (w("weight_hr"),)
                opts = ScanOptions(cell, reverse=d == 1, mask=mask, truncate=truncate,
                                   rec_mask=self._recurrent_mask(B, x), zone=self._zone_masks(T, B, x),
                                   trace=None if sink is None else sink.slot(k))
                out, final = project_scan(opts, x, w("weight_ih"), w("bias_ih"), tuple(s[k] for s in hx),
                                          w("weight_hh"), w("bias_hh"), params)          # xi = V x + b: (T, B, G*H)
                outs.append(out)
                finals.append(final)
            x = outs[0] if D == 1 else torch.cat(outs, 2)                        # (T, B, D*H)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        out = x.transpose(0, 1) if self.batch_first else x
        return out, tuple(torch.stack([f[j] for f in finals]) for j in range(self._cell.num_states))

    def _recurrent_mask(self, B, x):
        p = self.recurrent_dropout
        if not (self.training and p > 0):
            return None
        return torch.empty(B, self._state_sizes()[0], dtype=x.dtype, device=x.device).bernoulli_(1 - p) / (1 - p)

    def _zone_masks(self, T, B, x):
        if not any(self.zoneout):
            return None
        if self.training:                 # fresh 0/1 masks (on CPU from the kernel's fast generator)
            return tuple(_fused.bernoulli((T, B, n), z, x.dtype, device=x.device)
                         for z, n in zip(self.zoneout, self._state_sizes()))
        return tuple(torch.full((1, 1, 1), z, dtype=x.dtype, device=x.device) for z in self.zoneout)

    # -- validation at the boundary -------------------------------------------------------------------
    def _check(self, input, hx, lengths, padding, exact_dtype: bool = True):
        name = type(self).__name__
        check_input(self, input, exact_dtype)
        if padding not in PADDING:
            raise ValueError(f"{name}: padding must be 'right' or 'left', got {padding!r}")
        unbatched = input.dim() == 2
        x = input.unsqueeze(0 if self.batch_first else 1) if unbatched else input
        T, B = (x.shape[1], x.shape[0]) if self.batch_first else (x.shape[0], x.shape[1])
        hx = self._check_state(hx, B, unbatched, x, exact_dtype)
        if lengths is not None:
            lengths = check_lengths(name, lengths, B, T)
        return x, hx, lengths, unbatched

    def _check_state(self, hx, B, unbatched, x, exact_dtype: bool = True):
        if hx is None:
            return self._default_state(B, x)
        LD = self.num_layers * self._directions()
        want = tuple((LD, n) if unbatched else (LD, B, n) for n in self._state_sizes())
        units = ("proj_size", "hidden_size") if getattr(self, "proj_size", 0) else ("hidden_size",) * 2
        parts = check_state(type(self).__name__, hx, self._cell.num_states, want, x.dtype if exact_dtype else None,
                            units=units)
        return tuple(s.unsqueeze(1) for s in parts) if unbatched else parts

    def _default_state(self, B, x) -> tuple:
        """h_0 (and c_0) when none is given: zeros, or the learned initial state."""
        LD = self.num_layers * self._directions()
        if self.learn_initial_state:
            names = ("initial_h", "initial_c")[: self._cell.num_states]
            return tuple(getattr(self, n).unsqueeze(1).expand(LD, B, -1) for n in names)
        return tuple(torch.zeros(LD, B, n, dtype=x.dtype, device=x.device) for n in self._state_sizes())

    def _packed_state(self, hx, B, x):
        if hx is not None or not self.learn_initial_state:
            return hx
        state = self._default_state(B, x)
        return state if self._cell.num_states == 2 else state[0]


class RNN(_Recurrent, nn.RNN):
    """Elman RNN, h_t = g(V x_t + U h_{t-1} + b), g = tanh or relu. Arguments as torch.nn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 recurrent_dropout=0.0, zoneout=0.0, layer_norm=False, learn_initial_state=False,
                 backend="auto"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        nn.RNN.__init__(self, input_size, hidden_size, num_layers, nonlinearity=nonlinearity, bias=bias,
                        batch_first=batch_first, dropout=dropout, bidirectional=bidirectional,
                        device=device, dtype=dtype)
        self._cell = ElmanCell(nonlinearity)
        self._setup_extras(recurrent_dropout, zoneout, layer_norm, learn_initial_state, backend)


class LSTM(_Recurrent, nn.LSTM):
    """LSTM, gate order i, f, g, o as torch.nn.LSTM. Returns out, (h_n, c_n). proj_size=P > 0: torch.nn's
    projected LSTM, h_t = W_hr (o * tanh(c_t)) with P units (weight_hr_l{k}, (P, H); U is then (4H, P))."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
                 recurrent_dropout=0.0, zoneout=0.0, layer_norm=False, learn_initial_state=False,
                 backend="auto"):
        nn.LSTM.__init__(self, input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                         dropout=dropout, bidirectional=bidirectional, proj_size=proj_size, device=device,
                         dtype=dtype)
        self._cell = ProjectedLSTMCell() if self.proj_size else LSTMCell()
        self._setup_extras(recurrent_dropout, zoneout, layer_norm, learn_initial_state, backend)


class GRU(_Recurrent, nn.GRU):
    """GRU as torch.nn.GRU defines it. Returns out, h_n."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 recurrent_dropout=0.0, zoneout=0.0, layer_norm=False, learn_initial_state=False,
                 backend="auto"):
        nn.GRU.__init__(self, input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first,
                        dropout=dropout, bidirectional=bidirectional, device=device, dtype=dtype)
        self._cell = GRUCell()
        self._setup_extras(recurrent_dropout, zoneout, layer_norm, learn_initial_state, backend)


class Recurrent(_Recurrent, nn.Module):
    """A recurrent layer around any cell that follows the protocol in `rnnkit/cells/base.py`.

        layer = rk.Recurrent(MyCell(), input_size=8, hidden_size=32, num_layers=2, batch_first=True)

    Same arguments, parameter names, forward, `lengths`, extras and `trace` as `rk.GRU`; always runs the
    engine (torch has no native kernel for a new cell). A cell without `step_backward` gets its backward
    derived from `step` by torch.func.vjp.
    """

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 recurrent_dropout=0.0, zoneout=0.0, layer_norm=False, learn_initial_state=False):
        super().__init__()
        for attr in ("num_gates", "num_states", "step"):
            if not hasattr(cell, attr):
                raise TypeError(f"Recurrent: cell {type(cell).__name__} lacks '{attr}'; see the cell "
                                f"protocol in rnnkit/cells/base.py")
        if not (isinstance(hidden_size, int) and hidden_size > 0 and isinstance(input_size, int) and input_size > 0):
            raise ValueError(f"Recurrent: input_size and hidden_size must be positive ints, "
                             f"got {input_size!r} and {hidden_size!r}")
        if not (isinstance(num_layers, int) and num_layers > 0):
            raise ValueError(f"Recurrent: num_layers must be a positive int, got {num_layers!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"Recurrent: dropout must be in [0, 1), got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self._cell = bidirectional, cell
        if not hasattr(cell, "shared_preactivation"):
            cell.shared_preactivation = False
        GH, D, kw = cell.num_gates * hidden_size, 2 if bidirectional else 1, dict(device=device, dtype=dtype)
        self._flat_weights_names = []
        for layer in range(num_layers):
            for d in range(D):
                sfx = self._suffix(layer, d)
                shapes = {"weight_ih": (GH, input_size if layer == 0 else hidden_size * D),
                          "weight_hh": (GH, hidden_size)}
                if bias:
                    shapes.update(bias_ih=(GH,), bias_hh=(GH,))
                for name, shape in shapes.items():
                    self.register_parameter(name + sfx, nn.Parameter(torch.empty(shape, **kw)))
                    self._flat_weights_names.append(name + sfx)
        self.reset_parameters()
        self._setup_extras(recurrent_dropout, zoneout, layer_norm, learn_initial_state, "engine")

    @property
    def _flat_weights(self):
        return [getattr(self, n) for n in self._flat_weights_names]

    def extra_repr(self) -> str:
        return (f"cell={getattr(self._cell, 'name', type(self._cell).__name__)}, {self.input_size}, "
                f"{self.hidden_size}, num_layers={self.num_layers}, bidirectional={self.bidirectional}")
