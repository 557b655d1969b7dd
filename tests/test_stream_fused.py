"""rk.Stream's one-call LSTM and GRU steps (rnnkit/_fused/stream.cpp) against the torch-op steps they
replace (stream_kernels.LSTMKernel / GRUKernel without them): same outputs and states over many steps,
every batch size and layer count, with and without bias, float32 and float64; and the ops' refusal of
what they cannot take."""
import pytest
import torch

import rnnkit as rk
from rnnkit import _fused, stream_kernels

pytestmark = pytest.mark.skipif(not _fused.available(), reason="fused kernel not built")


def _run(layer, xs, fused: bool, monkeypatch):
    """The stream over xs with the one-call step or the torch-op step; asserts how often the op ran."""
    calls = []

    def step(window, name="stream_lstm"):
        def counted(*args):
            calls.append(name)
            return getattr(_fused.build(), name)(*args)
        return counted if fused else None

    with monkeypatch.context() as m:
        m.setattr(stream_kernels, "_fused_step", step)
        s = rk.Stream(layer, batch_size=xs.shape[1])
        ys = torch.stack([s(x) for x in xs])
    assert len(calls) == (xs.shape[0] * layer.num_layers if fused else 0)
    assert set(calls) <= {"stream_lstm" if isinstance(layer, rk.LSTM) else "stream_gru"}
    return ys, s.state


