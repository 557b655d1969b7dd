"""Review of the gradient diagnostics (`rnnkit gradflow`, `rnnkit memory`, rnnkit.diagnostics): one
regression test per defect found, numbered as in the review."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnkit import diagnostics as dg
from rnnkit.cli import build_parser, main
from rnnkit.cli import memory as memory_cli
from rnnkit.diagnostics import plots
from rnnkit.errors import UserError
from rnnkit.tasks import gradflow, memory

TINY_MEMORY = ["memory", "--hidden-size", "4", "--steps", "1", "--test-size", "5", "--batch-size", "2",
               "--no-progress"]
TINY_GRADFLOW = ["gradflow", "--length", "5", "--hidden-size", "4", "--batch-size", "2", "--num-seeds", "1",
                 "--no-progress"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


# -- 1. a projected LSTM: U is (4H x P), not square ----------------------------------------------------

def test_recurrent_spectra_of_a_projected_lstm_gives_h_by_p_gate_blocks_then_w_hr_u_g_with_radius():
    """U's H x P gate blocks by their singular values only; then each gate seen through the projection,
    W_hr U_g (P x P), the factor of the step's Jacobian dh_{t+1}/dh_t, with its spectral radius: the same
    nonzero eigenvalues as U_g W_hr (H x H)."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 6, proj_size=2)
    specs = dg.recurrent_spectra(lstm)
    assert [(s.name, s.gate, s.shape) for s in specs] == (
        [("weight_hh_l0", "all", (24, 2))] + [("weight_hh_l0", g, (6, 2)) for g in "ifgo"]
        + [("weight_hr_l0 @ weight_hh_l0", g, (2, 2)) for g in "ifgo"])
    assert all(s.spectral_radius is None for s in specs[:5])
    want = torch.linalg.svdvals(lstm.weight_hh_l0.detach().double()[6:12])
    np.testing.assert_allclose(specs[2].singular_values, want.numpy(), rtol=1e-12)
    U, W_hr = lstm.weight_hh_l0.detach().double(), lstm.weight_hr_l0.detach().double()
    for k, s in enumerate(specs[5:]):
        U_g = U[6 * k:6 * (k + 1)]
        np.testing.assert_allclose(s.singular_values, torch.linalg.svdvals(W_hr @ U_g).numpy(), rtol=1e-12)
        big = torch.linalg.eigvals(U_g @ W_hr).abs().max()                # H x H, rank P
        assert s.spectral_radius == pytest.approx(float(big), rel=1e-10) and s.spectral_radius > 0


@pytest.mark.parametrize("wrap", ["parametrize", "hook_weight_norm", "hook_spectral_norm"])
def test_recurrent_spectra_read_the_weights_the_forward_uses_under_weight_norms(wrap):
    """U and W_hr under torch.nn.utils.parametrizations.weight_norm (not parameters of the module any
    more), or under the hook-based weight_norm / spectral_norm (parameters name_g, name_v / name_orig): the
    spectra are those of the weights the forward multiplies by, under their own names. Was: no weight_hh
    found (parametrize), the 20 x 1 magnitude vector taken for U (weight_norm), or the un-normalised
    weight_hh_orig (spectral_norm)."""
    import warnings
    torch.manual_seed(1)
    lstm = torch.nn.LSTM(3, 5, proj_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)                 # the hook-based ones are deprecated
        for name in ("weight_hh_l0", "weight_hr_l0"):
            if wrap == "parametrize":
                torch.nn.utils.parametrizations.weight_norm(lstm, name)
            elif wrap == "hook_weight_norm":
                torch.nn.utils.weight_norm(lstm, name)
            else:
                torch.nn.utils.spectral_norm(lstm, name)
    lstm(torch.randn(4, 1, 3))                                         # the hooks compute the weights
    specs = dg.recurrent_spectra(lstm)
    assert [(s.name, s.gate, s.shape) for s in specs] == (
        [("weight_hh_l0", "all", (20, 2))] + [("weight_hh_l0", g, (5, 2)) for g in "ifgo"]
        + [("weight_hr_l0 @ weight_hh_l0", g, (2, 2)) for g in "ifgo"])
    U, W_hr = lstm.weight_hh_l0.detach().double(), lstm.weight_hr_l0.detach().double()
    np.testing.assert_allclose(specs[0].singular_values, torch.linalg.svdvals(U).numpy(), rtol=1e-12)
    for k, s in enumerate(specs[5:]):
        want = torch.linalg.eigvals(W_hr @ U[5 * k:5 * (k + 1)]).abs().max()
        assert s.spectral_radius == pytest.approx(float(want), rel=1e-10)


