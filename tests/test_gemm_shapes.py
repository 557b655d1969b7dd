"""Shapes of the products the kernel hands to oneDNN (rnnkit/_fused/blas.h, kShapeBlockMin): oneDNN compiles
and keeps a kernel per shape, so a side that is T*B (changing with every batch of bucketed data) goes to it
in power-of-two blocks once a few exact shapes have been met, the tail under 64 to BLAS. The numbers must
not change, and a training run on ever-new sizes must not grow memory per size."""
import math

import pytest
import torch

import rnnkit as rk
from rnnkit import _fused

pytestmark = pytest.mark.skipif(not _fused.available(), reason="fused kernel not built")


@pytest.fixture
def ops():
    kernel = _fused.build()
    ops = torch.ops.rnnkit_fused
    kernel.limit_gemm_route("dnnl")
    if kernel.gemm_route() != "dnnl" or ops.dnnl_matmul_calls() < 0:
        kernel.limit_gemm_route("dnnl+ukernel")
        pytest.skip(f"this CPU's route is {kernel.gemm_route()}: no oneDNN products to cut")
    old = ops.set_exact_shapes(0)                                  # every new shape is cut
    yield ops
    ops.set_exact_shapes(old)
    kernel.limit_gemm_route("dnnl+ukernel")


def calls_and_error(ops, a, b, beta):
    """oneDNN calls one routed product took, and its error against float64."""
    out = torch.randn(a.shape[0], b.shape[1]) if beta else torch.full((a.shape[0], b.shape[1]), math.nan)
    want = (beta * out.double() if beta else 0) + a.double() @ b.double()
    start = ops.dnnl_matmul_calls()
    ops.routed_addmm_(out, a, b, beta)
    return ops.dnnl_matmul_calls() - start, ((out.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_a_new_shape_goes_in_power_of_two_blocks_with_the_same_numbers(ops, beta):
    torch.manual_seed(0)
    # rows: 357 = 256 + 64 + a tail of 37 on BLAS
    assert calls_and_error(ops, torch.randn(357, 300), torch.randn(300, 200), beta)[0] == 2
    # rows past the largest block: 2 x 16384 + 64 + 36
    calls, err = calls_and_error(ops, torch.randn(32868, 64), torch.randn(64, 72), beta)
    assert calls == 3 and err < 1e-5
    # a weight gradient's depth (T*B = 1000 = 512 + 256 + 128 + 64 + 40), its blocks summed into C
    calls, err = calls_and_error(ops, torch.randn(1000, 128).t(), torch.randn(1000, 96), beta)
    assert calls == 4 and err < 1e-5
    # the depth is not cut when C is large (each block would read and write it): one call
    assert calls_and_error(ops, torch.randn(300, 1100).t(), torch.randn(300, 1000), beta)[0] == 1
    for shape in ((357, 300, 200), (1000, 128, 96)):              # within float32's rounding
        a, b = torch.randn(shape[0], shape[1]), torch.randn(shape[1], shape[2])
        assert calls_and_error(ops, a, b, beta)[1] < 1e-5


def test_the_first_shapes_met_are_taken_whole(ops):
    """A run with fixed sizes meets a few shapes: those stay one call each (a block costs a call)."""
    torch.manual_seed(1)
    ops.set_exact_shapes(2)
    a, b = torch.randn(357, 300), torch.randn(300, 200)
    assert calls_and_error(ops, a, b, 0.0)[0] == 1
    assert calls_and_error(ops, torch.randn(1000, 128).t(), torch.randn(1000, 96), 1.0)[0] == 1
    assert calls_and_error(ops, torch.randn(358, 300), b, 0.0)[0] == 2     # a third shape: cut
    assert calls_and_error(ops, a, b, 1.0)[0] == 1                          # a shape met before: whole


def test_a_shape_in_steady_use_takes_the_place_of_one_long_unused(ops):
    """Held shapes are not held for good: a later run's shapes, met product after product, are taken whole
    in place of shapes not met for a while (shapes.cpp: kHotUses, kHotWindow, kStaleAfter); shapes met once
    each, as random batch sizes make, never are, nor one met again only after many other products, nor a
    shape while every held one is still in use."""
    torch.manual_seed(4)
    ops.set_exact_shapes(2)
    b = torch.randn(300, 200)
    first, second = torch.randn(357, 300), torch.randn(1000, 128).t()
    assert calls_and_error(ops, first, b, 0.0)[0] == 1
    assert calls_and_error(ops, second, torch.randn(1000, 96), 0.0)[0] == 1
    late = torch.randn(359, 300)
    assert [calls_and_error(ops, late, b, 0.0)[0] for _ in range(5)] == [2] * 5   # both held ones in use
    for rows in range(400, 700):                                   # new sizes, each met once: all cut
        assert calls_and_error(ops, torch.randn(rows, 300), b, 0.0)[0] == (rows >> 6).bit_count()
    assert calls_and_error(ops, first, b, 0.0)[0] == 1             # still held: nothing took its place
    steady = (torch.randn(128, 128), torch.randn(128, 64))        # rows 128: one block either way
    for _ in range(1100):                                          # the second shape goes stale; steady in
        ops.routed_addmm_(torch.empty(128, 64), *steady, 0.0)
    assert ops.exact_shapes_held() == 2
    sparse = torch.randn(361, 300)                                 # met again only after 600 other products
    for _ in range(5):
        assert calls_and_error(ops, sparse, b, 0.0)[0] == 2          # cut each time
        for _ in range(600):
            ops.routed_addmm_(torch.empty(128, 64), *steady, 0.0)
    assert [calls_and_error(ops, late, b, 0.0)[0] for _ in range(5)] == [2, 2, 2, 1, 1]   # in place of first
    assert calls_and_error(ops, second, torch.randn(1000, 96), 0.0)[0] == 4                # cut now
    assert calls_and_error(ops, late, b, 1.0)[1] < 1e-5


def test_shapes_taken_in_later_are_capped(ops):
    """However the workload looks, at most so many shapes are taken in after the first (each is a kernel
    oneDNN keeps): with a cap of 1, a second shape in steady use stays cut."""
    torch.manual_seed(5)
    ops.set_exact_shapes(1, 1)
    b, first = torch.randn(300, 200), torch.randn(357, 300)
    assert calls_and_error(ops, first, b, 0.0)[0] == 1
    a = torch.randn(128, 128)
    for rows in (359, 361):                                        # each in steady use, after the held went stale
        for n in range(64, 64 + 1100):                             # products met once each: none taken in
            ops.routed_addmm_(torch.empty(128, n), a, torch.randn(128, n), 0.0)
        calls = [calls_and_error(ops, torch.randn(rows, 300), b, 0.0)[0] for _ in range(6)]
        assert calls == ([2, 2, 2, 1, 1, 1] if rows == 359 else [2] * 6), (rows, calls)


def test_forget_shapes_starts_the_table_afresh(ops):
    torch.manual_seed(6)
    ops.set_exact_shapes(1, 0)
    b = torch.randn(300, 200)
    assert calls_and_error(ops, torch.randn(357, 300), b, 0.0)[0] == 1
    later = torch.randn(359, 300)
    assert calls_and_error(ops, later, b, 0.0)[0] == 2                  # the table is full: cut
    _fused.forget_shapes()
    assert calls_and_error(ops, later, b, 0.0)[0] == 1 and ops.exact_shapes_held() == 1


def test_training_on_ever_new_sizes_matches_the_engine_and_torch(ops):
    """The layer trained through cut products: torch.nn's numbers, batch after batch of new sizes."""
    torch.manual_seed(2)
    ref = torch.nn.LSTM(24, 40)
    layer = rk.LSTM(24, 40, backend="engine")
    layer.load_state_dict(ref.state_dict())
    for T, B in ((33, 41), (70, 19), (101, 23)):                   # T*B: 1353, 1330, 2323
        x = torch.randn(T, B, 24)
        for m in (ref, layer):
            m.zero_grad()
        (y_ref, _), (y, _) = ref(x), layer(x)
        (y_ref.square().sum()).backward()
        (y.square().sum()).backward()
        assert (y - y_ref).abs().max() < 1e-5
        for (name, p), q in zip(ref.named_parameters(), layer.parameters()):
            assert ((q.grad - p.grad).abs().max() / p.grad.abs().max()) < 1e-4, name


@pytest.mark.parametrize("exact", [64, 0])
def test_slices_of_wider_matrices_take_the_copy_path_with_the_same_numbers(ops, exact):
    """Operands that are views into wider matrices (features sliced out, a weight's columns) are not taken by
    oneDNN's matmul as they are; the copy path makes each slice dense (a strided one sent oneDNN to its
    reference kernel: a layer call of 10 ms took 4.7 s), whole or cut into blocks."""
    torch.manual_seed(3)
    ops.set_exact_shapes(exact)
    X, W, G = torch.randn(1000, 320), torch.randn(512, 320), torch.randn(1000, 700)
    for a, b in ((X[:, :300], W[:, :300].t()),                # A strided, B^T a view
                 (X[:, :300].contiguous(), W[:, :300].t()),   # B^T a view
                 (G[:, :512].t(), X[:, 7:307])):              # a weight gradient from slices
        for beta in (0.0, 1.0):
            assert calls_and_error(ops, a, b, beta)[1] < 1e-5
    want = X[:, :300].double() @ W[:, :300].double().t()
    got = ops.routed_linear(X[:, :300], W[:, :300])                # a weight view: at::mm, not oneDNN's
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
