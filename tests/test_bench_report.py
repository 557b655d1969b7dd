"""`make bench`'s pipeline on the quick grid: the report renders every section, and regenerating it keeps
the hand-written sections below the marker. No speed is asserted (speed lives in docs/benchmarks.md)."""
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from report import KEEP_MARKER  # noqa: E402


def test_quick_bench_renders_and_keeps_the_hand_written_tail(tmp_path):
    out = tmp_path / "bench.md"
    out.write_text("# old generated part\n\nstale\n" + KEEP_MARKER + "\n\n## Hand-written\n\nkept text\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_layers.py"), "--quick", "--cells", "rnn",
           "--no-memory", "--hidden", "16", "--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = out.read_text()
    assert "stale" not in doc and doc.count(KEEP_MARKER) == 1 and doc.endswith("## Hand-written\n\nkept text\n")
    for heading in ("## Summary", "## Training step", "## Inference", "## Extras: their cost"):
        assert heading in doc
    if platform.libc_ver()[0] == "glibc":                              # thresholds fixed by mallopt
        assert "| memory allocator | glibc, fixed: blocks up to 32 MiB from the heap" in doc
    assert "| 5 | zoneout / plain engine | train |" in doc and "| 5 | layer_norm / plain engine | train |" in doc
    extras = doc[doc.index("## Extras"):doc.index(KEEP_MARKER)]
    row = [line for line in extras.splitlines() if line.startswith("| 8 | 20 | 16 |")]
    assert len(row) == 1 and row[0].count("×") == 2                   # both costs, as numbers
    cost = float(row[0].split("|")[6].strip().rstrip("×"))
    assert 0.2 < cost < 20                                            # a ratio of two real timings


def test_fused_kernel_benchmark_runs_every_contender():
    """benchmarks/bench_fused.py (the development tool) swaps the layers' project_scan for the pure path and
    the fused node: each contender runs and gets a timing (it once broke silently when the layers moved
    from scan to project_scan)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_fused.py"), "--cells", "rnn,gru", "--hidden", "16",
           "--seq", "6", "--batch", "3", "--reps", "2", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 | ")]
    assert [r.split("|")[2].strip() for r in rows] == ["rnn", "gru"]
    for row in rows:                                              # torch, pure, fused and the extras: timed
        cells = [c.strip() for c in row.split("|")[4:10]]
        assert all(float(c.split("/")[0]) > 0 for c in cells), row
