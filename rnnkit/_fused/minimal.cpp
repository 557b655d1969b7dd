// minGRU / minLSTM (rnnkit/minimal.py) on one block of the blocked scan (rnnkit/parallel.py), fused:
// the bias, the gates, the recurrence h_t = a_t h_{t-1} + b_t and, backwards, the adjoint, the gate
// gradients dP and the bias gradient's per-row sums, in one pass over the block instead of a dozen
// torch ops and one op per step. The products x W^T and dP^T x stay with torch (parallel.py).
//
// The recurrence is elementwise: each lane (b, j) runs its own scalar scan over time, independent of
// every other lane. So the work is split over threads by (row b, chunk of j), and within a task the
// loop runs over time outside and over j inside (a straight loop gcc vectorises).
//
// Gate math, a line-by-line copy of minimal.py's MinGRUCell / MinLSTMCell (their docstrings derive it):
//   minGRU   P = [k_z, k_h]        z = sigmoid(k_z), g~ = g(k_h), a = 1 - z, b = z g~
//   minLSTM  P = [k_f, k_i, k_h]   f' = f/(f+i), i' = i/(f+i), g~ = g(k_h), a = f', b = i' g~
//   g(x) = x + 1/2 for x >= 0, sigmoid(x) below.
// minLSTM's f' and i' are formed from u = 1 + e^{-k_i} and v = 1 + e^{-k_f} (f' = u/(u+v),
// i' = v/(u+v)), both scaled by e^{-m}, m = max(0, -k_f, -k_i), so that no exponential overflows.
// Padding (mask m_t in {0, 1}): a' = 1 - m + a m, b' = b m, as parallel.py's _coefficients.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>

#include "fastmath.h"
#include "floating.h"
#include "scan.h"

namespace rnnkit {
namespace {

using at::Tensor;

enum class MinKind : int64_t { kGRU = 0, kLSTM = 1 };

constexpr int64_t kLanes = 512;                    // j per task: a few kB of each stream per step

template <typename T>
inline T g_(T x) { return x >= T(0) ? x + T(0.5) : sigmoid_(x); }

template <typename T>
inline T g_prime(T x, T gt) { return x > T(0) ? T(1) : gt * (T(1) - gt); }

// a, b and what the backward needs, for lane j of one step.
template <typename T>
struct Gates {
  T a, b, gt, kh, s1, s2;   // kh: k_h. GRU: s1 = z. LSTM: s1 = sigmoid(-k_f), s2 = sigmoid(-k_i)
};

template <MinKind K, typename T>
inline Gates<T> gates(const T* p, const T* c, int64_t H, int64_t j) {
  Gates<T> r;
  if constexpr (K == MinKind::kGRU) {
    T z = sigmoid_(p[j] + c[j]);
    r.kh = p[H + j] + c[H + j];
    r.gt = g_(r.kh);
    r.a = T(1) - z;
    r.b = z * r.gt;
    r.s1 = z;
    r.s2 = T(0);
  } else {
    T kf = p[j] + c[j], ki = p[H + j] + c[H + j];
    T m = -kf > -ki ? -kf : -ki;                  // max(0, -k_f, -k_i), as comparisons (vectorise)
    m = m > T(0) ? m : T(0);
    T em = exp_(-m), ef = exp_(-kf - m), ei = exp_(-ki - m);
    T u = em + ei, v = em + ef;                    // (1 + e^{-k_i}) e^{-m}, (1 + e^{-k_f}) e^{-m}
    T inv = T(1) / (u + v);
    r.kh = p[2 * H + j] + c[2 * H + j];
    r.gt = g_(r.kh);
    r.a = u * inv;                                 // f'
    r.b = v * inv * r.gt;                          // i' g~
    // sigmoid(-k_f), sigmoid(-k_i). In double e^{-m} underflows past m ~ 745 and then u or v is 0 (0/0):
    // there f' i' is 0 too, so any finite value serves (float's exp_ clamps: never 0).
    r.s1 = v > T(0) ? ef / v : T(0);
    r.s2 = u > T(0) ? ei / u : T(0);
  }
  return r;
}

// One step of one row, lanes j0 + [0, n), every pointer offset to j0 (p and c: to column j0 of the
// first gate block): h = a' hp + b'. Raw restrict pointers so that gcc vectorises.
template <MinKind K, typename T>
void step_forward(int64_t H, int64_t n, const T* __restrict__ p, const T* __restrict__ c,
                  const T* __restrict__ hp, T m, T* __restrict__ h) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    Gates<T> r = gates<K>(p, c, H, j);
    h[j] = (T(1) - m + r.a * m) * hp[j] + r.b * m;
  }
}

