// See blas.h. Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so the Fortran
// routine gets the operands swapped and each transpose flag kept.
#include "blas.h"

#include "pool.h"
#include "ukernel.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <chrono>
#include <cstring>
#include <functional>
#include <utility>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's packed GEMM (float only): pack one operand once, then multiply by it many times.
size_t sgemm_pack_get_size(const char* id, const int* m, const int* n, const int* k) __attribute__((weak));
void sgemm_pack(const char* id, const char* trans, const int* m, const int* n, const int* k,
                const float* alpha, const float* src, const int* ld, float* dest) __attribute__((weak));
void sgemm_compute(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                   const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                   const int* ldc) __attribute__((weak));
}

namespace at::native {
// oneDNN's matmul as ATen's addmm calls it: result = beta result + alpha mat1 mat2, on dense or transposed
// operands. Not in torch's installed headers, so declared here, weak: a torch without it (or with another
// signature, hence another symbol) leaves it null and the products keep the paths below.
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha) __attribute__((weak));
}  // namespace at::native

namespace rnnkit {
namespace {

enum class Route { kUkernel, kDnnl, kPacked, kBlas, kAten };
Route g_limit = Route::kUkernel;                  // the best route allowed (benchmarks lower it)

// ---- oneDNN's float products, through torch's mkldnn::_linear_pointwise (y = x w^T) -------------------
// On some CPUs torch's BLAS (MKL) does not use the vector units oneDNN does: on a 2-core AMD EPYC (Zen 4,
// AVX-512) MKL's sgemm ran at 160-180 GFLOP/s and oneDNN's at 330-420 on the engine's products. Which
// is faster is measured once per process on a product of the step's kind (dnnl_measured_faster); on a
// Xeon MKL is expected to win or tie and nothing changes. The ops are found by name (no oneDNN headers),
// once, and called boxed.
struct DnnlOps {
  std::optional<c10::OperatorHandle> linear, pack;
  c10::IValue none = c10::IValue(std::string("none"));               // linear's arguments that never change
  c10::IValue no_scalars = c10::IValue(c10::List<std::optional<at::Scalar>>());
  bool found() const { return linear && pack; }
};

const DnnlOps& dnnl_ops() {
  static const DnnlOps ops{c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""}),
                           c10::Dispatcher::singleton().findSchema({"mkldnn::_reorder_linear_weight", ""})};
  return ops;
}

at::Tensor dnnl_linear(const at::Tensor& x, const at::Tensor& w) {      // x (m, k), w (n, k) -> (m, n)
  const DnnlOps& ops = dnnl_ops();
  torch::jit::Stack stack{x, w, c10::IValue(), ops.none, ops.no_scalars, c10::IValue()};
  ops.linear->callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor dnnl_pack(const at::Tensor& w, int64_t rows) {              // w (n, k) in oneDNN's layout
  torch::jit::Stack stack{w, c10::IValue(rows)};
  dnnl_ops().pack->callBoxed(&stack);
  return stack[0].toTensor();
}

at::Tensor wrap_f(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// dst (cols, rows) = src^T, src (rows, cols) row-major with leading dimension ld: 16 x 16 tiles, column
// blocks over the threads. 4-6x faster than a strided at::Tensor copy (3200 x 1024: 2.6 -> 0.55 ms).
void transpose_into(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  constexpr int64_t kTile = 16;
  at::parallel_for(0, (cols + kTile - 1) / kTile, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
      const int64_t r1 = std::min(r0 + kTile, rows);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * kTile, c1 = std::min(c0 + kTile, cols);
        if (r1 - r0 == kTile && c1 - c0 == kTile) {
          for (int64_t j = 0; j < kTile; ++j) {
#pragma omp simd
            for (int64_t i = 0; i < kTile; ++i) dst[(c0 + j) * rows + r0 + i] = src[(r0 + i) * ld + c0 + j];
          }
        } else {
          for (int64_t j = c0; j < c1; ++j) {
            for (int64_t i = r0; i < r1; ++i) dst[j * rows + i] = src[i * ld + j];
          }
        }
      }
    }
  });
}

