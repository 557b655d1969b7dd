"""Many-to-one sequence classifier: embedding -> recurrent encoder over the real steps -> pooling -> linear.

    h_t = cell(E[token_t], h_{t-1})       t = 1 .. length; padded steps never enter the recurrence
    z   = pool(h_1 .. h_length)           "last": h at the last real step (forward direction) and h_1
                                          of the backward direction, i.e. the final states;
                                          "mean" / "max": over the real steps only
    logits = W z + b'

The encoder gets `lengths`, so right padding changes nothing: the same sequence padded to any
length gives the same logits (tested to 1e-6).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError
from .language import CELLS

POOLINGS = ("last", "mean", "max")


@dataclass(frozen=True)
class ClassifierConfig:
    vocab_size: int
    num_classes: int
    embed_dim: int = 64
    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "lstm"
    bidirectional: bool = False
    pooling: str = "last"
    dropout: float = 0.0               # on the embedding, between layers and before the head
    pad_id: int = 0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise UserError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise UserError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise UserError(f"pad_id must lie in [0, {self.vocab_size}), got {self.pad_id}")


class SequenceClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        c = self.config = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.rnn = CELLS[c.cell](c.embed_dim, c.hidden_size, c.num_layers, batch_first=True,
                                 dropout=c.dropout if c.num_layers > 1 else 0.0,
                                 bidirectional=c.bidirectional)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_size * (2 if c.bidirectional else 1), c.num_classes)

    def encode(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens (B, T) long, lengths (B,) -> pooled features (B, D*H)."""
        x = self.drop(self.embedding(tokens))                              # (B, T, E)
        out, state = self.rnn(x, lengths=lengths)                          # (B, T, D*H)
        if self.config.pooling == "last":
            h = state[0] if isinstance(state, tuple) else state           # (L*D, B, H)
            D = 2 if self.config.bidirectional else 1
            return torch.cat(list(h[-D:]), dim=1)                          # (B, D*H) top layer
        real = torch.arange(tokens.shape[1], device=tokens.device) < lengths.to(tokens.device)[:, None]
        real = real.unsqueeze(2)                                           # (B, T, 1)
        if self.config.pooling == "mean":
            return (out * real).sum(1) / real.sum(1)                       # (B, D*H)
        return out.masked_fill(~real, float("-inf")).amax(1)               # (B, D*H)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """tokens (B, T) long, right-padded; lengths (B,) real steps -> logits (B, num_classes)."""
        return self.head(self.drop(self.encode(tokens, lengths)))

    @torch.no_grad()
    def predict_proba(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Class probabilities (B, num_classes), in eval mode."""
        was_training = self.training
        self.eval()
        probs = torch.softmax(self(tokens, lengths), dim=-1)
        self.train(was_training)
        return probs
