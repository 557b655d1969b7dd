// See random.h.
#include "random.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

namespace rnnkit {
namespace {

// SplitMix64's n-th output for this seed (Steele, Lea and Flood 2014): a Weyl sequence, then a mix.
inline uint64_t splitmix64(uint64_t seed, uint64_t n) {
  uint64_t z = seed + (n + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
void fill(T* out, int64_t begin, int64_t end, uint64_t threshold, uint64_t seed) {
  for (int64_t i = begin; i < end; ++i) {
    out[i] = (splitmix64(seed, static_cast<uint64_t>(i)) >> 40) < threshold ? T(1) : T(0);   // 24 bits
  }
}

}  // namespace

at::Tensor bernoulli_mask(at::IntArrayRef shape, double p, int64_t seed, at::ScalarType dtype) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "rnnkit bernoulli_mask: p must lie in [0, 1], got ", p);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "rnnkit bernoulli_mask: float32 or float64");
  at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype));
  const uint64_t threshold = static_cast<uint64_t>(p * double(1 << 24) + 0.5);   // P(1) = threshold / 2^24
  const uint64_t s = static_cast<uint64_t>(seed);
  at::parallel_for(0, out.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    if (dtype == at::kFloat) {
      fill(out.data_ptr<float>(), begin, end, threshold, s);
    } else {
      fill(out.data_ptr<double>(), begin, end, threshold, s);
    }
  });
  return out;
}

}  // namespace rnnkit
