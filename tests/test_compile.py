"""torch.compile of a model holding rnnkit layers: the engine's scan runs as one eager call inside the
compiled model (numerics.opaque_to_compile), with the same outputs and gradients as without compile."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import rnnkit as rk


class Forecaster(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(rnn.hidden_size, 1)

    def forward(self, x):
        return self.head(torch.relu(self.rnn(x)[0][-1]))


@pytest.mark.parametrize("make", [lambda: rk.LSTM(3, 8, layer_norm=True),
                                  lambda: rk.GRU(3, 8, num_layers=2, backend="engine"),
                                  lambda: rk.MinGRU(3, 8),
                                  lambda: rk.MinLSTM(3, 8, scan="log")], ids=["lstm_ln", "gru_engine", "mingru", "minlstm_log"])
def test_compiled_model_equals_eager(make):
    torch._dynamo.reset()
    model = Forecaster(make())
    x = torch.randn(12, 4, 3)
    compiled = torch.compile(model)
    grads = []
    for run in (compiled, model):
        model.zero_grad()
        out = run(x)
        out.pow(2).sum().backward()
        grads.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_importing_and_running_rnnkit_does_not_load_dynamo():
    """opaque_to_compile makes its torch.compiler.disable wrapper only under compile: importing
    torch._dynamo costs about a second, which every command line call would pay."""
    code = ("import sys, torch, rnnkit as rk; rk.GRU(2, 3, backend='engine')(torch.randn(4, 1, 2))[0].sum().backward();"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("scan", ["blocked", "log"])
def test_min_layer_compiles_without_dynamo_tracing_into_the_scan(scan):
    """The min cells' blocked scan is opaque to compile too (was: Dynamo warned that it cannot trace
    functorch's wrapped-tensor check inside it); the log scan is traced, with torch's logcumsumexp."""
    import warnings
    torch._dynamo.reset()
    layer = rk.MinGRU(3, 8, scan=scan)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(layer)(torch.randn(12, 4, 3))[0].sum().backward()
    assert not [w for w in caught if "Dynamo does not know" in str(w.message)]
