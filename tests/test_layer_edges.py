"""Layers at their edges, against torch.nn or an independent unroll: an overflowing forward pass, the
trace of an exploding gradient, autocast, unusual devices and tracers, the error classes torch.nn code
catches, and cells that break the protocol."""
from __future__ import annotations

import pytest
import torch

import rnnkit as rk

PATHS = ("fused", "pure")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "pure":
        monkeypatch.setenv("RNNKIT_NO_FUSED", "1")
    return request.param


def _exploding_relu(T: int, backend: str = "engine", H: int = 8) -> torch.nn.Module:
    rnn = rk.RNN(2, H, nonlinearity="relu", batch_first=True, backend=backend)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(1.5 * torch.eye(H))
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.zero_()
    return rnn


def test_relu_backward_passes_through_an_overflowed_state_as_torch_does(path):
    # 1.5^230 overflows float32: h_T holds NaN; torch's relu backward (a select on h <= 0) passes dL/dh on
    # there, where multiplying by [h > 0] had zeroed every gradient before step T
    x = torch.rand(3, 230, 2)
    mine = _exploding_relu(230)
    ref = torch.nn.RNN(2, 8, nonlinearity="relu", batch_first=True)
    ref.load_state_dict(mine.state_dict())
    grads = []
    for m in (mine, ref):
        xx = x.clone().requires_grad_()
        out, _ = m(xx)
        assert torch.isnan(out[:, -1]).any()
        out[:, -1].sum().backward()
        grads.append(xx.grad[:, -2])
    assert torch.isfinite(grads[1]).all() and grads[1].abs().max() > 0.05
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_trace_norm_of_an_exploding_gradient_does_not_overflow(path):
    # ||dL/dh_t|| grows as 1.5^k; its float32 squares overflow at k ~ 100 while the norm itself fits float32
    T = 150
    rnn = _exploding_relu(T)
    x = torch.rand(2, T, 2)
    with rk.trace(rnn) as tr:
        out, _ = rnn(x)
        out[:, -1].sum().backward()
    got = tr.grad_norm[0]                                            # (T, B)
    h = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    hs = []
    W, U = (p.detach().double() for p in (rnn.weight_ih_l0, rnn.weight_hh_l0))
    for t in range(T):                                               # an independent unroll in float64
        h = torch.relu(x[:, t].double() @ W.T + h @ U.T)
        h.retain_grad()
        hs.append(h)
    hs[-1].sum().backward()
    want = torch.stack([hh.grad.norm(dim=1) for hh in hs])
    assert want[0].max() > 1e25                                       # past float32's squares
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


# -- autocast: torch.nn's kernels autocast as torch.nn does; rnnkit's scans compute in the weights' dtype ---

@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_backend_under_autocast_is_torch_nn(kind, dtype):
    ref = getattr(torch.nn, kind)(3, 5)
    mine = getattr(rk, kind)(3, 5)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(6, 4, 3).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        want, _ = ref(x)
        got, _ = mine(x)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["auto", "engine"])
@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_state_returned_under_autocast_is_taken_back(kind, backend):
    # chunked loop (truncated BPTT by hand): the state a call returns is the next call's state
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(3, 5)
    mine = getattr(rk, kind)(3, 5, backend=backend)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(9, 2, 3)
    outs = {}
    for name, m in (("ref", ref), ("mine", mine)):
        state, chunks = None, []
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for part in x.split(3):
                out, state = m(part, state)
                chunks.append(out.float())
        outs[name] = torch.cat(chunks)
    if backend == "auto":
        assert torch.equal(outs["mine"], outs["ref"])
    else:                                # the engine in float32 throughout: close to torch.nn's bf16 run
        plain, _ = ref(x)
        torch.testing.assert_close(outs["mine"], plain, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs["mine"], outs["ref"], rtol=0, atol=0.05)