def test_jacobian_norms_of_a_projected_lstm_against_functional_jacobian():
    torch.manual_seed(4)
    lstm = torch.nn.LSTM(3, 5, proj_size=2, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    jn = dg.jacobian_norms(lstm, x)
    assert len(jn.spectral) == 6 and jn.spectral[0] == pytest.approx(1.0)
    _, (h2, c2) = lstm(x[:3].unsqueeze(1))                             # state after step t = 2

    def rest(h):                                                       # h_2 (P) -> h_T with c_2 held fixed
        _, (hT, _) = lstm(x[3:].unsqueeze(1), (h.view(1, 1, 2), c2))
        return hT.view(2)
    J = torch.autograd.functional.jacobian(rest, h2.view(2))          # (P, P)
    assert jn.spectral[3] == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-9)
    assert jn.frobenius[3] == pytest.approx(float(J.norm()), rel=1e-9)


# -- 4. a gradient that is exactly 0 one step back (saturated tanh) ------------------------------------

def test_explosion_of_a_gradient_zero_one_step_back_is_growth_zero():
    e = dg.explosion(np.array([0.0, 0.0, 0.0, 0.235]))
    assert (e.geometric_mean, e.median, e.exploding, e.vanished_at) == (0.0, 0.0, False, 1)
    p = 0.5 ** np.arange(29, -1, -1, dtype=float)
    p[:10] = 0.0                                                       # zero from 20 steps back on
    e = dg.explosion(p)
    assert e.vanished_at == 20 and e.geometric_mean == pytest.approx(0.5)
    assert dg.explosion(np.array([0.25, 0.5, 1.0])).vanished_at is None
    with pytest.raises(ValueError, match="last step"):
        dg.explosion(np.array([1.0, 0.0]))


def test_cli_gradflow_completes_on_a_saturated_trained_rnn(tmp_path, capsys):
    rc = main(["gradflow", "--cell", "rnn", "--length", "20", "--hidden-size", "8", "--batch-size", "4",
               "--num-seeds", "1", "--trained-steps", "20", "--lr", "0.3", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    trained = json.loads((tmp_path / "gradflow.json").read_text())["cells"]["rnn"]["trained"]
    assert trained["horizon_per_seed"][0]["steps"] == 1
    e = trained["explosion_per_seed"][0]
    assert (e["median"], e["geometric_mean"], e["vanished_at"], e["exploding"]) == (0.0, 0.0, 1, False)
    out = capsys.readouterr().out
    assert re.search(r"rnn\s+trained\s+1\.0\s+1\s+0\.000\s+False", out)
    assert "rnn trained: the gradient is exactly 0 one step back on seed 0" in out


# -- 5. sizes that cannot fit: exit 2 naming the flag, no traceback ------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["gradflow", "--cell", "rnn", "--num-seeds", "1", "--hidden-size", "1000000"], "--hidden-size 1000000"),
    (["gradflow", "--cell", "rnn", "--num-seeds", "1", "--batch-size", "1000000000"], "--batch-size 1000000000"),
    (["memory", "--steps", "1", "--length", "1000000000"], "--length 1000000000"),
    (["memory", "--steps", "1", "--batch-size", "1000000000"], "--batch-size 1000000000"),
])
def test_cli_sizes_too_large_for_memory_exit_2_naming_the_flag(argv, named, tmp_path, capsys):
    assert main(argv + ["--no-progress", "--out", str(tmp_path)]) == 2
    err = _error(capsys)
    assert named in err and "GB of memory" in err and "lower" in err


def test_an_allocation_failure_while_training_exits_2_naming_the_size_flags(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4000000000000 bytes.")
    monkeypatch.setattr(memory, "SequenceModel", fail)
    assert main(TINY_MEMORY + ["--length", "5", "--out", str(tmp_path)]) == 2
    err = _error(capsys)
    assert "ran out of memory" in err and "--hidden-size 4" in err and "--length 5" in err


# -- 6, 10. list flags: duplicates refused, one parser for --cell in both commands ---------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "0,0", "--seed lists 0 more than once"),
    ("--cell", "lstm,lstm", "--cell lists lstm more than once"),
    ("--length", "10, 10", "--length lists 10 more than once"),
])
def test_cli_memory_refuses_duplicate_list_entries(flag, value, message, tmp_path, capsys):
    assert main(TINY_MEMORY + [flag, value, "--out", str(tmp_path)]) == 2
    assert message in _error(capsys) and not (tmp_path / "results.json").exists()


