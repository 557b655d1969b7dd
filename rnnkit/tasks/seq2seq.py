"""Sequence to sequence: generated pairs -> character vocabulary -> encoder-decoder -> trainer -> test.

    result = run_seq2seq(Seq2SeqTaskConfig(task="dates"), TrainConfig(epochs=10, out="out/model"))
    write_outputs(result, "out")                               # metrics.json
    model, vocab, meta = load_model("out/model")
    translate(model, vocab, ["March 5, 2021"], meta["max_len"])  # ['2021-03-05']

Training is teacher forcing: the decoder reads <bos> y_1 .. y_n and learns to emit y_1 .. y_n <eos>
(the target shifted by one step). Validation and test decode greedily, feeding back the model's own
tokens. Train, validation and test pairs are disjoint (no source string in two splits) and drawn
with `data_seed`, so every training seed is scored on the same test set.
"""
from __future__ import annotations

import dataclasses
import datetime
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.seq2seq import TASKS, Pair, Seq2SeqBatch, build_vocab, collate, make_splits, task_alphabet
from ..data.text import Vocabulary
from ..errors import UserError, check_at_least_one, check_choice, check_dropout, check_time_limit
from ..models.language import CELLS
from ..models.seq2seq import Seq2Seq, Seq2SeqConfig
from ..train import FitResult, TensorBatches, TrainConfig, Trainer, load_weights_into, seed_everything
from .text_metrics import Deadline, fit_within, model_dir, read_meta, sequence_scores, write_json

EVAL_BATCH = 512


@dataclass(frozen=True)
class Seq2SeqTaskConfig:
    """What to learn and with which model. CLI flags map one to one onto the fields."""
    task: str = "reverse"        # reverse | dates (rnnkit.data.seq2seq)
    train_size: int = 20000
    val_size: int = 1000
    test_size: int = 2000
    data_seed: int = 0           # draws the pairs; the same test set for every training seed
    cell: str = "gru"
    embed_dim: int = 32
    hidden_size: int = 128
    num_layers: int = 1
    attention: bool = True
    dropout: float = 0.0
    time_limit: float | None = None   # seconds of training; stops cleanly after the step running then

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        check_choice("cell", self.cell, CELLS)
        check_at_least_one(self, "train_size", "val_size", "test_size", "embed_dim", "hidden_size", "num_layers")
        check_dropout(self.dropout)
        check_time_limit(self.time_limit)


@dataclass(frozen=True)
class Seq2SeqResult:
    config: Seq2SeqTaskConfig
    train: TrainConfig
    metrics: dict[str, float]           # test: exact_match, token_accuracy
    val: dict[str, float]               # the same on the validation split
    examples: list[dict]                # a few test sources with their prediction and target
    fit: FitResult
    stopped_by_time: bool
    sizes: dict[str, int]
    seconds: float


def run_seq2seq(cfg: Seq2SeqTaskConfig, train: TrainConfig, resume: bool = False) -> Seq2SeqResult:
    """Train on generated pairs, pick by validation exact match, score on the test split."""
    t0 = time.perf_counter()
    train_pairs, val_pairs, test_pairs = make_splits(cfg.task, (cfg.train_size, cfg.val_size, cfg.test_size),
                                                     seed=cfg.data_seed)
    vocab = build_vocab(train_pairs, task_alphabet(cfg.task))
    max_len = max(len(t) for _, t in train_pairs) + 2
    seed_everything(train.seed)
    model = Seq2Seq(model_config(cfg, vocab))
    meta = {"task": "seq2seq", "seq2seq": dataclasses.asdict(model.config), "vocab": vocab.to_dict(),
            "task_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "time_limit"},
            "max_len": max_len, "max_source_len": max(len(s) for s, _ in train_pairs)}
    deadline = Deadline(cfg.time_limit)
    val_batch = collate(val_pairs, vocab)
    evaluate = lambda m: {**{f"val_{k}": v for k, v in score(m, vocab, val_pairs, max_len).items()},
                          "val_loss": teacher_forced_loss(m, val_batch)}
    trainer = Trainer(model, train, deadline.wrap(_loss), evaluate, meta)
    b = collate(train_pairs, vocab)
    source = TensorBatches(b.src, b.src_lengths, b.tgt_in, b.tgt_out, b.tgt_lengths, batch_size=train.batch_size)
    fit, timed_out = fit_within(trainer, source, deadline, resume)
    model = trainer.model.cpu().eval()
    test_preds = translate(model, vocab, [s for s, _ in test_pairs], max_len)
    examples = [{"source": s, "prediction": p, "target": t} for (s, t), p in zip(test_pairs[:8], test_preds)]
    return Seq2SeqResult(cfg, train, score(model, vocab, test_pairs, max_len), score(model, vocab, val_pairs, max_len),
                         examples, fit, timed_out,
                         {"train": len(train_pairs), "val": len(val_pairs), "test": len(test_pairs)},
                         time.perf_counter() - t0)


def model_config(cfg: Seq2SeqTaskConfig, vocab: Vocabulary) -> Seq2SeqConfig:
    return Seq2SeqConfig(len(vocab), len(vocab), vocab.bos_id, vocab.eos_id, vocab.pad_id, cfg.embed_dim,
                         cfg.hidden_size, cfg.num_layers, cfg.cell, cfg.attention, cfg.dropout)


