"""The fused kernel's matrix-product routes (rnnkit/_fused/blas.cpp): oneDNN's products where they were
measured faster than torch's BLAS (MKL), MKL's packed GEMM, plain BLAS, ATen. Every route must give
torch.nn's numbers; which one runs by default depends on the CPU, so each is forced in turn."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rnnkit as rk
from rnnkit import _fused

pytestmark = pytest.mark.skipif(not _fused.available(), reason="fused kernel not built")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel():
    k = _fused.build()
    yield k
    k.limit_gemm_route("dnnl+ukernel")                          # the default: the best allowed


@pytest.mark.parametrize("route", ["dnnl+ukernel", "dnnl", "packed", "blas", "aten"])
@pytest.mark.parametrize("cell,H", [("gru", 256), ("lstm", 128), ("rnn", 512)])
def test_every_route_gives_torch_nn_numbers(kernel, route, cell, H):
    kernel.limit_gemm_route(route)
    assert kernel.gemm_route() in ({"dnnl+ukernel", "dnnl", "packed", "blas"} if route == "dnnl+ukernel" else
                                   {"dnnl", "packed", "blas"} if route == "dnnl" else
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


@pytest.mark.parametrize("route", ["dnnl", "packed", "aten"])
def test_routed_products_take_any_layout(kernel, route):
    """pooled_mm / routed_mm (the input projection, its input's and its weights' gradients) hand float
    matrices to the kernel's route by their strides: row-major, transposed views, a leading dimension
    wider than the rows, single rows and columns; anything else goes through at::mm."""
    kernel.limit_gemm_route(route)
    ops = torch.ops.rnnkit_fused
    torch.manual_seed(0)
    big = torch.randn(700, 600)
    wide = torch.randn(5003, 600)
    cases = [(torch.randn(300, 200), torch.randn(200, 400)),          # row-major
             (torch.randn(200, 300).t(), torch.randn(400, 200).t()),  # both transposed
             (big[:300, :200], big[:200, 100:500]),                   # leading dimension 600
             (big[:300, :200].t(), torch.randn(300, 1)),              # one column
             (torch.randn(1, 200), torch.randn(200, 300)),            # one row
             (big[::2, ::3][:200, :100], torch.randn(100, 150)),      # neither layout: at::mm
             (torch.randn(6400, 256).t(), torch.randn(6400, 256)),    # a weight gradient's shape
             # large enough for oneDNN: both operands copied transposed, in slices of k with a shorter
             # last slice, sides not multiples of the transpose's 16 x 16 tiles, leading dimension 600
             (wide[:, :130].t(), wide[:, 300:500]),
             (torch.randn(300, 2000), wide[:2000, 10:140])]           # only b copied
    for a, b in cases:
        want = a.double() @ b.double()
        for got in (ops.pooled_mm(a, b), ops.routed_mm(a, b)):
            assert got.shape == want.shape
            assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("route", ["dnnl", "packed", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_routed_linear_and_addmm(kernel, route, dtype):
    """The parallel-scan cells' products: routed_linear (x W^T; oneDNN's output itself where routed) and
    routed_addmm_ (out = a b + beta out in place, beta 1 accumulating the weight gradient over blocks,
    beta 0 writing the input gradient into a block of a larger tensor), against float64 products."""
    kernel.limit_gemm_route(route)
    ops = torch.ops.rnnkit_fused
    torch.manual_seed(0)
    for rows, I, N in [(680, 16, 768), (40, 3, 10), (512, 256, 512)]:
        x, w = torch.randn(rows, I, dtype=dtype), torch.randn(N, I, dtype=dtype)
        got = ops.routed_linear(x, w)
        want = x.double() @ w.double().t()
        assert got.shape == want.shape and got.dtype == dtype
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
        dP = torch.randn(rows, N, dtype=dtype)
        dW = torch.randn(N, I, dtype=dtype)
        want = dW.double() + dP.double().t() @ x.double()
        assert ops.routed_addmm_(dW, dP.t(), x, 1.0) is dW                # in place
        assert ((dW.double() - want).abs().max() / want.abs().max()).item() < 1e-5
        dx = torch.full((rows + 6, I), 7.0, dtype=dtype)
        ops.routed_addmm_(dx[3:rows + 3], dP, w, 0.0)                     # a block of a larger tensor
        want = dP.double() @ w.double()
        assert ((dx[3:rows + 3].double() - want).abs().max() / want.abs().max()).item() < 1e-5
        assert (dx[:3] == 7).all() and (dx[rows + 3:] == 7).all()
    with pytest.raises(RuntimeError, match="routed_addmm_: expected"):
        ops.routed_addmm_(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(6, 4), 1.0)
    with pytest.raises(RuntimeError, match="routed_linear: expected"):
        ops.routed_linear(torch.zeros(3, 4), torch.zeros(5, 6))


@pytest.mark.parametrize("route", ["dnnl", "packed"])
def test_dense_products_go_to_onednn_matmul_without_copies(kernel, route):
    """On the oneDNN route a product whose operands are dense or the transpose of dense goes to ATen's
    oneDNN matmul (no copy, beta summed in place): a weight gradient (T*B the long side), a 16-wide
    min-cell product accumulated with beta 1; a strided operand (leading dimension wider than its
    rows), a side of 1 and a small product do not. Off the oneDNN route none does. The table of whole shapes
    starts afresh: filled by the tests run before in this process, a new shape would go in blocks, a call each."""
    _fused.forget_shapes()
    kernel.limit_gemm_route(route)
    ops = torch.ops.rnnkit_fused
    start = ops.dnnl_matmul_calls()
    if route == "dnnl" and (kernel.gemm_route() != "dnnl" or start < 0):
        pytest.skip(f"this CPU's route is {kernel.gemm_route()}; oneDNN matmul path: {start}")
    torch.manual_seed(0)
    wide = torch.randn(3000, 600)

    def product(a, b, beta):
        out = torch.randn(a.shape[0], b.shape[1]) if beta else torch.full((a.shape[0], b.shape[1]), math.nan)
        want = (beta * out.double() if beta else 0) + a.double() @ b.double()   # beta 0: C is not read
        ops.routed_addmm_(out, a, b, beta)
        assert ((out.double() - want).abs().max() / want.abs().max()).item() < 1e-5
        return ops.dnnl_matmul_calls()

    taken = [product(torch.randn(3000, 512).t(), torch.randn(3000, 128), 0.0),    # dW: a transposed
             product(torch.randn(680, 768).t(), torch.randn(680, 16), 1.0),       # min-cell dW, summed
             product(torch.randn(680, 768), torch.randn(16, 768).t(), 0.0),       # b transposed
             product(torch.randn(680, 768).t(), torch.randn(680, 2), 1.0),        # narrow output, I = 2
             product(torch.randn(680, 2), torch.randn(768, 2).t(), 0.0)]          # thin inner dimension
    left = [product(wide[:, :512].t(), wide[:, 512:], 0.0),                       # leading dimension 600
            product(torch.randn(3000, 512).t(), torch.randn(3000, 1), 0.0),       # a column
            product(torch.randn(64, 64), torch.randn(64, 64), 1.0),               # 64^3: too small
            product(torch.randn(2048, 2), torch.randn(2, 128), 0.0)]              # thin, output too small
    if route == "dnnl":
        assert taken == [start + i for i in range(1, 6)] and left == [start + 5] * 4
    else:
        assert taken + left == [start] * 9


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")      # torch's flags() itself
def test_switching_torchs_onednn_off_keeps_the_kernel_off_it_too(kernel):
    """torch.backends.mkldnn.flags(enabled=False) turns torch's own oneDNN use off; the kernel's products
    follow it (the route reads packed or blas while it holds), with the same numbers."""
    ops = torch.ops.rnnkit_fused
    a, b = torch.randn(3000, 512).t(), torch.randn(3000, 128)
    default = kernel.gemm_route()
    with torch.backends.mkldnn.flags(enabled=False):
        assert kernel.gemm_route() in {"packed", "blas", "aten"}
        start = ops.dnnl_matmul_calls()
        off = ops.routed_mm(a, b)
        assert ops.dnnl_matmul_calls() == start
    assert kernel.gemm_route() == default
    assert torch.allclose(off, ops.routed_mm(a, b), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("route", ["dnnl", "packed"])
def test_routed_ops_and_autograd(kernel, route):
    """routed_linear follows autograd where a gradient is wanted (oneDNN's op has no backward, so it
    takes at::mm then); routed_addmm_ tells autograd it wrote `out` (its version moves) and refuses a
    tensor that requires grad; a weight whose rows overlap is multiplied, not refused."""
    kernel.limit_gemm_route(route)
    ops = torch.ops.rnnkit_fused
    torch.manual_seed(0)
    x = torch.randn(1000, 64, requires_grad=True)
    w = torch.randn(512, 64, requires_grad=True)
    ops.routed_linear(x, w).square().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (x2 @ w2.t()).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-3)
    assert torch.allclose(w.grad, w2.grad, rtol=1e-4, atol=1e-3)
    overlapping = torch.randn(600).as_strided((512, 64), (1, 1))
    assert torch.allclose(ops.routed_linear(x.detach(), overlapping), x.detach() @ overlapping.t(), atol=1e-3)
    out = torch.zeros(300, 700)
    before = out._version
    ops.routed_addmm_(out, torch.randn(300, 1000), torch.randn(1000, 700), 1.0)
    assert out._version > before
    with pytest.raises(RuntimeError, match="requires grad"):
        ops.routed_addmm_(torch.zeros(300, 700, requires_grad=True), torch.randn(300, 1000),
                          torch.randn(1000, 700), 1.0)


def test_route_measurement_leaves_the_global_random_stream_alone():
    """The once-per-process timing of the two routes fills its matrices from its own generator: a run
    seeded before the kernel's first product draws the same numbers as one where it had already run."""
    code = ("import torch; from rnnkit import _fused; ops = _fused.build(); "
            "torch.manual_seed(123); ops.gemm_route(); print(torch.randn(3).tolist())")
    env = {**os.environ, "RNNKIT_GEMM_ROUTE": ""}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    torch.manual_seed(123)
    assert first.stdout.strip() == str(torch.randn(3).tolist())


