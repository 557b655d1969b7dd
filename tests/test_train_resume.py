"""Resume and interruption edge cases of the Trainer: a second Ctrl-C, Ctrl-C at an epoch's end or in the
last epoch, resuming with another epoch count (cosine schedule, fewer epochs than done), a new run in a
directory that holds an old or unreadable checkpoint, and the messages that name what differs."""
import csv
import dataclasses
import os
import signal
import warnings

import pytest
import torch
from test_train import assert_bitwise, data, trainer, weights

from rnnkit.errors import UserError
from rnnkit.train import TrainingInterrupted, checkpoint, load_checkpoint


def _kill_twice():
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)


def _epochs(out):
    with open(out / "metrics.csv") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("where", ["optimizer step", "end of epoch"])
def test_a_second_ctrl_c_saves_nothing_and_resume_from_the_last_checkpoint_is_exact(tmp_path, where):
    """A second Ctrl-C lands wherever the program is (here: between the optimizer step and the step count,
    or between an epoch's history row and its epoch count); saving that state made a checkpoint whose
    counters and weights disagree (resume then redid a step, or listed an epoch twice). metrics.csv goes
    back to the checkpoint's rows (epoch 3's row had been appended after the epoch-2 checkpoint)."""
    full = trainer(tmp_path / "full", checkpoint_every=2)
    full.fit(data())
    cut = trainer(tmp_path / "cut", checkpoint_every=2)
    if where == "optimizer step":
        steps = [0]

        def hook(opt, args, kwargs):
            steps[0] += 1
            if steps[0] == 11:                                    # inside epoch 4 (3 steps an epoch)
                _kill_twice()
        cut.optimizer.register_step_post_hook(hook)
    else:
        early, calls = cut._early_stop, [0]

        def early_stop(metrics):
            calls[0] += 1
            if calls[0] == 3:                                     # epoch 3's row is in the history already
                _kill_twice()
            return early(metrics)
        cut._early_stop = early_stop
    with pytest.raises(TrainingInterrupted, match=r"interrupted twice.*without saving.*epoch 2\)"):
        cut.fit(data())
    assert load_checkpoint(tmp_path / "cut").manifest["step"] == 6          # epoch 2's, untouched
    assert _epochs(tmp_path / "cut") == [1, 2]
    resumed = trainer(tmp_path / "cut", checkpoint_every=2)
    resumed.fit(data(), resume=True)
    assert_bitwise(weights(full.model), weights(resumed.model))
    assert [r["epoch"] for r in resumed.history.epochs] == [1, 2, 3, 4, 5, 6] == _epochs(tmp_path / "cut")


def test_ctrl_c_while_the_checkpoint_is_written_waits_for_it(tmp_path):
    """A second press during the first press's save raised a bare KeyboardInterrupt out of the save."""
    t, calls = trainer(tmp_path, checkpoint_every=0), [0]
    t.optimizer.register_step_post_hook(lambda *a: calls.__setitem__(0, calls[0] + 1) or
                                        (calls[0] == 5 and os.kill(os.getpid(), signal.SIGINT)))
    save = t.save
    t.save = lambda: os.kill(os.getpid(), signal.SIGINT) or save()
    with pytest.raises(TrainingInterrupted, match="in epoch 2, step 5; checkpoint saved"):
        t.fit(data())
    assert load_checkpoint(tmp_path).manifest["step"] == 5


def test_a_failed_run_leaves_metrics_csv_as_the_checkpoint_it_leaves(tmp_path):
    """A new run over an old one that stops on a NaN loss before its first checkpoint: the old checkpoint
    stays, so do its metrics rows (the new run's had replaced them), and the message does not call the
    old run's checkpoint this run's."""
    from rnnkit.train import NonFiniteLossError
    trainer(tmp_path, epochs=3).fit(data())
    t, calls = trainer(tmp_path, epochs=6, lr=0.02, checkpoint_every=0), [0]
    loss_fn = t.loss_fn
    t.loss_fn = lambda m, b: loss_fn(m, b) * (float("nan") if calls.__setitem__(0, calls[0] + 1) or calls[0] == 8 else 1)
    with pytest.raises(NonFiniteLossError, match="no checkpoint of this run had been written yet"):
        t.fit(data())
    assert _epochs(tmp_path) == [1, 2, 3] and load_checkpoint(tmp_path).manifest["epoch"] == 3


