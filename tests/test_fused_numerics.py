"""The fused kernel's own arithmetic against the pure-torch engine and torch: denormals flushed in the
backward as the engine flushes them, NaN carried through, its float tanh over its whole range, and the
precision of its layer norm's moments. (Equality over cells and options: test_fused.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
from test_fused import (
    assert_same,
    fused_scan,
    needs_kernel,
    options,
    pure_scan,
    scan_inputs,
)

import rnnkit as rk
from rnnkit import _fused
from rnnkit.cells import ElmanCell


@needs_kernel
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_many_to_one_backward_flushes_denormals_like_the_engine_and_restores_the_mode(kind):
    """A loss on the last step only: the gradient decays into denormals over 60 steps. Both paths flush
    them to zero during backward (rnnkit.numerics), agree, and leave the caller's mode as it was."""
    def keeps_denormals():
        return float(torch.tensor(1e-40) * 1.0) != 0.0

    mode = keeps_denormals()
    got = []
    for fn in (fused_scan, pure_scan):
        cell, xi, w, b, state0, params = scan_inputs(kind, torch.float32, T_=60, B_=3, H_=4)
        with torch.no_grad():
            w.mul_(0.05)                                      # a contracting recurrence
        out, _ = fn(options(cell, torch.float32, T_=60, B_=3, H_=4), xi, state0, w, b, params)
        out[-1].sum().backward()
        got.append({"d_xi": xi.grad, "d_w": w.grad, "d_h0": state0[0].grad})
    assert_same(*got, 1e-5, kind)
    assert keeps_denormals() == mode                            # the caller's mode, after backward


@needs_kernel
@pytest.mark.parametrize("kind", ["rnn_relu", "lstm", "gru"])
def test_nan_propagates_like_the_engine(kind):
    """A NaN in the input reaches the same outputs and gradients on both paths (loss-NaN detection)."""
    def poisoned(fn):
        cell, xi, w, b, state0, params = scan_inputs(kind, torch.float32)
        with torch.no_grad():
            xi[2, 1, 0] = float("nan")
        out, _ = fn(options(cell, torch.float32), xi, state0, w, b, params)
        out.sum().backward()
        return out.detach(), w.grad
    for a, r in zip(poisoned(fused_scan), poisoned(pure_scan), strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(r))


@needs_kernel
def test_kernel_tanh_is_within_a_few_ulp_of_torch_over_its_whole_range():
    """The float kernel's own tanh (fastmath.h: exp by range reduction and a polynomial, a series near 0),
    read off one Elman step with U = 0, b = 0, h0 = 0, so h = tanh(xi): a dense sweep of [-12, 12] plus
    tiny, huge and special values. Within 2e-7 of torch.tanh (3 ulp near 1; measured over every float in
    [2^-30, 12]: at most 3.0 ulp, 0.16 on average), relatively as close where tanh(x) ~ x, odd, never past
    +-1, saturating at +-Inf, NaN kept."""
    half = torch.linspace(0, 12, 120_001, dtype=torch.float64)
    sweep = torch.cat([-half.flip(0), half])
    tiny = torch.logspace(-38, -1, 400, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan"), 8.999, 9.0, 9.001],
                           dtype=torch.float64)
    v = torch.cat([sweep, tiny, -tiny, special]).float()
    n = v.numel()
    h = fused_scan(options(ElmanCell("tanh"), torch.float32, B_=n, H_=1), v.view(1, n, 1),
                   (torch.zeros(n, 1),), torch.zeros(1, 1), torch.zeros(1))[0].view(n)
    ref = torch.tanh(v.double())
    finite = ~torch.isnan(v)
    assert float((h[finite].double() - ref[finite]).abs().max()) <= 2e-7
    small = v.abs() < 1e-3                                   # relative accuracy where tanh(x) ~ x
    assert float(((h[small].double() - ref[small]) / ref[small].where(ref[small] != 0, 1)).abs().max()) <= 2e-7
    assert float(h[finite].abs().max()) <= 1.0
    assert torch.equal(h[: sweep.numel()], -h[: sweep.numel()].flip(0))   # odd (the sweep is symmetric)
    assert torch.isnan(h[n - 4]) and h[n - 6] == 1 and h[n - 5] == -1


@needs_kernel
@pytest.mark.parametrize("kind", ["lnx_lstm", "lnx_rnn_tanh", "ln_gru"])
def test_float32_layer_norm_keeps_its_precision_when_a_row_has_an_outlier(kind, ln_centring):
    """The kernel normalises rows whose mean is zero by construction (U, b_hh, b_ih and xi come centred)
    and sums their squares in one pass, or, in a call too short to centre the weights, takes the mean and
    then the squares about it. A one-pass sum of squares shifted by the row's first element instead loses
    ~30x when that element is an outlier (measured 3.9e-6 here); the float32 kernel stays within 1e-6 of
    the float64 engine either way."""
    cell, xi, w, b, state0, params = scan_inputs(kind, torch.float64, T_=6, B_=4, H_=64)
    with torch.no_grad():
        xi[:, :, 0] += 30.0                                   # 30 standard deviations off its row's mean
    ref, _ = pure_scan(options(cell, torch.float64, T_=6, B_=4, H_=64), xi, state0, w, b, params)

    def f32(t):
        return t.detach().float()
    out, _ = fused_scan(options(cell, torch.float32, T_=6, B_=4, H_=64), f32(xi), tuple(map(f32, state0)), f32(w),
                        f32(b), tuple(map(f32, params)))
    assert float((out.double() - ref.detach()).abs().max()) <= 1e-6


