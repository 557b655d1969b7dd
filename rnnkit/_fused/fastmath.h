// exp, sigmoid and tanh for the fused kernel's elementwise passes.
//
// float: written so that gcc -O3 vectorises a loop that calls them (no libm call, no branch):
// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then the Taylor polynomial of e^r to
// degree 7 (truncation error < 1e-8, below float's 6e-8 rounding), then a multiply by 2^n built
// from its exponent bits. Errors stay within a few ulp, far inside the 1e-5 float32 parity test.
// double: the C library's exp and tanh, so float64 gradchecks see the exact functions.
//
// NaN in, NaN out: the clamps below are written as comparisons that keep a NaN, and a NaN r
// carries through the polynomial. +-Inf saturate as torch's do (sigmoid 0 or 1, tanh -1 or 1).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rnnkit {

inline float clampf(float x, float lo, float hi) {
  x = x < lo ? lo : x;              // NaN < lo is false: NaN stays
  return x > hi ? hi : x;
}

inline float exp_(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;       // ln 2 split so n * kLn2Hi is exact
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  x = clampf(x, -87.3f, 88.3f);                      // 2^n stays a normal float
  float n = std::floor(x * kLog2e + 0.5f);
  float r = (x - n * kLn2Hi) - n * kLn2Lo;           // |r| <= ln2 / 2
  float p = 1.f / 5040.f;                            // sum_{k<=7} r^k / k!, Horner
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;   // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_(double x) { return std::exp(x); }

// float: exp_ clamps its argument, so below -88.72 (where e^{-x} passes FLT_MAX and torch's sigmoid is
// 1 / inf = 0) the result is set to 0, not left at ~4.5e-39: f c with c = inf is then NaN, as in torch.
template <typename T>
inline T sigmoid_(T x) {
  if constexpr (std::is_same_v<T, float>) {
    const float s = 1.f / (1.f + exp_(-x));
    return x < -88.72f ? 0.f : s;
  } else {
    return T(1) / (T(1) + exp_(-x));
  }
}

// tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2|x|) loses digits to cancellation near 0, so small
// arguments take the odd Taylor series instead (to x^9: relative error < 1e-8 for |x| < 0.25).
inline float tanh_(float x) {
  float a = std::fabs(x);
  float e = exp_(-2.f * a);
  float big = (1.f - e) / (1.f + e);
  float x2 = x * x;
  float small = 62.f / 2835.f;
  small = small * x2 - 17.f / 315.f;
  small = small * x2 + 2.f / 15.f;
  small = small * x2 - 1.f / 3.f;
  small = a + a * x2 * small;
  float t = a < 0.25f ? small : big;
  return std::copysign(t, x);
}

inline double tanh_(double x) { return std::tanh(x); }

}  // namespace rnnkit