def test_ctrl_c_at_an_epochs_last_step_and_in_the_last_epoch(tmp_path):
    """At an epoch's last step the epoch is ended first (evaluation, schedule) and the message says 'after
    epoch N' (resuming ran the schedule without an optimizer step: torch warned); in the last epoch the
    run is finished and saved, and then the interrupt is raised (it used to be dropped: a back-test went
    on to its next fold)."""
    full = trainer(tmp_path / "full")
    full.fit(data())
    cut, calls = trainer(tmp_path / "cut"), [0]

    def hook(opt, args, kwargs):
        calls[0] += 1
        if calls[0] == 6:                                         # epoch 2's last step
            os.kill(os.getpid(), signal.SIGINT)
    cut.optimizer.register_step_post_hook(hook)
    with pytest.raises(TrainingInterrupted, match="after epoch 2, step 6"):
        cut.fit(data())
    resumed = trainer(tmp_path / "cut")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # no "lr_scheduler.step() before optimizer.step()"
        resumed.fit(data(), resume=True)
    assert_bitwise(weights(full.model), weights(resumed.model))
    last = trainer(tmp_path / "last")
    evaluate = last.evaluate
    last.evaluate = lambda m: (os.kill(os.getpid(), signal.SIGINT) if last.epoch == 5 else None) or evaluate(m)
    with pytest.raises(TrainingInterrupted, match="interrupted in the last epoch; the run finished and is saved"):
        last.fit(data())                                          # Ctrl-C during the 6th epoch's evaluation
    assert last.epoch == 6 and load_checkpoint(tmp_path / "last").manifest["finished"]
    assert_bitwise(weights(full.model), weights(last.model))


def test_resume_refuses_another_epoch_count_under_cosine_and_fewer_epochs_than_done(tmp_path):
    part = trainer(tmp_path / "run", epochs=3)                    # cosine over 3 epochs
    part.fit(data())
    with pytest.raises(UserError, match=r"cosine schedule over its 3 epochs.*--epochs 6.*Resume with --epochs 3"):
        trainer(tmp_path / "run", epochs=6).fit(data(), resume=True)
    assert trainer(tmp_path / "run", epochs=3).fit(data(), resume=True).epochs_run == 3   # finished: as it was
    step = trainer(tmp_path / "step", epochs=4, schedule="step", step_size=2)
    calls = [0]
    step.optimizer.register_step_post_hook(lambda *a: calls.__setitem__(0, calls[0] + 1) or
                                           (calls[0] == 8 and os.kill(os.getpid(), signal.SIGINT)))
    with pytest.raises(TrainingInterrupted, match="in epoch 3, step 8"):
        step.fit(data())                                          # 2 epochs and 2 steps of the third
    for epochs in (2, 1):
        with pytest.raises(UserError, match=r"already trained 2 epoch\(s\) and 2 step\(s\) of the next.*--epochs 3"):
            trainer(tmp_path / "step", epochs=epochs, schedule="step", step_size=2).fit(data(), resume=True)
    assert trainer(tmp_path / "step", epochs=3, schedule="step", step_size=2).fit(data(), resume=True).epochs_run == 3


