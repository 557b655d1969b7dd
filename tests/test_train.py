"""The trainer: exact resume, atomic checkpoints, NaN stop, clipping, early stopping, TBPTT streams."""
import csv
import math
import os
import signal

import pytest
import torch
from torch import nn

import rnnkit as rk
from rnnkit.train import (NonFiniteLossError, StreamBatches, TensorBatches, TrainConfig, Trainer,
                          TrainingInterrupted, checkpoint, load_checkpoint, run_segments)


class Tiny(nn.Module):
    """LSTM -> dropout -> linear on the last step: exercises the RNG (dropout) and the optimizer state."""

    def __init__(self):
        super().__init__()
        self.rnn = rk.LSTM(2, 8, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 1)

    def forward(self, x):                                   # x (B, T, 2)
        out, _ = self.rnn(x)                                # (B, T, 8)
        return self.head(self.drop(out[:, -1]))             # (B, 1)


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def data(n=48):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, 2, generator=g)                  # (N, T, I)
    return x, x.sum((1, 2))[:, None] * 0.3                  # (N, 1)


def evaluate_on(x, y):
    return lambda model: {"val_loss": nn.functional.mse_loss(model(x), y).item()}


def trainer(out, **kw):
    torch.manual_seed(0)
    cfg = dict(epochs=6, lr=1e-2, batch_size=16, clip_norm=0.5, schedule="cosine", progress=False, out=str(out))
    x, y = data()
    return Trainer(Tiny(), TrainConfig(**{**cfg, **kw}), mse, evaluate_on(x[:8], y[:8]))


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exact_resume_after_ctrl_c_mid_epoch(tmp_path):
    full = trainer(tmp_path / "full")
    full.fit(data())
    calls = {"n": 0}

    def interrupting(model, batch):
        calls["n"] += 1
        if calls["n"] == 8:                                 # step 8 of 18: inside epoch 3
            os.kill(os.getpid(), signal.SIGINT)             # a real Ctrl-C, deferred to the step end
        return mse(model, batch)

    first = trainer(tmp_path / "cut")
    first.loss_fn = interrupting
    with pytest.raises(TrainingInterrupted, match="--resume"):
        first.fit(data())
    assert load_checkpoint(tmp_path / "cut").manifest["step"] == 8
    resumed = trainer(tmp_path / "cut")
    resumed.fit(data(), resume=True)
    assert_bitwise(weights(full.model), weights(resumed.model))
    assert resumed.history.grad_norm == full.history.grad_norm
    assert [r["val_loss"] for r in resumed.history.epochs] == [r["val_loss"] for r in full.history.epochs]


