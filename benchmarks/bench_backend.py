"""The CLI's training commands with `--backend auto` and `--backend engine`: what the engine's speed is
worth in the tasks, end to end (docs/benchmarks.md, section "The engine in the tasks").

    .venv/bin/python benchmarks/bench_backend.py                   # the six commands, 3 rounds (~8 min)
    .venv/bin/python benchmarks/bench_backend.py --rounds 1 --only forecast,textgen

Each command runs as its own process (`python -m rnnkit ...`), the two backends one after the other
within a round and the first one alternating between rounds, so a slow spell of the machine hits both.
The time compared is the command's own `seconds` from the metrics.json / results.json it writes
(training and evaluation; not Python's start-up); the table shows medians over the rounds and the
ratio auto / engine (> 1: the engine is faster). Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from script_args import check_writable, int_at_least, write_text

from rnnkit import _fused

# name -> (the command's arguments, the model in words, how to read its seconds from the output folder)
COMMANDS = {
    "adding": (["memory", "--task", "adding", "--length", "100", "--cell", "lstm,gru", "--steps", "300"],
               "LSTM and GRU, H=128, B=50, T=100, 300 steps each (no --threads flag: torch's default)"),
    "dates": (["seq2seq", "train", "--task", "dates", "--epochs", "1", "--threads", "2"],
              "GRU encoder-decoder with attention, 1 epoch"),
    "rotten_tomatoes": (["classify", "train", "--dataset", "rotten_tomatoes", "--bidirectional", "--epochs", "1",
                         "--threads", "2"], "biLSTM over padded reviews, 1 epoch"),
    "textgen": (["textgen", "train", "--epochs", "1", "--threads", "2"], "2x256 LSTM, TBPTT 64, 1 epoch"),
    "forecast": (["forecast", "--no-sarima", "--threads", "2"], "LSTM H=32 on 48-step windows, 200 epochs"),
    "classify": (["classify", "train", "--epochs", "2", "--threads", "2"], "LSTM on the bundled reviews, 2 epochs"),
}
BACKENDS = ("auto", "engine")


def seconds(out: Path) -> float:
    """The command's own time: metrics.json's `seconds`, or the sum over results.json's runs (memory)."""
    metrics = out / "metrics.json"
    if metrics.exists():
        return float(json.loads(metrics.read_text())["seconds"])
    runs = json.loads((out / "results.json").read_text())["runs"]
    return sum(float(r["seconds"]) for r in runs)


def run_once(name: str, backend: str, folder: Path) -> float:
    args, _ = COMMANDS[name]
    out = folder / f"{name}-{backend}"
    cmd = [sys.executable, "-m", "rnnkit", *args, "--backend", backend, "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_backend: {' '.join(cmd[1:])} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    if _fused.UNAVAILABLE in done.stderr:                            # its warning: the pure-torch path ran
        raise SystemExit(f"bench_backend: {' '.join(cmd[1:])} ran the engine's pure-torch path, not the fused "
                         f"kernel; nothing to compare:\n{done.stderr[-2000:]}")
    return seconds(out)


def kernel_ready(parser: argparse.ArgumentParser) -> None:
    """Build (or load) the fused kernel here, before anything is timed: a first-use build inside a timed
    command would count ~20 s of compiling as training, and without the kernel "engine" would mean the
    pure-torch fallback."""
    try:
        _fused.build()
    except Exception as e:  # noqa: BLE001  (compiler missing, build error, ...)
        parser.error(f"the fused CPU kernel does not build ({type(e).__name__}: {str(e).strip()[-300:]}); "
                     "the engine would run its pure-torch path, which is not what this compares")


def measure(names: list[str], rounds: int) -> dict:
    times = {name: {b: [] for b in BACKENDS} for name in names}
    with tempfile.TemporaryDirectory(prefix="rnnkit-bench-backend-") as tmp:
        for r in range(rounds):
            for name in names:
                for backend in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                    times[name][backend].append(run_once(name, backend, Path(tmp)))
                    print(f"round {r + 1}/{rounds} {name} {backend}: {times[name][backend][-1]:.2f} s",
                          file=sys.stderr, flush=True)
    return times


def table(times: dict, rounds: int) -> str:
    lines = ["| command (`rnnkit …`, plus `--backend B`) | model | auto (s) | engine (s) | ratio |",
             "|---|---|---|---|---|"]
    for name, t in times.items():
        args, model = COMMANDS[name]
        a, e = statistics.median(t["auto"]), statistics.median(t["engine"])
        lines.append(f"| `{' '.join(args)}` | {model} | {a:.2f} | {e:.2f} | {a / e:.2f}× |")
    lines.append("")
    lines.append(f"Medians of {rounds} round(s); every time in the JSON (`--json`).")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int_at_least(1), default=3, help="rounds of every command (default 3)")
    p.add_argument("--only", default=",".join(COMMANDS),
                   help=f"comma-separated among {','.join(COMMANDS)} (default: all)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--json", type=Path, default=None, help="also write every time here")
    args = p.parse_args(argv)
    names = list(dict.fromkeys(n.strip() for n in args.only.split(",") if n.strip()))   # once each, in order
    unknown = [n for n in names if n not in COMMANDS]
    if unknown or not names:
        p.error(f"--only: unknown {unknown or 'empty list'}; choose among {', '.join(COMMANDS)}")
    args.names = names
    check_writable(p, args.out, args.json)
    kernel_ready(p)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    times = measure(args.names, args.rounds)
    text = table(times, args.rounds)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    if args.json:
        write_text(args.json, json.dumps(times, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
