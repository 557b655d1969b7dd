// The kernels' one dtype dispatch: f(0.f) for a float32 tensor, f(0.0) for float64, a refusal naming
// `who` otherwise. The argument's type picks the template instance (`using T = decltype(zero)`).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace rnnkit {

template <typename F>
void with_floating(const at::Tensor& t, const char* who, const F& f) {
  if (t.scalar_type() == at::kFloat) {
    f(0.f);
    return;
  }
  TORCH_CHECK(t.scalar_type() == at::kDouble, who, ": float32 or float64 only");
  f(0.0);
}

}  // namespace rnnkit
