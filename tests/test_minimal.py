"""minGRU / minLSTM layers (rnnkit.minimal): against an independent loop of the paper's equations
(written here, not taken from rnnkit), the trace, lengths, and bad input. The scans beneath them
(rnnkit.parallel: gradcheck of the hand backward, the fused pass, the log scan) are in
test_parallel_scan.py; both run on every block route (`min_route`, conftest.py)."""
import pytest
import torch
from helpers import tied_packs
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnkit.minimal import MinGRU, MinLSTM

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
def test_matches_reference(kind, scan, layers, bidir, use_lengths, use_hx, min_route):
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
def test_empty_batch(kind, scan, min_route):
    """B = 0 gives empty outputs of the right shapes and empty gradients, as rnnkit's other layers do."""
    layer = make(kind, 3, 4, 2, bidirectional=True, scan=scan)
    x = torch.randn(5, 0, 3, dtype=D64, requires_grad=True)
    out, h_n = layer(x)
    assert out.shape == (5, 0, 8) and h_n.shape == (4, 0, 4)
    out.sum().backward()
    assert x.grad.shape == (5, 0, 3) and all(float(p.grad.abs().sum()) == 0.0 for p in layer.parameters())


@pytest.mark.parametrize("kind", CLASSES)
def test_float32_blocked_is_exact_at_long_length(kind, min_route):
    """T = 2048: the blocked scan stays at float32 round-off; Heinsen's log scan drifts more."""
    layer = CLASSES[kind](2, 8, scan="blocked")
    x = torch.randn(2048, 2, 2)
    out = layer(x)[0]
    ref = layer.to(D64)(x.to(D64))[0]
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("k_f,k_i", [(-800.0, 0.0), (0.0, -800.0), (-800.0, -1600.0), (-2000.0, 30.0)])
def test_minlstm_float64_gradients_where_exp_underflows(k_f, k_i, min_route):
    """Gate pre-activations below -745: e^{-k} scaled by e^{-m} underflows to 0 in double, and the kernel's
    sigmoid(-k) = e / u was 0/0 (NaN gradients, the forward fine). Against the log scan and the paper."""
    grads = []
    for scan in SCANS:
        layer = make("minlstm", 1, 1, scan=scan)
        with torch.no_grad():
            layer.weight_ih_l0.copy_(torch.tensor([[k_f], [k_i], [0.3]], dtype=D64))
            layer.bias_ih_l0.zero_()
        x = torch.ones(3, 1, 1, dtype=D64, requires_grad=True)
        out, h_n = layer(x)
        grads.append(torch.autograd.grad(weighted(out, h_n), [x, layer.weight_ih_l0]))
        log_f, log_i = torch.nn.functional.logsigmoid(torch.tensor([k_f, k_i], dtype=D64))
        f_share = torch.sigmoid(log_f - log_i)
        h, want = 0.0, []                                                   # the paper's f / (f + i), stably
        for _ in range(3):
            h = f_share * h + (1 - f_share) * 0.8                             # g(0.3) = 0.8
            want.append(h)
        assert (out.flatten() - torch.stack(want)).abs().max() < 1e-12
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-9


@pytest.mark.parametrize("scan", SCANS)
def test_minlstm_float64_closed_gates_at_round_off(scan, min_route):
    """Both gates' pre-activations mostly below -20, where F.softplus returns x itself (off by up to
    e^-20 = 2e-9): d = softplus(-k_f) - softplus(-k_i) took that error whole, and f', i' with it (outputs
    1e-10 off over 300 steps on the torch paths, stream included; the C++ pass was exact)."""
    from rnnkit.stream import Stream
    layer = make("minlstm", 3, 4, scan=scan)
    with torch.no_grad():
        layer.weight_ih_l0.mul_(8)
        layer.bias_ih_l0[:8] -= 26.0                                         # k_f, k_i ~ -26 +- 10
        layer.bias_ih_l0[8:] += 20.0                                         # h~ ~ 20: |h| tens
    x = torch.randn(300, 2, 3, dtype=D64, generator=torch.Generator().manual_seed(5))
    stream = Stream(layer, batch_size=2)
    with torch.no_grad():
        ref, _ = reference("minlstm", layer, x)                               # f / (f + i) as it stands
        out, _ = layer(x)
        streamed = torch.stack([stream(x[t]) for t in range(x.shape[0])])
    tol = 2e-13 * float(ref.abs().max())                                      # was 6e-11 relative
    assert float((out - ref).abs().max()) < tol and float((streamed - ref).abs().max()) < tol


@pytest.mark.parametrize("kind", CLASSES)
def test_g_prime_at_zero_is_one_quarter_on_every_path(kind, min_route):
    """k_h exactly 0 (zero input and bias): g'(0) = sigmoid'(0) on every path, first order or replayed
    with create_graph, blocked or log (autograd of relu took 0 there, the hand backward 1/4)."""
    grads = []
    for scan in SCANS:
        layer = make(kind, 3, 4, scan=scan)
        with torch.no_grad():
            layer.bias_ih_l0.zero_()
        x = torch.zeros(5, 2, 3, dtype=D64)
        for create_graph in (False, True):
            out, _ = layer(x)
            grads.append(torch.autograd.grad(out.sum(), layer.bias_ih_l0, create_graph=create_graph)[0][-4:])
    assert all(torch.allclose(g, grads[0], rtol=0, atol=1e-12) for g in grads[1:])
    # h_t = a h_{t-1} + (1 - a) g(0) from h_0 = 0, a = 1/2 (z = 1/2; f' = 1/2): dh_t/dk_h = (1 - a^t) g'(0)
    assert torch.allclose(grads[0], torch.full((4,), sum(1 - 0.5 ** t for t in range(1, 6)) * 2 * 0.25, dtype=D64))


# -- the trace -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("scan", SCANS)
def test_trace_against_reference(kind, scan, min_route):
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
    before = layer(x)[0]
    layer.flatten_parameters()                                                  # torch.nn code calls it
    assert torch.equal(layer(x)[0], before)


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
