"""minGRU / minLSTM (rnnkit.minimal) and the scans (rnnkit.parallel): against an independent loop of the
paper's equations (written here, not taken from rnnkit), gradcheck in float64, the trace, lengths,
and bad input."""
import pytest
import torch
from helpers import tied_packs
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnkit import _fused, parallel
from rnnkit.minimal import MinGRU, MinGRUCell, MinLSTM, MinLSTMCell
from rnnkit.parallel import blocked_scan, log_scan, reverse_total

D64 = torch.float64
CLASSES = {"mingru": MinGRU, "minlstm": MinLSTM}
SCANS = ("blocked", "log")


# -- the reference: the paper's equations, one step at a time, one sequence at a time -------------------

def paper_step(kind, k, h):
    """One step from the pre-activations k = W x_t + b (.., G*H) (Feng et al. 2024, section 3)."""
    H = h.shape[-1]
    g = lambda v: torch.where(v >= 0, v + 0.5, torch.sigmoid(v))  # noqa: E731
    if kind == "mingru":
        z, h_tilde = torch.sigmoid(k[..., :H]), g(k[..., H:])
        return (1 - z) * h + z * h_tilde
    f, i, h_tilde = torch.sigmoid(k[..., :H]), torch.sigmoid(k[..., H:2 * H]), g(k[..., 2 * H:])
    return f / (f + i) * h + i / (f + i) * h_tilde


def reference(kind, layer, x, hx=None, lengths=None, keep=None):
    """Stacked, bidirectional, per-sequence run of `layer`'s weights. x (T, B, I). Returns out
    (T, B, D*H) zero past each length, h_n (L*D, B, H); keep[k][b] gets the retain_grad'ed h_t list."""
    T, B = x.shape[:2]
    D, H = 2 if layer.bidirectional else 1, layer.hidden_size
    lengths = [T] * B if lengths is None else [int(v) for v in lengths]
    hx = x.new_zeros(layer.num_layers * D, B, H) if hx is None else hx
    finals = []
    for l in range(layer.num_layers):
        outs = []
        for d in range(D):
            k = l * D + d
            sfx = f"_l{l}" + ("_reverse" if d else "")
            W, b = getattr(layer, "weight_ih" + sfx), getattr(layer, "bias_ih" + sfx, None)
            cols, fin = [], []
            for j in range(B):
                L, h, hs = lengths[j], hx[k, j], []
                for t in (range(L - 1, -1, -1) if d else range(L)):
                    pre = x[t, j] @ W.t() + (0 if b is None else b)
                    h = paper_step(kind, pre, h)
                    if keep is not None:
                        h.retain_grad()
                    hs.append((t, h))
                hs.sort(key=lambda p: p[0])
                if keep is not None:
                    keep.setdefault(k, {})[j] = [h_ for _, h_ in hs]
                cols.append(torch.stack([h_ for _, h_ in hs] + [x.new_zeros(H)] * (T - L)))
                fin.append(h)
            outs.append(torch.stack(cols, 1))                                   # (T, B, H)
            finals.append(torch.stack(fin))                                     # (B, H)
        x = torch.cat(outs, 2)
    return x, torch.stack(finals)


@pytest.fixture(params=["fused", "fused-kept", "torch"])
def route(request, monkeypatch):
    """The blocked scan's block routes: the C++ pass (rnnkit/_fused/minimal.cpp, the default on CPU),
    the same keeping x W^T for the backward at any input size (by default from KEEP_MIN_INPUT), and
    torch ops (the reference and the fallback)."""
    if request.param == "torch":
        monkeypatch.setattr(parallel, "FUSED_KINDS", {})
    elif not _fused.available():
        pytest.skip("the fused kernel is not available here")
    elif request.param == "fused-kept":
        monkeypatch.setattr(parallel, "KEEP_MIN_INPUT", 1)
    return request.param


def make(kind, *args, scan="blocked", **kw):
    torch.manual_seed(0)
    return CLASSES[kind](*args, scan=scan, **kw).to(D64)


def weighted(out, h_n):
    g = torch.Generator().manual_seed(3)
    return (out * torch.randn(out.shape, generator=g, dtype=D64)).sum() + \
        (h_n * torch.randn(h_n.shape, generator=g, dtype=D64)).sum()