def test_exact_resume_after_epoch_e_with_more_epochs(tmp_path):
    full = trainer(tmp_path / "full", schedule="step", step_size=2, patience=None)
    full.fit(data())
    part = trainer(tmp_path / "part", schedule="step", step_size=2, epochs=3)
    part.fit(data())
    rest = trainer(tmp_path / "part", schedule="step", step_size=2, epochs=6)
    rest.fit(data(), resume=True)
    assert rest.epoch == 6
    assert_bitwise(weights(full.model), weights(rest.model))
    rows = list(csv.DictReader(open(tmp_path / "part" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]


def _scripted(out, epochs, losses):
    """A trainer with early stopping on (patience 5: it never stops) and these validation losses."""
    script = iter(losses)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, lr=1e-2, batch_size=16, patience=5, progress=False, out=str(out))
    return Trainer(Tiny(), cfg, mse, lambda model: {"val_loss": next(script)})


def test_more_epochs_after_early_stopping_restored_older_weights_is_refused(tmp_path):
    _scripted(tmp_path / "a", 2, [3.0, 5.0]).fit(data())              # best epoch 1: its weights put back
    with pytest.raises(ValueError, match=r"finished its 2 epochs and early stopping then put back the weights "
                                         r"of its best epoch \(1\).* --epochs 3 in a new --out"):
        _scripted(tmp_path / "a", 3, [4.0]).fit(data(), resume=True)
    assert _scripted(tmp_path / "a", 2, []).fit(data(), resume=True).epochs_run == 2   # same epochs: its result
    _scripted(tmp_path / "b", 2, [5.0, 3.0]).fit(data())              # best = last: nothing was replaced
    full = _scripted(tmp_path / "c", 3, [5.0, 3.0, 1.0])             # epoch 3 best: its weights are kept
    full.fit(data())
    more = _scripted(tmp_path / "b", 3, [1.0])
    assert more.fit(data(), resume=True).epochs_run == 3
    assert_bitwise(weights(full.model), weights(more.model))           # continued exactly


def test_resume_with_other_settings_is_refused(tmp_path):
    trainer(tmp_path / "a", epochs=1).fit(data())
    with pytest.raises(ValueError, match="lr"):
        trainer(tmp_path / "a", epochs=2, lr=0.5).fit(data(), resume=True)


@pytest.mark.parametrize("crash_on", [1, 2, 3])             # weights, state, manifest
def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_on):
    t = trainer(tmp_path, epochs=2, checkpoint_every=1)
    t.fit(data())
    before = load_checkpoint(tmp_path)
    t.model.head.bias.data += 1.0                           # something new to save
    calls = {"n": 0}

    def crashing(f, data):
        calls["n"] += 1
        if calls["n"] == crash_on:
            f.write(data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        f.write(data)

    monkeypatch.setattr(checkpoint, "_write", crashing)
    with pytest.raises(OSError, match="simulated"):
        t.save()
    monkeypatch.undo()
    after = load_checkpoint(tmp_path)
    assert after.manifest == before.manifest
    assert_bitwise(after.weights, before.weights)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_written_files_get_the_umask_mode_or_keep_their_own(tmp_path):
    """atomic_write's temporary file is mkstemp's 0600; the file it becomes gets what open() would give a
    new file (0644 under umask 022), or the mode of the file it replaces."""
    old = os.umask(0o022)
    try:
        checkpoint.atomic_write(tmp_path / "new.json", b"{}")
        assert os.stat(tmp_path / "new.json").st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "new.json", 0o640)
        checkpoint.atomic_write(tmp_path / "new.json", b"[]")
        assert os.stat(tmp_path / "new.json").st_mode & 0o777 == 0o640
        assert (tmp_path / "new.json").read_bytes() == b"[]"
        os.umask(0o077)
        checkpoint.atomic_write(tmp_path / "private.json", b"{}")
        assert os.stat(tmp_path / "private.json").st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["new.json", "private.json"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = mse(model, batch)
        return loss * math.nan if calls["n"] == 8 else loss  # epoch 3 (3 steps per epoch)

    t = trainer(tmp_path, checkpoint_every=1)
    t.loss_fn = poisoned
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 3.*checkpoint \(epoch 2\)"):
        t.fit(data())
    good = load_checkpoint(tmp_path)
    assert good.manifest["epoch"] == 2 and good.manifest["step"] == 6
    assert all(torch.isfinite(v).all() for v in good.weights.values())


def test_clipping_logs_the_preclip_norm_and_clips():
    for clip, expect_step in [(dict(clip_norm=1.0), 1.0 / 3), (dict(clip_value=0.5), 0.5), ({}, 1000.0)]:
        model = nn.Linear(3, 3, bias=False)                 # 9 weights
        w0 = model.weight.detach().clone()
        loss = lambda m, batch: 1000.0 * m.weight.sum()     # gradient: 1000 everywhere, norm 3000
        t = Trainer(model, TrainConfig(epochs=1, optimizer="sgd", lr=1.0, batch_size=1, progress=False, **clip),
                    loss)
        t.fit((torch.zeros(1, 3),))
        assert t.history.grad_norm == [pytest.approx(3000.0)]
        assert torch.allclose(w0 - model.weight.detach(), torch.full((3, 3), expect_step))


def test_early_stopping_restores_best_weights():
    script = iter([5.0, 3.0, 4.0, 6.0, 7.0, 1.0])           # best at epoch 2, patience 2: stop after 4
    snapshots = []

    def evaluate(model):
        snapshots.append(weights(model))
        return {"val_loss": next(script)}

    torch.manual_seed(0)
    t = Trainer(Tiny(), TrainConfig(epochs=6, lr=1e-2, batch_size=16, patience=2, progress=False), mse, evaluate)
    result = t.fit(data())
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 2
    assert_bitwise(weights(t.model), snapshots[1])
    assert not torch.equal(snapshots[1]["head.weight"], snapshots[3]["head.weight"])


def test_stream_batches_shapes_and_layout():
    stream = torch.arange(103)
    src = StreamBatches(stream, batch_size=4, k=10)         # 102 inputs -> 4 streams of 25
    windows = src.batches()
    assert [w.x.shape for w in windows] == [(4, 10), (4, 10), (4, 5)]
    assert len(src) == 3
    assert torch.equal(torch.cat([w.x for w in windows], 1), torch.arange(100).view(4, 25))
    assert all(torch.equal(w.y, w.x + 1) for w in windows)


def test_tbptt_carries_and_detaches_state():
    torch.manual_seed(0)
    rnn = rk.GRU(1, 5, batch_first=True)
    stream = torch.randn(61, 1)                             # (N, 1)
    seen = []

    def loss_fn(model, w, state):
        seen.append(state)
        out, state = model(w.x, state)                      # (B, k, 5)
        seen.append(state)
        return out.pow(2).mean() * 0.0, state               # zero gradient: the weights stay put

    t = Trainer(rnn, TrainConfig(epochs=1, batch_size=3, tbptt=7, optimizer="sgd", lr=0.1, progress=False),
                loss_fn)
    t.fit(stream)
    assert seen[0] is None and len(seen) == 2 * 3          # 60 // 3 = 20 steps per stream: 7, 7, 6
    for out_prev, in_next in zip(seen[1::2], seen[2::2]):
        assert in_next.grad_fn is None and out_prev.grad_fn is not None
        assert torch.equal(in_next, out_prev.detach())
    with torch.no_grad():                                   # carried state == one long run
        _, h_full = rnn(stream[:60].view(3, 20, 1))
    assert torch.allclose(seen[-1], h_full, atol=1e-6)


def test_run_segments_resets_at_sequence_starts():
    torch.manual_seed(0)
    rnn = rk.RNN(1, 4, batch_first=True)
    x = torch.randn(2, 6, 1)                                # (B, T, 1)
    h0 = torch.randn(1, 2, 4)
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[1, 3] = True                                     # row 1: a new sequence begins at step 3
    out, h = run_segments(rnn, x, h0, starts)
    ref0, _ = rnn(x[:1], h0[:, :1])
    ref1_tail, h1 = rnn(x[1:, 3:])                          # from a zero state
    assert torch.allclose(out[:1], ref0, atol=1e-6)
    assert torch.allclose(out[1:, 3:], ref1_tail, atol=1e-6)
    assert torch.allclose(h[:, 1:], h1, atol=1e-6)


def test_metrics_csv_and_loadable_weights(tmp_path):
    t = trainer(tmp_path, epochs=2)
    t.fit(data())
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "val_loss", "lr", "grad_norm_mean", "grad_norm_max"} <= rows[0].keys()
    model = Tiny()
    model.load_state_dict(load_checkpoint(tmp_path).weights)
    assert_bitwise(weights(model), weights(t.model))


