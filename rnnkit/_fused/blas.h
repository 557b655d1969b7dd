// Row-major matrix products for the fused scan, on raw pointers into preallocated buffers.
//
// Per time step the scan needs one small product (B rows), so the fixed cost of a call matters as
// much as its speed: going through ATen's dispatcher (at::mm_out) costs microseconds per call in
// shape checks and TensorImpl bookkeeping. torch's own BLAS (MKL on x86 wheels) is therefore called
// directly through its Fortran entry points sgemm_/dgemm_ when libtorch exports them; they are
// declared weak, so a torch built without them still loads, and the product then goes through
// at::mm_out on tensors wrapping the same memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

namespace rnnkit {

// C = op(A) op(B) + beta * C, row-major, op = transpose when the flag is set.
//   C: (m, n), ldc;  op(A): (m, k), A stored with lda;  op(B): (k, n), B stored with ldb.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          const double* a, int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// C (m, n) += A (m, k) B (k, n), row-major, a small product inside a lane's loop (dU by steps, scan.h): on oneDNN's
// micro-kernel where the route takes it (ukernel.h), else gemm.
void add_product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc);
// Whether add_product runs on the micro-kernel (the route "dnnl+ukernel", on a CPU and torch that have it).
bool products_on_ukernel();
void add_product(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                 double* c, int64_t ldc);

// The per-step product with U, whose operand U is the same at every step:
//     forward   y (B, W) = x (B, H) U^T          backward  y (B, H) = x (B, W) U
// For float with MKL, U is packed once per scan into the kernel's own layout (MKL's packed GEMM), forward
// and backward, instead of being re-laid-out on every call: measured at T = 200, 2 threads, the
// backward's step product went from 265 to 305 GFLOP/s at B = 64, H = 512 (GRU) and from 225 to 290 at
// B = 32, and the forward's gains 20-40% at B = 32. Packing costs about four products' time, so a scan
// of fewer than kMinStepsToPack steps does not pack.
constexpr int64_t kMinStepsToPack = 8;
// Products smaller than these stay on torch's BLAS: oneDNN's call costs microseconds of setup (boxed
// dispatch, an output tensor, a copy), and a general product's operands are first copied into the
// layout it takes. Measured (B = 64, T = 100, the EPYC above): at H = 64 every product ran slower
// through oneDNN (the RNN's step took twice as long); a lane's step product from 2 M multiply-adds on
// gains (GRU H = 256, 32 rows: 6 M, 81 -> 64 ms a training step); weight gradients need both sides large.
constexpr int64_t kDnnlMinStepWork = int64_t(1) << 20;     // B W H of a step product
constexpr int64_t kDnnlMinWork = int64_t(1) << 26;         // m n k of a general product, with m, n >= 128
constexpr int64_t kDnnlMinSide = 128;
constexpr int64_t kDnnlCopyElements = int64_t(1) << 19;    // elements copied per slice of k: 2 MB of floats
constexpr int64_t kDnnlCopyShare = 8;                       // and at most this fraction of all copied
// A general product whose operands are dense or the transpose of dense (and C dense) goes to oneDNN's
// matmul as ATen calls it (at::native::mkldnn_matmul: strided operands, beta as an in-place sum), with no
// copy and no output tensor, where dnnl_matmul_pays (blas.cpp). Measured on the Zen 5 EPYC (2 threads)
// over 111 shapes against MKL: oneDNN's call costs ~12 us to MKL's ~3, and from m n k = 2^20 it took
// 0.3-0.55x MKL's time (0.95x at 128^3); below that MKL wins except on narrow outputs (n <= 8, m and k
// >= 128: 680 x 2 x 680 184 -> 49 us) and thin inner dimensions with large outputs (k <= 8, m n >= 3 2^17:
// 680 x 768 x 2 71 -> 29 us), both MKL's slow skinny kernels. Matrix-vector products stay with MKL. Weight
// gradients (6400 x 2048)^T (6400 x 512): 35 ms, against 42 ms through linear with copies and 67 in MKL.
// Both oneDNN paths follow torch's float32 matmul precision (torch.backends.mkldnn.matmul.fp32_precision,
// set_float32_matmul_precision): on a CPU with bf16 kernels "bf16" makes their float products bf16 ones,
// as torch's own; the MKL route ignores the setting, so there results would depend on the route taken.
constexpr int64_t kDnnlMatmulMinWork = int64_t(1) << 20;