// One step of one row against processing order, lanes j0 + [0, n): every pointer is offset to j0 (p and
// dp: to column j0 of the first gate block). gc, ac: the carry (g and a' of the step processed next),
// replaced by this step's. dbr: the row's running sum of dP (the bias gradient, summed over rows later).
template <MinKind K, typename T>
void step_backward(int64_t H, int64_t n, const T* __restrict__ p, const T* __restrict__ c, const T* __restrict__ dt,
                   const T* __restrict__ hprev, T m, T* __restrict__ gc, T* __restrict__ ac,
                   T* __restrict__ dp, T* __restrict__ dbr) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    Gates<T> r = gates<K>(p, c, H, j);
    T g = dt[j] + ac[j] * gc[j];
    T da = g * hprev[j] * m, db = g * m;
    if constexpr (K == MinKind::kGRU) {
      T z = r.s1;
      T dz = db * r.gt - da;
      dp[j] = dz * z * (T(1) - z);
      dp[H + j] = db * z * g_prime(r.kh, r.gt);
      dbr[j] += dp[j];
      dbr[H + j] += dp[H + j];
    } else {
      T fi = r.a * (T(1) - r.a);                     // f' i'
      T dd = (db * r.gt - da) * fi;
      dp[j] = -dd * r.s1;
      dp[H + j] = dd * r.s2;
      dp[2 * H + j] = db * (T(1) - r.a) * g_prime(r.kh, r.gt);
      dbr[j] += dp[j];
      dbr[H + j] += dp[H + j];
      dbr[2 * H + j] += dp[2 * H + j];
    }
    gc[j] = g;
    ac[j] = T(1) - m + r.a * m;
  }
}

struct Block {
  MinKind kind;
  bool reverse;
  int64_t Tc, B, H, G;
  int64_t time(int64_t i) const { return reverse ? Tc - 1 - i : i; }   // i-th processed step
};

// f(b, j0, j1) for every row b and chunk [j0, j1) of its lanes, over the threads.
template <typename F>
void for_tasks(const Block& k, const F& f) {
  const int64_t chunks = (k.H + kLanes - 1) / kLanes;
  parallel_in_mode(k.B * chunks, 1, [&](int64_t task) {
    const int64_t b = task / chunks, j0 = (task % chunks) * kLanes;
    f(b, j0, std::min(k.H, j0 + kLanes));
  });
}

template <MinKind K, typename T>
void forward_block(const Block& k, const T* P, const T* c, const T* prev, const T* mask, T* out) {
  const int64_t W = k.G * k.H;
  for_tasks(k, [&](int64_t b, int64_t j0, int64_t j1) {
    const T* hp = prev + b * k.H + j0;
    for (int64_t i = 0; i < k.Tc; ++i) {
      const int64_t row = k.time(i) * k.B + b;
      const T m = mask ? mask[row] : T(1);
      T* h = out + row * k.H + j0;
      step_forward<K>(k.H, j1 - j0, P + row * W + j0, c + j0, hp, m, h);
      hp = h;
    }
  });
}

// Against processing order: g_t = d_t + a_{t+1} g_{t+1} (the carry holds a and g of the step processed
// after the current one: zeros at the end of the sequence), da = g h_{t-1} m, db = g m, then dP.
// d: dL/dh of the block, any strides (the gradient of out.sum() is one expanded scalar); a row that is
// not contiguous is copied to a buffer first, so the lane loop always reads unit stride.
template <MinKind K, typename T>
void backward_block(const Block& k, const T* P, const T* c, const T* h, const T* before, const T* mask,
                    const T* d, const int64_t* ds, T* g_carry, T* a_carry, T* dP, T* db_rows, T* g_out) {
  const int64_t W = k.G * k.H, H = k.H;
  for_tasks(k, [&](int64_t b, int64_t j0, int64_t j1) {
    T buf[kLanes];
    const int64_t n = j1 - j0;
    for (int64_t i = k.Tc - 1; i >= 0; --i) {
      const int64_t t = k.time(i), row = t * k.B + b;
      const T* hprev = i == 0 ? before + b * H : h + (k.time(i - 1) * k.B + b) * H;
      const T m = mask ? mask[row] : T(1);
      const T* dt = d + t * ds[0] + b * ds[1] + j0 * ds[2];
      if (ds[2] != 1) {
        for (int64_t j = 0; j < n; ++j) buf[j] = dt[j * ds[2]];
        dt = buf;
      }
      step_backward<K>(H, n, P + row * W + j0, c + j0, dt, hprev + j0, m, g_carry + b * H + j0,
                       a_carry + b * H + j0, dP + row * W + j0, db_rows + b * W + j0);
      if (g_out) std::copy(g_carry + b * H + j0, g_carry + b * H + j1, g_out + row * H + j0);
    }
  });
}