def test_route_is_recorded_and_a_change_on_resume_warned(kernel, tmp_path, monkeypatch):
    """Routes round differently in the last bits: a checkpoint records the route its products took, a
    resume in a process on another route warns (exact resume is bitwise only on the same route), and
    RNNKIT_GEMM_ROUTE pins it."""
    from rnnkit._fused import route
    from rnnkit.train import TensorBatches, TrainConfig, Trainer, load_checkpoint

    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn = rk.GRU(4, 8, backend="engine")
    x = torch.randn(16, 12, 4)

    def loss(m, batch):
        return m.rnn(batch[0])[0].square().mean()

    kernel.limit_gemm_route("packed")
    Trainer(model, TrainConfig(epochs=1, batch_size=4, out=str(tmp_path), progress=False), loss).fit(
        TensorBatches(x, batch_size=4))
    assert load_checkpoint(tmp_path).manifest["gemm_route"] == route.current() == "packed"
    kernel.limit_gemm_route("aten")
    with pytest.warns(UserWarning, match=r"route 'packed', this process on 'aten'.*RNNKIT_GEMM_ROUTE=packed"):
        Trainer(model, TrainConfig(epochs=2, batch_size=4, out=str(tmp_path), progress=False), loss).fit(
            TensorBatches(x, batch_size=4), resume=True)
    monkeypatch.setenv("RNNKIT_GEMM_ROUTE", "blas")
    route.apply_env(kernel)
    assert kernel.gemm_route() == "blas"
    monkeypatch.setenv("RNNKIT_GEMM_ROUTE", "fast")
    with pytest.warns(UserWarning, match="not one of dnnl\\+ukernel, dnnl, packed, blas, aten"):
        route.apply_env(kernel)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_small_step_products_take_onednns_micro_kernel_on_its_route(kernel, cell):
    """On the oneDNN route a step product whose U is small (blas.h: kUkernelMaxWeight) runs on oneDNN's
    brgemm micro-kernel, one set-up per lane and scan, with torch.nn's numbers (forward and every gradient);
    a large U keeps the packed weight, and off the oneDNN route no product takes it."""
    ops = torch.ops.rnnkit_fused
    if kernel.gemm_route() != "dnnl+ukernel" or ops.ukernel_products() < 0:
        pytest.skip(f"route {kernel.gemm_route()}, micro-kernel {ops.ukernel_products()}")
    make = {"rnn": (rk.RNN, nn.RNN), "lstm": (rk.LSTM, nn.LSTM), "gru": (rk.GRU, nn.GRU)}[cell]

    def step(H, B, route):
        kernel.limit_gemm_route(route)
        torch.manual_seed(0)
        ref = make[1](H, H)
        layer = make[0](H, H, backend="engine")
        layer.load_state_dict(ref.state_dict(), strict=False)
        x = torch.randn(30, B, H, requires_grad=True)
        before = ops.ukernel_products()
        out, _ = layer(x)
        (out * torch.linspace(-1, 1, H)).sum().backward()
        taken = ops.ukernel_products() - before
        want, _ = ref(x.detach())
        grads = [x.grad, *(p.grad for p in layer.parameters())]
        return taken, out.detach(), want.detach(), grads

    taken, out, want, grads = step(32, 6, "dnnl+ukernel")
    assert taken > 0 and (out - want).abs().max() < 1e-5                 # forward and backward, every lane
    packed = step(32, 6, "packed")
    assert packed[0] == 0 and step(32, 6, "dnnl")[0] == 0                # "dnnl": the numbers before it
    for g, h in zip(grads, packed[3]):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-5)
    assert step(512, 64, "dnnl+ukernel")[0] == 0                          # U of 512 x 512 and more: packed