def test_engine_takes_a_low_precision_state_under_autocast():
    m = rk.GRU(3, 5, backend="engine")
    x, h0 = torch.randn(4, 2, 3), torch.randn(1, 2, 5)
    want, _ = m(x, h0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, h = m(x.bfloat16(), h0.bfloat16())
    assert got.dtype == h.dtype == torch.float32
    torch.testing.assert_close(got, m(x.bfloat16().float(), h0.bfloat16().float())[0])
    assert (got - want).abs().max() < 0.05


@pytest.mark.parametrize("make", [lambda: rk.LSTM(3, 5, device="meta"),
                                  lambda: rk.LSTM(3, 5, device="meta", backend="engine"),
                                  lambda: rk.MinGRU(3, 5, device="meta")])
def test_meta_device_gives_shapes(make):
    out, _ = make()(torch.empty(6, 4, 3, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (6, 4, 5)


# -- recorders and transforms ---------------------------------------------------------------------------

class _Wrap(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)[0]


@pytest.mark.parametrize("make", [lambda: rk.GRU(3, 5, backend="engine"),
                                  lambda: rk.LSTM(3, 5, 2, bidirectional=True, backend="engine"),
                                  lambda: rk.MinGRU(3, 5)])
@pytest.mark.parametrize("how", ["jit.trace", "export"])
def test_engine_is_recorded_by_jit_trace_and_export(make, how):
    torch.manual_seed(0)
    m, x = _Wrap(make()), torch.randn(6, 4, 3)
    f = torch.jit.trace(m, (x,)) if how == "jit.trace" else torch.export.export(m, (x,)).module()
    x2 = torch.randn(6, 4, 3)
    torch.testing.assert_close(f(x2), m(x2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_per_sample_gradients_with_vmap_on_the_default_backend(kind):
    # torch's own GRU/RNN kernels have no vmap rule; backend "auto" takes the engine under the transform
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    m = getattr(rk, kind)(3, 5)
    x = torch.randn(6, 4, 3)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, xs):
        return functional_call(m, p, (xs.unsqueeze(1),))[0].pow(2).sum()
    per = vmap(grad(loss), in_dims=(None, 1))(params, x)
    for b in range(4):
        m.zero_grad()
        m(x[:, b:b + 1])[0].pow(2).sum().backward()
        torch.testing.assert_close(per["weight_hh_l0"][b], m.weight_hh_l0.grad, rtol=1e-5, atol=1e-6)


# -- boundary cases and errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "engine"])
def test_empty_batch_with_lengths(backend):
    m = rk.GRU(3, 5, backend=backend)
    out, h = m(torch.randn(6, 0, 3), None, torch.zeros(0, dtype=torch.long))
    assert tuple(out.shape) == (6, 0, 5) and tuple(h.shape) == (1, 0, 5)


@pytest.mark.parametrize("backend", ["auto", "engine"])
def test_errors_are_the_classes_torch_nn_code_catches(backend):
    m = rk.GRU(3, 5, backend=backend)
    cases = [((torch.randn(6, 4, 3, dtype=torch.float64),), (ValueError, TypeError)),     # torch.nn: ValueError
             ((torch.randn(6, 4, 2),), (RuntimeError, ValueError)),                          # torch.nn: RuntimeError
             ((torch.randn(6, 4, 3), torch.randn(1, 3, 5)), (RuntimeError, ValueError)),
             ((torch.randn(6, 3), torch.randn(1, 1, 5)), (RuntimeError, ValueError)),
             ((torch.randn(6, 4, 3), torch.randn(1, 4, 5, dtype=torch.float64)), (RuntimeError, TypeError))]
    for args, classes in cases:
        for cls in classes:
            with pytest.raises(cls):
                m(*args)


class _Good:
    num_gates, num_states = 1, 1

    def step(self, xi, gh, state, params=()):
        return (torch.tanh(xi + gh),), None


class _BareTensor(_Good):                      # returns (h, saved), not ((h,), saved)
    def step(self, xi, gh, state, params=()):
        return torch.tanh(xi + gh), None


class _OneOfTwo(_Good):                        # declares two states, returns one
    num_states = 2


class _NoSaved(_Good):                         # returns the state alone, of batch 2: it would unpack
    def step(self, xi, gh, state, params=()):
        return torch.tanh(xi + gh)


@pytest.mark.parametrize("cell, says", [(_BareTensor, "its new_state is a tensor of shape (2, 4) (wrap one state as (h,))"),
                                        (_OneOfTwo, "num_states = 2 tensors of shape (2, 4); its new_state holds 1"),
                                        (_NoSaved, "it returned a tensor of shape (2, 4)")])
def test_a_cell_breaking_the_protocol_is_named(cell, says):
    layer = rk.Recurrent(cell(), 3, 4)
    with pytest.raises(TypeError, match=r"\.step must return \(new_state, saved\)") as err:
        layer(torch.randn(5, 2, 3))
    assert says in str(err.value)
    stream = rk.Stream(layer, batch_size=2)
    with pytest.raises(TypeError, match=r"\.step must return \(new_state, saved\)"):
        stream(torch.randn(2, 3))


@pytest.mark.parametrize("cls", [rk.MinGRU, rk.MinLSTM])
@pytest.mark.parametrize("scan", ["blocked", "log"])
def test_min_layers_take_left_padding(cls, scan):
    torch.manual_seed(0)
    m = cls(3, 5, 2, bidirectional=True, scan=scan)
    T, lens = 7, torch.tensor([7, 3, 1, 5])
    x = torch.randn(T, 4, 3, requires_grad=True)
    out, h = m(x, None, lens, padding="left")
    (out.square().sum() + h.sum()).backward()
    for b, L in enumerate(lens.tolist()):                     # each sequence alone, unpadded
        xb = x.detach()[T - L:, b:b + 1].clone().requires_grad_()
        ob, hb = m(xb)
        (ob.square().sum() + hb.sum()).backward()
        torch.testing.assert_close(out[T - L:, b:b + 1], ob, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h[:, b:b + 1], hb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad[T - L:, b:b + 1], xb.grad, rtol=1e-5, atol=1e-6)
        assert out[:T - L, b].abs().max() == 0 if L < T else True
    with pytest.raises(ValueError, match="padding must be 'right' or 'left'"):
        m(x, None, lens, padding="middle")


def test_trace_norm_of_a_vanishing_gradient_is_not_flushed(path):
    # the backward flushes denormals; the squares of entries below ~1e-19 are denormal, so a float norm of
    # a still-normal gradient of ~1e-20 came out 0 (the trace's curve fell off a false cliff)
    torch.manual_seed(0)
    T, B, H = 100, 16, 64
    rnn = rk.RNN(2, H, batch_first=True, backend="engine")
    x = torch.rand(B, T, 2)
    with rk.trace(rnn) as tr:
        out, _ = rnn(x)
        out[:, -1].sum().backward()
    cell = torch.nn.RNNCell(2, H)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in rnn.state_dict().items()})
    h, hs = torch.zeros(B, H), []
    for t in range(T):                                     # an independent float32 unroll
        h = cell(x[:, t], h)
        h.retain_grad()
        hs.append(h)
    hs[-1].sum().backward()
    want = torch.stack([q.grad.double().norm(dim=1) for q in hs])     # its norms summed in float64
    assert 0 < want[0].max() < 1e-19                                  # normal floats, denormal squares
    torch.testing.assert_close(tr.grad_norm[0].double(), want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("make", [lambda: rk.GRU(3, 4, bidirectional=True, backend="engine"),
                                  lambda: rk.LSTM(3, 4, 2, layer_norm=True),
                                  lambda: rk.MinGRU(3, 4, bidirectional=True),
                                  lambda: rk.MinLSTM(3, 4, bidirectional=True, scan="log")])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_nan_or_inf_in_padded_steps_changes_nothing(make, padding, path):
    """Padding is ignored whatever it holds (a series padded with NaN): the scans' factors of 0 let NaN
    through into h_n, the weight gradients and the reverse direction, until padded steps were zeroed."""
    torch.manual_seed(4)
    m = make().double()
    x, lengths = torch.randn(6, 2, 3, dtype=torch.float64), torch.tensor([6, 3])
    t = torch.arange(6)[:, None]
    real = (t < lengths if padding == "right" else t >= 6 - lengths)[..., None]
    results = []
    for fill in (0.0, float("nan"), float("inf")):
        xx = x.masked_fill(~real, fill).requires_grad_()
        out, state = m(xx, lengths=lengths, padding=padding)
        state = state if isinstance(state, tuple) else (state,)
        grads = torch.autograd.grad(out.sum() + sum(s.square().sum() for s in state), [xx, *m.parameters()])
        results.append((out, *state, *grads))
    for got in results[1:]:
        for a, b in zip(results[0], got):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