def test_metrics_csv_appends_each_epoch_and_rewrites_when_it_must(tmp_path, monkeypatch):
    """After the first write a new epoch's row is appended (no rewrite of the whole file); the file is
    rewritten whole, equal to what one write of all rows gives, when a writer starts (a resume: rows of
    rolled-back epochs go), when the columns change, or when the file is not as the writer left it."""
    from rnnkit.train import report
    rewrites = []
    def atomic_write(path, data):
        if path.parent == tmp_path:                            # not whole()'s
            rewrites.append(len(rows))
        path.write_bytes(data)
    monkeypatch.setattr(report, "atomic_write", atomic_write)

    def whole(rows):                                           # one write of all the rows, by a fresh writer
        other = tmp_path / "whole"
        other.mkdir(exist_ok=True)
        report.MetricsCSV(other).write(rows)
        return (other / "metrics.csv").read_text()

    path, rows = tmp_path / "metrics.csv", []
    table = report.MetricsCSV(tmp_path)
    for epoch in range(1, 6):
        rows.append({"epoch": epoch, "loss": 1 / epoch, "note": "a,b" if epoch == 2 else ""})
        table.write(rows)
    assert rewrites == [1] and path.read_text() == whole(rows)
    assert [r["epoch"] for r in csv.DictReader(path.read_text().splitlines())] == ["1", "2", "3", "4", "5"]
    rows.append({"epoch": 6, "loss": 0.1, "note": "", "val_loss": 0.2})   # a new column
    table.write(rows)
    rows.append({"epoch": 7, "loss": 0.1, "note": "", "val_loss": 0.3})
    table.write(rows)
    assert rewrites == [1, 6] and path.read_text() == whole(rows)
    with open(path, "a") as f:                                 # changed behind the writer's back
        f.write("junk\n")
    rows.append({"epoch": 8, "loss": 0.1, "note": "", "val_loss": 0.3})
    table.write(rows)
    path.unlink()
    rows.append({"epoch": 9, "loss": 0.1, "note": "", "val_loss": 0.3})
    table.write(rows)
    assert rewrites == [1, 6, 8, 9] and path.read_text() == whole(rows)
    report.MetricsCSV(tmp_path).write(rows[:4])                # a resumed run from epoch 4's checkpoint
    assert [r["epoch"] for r in csv.DictReader(path.read_text().splitlines())] == ["1", "2", "3", "4"]
    report.MetricsCSV(None).write(rows)                        # no directory: nothing written


def test_tensor_batches_cover_every_example_once():
    x = torch.arange(10)
    got = torch.cat([b[0] for b in TensorBatches(x, batch_size=3).batches(torch.Generator().manual_seed(0))])
    assert sorted(got.tolist()) == list(range(10))


def test_tensorboard_gets_each_epochs_scalars_when_installed(tmp_path, monkeypatch):
    """tensorboard is optional (not a dependency): a stand-in torch.utils.tensorboard records what the
    trainer writes; without the package the run writes metrics.csv only (the other tests)."""
    import sys
    import types
    written, closed = [], []

    class SummaryWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, key, value, step):
            written.append((self.logdir, key, value, step))

        def flush(self):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    t = trainer(tmp_path / "run", epochs=3)
    t.fit(data())
    assert {w[0] for w in written} == {str(tmp_path / "run" / "tensorboard")}
    val = [(step, value) for _, key, value, step in written if key == "val_loss"]
    assert [s for s, _ in val] == [1, 2, 3] and all(math.isfinite(v) for _, v in val)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_loss"]) for r in rows] == pytest.approx([v for _, v in val])
    assert closed == [True]
