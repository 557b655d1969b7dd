"""The fused kernel in lanes (scan.h: each thread runs the whole time loop on its own batch rows) and what runs
inside them: two threads on many rows, the rows streamed out with non-temporal stores, and dU summed by the lanes as
their loops go (dU by steps), each against the pure-torch engine. Split from test_fused.py, whose helpers it uses."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_fused import (
    TOL,
    assert_same,
    big_run,
    fused_scan,
    needs_kernel,
    options,
    scan_inputs,
    two_threads,
)
from torch.autograd import gradcheck

from rnnkit import _fused


@needs_kernel
@pytest.mark.parametrize("lanes", [16, 0], ids=["lanes", "no_lanes"])
@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru", "ln_gru", "lnx_lstm", "lnx_gru"])
def test_equals_engine_with_two_threads_and_many_rows(kind, lanes):
    """Large enough that the batch rows split over threads: in lanes (scan.h: each thread runs the
    whole loop on its rows, 67 = 33 + 34) or, lanes off, each step's row pass split."""
    with two_threads(lanes):
        for dtype in TOL:
            for opt in (dict(padding="left", zone="train", rec=True, trace=True), dict(reverse=True, truncate=4)):
                outs = big_run(kind, dtype, 9, 67, 150, **opt)
                assert_same(*outs, 10 * TOL[dtype], f"{kind} {dtype} {opt}")


@contextlib.contextmanager
def weight_grad_by_steps(mode: int):
    """The kernel's dU by steps (scan.h): 1 where it pays (the default), 2 under any LN wherever lanes run, 0 never."""
    old = _fused.build().set_weight_grad_by_steps(mode)
    try:
        yield
    finally:
        _fused.build().set_weight_grad_by_steps(old)


@needs_kernel
@pytest.mark.parametrize("kind", ["ln_rnn_tanh", "lnx_rnn_tanh", "ln_lstm", "lnx_lstm", "ln_gru", "lnx_gru"])
def test_weight_gradient_summed_by_steps_in_lanes_equals_engine(kind):
    """dU by steps (scan.h), forced on: each lane sums its share of dU every kDUChunkRows (128) of its rows, 3 steps
    of its 33 or 34, so T = 10 leaves one step for the last product; the h_{t-1} rows are transposed in
    registers (transpose.h), H = 150 and 33 rows leaving columns and rows outside the whole tiles. Equal to the
    pure engine in float64 and float32, and not the product after the loop in disguise: its dU differs from that
    one's in the last bits (the sums run in another order)."""
    extras = {"padding": "left", "zone": "train", "rec": True, "trace": True}
    with two_threads(16):
        for dtype, tol in TOL.items():
            for opt in (extras, {"reverse": True, "truncate": 4}):
                with weight_grad_by_steps(2):
                    fused, pure = big_run(kind, dtype, 10, 67, 150, **opt)
                with weight_grad_by_steps(0):
                    after_loop, _ = big_run(kind, dtype, 10, 67, 150, **opt)
                assert_same(fused, pure, 10 * tol, f"{kind} {dtype} {opt}")
                assert not torch.equal(fused["d_w"], after_loop["d_w"]), f"{kind} {dtype} {opt}: dU after the loop"
                for k, got in fused.items():
                    if k != "d_w":
                        assert torch.equal(got, after_loop[k]), f"{kind} {dtype} {opt}: {k}"


@needs_kernel
@pytest.mark.parametrize("kind", ["lnx_rnn_tanh", "lnx_lstm"])
def test_weight_gradient_by_steps_is_taken_where_it_pays_and_only_there(kind):
    """The default (mode 1) takes dU by steps for float32 under the paired norms in lanes, H within
    kDUByStepsMaxH (Elman 64, LSTM 128) and on oneDNN's micro-kernel; not in float64, not above that H, not
    without lanes. Seen by its dU's last bits: equal to mode 2's where taken, to mode 0's where not."""
    if _fused.build().gemm_route() != "dnnl+ukernel":
        pytest.skip(f"the products take the route {_fused.build().gemm_route()!r} here, not oneDNN's micro-kernel")
    top = 64 if "rnn" in kind else 128
    cases = [(torch.float32, top, 16, True), (torch.float64, top, 16, False), (torch.float32, top + 16, 16, False),
             (torch.float32, top, 0, False)]
    for dtype, H_, lanes, taken in cases:
        d_w = {}
        with two_threads(lanes):
            for mode in (0, 1, 2):
                with weight_grad_by_steps(mode):
                    d_w[mode] = big_run(kind, dtype, 6, 64, H_)[0]["d_w"]
        assert torch.equal(d_w[1], d_w[2] if taken else d_w[0]), f"{dtype} H={H_} lanes={lanes}: taken {taken}"
        assert not torch.equal(d_w[0], d_w[2]) or lanes == 0, f"{dtype} H={H_}: mode 2 not by steps"
    kernel = _fused.build()
    with two_threads(16):                                 # the micro-kernel refused (a route without it): not taken
        kernel.limit_gemm_route("dnnl")
        try:
            d_w = {}
            for mode in (0, 1):
                with weight_grad_by_steps(mode):
                    d_w[mode] = big_run(kind, torch.float32, 6, 64, top)[0]["d_w"]
        finally:
            kernel.limit_gemm_route("dnnl+ukernel")
        assert torch.equal(d_w[1], d_w[0])