def _loss(model: Seq2Seq, batch) -> torch.Tensor:
    src, src_len, tgt_in, tgt_out, tgt_len = batch
    S, T = int(src_len.max()), int(tgt_len.max())             # trim the padding the whole set shares
    logits = model(src[:, :S], src_len, tgt_in[:, :T])       # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), tgt_out[:, :T].flatten(), ignore_index=model.config.pad_id)


@torch.no_grad()
def teacher_forced_loss(model: Seq2Seq, b: Seq2SeqBatch) -> float:
    """The training loss (cross-entropy per target token, teacher forcing) over a whole set: what
    --monitor val_loss watches."""
    device, total, count = next(model.parameters()).device, 0.0, 0.0
    for i in range(0, len(b.src), EVAL_BATCH):
        part = tuple(t[i:i + EVAL_BATCH].to(device) for t in (b.src, b.src_lengths, b.tgt_in, b.tgt_out, b.tgt_lengths))
        n = float(part[4].sum())
        total, count = total + float(_loss(model, part)) * n, count + n
    return total / count


@torch.no_grad()
def _decode(model: Seq2Seq, batch: Seq2SeqBatch, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    ids, lengths = model.greedy_decode(batch.src.to(device), batch.src_lengths.to(device), max_len)
    return ids.cpu(), lengths.cpu()


def score(model: Seq2Seq, vocab: Vocabulary, pairs: Sequence[Pair], max_len: int) -> dict[str, float]:
    """Exact match and token accuracy of greedy decoding over `pairs` (weighted by positions)."""
    right = exact = positions = 0.0
    for i in range(0, len(pairs), EVAL_BATCH):
        b = collate(pairs[i:i + EVAL_BATCH], vocab)
        ids, lengths = _decode(model, b, max_len)
        s = sequence_scores(ids, lengths, b.tgt_out, b.tgt_lengths - 1)      # tgt_lengths counts <eos>
        n_pos = float(b.tgt_lengths.sum())
        right, exact, positions = right + s["token_accuracy"] * n_pos, exact + s["exact_match"] * len(ids), positions + n_pos
    return {"exact_match": exact / len(pairs), "token_accuracy": right / positions}


def translate(model: Seq2Seq, vocab: Vocabulary, texts: Sequence[str], max_len: int) -> list[str]:
    """Greedy outputs for source strings. A character the model never saw is an error naming it."""
    texts = [t.strip() for t in texts]
    if not texts or any(not t for t in texts):
        raise UserError("give at least one non-empty text to translate")
    for t in texts:
        missing = vocab.unknown(t)
        if missing:
            raise UserError(f"{t!r} has character(s) {''.join(missing)!r} the model never saw in training "
                            f"(it knows {''.join(vocab.tokens[len(vocab.specials):])!r})")
    out = []
    for i in range(0, len(texts), EVAL_BATCH):
        chunk = texts[i:i + EVAL_BATCH]
        b = collate([(t, "") for t in chunk], vocab, unknown="error")
        ids, lengths = _decode(model, b, max(max_len, max(len(t) for t in chunk) + 2))
        out += ["".join(vocab.decode(row[:n].tolist())) for row, n in zip(ids, lengths)]
    return out


def output_caveats(meta: dict, text: str, output: str) -> list[str]:
    """What a prediction's reader should know: the source is longer than any the model trained on (a
    model from before this was recorded is not checked), or a dates model's output is no valid date."""
    caveats, longest = [], meta.get("max_source_len")
    if longest is not None and len(text.strip()) > longest:
        caveats.append(f"the text has {len(text.strip())} characters, more than any training source ({longest}): "
                       "outside what the model learned")
    if meta.get("task_config", {}).get("task") == "dates":
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", output):   # (fromisoformat also takes 20210305)
                raise ValueError(output)
            datetime.date.fromisoformat(output)
        except ValueError:
            caveats.append("not a valid date, so wrong (the formats the model learned are listed in "
                           "rnnkit/data/seq2seq.py)")
    return caveats


def load_model(directory) -> tuple[Seq2Seq, Vocabulary, dict]:
    """The model a `rnnkit seq2seq train` run saved in DIR (its model/ folder), its vocabulary and meta."""
    meta = read_meta(directory, "seq2seq")
    model = Seq2Seq(Seq2SeqConfig(**meta["seq2seq"]))
    load_weights_into(model, model_dir(directory))
    return model.eval(), Vocabulary.from_dict(meta["vocab"]), meta


def metrics_document(r: Seq2SeqResult) -> dict:
    fit = r.fit
    return {**r.metrics, "split": "test", "val": r.val,
            "model": {**dataclasses.asdict(r.config), "epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch,
                      "steps": len(fit.history.loss), "stopped_by_time_limit": r.stopped_by_time},
            "sizes": r.sizes, "examples": r.examples, "train": r.train.to_json(), "seconds": round(r.seconds, 2)}


def write_outputs(result: Seq2SeqResult, out) -> Path:
    path = Path(out) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, metrics_document(result))
    return path
