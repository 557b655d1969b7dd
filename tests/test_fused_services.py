"""The fused kernel's services beside the scan: its fast 0/1 mask sampler (zoneout) and the pool
that keeps its large buffers between calls. The scan itself is held to the engine in test_fused.py,
whose fixtures these tests reuse."""
from __future__ import annotations

import pytest
import torch

from rnnkit import _fused
from test_fused import big_run, fused_scan, needs_kernel, run


# -- the fast mask sampler ----------------------------------------------------------------------------

@needs_kernel
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_bernoulli_masks_have_the_rate_and_are_reproducible(p):
    torch.manual_seed(3)
    a = _fused.bernoulli((50, 40, 30), p, torch.float64)
    torch.manual_seed(3)
    b = _fused.bernoulli((50, 40, 30), p, torch.float64)
    c = _fused.bernoulli((50, 40, 30), p, torch.float64)
    assert a.dtype == torch.float64 and a.shape == (50, 40, 30) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(a.mean()) - p) < 0.01                      # 60,000 draws: 4 standard deviations
    assert (p in (0.0, 1.0)) == torch.equal(a, c)               # a fresh seed, a fresh mask
    if 0 < p < 1:                                                # neighbours are not correlated
        x = a.flatten() - p
        assert abs(float((x[1:] * x[:-1]).mean())) < 0.01 * p * (1 - p) * 4


def test_bernoulli_without_the_kernel_is_torchs(monkeypatch):
    monkeypatch.setenv("RNNKIT_NO_FUSED", "1")
    torch.manual_seed(1)
    m = _fused.bernoulli((7, 3), 0.3)
    torch.manual_seed(1)
    assert torch.equal(m, torch.empty(7, 3).bernoulli_(0.3))


# -- the buffer pool ------------------------------------------------------------------------------------

@needs_kernel
def test_buffer_pool_reuses_freed_buffers_and_releases_them():
    """A training step's large buffers return to the pool when freed, serve the next step, and
    release_pool hands them back; turning the pool off (limit 0) keeps nothing."""
    ops = _fused.build()
    _fused.release_pool()
    assert ops.pool_held_bytes() == 0
    run(fused_scan, "gru", torch.float64)                       # tiny: under the pool's 64 KiB floor
    assert ops.pool_held_bytes() == 0
    out = big_run("lnx_gru", torch.float32, 20, 64, 64)[0]["out"]   # 20*64*192 floats: pooled
    held = ops.pool_held_bytes()
    assert held >= 20 * 64 * 192 * 4                            # at least d_xi came back
    again = big_run("lnx_gru", torch.float32, 20, 64, 64)[0]["out"]
    assert torch.equal(out, again)                              # reused memory, same numbers
    assert ops.pool_held_bytes() <= held                        # served from the pool, not grown
    assert _fused.release_pool() > 0 and ops.pool_held_bytes() == 0
    old = ops.set_pool_limit(0)
    try:
        big_run("lnx_gru", torch.float32, 20, 64, 64)
        assert ops.pool_held_bytes() == 0
    finally:
        ops.set_pool_limit(old)


@needs_kernel
def test_buffer_pool_evicts_old_blocks_for_a_new_working_set():
    """At its limit the pool drops its longest-unused blocks to keep the newest ones (a new layer size
    must not find the pool full of an old size's blocks)."""
    ops = _fused.build()
    _fused.release_pool()
    old = ops.set_pool_limit(4 << 20)
    try:
        big_run("lnx_gru", torch.float32, 20, 64, 64)           # blocks of ~1 MB
        assert 0 < ops.pool_held_bytes() <= 4 << 20
        big_run("lstm", torch.float32, 30, 64, 96)              # other sizes, ~2.9 MB d_xi among them
        held = ops.pool_held_bytes()
        assert 30 * 64 * 384 * 4 <= held <= 4 << 20             # the newest large block was kept
    finally:
        ops.set_pool_limit(old)
        _fused.release_pool()


@needs_kernel
def test_buffer_pool_holds_at_most_three_times_the_most_it_had_in_use():
    """Lengths that change from batch to batch by more than the quarter a block may spare find no block to
    reuse, and each used to park its blocks up to the 1 GiB limit (an LSTM on random B and T: 518 MB held
    after 400 steps whose largest had ~48 MB in use). The pool keeps at most three times its peak in use."""
    ops = _fused.build()
    _fused.release_pool()
    assert ops.pool_peak_bytes() == 0
    for T in (11, 14, 18, 23, 30, 39, 51, 66, 85):   # 1.3x apart: no block fits the next; all kept, ~4x the peak
        big_run("lstm", torch.float32, T, 32, 64)
    held, peak = ops.pool_held_bytes(), ops.pool_peak_bytes()
    assert peak >= 85 * 32 * 256 * 4                             # at least one d_xi of the last run
    assert 0 < held <= 3 * peak                                  # old blocks evicted to stay there
    again = big_run("lstm", torch.float32, 85, 32, 64)[0]["out"]
    assert ops.pool_held_bytes() <= held                         # the last size's blocks serve it again
    assert ops.pool_peak_bytes() == peak
    del again
    _fused.release_pool()
    assert ops.pool_held_bytes() == 0 and ops.pool_peak_bytes() == 0
    old = ops.set_pool_peak_multiple(0)                          # a loop over many shapes in turn keeps them all
    try:
        assert old == 3
        for T in (11, 14, 18, 23, 30, 39, 51, 66, 85):
            big_run("lstm", torch.float32, T, 32, 64)
        assert ops.pool_held_bytes() > 3 * ops.pool_peak_bytes()
    finally:
        ops.set_pool_peak_multiple(old)
        _fused.release_pool()


