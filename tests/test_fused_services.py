"""The fused kernel's services beside the scan: its fast 0/1 mask sampler (zoneout) and the pool
that keeps its large buffers between calls. The scan itself is held to the engine in test_fused.py,
whose fixtures these tests reuse."""
from __future__ import annotations

import pytest
import torch

from rnnkit import _fused
from rnnkit._fused import pooled
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


# -- the layer's input projection into pooled memory ------------------------------------------------------

@pytest.fixture
def pool_every_linear(monkeypatch):
    monkeypatch.setattr(pooled, "_LINEAR_POOL_MIN_BYTES", 0)


@needs_kernel
def test_linear_equals_f_linear_and_passes_gradcheck(pool_every_linear):
    torch.manual_seed(0)
    x = torch.randn(9, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    y = _fused.linear(x, w, b)
    assert type(y.grad_fn).__name__ == "_PooledLinearBackward"
    assert y.shape == (9, 4, 12) and torch.equal(y, torch.nn.functional.linear(x, w, b))
    assert torch.autograd.gradcheck(_fused.linear, (x, w, b))
    assert torch.autograd.gradgradcheck(_fused.linear, (x, w, b))       # create_graph: plain ops
    assert torch.autograd.gradcheck(_fused.linear, (x, w))              # no bias
    xt = x.detach().transpose(0, 1).requires_grad_()                    # batch_first input, strided
    assert torch.autograd.gradcheck(_fused.linear, (xt, w, b))


@needs_kernel
def test_linear_large_outputs_come_from_the_pool():
    """Above the threshold (default 4 MiB) the projection's output is a pooled block: freed, it stays in
    the pool for the next call."""
    ops = _fused.build()
    _fused.release_pool()
    T, B, H = 60, 64, 128                                       # xi: 60*64*384 floats = 5.9 MB
    n = T * B * 3 * H * 4
    assert n >= pooled._LINEAR_POOL_MIN_BYTES
    x, w = torch.randn(T, B, H, requires_grad=True), torch.randn(3 * H, H)
    y = _fused.linear(x, w)
    assert type(y.grad_fn).__name__ == "_PooledLinearBackward" and ops.pool_held_bytes() == 0
    torch.testing.assert_close(y, x @ w.t(), rtol=0, atol=0)
    del y
    assert ops.pool_held_bytes() >= n
    small = _fused.linear(x[:2], w)                              # under the threshold: F.linear
    assert type(small.grad_fn).__name__ != "_PooledLinearBackward"
    _fused.release_pool()


@needs_kernel
@pytest.mark.parametrize("cls, torch_cls", [("GRU", "GRU"), ("LSTM", "LSTM"), ("RNN", "RNN")])
def test_layer_through_the_pooled_projection_matches_torch_nn(pool_every_linear, cls, torch_cls):
    import rnnkit as rk
    torch.manual_seed(1)
    ref = getattr(torch.nn, torch_cls)(6, 10, num_layers=2, batch_first=True, dtype=torch.float64)
    layer = getattr(rk, cls)(6, 10, num_layers=2, batch_first=True, backend="engine", dtype=torch.float64)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 15, 6, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(x1)[0] ** 2).sum().backward()
    (layer(x2)[0] ** 2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_linear_falls_back_to_f_linear(pool_every_linear):
    x = torch.randn(4, 3, 5)
    assert _fused.linear(x.half(), torch.randn(7, 5).half()).grad_fn is None            # other dtype
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):              # F.linear's error
        _fused.linear(x, torch.randn(7, 6))
