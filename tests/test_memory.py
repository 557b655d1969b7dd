"""Memory tasks: the generators, their baselines, a short training run, the clip study, the CLI."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnkit.cli import main
from rnnkit.data import synthetic
from rnnkit.errors import UserError
from rnnkit.tasks import memory
from rnnkit.tasks.gradflow import GradflowConfig


def test_adding_markers_target_and_baseline():
    x, y = synthetic.adding(20000, 40, 0)
    assert x.shape == (20000, 40, 2) and y.shape == (20000, 1)
    marks = x[..., 1]
    assert (marks.sum(1) == 2).all()
    assert (marks[:, :20].sum(1) == 1).all() and (marks[:, 20:].sum(1) == 1).all()
    torch.testing.assert_close(y[:, 0], (x[..., 0] * marks).sum(1))
    assert F.mse_loss(torch.ones_like(y), y).item() == pytest.approx(1 / 6, abs=0.005)


def test_copy_layout_and_memoryless_baseline():
    T = 15
    x, y = synthetic.copy_memory(64, T, 1)
    assert x.shape == (64, T + 20, 10) and y.shape == (64, T + 20)
    seq = x.argmax(-1)
    torch.testing.assert_close(y[:, -10:], seq[:, :10])
    assert (seq[:, T + 9] == synthetic.DELIMITER).all() and (seq[:, 10:T + 9] == 0).all()
    assert ((seq[:, :10] >= 1) & (seq[:, :10] <= 8)).all()
    # memoryless: blanks certain, then uniform over the 8 symbols in the last 10 steps
    logp = torch.full((64, T + 20, 10), -1e9)
    logp[:, :T + 10, 0] = 0.0
    logp[:, T + 10:, 1:9] = -math.log(8)
    ce = F.nll_loss(logp.reshape(-1, 10), y.reshape(-1)).item()
    assert ce == pytest.approx(synthetic.copy_baseline(T), rel=1e-6)
    assert synthetic.copy_baseline(T) == pytest.approx(10 * math.log(8) / (T + 20))


def test_temporal_order_positions_and_labels():
    T = 100
    x, y = synthetic.temporal_order(4000, T, 2)
    seq = x.argmax(-1)
    assert (seq[:, 0] == 0).all() and (seq[:, -1] == 1).all()
    relevant = seq >= 6                                                  # X or Y
    assert (relevant.sum(1) == 2).all()
    pos = relevant.nonzero()[:, 1].view(-1, 2)
    assert pos[:, 0].min() >= 10 and pos[:, 0].max() <= 20 and pos[:, 1].min() >= 50 and pos[:, 1].max() <= 60
    first, second = seq.gather(1, pos[:, :1])[:, 0] - 6, seq.gather(1, pos[:, 1:])[:, 0] - 6
    torch.testing.assert_close(y, 2 * first + second)
    assert torch.bincount(y, minlength=4).min() > 900                   # 4 balanced classes


def test_digits_layouts():
    rows, pixels = synthetic.digits("rows"), synthetic.digits("pixels")
    assert rows.x_train.shape[1:] == (8, 8) and pixels.x_train.shape[1:] == (64, 1)
    assert len(rows.y_train) + len(rows.y_test) == 1797 and len(rows.y_test) == 360
    torch.testing.assert_close(rows.x_test.reshape(-1, 64), pixels.x_test[..., 0])
    assert 0 <= float(rows.x_train.min()) and float(rows.x_train.max()) <= 1


def test_mnist1d_is_generated_locally_with_default_args():
    d = synthetic.mnist1d()
    assert d.x_train.shape == (4000, 40, 1) and d.x_test.shape == (1000, 40, 1)
    assert torch.bincount(d.y_train).tolist() == torch.bincount(d.y_train, minlength=10).tolist()
    torch.testing.assert_close(synthetic.mnist1d().x_test, d.x_test)   # deterministic


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="--task"):
        memory.MemoryConfig(task="nope")
    with pytest.raises(UserError, match="--length 8"):
        memory.MemoryConfig(task="digits", length=10)
    with pytest.raises(UserError, match="--clip-norm"):
        memory.MemoryConfig(clip_norm=-1.0)
    with pytest.raises(UserError, match="--cell"):
        GradflowConfig(cells=("lstm", "xx"))


def test_lstm_learns_short_adding_problem():
    cfg = memory.MemoryConfig(task="adding", length=10, cell="lstm", hidden_size=32, steps=400,
                              batch_size=32, lr=1e-2, seed=0)
    r = memory.train(cfg, progress=False)
    assert not r.diverged and r.steps_done == 400 and len(r.grad_norm) == 400
    assert r.test["mse"] < 0.02 < r.baseline                          # baseline 0.167
    json.dumps(r.to_dict())


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_min_cells_learn_short_adding_problem(cell):
    cfg = memory.MemoryConfig(task="adding", length=10, cell=cell, hidden_size=32, steps=400,
                              batch_size=32, lr=1e-2, seed=0)
    r = memory.train(cfg, progress=False)
    assert not r.diverged and r.steps_done == 400
    assert r.test["mse"] < 0.02 < r.baseline                          # baseline 0.167
    model = memory.SequenceModel(cfg, memory.task_spec("adding", 10))
    assert type(model.rnn).__name__ == {"mingru": "MinGRU", "minlstm": "MinLSTM"}[cell]
    assert not any(name.startswith("weight_hh") for name, _ in model.rnn.named_parameters())


def test_min_cells_refuse_what_needs_a_recurrent_weight():
    for flags in ({"backend": "engine"}, {"recurrent_init": "identity"}, {"recurrent_scale": 0.5}):
        with pytest.raises(UserError, match="recurrent weight U"):
            memory.MemoryConfig(cell="minlstm", **flags)
    base = memory.MemoryConfig(cell="lstm", backend="engine", recurrent_init="orthogonal", recurrent_scale=0.9)
    mixed = memory.for_cell(base, "mingru")                           # in a list: the min cell takes neither
    assert (mixed.backend, mixed.recurrent_init, mixed.recurrent_scale) == ("auto", "default", 1.0)
    assert memory.for_cell(base, "gru").backend == "engine"
    # the size bound counts V only for a min cell (no U): 2 blocks of H x I
    (weights, _), *_ = memory.size_terms(memory.MemoryConfig(cell="mingru", hidden_size=16))
    assert weights == 2 * 16 * 2


def test_cli_memory_min_cells_beside_a_cell_with_u(tmp_path, capsys):
    rc = main(["memory", "--task", "adding", "--length", "12", "--cell", "mingru,lstm,minlstm", "--steps", "3",
               "--hidden-size", "8", "--backend", "engine", "--recurrent-init", "orthogonal", "--test-size", "20",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    runs = {r["config"]["cell"]: r["config"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert set(runs) == {"mingru", "lstm", "minlstm"}
    assert (runs["lstm"]["backend"], runs["lstm"]["recurrent_init"]) == ("engine", "orthogonal")
    assert (runs["minlstm"]["backend"], runs["minlstm"]["recurrent_init"]) == ("auto", "default")
    assert "minlstm " in capsys.readouterr().out


def test_clip_study_diverges_without_and_learns_with_clipping():
    cfg = memory.MemoryConfig(task="adding", length=30, cell="rnn", nonlinearity="relu",
                              recurrent_init="identity", optimizer="sgd", lr=0.01, hidden_size=64, steps=300)
    runs = memory.clip_study(cfg, 1.0, progress=False)
    plain, clipped = runs["no clipping"], runs["clip-norm 1"]
    assert plain.diverged and plain.steps_done < 10
    assert not clipped.diverged and clipped.steps_done == 300
    assert max(clipped.grad_norm) > 10                                # the gradient does explode...
    assert clipped.test["mse"] < 0.3                                  # ...but training stays finite


def test_cli_memory_grid_table_and_json(tmp_path, capsys):
    rc = main(["memory", "--task", "order", "--length", "20,24", "--cell", "rnn,gru", "--steps", "5",
               "--hidden-size", "8", "--seed", "0,1", "--test-size", "50", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["runs"]) == 8 and len(data["summary"]) == 4
    assert {(s["length"], s["cell"]) for s in data["summary"]} == {(20, "rnn"), (20, "gru"), (24, "rnn"), (24, "gru")}
    out = capsys.readouterr().out
    assert "accuracy" in out and "mean over seeds" in out
    assert (tmp_path / "curves.png").stat().st_size > 1000 and "curves.png" in out


def test_cli_clip_study_writes_curves(tmp_path):
    rc = main(["memory", "--clip-study", "--clip-norm", "1", "--steps", "20",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "clip_study.json").read_text())
    assert data["no clipping"]["diverged"] and not data["clip-norm 1"]["diverged"]
    assert (tmp_path / "clip_study.png").stat().st_size > 1000


@pytest.mark.parametrize("argv", [
    ["memory", "--cell", "lstm,foo"],
    ["memory", "--task", "digits", "--length", "9"],
    ["memory", "--length", "10,x"],
    ["memory", "--steps", "0"],
    ["gradflow", "--cell", "rnn,bad"],
    ["gradflow", "--cell", "mingru,gru,bad"],
    ["memory", "--cell", "mingru", "--backend", "engine"],
    ["memory", "--cell", "minlstm,mingru", "--recurrent-init", "identity"],
    ["gradflow", "--cell", "mingru,minlstm", "--backend", "engine"],
    ["gradflow", "--length", "1"],
])
def test_cli_bad_arguments_exit_2(argv, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_gradflow_small(tmp_path, capsys):
    rc = main(["gradflow", "--cell", "rnn,lstm", "--length", "12", "--hidden-size", "8", "--num-seeds", "1",
               "--trained-steps", "4", "--checkpoints", "2", "--batch-size", "4", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "gradflow.json").read_text())
    for cell in ("rnn", "lstm"):
        c = data["cells"][cell]
        assert 1 <= c["init"]["horizon_mean"] <= 12 and "trained" in c and len(c["init"]["grad_profile_rel"]) == 12
    assert (tmp_path / "gradflow.png").exists() and (tmp_path / "gradflow_heatmap_lstm.png").exists()
    assert "horizon" in capsys.readouterr().out


def test_cli_diverged_runs_give_strict_json(tmp_path):
    rc = main(["memory", "--task", "adding", "--length", "30", "--cell", "rnn", "--nonlinearity", "relu",
               "--recurrent-init", "identity", "--optimizer", "sgd", "--lr", "0.01", "--hidden-size", "64",
               "--steps", "5", "--seed", "0,1", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert all(r["diverged"] and r["score"] is None for r in data["runs"])
    assert data["summary"][0]["mean"] is None


def test_cli_gradflow_min_cells(tmp_path, capsys):
    """The minimal cells in the gradient-flow study: no U (no spectra), their own gates, and a profile
    that is the closed form of their recurrence: dL/dh_t = dL/dh_T * prod_{s > t} a_s (elementwise)."""
    rc = main(["gradflow", "--cell", "mingru,minlstm", "--length", "12", "--hidden-size", "8", "--num-seeds", "1",
               "--trained-steps", "3", "--checkpoints", "2", "--batch-size", "4", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "gradflow.json").read_text())
    for cell, gates in (("mingru", {"z", "h~"}), ("minlstm", {"f'", "i'", "h~"})):
        init = data["cells"][cell]["init"]
        assert init["spectra_seed0"] == [] and set(init["saturation_seed0"]["saturated"]) == gates
        assert len(init["jacobian_seed0"]["spectral"]) == 12 and "trained" in data["cells"][cell]
    assert (tmp_path / "gradflow_heatmap_minlstm.png").exists()
    assert "minlstm " in capsys.readouterr().out


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_gradflow_profile_of_a_min_cell_is_its_closed_form(cell):
    from rnnkit.tasks import gradflow as gf
    torch.manual_seed(0)
    cfg = memory.MemoryConfig(task="adding", length=15, cell=cell, hidden_size=6)
    model = memory.SequenceModel(cfg, memory.task_spec("adding", 15))
    x, y = synthetic.adding(5, 15, 3)
    m = gf.measure(model, x, y, cell, jacobian=False)
    rnn = model.rnn
    a, _ = rnn._cell.coefficients(F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0))      # (B, T, H)
    out, _ = rnn(x)
    g_T = torch.autograd.grad(F.mse_loss(model.head(out[:, -1]), y), out)[0][:, -1]    # (B, H)
    rest = torch.cat([a[:, 1:].flip(1).cumprod(1).flip(1), torch.ones_like(a[:, :1])], 1)   # prod_{s>t} a_s
    want = (g_T.unsqueeze(1) * rest).norm(dim=-1).mean(0)                               # (T,)
    assert np.allclose(m["profile"], want.detach().numpy(), rtol=1e-5, atol=0)
    assert m["horizon"].steps >= 1


def test_saturation_of_the_min_cells_candidate_has_no_upper_end():
    from rnnkit.diagnostics import gate_saturation
    z = torch.full((4, 2, 3), 0.5)
    h = torch.tensor([0.001, 0.5, 7.0]).expand(4, 2, 3)                 # g(k): ~0 (saturated), mid, large (not)
    s = gate_saturation(torch.cat((z, h), -1), "mingru")
    assert s.low["h~"] == pytest.approx(1 / 3) and s.high["h~"] == 0 and s.saturated["z"] == 0
    assert GradflowConfig(cells=("mingru",)).cells == ("mingru",)


def test_cli_clip_study_with_a_min_cell_drops_the_preset_u_init(tmp_path):
    rc = main(["memory", "--clip-study", "--cell", "mingru", "--steps", "3", "--hidden-size", "8", "--test-size", "20",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    runs = json.loads((tmp_path / "clip_study.json").read_text())
    assert {r["config"]["cell"] for r in runs.values()} == {"mingru"}
    assert {r["config"]["recurrent_init"] for r in runs.values()} == {"default"}


def test_size_bound_of_a_min_cell_counts_h_not_gates():
    """The min cells' scan keeps no gates for the backward (it recomputes them): h of every layer and the
    gradient reaching the top layer's are what a step certainly holds."""
    for cell in ("mingru", "minlstm"):
        for L in (1, 3):
            cfg = memory.MemoryConfig(cell=cell, length=100, batch_size=10, hidden_size=16, num_layers=L)
            (_, _), (bptt, _), _ = memory.size_terms(cfg)
            assert bptt == (L + 1) * 10 * 100 * 16


@pytest.mark.parametrize("command", [["memory"], ["gradflow"], ["forecast"], ["textgen", "train"], ["classify", "train"],
                                     ["seq2seq", "train"]])
def test_cli_backend_with_min_cells_only_says_why(command, tmp_path, capsys):
    assert main([*command, "--cell", "minlstm", "--backend", "engine", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "recurrent weight U" in err and "leave" in err and "Traceback" not in err


def test_cli_bad_backend_name_with_min_cells_says_so(tmp_path, capsys):
    """memory's --backend has no argparse choices: a bad name gets the name's message, not 'leave it out'."""
    assert main(["memory", "--cell", "mingru", "--backend", "bogus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "must be auto or engine" in err and "recurrent weight U" not in err


def test_cli_forecast_on_a_min_cell(tmp_path):
    """Every training command builds its model from rnnkit.models.cells: the minimal cells too."""
    rc = main(["forecast", "--cell", "minlstm", "--epochs", "3", "--no-sarima", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"]["cell"] == "minlstm" and math.isfinite(metrics["model"]["epochs_run"])
