"""The scans beneath minGRU / minLSTM (rnnkit.parallel): gradcheck of the blocked scan's hand-written
backward on every block route (`min_route`, conftest.py), the fused C++ pass against the torch-op
blocks in float32, the kept x W^T, and Heinsen's log scan."""
import pytest
import torch
from test_minimal import CLASSES, D64
from torch.autograd import gradcheck

from rnnkit import _fused, logcumsumexp, parallel
from rnnkit.minimal import MinGRU, MinGRUCell, MinLSTM, MinLSTMCell
from rnnkit.parallel import blocked_scan, log_scan, reverse_total

# -- gradcheck of the hand-written backward ------------------------------------------------------------

@pytest.mark.parametrize("cell", [MinGRUCell(), MinLSTMCell()], ids=["mingru", "minlstm"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("block", [1, 3, 7])
@pytest.mark.parametrize("masked,bias", [(False, True), (True, True), (True, False)])
def test_blocked_scan_gradcheck(cell, reverse, block, masked, bias, min_route):
    T, B, I, H = 7, 3, 2, 3
    G = cell.num_gates
    x = torch.randn(T, B, I, dtype=D64, requires_grad=True)
    W = torch.randn(G * H, I, dtype=D64, requires_grad=True)
    b = torch.randn(G * H, dtype=D64, requires_grad=True) if bias else None
    h0 = torch.randn(B, H, dtype=D64, requires_grad=True)
    mask = (torch.arange(T)[:, None] < torch.tensor([7, 1, 4])).to(D64).unsqueeze(2) if masked else None
    f = lambda x, W, b, h0: blocked_scan(cell, x, W, b, h0, mask, reverse, block)  # noqa: E731
    assert gradcheck(f, (x, W, b, h0))


@pytest.mark.parametrize("cell", [MinGRUCell(), MinLSTMCell()], ids=["mingru", "minlstm"])
def test_backward_block_matches_autograd(cell):
    """forward_block / backward_block (no autograd, in place) against autograd through the cell's
    `coefficients`, on values across g's kink at 0."""
    P = torch.linspace(-4, 4, 2 * 3 * cell.num_gates * 5, dtype=D64).reshape(2, 3, -1).requires_grad_()
    a, b = cell.coefficients(P)
    da, db = torch.randn_like(a), torch.randn_like(b)
    auto, = torch.autograd.grad((a * da).sum() + (b * db).sum(), P)
    with torch.no_grad():                                  # as inside the Function
        a2, b2, saved = cell.forward_block(P)
        hand = cell.backward_block(db, da, saved)
    assert (a2 - a).abs().max() < 1e-15 and (b2 - b).abs().max() < 1e-15
    assert (hand - auto).abs().max() < 1e-12


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("reverse,upstream,I", [(False, "dense", 24), (True, "dense", 24), (False, "sum", 24),
                                                (True, "transposed", 24), (False, "dense", 80),
                                                (True, "transposed", 80)])
def test_fused_route_equals_torch_route_in_float32(kind, reverse, upstream, I, monkeypatch):
    """Sizes the float64 tests do not reach: H = 600 spans two lane chunks of the kernel (512), B = 5
    rows over two threads, 3 blocks with padding; values, gradients and the trace's g norms. The
    gradient arriving at h is dense, one expanded scalar (out.sum()), or strided (a transposed view).
    I = 24: a block's projection (80 x 24 by 24 x 1200 or 1800) is large enough for the kernel's oneDNN
    route where the CPU takes it (blas.h: kDnnlMinStepWork); I = 80: x W^T is kept for the backward
    (parallel.KEEP_MIN_INPUT), not recomputed."""
    if not _fused.available():
        pytest.skip("the fused kernel is not available here")
    T, B, H = 40, 5, 600
    cell = {"mingru": MinGRUCell, "minlstm": MinLSTMCell}[kind]()
    torch.manual_seed(1)
    x = torch.randn(T, B, I, requires_grad=True)
    W = (torch.randn(cell.num_gates * H, I) * 2).requires_grad_()              # some gates saturate
    b = torch.randn(cell.num_gates * H, requires_grad=True)
    h0 = torch.randn(B, H, requires_grad=True)
    mask = (torch.arange(T)[:, None] < torch.tensor([40, 13, 1, 27, 39])).float().unsqueeze(2)
    d = {"dense": torch.randn(T, B, H), "sum": torch.ones(()).expand(T, B, H),
         "transposed": torch.randn(B, T, H).transpose(0, 1)}[upstream]
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(parallel, "FUSED_KINDS", {})
        norms = torch.zeros(T, B)
        h = blocked_scan(cell, x, W, b, h0, mask, reverse, 16, grad_norm=norms)
        grads = torch.autograd.grad(h, (x, W, b, h0), d)                   # d reaches the scan as it is
        results.append((h, norms, *grads))
    for mine, ref in zip(*results):
        assert (mine - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


def test_log_scan_gradcheck_with_h0_and_padding():
    T, B, H = 6, 2, 3
    log_a = (-torch.rand(T, B, H, dtype=D64)).requires_grad_()
    log_b = torch.randn(T, B, H, dtype=D64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=D64, requires_grad=True)                       # any sign
    pad = torch.zeros(T, B, 1, dtype=torch.bool)
    pad[:2, 1] = True                                                           # padding first (reverse)

    def f(log_a, log_b, h0):
        return log_scan(log_a.masked_fill(pad, 0), log_b.masked_fill(pad, torch.finfo(D64).min / 2), h0)
    assert gradcheck(f, (log_a, log_b, h0))


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_log_scan_in_chunks_gradcheck(chunk):
    """Several chunks, the last one padded (T = 6, chunk 4), h0 carried through them; and None h0."""
    T, B, H = 6, 2, 3
    log_a = (-torch.rand(T, B, H, dtype=D64)).requires_grad_()
    log_b = torch.randn(T, B, H, dtype=D64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=D64, requires_grad=True)
    ref, h = [], h0
    for t in range(T):
        h = log_a[t].exp() * h + log_b[t].exp()
        ref.append(h)
    assert (log_scan(log_a, log_b, h0, chunk) - torch.stack(ref)).abs().max() < 1e-12
    assert gradcheck(lambda a, b, h0: log_scan(a, b, h0, chunk), (log_a, log_b, h0))
    assert gradcheck(lambda a, b: log_scan(a, b, None, chunk), (log_a, log_b))


@pytest.mark.parametrize("dtype,T,out_tol,grad_tol", [(torch.float32, 4096, 1e-5, 1e-5),
                                                      (torch.bfloat16, 512, 3e-2, 3e-2),
                                                      (torch.float16, 1024, 5e-3, 5e-3)])
def test_log_scan_accuracy_over_long_sequences(dtype, T, out_tol, grad_tol):
    """Against the float64 blocked scan. The unchunked scan in one piece measured (MinGRU, H = 16):
    float32 T = 4096 output 1.6e-4 and weight gradient 5e-3 relative; bfloat16 T = 512 output 4.3,
    float16 T = 4096 4.6 (cumsum and logcumsumexp in half precision)."""
    torch.manual_seed(0)
    m = MinGRU(3, 16, scan="log", dtype=dtype)
    ref = MinGRU(3, 16, scan="blocked", dtype=D64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(T, 2, 3)
    out = m(x.to(dtype))[0]
    out.float().pow(2).mean().backward()
    want = ref(x.to(D64))[0]
    want.pow(2).mean().backward()
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()
    assert rel(out, want) < out_tol
    assert rel(m.weight_ih_l0.grad, ref.weight_ih_l0.grad) < grad_tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_log_scan_keeps_a_gate_shut_by_a_huge_or_infinite_pre_activation(dtype, tol):
    """A step whose log a is huge and negative (a forgetting gate shut by a pre-activation of 1e29) or
    -inf (a = 0): a* = cumsum(log a) then dwarfs the logcumsumexp it must cancel, and the scan gave
    h = 1.0 where the recurrence gives 3.6e29 (MinGRU, x = 1e30 on one step), and NaN at -inf. log a is
    floored (parallel.LOG_A_FLOOR): within `tol` of the plain loop relative to each step's size,
    float32 and float64 (measured 3.3e-6 and 9.3e-14), and its gradients finite."""
    T, B, H = 12, 2, 3
    g = torch.Generator().manual_seed(0)
    log_a = -torch.rand(T, B, H, generator=g, dtype=torch.float64)
    log_b = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    log_a[3, 0] = -2.6e29
    log_a[7, 1] = -torch.inf
    log_a[9, :, 0] = -300.0
    log_b[3, 0, 1] = 68.0                             # h = e^68 = 3.4e29 there
    h0 = torch.randn(B, H, generator=g, dtype=torch.float64)
    h, ref = h0, []
    for t in range(T):
        h = log_a[t].exp() * h + log_b[t].exp()
        ref.append(h)
    ref = torch.stack(ref)
    la, lb = log_a.to(dtype).requires_grad_(), log_b.to(dtype).requires_grad_()
    out = log_scan(la, lb, h0.to(dtype), chunk=8)
    rel = ((out.double() - ref).abs() / ref.abs().clamp(min=1)).max().item()
    assert rel < tol, rel
    out.sum().backward()
    assert torch.isfinite(la.grad).all() and torch.isfinite(lb.grad).all()


def test_reverse_total_is_the_adjoint():
    T, B, H = 5, 2, 3
    a, b, d = torch.rand(T, B, H, dtype=D64), torch.randn(T, B, H, dtype=D64), torch.randn(T, B, H, dtype=D64)
    hs, h = [], torch.zeros(B, H, dtype=D64, requires_grad=True)
    for t in range(T):
        h = a[t] * h + b[t]
        h.retain_grad()
        hs.append(h)
    (torch.stack(hs) * d).sum().backward()
    assert (reverse_total(a, d) - torch.stack([h.grad for h in hs])).abs().max() < 1e-13


def test_kept_projection_is_a_saved_tensor_and_serves_every_backward(monkeypatch):
    """From KEEP_MIN_INPUT the fused scan keeps x W^T from the forward for the backward, saved like its
    other tensors: saved-tensor hooks (offloading) and activation checkpointing see it, and a second
    backward through the same graph (retain_graph) reads it again. Gradients as the recomputing path's.
    Without gradients wanted nothing is kept."""
    from torch.utils.checkpoint import checkpoint
    if not _fused.available():
        pytest.skip("the fused kernel is not available here")
    torch.manual_seed(0)
    I = parallel.KEEP_MIN_INPUT
    layer = MinLSTM(I, 32, scan="blocked")
    x = torch.randn(50, 3, I, requires_grad=True)
    weights = torch.randn(50, 3, 32)

    def grads(retain=False, wrap=None):
        out, _ = layer(x) if wrap is None else wrap(layer, x, use_reentrant=False)
        loss = (out * weights).sum()
        first = torch.autograd.grad(loss, (x, *layer.parameters()), retain_graph=retain)
        return first, (torch.autograd.grad(loss, (x, *layer.parameters())) if retain else None)

    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        layer(x)
    assert (50, 3, 3 * 32) in shapes                              # x W^T, kept and saved
    kept, again = grads(retain=True)
    checkpointed, _ = grads(wrap=checkpoint)
    monkeypatch.setattr(parallel, "KEEP_MIN_INPUT", 10 ** 9)
    recomputed, _ = grads()
    for a, b, c, d in zip(kept, again, checkpointed, recomputed):
        assert torch.equal(a, b) and torch.equal(a, c) and (a - d).abs().max() <= 1e-6 * (1 + d.abs().max())
    monkeypatch.setattr(parallel, "KEEP_MIN_INPUT", 1)
    seen = []
    monkeypatch.setattr(parallel, "_empty", lambda kind, shape, like: seen.append(tuple(shape)) or
                        torch.empty(shape, dtype=like.dtype))
    with torch.no_grad():
        layer(x)
    assert seen == [(50, 3, 32)]                                   # h only: nothing kept


@pytest.mark.parametrize("torch_first_order", [False, True])
def test_logcumsumexp_differentiates_twice_where_the_gradient_is_zero(torch_first_order):
    """torch's logcumsumexp double backward takes the log of the incoming gradient: NaN where it is exactly
    zero (a loss on the last step, padding). Ours: gradcheck (forward mode too: its jvp) and gradgradcheck in
    float64 with zero gradients among them, with either first-order form (its recurrence on CPU, torch's
    formula elsewhere)."""
    def f(t, dim):
        return logcumsumexp.LogCumSumExp.apply(t, dim, torch_first_order)
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 6, 4, dtype=torch.float64)
    g[:, :-1] = 0                                                 # only the last step's output is used
    assert gradcheck(lambda t: f(t, 1), (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lambda t: f(t, 1), (x,), (g.requires_grad_(),))
    dx, = torch.autograd.grad(f(x, 1), x, g)
    ref, = torch.autograd.grad(torch.logcumsumexp(x, 1), x, g)
    assert torch.allclose(dx, ref)
    dx, = torch.autograd.grad(f(x, 1), x, g, create_graph=True)
    dx.square().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", [MinGRU, MinLSTM])
def test_log_scan_gradient_penalty_under_torch_func_is_finite(kind):
    """torch.func.grad of a torch.func.grad through scan="log", the loss on the last step: it took torch's
    logcumsumexp there, whose double backward is NaN where the gradient is zero; now the Function (its
    vmap rule and jvp too), with autograd's create_graph numbers."""
    from torch.func import functional_call, grad
    torch.manual_seed(6)
    layer = kind(3, 4, scan="log").double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, x):
        return functional_call(layer, p, (x,))[0][-1].square().sum()

    got = grad(lambda p: grad(loss, argnums=1)(p, x).square().sum())(params)
    xr = x.clone().requires_grad_()
    gx, = torch.autograd.grad(loss(dict(layer.named_parameters()), xr), xr, create_graph=True)
    want = torch.autograd.grad(gx.square().sum(), list(layer.parameters()))
    for (name, a), b in zip(got.items(), want):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-12, name
    hess = torch.func.hessian(lambda v: functional_call(layer, params, (v,))[0][-1].square().sum())(x)
    assert torch.isfinite(hess).all()


@pytest.mark.parametrize("kind", [MinGRU, MinLSTM])
def test_log_scan_forward_mode_and_functionalize(kind):
    """Forward mode and functionalize take plain ops (logcumsumexp_ops): the Function's jvp sees no outer
    tangent (jacfwd of jacfwd was 0.22 off), functionalize has no rule for a Function, and torch's own
    forward-mode derivative of logcumsumexp drops entries ~30 below the running maximum, which a 64-step
    chunk reaches (jvp and hessian were 0.5-15x off at T = 64)."""
    from torch.func import functionalize, hessian, jacfwd, jvp
    torch.manual_seed(7)
    layer = kind(2, 4, scan="log").double()
    x = torch.randn(70, 1, 2, dtype=torch.float64)

    def f(v):
        return layer(v)[0].square().sum()

    xr = x.clone().requires_grad_()
    g, = torch.autograd.grad(f(xr), xr)
    v = torch.randn_like(x)
    assert abs(jvp(f, (x,), (v,))[1] - (g * v).sum()) < 1e-10 * g.abs().sum()
    want = torch.autograd.functional.hessian(f, x)
    for got in (hessian(f)(x), jacfwd(jacfwd(f))(x)):
        assert (got - want).abs().max() < 1e-10 * want.abs().max()
    assert (functionalize(lambda t: layer(t)[0])(x) - layer(x)[0]).abs().max() < 1e-12
    v = torch.tensor([-torch.inf, -torch.inf, 1.0, 2.0], dtype=torch.float64)   # a run of -inf first
    torch.testing.assert_close(logcumsumexp.logcumsumexp_ops(v, 0), torch.logcumsumexp(v, 0), rtol=1e-15, atol=0)


@pytest.mark.parametrize("kind", [MinGRU, MinLSTM])
def test_log_scan_second_derivatives_equal_the_blocked_scans(kind):
    """A gradient penalty through scan="log" with the loss on the last step and padded rows: finite, and
    the blocked scan's numbers (float64)."""
    torch.manual_seed(4)
    log_layer = kind(3, 5, scan="log").double()
    blocked = kind(3, 5, scan="blocked").double()
    blocked.load_state_dict(log_layer.state_dict())
    x = torch.randn(70, 2, 3, dtype=torch.float64, requires_grad=True)
    got = []
    for layer in (log_layer, blocked):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x, lengths=torch.tensor([70, 41]))
        g, = torch.autograd.grad(out[-1].square().sum(), x, create_graph=True)
        g.square().sum().backward()
        got.append([x.grad.clone(), *(p.grad.clone() for p in layer.parameters())])
    assert all(torch.isfinite(t).all() for t in got[0])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(*got))