# -- outputs and gradients against the reference -------------------------------------------------------

@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("layers,bidir,use_lengths,use_hx", [(1, False, False, False), (2, True, True, True),
                                                             (3, False, True, False), (1, True, False, True)])
def test_matches_reference(kind, scan, layers, bidir, use_lengths, use_hx, route):
    T, B, I, H = 7, 3, 4, 5
    layer = make(kind, I, H, layers, bidirectional=bidir, scan=scan)
    x = torch.randn(T, B, I, dtype=D64, requires_grad=True)
    hx = torch.randn(layers * (2 if bidir else 1), B, H, dtype=D64) if use_hx else None
    lengths = torch.tensor([7, 2, 5]) if use_lengths else None
    out, h_n = layer(x, hx, lengths)
    ref_out, ref_h = reference(kind, layer, x, hx, lengths)
    assert (out - ref_out).abs().max() < 1e-12 and (h_n - ref_h).abs().max() < 1e-12
    mine = torch.autograd.grad(weighted(out, h_n), [x, *layer.parameters()])
    ref = torch.autograd.grad(weighted(ref_out, ref_h), [x, *layer.parameters()])
    assert max(float((a - b).abs().max()) for a, b in zip(mine, ref)) < 1e-11


@pytest.mark.parametrize("kind", CLASSES)
def test_batch_first_unbatched_and_packed(kind):
    layer = make(kind, 3, 4, 2, batch_first=True)
    x = torch.randn(2, 6, 3, dtype=D64)                                         # (B, T, I)
    out, h_n = layer(x)
    ref_out, ref_h = reference(kind, layer, x.transpose(0, 1))
    assert (out - ref_out.transpose(0, 1)).abs().max() < 1e-12 and (h_n - ref_h).abs().max() < 1e-12
    one, one_h = layer(x[1])                                                    # unbatched (T, I)
    assert one.shape == (6, 4) and one_h.shape == (2, 4) and (one - out[1]).abs().max() < 1e-12
    lengths = torch.tensor([6, 3])
    packed, packed_h = layer(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    padded, _ = pad_packed_sequence(packed, batch_first=True)
    plain, plain_h = layer(x, lengths=lengths)
    assert (padded - plain).abs().max() < 1e-12 and (packed_h - plain_h).abs().max() < 1e-12


@pytest.mark.parametrize("kind", CLASSES)
def test_packed_output_keeps_the_inputs_order_of_tied_lengths(kind):
    """out.data's rows line up with the input's: packed as the input is, from the padded run."""
    layer = make(kind, 2, 3, 2)
    x, lengths, packs = tied_packs(dtype=D64)
    plain, _ = layer(x, lengths=lengths)
    for packed in packs:
        out, _ = layer(packed)
        assert torch.equal(out.sorted_indices, packed.sorted_indices)
        want = pack_padded_sequence(plain[:, packed.sorted_indices], lengths[packed.sorted_indices]).data
        assert (out.data - want).abs().max() < 1e-6
    with pytest.raises(ValueError, match="PackedSequence carries its own lengths"):
        layer(packs[0], lengths=lengths)


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("scan", SCANS)
def test_empty_batch(kind, scan, route):
    """B = 0 gives empty outputs of the right shapes and empty gradients, as rnnkit's other layers do."""
    layer = make(kind, 3, 4, 2, bidirectional=True, scan=scan)
    x = torch.randn(5, 0, 3, dtype=D64, requires_grad=True)
    out, h_n = layer(x)
    assert out.shape == (5, 0, 8) and h_n.shape == (4, 0, 4)
    out.sum().backward()
    assert x.grad.shape == (5, 0, 3) and all(float(p.grad.abs().sum()) == 0.0 for p in layer.parameters())


@pytest.mark.parametrize("kind", CLASSES)
def test_float32_blocked_is_exact_at_long_length(kind, route):
    """T = 2048: the blocked scan stays at float32 round-off; Heinsen's log scan drifts more."""
    layer = CLASSES[kind](2, 8, scan="blocked")
    x = torch.randn(2048, 2, 2)
    out = layer(x)[0]
    ref = layer.to(D64)(x.to(D64))[0]
    assert (out - ref).abs().max() < 1e-5


# -- gradcheck of the hand-written backward ------------------------------------------------------------

@pytest.mark.parametrize("cell", [MinGRUCell(), MinLSTMCell()], ids=["mingru", "minlstm"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("block", [1, 3, 7])
@pytest.mark.parametrize("masked,bias", [(False, True), (True, True), (True, False)])
def test_blocked_scan_gradcheck(cell, reverse, block, masked, bias, route):
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


# -- the trace -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("scan", SCANS)
def test_trace_against_reference(kind, scan, route):
    """hidden and ||dL/dh_t|| (the total gradient reaching h_t) on every real step, per layer/direction."""
    from rnnkit.tracing import LayerTrace
    T, B, I, H = 6, 3, 2, 4
    layer = make(kind, I, H, 2, bidirectional=True, scan=scan)
    x, lengths = torch.randn(T, B, I, dtype=D64), torch.tensor([6, 2, 4])
    layer._trace_sink = sink = LayerTrace()
    out, h_n = layer(x, lengths=lengths)
    weighted(out, h_n).backward()
    layer._trace_sink = None
    keep = {}
    ref_out, ref_h = reference(kind, layer, x, lengths=lengths, keep=keep)
    weighted(ref_out, ref_h).backward()
    G = layer._cell.num_gates
    for k in range(4):
        slot = sink.slot(k)
        assert slot.hidden.shape == (T, B, H) and slot.gates.shape == (T, B, G * H)
        for j in range(B):
            L = int(lengths[j])
            hs = torch.stack(keep[k][j])                                        # (L, H)
            norms = torch.stack([h.grad.norm() for h in keep[k][j]])
            assert (slot.hidden[:L, j] - hs).abs().max() < 1e-12
            assert (slot.grad_norm[:L, j] - norms).abs().max() < 1e-11
        assert torch.isfinite(slot.grad_norm).all()


# -- lengths and bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CLASSES)
def test_padding_keeps_state_and_outputs_zero(kind):
    layer = make(kind, 2, 3)
    x, lengths = torch.randn(5, 2, 2, dtype=D64), torch.tensor([5, 2])
    out, h_n = layer(x, lengths=lengths)
    assert out[2:, 1].abs().max() == 0
    alone, alone_h = layer(x[:2, 1:2])
    assert (h_n[:, 1] - alone_h[:, 0]).abs().max() < 1e-12


def test_parameters_names_and_dropout():
    layer = MinLSTM(3, 4, num_layers=2, bidirectional=True, dropout=0.5)
    names = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert names["weight_ih_l0"] == (12, 3) and names["weight_ih_l1_reverse"] == (12, 8)
    assert names["bias_ih_l1"] == (12,)
    x = torch.randn(4, 2, 3)
    assert not torch.equal(layer(x)[0], layer(x)[0])                            # dropout between layers
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])


@pytest.mark.parametrize("call,match", [
    (lambda m: m(torch.randn(4, 2, 3, 1)), "3-D"),
    (lambda m: m(torch.randn(4, 2, 5)), "input_size=3"),
    (lambda m: m(torch.randn(4, 2, 3), torch.zeros(2, 2, 4)), r"initial state h_0 must have shape \(1, 2, 4\)"),
    (lambda m: m(torch.randn(4, 2, 3), lengths=torch.tensor([5, 1])), "lengths"),
    (lambda m: m(torch.randn(4, 2, 3, dtype=D64)), "dtype"),
    (lambda m: m(torch.randn(4, 2, 3), torch.zeros(1, 2, 4, dtype=D64)), r"h_0 has dtype torch\.float64"),
    (lambda m: m(torch.randn(0, 2, 3)), r"no time steps \(T = 0 in shape \(0, 2, 3\)\)"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(MinGRU(3, 4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="scan"):
        MinGRU(3, 4, scan="fast")
    with pytest.raises(ValueError, match="hidden_size"):
        MinLSTM(3, 0)
    with pytest.raises(ValueError, match="dropout"):
        MinLSTM(3, 4, dropout=1.0)


def test_backward_restores_the_denormal_setting():
    """The blocked backward flushes denormals while it runs (a 5x speed-up on many-to-one losses) and
    must leave the caller's floating-point mode as it found it."""
    layer = MinGRU(2, 3)
    layer(torch.randn(50, 2, 2))[0][-1].sum().backward()
    assert float(torch.tensor([1e-40]) * 1.0) != 0.0


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
