// A block of rows written out transposed, in registers: dst (n, m) with leading dimension ldd = src (m, n)^T,
// src with leading dimension lds. Whole L x L tiles (L: one register's elements, rowsum.h's Simd) are
// transposed by log2(L) rounds of two-register shuffles, each round swapping the off-diagonal halves of ever
// smaller blocks; the rows and columns that do not fill a tile go one element at a time. For dU by steps
// (scan.h), a lane's rows of h_{t-1} once a step: written element by element (each store to another row of the
// destination) they cost the layer_norm backward 71 us of its ~900 (RNN B=32 T=200 H=64, against leaving them
// out, which gives wrong numbers), by tiles 33 us.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "rowsum.h"

namespace rnnkit {

template <typename T>
struct Tile {
  using S = Simd<T>;
  using V = typename S::V;
  using M = typename S::M;
  using I = typename S::I;
  static constexpr int L = S::kLanes;

  // Round s on rows (a, b) = (i, i + s), i with bit s clear: a keeps its columns without bit s and takes b's
  // columns k ^ s for those with it; b the other way round. Masks index the pair (a, b) as [0, 2L).
  template <int s, size_t... K>
  static void round(V& a, V& b, std::index_sequence<K...>) {
    constexpr M lo{I((K & s) ? L + (K ^ s) : K)...};
    constexpr M hi{I((K & s) ? L + K : (K ^ s))...};
    const V na = __builtin_shuffle(a, b, lo), nb = __builtin_shuffle(a, b, hi);
    a = na;
    b = nb;
  }

  template <int s>
  static void rounds(V* r) {
    if constexpr (s >= 1) {
      for (int i = 0; i < L; ++i) {
        if ((i & s) == 0) round<s>(r[i], r[i + s], std::make_index_sequence<L>{});
      }
      rounds<s / 2>(r);
    }
  }

  static void transpose(const T* src, int64_t lds, T* dst, int64_t ldd) {
    V r[L];
    for (int i = 0; i < L; ++i) std::memcpy(&r[i], src + i * lds, sizeof(V));
    rounds<L / 2>(r);
    for (int i = 0; i < L; ++i) std::memcpy(dst + i * ldd, &r[i], sizeof(V));
  }
};

template <typename T>
void transpose_block(int64_t m, int64_t n, const T* src, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t L = Tile<T>::L;
  const int64_t m0 = m / L * L, n0 = n / L * L;
  for (int64_t i = 0; i < m0; i += L) {
    for (int64_t j = 0; j < n0; j += L) Tile<T>::transpose(src + i * lds + j, lds, dst + j * ldd + i, ldd);
  }
  for (int64_t i = 0; i < m; ++i) {                     // the tails: columns past n0 of every row, rows past m0
    for (int64_t j = i < m0 ? n0 : 0; j < n; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
}

}  // namespace rnnkit
