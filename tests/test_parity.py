"""Parity with torch.nn: same outputs, final states and gradients, on the engine and the native path.

56 random configurations (fixed seed) x 3 backends, each run forward and backward through a loss
of the outputs and the final states, compared within 1e-5 in float32.
"""
import random

import pytest
import torch
from helpers import (
    KINDS,
    as_tuple,
    assert_close,
    build,
    lengths_with_extremes,
    pair,
    tied_packs,
    weighted_loss,
)
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

import rnnkit as rk

TOL = 1e-5
BACKENDS = ("engine", "native", "auto")


def _draw_configs(n: int = 56, seed: int = 2024) -> list[dict]:
    rng = random.Random(seed)
    return [dict(kind=KINDS[i % 4], layers=rng.randint(1, 3), bidirectional=rng.random() < 0.5,
                 batch_first=rng.random() < 0.5, lengths=rng.random() < 0.5, bias=rng.random() < 0.75,
                 hx=rng.random() < 0.5, T=rng.randint(3, 7), B=rng.randint(3, 4), I=rng.randint(2, 5),
                 H=rng.randint(3, 6)) for i in range(n)]


CONFIGS = _draw_configs()


def _cfg_id(c: dict) -> str:
    flags = [f for f in ("bidirectional", "batch_first", "lengths", "hx") if c[f]]
    return f"{c['kind']}-L{c['layers']}-T{c['T']}" + ("" if c["bias"] else "-nobias") + "".join(
        "-" + f[:5] for f in flags)


def _inputs(c: dict):
    T, B, LD = c["T"], c["B"], c["layers"] * (2 if c["bidirectional"] else 1)
    x = torch.randn((B, T, c["I"]) if c["batch_first"] else (T, B, c["I"]))
    n = 2 if c["kind"] == "lstm" else 1
    hx = tuple(torch.randn(LD, B, c["H"]) for _ in range(n)) if c["hx"] else None
    lengths = lengths_with_extremes(B, T) if c["lengths"] else None
    return x, hx, lengths


def _leaves(x, hx):
    x = x.clone().requires_grad_()
    hx = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
    return x, hx


def _as_arg(hx):
    return hx if hx is None or len(hx) == 2 else hx[0]


def _torch_forward(module, x, hx, lengths):
    if lengths is None:
        return module(x, _as_arg(hx))
    packed = pack_padded_sequence(x, lengths, module.batch_first, enforce_sorted=False)
    out, state = module(packed, _as_arg(hx))
    T = x.shape[1 if module.batch_first else 0]
    return pad_packed_sequence(out, module.batch_first, total_length=T)[0], state


def _assert_grads_equal(ref: nn.Module, mine: nn.Module) -> None:
    for name, p in ref.named_parameters():
        q = dict(mine.named_parameters())[name]
        assert p.grad is not None and q.grad is not None, name
        assert_close(q.grad, p.grad, TOL, f"grad of {name}")


