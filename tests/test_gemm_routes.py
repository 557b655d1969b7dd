"""The fused kernel's matrix-product routes (rnnkit/_fused/blas.cpp): oneDNN's products where they were
measured faster than torch's BLAS (MKL), MKL's packed GEMM, plain BLAS, ATen. Every route must give
torch.nn's numbers; which one runs by default depends on the CPU, so each is forced in turn."""
import pytest
import torch
from torch import nn

import rnnkit as rk
from rnnkit import _fused

pytestmark = pytest.mark.skipif(not _fused.available(), reason="fused kernel not built")


@pytest.fixture
def kernel():
    k = _fused.build()
    yield k
    k.limit_gemm_route("dnnl")                                  # the default: the best allowed


@pytest.mark.parametrize("route", ["dnnl", "packed", "blas", "aten"])
@pytest.mark.parametrize("cell,H", [("gru", 256), ("lstm", 128), ("rnn", 512)])
def test_every_route_gives_torch_nn_numbers(kernel, route, cell, H):
    kernel.limit_gemm_route(route)
    assert kernel.gemm_route() in ({"dnnl", "packed", "blas"} if route == "dnnl" else
                                   {"packed", "blas"} if route == "packed" else {route})
    torch.manual_seed(0)
    ref = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cell](H, H)
    mine = {"gru": rk.GRU, "lstm": rk.LSTM, "rnn": rk.RNN}[cell](H, H, backend="engine")
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(12, 64, H)                                  # 12 steps of 64 rows: the step products pack
    (y_ref, _), (y, _) = ref(x), mine(x)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    assert (y - y_ref).abs().max() < 1e-5
    for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
        err = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert err < 1e-5, (name, err)
