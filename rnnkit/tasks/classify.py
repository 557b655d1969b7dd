"""Many-to-one classification: labelled texts -> words -> vocabulary -> recurrent classifier -> test scores.

    data = load_texts()                                          # bundled reviews; or a CSV, or the registry
    result = run_classify(data, ClassifyConfig(), TrainConfig(epochs=10, out="out/model"))
    write_outputs(result, "out")                                 # metrics.json
    model, vocab, meta = load_model("out/model")
    predict(model, vocab, meta, ["a gorgeous, witty film"])      # [(label, {class: probability})]

Splits: `test_fraction` of the data is held out, stratified by class, drawn with `data_seed` (the same
test set for every training seed); `val_fraction` of the rest is carved off again, stratified, for
early stopping. The vocabulary and both baselines see the training part only. Baselines, scored on
the same test set: the majority class of the training part, and bag-of-words logistic regression
(`bow_logistic`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.classify import (CsvColumns, LabelledTexts, bundled_reviews, check_labelled, pad_batch,
                             read_labelled_csv, stratified_split, text_key)
from ..data.registry import load as registry_load
from ..data.text import Vocabulary, require_words, word_tokens
from ..errors import (UserError, check_at_least_one, check_choice, check_dropout, check_fraction,
                      check_time_limit)
from ..models.classifier import POOLINGS, ClassifierConfig, SequenceClassifier
from ..models.language import CELLS
from ..train import FitResult, TensorBatches, TrainConfig, Trainer, load_weights_into, seed_everything
from .text_metrics import Deadline, classification_scores, fit_within, model_dir, read_meta, write_json

DATASETS = ("rotten_tomatoes",)
EVAL_BATCH = 512


@dataclass(frozen=True)
class ClassifyConfig:
    """Splits, tokens and model. CLI flags map one to one onto the fields."""
    test_fraction: float = 0.2
    val_fraction: float = 0.1       # of the training part, for early stopping
    data_seed: int = 0              # draws the splits
    lower: bool = True              # fold case before building the word vocabulary
    min_freq: int = 2               # rarer words become <unk>
    max_len: int = 200              # tokens kept per text (the first ones)
    cell: str = "lstm"
    embed_dim: int = 128
    hidden_size: int = 64
    num_layers: int = 1
    bidirectional: bool = False
    pooling: str = "max"            # last | mean | max over the real steps
    dropout: float = 0.5            # on the embeddings and before the head
    time_limit: float | None = None

    def __post_init__(self):
        for name in ("test_fraction", "val_fraction"):
            check_fraction(name, getattr(self, name))
        check_at_least_one(self, "min_freq", "max_len", "embed_dim", "hidden_size", "num_layers")
        check_choice("cell", self.cell, CELLS)
        check_choice("pooling", self.pooling, POOLINGS)
        check_dropout(self.dropout)
        check_time_limit(self.time_limit)


@dataclass(frozen=True)
class ClassifyResult:
    config: ClassifyConfig
    train: TrainConfig
    classes: tuple[str, ...]
    metrics: dict[str, float]                  # the model on the test split: accuracy, macro_f1
    baselines: dict[str, dict[str, float]]     # majority, bow_logistic: the same on the same split
    sizes: dict[str, int]
    fit: FitResult
    stopped_by_time: bool
    source: str
    seconds: float


def load_texts(data: str | None = None, text_column: str | None = None, label_column: str | None = None,
               dataset: str | None = None, drop_empty: bool = False) -> tuple[LabelledTexts, str]:
    """(texts, where they came from): the user's CSV, a registry data set, or the bundled reviews."""
    if data is not None and dataset is not None:
        raise UserError("give either --data (your CSV) or --dataset, not both")
    if data is None and (text_column or label_column):
        raise UserError("--text-column and --label-column need --data (a CSV file)")
    if data is not None:
        cols = CsvColumns(text_column or "text", label_column or "label", drop_empty)
        return read_labelled_csv(data, cols), str(data)
    if dataset is not None:
        if dataset not in DATASETS:
            raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        df = registry_load(dataset)
        texts = LabelledTexts(tuple(df["text"].astype(str)), tuple(df["label"].astype(str)))
        check_labelled(texts, dataset)
        return texts, f"registry:{dataset}"
    return bundled_reviews(), "bundled reviews sample"


def tokens_of(text: str, lower: bool) -> list[str]:
    return word_tokens(text, lower=lower)