def test_a_new_run_in_a_directory_with_an_old_or_unreadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer(out, epochs=2).fit(data())                            # an old run: 2 metrics rows
    fresh, calls = trainer(out, epochs=4, lr=0.1), [0]
    fresh.optimizer.register_step_post_hook(lambda *a: calls.__setitem__(0, calls[0] + 1) or
                                            (calls[0] == 1 and os.kill(os.getpid(), signal.SIGINT)))
    with pytest.raises(TrainingInterrupted):
        fresh.fit(data())                                         # interrupted in its first epoch
    assert load_checkpoint(out).manifest["step"] == 1 and not (out / "metrics.csv").exists()   # none of the old rows
    for junk in ('{"format": "x"}', "not json"):
        bad = tmp_path / f"bad{len(junk)}"
        bad.mkdir()
        (bad / checkpoint.MANIFEST).write_text(junk)
        t = trainer(bad, epochs=2)
        with pytest.raises(UserError, match="remove it or choose another --out directory"):
            t.fit(data())
        assert t.step == 0                                        # refused before training, not after it
    damaged = tmp_path / "damaged"                                # damaged while the run went on: it still saves
    t = trainer(damaged, epochs=2, checkpoint_every=1)
    t.fit(data())
    (damaged / checkpoint.MANIFEST).write_text("not json")
    t.save()
    assert load_checkpoint(damaged).manifest["save"] == 2         # past the files still there (save 1)


def test_resume_names_what_differs_in_the_setup(tmp_path):
    t = trainer(tmp_path, epochs=1)
    t.meta = {"task": "x", "model": {"hidden": 8, "layers": 1}}
    t.fit(data())
    again = trainer(tmp_path, epochs=1)
    again.meta = {"task": "x", "model": {"hidden": 16, "layers": 1}}
    with pytest.raises(UserError, match=r"different model or data setup \(model.hidden: 8 -> 16\)"):
        again.fit(data(), resume=True)
    vocab = trainer(tmp_path / "v", epochs=1)
    vocab.meta = {"tokens": [f"word{i}" for i in range(3000)]}
    vocab.fit(data())
    other = trainer(tmp_path / "v", epochs=1)
    other.meta = {"tokens": [f"word{i}" for i in range(7)] + ["new"] + [f"word{i}" for i in range(8, 2000)]}
    with pytest.raises(UserError, match=r"\(tokens: 3000 items -> 2000 items, first difference at \[7\]\)") as e:
        other.fit(data(), resume=True)
    assert len(str(e.value)) < 300                               # not both vocabularies in full


def test_forecast_backtest_interrupted_in_an_early_fold_says_so(monkeypatch, tmp_path):
    """Only the last fold is checkpointed: Ctrl-C in an earlier one said 'no --out directory'."""
    from rnnkit.tasks import forecast
    from rnnkit.train import TrainConfig

    def interrupted(*a, **k):
        raise TrainingInterrupted("interrupted in epoch 1, step 1; this run has no output directory")
    monkeypatch.setattr(forecast, "fit_fold", interrupted)
    cfg = forecast.ForecastConfig(backtest=3)
    with pytest.raises(TrainingInterrupted, match=r"back-test fold 1 of 3.*only the last fold's training is checkpointed"):
        forecast.run_forecast(forecast.load_series(None), cfg, TrainConfig(out=str(tmp_path), progress=False))


