"""What a run reports while it trains: `metrics.csv` each epoch, TensorBoard when installed, a progress bar."""
from __future__ import annotations

import contextlib
import csv
import io
import signal
import threading
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import atomic_write

METRICS_CSV = "metrics.csv"


def write_metrics_csv(directory, rows: list[dict]) -> None:
    """Rewrite `metrics.csv` with one row per epoch so far (atomically: a resumed run rewrites it
    from the checkpoint's history, so it never holds rows from epochs that were rolled back)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(directory) / METRICS_CSV, buf.getvalue().encode())


class TensorBoard:
    """Epoch scalars to TensorBoard under `out/tensorboard` when the tensorboard package is installed;
    silently nothing otherwise."""

    def __init__(self, directory: str | None):
        self.writer = None
        if directory is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:                                   # tensorboard is optional
            return
        self.writer = SummaryWriter(str(Path(directory) / "tensorboard"))

    def log(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train") -> tqdm:
    """One bar over all the steps of a run; tqdm shows steps/s, the trainer adds loss and epoch."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
                dynamic_ncols=True, leave=False)


@contextlib.contextmanager
def deferred_sigint():
    """Turn the first Ctrl-C into a flag the loop checks between steps (so the checkpoint it then
    writes is a consistent step boundary); a second Ctrl-C interrupts at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