def encode_texts(texts: Sequence[str], vocab: Vocabulary, cfg_lower: bool, max_len: int) -> list[list[int]]:
    """Word ids per text, first `max_len` kept; a text with no word or mark at all is an error."""
    seqs = [vocab.encode(tokens_of(t, cfg_lower)[:max_len]) for t in texts]
    empty = [texts[i] for i, s in enumerate(seqs) if not s]
    if empty:
        raise UserError(f"{len(empty)} text(s) have no words or punctuation to read, e.g. {empty[0]!r}")
    return seqs


def run_classify(data: LabelledTexts, cfg: ClassifyConfig, train: TrainConfig, source: str = "",
                 resume: bool = False) -> ClassifyResult:
    t0 = time.perf_counter()
    classes = data.classes
    keys = [text_key(t) for t in data.texts]              # a repeated text stays on one side of each split
    fit_idx, test_idx = stratified_split(data.labels, cfg.test_fraction, cfg.data_seed, groups=keys)
    fit_part, test = data.subset(fit_idx), data.subset(test_idx)
    tr_idx, val_idx = stratified_split(fit_part.labels, cfg.val_fraction, cfg.data_seed,
                                       f" left for training and validation after --test-fraction {cfg.test_fraction}",
                                       groups=[keys[i] for i in fit_idx])
    tr, val = fit_part.subset(tr_idx), fit_part.subset(val_idx)
    vocab = Vocabulary.build((tokens_of(t, cfg.lower) for t in tr.texts), min_freq=cfg.min_freq)
    require_words(vocab, cfg.min_freq, "the training texts")
    X = {name: _tensors(part, vocab, classes, cfg) for name, part in (("train", tr), ("val", val), ("test", test))}
    seed_everything(train.seed)
    model = SequenceClassifier(model_config(cfg, vocab, classes))
    meta = {"task": "classify", "classifier": dataclasses.asdict(model.config), "vocab": vocab.to_dict(),
            "classes": list(classes), "lower": cfg.lower, "max_len": cfg.max_len, "source": source}
    deadline = Deadline(cfg.time_limit)
    evaluate = lambda m: {f"val_{k}": v for k, v in _evaluate(m, X["val"], len(classes)).items()}
    trainer = Trainer(model, train, deadline.wrap(_loss), evaluate, meta)
    fit, timed_out = fit_within(trainer, TensorBatches(*X["train"], batch_size=train.batch_size), deadline, resume)
    metrics = _evaluate(trainer.model.cpu().eval(), X["test"], len(classes))
    metrics.pop("loss")
    return ClassifyResult(cfg, train, classes, metrics, _baselines(X, len(classes)),
                          {"train": len(tr.labels), "val": len(val.labels), "test": len(test.labels), "vocab": len(vocab),
                           "repeated_texts": len(keys) - len(set(keys))},
                          fit, timed_out, source, time.perf_counter() - t0)


def model_config(cfg: ClassifyConfig, vocab: Vocabulary, classes: Sequence[str]) -> ClassifierConfig:
    return ClassifierConfig(len(vocab), len(classes), cfg.embed_dim, cfg.hidden_size, cfg.num_layers, cfg.cell,
                            cfg.bidirectional, cfg.pooling, cfg.dropout, vocab.pad_id)


def _tensors(part: LabelledTexts, vocab: Vocabulary, classes, cfg: ClassifyConfig):
    """(tokens (N, T) right-padded, lengths (N,), labels (N,))."""
    tokens, lengths = pad_batch(encode_texts(part.texts, vocab, cfg.lower, cfg.max_len), vocab.pad_id)
    index = {c: i for i, c in enumerate(classes)}
    return tokens, lengths, torch.tensor([index[y] for y in part.labels], dtype=torch.long)


def _loss(model: SequenceClassifier, batch) -> torch.Tensor:
    tokens, lengths, labels = batch
    return F.cross_entropy(model(tokens[:, :int(lengths.max())], lengths), labels)


@torch.no_grad()
def _logits(model: SequenceClassifier, tokens, lengths) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(tokens), EVAL_BATCH):
        t, n = tokens[i:i + EVAL_BATCH], lengths[i:i + EVAL_BATCH]
        out.append(model(t[:, :int(n.max())].to(device), n.to(device)).cpu())
    return torch.cat(out)                                                  # (N, C)


