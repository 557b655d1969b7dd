"""Forecaster: a recurrent encoder over the lookback window and a linear head on its last state.

    h_t = cell(x_t, h_{t-1})  for t = 1..L        (rk.RNN / LSTM / GRU / MinGRU / MinLSTM, batch first)
    y   = W h_L + b'                               (outputs values: H for direct, 1 for recursive)

Direct: the head emits all H future values at once. Recursive: the head emits one step; `rollout`
appends it to the window, drops the oldest step and predicts again, H times, so the model always sees
exactly the L-step windows it was trained on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import check_at_least_one, check_choice, check_dropout
from .cells import CELLS


@dataclass(frozen=True)
class ForecasterConfig:
    cell: str = "lstm"
    input_size: int = 1
    hidden_size: int = 32
    num_layers: int = 1
    dropout: float = 0.0        # between stacked layers (torch.nn's dropout)
    outputs: int = 1            # values the head emits per window

    def __post_init__(self):
        check_choice("cell", self.cell, CELLS)
        check_at_least_one(self, "input_size", "hidden_size", "num_layers", "outputs")
        check_dropout(self.dropout)


class Forecaster(nn.Module):
    def __init__(self, config: ForecasterConfig):
        super().__init__()
        self.config = config
        drop = config.dropout if config.num_layers > 1 else 0.0
        self.rnn = CELLS[config.cell](config.input_size, config.hidden_size, config.num_layers,
                                      batch_first=True, dropout=drop)
        self.head = nn.Linear(config.hidden_size, config.outputs)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, I) -> (B, outputs)."""
        out, _ = self.rnn(x)                        # (B, L, H)
        return self.head(out[:, -1])                # (B, outputs)

    @torch.no_grad()
    def rollout(self, x: Tensor, steps: int) -> Tensor:
        """Recursive forecast: x (B, L, 1) -> (B, steps), each prediction fed back as the next input."""
        preds = []
        for _ in range(steps):
            y = self(x)[:, :1]                      # (B, 1) the next step
            preds.append(y)
            x = torch.cat([x[:, 1:], y[:, :, None]], 1)   # (B, L, 1) slide the window
        return torch.cat(preds, 1)                  # (B, steps)
