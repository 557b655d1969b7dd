"""rk.Stream's one-call LSTM step (rnnkit/_fused/stream.cpp) against the torch-op step it replaces
(stream_kernels.LSTMKernel without it): same outputs and states over many steps, every batch size and
layer count, float32 and float64; and the op's refusal of what it cannot take."""
import pytest
import torch

import rnnkit as rk
from rnnkit import _fused, stream_kernels

pytestmark = pytest.mark.skipif(not _fused.available(), reason="fused kernel not built")


def _run(layer, xs, fused: bool, monkeypatch):
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(stream_kernels, "_fused_step", lambda window: None)
        s = rk.Stream(layer, batch_size=xs.shape[1])
        assert (s._kernels[0].fused is not None) == fused
        ys = torch.stack([s(x) for x in xs])
        return ys, s.state


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-13)])
@pytest.mark.parametrize("B,L,H", [(1, 1, 32), (3, 2, 37), (5, 3, 256)])
def test_fused_lstm_step_equals_torch_ops(dtype, tol, B, L, H, monkeypatch):
    torch.manual_seed(0)
    layer = rk.LSTM(7, H, num_layers=L).to(dtype).eval()
    xs = torch.randn(40, B, 7, dtype=dtype) * 3                      # some gates saturate
    (y1, (h1, c1)), (y2, (h2, c2)) = _run(layer, xs, True, monkeypatch), _run(layer, xs, False, monkeypatch)
    for a, b in ((y1, y2), (h1, h2), (c1, c2)):
        assert (a - b).abs().max().item() <= tol * (1 + b.abs().max().item())
    ref, _ = layer(xs)                                                # and the layer on the whole sequence
    assert (y1 - ref).abs().max().item() <= 10 * tol * (1 + ref.abs().max().item())


def test_stream_lstm_refuses_what_it_cannot_take():
    ops = _fused.build()
    w, b = torch.zeros(10, 16), torch.zeros(16)
    P, c, h = torch.zeros(2, 16), torch.zeros(2, 4), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="stream_lstm: expected"):
        ops.stream_lstm(torch.zeros(2, 9), w, b, P, c, h)                # window width != W's rows
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.stream_lstm(torch.zeros(2, 10), w.double(), b, P, c, h)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.stream_lstm(torch.zeros(2, 10, dtype=torch.float16), w.half(), b.half(), P.half(), c.half(), h.half())