def _evaluate(model, split, num_classes: int) -> dict[str, float]:
    tokens, lengths, labels = split
    logits = _logits(model, tokens, lengths)
    return {"loss": float(F.cross_entropy(logits, labels)),
            **classification_scores(logits.argmax(1), labels, num_classes)}


def _baselines(X: dict, num_classes: int) -> dict[str, dict[str, float]]:
    y_train, y_test = X["train"][2], X["test"][2]
    majority = int(torch.bincount(y_train, minlength=num_classes).argmax())
    bow_pred, reg = bow_logistic(X["train"], X["val"], X["test"], num_classes)
    return {"majority": classification_scores(torch.full_like(y_test, majority), y_test, num_classes),
            "bow_logistic": {**classification_scores(bow_pred, y_test, num_classes), "l2": reg}}


def bag_of_words(tokens: torch.Tensor, lengths: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Sparse (N, V) 0/1 features: which words occur in each text (padding left out)."""
    real = torch.arange(tokens.shape[1]) < lengths[:, None]                # (N, T)
    rows = torch.arange(len(tokens))[:, None].expand_as(tokens)[real]
    pairs = torch.unique(torch.stack([rows, tokens[real]]), dim=1)         # (2, nnz) distinct (text, word)
    return torch.sparse_coo_tensor(pairs, torch.ones(pairs.shape[1]), (len(tokens), vocab_size),
                                   check_invariants=False).coalesce()


def bow_logistic(train, val, test, num_classes: int, l2_grid=(1e-4, 1e-3, 1e-2)) -> tuple[torch.Tensor, float]:
    """Bag-of-words logistic regression: softmax(X W + b) on word-presence features, mean cross-entropy
    + l2/2 |W|^2, fitted by L-BFGS on the training part; l2 picked by validation accuracy. Returns the
    test predictions and the l2 chosen."""
    V = int(max(int(t[0].max()) for t in (train, val, test))) + 1
    (Xtr, ytr), (Xva, yva), (Xte, _) = [(bag_of_words(t[0], t[1], V), t[2]) for t in (train, val, test)]
    best = None
    for l2 in l2_grid:
        W, b = _fit_logistic(Xtr, ytr, num_classes, l2)
        acc = float(((Xva @ W + b).argmax(1) == yva).double().mean())
        if best is None or acc > best[0]:
            best = (acc, l2, W, b)
    _, l2, W, b = best
    return (Xte @ W + b).argmax(1), l2


def _fit_logistic(X: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, steps: int = 200):
    gen = torch.Generator().manual_seed(0)
    W = (0.01 * torch.randn(X.shape[1], num_classes, generator=gen)).requires_grad_()   # (V, C)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.sparse.mm(X, W) + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()


# -- a trained model -------------------------------------------------------------------------------

def load_model(directory) -> tuple[SequenceClassifier, Vocabulary, dict]:
    """The classifier a `rnnkit classify train` run saved in DIR (its model/ folder), its vocabulary, meta."""
    meta = read_meta(directory, "classify")
    model = SequenceClassifier(ClassifierConfig(**meta["classifier"]))
    load_weights_into(model, model_dir(directory))
    return model.eval(), Vocabulary.from_dict(meta["vocab"]), meta


def predict(model: SequenceClassifier, vocab: Vocabulary, meta: dict,
            texts: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """(label, {class: probability}) per text; words never seen in training read as <unk>."""
    if not texts:
        raise UserError("give at least one text to classify")
    tokens, lengths = pad_batch(encode_texts(list(texts), vocab, meta["lower"], meta["max_len"]), vocab.pad_id)
    probs = torch.softmax(_logits(model.eval(), tokens, lengths), dim=1)                # (N, C)
    classes = meta["classes"]
    return [(classes[int(p.argmax())], {c: float(v) for c, v in zip(classes, p)}) for p in probs]


def metrics_document(r: ClassifyResult) -> dict:
    fit = r.fit
    return {**r.metrics, "split": "test", **r.baselines, "classes": list(r.classes), "sizes": r.sizes,
            "data": r.source,
            "model": {**dataclasses.asdict(r.config), "epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch,
                      "steps": len(fit.history.loss), "stopped_by_time_limit": r.stopped_by_time},
            "train": r.train.to_json(), "seconds": round(r.seconds, 2)}


def write_outputs(result: ClassifyResult, out) -> Path:
    path = Path(out) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, metrics_document(result))
    return path
