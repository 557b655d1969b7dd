// oneDNN's batch-reduce GEMM micro-kernel as torch exports it (at::native::cpublas::brgemm), for the fused
// kernel's small float products: C (m, n) = A (m, k) B (k, n) [+ C], row-major, a kernel JIT-compiled once per
// shape and then called with no per-call set-up, B read in place (unpacked). blas.cpp decides where it runs
// (the oneDNN route, `use_ukernel`); this file holds the kernel's own checks and the call.
#pragma once

#include <cstdint>

namespace rnnkit {

// On the oneDNN route, a step product whose U is small goes to oneDNN's batch-reduce GEMM micro-kernel as
// torch exports it (at::native::cpublas::brgemm: a kernel JIT-compiled once per shape, then called with no
// per-call setup and U read in place, unpacked). Measured on the Zen 5 EPYC, two lanes of M rows at once,
// against oneDNN's linear with a packed weight and MKL: M = 32, U 64 x 256: 9.1 us against 25.3 and 15.3;
// U 128 x 512: 34.8 against 40.7 and 57.0; from 256 x 1024 (1 MB) the packed weight wins (104 against 185),
// except with few rows (M <= 4: 28.5 against 33.3). Hence U of at most kUkernelMaxWeight elements, or
// kUkernelMaxWeightFewRows with at most kUkernelFewRows rows.
constexpr int64_t kUkernelMaxWeight = int64_t(1) << 16;
constexpr int64_t kUkernelMaxWeightFewRows = int64_t(1) << 18;
constexpr int64_t kUkernelFewRows = 4;
// A general product (not transposed, beta 0 or 1) takes it too with at most this many rows: rk.Stream's step,
// one row by the stacked weights (LSTM H = 32: 64 x 128).
constexpr int64_t kUkernelMaxRows = 64;

// The micro-kernel where it beats oneDNN's and MKL's packed weights (weight: the right operand's elements;
// rows: the left operand's).
bool ukernel_pays(int64_t weight, int64_t rows);

// Whether the micro-kernel can be used: torch has the symbol, a one-time self-check multiplied right, and no
// call has thrown since.
bool ukernel_works();

// C = A B (+ C where `add`) on the micro-kernel: true when done; false once it has thrown, now or before (it is
// refused from then on, and the caller computes the product on its other path: no exception leaves a lane's
// thread, and a step loop does not retry a throwing kernel at every step).
bool ukernel_product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     bool add, float* c, int64_t ldc);

// Products on the micro-kernel so far (a step product counts once per lane and scan, a general one per call),
// or -1 where it is not available (torch without the symbol, or a CPU it refuses): for the tests.
void count_ukernel_product();
int64_t ukernel_products();

}  // namespace rnnkit
