// One time step of a plain LSTM or GRU layer for rk.Stream (rnnkit/stream_kernels.py's LSTMKernel and
// GRUKernel), in one call: P = [x | h] W (one product), then per unit the gates with b added and the new
// state, written in place. The torch-op kernels take seven (LSTM) and five (GRU) operator calls a step
// (~6 us at H = 32, batch 1, most of it per-call overhead); these take one. Column blocks of W and b as
// the kernels stack them: LSTM i, f, o, g; GRU r, -z, x_n, h_n.
//   LSTM  c = f c + i g, h = o tanh(c)
//   GRU   r = sigmoid, w = sigmoid(-z pre-activation) = 1 - z, n = tanh(x_n + r h_n), h = lerp(h, n, w)
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <array>
#include <cmath>

#include "blas.h"
#include "fastmath.h"
#include "floating.h"

namespace rnnkit {
namespace {

template <typename T>
void lstm_rows(int64_t B, int64_t H, const T* b, T* P, int64_t ldp, T* c, int64_t ldc, T* h, int64_t ldh) {
  for (int64_t r = 0; r < B; ++r) {
    T* p = P + r * ldp;
    T* cr = c + r * ldc;
    T* hr = h + r * ldh;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T i = sigmoid_(p[j] + b[j]), f = sigmoid_(p[H + j] + b[H + j]);
      const T o = sigmoid_(p[2 * H + j] + b[2 * H + j]), g = tanh_(p[3 * H + j] + b[3 * H + j]);
      const T cn = f * cr[j] + i * g;
      cr[j] = cn;
      hr[j] = o * tanh_(cn);
    }
  }
}

// h + w (n - h) as at::lerp computes it (from the nearer end), so the stream matches torch's step.
template <typename T>
inline T lerp_(T h, T n, T w) {
  const T d = n - h;
  return w < T(0.5) ? h + w * d : n - d * (T(1) - w);
}

template <typename T>
void gru_rows(int64_t B, int64_t H, const T* b, T* P, int64_t ldp, T* h, int64_t ldh) {
  for (int64_t r = 0; r < B; ++r) {
    T* p = P + r * ldp;
    T* hr = h + r * ldh;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T rg = sigmoid_(p[j] + b[j]), w = sigmoid_(p[H + j] + b[H + j]);
      const T n = tanh_(p[2 * H + j] + b[2 * H + j] + rg * (p[3 * H + j] + b[3 * H + j]));
      hr[j] = lerp_(hr[j], n, w);
    }
  }
}

// The checks both steps share; c is undefined for the GRU. Returns nothing: refuses with a message.
void check_step(const char* name, const at::Tensor& window, const at::Tensor& W, const at::Tensor& b,
                const at::Tensor& P, const at::Tensor& c, const at::Tensor& h) {
  const auto dt = window.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "rnnkit ", name, ": float32 or float64 only");
  const std::array<const at::Tensor*, 6> all{&window, &W, &b, &P, &h, c.defined() ? &c : &h};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->scalar_type() == dt && t->device().is_cpu(), "rnnkit ", name, ": CPU tensors of one dtype");
    TORCH_CHECK(!t->is_neg() && !t->is_conj() && t->layout() == at::kStrided,
                "rnnkit ", name, ": dense tensors without a lazy negation");
  }
  // Written: P, c, h (h may lie inside window: it is written after the product has read window). ATen
  // tells overlap only between contiguous tensors; rk.Stream's views are apart by construction.
  for (const at::Tensor* t : {&window, &W, &b, &h}) at::assert_no_overlap(P, *t);
  for (const at::Tensor* t : {&W, &b}) at::assert_no_overlap(h, *t);
  if (c.defined()) {
    at::assert_no_overlap(P, c);
    for (const at::Tensor* t : {&window, &W, &b, &h}) at::assert_no_overlap(c, *t);
  }
  const int64_t B = window.dim() == 2 ? window.size(0) : -1, H = h.dim() == 2 ? h.size(1) : -1;
  const bool c_ok = !c.defined() || (row_major_ld(c) > 0 && c.size(0) == B && c.size(1) == H);
  TORCH_CHECK(b.dim() == 1 && row_major_ld(window) > 0 && row_major_ld(P) > 0 && row_major_ld(h) > 0 && c_ok &&
              W.is_contiguous() &&
              b.is_contiguous() && W.dim() == 2 && W.size(0) == window.size(1) && W.size(1) == 4 * H &&
              b.numel() == 4 * H && P.size(0) == B && P.size(1) == 4 * H && h.size(0) == B,
              "rnnkit ", name, ": expected window (B, K), W (K, 4H), b (4H,), P (B, 4H), ",
              c.defined() ? "c and h" : "h", " (B, H) with unit column stride");
}

