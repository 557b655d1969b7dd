"""Encoder-decoder with teacher forcing and optional Luong attention, greedy decoding.

    e_s = enc(E_src[x_s], e_{s-1})          s = 1 .. S, over the real source steps (lengths)
    h_0 = e_S                               the decoder starts from the encoder's final state
    h_t = dec(E_tgt[y_{t-1}], h_{t-1})      y_0 = <bos>; in training y_{t-1} is the true previous
                                            token (the target shifted by one step: teacher forcing)
    attention (Luong "general", no input feeding, so all steps at once in training):
    a_t = softmax_s(h_t . W_a e_s)          padded source steps get no weight
    c_t = sum_s a_ts e_s,   h~_t = tanh(W_c [c_t; h_t])
    logits_t = W h~_t + b'                  (W h_t + b' without attention)

The encoder and decoder are the same cell family with the same size and depth, so the encoder's
final state is a valid initial decoder state as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..stream import Stream
from .language import CELLS, State, decoding


@dataclass(frozen=True)
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int = 0
    embed_dim: int = 32
    hidden_size: int = 128
    num_layers: int = 1
    cell: str = "gru"
    attention: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise UserError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("src_vocab_size", "tgt_vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("bos_id", "eos_id", "pad_id"):
            if not 0 <= getattr(self, name) < self.tgt_vocab_size:
                raise UserError(f"{name} must lie in [0, {self.tgt_vocab_size}), got {getattr(self, name)}")
        if self.pad_id >= self.src_vocab_size:
            raise UserError(f"pad_id {self.pad_id} must also lie in the source vocabulary [0, {self.src_vocab_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        c = self.config = config
        E, H, L, drop = c.embed_dim, c.hidden_size, c.num_layers, c.dropout if c.num_layers > 1 else 0.0
        self.src_embedding = nn.Embedding(c.src_vocab_size, E, padding_idx=c.pad_id)
        self.tgt_embedding = nn.Embedding(c.tgt_vocab_size, E, padding_idx=c.pad_id)
        self.encoder = CELLS[c.cell](E, H, L, batch_first=True, dropout=drop)
        self.decoder = CELLS[c.cell](E, H, L, batch_first=True, dropout=drop)
        if c.attention:
            self.score = nn.Linear(H, H, bias=False)                       # W_a
            self.combine = nn.Linear(2 * H, H)                             # W_c
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(H, c.tgt_vocab_size)

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, State, Tensor]:
        """src (B, S) long -> memory (B, S, H), final state, src_mask (B, S) bool (True = real step)."""
        memory, state = self.encoder(self.drop(self.src_embedding(src)), lengths=src_lengths)
        src_mask = torch.arange(src.shape[1], device=src.device) < src_lengths.to(src.device)[:, None]
        return memory, state, src_mask

    def decode(self, tgt_in: Tensor, state: State, memory: Tensor, src_mask: Tensor) -> tuple[Tensor, State]:
        """tgt_in (B, T) long, from state -> logits (B, T, V) and the state after step T. One call
        for all T steps (training) or for one step at a time (decoding) gives the same numbers."""
        out, state = self.decoder(self.drop(self.tgt_embedding(tgt_in)), state)   # (B, T, H)
        return self._readout(out, memory, self._keys(memory), src_mask), state

    def _keys(self, memory: Tensor) -> Tensor | None:
        """W_a e_s for every source step (B, S, H): what each decoder state is scored against."""
        return self.score(memory) if self.config.attention else None

    def _readout(self, out: Tensor, memory: Tensor, keys: Tensor | None, src_mask: Tensor) -> Tensor:
        """Decoder outputs (B, T, H) -> logits (B, T, V), through attention when the model has it."""
        if keys is not None:
            scores = out @ keys.transpose(1, 2)                            # (B, T, S)
            weights = torch.softmax(scores.masked_fill(~src_mask[:, None, :], float("-inf")), dim=-1)
            context = weights @ memory                                     # (B, T, H)
            out = torch.tanh(self.combine(torch.cat([context, out], dim=-1)))   # (B, T, H)
        return self.head(self.drop(out))                                   # (B, T, V)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: logits (B, T, V) for tgt_in = <bos> y_1 .. y_{T-1}; train them against
        y_1 .. y_{T-1} <eos> with cross-entropy ignoring <pad>."""
        memory, state, src_mask = self.encode(src, src_lengths)
        return self.decode(tgt_in, state, memory, src_mask)[0]

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, src_lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
        """Feed back the argmax token until <eos> or max_len steps. Returns ids (B, max_len) long,
        <pad> after each sequence's end and <eos> itself left out, and lengths (B,).

        The source is read in one encoder call; the decoder then runs one step per token through
        `rk.Stream` (its state kept between steps, no per-call set-up of a whole layer) and the
        attention keys W_a e_s are computed once: the same tokens as calling `decode` per step."""
        if max_len < 1:
            raise UserError(f"max_len must be >= 1, got {max_len}")
        with decoding(self, src.device.type):
            return self._greedy(src, src_lengths, max_len)

    def _greedy(self, src: Tensor, src_lengths: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
        c, B, device = self.config, src.shape[0], src.device
        memory, state, src_mask = self.encode(src, src_lengths)
        keys = self._keys(memory)
        stream = Stream(self.decoder, batch_size=B, state=state)
        prev = torch.full((B,), c.bos_id, dtype=torch.long, device=device)          # (B,)
        ids = torch.full((B, max_len), c.pad_id, dtype=torch.long, device=device)
        lengths = torch.full((B,), max_len, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_len):
            out = stream(self.tgt_embedding(prev))[:, None]                # (B, 1, H): decode's step
            prev = self._readout(out, memory, keys, src_mask)[:, 0].argmax(-1)   # (B,)
            ended = ~done & (prev == c.eos_id)
            lengths[ended] = t
            done |= ended
            ids[:, t] = prev.masked_fill(done, c.pad_id)
            if bool(done.all()):
                break
        return ids, lengths
