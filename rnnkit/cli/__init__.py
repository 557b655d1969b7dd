"""`rnnkit <task> ...`: argument parsing and printing only.

Each task is a module here exposing `add_parser(subparsers)` (which must `set_defaults(run=...)`);
`main` wires up the ones present. Bad input (`UserError`, `ValueError`) exits 2 with its message; a training failure
exits 1; Ctrl-C during training exits 130 (SIGTERM: 143) after the trainer's message (where the checkpoint is, how to resume).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UserError
from ..tasks import BACKENDS, TrainingError, TrainingInterrupted, backend_scope
from .common import RawTextParser, check_backend_has_cells

COMMANDS = ("forecast", "textgen", "classify", "seq2seq", "memory", "gradflow")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rnnkit", description="Recurrent neural networks: train, measure and apply them.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<task>", parser_class=RawTextParser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue                                   # task not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    backend = getattr(args, "backend", None)                # --backend: the whole command, evaluation too
    try:
        check_backend_has_cells(backend, getattr(args, "cell", None))
        with backend_scope(backend if backend in BACKENDS else None):   # a bad name: the task's own message
            return int(args.run(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"rnnkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (NotADirectoryError, FileExistsError, IsADirectoryError, PermissionError) as e:   # --out and the like
        print(f"rnnkit {args.command}: error: {e.strerror}: {e.filename}; give a directory this user can write "
              "(for --out: one that is not an existing file)", file=sys.stderr)
        return 2
    except TrainingError as e:                             # e.g. the loss turned NaN: last good checkpoint kept
        print(f"rnnkit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:                       # a checkpoint was written; e says how to resume
        print(f"rnnkit {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum                              # 130 after Ctrl-C, 143 after SIGTERM
    except KeyboardInterrupt:
        print(f"rnnkit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