@needs_kernel
@pytest.mark.parametrize("kind", ["lnx_lstm", "lnx_rnn_tanh", "ln_gru"])
def test_float32_layer_norm_keeps_its_precision_when_the_weights_share_an_offset(kind, monkeypatch):
    """LN's mean is taken out of U, b_hh and b_ih (centred in double) before the products, not out of
    U h after them: rows of U h with a large common offset (every entry of U and b_hh + 10) lose nothing
    to cancellation, and the backward multiplies by the same centred U (d_h = d_gh U). Float32 kernel
    against the float64 engine on the same float32 inputs: outputs 1-2.4e-7, every gradient within
    3e-7 of its largest entry (the two-pass moments of U h gave 3e-6 to 4.2e-5 on the outputs; the raw U
    in the backward 3e-6 to 9e-6 on the gradients). Centring forced: these 24 rows are a call too short
    for it by the rule (_fused._centres)."""
    monkeypatch.setattr(_fused, "CENTRE_ROWS_PER_UNIT", 0)
    cell, xi, w, b, state0, params = scan_inputs(kind, torch.float64, T_=6, B_=4, H_=64)

    def leaves(dtype, shift):
        return [(t.detach() + (shift if t is w or t is b else 0.0)).to(dtype).requires_grad_()
                for t in (xi, w, b, *state0, *params)]
    narrow = leaves(torch.float32, 10.0)
    wide = [t.detach().double().requires_grad_() for t in narrow]
    n = len(state0)
    results = []
    for fn, dtype, ts in ((fused_scan, torch.float32, narrow), (pure_scan, torch.float64, wide)):
        out, _ = fn(options(cell, dtype, T_=6, B_=4, H_=64), ts[0], tuple(ts[3:3 + n]), ts[1], ts[2],
                    tuple(ts[3 + n:]))
        out.square().sum().backward()
        results.append(out)
    assert float((results[0].detach().double() - results[1].detach()).abs().max()) <= 1e-6
    for k, (p, q) in enumerate(zip(narrow, wide, strict=True)):
        assert float((p.grad.double() - q.grad).abs().max()) <= 1e-6 * float(q.grad.abs().max()), k


@needs_kernel
@pytest.mark.parametrize("cls", [rk.LSTM, rk.GRU])
def test_float32_layer_norm_of_the_input_keeps_its_precision_when_w_ih_shares_an_offset(cls, monkeypatch):
    """The same for xi = x W_ih^T + b_ih: W_ih's columns and b_ih are centred (in double) before the
    product, and d_x is formed through the centred W_ih, so a common offset in W_ih and b_ih (+ 10) costs
    the float32 layer nothing against a float64 copy run by the pure-torch engine; outputs and gradients
    (measured ~3e-7 of each gradient's largest entry). Centring forced, as above."""
    monkeypatch.setattr(_fused, "CENTRE_ROWS_PER_UNIT", 0)
    torch.manual_seed(0)
    layer = cls(16, 64, layer_norm=True, backend="engine")
    with torch.no_grad():
        layer.weight_ih_l0 += 10.0
        layer.bias_ih_l0 += 10.0
    wide = copy.deepcopy(layer).double()
    x = torch.randn(6, 4, 16)
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    out = layer(x32)[0]
    with monkeypatch.context() as m:
        m.setenv("RNNKIT_NO_FUSED", "1")                 # the reference: the pure-torch engine
        ref = wide(x64)[0]
        ref.square().sum().backward()
    out.square().sum().backward()
    assert float((out.double() - ref).abs().max()) <= 1e-6
    named = [("x", x32, x64)] + [(n, p, q) for (n, p), q in zip(layer.named_parameters(), wide.parameters())]
    for name, p, q in named:
        assert float((p.grad.double() - q.grad).abs().max()) <= 2e-6 * float(q.grad.abs().max()), name


@needs_kernel
@pytest.mark.parametrize("T_, B_, copies", [(1, 1, 0), (8, 64, 3)])
def test_layer_norm_centres_the_weights_only_in_calls_long_enough_to_pay_for_it(T_, B_, copies, monkeypatch):
    """Centring copies U, b_hh and W_ih (and b_ih) each call: a step at a time through the layer (T = B = 1,
    H = 64) keeps the weights and lets LN take the rows' means (was: LSTM H=2048 74 ms a call against
    4.7); 512 rows, 8 per unit, take them centred (4 copies with W_ih, whose product the kernel makes).
    Both give the pure engine's numbers."""
    calls = []
    real = _fused._centered
    monkeypatch.setattr(_fused, "_centered", lambda t, dim: (calls.append(dim), real(t, dim))[1])
    torch.manual_seed(0)
    layer = rk.LSTM(64, 64, layer_norm=True, backend="engine")
    x = torch.randn(T_, B_, 64, requires_grad=True)
    out = layer(x)[0]
    out.square().sum().backward()
    assert calls.count(0) == copies + (copies > 0)
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    monkeypatch.setenv("RNNKIT_NO_FUSED", "1")
    ref = layer(x2)[0]
    ref.square().sum().backward()
    assert float((out - ref).abs().max()) <= 2e-6
    for g, r in zip(grads, [x2.grad] + [p.grad for p in layer.parameters()], strict=True):
        assert float((g - r).abs().max()) <= 1e-5 * float(r.abs().max())