@needs_kernel
@pytest.mark.parametrize("lanes", [16, 0], ids=["lanes", "no_lanes"])
@pytest.mark.parametrize("H_", [128, 90], ids=["aligned", "unaligned"])
def test_gru_backward_streaming_its_rows_equals_engine(H_, lanes):
    """The GRU backward without LN writes d_xi and d_gh's n block with non-temporal stores once d_xi
    passes 8 MB in rows of 1 KB or more (store.h), from a per-thread scratch row. H = 128: whole 16-byte
    chunks; H = 90: 1080-byte float32 rows, which are not and take memcpy. Both threads, in lanes or
    splitting each step."""
    with two_threads(lanes):
        for dtype in TOL:
            T_ = -(-(8 << 20) // (3 * H_ * dtype.itemsize * 64))          # (T, 64, 3H) d_xi of >= 8 MB
            for opt in (dict(), dict(reverse=True, padding="right", zone="train")):
                outs = big_run("gru", dtype, T_, 64, H_, **opt)
                assert_same(*outs, 10 * TOL[dtype], f"H={H_} {dtype} {opt}")


@needs_kernel
def test_gru_streaming_backward_in_lanes_in_a_process_that_never_set_its_threads():
    """The GRU backward streams d_xi from a per-thread scratch row (Carry::xs) once d_xi passes 8 MB. In a process
    that never calls torch.set_num_threads, at::get_num_threads() inside the lanes' parallel region read 1, the
    scratch was sized from it, and the second lane's thread wrote past its end: glibc aborted ("malloc(): invalid
    size") at GRU B=64 T=100 H=128 (9.8 MB of d_xi) in the first training step. A fresh process, its thread
    settings untouched: two steps, and the gradients equal the pure engine's."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("lanes need two CPUs")
    code = textwrap.dedent("""
        import os, torch, rnnkit as rk
        torch.manual_seed(0)
        layer = rk.GRU(128, 128, backend="engine").train()
        x = torch.randn(100, 64, 128)
        grads = []
        for fused in ("0", "0", "1"):
            os.environ["RNNKIT_NO_FUSED"] = fused
            layer.zero_grad()
            layer(x)[0].square().sum().backward()
            grads.append([p.grad.clone() for p in layer.parameters()])
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(grads[1], grads[2]))
        print("worst", worst)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RNNKIT_NO_FUSED")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split("worst")[-1]) < 1e-4


@needs_kernel
@pytest.mark.parametrize("lanes", [16, 0], ids=["lanes", "no_lanes"])
@pytest.mark.parametrize(("kind", "H_"), [("lnx_lstm", 64), ("lnx_gru", 90)], ids=["lstm_1kb", "gru_1080b"])
def test_layer_norm_forward_streaming_its_saved_rows_equals_engine(kind, H_, lanes):
    """Under LN the forward writes the saved xhat and xhat_x rows with non-temporal stores once they pass
    8 MB in rows of 1 KB or more (store.h), from a scratch row per batch row: LSTM H = 64, 1 KB float32
    rows of whole 16-byte chunks; GRU H = 90, 1080-byte float32 rows, whose last 8 bytes take memcpy
    (2160-byte float64 rows are whole chunks). Both threads, in lanes or splitting each step; the
    backward reads the rows back."""
    G = 4 if "lstm" in kind else 3
    with two_threads(lanes):
        for dtype, tol in TOL.items():
            T_ = -(-(8 << 20) // (G * H_ * dtype.itemsize * 64))          # (T, 64, G*H) xhat of >= 8 MB
            for opt in ({}, {"reverse": True, "padding": "right", "zone": "train"}):
                outs = big_run(kind, dtype, T_, 64, H_, **opt)
                assert_same(*outs, 10 * tol, f"{kind} {dtype} {opt}")


@needs_kernel
@pytest.mark.parametrize("kind", ["lnx_rnn_tanh", "lnx_lstm", "ln_gru"])
def test_fused_scan_gradcheck_summing_dU_by_steps(kind):
    """Finite differences through dU by steps (scan.h), forced on: two lanes of 2 rows each (lanes from 2 rows),
    one product per lane at the last step, float64 on the general product."""
    cell, xi, w, b, state0, params = scan_inputs(kind, torch.float64, T_=4, B_=4, H_=3)
    opts = options(cell, torch.float64, T_=4, B_=4, H_=3, reverse=True, rec=True)
    n = len(state0)

    def f(xi_, w_, b_, *rest):
        out, final = fused_scan(opts, xi_, tuple(rest[:n]), w_, b_, tuple(rest[n:]))
        return (out, *final)

    with two_threads(2), weight_grad_by_steps(2):
        assert gradcheck(f, (xi, w, b, *state0, *params))