def test_configurations_cover_every_factor():
    for key, values in [("kind", set(KINDS)), ("layers", {1, 2, 3})] + [
            (f, {True, False}) for f in ("bidirectional", "batch_first", "lengths", "bias", "hx")]:
        assert {c[key] for c in CONFIGS} == values, key
    assert len(CONFIGS) >= 50
    lens = lengths_with_extremes(4, 6)
    assert 1 in lens.tolist() and 6 in lens.tolist() and not bool((lens[:-1] >= lens[1:]).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", CONFIGS, ids=_cfg_id)
def test_forward_and_backward_match_torch_nn(c, backend):
    ref, mine = pair(c["kind"], c["I"], c["H"], num_layers=c["layers"], bias=c["bias"],
                     batch_first=c["batch_first"], bidirectional=c["bidirectional"], backend=backend)
    x, hx, lengths = _inputs(c)
    (xr, hr), (xm, hm) = _leaves(x, hx), _leaves(x, hx)
    out_r, st_r = _torch_forward(ref, xr, hr, lengths)
    out_m, st_m = mine(xm, _as_arg(hm), lengths=lengths)
    assert_close(out_m, out_r, TOL, "output")
    for a, b in zip(as_tuple(st_m), as_tuple(st_r), strict=True):
        assert_close(a, b, TOL, "final state")
    weighted_loss(out_r, st_r).backward()
    weighted_loss(out_m, st_m).backward()
    assert_close(xm.grad, xr.grad, TOL, "input grad")
    for a, b in zip(hm or (), hr or (), strict=True):
        assert_close(a.grad, b.grad, TOL, "hx grad")
    _assert_grads_equal(ref, mine)


@pytest.mark.parametrize("c", CONFIGS, ids=_cfg_id)
def test_torch_nn_loads_rnnkit_state_dict(c):
    torch.manual_seed(7)
    mine = build(c["kind"], rk, c["I"], c["H"], num_layers=c["layers"], bias=c["bias"],
                 batch_first=c["batch_first"], bidirectional=c["bidirectional"], backend="engine")
    ref = build(c["kind"], nn, c["I"], c["H"], num_layers=c["layers"], bias=c["bias"],
                batch_first=c["batch_first"], bidirectional=c["bidirectional"])
    assert list(mine.state_dict()) == list(ref.state_dict())
    assert ref.load_state_dict(mine.state_dict()) is not None        # strict: raises on mismatch
    for name, p in mine.named_parameters():
        assert torch.equal(p, dict(ref.named_parameters())[name]), name
    x, hx, lengths = _inputs(c)
    with torch.no_grad():
        out_m, st_m = mine(x, _as_arg(hx), lengths=lengths)
        out_r, st_r = _torch_forward(ref, x, hx, lengths)
    assert_close(out_m, out_r, TOL, "output")
    assert_close(as_tuple(st_m)[0], as_tuple(st_r)[0], TOL, "h_n")


def _packed_pair(kind, backend, enforce_sorted):
    ref, mine = pair(kind, 3, 4, num_layers=2, bidirectional=True, backend=backend)
    seqs = [torch.randn(n, 3) for n in ((5, 3, 1) if enforce_sorted else (3, 5, 1, 5))]
    packs = [pack_sequence([s.clone().requires_grad_() for s in seqs], enforce_sorted) for _ in range(2)]
    return ref, mine, packs


@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_sequence_in_packed_sequence_out(kind, backend, enforce_sorted, request):
    ref, mine, (p_ref, p_mine) = _packed_pair(kind, backend, enforce_sorted)
    out_r, st_r = ref(p_ref)
    out_m, st_m = mine(p_mine)
    assert isinstance(out_m, nn.utils.rnn.PackedSequence)
    assert torch.equal(out_m.batch_sizes, out_r.batch_sizes)
    assert_close(out_m.data, out_r.data, TOL, "packed data")
    for a, b in zip(as_tuple(st_m), as_tuple(st_r), strict=True):
        assert_close(a, b, TOL, "final state")
    weighted_loss(out_r.data, st_r).backward()
    weighted_loss(out_m.data, st_m).backward()
    _assert_grads_equal(ref, mine)
    for a, b in ((out_m.sorted_indices, out_r.sorted_indices), (out_m.unsorted_indices, out_r.unsorted_indices)):
        assert (a is None) == (b is None), f"indices {a} where torch.nn gives {b}"
        assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_packed_output_keeps_the_inputs_order_of_tied_lengths(kind, backend):
    """out.data's rows line up with the input's (was: the engine re-packed with torch.sort's order, so
    a loss over out.data against targets packed like the input differed: 128.1 against torch.nn's 144.6)."""
    ref, mine = pair(kind, 2, 3, num_layers=2, backend=backend)
    for packed in tied_packs()[2]:
        (out_r, st_r), (out_m, st_m) = ref(packed), mine(packed)
        assert torch.equal(out_m.sorted_indices, out_r.sorted_indices)
        assert torch.equal(out_m.unsorted_indices, out_r.unsorted_indices)
        assert_close(out_m.data, out_r.data, TOL, "packed data")
        for a, b in zip(as_tuple(st_m), as_tuple(st_r), strict=True):
            assert_close(a, b, TOL, "final state")


def test_packed_input_refuses_lengths_and_padding_beside_it():
    packed = tied_packs()[2][0]
    for kw in ({"lengths": torch.tensor([4, 4, 2])}, {"padding": "left"}):
        with pytest.raises(ValueError, match="PackedSequence carries its own lengths"):
            rk.GRU(2, 3)(packed, **kw)


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("backend", ("engine", "native"))
@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input_like_torch_nn(kind, backend, with_hx):
    ref, mine = pair(kind, 3, 5, num_layers=2, bidirectional=True, backend=backend)
    x = torch.randn(6, 3)
    hx = tuple(torch.randn(4, 5) for _ in range(2 if kind == "lstm" else 1)) if with_hx else None
    (xr, hr), (xm, hm) = _leaves(x, hx), _leaves(x, hx)
    out_r, st_r = ref(xr, _as_arg(hr))
    out_m, st_m = mine(xm, _as_arg(hm))
    assert out_m.shape == (6, 10)
    assert_close(out_m, out_r, TOL, "output")
    for a, b in zip(as_tuple(st_m), as_tuple(st_r), strict=True):
        assert a.shape == (4, 5)
        assert_close(a, b, TOL, "final state")
    weighted_loss(out_r, st_r).backward()
    weighted_loss(out_m, st_m).backward()
    assert_close(xm.grad, xr.grad, TOL, "input grad")
    _assert_grads_equal(ref, mine)


@pytest.mark.parametrize("backend", ("engine", "native"))
@pytest.mark.parametrize("kind", KINDS)
def test_dropout_between_layers_in_eval_equals_torch(kind, backend):
    ref, mine = pair(kind, 3, 4, num_layers=3, dropout=0.5, batch_first=True, backend=backend)
    ref.eval(), mine.eval()
    x = torch.randn(2, 5, 3)
    out_r, _ = ref(x)
    out_m, _ = mine(x)
    assert_close(out_m, out_r, TOL, "eval output")
    mine.train()
    assert float((mine(x)[0] - out_r).detach().abs().max()) > 1e-3       # in training the dropout is applied


def test_layers_are_torch_nn_layers():
    assert isinstance(rk.LSTM(3, 4), nn.LSTM)
    assert isinstance(rk.GRU(3, 4), nn.GRU)
    assert isinstance(rk.RNN(3, 4, nonlinearity="relu"), nn.RNN)
    assert rk.RNN(3, 4).nonlinearity == nn.RNN(3, 4).nonlinearity == "tanh"


@pytest.mark.parametrize("route", ["fused", "pure"])
@pytest.mark.parametrize("make", [lambda: rk.RNN(3, 8, backend="engine"), lambda: rk.GRU(3, 8, layer_norm=True),
                                  lambda: rk.LSTM(3, 8, backend="engine"), lambda: rk.MinGRU(3, 8)],
                         ids=["rnn", "gru_ln", "lstm", "mingru"])
def test_own_scans_compute_in_the_weights_dtype_under_autocast(make, route, monkeypatch):
    """Under CPU autocast the engine and the min layers run as without it, in float32, and take a
    bfloat16 input as a torch.nn layer does. Was: the pure route's RNN failed in backward (bfloat16 !=
    float) and the fused and pure routes computed in different precisions."""
    if route == "pure":
        monkeypatch.setenv("RNNKIT_NO_FUSED", "1")
    torch.manual_seed(0)
    m, x = make(), torch.randn(6, 2, 3)
    params = list(m.parameters())
    want = m(x)[0]
    g_want = torch.autograd.grad(want.pow(2).sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)[0]
        from_bf16 = m(x.bfloat16())[0]
    g_got = torch.autograd.grad(got.pow(2).sum(), params)
    assert got.dtype == from_bf16.dtype == torch.float32
    assert_close(got, want, 1e-6, "output")
    assert_close(from_bf16, m(x.bfloat16().float())[0], 1e-6, "output from bfloat16")
    for a, b in zip(g_got, g_want, strict=True):
        assert_close(a, b, 1e-6, "gradient")