// P = window W: one product over the stacked columns.
template <typename T>
void product(const at::Tensor& window, const at::Tensor& W, const at::Tensor& P) {
  gemm(false, false, window.size(0), W.size(1), window.size(1), window.data_ptr<T>(), row_major_ld(window),
       W.data_ptr<T>(), W.size(1), T(0), P.data_ptr<T>(), row_major_ld(P));
}

void stream_lstm(const at::Tensor& window, const at::Tensor& W, const at::Tensor& b, const at::Tensor& P,
                 const at::Tensor& c, const at::Tensor& h) {
  check_step("stream_lstm", window, W, b, P, c, h);
  with_floating(window, "rnnkit stream_lstm", [&](auto zero) {
    using T = decltype(zero);
    product<T>(window, W, P);                      // reads all of window before any h is written
    lstm_rows<T>(window.size(0), h.size(1), b.data_ptr<T>(), P.data_ptr<T>(), row_major_ld(P), c.data_ptr<T>(),
                 row_major_ld(c), h.data_ptr<T>(), row_major_ld(h));
  });
}

template <typename T>
bool all_finite(const T* w, int64_t B, int64_t K, int64_t ld) {
  bool ok = true;
  for (int64_t r = 0; r < B; ++r) {
    for (int64_t k = 0; k < K; ++k) ok &= std::isfinite(w[r * ld + k]);
  }
  return ok;
}

// The GRU's stacked W has zero blocks (x_n takes no h, h_n no x), and 0 * inf is NaN: with an infinite
// value in [x | h] the three column groups are multiplied apart, as torch.nn.GRU's two products do
// (x = +inf gives h = (-1, 0, 0) there, not NaN). Finite inputs keep the one product.
template <typename T>
void gru_product(const at::Tensor& window, const at::Tensor& W, const at::Tensor& P, int64_t H) {
  const int64_t B = window.size(0), K = window.size(1), I = K - H, N = W.size(1);
  const int64_t ldw = row_major_ld(window), ldp = row_major_ld(P);
  const T* x = window.data_ptr<T>();
  if (all_finite(x, B, K, ldw)) {
    product<T>(window, W, P);
    return;
  }
  const T* w = W.data_ptr<T>();
  T* p = P.data_ptr<T>();
  gemm(false, false, B, 2 * H, K, x, ldw, w, N, T(0), p, ldp);                           // r, -z
  gemm(false, false, B, H, I, x, ldw, w + 2 * H, N, T(0), p + 2 * H, ldp);              // x_n: x only
  gemm(false, false, B, H, H, x + I, ldw, w + I * N + 3 * H, N, T(0), p + 3 * H, ldp);  // h_n: h only
}

void stream_gru(const at::Tensor& window, const at::Tensor& W, const at::Tensor& b, const at::Tensor& P,
                const at::Tensor& h) {
  check_step("stream_gru", window, W, b, P, at::Tensor(), h);
  with_floating(window, "rnnkit stream_gru", [&](auto zero) {
    using T = decltype(zero);
    gru_product<T>(window, W, P, h.size(1));       // reads all of window before any h is written
    gru_rows<T>(window.size(0), h.size(1), b.data_ptr<T>(), P.data_ptr<T>(), row_major_ld(P), h.data_ptr<T>(),
                row_major_ld(h));
  });
}

}  // namespace
}  // namespace rnnkit

// h is a view into window ([x | h]): both are in one alias set, written (a schema that said window is only
// read would let a compiler reorder or functionalise the step wrongly).
TORCH_LIBRARY_FRAGMENT(rnnkit_fused, m) {
  m.def("stream_lstm(Tensor(a!) window, Tensor W, Tensor b, Tensor(b!) P, Tensor(c!) c, Tensor(a!) h) -> ()",
        &rnnkit::stream_lstm);
  m.def("stream_gru(Tensor(a!) window, Tensor W, Tensor b, Tensor(b!) P, Tensor(a!) h) -> ()", &rnnkit::stream_gru);
}
