// Shared by the fused scan's forward (forward.cpp), backward (backward.cpp) and op glue (scan.cpp).
//
// Shapes: T time, B batch, H hidden, G gate blocks, W = G*H. Buffers are time-indexed (T, B, .)
// (step t of a reverse scan sits at index t, as in the engine), row-major and contiguous.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "store.h"

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
  bool centred = false;   // under LN: the rows come with zero mean (the caller centred the weights)
  int64_t W() const { return G * H; }
  bool lstm() const { return cell == CellKind::kLSTM; }
  bool gru() const { return cell == CellKind::kGRU; }
  bool elman() const { return cell == CellKind::kTanh || cell == CellKind::kRelu; }
  // Under LN with xi normalised here too, Elman and LSTM add the two normalised rows: both norms run as
  // one (cells.h: layernorm_pair_rows, layernorm_backward_pair), under one d_y, so d beta_x = d beta.
  bool ln_paired(bool ln_x) const { return ln && ln_x && !gru(); }
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

constexpr int64_t kAccSlots = 6;                 // Views::acc

// Elements between two threads' rows of Views::acc: their kAccSlots * W, rounded up to whole 4 KiB pages,
// and one page more, so that no two threads' sums share a page. Each thread adds into its rows at every
// row of its lane; with the rows packed (6 W apart: 1.5 KB at W = 64), the two threads' sums sat in one page,
// and while the host ran the two vCPUs far apart (docs/benchmarks.md) the layer_norm backward measured
// 452-457 us padded against 471-506 packed (RNN B=32 T=100 H=64, the kernel's backward op alone; near
// apart the same, 260-262 against 259-277).
inline int64_t acc_stride(int64_t W, int64_t elem_bytes) {
  constexpr int64_t kPage = 4096;
  return ((kAccSlots * W * elem_bytes + kPage - 1) / kPage * kPage + kPage) / elem_bytes;
}

// What the loops read and write, as raw pointers. Null means absent.
template <typename T>
struct Views {
  // inputs. gamma/beta: LN of the recurrent product; gamma_x/beta_x: LN of xi (null: xi comes normalised);
  // xb: the input projection's bias b_ih, added to each row of xi here (null: xi holds it already)
  const T *xi, *w, *b, *cell_b, *h0, *c0, *gamma, *beta, *gamma_x, *beta_x, *xb, *mask, *rec;
  const T* cut;                                    // backward: (T, B) 1 where truncated BPTT detaches a
                                                   // row's state before step t (null: every k-th step)
  Rows<T> zone[2];
  // saved by the forward; per-step buffers (act, aux, xhat, inv, hr, xhat_x, inv_x) have one slot when
  // `keep` is off, act also when `act_keep` is 0
  T *hs, *cs, *out, *act, *aux, *hr, *xhat, *inv, *xhat_x, *inv_x;
  int64_t keep;                                    // 1: slot t for step t; 0: slot 0 for every step
  // act's own `keep`, 1 when act has a slot per step: under the paired norms an LSTM's gates are a
  // function of xhat and xhat_x, and unless the trace records them the forward keeps one step's and the
  // backward forms them again (scan.cpp: gates_formed_again)
  int64_t act_keep;
  // backward only. d_gh has T slots (gh_keep 1), or for the GRU without LN one slot (gh_keep 0): its
  // r and z blocks equal d_xi's, so only its n block is kept for dU, in d_ghn (T, B, H).
  Rows<T> d_out;
  T *gn, *d_xi, *d_gh, *d_ghn;
  // Parameter gradients summed per thread as the rows go by (no pass over (T, B, W) after the loop):
  // thread k adds its rows into acc + k * acc_stride (acc_stride() above), laid out [d gamma, d beta,
  // d gamma_x, d beta_x, d b_hh, d b_ih] (W each); the threads' sums are added after the loop. Null: none wanted;
  // acc_b, acc_xb: d b_hh, d b_ih (the sum of d_xi) wanted. The d beta_x slot stays unused when the
  // norms are paired (Problem::ln_paired): scan.cpp copies d beta's sum there.
  T* acc;
  int64_t acc_stride = 0;                         // elements between two threads' rows of acc
  bool acc_b, acc_xb;
  bool stream;                                     // GRU without LN: d_xi, d_ghn rows go out non-temporal (store.h)
  int64_t gh_keep;
  // h0 is all zeros (a layer called without a state starts from zeros): the forward skips the first
  // step's product h0 U when U is finite too, the backward dU's h0 term when that step's d_gh is finite
  bool h0_zero;
  // dU summed by the lanes as the steps go (backward.cpp: steps_into_dU), lane l's (H, W) share of dU^T left at
  // dU_lanes + l H W; null: dU is one product over all steps after the loop (scan.cpp: weight_grad), d_gh's
  // rows kept in (T, B, W) for it
  T* dU_lanes = nullptr;
};

