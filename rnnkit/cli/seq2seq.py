"""`rnnkit seq2seq train|predict`: an encoder-decoder on generated reversal or date-normalisation pairs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..tasks.seq2seq import Seq2SeqTaskConfig, load_model, output_caveats, run_seq2seq, translate, write_outputs
from ..models.cells import CELLS
from .common import (add_common_flags, add_task, add_train_flags, config_from, epochs_summary, finite_float, positive_float,
                     positive_int, train_config)

TRAIN_EXAMPLES = """\
examples:
  rnnkit seq2seq train
      reversal: strings of 5-20 letters from "abcdefghij" -> the same string backwards; a GRU
      encoder-decoder with attention, 20,000 training pairs, scored on 2,000 unseen test pairs
  rnnkit seq2seq train --task dates --epochs 8 --out runs/dates
      dates written 17 human ways ("the 5th of March, 2021", "Fri, 5 Mar 2021", "20210305")
      -> ISO 8601 "2021-03-05"
  rnnkit seq2seq predict --model runs/dates/model "March 5, 2021" "2021/03/05"
      (the 17 formats are listed in rnnkit/data/seq2seq.py; others, such as "2021/3/5", are outside
      what the model learned: a dates model's output that is no valid date is flagged on stderr)

writes to --out: metrics.json (exact_match and token_accuracy on the test split; the same for the
validation split under "val"), model/ (checkpoint + metrics.csv per epoch). The best epoch by
validation exact match is kept. Ctrl-C or --time-limit saves a checkpoint; --resume continues it.
"""

PREDICT_EXAMPLES = """\
example:
  rnnkit seq2seq predict --model runs/seq2seq/model abcdefg jjiihhg
      prints one line per text: the text, a tab, the model's output; on stderr, a warning for a text
      longer than any training source and, for a dates model, for an output that is no valid date
"""

D = Seq2SeqTaskConfig()


def add_parser(subparsers) -> None:
    sub = add_task(subparsers, "seq2seq", help="encoder-decoder: string reversal, date normalisation",
                   description="Sequence to sequence with an encoder-decoder trained by teacher forcing.")
    _add_train(sub)
    _add_predict(sub)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train on generated pairs and score exact match on a test split",
                       description="Train an encoder-decoder (teacher forcing) on pairs the library generates, "
                                   "decode greedily, and score exact match and token accuracy on unseen pairs.",
                       epilog=TRAIN_EXAMPLES)
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=("reverse", "dates"), default=D.task, help=f"which pairs (default {D.task})")
    g.add_argument("--train-size", type=positive_int, default=D.train_size, help=f"training pairs (default {D.train_size})")
    g.add_argument("--val-size", type=positive_int, default=D.val_size, help=f"validation pairs (default {D.val_size})")
    g.add_argument("--test-size", type=positive_int, default=D.test_size, help=f"test pairs (default {D.test_size})")
    g.add_argument("--data-seed", type=int, default=D.data_seed, help="seed that draws the pairs (default 0)")
    g.add_argument("--cell", choices=tuple(CELLS), default=D.cell, help=f"recurrent cell (default {D.cell})")
    g.add_argument("--embed-dim", type=positive_int, default=D.embed_dim, help=f"embedding size (default {D.embed_dim})")
    g.add_argument("--attention", action=argparse.BooleanOptionalAction, default=D.attention,
                   help="Luong attention over the encoder states (default on)")
    g.add_argument("--dropout", type=finite_float, default=D.dropout, help="dropout (default 0)")
    g.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="stop training cleanly after this many seconds (checkpoint kept)")
    add_common_flags(p, epochs=10, hidden_size=D.hidden_size, out="runs/seq2seq", clip_norm=1.0)
    add_train_flags(p, lr=3e-3, batch_size=64, schedule="cosine", threads=1)   # small models: one thread is fastest
    p.set_defaults(run=run_train, patience=5, monitor="val_exact_match")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="decode new texts with a trained model", epilog=PREDICT_EXAMPLES)
    p.add_argument("--model", required=True, metavar="DIR", help="the model/ directory a train run wrote")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="source strings")
    p.set_defaults(run=run_predict)


def run_train(args: argparse.Namespace) -> int:
    cfg = config_from(args, Seq2SeqTaskConfig)
    train = train_config(args, out=str(Path(args.out) / "model"))
    result = run_seq2seq(cfg, train, resume=args.resume)
    write_outputs(result, args.out)
    for ex in result.examples[:3]:
        mark = "ok" if ex["prediction"] == ex["target"] else "WRONG"
        print(f"  {ex['source']!r} -> {ex['prediction']!r} ({mark})")
    m, f = result.metrics, result.fit
    print(f"seq2seq {cfg.task}: {cfg.cell.upper()} {cfg.hidden_size}{' + attention' if cfg.attention else ''}, "
          f"test exact match {100 * m['exact_match']:.2f}%, token accuracy {100 * m['token_accuracy']:.2f}% "
          f"on {result.sizes['test']} unseen pairs; "
          f"{epochs_summary(f, train.patience, result.stopped_by_time, len(f.history.loss))}, "
          f"{result.seconds:.1f}s -> {args.out}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    model, vocab, meta = load_model(args.model)
    for text, out in zip(args.texts, translate(model, vocab, args.texts, meta["max_len"])):
        print(f"{text}\t{out}")
        for caveat in output_caveats(meta, text, out):
            print(f"rnnkit seq2seq: warning: {text!r} -> {out!r}: {caveat}", file=sys.stderr)
    return 0
