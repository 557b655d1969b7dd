// See ukernel.h.
#include "ukernel.h"

#include <c10/macros/Export.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>

namespace at::native::cpublas {
// In torch's installed CPUBlas.h; declared here again, weak, so that a torch without it still loads the kernel.
TORCH_API void brgemm(int64_t M, int64_t N, int64_t K, int64_t ld_a, int64_t ld_b, int64_t ld_c, const bool add_C,
                      const float* A, const float* B, float* C, bool is_vnni) __attribute__((weak));
}  // namespace at::native::cpublas

namespace rnnkit {
namespace {

std::atomic<int64_t> g_ukernel_products{0};
std::atomic<bool> g_ukernel_refused{false};

void refuse_ukernel(const char* why) {
  g_ukernel_refused.store(true);
  if (std::getenv("RNNKIT_GEMM_DEBUG")) std::fprintf(stderr, "rnnkit gemm: brgemm refused: %s\n", why);
}

// C (m, n) = A (m, k) B (k, n) [+ C] on the micro-kernel, checked once against a double-precision product:
// a shape with whole vectors and tails, both with C overwritten and added to. A NaN fails the check.
bool ukernel_multiplies_right() {
  constexpr int m = 3, n = 37, k = 20;
  float a[m * k], b[k * n], c[m * n];
  for (int i = 0; i < m * k; ++i) a[i] = float((i * 7) % 11) - 5.0f;
  for (int i = 0; i < k * n; ++i) b[i] = float((i * 5) % 13) * 0.25f - 1.5f;
  for (int add = 0; add < 2; ++add) {
    for (int i = 0; i < m * n; ++i) c[i] = add ? float(i % 3) : std::nanf("");
    at::native::cpublas::brgemm(m, n, k, k, n, n, add == 1, a, b, c, false);
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < n; ++j) {
        double want = add ? double((i * n + j) % 3) : 0.0;
        for (int q = 0; q < k; ++q) want += double(a[i * k + q]) * double(b[q * n + j]);
        if (!(std::abs(double(c[i * n + j]) - want) <= 1e-4 * (1.0 + std::abs(want)))) return false;
      }
    }
  }
  return true;
}

}  // namespace

bool ukernel_pays(int64_t weight, int64_t rows) {
  return weight <= kUkernelMaxWeight || (rows <= kUkernelFewRows && weight <= kUkernelMaxWeightFewRows);
}

bool ukernel_works() {
  static const bool works = [] {
    if (at::native::cpublas::brgemm == nullptr) return false;
    try {
      if (ukernel_multiplies_right()) return true;
      refuse_ukernel("wrong numbers in the self-check");
    } catch (const std::exception& e) {
      refuse_ukernel(e.what());
    }
    return false;
  }();
  return works && !g_ukernel_refused.load(std::memory_order_relaxed);
}

bool ukernel_product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     bool add, float* c, int64_t ldc) {
  if (g_ukernel_refused.load(std::memory_order_relaxed)) return false;   // it threw before: not every step again
  try {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, false);
    return true;
  } catch (const std::exception& e) {
    refuse_ukernel(e.what());
    return false;
  }
}

void count_ukernel_product() { g_ukernel_products.fetch_add(1, std::memory_order_relaxed); }

int64_t ukernel_products() { return ukernel_works() ? g_ukernel_products.load() : -1; }

}  // namespace rnnkit
