"""rnnkit: recurrent neural networks (Elman RNN, LSTM, GRU) with a hand-written BPTT engine.

    import rnnkit as rk
    lstm = rk.LSTM(8, 64, num_layers=2, batch_first=True)      # same arguments as torch.nn.LSTM
    with rk.trace(lstm) as tr:
        out, _ = lstm(x); out.sum().backward()
    tr.hidden[k], tr.grad_norm[k]                               # every h_t, and ||dL/dh_t||
"""
from .engine import ScanOptions, TraceSlot, scan
from . import stream
from .layers import GRU, LSTM, RNN, Recurrent, set_default_backend
from .tracing import Trace, trace
from .minimal import MinGRU, MinLSTM
from .stream import Stream

__version__ = "0.1.0"
__all__ = ["RNN", "LSTM", "GRU", "Recurrent", "MinGRU", "MinLSTM", "Stream", "stream", "trace", "Trace", "scan", "ScanOptions", "TraceSlot",
           "set_default_backend"]