// Whether x[0, n) are all exactly zero (a NaN is not), and whether they are all finite: one pass each
// that gcc vectorises, a few microseconds against the product they let the scan skip.
template <typename T>
bool all_zero(int64_t n, const T* x) {
  int nonzero = 0;
  for (int64_t i = 0; i < n; ++i) nonzero |= x[i] != T(0);
  return nonzero == 0;
}

template <typename T>
bool all_finite(int64_t n, const T* x) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(x[i] - x[i] == T(0));   // inf - inf and NaN - NaN are NaN
  return bad == 0;
}

// Whether dU's h0 term, g^T h0 over `rows` rows of d_gh (n wide, ld apart) at the step that read h0, is exactly
// zero and may be left out: h0 all zeros (Views::h0_zero), no recurrent dropout (dU then reads h0 r from Views::hr
// as it is), and every such row finite (0 * inf is NaN). The product after the loop (scan.cpp: weight_grad) and
// dU by steps (backward.cpp: steps_into_dU) leave it out alike.
template <typename T>
bool h0_term_zero(const Views<T>& v, int64_t rows, int64_t n, int64_t ld, const T* g) {
  if (v.hr != nullptr || !v.h0_zero) return false;
  for (int64_t b = 0; b < rows; ++b) {
    if (!all_finite(n, g + b * ld)) return false;
  }
  return true;
}

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

// A worker's own denormal mode, put back when the task ends, by an exception too (a worker left flushing
// denormals would flush them in whatever torch runs on it next).
class RestoreDenormalMode {
 public:
  RestoreDenormalMode() : saved_(DenormalMode::current()) {}
  ~RestoreDenormalMode() { DenormalMode::restore(saved_); }
  RestoreDenormalMode(const RestoreDenormalMode&) = delete;
  RestoreDenormalMode& operator=(const RestoreDenormalMode&) = delete;

 private:
  unsigned saved_;
};

// f(i) for i in [0, n) on the intra-op threads, `grain` at least per thread, each worker running in
// the calling thread's denormal mode.
template <typename F>
void parallel_in_mode(int64_t n, int64_t grain, const F& f) {
  const DenormalMode mode;
  at::parallel_for(0, n, grain, [&](int64_t i0, int64_t i1) {
    const RestoreDenormalMode restore;
    mode.apply();
    for (int64_t i = i0; i < i1; ++i) f(i);
    stream_fence();                                // the task's non-temporal stores (store.h), before its join
  });
}

template <typename F>
void for_rows(const Problem& p, const F& f) {
  parallel_in_mode(p.B, row_grain(p), f);
}

// Lanes. With enough batch rows, the batch is cut into one contiguous range of rows per thread and each
// thread runs the whole time loop on its own rows: its own step products (single-threaded, as BLAS is
// inside a parallel region) and row passes, no hand-off between threads inside a step. Each row's
// arithmetic is the same either way. With fewer rows, one lane holds the batch and each step spreads its
// product and its row pass over the threads. g_min_lane_rows: the fewest rows a lane gets (0: lanes off;
// the benchmarks and tests switch it through the operator set_min_lane_rows). Every lane reads all of U
// at every step, so lanes pay only while U stays in a core's own cache: at most kLaneMaxWeightBytes
// (this box: 2 MB of L2 per core; measured, a 3 MB U runs 3% slower in lanes, a 1 MB U 5-40% faster).
struct Lane {
  int64_t b0, b1;        // rows [b0, b1)
  bool split;            // one of several lanes: run rows serially, in this thread
  int64_t rows() const { return b1 - b0; }
};