def test_with_early_stopping_the_checkpoint_model_is_the_best_epochs_and_resume_the_last_steps(tmp_path):
    """An interrupted (or time-limited) run with early stopping: its checkpoint's model file is the best
    epoch's weights (what predict reads), resume continues from the last step, bitwise; fit_within at
    the deadline scores the best epoch's weights (it scored the last step's, under 'best epoch k')."""
    from test_train import _scripted

    from rnnkit.tasks.text_metrics import Deadline, fit_within
    from rnnkit.train import load_weights
    losses = [3.0, 1.0, 2.0, 4.0, 5.0]                            # best: epoch 2
    full = _scripted(tmp_path / "full", 5, losses)
    full.fit(data())
    cut, calls = _scripted(tmp_path / "cut", 5, losses), [0]
    cut.optimizer.register_step_post_hook(lambda *a: calls.__setitem__(0, calls[0] + 1) or
                                          (calls[0] == 11 and os.kill(os.getpid(), signal.SIGINT)))
    with pytest.raises(TrainingInterrupted, match="in epoch 4, step 11"):
        cut.fit(data())
    assert_bitwise(load_weights(tmp_path / "cut"), cut.best_weights)            # epoch 2's, not step 11's
    assert not torch.equal(cut.best_weights["head.weight"], cut.model.state_dict()["head.weight"])
    resumed = _scripted(tmp_path / "cut", 5, losses[3:])
    resumed.fit(data(), resume=True)
    assert_bitwise(weights(full.model), weights(resumed.model))
    timed, deadline = _scripted(tmp_path / "timed", 5, losses), Deadline(None)
    timed.optimizer.register_step_post_hook(lambda *a: timed.step == 10 and setattr(deadline, "seconds", 0.0))
    timed.loss_fn = deadline.wrap(timed.loss_fn)
    result, stopped = fit_within(timed, data(), deadline)
    assert stopped and result.best_epoch == 2
    assert_bitwise(weights(timed.model), timed.best_weights)
    assert_bitwise(load_weights(tmp_path / "timed"), timed.best_weights)


def test_a_damaged_checkpoint_file_is_named(tmp_path):
    """A damaged weights or state file raised safetensors' own error (a traceback on the CLI)."""
    from rnnkit.train import load_weights
    trainer(tmp_path, epochs=1).fit(data())
    manifest = load_checkpoint(tmp_path).manifest
    for key in ("weights", "state"):
        path = tmp_path / manifest[key]
        good = path.read_bytes()
        path.write_bytes(b"garbage")
        with pytest.raises(UserError, match=rf"checkpoint file .*{manifest[key]} is damaged"):
            trainer(tmp_path, epochs=2).fit(data(), resume=True)
        if key == "weights":
            with pytest.raises(UserError, match="is damaged"):
                load_weights(tmp_path)
        path.write_bytes(good)


def test_a_new_run_over_an_unfinished_one_is_refused(tmp_path):
    """Re-running without --resume silently replaced a run that had stopped and could have gone on."""
    t, calls = trainer(tmp_path, epochs=4), [0]
    t.optimizer.register_step_post_hook(lambda *a: calls.__setitem__(0, calls[0] + 1) or
                                        (calls[0] == 4 and os.kill(os.getpid(), signal.SIGINT)))
    with pytest.raises(TrainingInterrupted):
        t.fit(data())
    fresh = trainer(tmp_path, epochs=1)
    with pytest.raises(UserError, match=r"holds an unfinished run \(stopped at epoch 1, step 4\): continue it with --resume"):
        fresh.fit(data())
    assert fresh.step == 0 and load_checkpoint(tmp_path).manifest["step"] == 4
    trainer(tmp_path, epochs=4).fit(data(), resume=True)          # finished: a new run may replace it
    trainer(tmp_path, epochs=1).fit(data())


def test_the_optimizers_offered_are_the_ones_the_trainer_can_drive():
    from rnnkit.train.config import optimizer_class
    with pytest.raises(UserError) as e:
        optimizer_class("bogus")
    offered = str(e.value).split("choose one of ")[1].split(", ")
    assert {"adam", "sgd", "adamw"} <= set(offered) and not {"lbfgs", "rprop", "sparseadam", "muon"} & set(offered)
    for name in offered:                                          # each trains the test model a step
        t = trainer(None, epochs=1, optimizer=name)
        t.cfg = dataclasses.replace(t.cfg, out=None)
        t.fit(data(16))


@pytest.mark.parametrize("name,match", [("mps", "not available in this torch build"), ("meta", "cannot train a model")])
def test_devices_this_torch_cannot_train_on_are_refused(name, match):
    """--device mps (on a torch without it) and meta ended in torch's RuntimeError tracebacks."""
    from rnnkit.train import resolve_device
    if name == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    with pytest.raises(UserError, match=match):
        resolve_device(name)