def test_few_row_products_and_the_stream_step_take_the_micro_kernel(kernel):
    """A general product with a few rows by a small right operand, not transposed, beta 0 or 1, runs on the
    micro-kernel on the oneDNN route (rk.Stream's step is one); beta 1 adds into C; other betas and
    transposed operands keep the paths before it."""
    ops = torch.ops.rnnkit_fused
    if kernel.gemm_route() != "dnnl+ukernel" or ops.ukernel_products() < 0:
        pytest.skip(f"route {kernel.gemm_route()}, micro-kernel {ops.ukernel_products()}")
    torch.manual_seed(0)
    a, b = torch.randn(5, 16), torch.randn(16, 32)
    for beta, counted in ((0.0, 1), (1.0, 1), (0.5, 0)):
        out = torch.randn(5, 32) if beta else torch.full((5, 32), math.nan)
        want = (beta * out.double() if beta else 0) + a.double() @ b.double()
        before = ops.ukernel_products()
        ops.routed_addmm_(out, a, b, beta)
        assert ops.ukernel_products() - before == counted
        assert (out.double() - want).abs().max() < 1e-5
    before = ops.ukernel_products()
    ops.routed_addmm_(torch.zeros(5, 32), torch.randn(16, 5).t(), b, 0.0)       # a transposed: not taken
    assert ops.ukernel_products() == before
    lstm = rk.LSTM(8, 32).eval()
    s = rk.Stream(lstm)
    xs = torch.randn(4, 8)
    before = ops.ukernel_products()
    ys = torch.stack([s(x) for x in xs])
    assert ops.ukernel_products() - before == 4
    with torch.no_grad():
        assert (ys - lstm(xs)[0]).abs().max() < 1e-5


