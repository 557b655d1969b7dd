"""`make bench`'s pipeline on the quick grid: the report renders every section, and regenerating it keeps
the hand-written sections below the marker. No speed is asserted (speed lives in docs/benchmarks.md)."""
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import adding_minimal  # noqa: E402
import bench_backend  # noqa: E402
import bench_fused  # noqa: E402
import bench_layers  # noqa: E402
import bench_minimal  # noqa: E402
import bench_stream  # noqa: E402
from common import interleaved, matmul_peak_gflops  # noqa: E402
from report import KEEP_MARKER, render  # noqa: E402


def test_interleaving_gives_every_contender_more_than_one_predecessor():
    """Round-robin timing: each contender runs `reps` times, and none always runs just after the same
    other one (a contender following torch.nn's GRU read 6% slower than the same kernel timed alone)."""
    calls = []
    times = interleaved({name: (lambda name=name: calls.append(name)) for name in "abcd"}, reps=4)
    assert {k: len(v) for k, v in times.items()} == {name: 4 for name in "abcd"} and len(calls) == 16
    rounds = [calls[i:i + 4] for i in range(0, 16, 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    before = {name: {r[r.index(name) - 1] for r in rounds if r.index(name) > 0} for name in "abcd"}
    assert all(len(p) >= 2 for p in before.values()), before


def test_quick_bench_renders_and_keeps_the_hand_written_tail(tmp_path):
    out = tmp_path / "bench.md"
    out.write_text("# old generated part\n\nstale\n" + KEEP_MARKER + "\n\n## Hand-written\n\nkept text\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_layers.py"), "--quick", "--cells", "rnn",
           "--no-memory", "--hidden", "16", "--threads", "1", "--out", str(out), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = out.read_text()
    run = json.loads(out.with_suffix(".json").read_text())
    before, after = run["machine"]["peak_gflops_runs"]                 # measured before and after the grid
    assert run["machine"]["peak_gflops"] == max(before, after) > 0
    assert f"the better of before the grid {before:.1f} and after it {after:.1f}" in doc
    assert "above the measured matmul peak" not in render(run)[0]
    run["machine"]["peak_gflops"] = 1e-6                               # a peak measured cold: shares > 100%
    assert "engine row(s) run above the measured matmul peak" in render(run)[0]
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
    assert "## Issue 5 on every recorded machine" not in doc          # no other machine's run beside it
    assert run["machine"]["gemm_route"] in ("dnnl", "packed", "blas", "aten", None)


def test_report_sets_issue_5_of_runs_recorded_on_other_machines_beside_this_one(tmp_path):
    """docs/benchmarks-<machine>.json files beside the report keep their machine's verdicts in sight after
    another machine regenerates it; a file that is not a run's JSON is skipped with a word, not a crash."""
    out = tmp_path / "bench.md"
    point = {"cell": "rnn", "B": 8, "T": 20, "H": 16, "peak_bytes": None,
             "extras": {name: {"median": 1.0} for name in ("engine", "zoneout", "layer_norm")},
             "train": {"torch": {"median": 2.0}, "native": {"median": 2.0}, "engine": {"median": 1.0},
                       "trace": {"median": 1.05}}}
    def run(cpu, commit, date, trace):
        p = json.loads(json.dumps(point))
        p["train"]["trace"]["median"] = trace
        p["infer"] = p["train"]
        return {"machine": {"cpu": cpu, "rnnkit_commit": commit, "date": date, "peak_gflops": 100.0},
                "points": [p]}
    (tmp_path / "bench-old-box.json").write_text(json.dumps(run("Old CPU", "aaaaaaa", "2026-01-02T00:00", 1.5)))
    (tmp_path / "bench-older-box.json").write_text(json.dumps(run("Older CPU", "bbbbbbb", "2026-01-01T00:00", 1.0)))
    (tmp_path / "bench-notes.json").write_text("[1, 2]")
    from report import machines_section, recorded_runs
    others = recorded_runs(out)
    assert [label for label, _ in others] == ["older-box", "old-box"]          # oldest first, junk skipped
    lines = machines_section(run("This CPU", "ccccccc", "2026-02-01T00:00", 1.02), others)
    table = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in lines if row.startswith("| ")}
    assert table[""] == ["**this run**", "**older-box**", "**old-box**"]
    assert table["CPU"] == ["This CPU", "Older CPU", "Old CPU"]
    assert table["rnnkit commit"] == ["`ccccccc`", "`bbbbbbb`", "`aaaaaaa`"]
    assert table["trace overhead, all points (≤ +10%)"] == [
        "+2% … +2% **PASS**", "+0% … +0% **PASS**", "+50% … +50% **FAIL** (rnn B=8 T=20 H=16)"]
    assert table["engine GRU, H ≥ 128 (≥ 1.50)"] == ["not in the grid"] * 3
    assert machines_section(run("This CPU", "c", "2026", 1.0), []) == []


def test_matmul_peak_warms_up_before_it_measures():
    """One warm-up call read 106.6 GFLOP/s on an EPYC that ran the same product at 170 a minute later."""
    start = time.perf_counter()
    gflops = matmul_peak_gflops(64, reps=3, warmup_s=0.2)
    assert time.perf_counter() - start >= 0.2 and gflops > 0


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


@pytest.mark.parametrize("main,argv,message", [
    (bench_layers.main, ["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (bench_layers.main, ["--budget", "-1"], "argument --budget: expected a number > 0, got '-1'"),
    (bench_layers.main, ["--seq", "100,x"], "argument --seq: expected comma-separated integers, got '100,x'"),
    (bench_layers.main, ["--cells", "rnn,Foo"], "argument --cells: unknown name(s) ['Foo']; choose from rnn, lstm, gru"),
    (bench_layers.main, ["--from-json", "{tmp}/none.json"], "--from-json: cannot read a run from {tmp}/none.json"),
    (bench_layers.main, ["--from-json", "{tmp}/list.json"], "is not a run's JSON (no 'points'); write one with --json"),
    (bench_layers.main, ["--out", "{tmp}"], "cannot write {tmp}: it is a folder"),
    (bench_layers.main, ["--out", "{tmp}/file.txt/x.md"], "cannot create the folder of {tmp}/file.txt/x.md"),
    (bench_stream.main, ["--hidden", "0"], "argument --hidden: expected integers >= 1, got '0'"),
    (bench_stream.main, ["--number", "0"], "argument --number: expected an integer >= 1, got 0"),
    (bench_minimal.main, ["--reps", "0"], "argument --reps: expected an integer >= 1, got 0"),
    (adding_minimal.main, ["--length", "1"], "argument --length: expected an integer >= 2, got 1"),
    (adding_minimal.main, ["--seeds", "-1"], "argument --seeds: expected integers >= 0, got '-1'"),
    (adding_minimal.main, ["--cells", "minlstm,gru"], "unknown name(s) ['gru']; choose from MinGRU, MinLSTM"),
    (adding_minimal.main, ["--lr", "nan"], "argument --lr: expected a number > 0, got 'nan'"),
    (bench_fused.main, ["--threads", "1,0"], "argument --threads: expected integers >= 1, got '1,0'"),
    (bench_backend.main, ["--rounds", "0"], "argument --rounds: expected an integer >= 1, got 0"),
    (bench_backend.main, ["--only", "forecast,fast"], "--only: unknown ['fast']; choose among adding, dates"),
    (bench_backend.main, ["--only", ","], "--only: unknown empty list"),
])
def test_bad_arguments_exit_2_before_measuring(main, argv, message, tmp_path, capsys):
    """Every benchmark script refuses a bad value with one line and exit status 2, before it measures or
    builds anything (an output path is checked up front, not after a ten-minute run)."""
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err


def test_bench_backend_reads_each_commands_own_seconds_and_tabulates_medians(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.json").write_text('{"seconds": 2.5, "mape": 3.0}')
    (tmp_path / "r").mkdir()                                   # rnnkit memory: one entry per cell
    (tmp_path / "r" / "results.json").write_text('{"runs": [{"seconds": 1.25}, {"seconds": 2.0}]}')
    assert bench_backend.seconds(tmp_path / "m") == 2.5 and bench_backend.seconds(tmp_path / "r") == 3.25
    text = bench_backend.table({"forecast": {"auto": [3.0, 2.0, 9.0], "engine": [1.0, 1.5, 2.5]}}, 3)
    assert "| `forecast --no-sarima --threads 2` |" in text and "| 3.00 | 1.50 | 2.00× |" in text
    assert bench_backend.parse_args(["--only", "forecast, adding,forecast"]).names == ["forecast", "adding"]
