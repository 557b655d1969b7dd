"""Diagnostics: horizon, explosion, Jacobian norms against hand-built products, spectra, saturation."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import rnnkit as rk
from rnnkit import diagnostics as dg
from rnnkit.diagnostics import plots


def _decay(T, factor):
    """A profile indexed by t whose value k steps back from the end is factor**k."""
    return factor ** np.arange(T - 1, -1, -1, dtype=float)


def test_memory_horizon_of_geometric_decay():
    h = dg.memory_horizon(_decay(50, 0.5))
    assert (h.steps, h.censored, h.length) == (10, False, 50)       # 0.5**10 = 9.8e-4 < 1e-3 < 0.5**9
    h = dg.memory_horizon(_decay(50, 0.9), threshold=1e-2)
    assert h.steps == math.ceil(math.log(1e-2) / math.log(0.9))     # 44
    json.dumps(h.to_dict())


def test_memory_horizon_never_falls_is_T_and_censored():
    h = dg.memory_horizon(np.ones(30))
    assert (h.steps, h.censored) == (30, True)
    with pytest.raises(ValueError):
        dg.memory_horizon(np.zeros(5))


def test_explosion_flags_sustained_growth_only():
    e = dg.explosion(_decay(40, 1.2))
    assert e.exploding and e.geometric_mean == pytest.approx(1.2) and e.median == pytest.approx(1.2)
    assert not dg.explosion(_decay(40, 0.7)).exploding
    spiky = _decay(40, 0.8)
    spiky[5] = 1e6                                                  # one spike is not sustained growth
    assert not dg.explosion(spiky).exploding
    json.dumps(e.to_dict())


def test_grad_profile_is_batch_mean_and_needs_backward():
    g = torch.tensor([[1.0, 3.0], [2.0, 4.0]])
    np.testing.assert_allclose(dg.grad_profile(g), [2.0, 3.0])
    with pytest.raises(ValueError, match="backward"):
        dg.grad_profile(torch.full((3, 2), float("nan")))


def test_trace_profile_of_last_step_loss_matches_jacobian_product():
    """With L = v . h_T, dL/dh_t = (dh_T/dh_t)^T v: the trace and the hand-built product agree."""
    torch.manual_seed(1)
    rnn = rk.RNN(3, 5, dtype=torch.float64)
    x = torch.randn(7, 1, 3, dtype=torch.float64)
    v = torch.randn(5, dtype=torch.float64)
    with rk.trace(rnn) as tr:
        out, _ = rnn(x)
        (out[-1, 0] @ v).backward()
    prof = dg.grad_profile(tr.grad_norm[0])                          # (T,)
    U = rnn.weight_hh_l0.detach()
    h = out.detach()[:, 0]                                           # (T, H)
    g, ref = v.clone(), []
    for t in range(6, -1, -1):
        ref.append(float(g.norm()))
        g = U.T @ ((1 - h[t] ** 2) * g)                              # back through step t
    np.testing.assert_allclose(prof[::-1], ref, rtol=1e-10)


def _rnn_jacobians(rnn, x):
    """Hand-built dh_T/dh_t for a tanh RNN: products of diag(1 - h^2) U, newest first."""
    U = rnn.weight_hh_l0.detach()
    out, _ = rnn(x.unsqueeze(1))
    h = out.detach()[:, 0]                                           # (T, H)
    J, mats = torch.eye(U.shape[0], dtype=U.dtype), []
    for t in range(len(h) - 1, -1, -1):
        mats.append(J.clone())                                       # dh_T/dh_t
        J = J @ torch.diag(1 - h[t] ** 2) @ U
    return mats


def test_jacobian_norms_match_hand_products_rnn():
    torch.manual_seed(2)
    rnn = rk.RNN(3, 6, dtype=torch.float64)
    x = torch.randn(9, 3, dtype=torch.float64)
    jn = dg.jacobian_norms(rnn, x)
    mats = _rnn_jacobians(rnn, x)
    np.testing.assert_allclose(jn.spectral, [float(torch.linalg.matrix_norm(m, 2)) for m in mats], rtol=1e-9)
    np.testing.assert_allclose(jn.frobenius, [float(m.norm()) for m in mats], rtol=1e-9)
    assert jn.spectral[0] == pytest.approx(1.0)
    json.dumps(jn.to_dict())


def test_jacobian_norms_lstm_against_functional_jacobian():
    torch.manual_seed(3)
    lstm = rk.LSTM(2, 4, batch_first=True, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    jn = dg.jacobian_norms(lstm, x)
    _, (h1, c1) = lstm(x[:2].unsqueeze(0))                           # state after step t = 1

    def rest(h):                                                     # h_1 -> h_T with c_1 held fixed
        _, (hT, _) = lstm(x[2:].unsqueeze(0), (h.view(1, 1, 4), c1))
        return hT.view(4)
    J = torch.autograd.functional.jacobian(rest, h1.view(4))
    assert jn.spectral[3] == pytest.approx(float(torch.linalg.matrix_norm(J, 2)), rel=1e-9)


def test_jacobian_norms_rejects_stacked_layers_and_bad_input():
    with pytest.raises(ValueError, match="num_layers=1"):
        dg.jacobian_norms(rk.GRU(2, 3, num_layers=2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="one sequence"):
        dg.jacobian_norms(rk.GRU(2, 3), torch.randn(4, 1, 2))


def test_recurrent_spectra_of_known_matrices():
    rnn = rk.RNN(2, 3)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.tensor([[0.0, 2.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, -0.3]]))
    (s,) = dg.recurrent_spectra(rnn)
    assert s.gate == "h" and s.spectral_radius == pytest.approx(1.0)   # eigenvalues ±1, -0.3
    np.testing.assert_allclose(s.singular_values, [2.0, 0.5, 0.3], rtol=1e-6)
    lstm = rk.LSTM(2, 3, num_layers=2)
    with torch.no_grad():
        lstm.weight_hh_l1[3:6].copy_(1.5 * torch.eye(3))               # the forget-gate block of layer 1
    specs = dg.recurrent_spectra(lstm)
    assert [(x.name, x.gate) for x in specs[5:]] == [("weight_hh_l1", g) for g in ("all", "i", "f", "g", "o")]
    f = specs[7]
    assert f.spectral_radius == pytest.approx(1.5) and specs[5].spectral_radius is None
    json.dumps([x.to_dict() for x in specs])


def test_gate_saturation_counts_each_end():
    H = 4
    i = torch.tensor([0.001, 0.5, 0.5, 0.5])                          # 1 of 4 near 0
    f = torch.tensor([0.995, 0.999, 0.5, 0.5])                        # 2 of 4 near 1
    g = torch.tensor([-0.995, 0.995, 0.0, 0.98])                      # 2 of 4 near ±1
    o = torch.full((H,), 0.5)
    gates = torch.cat((i, f, g, o)).expand(3, 2, 4 * H)               # (T, B, 4H)
    s = dg.gate_saturation(gates, "lstm")
    assert s.saturated == pytest.approx({"i": 0.25, "f": 0.5, "g": 0.5, "o": 0.0})
    assert s.low["g"] == pytest.approx(0.25) and s.high["f"] == pytest.approx(0.5)
    assert s.overall == pytest.approx(1.25 / 4)
    json.dumps(s.to_dict())
    with pytest.raises(ValueError):
        dg.gate_saturation(gates[..., :5], "lstm")


def test_gate_saturation_from_a_real_trace():
    gru = rk.GRU(2, 8)
    with rk.trace(gru) as tr:
        out, _ = gru(torch.randn(6, 3, 2) * 50)                       # huge inputs saturate the gates
    s = dg.gate_saturation(tr.gates[0], "gru")
    assert s.overall > 0.3 and set(s.saturated) == {"r", "z", "n"}


def test_plots_write_pngs(tmp_path):
    T = 20
    p1 = plots.grad_vs_steps_back({"a": _decay(T, 0.5), "b": _decay(T, 0.9)}, tmp_path / "g.png", "t")
    p2 = plots.grad_heatmap(np.stack([_decay(T, 0.5), _decay(T, 0.8)]), [0, 10], tmp_path / "h.png", "t")
    p3 = plots.hidden_heatmap(np.random.randn(T, 8), tmp_path / "s.png", "t")
    sat = dg.gate_saturation(torch.rand(3, 2, 12), "gru")
    p4 = plots.saturation_bars({"gru": sat}, tmp_path / "b.png", "t")
    p5 = plots.training_curves({"x": {"loss": [1.0, 0.5, None], "grad_norm": [3.0, 2.0, None]}},
                               tmp_path / "c.png", "t")
    for p in (p1, p2, p3, p4, p5):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explosion_ignores_steps_after_underflow_to_zero():
    p = _decay(30, 0.5)
    p[:10] = 0.0                                                    # float32 gradient vanished to 0
    e = dg.explosion(p)
    assert e.geometric_mean == pytest.approx(0.5) and not e.exploding


def test_the_cli_starts_without_pyplot_and_plots_leave_the_backend_alone(tmp_path):
    """pyplot is never imported (its import cost every command 0.3 s and switched the backend to Agg), and
    pandas not before a CSV is read (0.24 s)."""
    code = ("import sys, rnnkit.cli as c; c.build_parser(); print('pandas' in sys.modules); "
            "from rnnkit.diagnostics import plots; "
            "plots.grad_vs_steps_back({'a': __import__('numpy').array([1.0, 0.5, 0.25])}, sys.argv[1], title='t'); "
            "print('matplotlib.pyplot' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g.png")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.split() == ["False", "False"] and (tmp_path / "g.png").stat().st_size > 1000
