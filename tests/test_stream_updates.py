"""Streaming inference (rnnkit.stream) while what the stream is built from changes between its calls: weights
written in place, by optimizers fused or not, through `.data` or hooks, a new Parameter (even at the old one's
address), the layer moved to another dtype, inference-tensor weights, and threads sharing one stream. The
stream rebuilds on the next call and gives `step`'s and the layer's numbers."""
import pytest
import torch
from helpers import KINDS, as_tuple, layer_of, run_step, run_stream, stream_matches_step
from torch import nn

import rnnkit as rk
from rnnkit.minimal import MinGRU
from rnnkit.stream import Stream

D64 = torch.float64


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
                        lambda self, _b=Stream._build: builds.append(1) or _b(self))
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


def test_a_parametrization_buffer_written_or_replaced_is_picked_up():
    """A parametrize module with a buffer (a mask): writing or replacing the buffer changes the weight."""
    from torch.nn.utils import parametrize

    class Mask(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.register_buffer("mask", torch.ones(shape))

        def forward(self, w):
            return w * self.mask

    torch.manual_seed(1)
    layer = rk.GRU(3, 4)
    parametrize.register_parametrization(layer, "weight_hh_l0", Mask(layer.weight_hh_l0.shape))
    x = torch.randn(4, 1, 3)
    s = Stream(layer)
    s(x[0])
    mask = layer.parametrizations.weight_hh_l0[0]
    for change in (lambda: mask.mask.bernoulli_(0.5), lambda: setattr(mask, "mask", torch.zeros(12, 4))):
        with torch.no_grad():
            change()
        s.reset()
        with torch.no_grad():
            ref, _ = layer(x)
        assert (run_stream(s, x) - ref).abs().max() < 1e-6          # was 0.18 off: the old weight kept


def test_training_mode_spectral_norm_iterates_once_a_build_and_a_pruned_layer_follows_a_move():
    """The hooks write the layer: spectral_norm's power iteration its u and v (training mode), every hook
    the weight it computes. The stream keys its weights after running them (keyed before, it rebuilt and
    iterated at every call: a new weight each step); the weights they leave follow layer.to(float64)."""
    import copy
    import warnings

    from torch.nn.utils import prune
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layer = torch.nn.utils.spectral_norm(rk.GRU(3, 4), "weight_hh_l0")        # left in training mode
    x = torch.randn(6, 1, 3)
    with torch.no_grad():
        ref, _ = copy.deepcopy(layer)(x)                              # one power iteration for the sequence
    s = Stream(layer)
    u = layer.weight_hh_l0_u.clone()
    ys = run_stream(s, x)
    assert torch.equal(layer.weight_hh_l0_u, u) and (ys - ref).abs().max() < 1e-6
    pruned = rk.GRU(3, 4)
    prune.l1_unstructured(pruned, "weight_hh_l0", 0.5)
    s = Stream(pruned)
    # a weight_ih pruned, the layer moved to float64 with no forward between: the stream follows
    prune.l1_unstructured(pruned, "weight_ih_l0", 0.3)
    s(x[0])
    pruned.double()
    s.reset()
    with torch.no_grad():
        ref, _ = pruned(x.double())
    assert (run_stream(s, x.double()) - ref).abs().max() < 1e-12


def test_hooks_leave_weights_a_deepcopy_takes():
    """The hooks run as under a no_grad forward: the pruned weight left on the layer is a leaf, in every mode
    the stream is built and called in (deepcopy takes only leaves: running them with grad broke it), and a
    mask made under inference_mode, which cannot enter a graph, streams."""
    import copy

    from torch.nn.utils import prune
    torch.manual_seed(5)
    x = torch.randn(4, 1, 3)
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        layer = rk.GRU(3, 4)
        prune.l1_unstructured(layer, "weight_hh_l0", 0.5)
        with mode():
            s = Stream(layer)
            s(x[0])
        assert layer.weight_hh_l0.grad_fn is None
        twin = copy.deepcopy(s)
        assert torch.equal(twin(x[1]), s(x[1]))
    other = rk.GRU(3, 4)
    with torch.inference_mode():
        prune.l1_unstructured(other, "weight_hh_l0", 0.5)
    s = Stream(other)
    with torch.no_grad():
        ref, _ = other(x)
    assert (run_stream(s, x) - ref).abs().max() < 1e-6


def test_chained_hooks_reach_the_stream():
    """weight_norm of U with its v pruned: torch runs the weight_norm hook first, so forward lags the mask by
    one call; the stream, which had put each hook's old weight back after a build, never caught up."""
    import warnings

    from torch.nn.utils import prune
    torch.manual_seed(3)
    x = torch.randn(6, 1, 3)
    layer = rk.LSTM(3, 5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(layer, "weight_hh_l0")
    prune.l1_unstructured(layer, "weight_hh_l0_v", 0.2)
    s = Stream(layer)
    s(x[0])
    with torch.no_grad():
        layer.weight_hh_l0_v_mask[:, :2] = 0
    s(x[0])                                                           # a rebuild (forward lags here too)
    with torch.no_grad():
        layer.weight_hh_l0_g.mul_(1.0)                                # a second rebuild
    s.reset()
    ys = run_stream(s, x)
    with torch.no_grad():
        layer(x)
        ref, _ = layer(x)                                             # two forwards: the lag is over
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
