"""`rnnkit.trace(module)`: run every rnnkit layer inside a module through the engine and keep its trace.

The engine fills one `TraceSlot` per layer and direction (every h_t, c_t, gate activations, and after
backward ||dL/dh_t||); this module collects them per layer and per call.
"""
from __future__ import annotations

import contextlib

from torch import nn

from .engine import TraceSlot
from .layers import _Recurrent


class LayerTrace:
    """The trace of one layer's latest call: lists indexed by k = layer * num_directions + direction."""

    def __init__(self):
        self.latest: list[TraceSlot] | None = None   # only the latest call's: a trace kept open over many
                                                     # calls must not grow (earlier slots live on in
                                                     # their autograd graphs until backward fills them)

    def new_call(self):
        self.latest = []
        return self

    def slot(self, k: int) -> TraceSlot:
        slots = self.latest
        while len(slots) <= k:
            slots.append(TraceSlot())
        return slots[k]

    def _field(self, name):
        if self.latest is None:
            raise RuntimeError("nothing traced yet: run the module inside `with rnnkit.trace(module)`")
        return [getattr(s, name) for s in self.latest]

    hidden = property(lambda self: self._field("hidden"))
    cell = property(lambda self: self._field("cell"))
    gates = property(lambda self: self._field("gates"))
    grad_norm = property(lambda self: self._field("grad_norm"))


class Trace:
    """Result of `rnnkit.trace(module)`. With one recurrent layer, `tr.hidden[k]`, `tr.grad_norm[k]`,
    `tr.cell[k]`, `tr.gates[k]` read it directly; with several, `tr[name]` picks one by its module name."""

    def __init__(self, layers: dict[str, LayerTrace]):
        self.layers = layers

    def __getitem__(self, name: str) -> LayerTrace:
        return self.layers[name]

    def _only(self) -> LayerTrace:
        if len(self.layers) != 1:
            raise AttributeError(f"the traced module has {len(self.layers)} recurrent layers "
                                 f"({', '.join(self.layers) or 'none'}); pick one with tr[name]")
        return next(iter(self.layers.values()))

    hidden = property(lambda self: self._only().hidden)
    cell = property(lambda self: self._only().cell)
    gates = property(lambda self: self._only().gates)
    grad_norm = property(lambda self: self._only().grad_norm)


@contextlib.contextmanager
def trace(module: nn.Module):
    """Run every rnnkit layer inside `module` through the engine and record its trace. Nested traces
    of the same layers: the inner one records while it is open, then the outer one again. A copy of a
    layer (copy.deepcopy, pickle) made inside a trace is not traced."""
    from .minimal import _MinRecurrent                # minimal builds on this module
    layers = {name: m for name, m in module.named_modules() if isinstance(m, (_Recurrent, _MinRecurrent))}
    if not layers:
        raise ValueError(f"trace: {type(module).__name__} contains no rnnkit layer "
                         f"(RNN, LSTM, GRU, Recurrent, MinGRU, MinLSTM)")
    records = {name: LayerTrace() for name in layers}
    outer = {name: m._trace_sink for name, m in layers.items()}   # a trace this one is nested in
    for name, m in layers.items():
        m._trace_sink = records[name]
    try:
        yield Trace(records)
    finally:
        for name, m in layers.items():
            m._trace_sink = outer[name]                           # the outer trace records again