def _states(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("cls", [rk.LSTM, rk.GRU])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("B,L,H", [(1, 1, 32), (3, 2, 37), (5, 3, 256)])
def test_fused_step_equals_torch_ops(cls, dtype, tol, B, L, H, monkeypatch):
    torch.manual_seed(0)
    layer = cls(7, H, num_layers=L, bias=H != 37).to(dtype).eval()
    xs = torch.randn(40, B, 7, dtype=dtype) * 3                      # some gates saturate
    (y1, s1), (y2, s2) = _run(layer, xs, True, monkeypatch), _run(layer, xs, False, monkeypatch)
    for a, b in zip((y1, *_states(s1)), (y2, *_states(s2))):
        assert (a - b).abs().max().item() <= tol * (1 + b.abs().max().item())
    ref, _ = layer(xs)                                                # and the layer on the whole sequence
    assert (y1 - ref).abs().max().item() <= 10 * tol * (1 + ref.abs().max().item())


def _args(**change):
    """Good arguments of stream_lstm (B = 2, K = 10, H = 4), with some replaced."""
    args = {"window": torch.zeros(2, 10), "W": torch.zeros(10, 16), "b": torch.zeros(16), "P": torch.zeros(2, 16),
                "c": torch.zeros(2, 4), "h": torch.zeros(2, 4)}
    args.update(change)
    return tuple(args.values())


def test_stream_lstm_refuses_what_it_cannot_take():
    ops = _fused.build()
    ops.stream_lstm(*_args())                                          # the good ones run
    shape = "stream_lstm: expected"
    flat = torch.zeros(40)
    for change, match in [
        ({"window": torch.zeros(2, 9)}, shape),                       # window width != W's rows
        ({"window": torch.zeros(10, 2).t()}, shape),                  # columns not unit stride
        ({"W": torch.zeros(16, 10).t()}, shape),                      # W not contiguous
        ({"W": torch.zeros(10, 12)}, shape),                          # W's columns != 4H
        ({"b": torch.zeros(12)}, shape),                              # b's length
        ({"b": torch.zeros(4, 4)}, shape),                            # b not a vector
        ({"P": torch.zeros(2, 12)}, shape), ({"P": torch.zeros(3, 16)}, shape),
        ({"P": torch.zeros(16, 2).t()}, shape),
        ({"c": torch.zeros(3, 4)}, shape), ({"c": torch.zeros(2, 5)}, shape),
        ({"h": torch.zeros(3, 4)}, shape), ({"h": torch.zeros(4, 2).t()}, shape),
        ({"W": torch.zeros(10, 16, dtype=torch.float64)}, "one dtype"),
        ({"c": torch.zeros(2, 4, device="meta")}, "CPU tensors"),
        ({"W": torch.zeros(10, 16)._neg_view()}, "lazy negation"),
        ({"window": flat[:20].view(2, 10), "P": flat[8:40].view(2, 16)}, "single memory location"),   # P written over window
        ({"c": torch.zeros(2, 16)[:, :4], "P": torch.zeros(2, 16)}, None),  # apart: fine
    ]:
        args = _args(**change)
        if match is None:
            ops.stream_lstm(*args)
            continue
        with pytest.raises(RuntimeError, match=match):
            ops.stream_lstm(*args)
    window, W, b, P, _, h = _args()
    ops.stream_gru(window, W, b, P, h)                                 # the GRU step: the same checks, no c
    with pytest.raises(RuntimeError, match="stream_gru: expected .* h \\(B, H\\)"):
        ops.stream_gru(window, W, b, P, torch.zeros(3, 4))
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.stream_gru(window, W, b, P, P.view(-1)[:8].view(2, 4))
    half = [t.half() for t in _args()]
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.stream_lstm(*half)


@pytest.mark.parametrize("c0", [float("inf"), 1e38])
def test_saturated_forget_gate_times_a_huge_state_is_torchs(c0):
    """float32 sigmoid below -88.72 is 0 as torch's (1 / inf), not the ~4.5e-39 a clamped exp gives: a
    forget gate at pre-activation -100 times an infinite cell state is NaN (and times 1e38 is 0) in the
    stream's step, the engine's scan and torch.nn.LSTM alike."""
    layer = rk.LSTM(1, 1, backend="engine").eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.weight_ih_l0[1, 0] = 1.0                                  # forget-gate pre-activation = x
    ref = torch.nn.LSTM(1, 1)
    ref.load_state_dict(layer.state_dict())
    x = torch.tensor([[[-100.0]]])
    state = (torch.zeros(1, 1, 1), torch.full((1, 1, 1), c0))
    want = ref(x, state)[1][1]
    s = rk.Stream(layer, 1, state=state)
    s(x[0])
    assert s._kernels[0].fused is not None
    for got in (s.state[1], layer(x, state)[1][1]):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("cls,ref_cls", [(rk.GRU, torch.nn.GRU), (rk.LSTM, torch.nn.LSTM)])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan"), 1e38])
def test_non_finite_inputs_give_torch_nn_numbers(cls, ref_cls, bad, monkeypatch):
    """An infinite input (or a state gone infinite) gives torch.nn's outputs: the GRU's stacked product has
    zero blocks (x_n takes no h, h_n no x), and 0 * inf made NaN where torch.nn.GRU gives, for x = +inf,
    h = (-1, 0, 0) at H = 3; such steps multiply the column groups apart."""
    torch.manual_seed(0)
    for H, B in ((3, 1), (32, 2)):
        ref = ref_cls(4, H)
        layer = cls(4, H).eval()
        layer.load_state_dict(ref.state_dict())
        xs = torch.randn(6, B, 4)
        xs[2, 0, 0] = bad
        xs[4, -1, 3] = -bad
        with torch.no_grad():
            want, _ = ref(xs)
        got, _ = _run(layer, xs, True, monkeypatch)
        assert torch.equal(got.isnan(), want.isnan())
        assert (got.nan_to_num() - want.nan_to_num()).abs().max() <= 1e-5


def test_the_fused_steps_schemas_say_they_write_the_window():
    """h is a view into window: the schema puts them in one alias set, written (it said window was only
    read, which a compiler could act on)."""
    for name in ("stream_lstm", "stream_gru"):
        args = {a.name: a for a in getattr(torch.ops.rnnkit_fused, name).default._schema.arguments}
        assert args["window"].alias_info.is_write and args["h"].alias_info.is_write
        assert set(args["window"].alias_info.before_set) == set(args["h"].alias_info.before_set)
