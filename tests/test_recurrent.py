"""A user's own cell, written only as a forward `step`, runs in the engine, the layers and the trace."""
import torch
from torch.autograd import gradcheck

import rnnkit as rk


class CIFGCell:
    """Coupled input-forget LSTM: i = 1 - f. Gates f, g, o; no step_backward: derived by torch.func.vjp."""
    name = "cifg"
    num_gates = 3
    num_states = 2
    shared_preactivation = False

    def step(self, xi, gh, state, params=()):
        h_prev, c_prev = state
        f, g, o = (xi + gh).chunk(3, 1)
        f, g, o = torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c_prev + (1 - f) * g
        return (o * torch.tanh(c), c), None


def reference(layer, x):
    """Plain autograd loop over the same equations with the layer's weights, retaining every h_t."""
    V, U, b1, b2 = layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0
    h = c = torch.zeros(x.shape[1], layer.hidden_size, dtype=x.dtype)
    hs = []
    for t in range(x.shape[0]):
        (h, c), _ = CIFGCell().step(x[t] @ V.t() + b1, h @ U.t() + b2, (h, c))
        h.retain_grad()
        hs.append(h)
    return torch.stack(hs), hs


def test_user_cell_matches_autograd_reference_and_trace():
    layer = rk.Recurrent(CIFGCell(), 3, 5, dtype=torch.float64)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    with rk.trace(layer) as tr:
        out, (h, c) = layer(x)
        (out[-3:] ** 2).sum().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref, hs = reference(layer, x)
    (ref[-3:] ** 2).sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(got, layer.parameters()):
        torch.testing.assert_close(g, p.grad)
    norms = torch.stack([hh.grad.norm(dim=1) for hh in hs])      # (T, B)
    torch.testing.assert_close(tr.grad_norm[0], norms)
    assert tr.cell[0].shape == (7, 2, 5) and tr.gates[0] is None


def test_user_cell_gradcheck_bidirectional_with_lengths():
    layer = rk.Recurrent(CIFGCell(), 2, 3, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])
    params = list(layer.parameters())

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(
                [n for n, _ in layer.named_parameters()], ps))):
            out, (h, c) = layer(x, lengths=lengths)
        return out, h, c

    assert gradcheck(f, (x, *[p.detach().requires_grad_() for p in params]))


def test_user_cell_layer_errors_and_state_dict_names():
    layer = rk.Recurrent(CIFGCell(), 4, 6, bias=False)
    assert [n for n, _ in layer.named_parameters()] == ["weight_ih_l0", "weight_hh_l0"]
    assert layer.weight_ih_l0.shape == (18, 4)
    try:
        rk.Recurrent(object(), 4, 6)
    except TypeError as e:
        assert "lacks 'num_gates'" in str(e)
    else:
        raise AssertionError("a cell without the protocol must be refused")