// oneDNN compiles a kernel for each shape of product it meets and keeps up to 1024 of them (its primitive
// cache; torch's brgemm keeps every one, per thread). A side that is T*B (the input projection's rows, the
// weight gradients' depth) met a new shape at nearly every step of a training run on bucketed data: an LSTM
// (H = 128) on random B in [16, 64] and T in [50, 150] grew by 700 MB over 400 steps (torch.nn: 115).
// kExactShapes shapes at a time are taken as they are, in one call: the first met (a run with fixed sizes: a
// few per layer), then shapes in steady use in place of ones long unused (shapes.cpp); any other such side goes to oneDNN in blocks whose sizes are powers of two, the largest first,
// from kShapeBlockMin to kShapeBlockMax rows, and what is left under kShapeBlockMin to BLAS, which compiles
// nothing: at most 9 shapes a side. (Blocks always would cost fixed sizes a call each, ~8 us: RNN B=32 T=100
// H=64 trained 15% slower.) Cutting the depth adds C into itself once a block: measured within 2% of one
// call, also where C is large (4096 x 1024 by a depth of 6400: 131 against 129 ms).
constexpr int64_t kExactShapes = 64;
constexpr int64_t kShapeBlockMin = 64;
constexpr int64_t kShapeBlockMax = int64_t(1) << 14;

// f(offset, size, on_dnnl) over [0, n) in such blocks.
template <typename F>
void for_shape_blocks(int64_t n, const F& f) {
  int64_t at = 0;
  for (int64_t size = kShapeBlockMax; size >= kShapeBlockMin; size /= 2) {
    for (; n - at >= size; at += size) f(at, size, true);
  }
  if (at < n) f(at, n - at, false);
}

template <typename T>
class StepProduct {
 public:
  StepProduct(const T* u, int64_t W, int64_t H, int64_t B, bool backward, int64_t steps);
  void operator()(const T* x, T* y) const;

 private:
  const T* u_;
  int64_t W_, H_, B_;
  bool backward_;
  std::unique_ptr<float[]> packed_;                // null: not packed (MKL asks for ~8 MB: not zeroed)
  std::shared_ptr<at::Tensor> dnnl_w_;             // oneDNN's packed weight, when that route is taken
  const float* ukernel_b_ = nullptr;               // the right operand on oneDNN's micro-kernel (ukernel.h):
  std::unique_ptr<float[]> ukernel_ut_;            // U (backward) or this copy of U^T (forward); null: not taken
};

// The leading dimension of a 2-D tensor stored row-major (unit column stride, rows that do not overlap; a
// single row: its width, whatever its row stride), or 0 when it is not stored so.
inline int64_t row_major_ld(const at::Tensor& t) {
  if (t.dim() != 2 || t.stride(1) != 1) return 0;
  const int64_t r = t.size(0), c = t.size(1);
  if (r <= 1) return std::max<int64_t>(c, 1);
  return t.stride(0) >= c ? t.stride(0) : 0;
}

// x (n, k) w^T for w (m, k), both row-major with unit stride along k: oneDNN's output itself (no copy)
// where the route takes oneDNN and the product pays there (as a general product), at::mm otherwise (and where a gradient is to
// follow: oneDNN's op has no backward). The projections of the parallel-scan cells' blocks
// (rnnkit/parallel.py; registered as rnnkit_fused::routed_linear).
at::Tensor linear_product(const at::Tensor& x, const at::Tensor& w);

// Which route the products take: "dnnl+ukernel" (oneDNN's float products where measured faster than MKL's, see
// blas.cpp, the small ones on its micro-kernel, ukernel.h), "dnnl" (the same without the micro-kernel),
// "packed" (MKL's packed GEMM for the float step products, torch's BLAS directly for the rest), "blas" (torch's
// BLAS directly) or "aten" (at::mm). A benchmark can limit the route ("dnnl", "packed", "blas", "aten";
// "dnnl+ukernel" restores the default) to measure what each step saves.
std::string gemm_route();
// Products done through at::native::mkldnn_matmul so far (see kDnnlMatmulMinWork), or -1 where that
// path is closed (torch without the symbol, or the op refused this CPU): for the tests.
int64_t dnnl_matmul_calls();
void limit_gemm_route(const std::string& route);
// Whether oneDNN gets a product of this shape whole (else in shape blocks); kind: the caller's. shapes.cpp.
bool exact_shape(int kind, bool ta, bool tb, int64_t m, int64_t n, int64_t k);
// How many shapes are taken whole at a time (kExactShapes) and how many may be taken in later (taken_in < 0:
// the default), forgetting those met; returns the previous number (for the tests: 0 cuts every product).
// exact_shapes_held: how many are held now.
int64_t set_exact_shapes(int64_t shapes, int64_t taken_in);
int64_t exact_shapes_held();

}  // namespace rnnkit