// dst (rows, cols) dense = the first cols of each of src's rows (leading dimension ld).
void gather_rows(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * cols, src + r * ld, sizeof(float) * cols);
  });
}

// C (m, n, leading dimension ldc) = src + beta C; src: oneDNN's (m, n) output (contiguous, as it makes them).
void copy_rows(const at::Tensor& src, float* c, int64_t m, int64_t n, int64_t ldc, float beta) {
  const at::Tensor dense = src.contiguous();
  const float* s = dense.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f) {
      std::memcpy(row, s + i * n, sizeof(float) * n);
    } else {
      for (int64_t j = 0; j < n; ++j) row[j] = beta * row[j] + s[i * n + j];
    }
  }
}

bool dnnl_measured_faster();

// Also off while torch's oneDNN is switched off (torch.backends.mkldnn.flags(enabled=False)), as torch's
// own ops are.
bool use_dnnl() {
  return (g_limit == Route::kUkernel || g_limit == Route::kDnnl) && at::globalContext().userEnabledMkldnn() &&
         dnnl_measured_faster();
}

// oneDNN for a product of `work` multiply-adds that needs no operand copied (a step product, a projection).
bool dnnl_without_copies(int64_t work) { return work >= kDnnlMinStepWork && use_dnnl(); }

// oneDNN's micro-kernel (ukernel.h), on the best route only: limit_gemm_route("dnnl") keeps the numbers before it.
bool use_ukernel() { return g_limit == Route::kUkernel && use_dnnl() && ukernel_works(); }

bool fits_int(int64_t v) { return v >= 0 && v <= INT32_MAX; }

bool blas_ok(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  return fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) && fits_int(ldc);
}

// The fallback: the same product through ATen, on tensors that wrap the caller's memory.
template <typename T>
void gemm_aten(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto wrap = [&](const T* p, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  };
  at::Tensor A = ta ? wrap(a, k, m, lda).t() : wrap(a, m, k, lda);
  at::Tensor B = tb ? wrap(b, n, k, ldb).t() : wrap(b, k, n, ldb);
  at::Tensor C = wrap(c, m, n, ldc);
  if (beta == T(0)) {
    C.copy_(at::mm(A, B));
  } else {
    C.copy_(at::addmm(C, A, B, beta, 1));
  }
}