Block block_of(int64_t kind, bool reverse, const Tensor& P, int64_t H) {
  TORCH_CHECK(kind == 0 || kind == 1, "rnnkit min scan: kind 0 (minGRU) or 1 (minLSTM), got ", kind);
  TORCH_CHECK(P.dim() == 3 && P.is_contiguous(), "rnnkit min scan: P must be a contiguous (Tc, B, G*H)");
  const int64_t G = kind == 0 ? 2 : 3;
  TORCH_CHECK(P.size(2) == G * H, "rnnkit min scan: P has ", P.size(2), " columns, expected ", G * H);
  return Block{static_cast<MinKind>(kind), reverse, P.size(0), P.size(1), H, G};
}

void check_like(const Tensor& t, const Tensor& P, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == P.scalar_type() && t.device().is_cpu(),
              "rnnkit min scan: ", name, " must be a contiguous CPU tensor of P's dtype");
}

// The bias of the pre-activations, added here rather than by the product (one pass less over P).
void check_bias(const Tensor& bias, const Tensor& P) {
  check_like(bias, P, "bias");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == P.size(2), "rnnkit min scan: bias must be (G*H,)");
}

template <typename T>
T* opt_ptr(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void min_forward(int64_t kind, bool reverse, const Tensor& P, const Tensor& bias, const Tensor& prev,
                 const std::optional<Tensor>& mask, const Tensor& out) {
  const Block k = block_of(kind, reverse, P, out.size(2));
  check_bias(bias, P);
  for (const auto& [t, name] : {std::pair{prev, "prev"}, std::pair{out, "out"}}) check_like(t, P, name);
  if (mask.has_value()) check_like(*mask, P, "mask");
  auto run = [&](auto zero) {
    using S = decltype(zero);
    auto f = k.kind == MinKind::kGRU ? forward_block<MinKind::kGRU, S> : forward_block<MinKind::kLSTM, S>;
    f(k, P.data_ptr<S>(), bias.data_ptr<S>(), prev.data_ptr<S>(), opt_ptr<S>(mask), out.data_ptr<S>());
  };
  with_floating(P, "rnnkit min scan", run);
}

void min_backward(int64_t kind, bool reverse, const Tensor& P, const Tensor& bias, const Tensor& h, const Tensor& before,
                  const std::optional<Tensor>& mask, const Tensor& d, const Tensor& g_carry,
                  const Tensor& a_carry, const Tensor& dP, const Tensor& db_rows,
                  const std::optional<Tensor>& g_out) {
  const Block k = block_of(kind, reverse, P, h.size(2));
  check_bias(bias, P);
  for (const auto& [t, name] : {std::pair{h, "h"}, std::pair{before, "before"}, std::pair{g_carry, "g_carry"},
                                std::pair{a_carry, "a_carry"}, std::pair{dP, "dP"}, std::pair{db_rows, "db_rows"}}) {
    check_like(t, P, name);
  }
  TORCH_CHECK(d.dim() == 3 && d.sizes() == h.sizes() && d.scalar_type() == P.scalar_type() && d.device().is_cpu(),
              "rnnkit min scan: d must be a CPU tensor of P's dtype and h's shape");
  TORCH_CHECK(db_rows.dim() == 2 && db_rows.size(0) == k.B && db_rows.size(1) == P.size(2),
              "rnnkit min scan: db_rows must be (B, G*H)");
  if (mask.has_value()) check_like(*mask, P, "mask");
  if (g_out.has_value()) check_like(*g_out, P, "g_out");
  const int64_t ds[3] = {d.stride(0), d.stride(1), d.stride(2)};
  auto run = [&](auto zero) {
    using S = decltype(zero);
    auto f = k.kind == MinKind::kGRU ? backward_block<MinKind::kGRU, S> : backward_block<MinKind::kLSTM, S>;
    f(k, P.data_ptr<S>(), bias.data_ptr<S>(), h.data_ptr<S>(), before.data_ptr<S>(), opt_ptr<S>(mask), d.data_ptr<S>(), ds,
      g_carry.data_ptr<S>(), a_carry.data_ptr<S>(), dP.data_ptr<S>(), db_rows.data_ptr<S>(), opt_ptr<S>(g_out));
  };
  with_floating(P, "rnnkit min scan", run);
}

}  // namespace
}  // namespace rnnkit

TORCH_LIBRARY_FRAGMENT(rnnkit_fused, m) {
  m.def("min_forward(int kind, bool reverse, Tensor P, Tensor bias, Tensor prev, Tensor? mask, Tensor(a!) out) -> ()",
        &rnnkit::min_forward);
  m.def("min_backward(int kind, bool reverse, Tensor P, Tensor bias, Tensor h, Tensor before, Tensor? mask, Tensor d, "
        "Tensor(a!) g_carry, Tensor(b!) a_carry, Tensor(c!) dP, Tensor(d!) db_rows, Tensor(e!)? g_out) -> ()",
        &rnnkit::min_backward);
}
