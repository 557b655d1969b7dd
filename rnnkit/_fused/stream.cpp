// One time step of a plain LSTM layer for rk.Stream (rnnkit/stream_kernels.py's LSTMKernel), in one call:
// P = [x | h] W + b (one product), then per unit i, f, o = sigmoid, g = tanh, c = f c + i g, h = o tanh(c),
// written in place. The torch-op kernel takes seven operator calls a step (~6 us at H = 32, batch 1, most of
// it per-call overhead); this one takes one. Gate order of W's columns and b: i, f, o, g (as LSTMKernel
// stacks them).
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "blas.h"
#include "fastmath.h"

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

bool rows_unit(const at::Tensor& t) { return t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= t.size(1); }

void stream_lstm(const at::Tensor& window, const at::Tensor& W, const at::Tensor& b, const at::Tensor& P,
                 const at::Tensor& c, const at::Tensor& h) {
  const int64_t B = window.size(0), K = window.size(1), H = h.size(1);
  const auto dt = window.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "rnnkit stream_lstm: float32 or float64 only");
  for (const at::Tensor* t : {&W, &b, &P, &c, &h}) {
    TORCH_CHECK(t->scalar_type() == dt && t->device().is_cpu(), "rnnkit stream_lstm: CPU tensors of one dtype");
  }
  for (const at::Tensor* t : {&window, &W, &b, &P, &c, &h}) {
    TORCH_CHECK(!t->is_neg() && !t->is_conj() && t->layout() == at::kStrided,
                "rnnkit stream_lstm: dense tensors without a lazy negation");
  }
  // Written: P, c, h (h may lie inside window: it is written after the product has read window). ATen
  // tells overlap only between contiguous tensors; rk.Stream's views are apart by construction.
  for (const at::Tensor* t : {&window, &W, &b, &c, &h}) at::assert_no_overlap(P, *t);
  for (const at::Tensor* t : {&window, &W, &b, &h}) at::assert_no_overlap(c, *t);
  for (const at::Tensor* t : {&W, &b}) at::assert_no_overlap(h, *t);
  TORCH_CHECK(b.dim() == 1 && window.device().is_cpu() && rows_unit(window) && rows_unit(P) && rows_unit(c) && rows_unit(h) &&
              W.is_contiguous() && b.is_contiguous() && W.dim() == 2 && W.size(0) == K && W.size(1) == 4 * H &&
              b.numel() == 4 * H && P.size(0) == B && P.size(1) == 4 * H && c.size(0) == B && c.size(1) == H &&
              h.size(0) == B, "rnnkit stream_lstm: expected window (B, K), W (K, 4H), b (4H,), P (B, 4H), "
              "c and h (B, H) with unit column stride");
  auto run = [&](auto zero) {
    using T = decltype(zero);
    gemm(false, false, B, 4 * H, K, window.data_ptr<T>(), window.stride(0), W.data_ptr<T>(), 4 * H, T(0),
         P.data_ptr<T>(), P.stride(0));
    lstm_rows<T>(B, H, b.data_ptr<T>(), P.data_ptr<T>(), P.stride(0), c.data_ptr<T>(), c.stride(0),
                 h.data_ptr<T>(), h.stride(0));
  };
  if (dt == at::kFloat) {
    run(0.f);
  } else {
    run(0.0);
  }
}

}  // namespace
}  // namespace rnnkit

TORCH_LIBRARY_FRAGMENT(rnnkit_fused, m) {
  m.def("stream_lstm(Tensor window, Tensor W, Tensor b, Tensor(a!) P, Tensor(b!) c, Tensor(c!) h) -> ()",
        &rnnkit::stream_lstm);
}
