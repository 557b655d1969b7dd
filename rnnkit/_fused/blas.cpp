// See blas.h. Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so the Fortran
// routine gets the operands swapped and each transpose flag kept.
#include "blas.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <string>
#include <type_traits>

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

namespace rnnkit {
namespace {

enum class Route { kPacked, kBlas, kAten };
Route g_limit = Route::kPacked;                   // the best route allowed (benchmarks lower it)

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
         g_limit == Route::kPacked;
}

}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_any(sgemm_, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_any(dgemm_, ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
StepProduct<T>::StepProduct(const T* u, int64_t W, int64_t H, int64_t B, bool backward, int64_t steps)
    : u_(u), W_(W), H_(H), B_(B), backward_(backward) {
  if constexpr (std::is_same_v<T, float>) {
    if (steps < kMinStepsToPack || !can_pack() || !blas_ok(W, H, B, W, H, W)) return;
    const StepDims d = step_dims(W, H, B, backward);
    const float one = 1;
    packed_.reset(new float[sgemm_pack_get_size("A", &d.m, &d.n, &d.k) / sizeof(float) + 1]);
    sgemm_pack("A", &d.op_a, &d.m, &d.n, &d.k, &one, u, &d.lda, packed_.get());
  }
}

template <typename T>
void StepProduct<T>::operator()(const T* x, T* y) const {
  if constexpr (std::is_same_v<T, float>) {
    if (packed_) {
      const StepDims d = step_dims(W_, H_, B_, backward_);
      const float zero = 0;
      sgemm_compute("P", "N", &d.m, &d.n, &d.k, packed_.get(), &d.lda, x, &d.ldb, &zero, y, &d.ldc);
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

std::string gemm_route() {
  if (sgemm_ == nullptr || dgemm_ == nullptr || g_limit == Route::kAten) return "aten";
  return can_pack() ? "packed" : "blas";
}

void limit_gemm_route(const std::string& route) {
  g_limit = route == "aten" ? Route::kAten : route == "blas" ? Route::kBlas : Route::kPacked;
}

}  // namespace rnnkit
