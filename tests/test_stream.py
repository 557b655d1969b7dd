"""Streaming inference (rnnkit.stream): `step` and `Stream` fed one step at a time give the layer's own
output and final state, for every cell, stacked layers, given states and the extras; weights changed
between calls are picked up; bad use is refused with a clear message."""
import pytest
import torch
from helpers import KINDS, as_tuple, build, layer_of, run_step, run_stream
from torch import nn
from torch.autograd import gradcheck

import rnnkit as rk
from rnnkit.minimal import MinGRU, MinLSTM
from rnnkit.stream import Stream, step

D64 = torch.float64


def assert_states(a, b, tol):
    for s, r in zip(as_tuple(a), as_tuple(b)):
        assert (s - r).abs().max() < tol


def initial(kind, L, B, H):
    g = torch.Generator().manual_seed(5)
    parts = tuple(torch.randn(L, B, H, generator=g) for _ in range(2 if kind == "lstm" else 1))
    return parts if kind == "lstm" else parts[0]


@pytest.mark.parametrize("kind", KINDS + ("mingru", "minlstm"))
@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("given", [False, True])
def test_step_and_stream_equal_layer(kind, L, given):
    T, B, I, H = 6, 3, 4, 5
    layer = layer_of(kind, I, H, L)
    x = torch.randn(T, B, I)
    state = initial(kind, L, B, H) if given else None
    out, final = layer(x, state)
    ys, st = run_step(layer, x, state)
    assert (ys - out).abs().max() < 1e-5
    assert_states(st, final, 1e-5)
    stream = Stream(layer, batch_size=B, state=state)
    assert (run_stream(stream, x) - out).abs().max() < 1e-5
    assert_states(stream.state, final, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_fast_path_is_exact(kind):
    """The stream's fused kernels against the layer in float64: the same function, to round-off."""
    layer = build(kind, rk, 3, 4, 2).to(D64)
    x = torch.randn(9, 2, 3, dtype=D64)
    out, final = layer(x)
    stream = Stream(layer, batch_size=2)
    assert (run_stream(stream, x) - out).abs().max() < 1e-13
    assert_states(stream.state, final, 1e-13)


@pytest.mark.parametrize("make", [
    lambda: rk.LSTM(3, 4, 2, layer_norm=True),
    lambda: rk.GRU(3, 4, 2, zoneout=0.3).eval(),
    lambda: rk.LSTM(3, 4, 2, zoneout=(0.2, 0.4), recurrent_dropout=0.3, dropout=0.5).eval(),
    lambda: rk.RNN(3, 4, 2, bias=False),
    lambda: rk.GRU(3, 4, 2, bias=False),
    lambda: rk.LSTM(3, 4, 1, bias=False),
], ids=["layer_norm", "zoneout", "all_dropouts_eval", "rnn_nobias", "gru_nobias", "lstm_nobias"])
def test_extras(make):
    layer = make()
    x = torch.randn(5, 2, 3)
    out, final = layer(x)
    assert (run_step(layer, x)[0] - out).abs().max() < 1e-5
    stream = Stream(layer, batch_size=2)
    assert (run_stream(stream, x) - out).abs().max() < 1e-5
    assert_states(stream.state, final, 1e-5)


def test_learned_initial_state_and_reset():
    layer = rk.GRU(3, 4, 2, learn_initial_state=True)
    with torch.no_grad():
        layer.initial_h.normal_()
    x = torch.randn(5, 1, 3)
    out, _ = layer(x)
    stream = Stream(layer)
    first = run_stream(stream, x)
    assert (first - out).abs().max() < 1e-5
    stream.reset()                                             # back to the learned initial state
    assert (run_stream(stream, x) - out).abs().max() < 1e-5
    given = torch.randn(2, 1, 4)
    stream.reset(given)
    assert (run_stream(stream, x) - layer(x, given)[0]).abs().max() < 1e-5


def test_unbatched_input():
    layer = rk.LSTM(3, 4, 2)
    x = torch.randn(5, 3)                                       # (T, I), one sequence
    out, (h, c) = layer(x)
    ys, (h1, c1) = run_step(layer, x)                           # x_t (I,), state (L, H)
    assert ys.shape == (5, 4) and h1.shape == (2, 4)
    assert (ys - out).abs().max() < 1e-5 and (c1 - c).abs().max() < 1e-5
    stream = Stream(layer)                                      # batch_size 1 takes (I,) too
    y = stream(x[0])
    assert y.shape == (4,) and (y - out[0]).abs().max() < 1e-5


def test_outputs_are_fresh_normal_tensors():
    stream = Stream(rk.GRU(3, 4))
    y1 = stream(torch.randn(1, 3))
    kept = y1.clone()
    stream(torch.randn(1, 3))
    assert torch.equal(y1, kept)                                # not a view of the stream's buffer
    head = nn.Linear(4, 1)
    head(y1).sum().backward()                                   # usable with autograd outside
    assert head.weight.grad is not None and not y1.is_inference()


def test_step_gradcheck():
    """`step` is plain differentiable torch code (for online learning): gradcheck in float64."""
    layer = rk.LSTM(2, 3, 2).to(D64)
    x = torch.randn(2, 2, dtype=D64, requires_grad=True)
    h = torch.randn(2, 2, 3, dtype=D64, requires_grad=True)
    c = torch.randn(2, 2, 3, dtype=D64, requires_grad=True)

    def f(x, h, c):
        y, (h1, c1) = step(layer, x, (h, c))
        return y, h1, c1
    assert gradcheck(f, (x, h, c))


@pytest.mark.parametrize("call,error,match", [
    (lambda: step(rk.GRU(3, 4, bidirectional=True), torch.randn(3)), ValueError, "bidirectional"),
    (lambda: Stream(MinGRU(3, 4, bidirectional=True)), ValueError, "bidirectional"),
    (lambda: step(rk.LSTM(3, 4, 2, dropout=0.5), torch.randn(3)), ValueError, "layer.eval"),
    (lambda: Stream(rk.GRU(3, 4, zoneout=0.1)), ValueError, "training mode"),
    (lambda: step(nn.LSTM(3, 4), torch.randn(3)), TypeError,
     r"got torch\.nn\.modules\.rnn\.LSTM; build the rnnkit layer of the same name .* load_state_dict"),
    (lambda: Stream(nn.Linear(3, 4)), TypeError, r"layer, got torch\.nn\.modules\.linear\.Linear$"),
    (lambda: step(rk.GRU(3, 4), torch.randn(2, 5)), ValueError, r"\(batch, 3\)"),
    (lambda: step(rk.LSTM(3, 4), torch.randn(2, 3), torch.zeros(1, 2, 4)), ValueError, r"tuple \(h, c\)"),
    (lambda: step(rk.GRU(3, 4, 2), torch.randn(2, 3), torch.zeros(1, 2, 4)), ValueError, r"\(2, 2, 4\)"),
    (lambda: Stream(rk.GRU(3, 4), batch_size=2)(torch.randn(3)), ValueError, r"\(2, 3\)"),
    (lambda: Stream(rk.GRU(3, 4), batch_size=0), ValueError, "batch_size"),
])
def test_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_min_layers_have_a_step_method():
    layer = MinLSTM(3, 4, 2)
    x = torch.randn(5, 2, 3)
    out, h_n = layer(x)
    state, ys = None, []
    for t in range(5):
        y, state = layer.step(x[t], state)
        ys.append(y)
    assert (torch.stack(ys) - out).abs().max() < 1e-5 and (state - h_n).abs().max() < 1e-5


# -- the stream against changes a user makes between calls, and copies -----------------------------------

def test_wrong_dtypes_are_refused_with_a_message():
    layer = rk.GRU(3, 4)
    s = Stream(layer)
    with pytest.raises(TypeError, match=r"x_t has dtype torch\.float64 but the layer's weights have torch\.float32"):
        s(torch.randn(3, dtype=D64))
    with pytest.raises(TypeError, match=r"x_t has dtype torch\.int64"):
        s(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        s([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match=r"initial state h has dtype torch\.float64"):
        s.reset(torch.zeros(1, 1, 4, dtype=D64))
    with pytest.raises(TypeError, match=r"initial state h has dtype torch\.float64"):
        step(layer, torch.randn(2, 3), torch.zeros(1, 2, 4, dtype=D64))


@pytest.mark.parametrize("make", [lambda: rk.RNN(3, 8, 2), lambda: rk.LSTM(3, 8, proj_size=4),
                                  lambda: rk.GRU(3, 8, 2, layer_norm=True), lambda: MinGRU(3, 8, 2)])
def test_under_autocast_step_and_stream_compute_in_the_weights_dtype(make):
    """As the layer's engine does under autocast: the weights' dtype, so `step`'s state feeds back (it came
    out bfloat16 and was refused on the next call) and the stream's generic path is not bfloat16."""
    torch.manual_seed(3)
    layer = make()
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        ref, _ = layer(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        s, state, ys = Stream(layer, 2), None, []
        for t in range(5):
            y, state = step(layer, x[t], state)
            assert y.dtype == torch.float32 and all(p.dtype == torch.float32 for p in as_tuple(state))
            ys.append(y)
        streamed = run_stream(s, x)
    assert (torch.stack(ys) - ref).abs().max() < 1e-5
    assert (streamed - ref).abs().max() < 1e-5


def test_training_mode_switched_on_after_building_is_refused():
    layer = rk.GRU(3, 4, zoneout=0.3).eval()
    s = Stream(layer)
    s(torch.randn(3))
    layer.train()
    with pytest.raises(ValueError, match="training mode with zoneout"):
        s(torch.randn(3))


@pytest.mark.parametrize("copy_how", ["pickle", "deepcopy", "torch.save"])
def test_a_copied_stream_goes_on_from_the_same_state(copy_how, tmp_path):
    import copy
    import pickle
    layer = rk.LSTM(3, 4, 2)
    s = Stream(layer, batch_size=2)
    for _ in range(3):
        s(torch.randn(2, 3))
    if copy_how == "pickle":
        twin = pickle.loads(pickle.dumps(s))
    elif copy_how == "deepcopy":
        twin = copy.deepcopy(s)
    else:
        torch.save(s, tmp_path / "s.pt")
        twin = torch.load(tmp_path / "s.pt", weights_only=False)
    for _ in range(3):
        x = torch.randn(2, 3)
        assert torch.equal(twin(x), s(x))
    assert twin.layer is not layer and repr(twin).startswith("Stream(LSTM(3, 4")


def test_reset_takes_an_unbatched_state_and_batch_size_any_int():
    import numpy as np
    layer = rk.LSTM(3, 4, 2)
    h, c = torch.randn(2, 4), torch.randn(2, 4)
    s = Stream(layer, batch_size=np.int64(1))
    s.reset((h, c))
    x = torch.randn(3)
    y, _ = step(layer, x, (h, c))
    assert (s(x) - y).abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"must have shape \(2, 4\) \(num_layers, hidden_size\)"):
        step(layer, x, (h[:1], c))
    with pytest.raises(TypeError, match="rk.LSTM takes proj_size=2 too"):
        Stream(nn.LSTM(3, 4, proj_size=2))