def _zero_state_run(fn, kind, dtype, grad_h0, poison=None, B_=5, **opt):
    """One scan from zero initial states, T=12 (float32 multiplies by a packed U), B=5, H=33; poison:
    a NaN in U ("w") or in step 0's output gradient ("d_out")."""
    cell, xi, w, b, state0, params = scan_inputs(kind, dtype, T_=12, B_=B_, H_=33)
    state0 = tuple(torch.zeros_like(s).requires_grad_(grad_h0) for s in state0)
    if poison == "w":
        with torch.no_grad():
            w[3, 4] = float("nan")
    out, final = fn(options(cell, dtype, T_=12, B_=B_, H_=33, **opt), xi, state0, w, b, params)
    d_out = torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)
    if poison == "d_out":
        d_out[0, 1, 2] = float("nan")
    torch.autograd.backward([out, final[0]], [d_out, final[0].detach()])
    got = {"out": out, "final": final[0], "d_xi": xi.grad, "d_w": w.grad, "d_b": b.grad}
    got.update({f"d_s{j}": s.grad for j, s in enumerate(state0)})
    got.update({f"d_p{j}": p.grad for j, p in enumerate(params)})
    return got


@needs_kernel
@pytest.mark.parametrize("grad_h0", [True, False], ids=["d_h0", "no_d_h0"])
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru", "ln_gru"])
def test_zero_initial_state_skips_step_zeros_products_and_equals_the_engine(kind, grad_h0):
    """From zeros (a layer called without a state) the kernel skips h0 U in the first step, dU's h0 term
    and, when nothing asks for d_h0, the backward's last product through U; all else as the engine."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        for opt in ({}, {"reverse": True, "rec": True, "padding": "right", "truncate": 5}):
            got, ref = (_zero_state_run(fn, kind, dtype, grad_h0, **opt) for fn in (fused_scan, pure_scan))
            assert_same(got, ref, tol, f"{kind} {dtype} {opt}")
            assert (got["d_s0"] is None) == (not grad_h0)


@needs_kernel
@pytest.mark.parametrize("poison", ["w", "d_out"])
def test_zero_initial_state_still_carries_nan_through_the_skipped_products(poison):
    """0 * NaN is NaN: with a NaN in U, step 0's output is NaN (h0 U is not skipped); with a NaN in step
    0's output gradient, dU's h0 term is NaN (not skipped) — on both paths the same entries."""
    got, ref = (_zero_state_run(fn, "rnn_tanh", torch.float32, False, poison) for fn in (fused_scan, pure_scan))
    for k in ("out", "d_w", "d_xi"):
        assert torch.equal(torch.isnan(got[k]), torch.isnan(ref[k])), k
    assert bool(torch.isnan(ref["out"][0]).any()) == (poison == "w")
    assert bool(torch.isnan(ref["d_w"]).any())


@needs_kernel
@pytest.mark.parametrize("kind", ["lnx_rnn_tanh", "lnx_lstm", "ln_gru"])
def test_zero_initial_state_in_lanes_summing_dU_by_steps(kind):
    """dU by steps (scan.h), forced on in two lanes of 20 rows: from zeros the h0 term is left out as after the loop,
    and a NaN in step 0's output gradient still makes it NaN (not skipped), the same entries as the engine's."""
    threads, old_lanes = torch.get_num_threads(), _fused.build().set_min_lane_rows(16)
    old_mode = _fused.build().set_weight_grad_by_steps(2)
    torch.set_num_threads(2)
    try:
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            for opt in ({}, {"reverse": True, "rec": True, "padding": "right", "truncate": 5}):
                got, ref = (_zero_state_run(fn, kind, dtype, False, B_=40, **opt) for fn in (fused_scan, pure_scan))
                assert_same(got, ref, tol, f"{kind} {dtype} {opt}")
        got, ref = (_zero_state_run(fn, kind, torch.float32, False, "d_out", B_=40) for fn in (fused_scan, pure_scan))
        assert bool(torch.isnan(ref["d_w"]).any())
        for k in ("out", "d_w", "d_xi"):
            assert torch.equal(torch.isnan(got[k]), torch.isnan(ref[k])), k
    finally:
        torch.set_num_threads(threads)
        _fused.build().set_min_lane_rows(old_lanes)
        _fused.build().set_weight_grad_by_steps(old_mode)
