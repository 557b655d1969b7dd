"""Shared test helpers: module pairs with copied weights, and independent reference loops.

The reference loops are written here from torch.nn's cell classes or from the textbook equations,
never from rnnkit's code, so that a test against them is a test against an independent definition.
Shapes: T time, B batch, I input size, H hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit as rk

KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru")


def build(kind: str, lib, *args, **kw) -> nn.Module:
    """`lib.RNN/LSTM/GRU(*args, **kw)` for kind in KINDS; lib is torch.nn or rnnkit."""
    if kind.startswith("rnn"):
        return lib.RNN(*args, nonlinearity=kind[4:], **kw)
    return {"lstm": lib.LSTM, "gru": lib.GRU}[kind](*args, **kw)


def pair(kind: str, *args, backend: str = "auto", **kw):
    """(torch.nn module, rnnkit module) with the torch.nn weights loaded into rnnkit's."""
    ref = build(kind, nn, *args, **kw)
    mine = build(kind, rk, *args, backend=backend, **kw)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def num_states(kind: str) -> int:
    return 2 if kind == "lstm" else 1


def as_tuple(state) -> tuple:
    return tuple(state) if isinstance(state, tuple) else (state,)


def max_diff(a, b) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def assert_close(a, b, tol: float = 1e-5, what: str = "") -> None:
    d = max_diff(a, b)
    assert d <= tol, f"{what}: max |difference| {d:.3g} > {tol:g}"


def lengths_with_extremes(B: int, T: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B,) unsorted lengths in [1, T] holding at least one T and one 1 (B >= 3)."""
    rest = torch.randint(1, T + 1, (B - 2,), generator=gen)
    return torch.cat((torch.tensor([1, T]), rest))          # 1 before T: not in decreasing order


# -- one step of each cell, from the textbook equations (torch.nn's definitions) ---------------------

def cell_step(kind: str, xi, gh, state):
    """One step given xi = V x + b_ih and gh = U h + b_hh. state: (h,) or (h, c)."""
    H = state[0].shape[-1]
    if kind.startswith("rnn"):
        a = xi + gh
        return (torch.tanh(a) if kind == "rnn_tanh" else torch.relu(a),)
    if kind == "lstm":
        i, f, g, o = (xi + gh).split(H, -1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    xr, xz, xn = xi.split(H, -1)
    hr, hz, hn = gh.split(H, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return ((1 - z) * n + z * state[0],)


def gate_activations(kind: str, xi, gh, H: int):
    """Gate activations as the trace reports them: LSTM (i, f, g, o), GRU (r, z, n)."""
    if kind == "lstm":
        i, f, g, o = (xi + gh).split(H, -1)
        return torch.cat((i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()), -1)
    xr, xz, xn = xi.split(H, -1)
    hr, hz, hn = gh.split(H, -1)
    r = torch.sigmoid(xr + hr)
    return torch.cat((r, torch.sigmoid(xz + hz), torch.tanh(xn + r * hn)), -1)


def torch_cell(kind: str, module: nn.Module, layer: int, direction: int) -> nn.Module:
    """torch.nn.RNNCell/LSTMCell/GRUCell holding one layer/direction of `module`'s weights."""
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    I, H, bias = getattr(module, "weight_ih" + sfx).shape[1], module.hidden_size, module.bias
    if kind.startswith("rnn"):
        cell = nn.RNNCell(I, H, bias, nonlinearity=kind[4:])
    else:
        cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}[kind](I, H, bias)
    cell = cell.to(module.weight_ih_l0.dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ()):
            getattr(cell, name).copy_(getattr(module, name + sfx))
    return cell


def reference_run(kind, module, x, hx=None, truncate=None, keep=None, cells=None):
    """An independent multi-layer, bidirectional run of `module`'s weights with torch.nn cells.

    x: (T, B, I) time-major. hx: tuple of (L*D, B, H) or None. truncate: detach the state every k
    steps (in each direction's processing order). keep: list that receives, per k = layer*D + dir,
    the list (time order) of state tuples (h_t,) or (h_t, c_t), with retain_grad() on every h_t.
    cells: dict that receives the torch.nn cell used for each k (their parameter gradients are the
    reference's).
    Returns (out (T, B, D*H), tuple of final states (L*D, B, H)).
    """
    T, B = x.shape[:2]
    D, H, n = 2 if module.bidirectional else 1, module.hidden_size, num_states(kind)
    if hx is None:
        hx = tuple(x.new_zeros(module.num_layers * D, B, H) for _ in range(n))
    finals = []
    for layer in range(module.num_layers):
        outs = []
        for d in range(D):
            k, cell = layer * D + d, torch_cell(kind, module, layer, d)
            if cells is not None:
                cells[k] = cell
            state, hs, states = tuple(s[k] for s in hx), [None] * T, [None] * T
            steps = range(T - 1, -1, -1) if d else range(T)
            for i, t in enumerate(steps):
                if truncate and i and i % truncate == 0:
                    state = tuple(s.detach() for s in state)
                new = cell(x[t], state if n == 2 else state[0])
                state = as_tuple(new)
                if keep is not None and state[0].requires_grad:
                    state[0].retain_grad()
                hs[t], states[t] = state[0], state
            if keep is not None:
                keep.append(states)
            outs.append(torch.stack(hs))
            finals.append(state)
        x = torch.cat(outs, -1)
    return x, tuple(torch.stack([f[j] for f in finals]) for j in range(n))


