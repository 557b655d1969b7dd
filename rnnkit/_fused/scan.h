// Shared by the fused scan's forward (forward.cpp), backward (backward.cpp) and op glue (scan.cpp).
//
// Shapes: T time, B batch, H hidden, G gate blocks, W = G*H. Buffers are time-indexed (T, B, .)
// (step t of a reverse scan sits at index t, as in the engine), row-major and contiguous.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace rnnkit {

enum class CellKind : int64_t { kTanh = 0, kRelu = 1, kLSTM = 2, kGRU = 3 };

// Sizes and switches of one scan.
struct Problem {
  CellKind cell;
  bool ln;          // LayerNormCell around the cell
  bool reverse;
  int64_t T, B, H, G;
  int64_t W() const { return G * H; }
  bool lstm() const { return cell == CellKind::kLSTM; }
  bool gru() const { return cell == CellKind::kGRU; }
  bool elman() const { return cell == CellKind::kTanh || cell == CellKind::kRelu; }
  int64_t time(int64_t i) const { return reverse ? T - 1 - i : i; }     // i-th processed step
  int64_t before(int64_t t) const { return reverse ? t + 1 : t - 1; }   // step processed before t
};

// A (T or 1, B or 1, H) tensor of per-unit values (zoneout shares), read one (t, b) row at a time.
template <typename T>
struct Rows {
  const T* p = nullptr;
  int64_t st = 0, sb = 0;                          // 0 along a broadcast dimension
  const T* row(int64_t t, int64_t b) const { return p ? p + t * st + b * sb : nullptr; }
};

// What the loops read and write, as raw pointers. Null means absent.
template <typename T>
struct Views {
  // inputs
  const T *xi, *w, *b, *cell_b, *h0, *c0, *gamma, *beta, *mask, *rec;
  Rows<T> zone[2];
  // saved by the forward; per-step buffers (act, aux, xhat, inv, hr) have one slot when `keep` is off
  T *hs, *cs, *out, *act, *aux, *hr, *xhat, *inv;
  int64_t keep;                                    // 1: slot t for step t; 0: slot 0 for every step
  // backward only
  const T *d_out;
  T *gn, *d_xi, *d_gh, *dgamma, *dbeta;
};

// Rows of one step handed to each thread: enough elementwise work per task to pay for the hand-off.
inline int64_t row_grain(const Problem& p) {
  constexpr int64_t kWorkPerTask = 16384;
  int64_t g = kWorkPerTask / (p.W() > 0 ? p.W() : 1);
  return g < 1 ? 1 : g;
}

template <typename F>
void for_rows(const Problem& p, const F& f) {
  at::parallel_for(0, p.B, row_grain(p), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

template <typename T> void forward_loop(const Problem& p, const Views<T>& v);
template <typename T> void backward_loop(const Problem& p, const Views<T>& v, int64_t truncate,
                                         const T* d_hT, const T* d_cT, T* d_h0, T* d_c0);

}  // namespace rnnkit