def test_cell_lists_parse_alike_in_both_commands(tmp_path, capsys):
    assert memory_cli.parse_cells("rnn, gru", memory.CELLS) == ("rnn", "gru")
    for command in ("memory", "gradflow"):
        assert main([command, "--cell", ",", "--out", str(tmp_path)]) == 2
        assert "--cell is empty; pass e.g. --cell rnn,lstm,gru" in _error(capsys)
        assert main([command, "--cell", "rnn,rnn", "--out", str(tmp_path)]) == 2
        assert "--cell lists rnn more than once" in _error(capsys)
    assert main(TINY_MEMORY + ["--length", "5", "--cell", "rnn, gru", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["config"]["cell"] for r in runs] == ["rnn", "gru"]
    with pytest.raises(UserError, match="more than once"):
        gradflow.GradflowConfig(cells=("rnn", "rnn"))


# -- 7. the clip study trains one configuration --------------------------------------------------------

def test_cli_clip_study_refuses_lists(tmp_path, capsys):
    argv = ["memory", "--clip-study", "--cell", "lstm,gru", "--seed", "0,1", "--length", "10,20",
            "--out", str(tmp_path)]
    assert main(argv) == 2
    assert ("--clip-study trains one configuration: give one value each; got --cell lstm,gru, --length 10,20, "
            "--seed 0,1") in _error(capsys)


# -- 8. every run validated before the first one trains ------------------------------------------------

def test_cli_memory_validates_every_length_before_training(tmp_path, capsys):
    assert main(TINY_MEMORY + ["--length", "10,1", "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "results.json").exists()
    assert "--task adding needs --length >= 2, got 1" in captured.err
    with pytest.raises(UserError, match="--task copy needs --length >= 1, got 0"):
        memory.MemoryConfig(task="copy", length=0)


# -- 9. the clip preset's T = 30 applies to its own task only ------------------------------------------

@pytest.mark.parametrize("task, length", [("adding", 30), ("digits", 8), ("mnist1d", 40), ("copy", 50)])
def test_clip_study_preset_length_respects_the_task(task, length):
    args = build_parser().parse_args(["memory", "--clip-study", "--task", task])
    cfg = memory_cli.base_config(args)
    assert (cfg.task, cfg.length, cfg.optimizer) == (task, length, "sgd")


# -- 11, 12. messages name the flag and its value; --out must name a folder ----------------------------

@pytest.mark.parametrize("argv, message", [
    (TINY_GRADFLOW + ["--hidden-size", "0"], "--hidden-size must be >= 1, got 0"),
    (TINY_GRADFLOW + ["--length", "1"], "--length must be >= 2, got 1"),
    (TINY_GRADFLOW + ["--num-seeds", "0"], "--num-seeds must be >= 1, got 0"),
    (TINY_MEMORY + ["--hidden-size", "0"], "--hidden-size must be >= 1, got 0"),
    (TINY_MEMORY + ["--test-size", "0"], "--test-size must be >= 1, got 0"),
])
def test_cli_size_messages_name_the_flag_and_value(argv, message, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("command", [TINY_GRADFLOW, TINY_MEMORY + ["--length", "5"]])
def test_cli_out_must_be_a_creatable_folder(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(command + ["--out", ""]) == 2
    assert "--out is empty; give an output folder, e.g. --out runs/" in _error(capsys)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    assert main(command + ["--out", "afile/sub"]) == 2
    assert "--out afile/sub: cannot create this folder" in _error(capsys)
    if Path("/proc/self").exists():
        assert main(command + ["--out", "/proc/nope"]) == 2
        assert "--out /proc/nope: cannot create this folder (No such file or directory)" in _error(capsys)


# -- 13. --checkpoints N records N profiles ------------------------------------------------------------

@pytest.mark.parametrize("steps, checkpoints, recorded", [
    (50, 8, [0, 7, 14, 21, 29, 36, 43, 50]),
    (7, 3, [0, 4, 7]),
    (3, 8, [0, 1, 2, 3]),                                              # at most trained-steps + 1
])
def test_checkpoints_record_that_many_profiles(steps, checkpoints, recorded):
    cfg = gradflow.GradflowConfig(cells=("rnn",), length=5, hidden_size=4, batch_size=2, trained_steps=steps,
                                  checkpoints=checkpoints, num_seeds=1)
    out = gradflow.study_cell(cfg, "rnn", 0, progress=False)
    assert out["history"]["steps"] == recorded and out["history"]["profiles"].shape == (len(recorded), 5)


# -- 14, 15. the real seed in keys and titles; the legend shows censoring and one decimal --------------

def test_cli_gradflow_labels_use_the_real_seed(tmp_path, monkeypatch):
    titles = []
    for name in ("grad_vs_steps_back", "saturation_bars", "hidden_heatmap", "grad_heatmap"):
        original = getattr(plots, name)

        def record(*args, _original=original, **kwargs):
            titles.append(next(a for a in reversed(args) if isinstance(a, str)))
            return _original(*args, **kwargs)
        monkeypatch.setattr(plots, name, record)
    rc = main(TINY_GRADFLOW + ["--cell", "gru", "--seed", "5", "--trained-steps", "2", "--checkpoints", "2",
                               "--out", str(tmp_path)])
    assert rc == 0
    text = (tmp_path / "gradflow.json").read_text()
    assert "seed0" not in text
    assert {"jacobian_seed5", "saturation_seed5", "spectra_seed5"} <= set(json.loads(text)["cells"]["gru"]["init"])
    assert not [t for t in titles if "seed 0" in t]
    assert sum("seed 5" in t for t in titles) == 3                     # saturation, Jacobian, heat map


def test_legend_horizon_shows_censoring_and_one_decimal():
    def summary(*per_seed):
        hs = [{"steps": s, "censored": c} for s, c in per_seed]
        return {"horizon_mean": float(np.mean([h["steps"] for h in hs])), "horizon_per_seed": hs}
    assert gradflow.horizon_label(summary((14, False), (13, False), (14, False))) == "horizon 13.7"
    assert gradflow.horizon_label(summary((20, True))) == "horizon 20+"
    assert gradflow.horizon_label(summary((4, False), (100, True), (100, True))) == "horizon 68.0+"


# -- 16. docs/gradients.md: runs A and B start from the same seeds and initialisation -------------------

def test_docs_runs_a_and_b_agree_on_the_initial_measurements():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "gradients.md").read_text()
    run_a, run_b = doc.split("### Run A")[1].split("### Run B")
    for cell in ("tanh RNN", "LSTM", "GRU"):
        row_a = re.search(rf"^\| {cell} \| (.*?) \| .*? \| ([\d.]+) →", run_a, re.MULTILINE).groups()
        row_b = re.search(rf"^\| {cell} \| (.*?) \| .*? \| ([\d.]+) →", run_b, re.MULTILINE).groups()
        assert row_a == row_b, cell
    assert "a median factor of 0.58 per step" in run_a                # what the command prints: 0.577


# -- 17. --nonlinearity belongs to the Elman RNN ---------------------------------------------------------

def test_nonlinearity_refused_without_an_rnn_cell(tmp_path, capsys):
    assert main(TINY_MEMORY + ["--nonlinearity", "relu", "--cell", "lstm", "--out", str(tmp_path)]) == 2
    assert "--nonlinearity applies to the Elman RNN (--cell rnn) only; --cell lstm has none" in _error(capsys)
    with pytest.raises(UserError, match="--nonlinearity relu applies to the Elman RNN"):
        memory.MemoryConfig(cell="gru", nonlinearity="relu")
    assert main(TINY_MEMORY + ["--length", "5", "--nonlinearity", "relu", "--cell", "rnn,lstm",
                               "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["config"]["cell"], r["config"]["nonlinearity"]) for r in runs] == [("rnn", "relu"), ("lstm", "tanh")]
    clip = tmp_path / "clip"                                           # the preset's relu: for the rnn only
    assert main(["memory", "--clip-study", "--cell", "lstm", "--length", "5", "--steps", "1", "--hidden-size", "4",
                 "--test-size", "5", "--no-progress", "--out", str(clip)]) == 0
    config = json.loads((clip / "clip_study.json").read_text())["no clipping"]["config"]
    assert (config["cell"], config["nonlinearity"], config["recurrent_init"]) == ("lstm", "tanh", "identity")