FAULTY_UKERNELS = r"""
#include <dlfcn.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
namespace at::native::cpublas {
void brgemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, const bool add_C,
            const float* A, const float* B, float* C, bool vnni) {
  using F = void (*)(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const float*, const float*,
                     float*, bool);
  static F real = (F)dlsym(dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD), "_ZN2at6native7cpublas6brgemmEllllllbPKfS3_Pfb");
  const char* fault = std::getenv("FAULT");
  if (fault[0] == 'n') {
    for (int64_t i = 0; i < M; ++i) for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = NAN;
    return;
  }
  if (M == 17) throw std::runtime_error("injected failure");
  real(M, N, K, lda, ldb, ldc, add_C, A, B, C, vnni);
}
}
"""

FAULTY_RUN = """
import torch, rnnkit as rk
from rnnkit import _fused
ops = _fused.build()
torch.manual_seed(0)
ref = torch.nn.LSTM(32, 32)
layer = rk.LSTM(32, 32, backend="engine")
layer.load_state_dict(ref.state_dict(), strict=False)
x = torch.randn(20, 34, 32)                                   # two lanes of 17 rows
before = ops.gemm_route()
layer(x)[0].sum().backward()
ref(x)[0].sum().backward()
grad = max((p.grad - q.grad).abs().max().item() for p, q in zip(layer.parameters(), ref.parameters()))
tiny = (torch.full((1 << 22,), 1e-39) * 1.0 == 0).sum().item()  # every thread still keeps denormals
print(before, ops.gemm_route(), torch.ops.rnnkit_fused.ukernel_products(), grad < 1e-3, tiny)
"""


@pytest.mark.parametrize("fault,before", [("nan", "dnnl"), ("throw", "dnnl+ukernel")])
def test_a_faulty_micro_kernel_is_refused_and_the_products_go_on(kernel, tmp_path, fault, before):
    """A micro-kernel that writes NaN fails the one-time check (NaN compares false: the check asks for a
    small error, not against a large one); one that throws inside a lane's step product is refused from
    then on, that product computed on the other path, no exception left in the lane's thread (whose
    denormal mode is put back in any case). Both injected by LD_PRELOAD over torch's symbol."""
    if kernel.gemm_route() != "dnnl+ukernel" or sys.platform != "linux" or shutil.which("g++") is None:
        pytest.skip(f"route {kernel.gemm_route()}, platform {sys.platform}")
    src = tmp_path / "faulty.cpp"
    src.write_text(FAULTY_UKERNELS)
    lib = tmp_path / "libfaulty.so"
    subprocess.run(["g++", "-O1", "-shared", "-fPIC", str(src), "-o", str(lib), "-ldl"], check=True)
    env = {**os.environ, "LD_PRELOAD": str(lib), "FAULT": fault, "RNNKIT_GEMM_ROUTE": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for _ in range(4):                                             # a fresh process times the routes once:
        done = subprocess.run([sys.executable, "-c", FAULTY_RUN], capture_output=True, text=True, env=env,
                              timeout=300, check=False)              # on a busy machine it can find MKL faster
        assert done.returncode == 0, done.stderr[-2000:]
        if done.stdout.startswith("dnnl"):
            break
    else:
        pytest.skip(f"the subprocesses' route: {done.stdout.split()[0]}")
    assert done.stdout.split() == [before, "dnnl", "-1", "True", "0"]
