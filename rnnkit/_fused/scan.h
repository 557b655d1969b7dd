// Shared by the fused scan's forward (forward.cpp), backward (backward.cpp) and op glue (scan.cpp).
//
// Shapes: T time, B batch, H hidden, G gate blocks, W = G*H. Buffers are time-indexed (T, B, .)
// (step t of a reverse scan sits at index t, as in the engine), row-major and contiguous.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

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

// A (T, B, H) tensor read one (t, b) row at a time, with strides: 0 along a broadcast dimension
// (zoneout shares of shape (1, 1, H); the gradient of out.sum(), a scalar expanded to (T, B, H)).
template <typename T>
struct Rows {
  const T* p = nullptr;
  int64_t st = 0, sb = 0, sj = 1;                  // sj: 1, or 0 when one value fills the row
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
  // backward only. d_gh has T slots (gh_keep 1), or for the GRU without LN one slot (gh_keep 0): its
  // r and z blocks equal d_xi's, so only its n block is kept for dU, in d_ghn (T, B, H).
  Rows<T> d_out;
  T *gn, *d_xi, *d_gh, *d_ghn, *dgamma, *dbeta;
  int64_t gh_keep;
};

// Rows of one step handed to each thread: enough elementwise work per task to pay for the hand-off.
inline int64_t row_grain(const Problem& p) {
  constexpr int64_t kWorkPerTask = 16384;
  int64_t g = kWorkPerTask / (p.W() > 0 ? p.W() : 1);
  return g < 1 ? 1 : g;
}

// The calling thread's denormal mode, carried into the worker threads. The backward runs with
// denormals flushed to zero (rnnkit/numerics.py: a gradient decaying through many steps otherwise
// crawls through denormals ~100x slower), and that switch (MXCSR's FTZ and DAZ bits) is per thread.
class DenormalMode {
 public:
#if defined(__SSE2__)
  DenormalMode() : bits_(_mm_getcsr() & kFlushBits) {}
  void apply() const { _mm_setcsr((_mm_getcsr() & ~kFlushBits) | bits_); }
  static unsigned current() { return _mm_getcsr(); }
  static void restore(unsigned csr) { _mm_setcsr(csr); }

 private:
  static constexpr unsigned kFlushBits = 0x8040;   // FTZ | DAZ
  unsigned bits_;
#else
  void apply() const {}
  static unsigned current() { return 0; }
  static void restore(unsigned) {}
#endif
};

// f(i) for i in [0, n) on the intra-op threads, `grain` at least per thread, each worker running in
// the calling thread's denormal mode.
template <typename F>
void parallel_in_mode(int64_t n, int64_t grain, const F& f) {
  const DenormalMode mode;
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    const unsigned saved = DenormalMode::current();
    mode.apply();
    for (int64_t i = i0; i < i1; ++i) f(i);
    DenormalMode::restore(saved);
  });
}

template <typename F>
void for_rows(const Problem& p, const F& f) {
  parallel_in_mode(p.B, row_grain(p), f);
}

template <typename T> void forward_loop(const Problem& p, const Views<T>& v);
template <typename T> void backward_loop(const Problem& p, const Views<T>& v, int64_t truncate,
                                         const T* d_hT, const T* d_cT, T* d_h0, T* d_c0);

}  // namespace rnnkit