inline int64_t g_min_lane_rows = 16;
constexpr int64_t kLaneMaxWeightBytes = int64_t(2) << 20;

// dU by steps. In lanes, each lane can sum its own share of dU = sum_t d_gh_t^T h_in_t as its loop goes: its d_gh
// rows of a few steps kept in its scratch (in the core's cache) with the h_in rows they pair with, and multiplied
// out every kDUChunkRows of them (oneDNN's micro-kernel, K = those rows), so d_gh is never written to a (T, B, W)
// buffer and read back by one product after the loop. Under LN, d_gh is a row of its own, a (T, B, W) buffer more
// than the cell's gradients. Measured on the Zen 5 EPYC (the layer_norm training step against the product after
// the loop, one process, medians of interleaved rounds classed by the cores' round trip, docs/benchmarks.md):
// LSTM B=32 T=200 H=64 6.08 -> 5.62 ms near apart, 6.59 -> 6.05 far; LSTM B=32 T=100 H=128 9.08 -> 8.55 near;
// RNN B=32 T=200 H=64 1.46 -> 1.44 near, 2.05 -> 1.99 far; RNN B=64 T=200 H=64 3.25 -> 3.14 near, 4.73 -> 4.14
// far. Slower where the product after the loop runs at full speed on operands that fit the cache: RNN B=32 T=100
// H=128 2.35 -> 2.41 ms (though B=64 T=200 H=128 8.60 -> 8.22), RNN B=32 T=100 H=256 7.06 -> 7.55, and LSTM
// B=32 T=100 H=256 28.7 -> 30.3 (1 MB of U, and as much of dU^T, per lane). Hence Elman cells up to
// kDUByStepsMaxH[0], the LSTM up to kDUByStepsMaxH[1].
// g_dU_by_steps: 1 there (the default), 2 under any LN wherever lanes run, whatever the dtype, route or size (the
// tests), 0 never; the operator set_weight_grad_by_steps switches it.
inline int64_t g_dU_by_steps = 1;
constexpr int64_t kDUChunkRows = 128;
constexpr int64_t kDUByStepsMaxH[2] = {64, 128};

inline int64_t lane_count(const Problem& p, int64_t elem_bytes) {
  const int64_t threads = at::get_num_threads();
  if (g_min_lane_rows <= 0 || threads < 2 || at::in_parallel_region()) return 1;
  if (p.W() * p.H * elem_bytes > kLaneMaxWeightBytes) return 1;
  const int64_t n = p.B / g_min_lane_rows;
  return n < 2 ? 1 : n < threads ? n : threads;
}

// f(lane, index) for each lane, lanes on the threads; rows split as evenly as they go.
template <typename T, typename F>
void for_lanes(const Problem& p, const F& f) {
  const int64_t n = lane_count(p, sizeof(T));
  if (n == 1) {
    f(Lane{0, p.B, false}, int64_t(0));
    return;
  }
  parallel_in_mode(n, 1, [&](int64_t l) { f(Lane{p.B * l / n, p.B * (l + 1) / n, true}, l); });
}

// f(b) for the lane's rows: in this thread when the lane is one of several, else over the threads.
template <typename F>
void for_lane_rows(const Problem& p, const Lane& lane, const F& f) {
  if (lane.split) {
    for (int64_t b = lane.b0; b < lane.b1; ++b) f(b);
  } else {
    for_rows(p, f);
  }
}

template <typename T> void forward_loop(const Problem& p, const Views<T>& v);
template <typename T> void backward_loop(const Problem& p, const Views<T>& v, int64_t truncate,
                                         const T* d_hT, const T* d_cT, T* d_h0, T* d_c0);

}  // namespace rnnkit
