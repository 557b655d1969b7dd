"""Streaming inference (rnnkit.stream): `step` and `Stream` fed one step at a time give the layer's own
output and final state, for every cell, stacked layers, given states and the extras; weights changed
between calls are picked up; bad use is refused with a clear message."""
import pytest
import torch
from helpers import KINDS, as_tuple, build
from torch import nn
from torch.autograd import gradcheck

import rnnkit as rk
from rnnkit.minimal import MinGRU, MinLSTM
from rnnkit.stream import Stream, step

D64 = torch.float64


def run_step(layer, x, state=None):
    """Feed x (T, B, I) to `step` one time step at a time. Returns (T, B, H) outputs, final state."""
    ys = []
    for t in range(x.shape[0]):
        y, state = step(layer, x[t], state)
        ys.append(y)
    return torch.stack(ys), state


def run_stream(stream, x):
    return torch.stack([stream(x[t]) for t in range(x.shape[0])])


def assert_states(a, b, tol):
    for s, r in zip(as_tuple(a), as_tuple(b)):
        assert (s - r).abs().max() < tol


def layer_of(kind, I, H, L, **kw):
    if kind in ("mingru", "minlstm"):
        return {"mingru": MinGRU, "minlstm": MinLSTM}[kind](I, H, L, **kw)
    return build(kind, rk, I, H, L, **kw)


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


def test_weights_changed_between_calls_are_used():
    layer = rk.LSTM(3, 4)
    x = torch.randn(4, 1, 3)
    stream = Stream(layer)
    stream(x[0])
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)           # an optimizer step: in place
    layer(torch.randn(3, 1, 3))[0].sum().backward()
    opt.step()
    stream.reset()
    assert (run_stream(stream, x) - layer(x)[0]).abs().max() < 1e-5
    layer.load_state_dict(nn.LSTM(3, 4).state_dict())           # new values copied in
    stream.reset()
    assert (run_stream(stream, x) - layer(x)[0]).abs().max() < 1e-5


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

def stream_matches_step(layer, stream, steps=4, B=1, state=None, dtype=torch.float32):
    """Feed `stream` and `step` the same inputs from `state`; the largest |difference| of the outputs."""
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(B, layer.input_size, dtype=dtype)
        with torch.no_grad():
            y, state = step(layer, x, state)
        worst = max(worst, (stream(x) - y).abs().max().item())
    return worst, state


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


@pytest.mark.parametrize("kind", KINDS)
def test_layer_moved_to_float64_between_calls(kind):
    layer = layer_of(kind, 3, 4, 2)
    s = Stream(layer)
    _, state = stream_matches_step(layer, s, 3)
    layer.to(D64)                                                # the stream's state moves along
    worst, _ = stream_matches_step(layer, s, 3, state=tuple(p.to(D64) for p in as_tuple(state))
                                   if kind == "lstm" else state.to(D64), dtype=D64)
    assert worst < 1e-6 and s.state[0].dtype == D64


def test_parametrized_and_data_written_weights_are_picked_up():
    layer = rk.GRU(3, 4, bias=False)
    torch.nn.utils.parametrizations.weight_norm(layer, "weight_ih_l0")
    s = Stream(layer)
    stream_matches_step(layer, s, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(torch.randn(5, 1, 3))[0].sum().backward()
    opt.step()                                                   # changes the parametrization's original
    s.reset()
    assert stream_matches_step(layer, s, 3)[0] < 1e-6
    plain = rk.LSTM(3, 4)
    s = Stream(plain)
    s(torch.randn(3))
    plain.weight_hh_l0.data.mul_(3)                              # no version bump: refresh() is the way
    s.refresh()
    s.reset()
    assert stream_matches_step(plain, s, 3)[0] < 1e-6


def test_unusual_layers(monkeypatch):
    with torch.inference_mode():                                 # parameters without version counters
        built = rk.LSTM(3, 4)
    s = Stream(built)
    assert stream_matches_step(built, s, 3)[0] < 1e-6
    builds = []
    monkeypatch.setattr(Stream, "_build",
                        lambda self, key, params, _b=Stream._build: builds.append(key) or _b(self, key, params))
    for _ in range(5):
        s(torch.randn(3))
    assert builds == []                                          # built once, not once per call (8x slower)
    with torch.inference_mode():
        built.weight_hh_l0.mul_(3)                               # no version counter: refresh() is the way
    s.refresh()
    s.reset()
    assert stream_matches_step(built, s, 3)[0] < 1e-6 and len(builds) == 1
    m = MinGRU(3, 4)
    m.bias_ih_l0 = None                                          # a parameter set to None
    s = Stream(m)
    assert stream_matches_step(m, s, 3)[0] < 1e-6


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


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
                                  lambda p: torch.optim.SGD(p, lr=0.1, fused=True),
                                  lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True)])