@needs_kernel
@pytest.mark.parametrize("cls", ["MinGRU", "MinLSTM"])
def test_parallel_scan_cells_take_h_dx_and_dp_from_the_pool(cls):
    """The fused min-cell scan's (T, B, H) output, its input's gradient and the per-block dP are pooled
    (fresh memory each step faulted in ~6 ms of a 38 ms MinLSTM step): freed, they come back to the pool
    and serve the next step with the same numbers."""
    from rnnkit import minimal
    ops = _fused.build()
    torch.manual_seed(0)
    layer = getattr(minimal, cls)(16, 64, scan="blocked")
    x = torch.randn(300, 4, 16, requires_grad=True)           # h 300 KiB, dx 75 KiB (the floor: 64)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = layer(x)
        (out * out).sum().backward()
        return out.detach().clone(), x.grad.clone(), layer.weight_ih_l0.grad.clone()

    _fused.release_pool()
    first = step()
    x.grad = None                                               # dx lives on as x.grad until then
    held = ops.pool_held_bytes()
    gates = 2 if cls == "MinGRU" else 3
    assert held >= 300 * 4 * (64 + 16 + gates * 64) * 4        # h, dx and the (one) block's dP came back
    second = step()
    x.grad = None
    assert ops.pool_held_bytes() == held                        # served from the pool, not grown
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    _fused.release_pool()


@needs_kernel
def test_pool_serves_a_slightly_smaller_request_from_a_larger_block():
    """Lengths that vary from batch to batch must reuse the pool's blocks, not park one per length: a
    request takes the smallest free block it fits with at most a quarter to spare."""
    from rnnkit.minimal import MinGRU
    ops = _fused.build()
    layer = MinGRU(8, 64, scan="blocked")
    _fused.release_pool()
    with torch.no_grad():
        layer(torch.randn(400, 4, 8))                           # h: 400 KiB, back to the pool
        held = ops.pool_held_bytes()
        for T in (390, 370, 350, 330):                          # each within a quarter of 400
            layer(torch.randn(T, 4, 8))
            assert ops.pool_held_bytes() == held
        layer(torch.randn(100, 4, 8))                           # far smaller: fresh memory, kept after
        assert ops.pool_held_bytes() > held
    _fused.release_pool()


def _peak_bytes(fn):
    """Peak bytes held by torch's allocators (and the kernel's pool, which reports to the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("path", ["fused", "pure"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_inference_without_a_graph_keeps_no_training_buffers(path, cell, monkeypatch):
    """Under torch.no_grad a layer whose weights require grad (any model) must not keep what a backward
    needs: autograd Functions still see needs_input_grad True there. It peaked at ~1.8x the frozen
    model's memory before engine.ScanOptions.keep."""
    import rnnkit as rk
    if path == "pure":
        monkeypatch.setattr(_fused, "supports_projected", lambda *a: False)
        monkeypatch.setattr(_fused, "supports", lambda *a: False)
    elif not _fused.available():
        pytest.skip("fused kernel not built")
    torch.manual_seed(0)
    layer = getattr(rk, cell)(64, 64, backend="engine")
    frozen = getattr(rk, cell)(64, 64, backend="engine").requires_grad_(False)
    frozen.load_state_dict(layer.state_dict())
    x = torch.randn(50, 16, 64)

    def infer(model):
        with torch.no_grad():
            return model(x)[0]

    assert torch.equal(infer(layer), infer(frozen))
    training, inference, reference = _peak_bytes(lambda: layer(x)), _peak_bytes(lambda: infer(layer)), \
        _peak_bytes(lambda: infer(frozen))
    assert inference == reference < training


@pytest.mark.parametrize("path", ["fused", "pure"])
def test_scan_options_keep_is_the_grad_mode_not_the_callers(path, monkeypatch):
    """ScanOptions.keep is set by scan() from the grad mode: a caller's keep=False under grad mode must
    not build a graph whose backward has nothing to run on."""
    import rnnkit as rk
    from rnnkit.cells import GRUCell
    if path == "pure":
        monkeypatch.setattr(_fused, "supports", lambda *a: False)
    elif not _fused.available():
        pytest.skip("fused kernel not built")
    torch.manual_seed(0)
    xi = torch.randn(6, 3, 12, requires_grad=True)
    h0, w, b = torch.zeros(3, 4), torch.randn(12, 4, requires_grad=True), torch.randn(12, requires_grad=True)
    grads = []
    for keep in (True, False):
        out, _ = rk.scan(rk.ScanOptions(GRUCell(), keep=keep), xi, (h0,), w, b)
        grads.append(torch.autograd.grad(out.square().sum(), (xi, w, b)))
    assert all(torch.equal(a, c) for a, c in zip(*grads))


# -- the cores' round trip (benchmarks: where the host put the two vCPUs) -------------------------------

@needs_kernel
def test_core_round_trip_is_a_time_and_leaves_the_callers_cpus_as_they_were():
    """Two threads pinned to the first two CPUs pass a cache line back and forth: a cross-core transfer
    takes tens to hundreds of ns (~80 and ~420 on the Zen 5 box), never 0 and never a millisecond. The
    calling thread is pinned while it measures and must get its own CPU set back."""
    import os
    cpus = os.sched_getaffinity(0)
    ns = _fused.build().core_round_trip_ns(2000)
    assert os.sched_getaffinity(0) == cpus
    if len(cpus) < 2:
        assert ns == -1.0
        return
    assert 5.0 < ns < 1e5, ns
    assert _fused.build().core_round_trip_ns(0) == -1.0                  # no trips: nothing measured
    os.sched_setaffinity(0, {min(cpus)})                                 # one CPU left to this thread's process
    try:
        assert _fused.build().core_round_trip_ns(2000) == -1.0
    finally:
        os.sched_setaffinity(0, cpus)
