"""Language models: text -> tokens -> vocabulary -> stateful truncated BPTT -> validation -> sampling.

    text, source = load_corpus()                               # bundled; or a file, or the registry
    result = run_textgen(text, TextgenConfig(level="char"), TrainConfig(tbptt=64, out="out/model"))
    write_outputs(result, "out")                               # metrics.json
    model, vocab, meta = load_model("out/model")
    generate(model, vocab, meta, "ROMEO:", 200, temperature=0.8, top_k=None)

The last `val_fraction` of the token stream is held out (never shuffled in: the model is scored on
text that comes after everything it trained on). Training cuts the rest into `batch_size` parallel
rows walked in windows of `tbptt` steps, carrying the recurrent state from window to window and
cutting the gradient at each window boundary (`StreamBatches`); validation walks the held-out tail
the same way with the state carried (`TokenStream`), so every token is scored with its history.

Units: `loss` is cross-entropy in nats per token, `perplexity` = exp(loss), `bits_per_token` =
loss / ln 2. A token is a character at level "char" (so bits per token is bits per character, also
written as `bits_per_character`) and a word or punctuation mark at level "word".

Unknown tokens: the vocabulary is built on the training part. A held-out token never seen in
training is scored as `<unk>`. Prompts follow `rnnkit.data.text.encode_prompt`: a character model
refuses a prompt with a character it never saw (error naming it); a word model reads unseen words
as `<unk>`, which it learned from words rarer than `min_freq`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.registry import load as registry_load
from ..data.text import (LEVELS, TokenStream, Vocabulary, bundled_text, detokenize, encode_prompt, read_text,
                         require_words, split_tail, tokenize)
from ..errors import (UserError, check_at_least_one, check_choice, check_dropout, check_fraction,
                      check_time_limit)
from ..models.language import CELLS, LanguageModel, LanguageModelConfig
from ..train import FitResult, TrainConfig, Trainer, load_weights_into, seed_everything
from .text_metrics import Deadline, fit_within, lm_scores, model_dir, read_meta, write_json

DATASETS = ("shakespeare",)


@dataclass(frozen=True)
class TextgenConfig:
    """Tokens, split and model. CLI flags map one to one onto the fields."""
    level: str = "char"             # char | word
    lower: bool = False             # fold case (word level; a character model keeps case)
    min_freq: int = 2               # word level: rarer words become <unk> (a character model keeps every character)
    val_fraction: float = 0.1       # the last part of the text, held out
    cell: str = "lstm"
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0
    time_limit: float | None = None  # seconds of training; stops cleanly after the step running then
    anneal: bool = False            # with a time limit: cosine learning-rate decay to lr/10 over it

    def __post_init__(self):
        check_choice("level", self.level, LEVELS)
        check_choice("cell", self.cell, CELLS)
        check_at_least_one(self, "min_freq", "embed_dim", "hidden_size", "num_layers")
        check_fraction("val_fraction", self.val_fraction)
        check_dropout(self.dropout)
        check_time_limit(self.time_limit)
        if self.anneal and self.time_limit is None:
            raise UserError("anneal decays the learning rate over the time limit; give --time-limit too")


@dataclass(frozen=True)
class TextgenResult:
    config: TextgenConfig
    train: TrainConfig
    metrics: dict[str, float]          # on the held-out tail: loss, perplexity, bits_per_token (...)
    sizes: dict[str, int]
    fit: FitResult
    stopped_by_time: bool
    train_seconds: float             # this session's (a resumed run's earlier sessions are not counted)
    session_steps: int               # steps trained in this session
    sample: str
    source: str
    seconds: float


def load_corpus(data: str | None = None, dataset: str | None = None) -> tuple[str, str]:
    """(text, where it came from): the user's UTF-8 file, a registry data set, or the bundled text."""
    if data is not None and dataset is not None:
        raise UserError("give either --data (your text file) or --dataset, not both")
    if data is not None:
        return read_text(data), str(data)
    if dataset is not None:
        if dataset not in DATASETS:
            raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        return registry_load(dataset), f"registry:{dataset}"
    return bundled_text(), "bundled text (Hamlet and Macbeth, Acts I-II)"


def prepare(text: str, cfg: TextgenConfig) -> tuple[Vocabulary, torch.Tensor, torch.Tensor]:
    """The vocabulary of the training part and the (train, validation) id streams."""
    head, tail = split_tail(tokenize(text, cfg.level, cfg.lower), cfg.val_fraction)
    vocab = Vocabulary.build([head], min_freq=cfg.min_freq if cfg.level == "word" else 1)
    require_words(vocab, cfg.min_freq, "the training text")
    ids = [torch.tensor(vocab.encode(part), dtype=torch.long) for part in (head, tail)]
    return vocab, ids[0], ids[1]


