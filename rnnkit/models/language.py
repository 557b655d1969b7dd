"""Character- or word-level language model: embedding -> rk.LSTM / GRU / RNN (or MinGRU / MinLSTM) ->
linear to the vocabulary.

    x_t = E[token_t]                      embedding
    h_t = cell(x_t, h_{t-1})              V, U in the recurrent layer (weight_ih_l{k}, weight_hh_l{k})
    logits_t = W h_t + b'                 W = `head.weight`; softmax(logits_t) = P(token_{t+1} | tokens <= t)

`forward(tokens, state)` takes and returns the recurrent state, so stateful truncated-BPTT training
carries it from one window to the next (`detach_state` between windows). `sample` continues a prompt
with temperature and top-k; it never emits the special tokens passed in `suppress_ids`. It reads the
prompt in one call of the layer, then feeds its draws back through `rk.Stream` (one step, no per-call
layer overhead: 1000 characters of the Shakespeare 2x256 LSTM in 0.22 s, against 0.69 s calling the
layer per token, 2 threads).
"""
from __future__ import annotations

import contextlib
import operator
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..stream import Stream
from .cells import CELLS


@dataclass(frozen=True)
class LanguageModelConfig:
    vocab_size: int
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    cell: str = "lstm"
    dropout: float = 0.0               # on the embedding, between layers and before the head
    tie_weights: bool = False          # head.weight = embedding.weight (needs embed_dim == hidden_size)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise UserError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise UserError(f"tie_weights needs embed_dim == hidden_size, got {self.embed_dim} and "
                            f"{self.hidden_size}")


State = Tensor | tuple[Tensor, Tensor]


def detach_state(state: State | None) -> State | None:
    """The state cut from the graph: the value carries on, the gradient stops (truncated BPTT)."""
    if state is None:
        return None
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


class LanguageModel(nn.Module):
    def __init__(self, config: LanguageModelConfig):
        super().__init__()
        c = self.config = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        self.rnn = CELLS[c.cell](c.embed_dim, c.hidden_size, c.num_layers, batch_first=True,
                                 dropout=c.dropout if c.num_layers > 1 else 0.0)
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)
        if c.tie_weights:
            self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (B, T) long -> logits (B, T, vocab_size) and the state after step T."""
        x = self.drop(self.embedding(tokens))                              # (B, T, E)
        out, state = self.rnn(x, state)                                    # (B, T, H)
        return self.head(self.drop(out)), state                            # (B, T, V)

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[int], n: int, temperature: float = 1.0, top_k: int | None = None,
               suppress_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> list[int]:
        """n new token ids continuing `prompt_ids` (the prompt is not included).

        temperature > 0 divides the logits (below 1 sharpens, above 1 flattens); temperature 0 is
        greedy (argmax). top_k keeps the k most likely tokens. `suppress_ids` (e.g. <pad>, <unk>)
        are never drawn.
        """
        V = self.config.vocab_size
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise UserError("the prompt is empty; give at least one token to start from")
        if not all(0 <= i < V for i in prompt):
            raise UserError(f"prompt ids must lie in [0, {V}), got {[i for i in prompt if not 0 <= i < V][:5]}")
        if n < 0:
            raise UserError(f"number of tokens to sample must be >= 0, got {n}")
        top_k, suppress_ids = check_sampling(temperature, top_k, suppress_ids, V)
        with decoding(self, self.head.weight.device.type):
            return self._sample(prompt, n, temperature, top_k, suppress_ids, generator)

    def _sample(self, prompt, n, temperature, top_k, suppress_ids, generator) -> list[int]:
        device = self.head.weight.device
        logits, state = self(torch.tensor([prompt], device=device))        # (1, P, V): the prompt in one call
        stream = Stream(self.rnn, batch_size=1, state=state)               # then one token at a time
        last, out = logits[0, -1], []                                      # (V,)
        for _ in range(n):
            probs = next_token_probs(last, temperature, top_k, suppress_ids)
            nxt = int(probs.argmax()) if temperature == 0 else int(torch.multinomial(probs.cpu(), 1, generator=generator))
            out.append(nxt)
            h = stream(self.embedding(torch.tensor([nxt], device=device)))   # (1, H), as forward's last step
            last = self.head(h)[0]
        return out


_MODE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODE_GUARD = threading.Lock()


@contextlib.contextmanager
def decoding(model: nn.Module, device_type: str):
    """For a decoding loop (sample, greedy_decode): the model in eval mode (dropout off) and its training
    mode put back after, also on error; autocast off inside (a stream runs in the weights' dtype and
    refuses a state autocast made in another). Calls on one model from several threads take turns, so
    none sees another's mode switch (which left the model in eval, or a stream refusing training mode)."""
    with _MODE_GUARD:
        lock = _MODE_LOCKS.setdefault(model, threading.RLock())
    with lock:
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(device_type, enabled=False):
                yield
        finally:
            model.train(was_training)


def _as_int(value) -> int | None:
    """An integer (Python, numpy, a one-element integer tensor) as a Python int; None for anything else,
    bools included (True would index as 1)."""
    if isinstance(value, bool) or getattr(value, "dtype", None) in (torch.bool, np.bool_):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_sampling(temperature: float, top_k: int | None, suppress_ids: Sequence[int],
                   vocab_size: int) -> tuple[int | None, list[int]]:
    """Refuse bad sampling arguments with a UserError; top_k and suppress_ids as Python ints."""
    suppress_ids = list(suppress_ids)                         # an iterator is read once, here
    if not 0 <= temperature < float("inf"):                  # also refuses NaN
        raise UserError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    k = None if top_k is None else _as_int(top_k)
    if top_k is not None and not (k is not None and k >= 1):
        raise UserError(f"top_k must be a positive integer or None, got {top_k!r}")
    ids = [_as_int(i) for i in suppress_ids]
    if None in ids:
        raise UserError(f"suppress_ids must be token ids (ints), got {suppress_ids[:5]!r}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"suppress_ids must lie in [0, {vocab_size}), got {bad[:5]}")
    if len(set(ids)) >= vocab_size:
        raise UserError("every token is suppressed; nothing is left to sample")
    return k, ids


def next_token_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                     suppress_ids: Sequence[int] = ()) -> Tensor:
    """(..., V) logits -> (..., V) probabilities: suppressed ids removed, all but the top k removed,
    softmax(logits / temperature) over what is left. temperature 0: all mass on the argmax."""
    z = logits.float().clone()                                             # (..., V)
    if suppress_ids:
        z[..., list(suppress_ids)] = float("-inf")
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[..., -1:]                       # (..., 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if temperature == 0:
        return F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
    # From the row's maximum (<= 0, so a tiny temperature sends the rest to -inf, never inf - inf), with the
    # temperature kept where its reciprocal is a normal float32: beyond 1e±30 nothing changes that float32
    # probabilities can show (one-hot on the maximum / uniform over the tokens left), and no NaN appears.
    z = z - z.amax(-1, keepdim=True)
    return torch.softmax(z / min(max(temperature, 1e-30), 1e30), dim=-1)