def test_fused_optimizer_steps_are_picked_up(make):
    """torch's fused optimizer steps write the parameters without counting a version: the stream counts
    optimizer steps too (it kept the old weights, off by ~0.1)."""
    layer = rk.LSTM(3, 4, 2).eval()
    s = Stream(layer)
    s(torch.randn(3))
    opt = make(layer.parameters())
    layer(torch.randn(5, 3))[0].sum().backward()
    opt.step()
    s.reset()
    assert stream_matches_step(layer, s, 3)[0] < 1e-6


@pytest.mark.parametrize("how", ["prune", "weight_norm", "spectral_norm"])
def test_hook_reparametrized_weights_are_picked_up(how):
    """prune and the hook-based weight_norm / spectral_norm compute the weight in a forward pre-hook:
    the stream and step run it (they read the weight a forward had left, from before the last step)."""
    import warnings

    from torch.nn.utils import prune
    torch.manual_seed(0)
    layer = rk.GRU(3, 4).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)            # torch.nn.utils.weight_norm is deprecated
        {"prune": lambda: prune.l1_unstructured(layer, "weight_hh_l0", amount=0.5),
         "weight_norm": lambda: torch.nn.utils.weight_norm(layer, "weight_hh_l0"),
         "spectral_norm": lambda: torch.nn.utils.spectral_norm(layer, "weight_hh_l0")}[how]()
    s = Stream(layer)
    x = torch.randn(6, 1, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer.train()
    layer(torch.randn(5, 1, 3))[0].sum().backward()
    opt.step()                                                    # changes weight_hh_l0_orig / _v / _g
    layer.eval()
    s.reset()
    ys = torch.stack([s(x[t]) for t in range(6)])
    steps, _ = run_step(layer, x)
    with torch.no_grad():
        ref, _ = layer(x)                                         # forward runs the hook itself
    assert (ys - ref).abs().max() < 1e-6 and (steps - ref).abs().max() < 1e-6
    if how == "prune":
        prune.l1_unstructured(layer, "weight_hh_l0", amount=0.5)   # a new mask: a buffer changed
        s.reset()
        ys = torch.stack([s(x[t]) for t in range(6)])
        with torch.no_grad():
            ref, _ = layer(x)
        assert (ys - ref).abs().max() < 1e-6


def test_state_reset_and_copies_follow_a_layer_moved_before_the_next_call():
    import copy
    import pickle
    layer = rk.LSTM(3, 4).eval()
    s = Stream(layer)
    s(torch.randn(3))
    layer.double()
    assert s.state[0].dtype == D64                                # no call since the move
    s.reset((torch.zeros(1, 1, 4, dtype=D64),) * 2)
    for twin in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert twin.state[0].dtype == D64
    gru = rk.GRU(3, 4, 2, dropout=0.3).eval()
    s = Stream(gru)
    s(torch.randn(3))
    gru.train()
    twin = pickle.loads(pickle.dumps(s))                          # saved in training mode: loads
    with pytest.raises(ValueError, match="call layer.eval"):      # and refuses to run until eval()
        twin(torch.randn(3))
    twin.layer.eval()
    assert twin(torch.randn(3)).shape == (4,)


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_a_new_parameter_at_the_old_ones_address_is_picked_up(kind):
    """A new Parameter with version 0 and the replaced one's storage address (the allocator reuses freed
    memory: 6 of 30 tries in a review) read as unchanged when the key was (version, address) alone."""
    layer = {"rnn": rk.RNN, "lstm": rk.LSTM, "gru": rk.GRU}[kind](3, 4).eval()
    old = nn.Parameter(torch.randn_like(layer.weight_hh_l0))
    layer.weight_hh_l0 = old
    s, x = Stream(layer), torch.randn(3)
    s(x)
    s.reset()
    old.data.copy_(torch.randn_like(old))                         # new values in the same memory, then
    layer.weight_hh_l0 = nn.Parameter(old.data)                   # a new Parameter over it: version 0
    assert layer.weight_hh_l0.data_ptr() == old.data_ptr() and layer.weight_hh_l0._version == old._version
    ys = torch.stack([s(x), s(x)])
    with torch.no_grad():
        want = layer(torch.stack([x, x]))[0]
    assert (ys - want).abs().max() < 1e-5


def test_threads_sharing_a_stream_do_not_leave_inference_mode_on():
    """One torch.inference_mode() object entered from two threads kept one guard: a thread stayed in
    inference mode after the call (every tensor it made then was an inference tensor)."""
    import sys
    import threading
    s = Stream(rk.GRU(3, 8).eval())
    leaked = []
    def reader():
        for _ in range(3000):
            s(torch.randn(3))
            _ = s.state
            if torch.is_inference_mode_enabled():
                leaked.append(threading.current_thread().name)
                return
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert leaked == [] and not torch.is_inference_mode_enabled()