def run_textgen(text: str, cfg: TextgenConfig, train: TrainConfig, source: str = "",
                resume: bool = False) -> TextgenResult:
    t0 = time.perf_counter()
    if train.tbptt is None:
        raise UserError("a language model trains with truncated BPTT: set TrainConfig.tbptt (--bptt)")
    if resume and cfg.anneal:
        raise UserError("--anneal ties the learning rate to one session's clock (a cosine over --time-limit from "
                        "its start), so a run trained with it cannot be resumed exactly; start a new run, or "
                        "train without --anneal to be able to --resume")
    vocab, train_ids, val_ids = prepare(text, cfg)
    if len(train_ids) < train.batch_size * train.tbptt + 1:
        raise UserError(f"the training part has {len(train_ids)} tokens, fewer than one window of "
                        f"{train.batch_size} rows x {train.tbptt} steps; use more text, or lower --batch-size "
                        f"or --bptt")
    seed_everything(train.seed)
    model = LanguageModel(LanguageModelConfig(len(vocab), cfg.embed_dim, cfg.hidden_size, cfg.num_layers,
                                              cfg.cell, cfg.dropout))
    meta = {"task": "textgen", "language_model": dataclasses.asdict(model.config), "vocab": vocab.to_dict(),
            "level": cfg.level, "lower": cfg.lower, "source": source}
    deadline = Deadline(cfg.time_limit)
    evaluate = lambda m: {f"val_{k}": v for k, v in lm_scores(validation_loss(m, val_ids, train.tbptt)).items()}
    holder: dict = {}
    loss_fn = _annealed(_loss, deadline, holder, train.lr) if cfg.anneal else _loss
    trainer = holder["trainer"] = Trainer(model, train, deadline.wrap(loss_fn), evaluate, meta)
    fit, timed_out = fit_within(trainer, train_ids, deadline, resume)
    train_seconds = time.perf_counter() - deadline.start
    model = trainer.model.eval()
    scores = lm_scores(validation_loss(model, val_ids, train.tbptt))
    if cfg.level == "char":
        scores["bits_per_character"] = scores["bits_per_token"]
    sample = generate(model.cpu(), vocab, meta, _first_line(text, vocab, cfg.level), 300, temperature=0.8,
                      generator=torch.Generator().manual_seed(train.seed))
    sizes = {"train_tokens": len(train_ids), "val_tokens": len(val_ids), "vocab": len(vocab)}
    return TextgenResult(cfg, train, scores, sizes, fit, timed_out, train_seconds, deadline.steps, sample, source,
                         time.perf_counter() - t0)


def _loss(model: LanguageModel, window, state):
    logits, state = model(window.x, state)                                 # (B, k, V)
    return F.cross_entropy(logits.flatten(0, 1), window.y.flatten()), state


def _annealed(loss_fn, deadline: Deadline, holder: dict, lr: float):
    """`loss_fn` that first sets the learning rate to lr/10 + (lr - lr/10) (1 + cos(pi f)) / 2, f the
    share of the time limit used so far."""
    def annealed(model, window, state):
        f = min(1.0, (time.perf_counter() - deadline.start) / deadline.seconds)
        for group in holder["trainer"].optimizer.param_groups:
            group["lr"] = lr / 10 + 0.9 * lr * (1 + math.cos(math.pi * f)) / 2
        return loss_fn(model, window, state)
    return annealed


@torch.no_grad()
def validation_loss(model: LanguageModel, ids: torch.Tensor, k: int) -> float:
    """Mean cross-entropy (nats per token) over a held-out stream, state carried across windows."""
    rows = max(1, min(64, (len(ids) - 1) // (4 * k)))
    device = model.head.weight.device
    was_training = model.training
    model.eval()
    total, state = 0.0, None
    stream = TokenStream(ids, rows, max(k, 128))
    for x, y in stream:
        logits, state = model(x.to(device), state)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum"))
    model.train(was_training)
    return total / stream.num_tokens


def _first_line(text: str, vocab: Vocabulary, level: str) -> str:
    """The run's sample prompt: the text's first line (40 characters), then a newline. A character model
    keeps only characters it has (the training part may lack the newline, or a character of the line)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), text).strip()[:40] + "\n"
    if level != "char":
        return line
    kept = "".join(c for c in line if c in vocab)
    return kept if kept.strip() else next((t for t in vocab.tokens[len(vocab.specials):] if t.strip()),
                                          vocab.tokens[-1])


# -- a trained model -------------------------------------------------------------------------------

def load_model(directory) -> tuple[LanguageModel, Vocabulary, dict]:
    """The model a `rnnkit textgen train` run saved in DIR (its model/ folder), its vocabulary and meta."""
    meta = read_meta(directory, "textgen")
    model = LanguageModel(LanguageModelConfig(**meta["language_model"]))
    load_weights_into(model, model_dir(directory))
    return model.eval(), Vocabulary.from_dict(meta["vocab"]), meta


def generate(model: LanguageModel, vocab: Vocabulary, meta: dict, prompt: str, length: int,
             temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None) -> str:
    """The prompt followed by `length` sampled tokens, as text. <pad> and <unk> are never drawn."""
    ids = encode_prompt(vocab, prompt, meta["level"], meta["lower"])
    if top_k is not None and top_k > len(vocab) - 2:
        top_k = None                                                       # keeping all is no filter
    new = model.sample(ids, length, temperature, top_k, suppress_ids=(vocab.pad_id, vocab.unk_id),
                       generator=generator)
    level, last = meta["level"], tokenize(prompt, meta["level"], meta["lower"])[-1]
    return prompt + detokenize([last, *vocab.decode(new)], level)[len(last):]   # spaced as after `last`


def metrics_document(r: TextgenResult) -> dict:
    fit, unit = r.fit, "character" if r.config.level == "char" else "word"
    return {**r.metrics, "split": f"last {r.config.val_fraction:.0%} of the tokens", "token": unit,
            "units": {"loss": f"nats per {unit}", "bits_per_token": f"bits per {unit}"},
            "sizes": r.sizes, "data": r.source,
            "model": {**dataclasses.asdict(r.config), "epochs_run": fit.epochs_run, "steps": len(fit.history.loss),
                      "stopped_by_time_limit": r.stopped_by_time, "train_seconds": round(r.train_seconds, 1),
                      "steps_this_session": r.session_steps,
                      "steps_per_second": round(r.session_steps / max(r.train_seconds, 1e-9), 3),
                      "final_train_loss": fit.history.loss[-1] if fit.history.loss else None},
            "sample": r.sample, "train": r.train.to_json(), "seconds": round(r.seconds, 2)}


def write_outputs(result: TextgenResult, out) -> Path:
    path = Path(out) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, metrics_document(result))
    return path
