"""Gate saturation: the share of units pinned near the ends of their activation.

A sigmoid unit within 0.01 of 0 or 1, or a tanh unit within 0.01 of -1 or +1, has a derivative
below about 0.01 (sigmoid' = s(1-s) <= 0.0099, tanh' = 1-h^2 <= 0.0199): gradient through it
all but stops. For the LSTM a forget gate saturated at 1 is the open memory path (c_t = c_{t-1}),
so saturation is reported per gate, not as one number.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

# gate layout of tr.gates[k] (blocks of H) and each block's activation. The minimal cells' candidate h~ = g(k)
# (rnnkit/minimal.py: sigmoid below 0, k + 1/2 above) saturates only at its low end, where g' = g (1 - g) -> 0;
# minLSTM's f', i' are its normalised gates f / (f + i), i / (f + i).
GATES = {
    "lstm": (("i", "sigmoid"), ("f", "sigmoid"), ("g", "tanh"), ("o", "sigmoid")),
    "gru": (("r", "sigmoid"), ("z", "sigmoid"), ("n", "tanh")),
    "rnn": (("h", "tanh"),),
    "mingru": (("z", "sigmoid"), ("h~", "g")),
    "minlstm": (("f'", "sigmoid"), ("i'", "sigmoid"), ("h~", "g")),
}


@dataclass(frozen=True)
class Saturation:
    """Per gate: share of (t, b, unit) activations within `eps` of the limits, and split by end."""
    cell: str
    eps: float
    saturated: dict[str, float]      # gate -> share near either limit
    low: dict[str, float]            # gate -> share near 0 (sigmoid) or -1 (tanh)
    high: dict[str, float]           # gate -> share near 1
    overall: float                   # share over all gate units

    def to_dict(self) -> dict:
        return asdict(self)


def gate_saturation(gates: Tensor, cell: str, eps: float = 0.01) -> Saturation:
    """gates: tr.gates[k] (T, B, G*H) for "lstm", "gru", "mingru", "minlstm", or tr.hidden[k] (T, B, H) for a
    tanh "rnn"."""
    if cell not in GATES:
        raise ValueError(f"gate_saturation: cell must be one of {sorted(GATES)}, got {cell!r}")
    if gates is None:
        raise ValueError("gate_saturation: no gate activations in the trace (run the traced forward first)")
    spec = GATES[cell]
    a = torch.as_tensor(gates).detach().double()
    if a.dim() != 3 or a.shape[-1] % len(spec):
        raise ValueError(f"gate_saturation: expected (T, B, {len(spec)}*H) for {cell}, got {tuple(a.shape)}")
    sat, low, high, n_sat = {}, {}, {}, 0.0
    for (name, act), block in zip(spec, a.chunk(len(spec), -1)):
        lo_end = -1.0 if act == "tanh" else 0.0
        lo = (block <= lo_end + eps).double().mean().item()
        hi = 0.0 if act == "g" else (block >= 1.0 - eps).double().mean().item()   # g has no upper bound
        low[name], high[name], sat[name] = lo, hi, lo + hi
        n_sat += lo + hi
    return Saturation(cell, eps, sat, low, high, n_sat / len(spec))