template <typename T, typename F>
void gemm_any(F* fortran, bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
              const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (fortran == nullptr || g_limit == Route::kAten || !blas_ok(m, n, k, lda, ldb, ldc)) {
    gemm_aten(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LDA = int(ldb), LDB = int(lda), LDC = int(ldc);
  const T one = 1;
  fortran(&opb, &opa, &M, &N, &K, &one, b, &LDA, a, &LDB, &beta, c, &LDC);
}

// Column-major view of the step product, as the Fortran routines take it:
//   forward   y^T (W x B) = U (W x H) x^T:  A = U stored (H x W), op T;  K = H
//   backward  y^T (H x B) = U^T (H x W) x^T:  A = U stored (H x W), op N;  K = W
struct StepDims {
  int m, n, k, lda, ldb, ldc;
  char op_a;
};

StepDims step_dims(int64_t W, int64_t H, int64_t B, bool backward) {
  if (backward) return {int(H), int(B), int(W), int(H), int(W), int(H), 'N'};
  return {int(W), int(B), int(H), int(H), int(H), int(W), 'T'};
}

bool can_pack() {
  return sgemm_pack_get_size != nullptr && sgemm_pack != nullptr && sgemm_compute != nullptr &&
         (g_limit == Route::kPacked || g_limit == Route::kDnnl || g_limit == Route::kUkernel);
}

// U packed once into MKL's layout for the step product (see step_dims), and the product with it.
std::unique_ptr<float[]> mkl_pack(const float* u, int64_t W, int64_t H, int64_t B, bool backward) {
  const StepDims d = step_dims(W, H, B, backward);
  const float one = 1;
  std::unique_ptr<float[]> packed(new float[sgemm_pack_get_size("A", &d.m, &d.n, &d.k) / sizeof(float) + 1]);
  sgemm_pack("A", &d.op_a, &d.m, &d.n, &d.k, &one, u, &d.lda, packed.get());
  return packed;
}

void mkl_packed_product(const float* packed, int64_t W, int64_t H, int64_t B, bool backward, const float* x,
                        float* y) {
  const StepDims d = step_dims(W, H, B, backward);
  const float zero = 0;
  sgemm_compute("P", "N", &d.m, &d.n, &d.k, packed, &d.lda, x, &d.ldb, &zero, y, &d.ldc);
}

std::atomic<bool> g_matmul_refused{false};
std::atomic<int64_t> g_matmul_calls{0};

// Where oneDNN's products beat MKL's with no copy (see kDnnlMatmulMinWork), on the oneDNN route.
bool dnnl_matmul_pays(int64_t m, int64_t n, int64_t k) {
  if (std::min(m, n) < 2 || k < 1) return false;                  // matrix-vector: MKL
  return m * n * k >= kDnnlMatmulMinWork || (n <= 8 && m >= 128 && k >= 128) ||
         (k <= 8 && m * n >= (int64_t(3) << 17));
}

// C = op(A) op(B) + beta C through at::native::mkldnn_matmul where the route takes oneDNN and the operands
// are as it takes them without a copy (see kDnnlMatmulMinWork). False when not done: the caller goes on.
// The op checks the CPU first (it asks for AVX-512 or AVX-NE-CONVERT for float): a refusal is remembered.
// The rows (op(A) stored as is), or else the depth (A^T and B stored as they are), in shape blocks
// (blas.h): the sides that are T*B, the input projection's and its gradients', take a handful of shapes.
bool dnnl_matmul(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float beta, float* c, int64_t ldc) {
  if (at::native::mkldnn_matmul == nullptr || g_matmul_refused.load(std::memory_order_relaxed) ||
      !dnnl_matmul_pays(m, n, k) || lda != (ta ? m : k) || ldb != (tb ? k : n) || ldc != n || !use_dnnl()) {
    return false;
  }
  try {
    const auto product = [&](int64_t i0, int64_t mm, int64_t k0, int64_t kk, float bt, bool dnnl) {
      const float* ap = ta ? a + k0 * lda + i0 : a + i0 * lda + k0;
      const float* bp = tb ? b + k0 : b + k0 * ldb;
      float* cp = c + i0 * ldc;
      if (!dnnl) return gemm_any(sgemm_, ta, tb, mm, n, kk, ap, lda, bp, ldb, bt, cp, ldc);
      const at::Tensor A = ta ? wrap_f(ap, kk, mm, lda).t() : wrap_f(ap, mm, kk, lda);
      const at::Tensor B = tb ? wrap_f(bp, n, kk, ldb).t() : wrap_f(bp, kk, n, ldb);
      at::native::mkldnn_matmul(A, B, wrap_f(cp, mm, n, ldc), bt, 1.0f);
      g_matmul_calls.fetch_add(1, std::memory_order_relaxed);
    };
    const bool exact = exact_shape(0, ta, tb, m, n, k);
    if (!exact && !ta) {
      for_shape_blocks(m, [&](int64_t i0, int64_t mm, bool dnnl) { product(i0, mm, 0, k, beta, dnnl); });
    } else if (!exact && !tb) {
      for_shape_blocks(k, [&](int64_t k0, int64_t kk, bool dnnl) {
        product(0, m, k0, kk, k0 == 0 ? beta : 1.0f, dnnl);
      });
    } else {
      product(0, m, 0, k, beta, true);                // an exact shape, or A^T B^T (not cut: a new shape)
    }
    return true;
  } catch (const std::exception& e) {            // c10::Error (the CPU check), or oneDNN's own
    g_matmul_refused = true;
    if (std::getenv("RNNKIT_GEMM_DEBUG")) std::fprintf(stderr, "rnnkit gemm: mkldnn_matmul refused: %s\n", e.what());
    return false;
  }
}

}  // namespace

int64_t dnnl_matmul_calls() {
  return at::native::mkldnn_matmul == nullptr || g_matmul_refused ? -1 : g_matmul_calls.load();
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (!ta && !tb && (beta == 0.0f || beta == 1.0f) && m > 0 && n > 0 && m <= kUkernelMaxRows && k > 0 &&
      ukernel_pays(k * n, m) && use_ukernel() &&                         // a few rows by a small B
      ukernel_product(m, n, k, a, lda, b, ldb, beta == 1.0f, c, ldc)) {
    count_ukernel_product();
    return;
  }
  if (dnnl_matmul(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc)) return;
  if (m >= kDnnlMinSide && n >= kDnnlMinSide && k > 0 && m * n * k >= kDnnlMinWork && use_dnnl()) {
    // Not taken by dnnl_matmul (a strided operand, or a torch without the op, or a CPU it refuses):
    // op(A) (m, k) and op(B)^T (n, k) as oneDNN's linear takes them: row-major, k contiguous. Operands stored
    // so but as rows of a wider matrix (an input's features sliced out, a weight's columns) are first copied
    // dense, whole (a strided weight sent oneDNN to its reference kernel: a product of 3 ms took 3.3 s; a
    // strided source ran at half the speed of the copy and the dense product: 33 against 17 ms at 6400 x 300
    // x 2048). A slice of a dense A is taken in place (a strided source, at half speed, but no copy); op(B)^T,
    // the weight, only where dense. Else an operand is copied so, in slices of k of at most kDnnlCopyElements
    // copied elements (a weight gradient's k is T*B: whole copies raised a training step's peak memory by a
    // third), each slice's product added to C. The copies' buffers hold at most an eighth of what is copied
    // (a step's peak memory stays below torch.nn's at small sizes: GRU B=32 T=100 H=128 read 0.99x with 2 MB
    // slices, 0.90x before). The slices are powers of two within k's shape blocks (blas.h) once the shape is
    // not taken whole, k's tail under kShapeBlockMin on BLAS.
    if ((!ta && lda != k) || (tb && ldb != k)) {                 // rows of a wider matrix: made dense once
      const auto dense = [](const float* x, int64_t rows, int64_t cols, int64_t ld) {
        at::Tensor t = pooled_empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
        gather_rows(x, rows, cols, ld, t.data_ptr<float>());
        return t;
      };
      const at::Tensor ad = !ta && lda != k ? dense(a, m, k, lda) : at::Tensor();
      const at::Tensor bd = tb && ldb != k ? dense(b, n, k, ldb) : at::Tensor();
      gemm(ta, tb, m, n, k, ad.defined() ? ad.data_ptr<float>() : a, ad.defined() ? k : lda,
           bd.defined() ? bd.data_ptr<float>() : b, bd.defined() ? k : ldb, beta, c, ldc);
      return;
    }
    const bool exact = exact_shape(1, ta, tb, m, n, k);
    const bool whole = exact && !ta && tb;                         // one call, both in place
    const int64_t copied = (ta ? m : 0) + n;                      // per unit of k: sliced, B is never dense
    const int64_t budget = std::min(kDnnlCopyElements, copied * k / kDnnlCopyShare);
    const int64_t wanted = whole ? k : std::min(k, std::max(kDnnlMinSide, budget / copied));
    int64_t slice = exact ? wanted : kShapeBlockMax;
    while (slice > kShapeBlockMin && slice > wanted) slice /= 2;
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor a_buf, b_buf;                                       // made when first needed
    // op(X)'s slice [k0, k0 + kk) as (rows, kk), row-major: in place where `strided_ok` or dense, else copied
    // into buf (transposed where stored so)
    const auto operand = [&](const float* x, int64_t ld, bool trans, bool strided_ok, int64_t rows, int64_t k0,
                             int64_t kk, at::Tensor& buf) {
      if (!trans && (strided_ok || ld == kk)) return wrap_f(x + k0, rows, kk, ld);
      if (!buf.defined()) buf = pooled_empty({rows * slice}, opts);
      float* const dst = buf.data_ptr<float>();
      if (trans) {
        transpose_into(x + k0 * ld, kk, rows, ld, dst);
      } else {
        gather_rows(x + k0, rows, kk, ld, dst);
      }
      return wrap_f(dst, rows, kk, kk);
    };
    const auto blocks = [&](const auto& f) { exact ? f(int64_t(0), k, true) : for_shape_blocks(k, f); };
    blocks([&](int64_t b0, int64_t bk, bool dnnl) {
      const float* const ab = ta ? a + b0 * lda : a + b0;
      const float* const bb = tb ? b + b0 : b + b0 * ldb;
      if (!dnnl) return gemm_any(sgemm_, ta, tb, m, n, bk, ab, lda, bb, ldb, b0 == 0 ? beta : 1.0f, c, ldc);
      for (int64_t k0 = b0; k0 < b0 + bk; k0 += slice) {
        const int64_t kk = std::min(slice, b0 + bk - k0);
        const at::Tensor A = operand(a, lda, ta, true, m, k0, kk, a_buf);
        const at::Tensor Wt = operand(b, ldb, !tb, false, n, k0, kk, b_buf);
        copy_rows(dnnl_linear(A, Wt), c, m, n, ldc, k0 == 0 ? beta : 1.0f);
      }
    });
    return;
  }
  gemm_any(sgemm_, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

at::Tensor linear_product(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "rnnkit routed_linear: expected (n, k) and (m, k) matrices, got ", x.sizes(), " and ", w.sizes());
  // w dense: oneDNN runs a strided weight on its reference kernel (W[:, :300] of (512, 400): 1.6 s, not 1 ms)
  const bool dense = x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
                     w.device().is_cpu() && row_major_ld(x) > 0 && w.dim() == 2 && row_major_ld(w) == w.size(1);
  const bool tracked = at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad());
  if (dense && !tracked && dnnl_matmul_pays(x.size(0), w.size(0), x.size(1)) && use_dnnl()) return dnnl_linear(x, w);
  return at::mm(x, w.t());
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_any(dgemm_, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

void add_product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc) {
  if (use_ukernel() && ukernel_product(m, n, k, a, lda, b, ldb, true, c, ldc)) return;
  gemm(false, false, m, n, k, a, lda, b, ldb, 1.0f, c, ldc);     // (a micro-kernel that threw: here from then on)
}

bool products_on_ukernel() { return use_ukernel(); }

void add_product(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                 double* c, int64_t ldc) {
  gemm(false, false, m, n, k, a, lda, b, ldb, 1.0, c, ldc);
}

template <typename T>
StepProduct<T>::StepProduct(const T* u, int64_t W, int64_t H, int64_t B, bool backward, int64_t steps)
    : u_(u), W_(W), H_(H), B_(B), backward_(backward) {
  if constexpr (std::is_same_v<T, float>) {
    if (B > 0 && W > 0 && H > 0 && ukernel_pays(W * H, B) && use_ukernel()) {
      if (backward) {
        ukernel_b_ = u;                                            // y = x U: U as it is stored
      } else {                                                     // y = x U^T: U^T, (H, W) row-major
        ukernel_ut_.reset(new float[static_cast<size_t>(W * H)]);
        transpose_into(u, W, H, H, ukernel_ut_.get());
        ukernel_b_ = ukernel_ut_.get();
      }
      count_ukernel_product();
      return;
    }
    if (steps >= kMinStepsToPack && B > 0 && dnnl_without_copies(B * W * H)) {   // U (forward) or U^T (backward) as linear's w
      const at::Tensor w = backward ? wrap_f(u, W, H, H).t().contiguous() : wrap_f(u, W, H, H);
      dnnl_w_ = std::make_shared<at::Tensor>(dnnl_pack(w, B));       // read only while U is (this scan)
      return;
    }
    if (steps < kMinStepsToPack || !can_pack() || !blas_ok(W, H, B, W, H, W)) return;
    packed_ = mkl_pack(u, W, H, B, backward);
  }
}

template <typename T>
void StepProduct<T>::operator()(const T* x, T* y) const {
  if constexpr (std::is_same_v<T, float>) {
    const int64_t K = backward_ ? W_ : H_, N = backward_ ? H_ : W_;    // y (B, N) = x (B, K) times U^T or U
    if (ukernel_b_ != nullptr && ukernel_product(B_, N, K, x, K, ukernel_b_, N, false, y, N)) return;
    if (dnnl_w_) {                                   // (a micro-kernel that threw goes on to the product below)
      copy_rows(dnnl_linear(wrap_f(x, B_, K, K), *dnnl_w_), y, B_, N, N, 0.0f);
      return;
    }
    if (packed_) {
      mkl_packed_product(packed_.get(), W_, H_, B_, backward_, x, y);
      return;
    }
  }
  if (backward_) {
    gemm(false, false, B_, H_, W_, x, W_, u_, H_, T(0), y, H_);
  } else {
    gemm(false, true, B_, W_, H_, x, H_, u_, H_, T(0), y, W_);
  }
}

template class StepProduct<float>;
template class StepProduct<double>;

namespace {

double seconds_of(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The fastest of several calls of each of f and g, the calls alternating, after one each: what each costs when
// nothing else is in the way. Medians of 7 calls in turn had chosen MKL on a busy machine (the test suite's
// two workers beside the process that measured) where oneDNN took half its time when measured alone.
std::pair<double, double> fastest_of(const std::function<void()>& f, const std::function<void()>& g) {
  f();
  g();
  double a = 1e30, b = 1e30;
  for (int i = 0; i < 15; ++i) {
    a = std::min(a, seconds_of(f));
    b = std::min(b, seconds_of(g));
  }
  return {a, b};
}

// Once per process: a step's kind of product (64 x 256 times 256 x 1024), MKL (packed when it can) against
// oneDNN (its packed weight); oneDNN is taken when it takes at most 80% of MKL's time.
bool dnnl_measured_faster() {
  static std::once_flag once;
  static bool faster = false;
  std::call_once(once, [] {
    if (!dnnl_ops().found() || sgemm_pack_get_size == nullptr || sgemm_pack == nullptr || sgemm_compute == nullptr) {
      return;
    }
    try {
      const int64_t B = 64, H = 256, W = 1024;
      at::Generator gen = at::detail::createCPUGenerator(0);      // not torch's global stream: a seeded
      at::Tensor u = at::randn({W, H}, gen), x = at::randn({B, H}, gen), y = at::empty({B, W});   // run stays as it was
      float* const out = y.data_ptr<float>();
      const at::Tensor packed = dnnl_pack(u, B);
      const auto mkl = mkl_pack(u.data_ptr<float>(), W, H, B, false);
      const auto [dnnl, blas] = fastest_of([&] { copy_rows(dnnl_linear(x, packed), out, B, W, W, 0.0f); },
                                           [&] { mkl_packed_product(mkl.get(), W, H, B, false, x.data_ptr<float>(), out); });
      faster = dnnl <= 0.8 * blas;
      if (std::getenv("RNNKIT_GEMM_DEBUG")) std::fprintf(stderr, "rnnkit gemm: oneDNN %.1f us, MKL %.1f us\n", dnnl * 1e6, blas * 1e6);
    } catch (const std::exception&) {
      faster = false;                              // the op refused: torch's BLAS, as before
    }
  });
  return faster;
}

}  // namespace

std::string gemm_route() {
  if (sgemm_ == nullptr || dgemm_ == nullptr || g_limit == Route::kAten) return "aten";
  if (use_ukernel()) return "dnnl+ukernel";
  if (use_dnnl()) return "dnnl";
  return can_pack() ? "packed" : "blas";
}

void limit_gemm_route(const std::string& route) {
  g_limit = route == "aten"     ? Route::kAten
            : route == "blas"   ? Route::kBlas
            : route == "packed" ? Route::kPacked
            : route == "dnnl"   ? Route::kDnnl
                                : Route::kUkernel;
}

}  // namespace rnnkit