def weighted_loss(out, state, gen_seed: int = 1):
    """A nontrivial scalar loss of the outputs and every final state, with fixed random weights."""
    g = torch.Generator().manual_seed(gen_seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    for s in as_tuple(state):
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    return loss


def layer_norm_reference(kind, module, x):
    """Single-layer, one-direction reference for layer_norm=True: LN on both pre-activations."""
    T, B = x.shape[:2]
    H, G = module.hidden_size, {"lstm": 4, "gru": 3}.get(kind, 1)
    p = dict(module.named_parameters())
    xi_all = F.layer_norm(x @ p["weight_ih_l0"].t() + p["bias_ih_l0"], (G * H,),
                          p["ln_ih_weight_l0"], p["ln_ih_bias_l0"])
    state = tuple(x.new_zeros(B, H) for _ in range(num_states(kind)))
    hs = []
    for t in range(T):
        gh = F.layer_norm(state[0] @ p["weight_hh_l0"].t() + p["bias_hh_l0"], (G * H,),
                          p["ln_hh_weight_l0"], p["ln_hh_bias_l0"])
        state = cell_step(kind, xi_all[t], gh, state)
        hs.append(state[0])
    return torch.stack(hs), state



def run_cli(capsys, *argv):
    """`rnnkit *argv` in process: (exit code, stdout, stderr); a traceback on stderr fails the test."""
    from rnnkit.cli import main
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


def tied_packs(T=4, dtype=torch.float32):
    """x (T, 3, 2), and PackedSequences of it whose rows of equal length (4, 4, 2) come in either order
    (a valid packing that torch.sort would not produce for the first)."""
    x, lengths = torch.randn(T, 3, 2, dtype=dtype), torch.tensor([4, 4, 2])
    packs = []
    for perm in (torch.tensor([1, 0, 2]), torch.tensor([0, 1, 2])):
        p = pack_padded_sequence(x[:, perm], lengths[perm])
        packs.append(PackedSequence(p.data, p.batch_sizes, perm, torch.argsort(perm)))
    return x, lengths, packs


def cli_sigterm_in(method: str, when: str, argv: list[str]):
    """Run `rnnkit argv` in a fresh interpreter whose Trainer.`method` sends the process a SIGTERM when
    the Python expression `when` (over `self`) holds, before doing its work; the CompletedProcess."""
    import subprocess
    import sys
    from pathlib import Path
    script = ("import os, signal, sys\n"
              "from rnnkit.train import trainer as t\n"
              f"original = t.Trainer.{method}\n"
              "def killed(self, *a):\n"
              f"    if {when}: os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return original(self, *a)\n"
              f"t.Trainer.{method} = killed\n"
              "from rnnkit.cli import main\n"
              f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], check=False)


# -- streaming (test_stream.py, test_stream_updates.py) -------------------------------------------------

def run_step(layer, x, state=None):
    """Feed x (T, B, I) to `step` one time step at a time. Returns (T, B, H) outputs, final state."""
    from rnnkit.stream import step
    ys = []
    for t in range(x.shape[0]):
        y, state = step(layer, x[t], state)
        ys.append(y)
    return torch.stack(ys), state


def run_stream(stream, x):
    """Feed x (T, B, I) to a Stream one time step at a time: (T, B, H)."""
    return torch.stack([stream(x[t]) for t in range(x.shape[0])])


def layer_of(kind, I, H, L, **kw):
    """An rnnkit layer of `kind`, the min-cells (mingru, minlstm) included."""
    if kind in ("mingru", "minlstm"):
        from rnnkit.minimal import MinGRU, MinLSTM
        return {"mingru": MinGRU, "minlstm": MinLSTM}[kind](I, H, L, **kw)
    return build(kind, rk, I, H, L, **kw)


def stream_matches_step(layer, stream, steps=4, B=1, state=None, dtype=torch.float32):
    """Feed `stream` and `step` the same inputs from `state`; the largest |difference| of the outputs."""
    from rnnkit.stream import step
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(B, layer.input_size, dtype=dtype)
        with torch.no_grad():
            y, state = step(layer, x, state)
        worst = max(worst, (stream(x) - y).abs().max().item())
    return worst, state
