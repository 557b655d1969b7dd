"""`rnnkit textgen train|sample`: character- or word-level language models, and sampling from them."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..tasks.textgen import DATASETS, TextgenConfig, generate, load_corpus, load_model, run_textgen, write_outputs
from ..models.cells import CELLS
from .common import (add_common_flags, add_task, add_train_flags, config_from, finite_float, nonnegative_int,
                     seed_int, positive_float, positive_int, train_config)

TRAIN_EXAMPLES = """\
examples:
  rnnkit textgen train
      the bundled text (Hamlet and Macbeth, Acts I-II, 111 KB): a character-level 2x256 LSTM,
      truncated BPTT over 64-character windows, the last 10% held out
  rnnkit textgen train --dataset shakespeare --time-limit 600 --anneal --out runs/shakespeare
      all 38 plays through the dataset registry (4.99 M characters), 10 minutes of training
  rnnkit textgen train --data book.txt --level word --lower --hidden-size 512 --epochs 20
      your own UTF-8 text file, one token per word or punctuation mark
  rnnkit textgen sample --model runs/shakespeare/model --prompt "ROMEO:" --temperature 0.8

writes to --out: metrics.json (loss in nats per token, perplexity, bits per token on the held-out
10%; at level char a token is a character, so bits_per_character too), model/ (checkpoint with the
vocabulary and configuration + metrics.csv, a row per finished epoch). Ctrl-C or --time-limit saves
a checkpoint of the last step; --resume continues it.
"""

SAMPLE_EXAMPLES = """\
examples:
  rnnkit textgen sample --model runs/textgen/model --prompt "HAMLET:" --temperature 0.8 --length 400
  rnnkit textgen sample --model runs/textgen/model --prompt "To be" --temperature 0 --length 50   (greedy)
  rnnkit textgen sample --model runs/textgen/model --prompt "The king" --top-k 5 --seed 3

A character model refuses prompt characters it never saw in training; a word model reads unseen
words as <unk>.
"""

D = TextgenConfig()


def add_parser(subparsers) -> None:
    sub = add_task(subparsers, "textgen", help="character/word language models; sampling",
                   description="Train a recurrent language model and sample text from it.")
    _add_train(sub)
    _add_sample(sub)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a language model with stateful truncated BPTT",
                       description="Train a character- or word-level RNN/LSTM/GRU language model with stateful "
                                   "truncated backpropagation through time; score it on the last 10% of the text.",
                       epilog=TRAIN_EXAMPLES)
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="F.txt", help="a UTF-8 text file (default: the bundled text)")
    d.add_argument("--dataset", choices=DATASETS, help="a data set from the registry instead of --data")
    d.add_argument("--level", choices=("char", "word"), default=D.level, help=f"token level (default {D.level})")
    d.add_argument("--lower", action=argparse.BooleanOptionalAction, default=D.lower, help="fold case (default off)")
    d.add_argument("--min-freq", type=positive_int, default=D.min_freq,
                   help=f"word level: rarer words become <unk> (default {D.min_freq})")
    d.add_argument("--val-fraction", type=finite_float, default=D.val_fraction, help="held-out tail (default 0.1)")
    m = p.add_argument_group("model")
    m.add_argument("--cell", choices=tuple(CELLS), default=D.cell, help=f"recurrent cell (default {D.cell})")
    m.add_argument("--embed-dim", type=positive_int, default=D.embed_dim, help=f"token embedding size (default {D.embed_dim})")
    m.add_argument("--dropout", type=finite_float, default=D.dropout, help="dropout (default 0)")
    m.add_argument("--tbptt", "--bptt", dest="tbptt", type=positive_int, default=64, metavar="K",
                   help="truncated BPTT window: steps per update (default 64)")
    m.add_argument("--time-limit", type=positive_float, default=None, metavar="SECONDS",
                   help="stop training cleanly after this many seconds (checkpoint kept)")
    m.add_argument("--anneal", action="store_true", help="with --time-limit: cosine learning-rate decay to lr/10 over it")
    add_common_flags(p, epochs=10, hidden_size=D.hidden_size, num_layers=D.num_layers, out="runs/textgen",
                     clip_norm=5.0)
    add_train_flags(p, lr=3e-3, batch_size=32)
    p.set_defaults(run=run_train)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="continue a prompt with a trained model", epilog=SAMPLE_EXAMPLES)
    p.add_argument("--model", required=True, metavar="DIR", help="the model/ directory a train run wrote")
    p.add_argument("--prompt", required=True, metavar="P", help="text to continue")
    p.add_argument("--temperature", type=finite_float, default=1.0, metavar="T",
                   help="below 1 sharper, above 1 wilder, 0 greedy (default 1)")
    p.add_argument("--top-k", type=positive_int, default=None, metavar="K", help="draw from the K most likely tokens only")
    p.add_argument("--length", type=nonnegative_int, default=300, metavar="N", help="tokens to add (default 300)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed of the draw (default 0)")
    p.set_defaults(run=run_sample)


def run_train(args: argparse.Namespace) -> int:
    text, source = load_corpus(args.data, args.dataset)
    cfg = config_from(args, TextgenConfig)
    train = train_config(args, out=str(Path(args.out) / "model"))
    r = run_textgen(text, cfg, train, source, resume=args.resume)
    write_outputs(r, args.out)
    print(r.sample)
    print("-" * 40)
    m, unit = r.metrics, "char" if cfg.level == "char" else "word"
    steps = len(r.fit.history.loss)
    session = f" ({r.session_steps} in this session)" if r.session_steps != steps else ""
    stop = ", stopped at the time limit" if r.stopped_by_time else ""
    print(f"textgen: {cfg.num_layers}x{cfg.hidden_size} {cfg.cell.upper()} {cfg.level} model on {source} "
          f"({r.sizes['train_tokens']:,} train / {r.sizes['val_tokens']:,} held-out tokens): validation loss "
          f"{m['loss']:.4f} nats/{unit}, {m['bits_per_token']:.3f} bits/{unit}, perplexity {m['perplexity']:.2f}; "
          f"{steps} steps{session} in {r.train_seconds:.0f}s ({r.session_steps / max(r.train_seconds, 1e-9):.2f} "
          f"steps/s{stop}), "
          f"{r.seconds:.1f}s in all -> {args.out}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    model, vocab, meta = load_model(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    print(generate(model, vocab, meta, args.prompt, args.length, args.temperature, args.top_k, gen))
    return 0
