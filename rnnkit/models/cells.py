"""The recurrent layers a model or a CLI command can be built on, by name (`--cell`): the classic cells
(rnnkit's RNN, LSTM, GRU: torch.nn's API, a recurrent weight U, torch's kernel or rnnkit's engine) and
the minimal ones (minGRU, minLSTM: no U, one parallel scan over time; `rnnkit/minimal.py`). Each takes
(input_size, hidden_size, num_layers, batch_first=..., dropout=..., bidirectional=...) and returns
(out, h_n), or (out, (h_n, c_n)) for the LSTM."""
from __future__ import annotations

from .. import layers
from ..minimal import MinGRU, MinLSTM

RECURRENT = {"rnn": layers.RNN, "lstm": layers.LSTM, "gru": layers.GRU}   # with U (and a backend choice)
CELLS = {**RECURRENT, "mingru": MinGRU, "minlstm": MinLSTM}
