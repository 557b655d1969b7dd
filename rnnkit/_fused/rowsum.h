// Sums along one row, for the layer norm's moments and the trace's gradient norms.
//
// gcc vectorises a `reduction` loop without -ffast-math, but then adds the vector's lanes one after
// another through the stack: 16 dependent scalar adds per float sum. At H = 64 those chains were a third
// of layernorm_forward's time (perf annotate), and a row's layer norm has two or four of them each way.
// Here a sum runs in one 64-byte vector of partial sums (gcc's generic vector types: any x86 or ARM
// target, lowered to what it has) and its lanes are folded by log2(lanes) shuffles at the end; the
// elements that do not fill a vector are added after, one by one.
#pragma once

#include <cstdint>
#include <cstring>

namespace rnnkit {

// One 64-byte vector of T; fold adds lane k ^ s into lane k for s = lanes/2, ..., 1 (spelled out per
// type: gcc turns constant masks into single permutes, but not masks built in a loop, measured 2x slower).
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t M __attribute__((vector_size(64)));
  static constexpr int kLanes = 16;
  static float fold(V v) {
    v += __builtin_shuffle(v, M{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, M{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, M{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v += __builtin_shuffle(v, M{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
  }
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t M __attribute__((vector_size(64)));
  static constexpr int kLanes = 8;
  static double fold(V v) {
    v += __builtin_shuffle(v, M{4, 5, 6, 7, 0, 1, 2, 3});
    v += __builtin_shuffle(v, M{2, 3, 0, 1, 6, 7, 4, 5});
    v += __builtin_shuffle(v, M{1, 0, 3, 2, 5, 4, 7, 6});
    return v[0];
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

// Two such sums in one pass over the rows.
template <typename T, typename F1, typename F2, typename... Rows>
void row_sums(int64_t W, T& s1, T& s2, const F1& f1, const F2& f2, const Rows*... rows) {
  using S = Simd<T>;
  typename S::V a1 = {}, a2 = {};
  int64_t j = 0;
  for (; j + S::kLanes <= W; j += S::kLanes) {
    a1 += f1(load<T>(rows + j)...);
    a2 += f2(load<T>(rows + j)...);
  }
  s1 = S::fold(a1);
  s2 = S::fold(a2);
  for (; j < W; ++j) {
    s1 += f1(rows[j]...);
    s2 += f2(rows[j]...);
  }
}

}  // namespace rnnkit
