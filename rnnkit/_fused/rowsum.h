// Sums along one row, for the layer norm's moments and the trace's gradient norms.
//
// gcc vectorises a `reduction` loop without -ffast-math, but then adds the vector's lanes one after
// another through the stack: 16 dependent scalar adds per float sum. At H = 64 those chains were a third
// of layernorm_forward's time (perf annotate), and a row's layer norm has two or four of them each way.
// Here a sum runs in one register-wide vector of partial sums (gcc's generic vector types: any x86 or ARM
// target, lowered to what it has) and its lanes are folded by log2(lanes) shuffles at the end; the
// elements that do not fill a vector are added after, one by one.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace rnnkit {

// The widest vector register the build targets (-march=native). A generic vector wider than the
// registers is not free: on an AVX2 machine (AMD EPYC, 32-byte registers) gcc carried the 64-byte
// partial sums through the stack, and layernorm_rows took 29% of an LSTM+LN forward at H = 64 (perf),
// more than the cell itself.
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;                  // SSE, NEON
#endif

// One register-wide vector of T; fold adds lane k ^ s into lane k for s = lanes/2, ..., 1. Each mask is
// a constant built at compile time (index_sequence), which gcc turns into a single permute (masks built
// in a loop at run time measured 2x slower).
template <typename T>
struct Simd {
  static constexpr int kLanes = kVectorBytes / sizeof(T);
  typedef T V __attribute__((vector_size(kVectorBytes)));
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;   // a mask lane as wide as T
  typedef I M __attribute__((vector_size(kVectorBytes)));

  template <int S, size_t... K>
  static V swapped(V v, std::index_sequence<K...>) { return __builtin_shuffle(v, M{I(K ^ S)...}); }

  template <int S = kLanes / 2>
  static T fold(V v) {
    if constexpr (S == 0) {
      return v[0];
    } else {
      return fold<S / 2>(v + swapped<S>(v, std::make_index_sequence<kLanes>{}));
    }
  }
};

template <typename T>
inline typename Simd<T>::V load(const T* p) {
  typename Simd<T>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// sum over j in [0, W) of f(x0[j], x1[j], ...): f is written once, as a generic lambda, and called on
// whole vectors of the rows and then on the leftover scalars.
template <typename T, typename F, typename... Rows>
T row_sum(int64_t W, const F& f, const Rows*... rows) {
  using S = Simd<T>;
  typename S::V acc = {};
  int64_t j = 0;
  for (; j + S::kLanes <= W; j += S::kLanes) acc += f(load<T>(rows + j)...);
  T s = S::fold(acc);
  for (; j < W; ++j) s += f(rows[j]...);
  return s;
}

// Several such sums in one pass over the rows, one vector of partial sums each: fs is a tuple of generic
// lambdas, the result an array of their sums in the same order.
template <typename T, typename Fs, size_t... K, typename... Rows>
std::array<T, sizeof...(K)> row_sums(int64_t W, const Fs& fs, std::index_sequence<K...>, const Rows*... rows) {
  using S = Simd<T>;
  typename S::V acc[sizeof...(K)] = {};
  int64_t j = 0;
  for (; j + S::kLanes <= W; j += S::kLanes) ((acc[K] += std::get<K>(fs)(load<T>(rows + j)...)), ...);
  std::array<T, sizeof...(K)> s{S::fold(acc[K])...};
  for (; j < W; ++j) ((s[K] += std::get<K>(fs)(rows[j]...)), ...);
  return s;
}

template <typename T, typename... F, typename... Rows>
std::array<T, sizeof...(F)> row_sums(int64_t W, const std::tuple<F...>& fs, const Rows*... rows) {
  return row_sums<T>(W, fs, std::index_sequence_for<F...>{}, rows...);
}

}  // namespace rnnkit
