"""`rnnkit classify train|predict`: many-to-one text classification (bundled: movie-review sentiment)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..tasks.classify import (DATASETS, ClassifyConfig, load_model, load_texts, predict, run_classify,
                              write_outputs)
from ..models.cells import CELLS
from .common import (add_common_flags, add_task, add_train_flags, config_from, epochs_summary, finite_float, positive_float,
                     positive_int, train_config)

TRAIN_EXAMPLES = """\
examples:
  rnnkit classify train
      the bundled sample: 1,500 Rotten Tomatoes snippets, fresh or rotten; 20% held out
  rnnkit classify train --dataset rotten_tomatoes --bidirectional --monitor val_accuracy --out runs/rt
      all 12,808 snippets through the dataset registry (downloaded once, sha256-checked); early
      stopping on validation accuracy (77.2% test accuracy, docs/results.md)
  rnnkit classify train --data tickets.csv --text-column body --label-column queue --epochs 20
      your own CSV: any number of classes, one text and one label per row
  rnnkit classify predict --model runs/rt/model "a gorgeous, witty film" "two hours I will never get back"

writes to --out: metrics.json (accuracy and macro_f1 on the held-out 20%, beside the majority-class
and bag-of-words logistic-regression baselines on the same texts), model/ (checkpoint + metrics.csv).
Early stopping on a validation split carved from the training part keeps the best epoch.
"""

PREDICT_EXAMPLES = """\
example:
  rnnkit classify predict --model runs/classify/model "a gorgeous, witty film" "dull and far too long"
      prints per text: the predicted label, then each class's probability
"""

D = ClassifyConfig()


def add_parser(subparsers) -> None:
    sub = add_task(subparsers, "classify", help="classify texts (bundled: movie-review sentiment)",
                   description="Many-to-one sequence classification with a recurrent encoder.")
    _add_train(sub)
    _add_predict(sub)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a classifier and score it on a held-out split",
                       description="Train an RNN/LSTM/GRU classifier on labelled texts, hold out 20% (stratified) "
                                   "and compare with majority-class and bag-of-words logistic-regression baselines.",
                       epilog=TRAIN_EXAMPLES)
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="F.csv", help="CSV with a header row (default: bundled review sample)")
    d.add_argument("--text-column", metavar="C", help="column holding the text (default 'text')")
    d.add_argument("--label-column", metavar="L", help="column holding the label (default 'label')")
    d.add_argument("--drop-empty", action="store_true", help="drop rows with an empty text or label")
    d.add_argument("--dataset", choices=DATASETS, help="a data set from the registry instead of --data")
    d.add_argument("--test-fraction", type=finite_float, default=D.test_fraction, help="held out for the test (default 0.2)")
    d.add_argument("--val-fraction", type=finite_float, default=D.val_fraction,
                   help="of the rest, kept for early stopping (default 0.1)")
    d.add_argument("--data-seed", type=int, default=D.data_seed, help="seed of the splits (default 0)")
    m = p.add_argument_group("model")
    m.add_argument("--lower", action=argparse.BooleanOptionalAction, default=D.lower, help="fold case (default on)")
    m.add_argument("--min-freq", type=positive_int, default=D.min_freq, help=f"rarer words become <unk> (default {D.min_freq})")
    m.add_argument("--max-len", type=positive_int, default=D.max_len, help=f"words read per text (default {D.max_len})")
    m.add_argument("--cell", choices=tuple(CELLS), default=D.cell, help=f"recurrent cell (default {D.cell})")
    m.add_argument("--embed-dim", type=positive_int, default=D.embed_dim, help=f"word embedding size (default {D.embed_dim})")
    m.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=D.bidirectional,
                   help="read each text both ways (default off)")
    m.add_argument("--pooling", choices=("last", "mean", "max"), default=D.pooling,
                   help=f"how the steps become one vector (default {D.pooling})")
    m.add_argument("--dropout", type=finite_float, default=D.dropout, help=f"dropout (default {D.dropout})")
    m.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="stop training cleanly after this many seconds (checkpoint kept)")
    add_common_flags(p, epochs=15, hidden_size=D.hidden_size, out="runs/classify", clip_norm=5.0)
    add_train_flags(p, lr=2e-3, batch_size=64, threads=1)   # small models: one thread is fastest
    p.set_defaults(run=run_train, patience=3)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label new texts with a trained model", epilog=PREDICT_EXAMPLES)
    p.add_argument("--model", required=True, metavar="DIR", help="the model/ directory a train run wrote")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    p.set_defaults(run=run_predict)


def run_train(args: argparse.Namespace) -> int:
    data, source = load_texts(args.data, args.text_column, args.label_column, args.dataset, args.drop_empty)
    cfg = config_from(args, ClassifyConfig)
    train = train_config(args, out=str(Path(args.out) / "model"))
    r = run_classify(data, cfg, train, source, resume=args.resume)
    write_outputs(r, args.out)
    print(f"{'method':<16}{'accuracy %':>12}{'macro F1':>10}")
    name = f"{'bi' if cfg.bidirectional else ''}{cfg.cell.upper()} {cfg.hidden_size}"
    for label, m in ((name, r.metrics), ("bow_logistic", r.baselines["bow_logistic"]),
                     ("majority", r.baselines["majority"])):
        print(f"{label:<16}{100 * m['accuracy']:>12.2f}{m['macro_f1']:>10.3f}")
    print(f"classify: {name} on {source} ({r.sizes['train']}+{r.sizes['val']} train/val, {r.sizes['test']} test, "
          f"{len(r.classes)} classes): accuracy {100 * r.metrics['accuracy']:.2f}%, macro F1 "
          f"{r.metrics['macro_f1']:.3f} (bag-of-words {100 * r.baselines['bow_logistic']['accuracy']:.2f}%, majority "
          f"{100 * r.baselines['majority']['accuracy']:.2f}%); {epochs_summary(r.fit, train.patience, r.stopped_by_time)}, "
          f"{r.seconds:.1f}s -> {args.out}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    model, vocab, meta = load_model(args.model)
    for text, (label, probs) in zip(args.texts, predict(model, vocab, meta, args.texts)):
        shown = "  ".join(f"{c}={p:.3f}" for c, p in probs.items())
        print(f"{label}\t{shown}\t{text}")
    return 0
