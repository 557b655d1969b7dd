// The fused scan's backward through time, the same lines as rnnkit/engine.py's _Scan.backward, steps
// in reverse processing order. Per step and batch row:
//     dh      = carry_h + (d_gh_{t+1} U) * r + m_t d_out_t     all that reaches h_t; ||dh|| to the trace
//     d_pass  = d - d m_t;  d = d m_t                          padding: the kept state passes around
//     d_pass += d z_t;      d = d - d z_t                      zoneout: so does the kept share
//     d_xi, d_gh, direct = cell backward(d)                    (cells.h)
//     carry   = direct + d_pass                                what reaches s_{t-1} around U
// then one product per step, d_gh_t U (B, H), unless truncated BPTT cuts the carry right here (every
// k-th step; with padding, per row at its own k-th real step: Views::cut).
// The weight gradients come after the loop as one product over all steps: dU = sum_t d_gh_t^T (h_{t-1} r); or,
// under dU by steps (scan.h), each lane sums its share a few steps at a time as the loop goes (steps_into_dU).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "blas.h"
#include "cells.h"
#include "scan.h"
#include "transpose.h"

namespace rnnkit {
namespace {

// Per-row scratch of the loop for batch rows [b0, b1): (b1 - b0, H) each, plus (b1 - b0, W) dy under LN (the
// GRU's d_y, or the LSTM's gates formed again). Each lane has its own, allocated by the lane's thread: the
// carries are read and written at every step, and with the lanes' rows side by side in one buffer, while
// the host ran the two vCPUs far apart (docs/benchmarks.md) the backward measured 459 us against 497-505 for
// the layer_norm RNN and 351 against 361-364 plain, B=32 T=100 H=64, with acc_stride's padding too (scan.h);
// near apart the same. The lanes leave their rows of what reaches step -1 (h, d_gh U, c) in one set of those
// three for all rows.
template <typename T>
struct Carry {
  int64_t b0 = 0;                        // the first batch row held: row b at (b - b0) * H
  std::vector<T> h, c, gw, dh, dc, dy;   // carries to step t-1; d_gh U; d_new of h; d_new of c (LSTM)
                                         // or the direct dh z (GRU, when a d_pass must be added); dy: per
                                         // row (W), the GRU's d_y under LN, or the LSTM's gates formed again
  std::vector<T> xs;                     // per thread, (W): a d_xi row before it is streamed out
  // dU by steps (Views::dU_lanes): the lane's d_gh rows of the steps not yet multiplied out, (chunk rows, W); the
  // h_in rows they pair with, transposed, (H, chunk rows); how many steps those hold (of `chunk`); the lane's
  // share of dU^T, (H, W). All empty otherwise.
  std::vector<T> gh, ht, du;
  int64_t held = 0, chunk = 0, rows = 0;
  int64_t at(int64_t b, int64_t n) const { return (b - b0) * n; }   // offset of row b, n per row
};

// Where row b of step t's d_gh goes: the lane's scratch under dU by steps, else the (T, B, W) buffer (one slot
// for the GRU without LN: gh_keep 0).
template <typename T>
T* d_gh_row(const Problem& p, const Views<T>& v, Carry<T>& k, int64_t t, int64_t b) {
  if (!k.du.empty()) return k.gh.data() + (k.held * k.rows + b - k.b0) * p.W();
  return v.d_gh + (t * v.gh_keep * p.B + b) * p.W();
}

// What a lane knows of its carries (the same in every lane: it depends on the step, not the row).
struct Live {
  bool h = false;                                  // Carry::h holds a gradient (else it is all zeros)
  bool gw = false;                                 // Carry::gw holds step t+1's d_gh U
};

// dh = term(j) or dh += term(j): the first term present assigns, so absent terms cost nothing.
template <typename T, typename F>
void accumulate(int64_t H, bool& first, T* dh, const F& term) {
  if (first) {
    for (int64_t j = 0; j < H; ++j) dh[j] = term(j);
  } else {
    for (int64_t j = 0; j < H; ++j) dh[j] += term(j);
  }
  first = false;
}

// dh = carry + gw r + m d_out: around the cell, through U (times the dropout mask), from out_t.
// Null terms are absent (the engine's None). d_out_sj = 0: one value of d_out fills the row.
template <typename T>
void gather_dh(int64_t H, const T* carry, const T* gw, const T* rec, const T* d_out, int64_t d_out_sj,
               const T* m, T* dh) {
  bool first = true;
  if (carry != nullptr) accumulate(H, first, dh, [&](int64_t j) { return carry[j]; });
  if (gw != nullptr && rec != nullptr) {
    accumulate(H, first, dh, [&](int64_t j) { return gw[j] * rec[j]; });
  } else if (gw != nullptr) {
    accumulate(H, first, dh, [&](int64_t j) { return gw[j]; });
  }
  if (d_out != nullptr && d_out_sj == 0) {
    const T g = m != nullptr ? d_out[0] * *m : d_out[0];
    accumulate(H, first, dh, [&](int64_t) { return g; });
  } else if (d_out != nullptr && m != nullptr) {
    const T mv = *m;
    accumulate(H, first, dh, [&](int64_t j) { return d_out[j] * mv; });
  } else if (d_out != nullptr) {
    accumulate(H, first, dh, [&](int64_t j) { return d_out[j]; });
  }
  if (first) std::fill(dh, dh + H, T(0));
}

// ||d|| for the trace. A float row's squares overflow past ~1.8e19 though its norm fits float up to ~3.4e38,
// and below ~1e-19 they are denormal, which the backward flushes to zero (numerics.py): a row whose sum
// falls outside [1e-30, max] (the norm outside [1e-15, ...]) is summed again in double, where neither
// happens (an exploding or a vanishing gradient's norm stays exact). A gradient of exact zeros costs one more pass.
template <typename T>
T norm(int64_t H, const T* d) {
  const T r = std::sqrt(row_sum<T>(H, [](auto a) { return a * a; }, d));
  if (r >= T(1e-15) && r <= std::numeric_limits<T>::max()) return r;
  double s = 0;
  for (int64_t j = 0; j < H; ++j) s += double(d[j]) * double(d[j]);
  return T(std::sqrt(s));
}

// Reverse of padding then zoneout: splits d (the gradient of s_t) into the part that enters the
// cell (left in d) and the part that passes to s_{t-1} around it (written to pass).
template <typename T>
void split(int64_t H, T* d, const T* m, const T* z, T* pass) {
  if (m != nullptr) {
    const T mv = *m;
    for (int64_t j = 0; j < H; ++j) {
      pass[j] = d[j] - d[j] * mv;
      d[j] = d[j] * mv;
    }
    if (z != nullptr) {
      for (int64_t j = 0; j < H; ++j) {
        pass[j] += d[j] * z[j];
        d[j] = d[j] - d[j] * z[j];
      }
    }
  } else {
    for (int64_t j = 0; j < H; ++j) {
      pass[j] = d[j] * z[j];
      d[j] = d[j] - d[j] * z[j];
    }
  }
}

template <typename T>
void add_into(int64_t H, const T* a, T* acc) {     // acc = a + acc  (direct + pass, in that order)
  for (int64_t j = 0; j < H; ++j) acc[j] = a[j] + acc[j];
}

// Whether any gradient passes around the cell (padding or zoneout): then the carries hold d_pass.
template <typename T>
bool goes_around(const Views<T>& v) {
  return v.mask != nullptr || v.zone[0].p != nullptr || v.zone[1].p != nullptr;
}

// The cell's step backward for row b of step t, leaving in the carries what reaches s_{t-1}
// directly; the LN path then maps d_y to the raw d_gh.
template <typename T>
void cell_backward(const Problem& p, const Views<T>& v, Carry<T>& k, int64_t t, int64_t b,
                   const T* h_prev, const T* c_prev, bool around) {
  const int64_t H = p.H, W = p.W(), row = t * p.B + b, r = k.at(b, H);   // r: the row in the carries
  T *dh = k.dh.data() + r, *dc = k.dc.data() + r, *ch = k.h.data() + r;
  const int64_t thread = v.acc != nullptr || v.stream ? at::get_thread_num() : 0;   // its rows of Views::acc, Carry::xs
  T* d_xi = v.d_xi + row * W;
  T* d_y = p.ln ? (p.gru() ? k.dy.data() + k.at(b, W) : d_xi)     // what the cell calls d_gh
                : d_gh_row(p, v, k, t, b);
  if (p.elman()) {
    const T* hc = v.act ? v.act + row * H : v.hs + row * H;
    elman_backward(H, p.cell == CellKind::kRelu, dh, hc, d_xi);
  } else if (p.lstm()) {
    T* cc = k.c.data() + r;
    const T* act;
    if (v.act_keep) {
      act = v.act + row * W;
    } else {                                           // the gates, not kept: formed again, in the row's scratch
      T* a = k.dy.data() + k.at(b, W);                 // (act has one slot: row * W would point past it)
      lstm_gates_again(H, v.xhat + row * W, v.xhat_x + row * W, v.gamma, v.beta, v.gamma_x, v.beta_x, a);
      act = a;
    }
    lstm_backward(H, dh, around ? dc : cc, act, v.aux + row * H, c_prev, d_xi);
    if (around) add_into(H, dc, cc);                   // carry_c = dc f + d_pass
  } else {
    T* dx = v.stream ? k.xs.data() + thread * W : d_xi;
    gru_backward(H, dh, v.act + row * W, v.aux + row * H, h_prev, dx, d_y, around ? dc : ch);
    if (around) add_into(H, dc, ch);                   // carry_h = dh z + d_pass
    if (v.stream) {                                    // out to memory; the sums below read the copy here
      stream_row(d_xi, dx, W);
      d_xi = dx;
      stream_row(v.d_ghn + row * H, d_y + 2 * H, H);
    } else if (v.d_ghn != nullptr) {
      std::memcpy(v.d_ghn + row * H, d_y + 2 * H, sizeof(T) * H);
    }
  }
  T* acc = v.acc == nullptr ? nullptr : v.acc + thread * v.acc_stride;   // scan.h: Views::acc
  if (p.ln_paired(v.gamma_x != nullptr)) {          // both norms under one d_y (Elman, LSTM), fused
    layernorm_backward_pair(W, d_xi, v.xhat + row * W, v.inv[row], v.gamma, v.xhat_x + row * W, v.inv_x[row],
                            v.gamma_x, acc, acc + W, acc + 2 * W, v.acc_b ? acc + 4 * W : nullptr,
                            v.acc_xb ? acc + 5 * W : nullptr, d_gh_row(p, v, k, t, b));
    return;                                            // (d beta_x = d beta: scan.cpp copies it)
  }
  if (p.ln) {                                          // d_y to the raw d_gh, through LN's backward
    T* d_gh = d_gh_row(p, v, k, t, b);
    layernorm_backward(W, d_y, v.xhat + row * W, v.inv[row], v.gamma, acc, acc + W, d_gh);
    d_y = d_gh;
    if (v.gamma_x != nullptr) {                        // xi came raw: d_xi back through its LN, in place
      layernorm_backward(W, d_xi, v.xhat_x + row * W, v.inv_x[row], v.gamma_x, acc + 2 * W, acc + 3 * W, d_xi);
    }
  }
  if (v.acc_b) add_into(W, d_y, acc + 4 * W);         // d b_hh
  if (v.acc_xb) add_into(W, d_xi, acc + 5 * W);       // d b_ih
}

template <typename T>
void backward_row(const Problem& p, const Views<T>& v, Carry<T>& k, Live live, int64_t t, int64_t b,
                  const T* h_prev, const T* c_prev, bool around) {
  const int64_t H = p.H, row = t * p.B + b, r = k.at(b, H);              // r: the row in the carries
  const T* m = v.mask ? v.mask + row : nullptr;
  T *dh = k.dh.data() + r, *ch = k.h.data() + r;
  gather_dh(H, live.h ? ch : nullptr, live.gw ? k.gw.data() + r : nullptr,
            v.rec ? v.rec + b * H : nullptr, v.d_out.row(t, b), v.d_out.sj, m, dh);
  if (v.gn != nullptr) v.gn[row] = norm(H, dh);
  if (around) {
    split(H, dh, m, v.zone[0].row(t, b), ch);          // ch: d_pass of h from here on
    if (p.lstm()) {
      T *dc = k.dc.data() + r, *cc = k.c.data() + r;
      std::memcpy(dc, cc, sizeof(T) * H);
      split(H, dc, m, v.zone[1].row(t, b), cc);
    }
  }
  cell_backward(p, v, k, t, b, h_prev + b * H, c_prev ? c_prev + b * H : nullptr, around);
}

// Under LN, row b of the step processed next (t_next), fetched from the saved xhat rows a step ahead: at
// small W a row's LN backward is short and otherwise waits on memory, as the steps go backward in time,
// where the hardware prefetcher does not follow (LSTM B=64 T=200 H=64, LN backward alone: 120 -> 87 ns a
// row). Only for rows of up to kPrefetchRowBytes: at W = 1536 (GRU H=512) it slowed the LN backward 2.5%,
// as software prefetch of the cells' own saved rows had slowed the plain loop (6%).
constexpr int64_t kPrefetchRowBytes = 2048;

template <typename T>
void prefetch_ln_rows(const Problem& p, const Views<T>& v, int64_t t_next, int64_t b) {
  const int64_t W = p.W(), at = (t_next * p.B + b) * W;
  for (int64_t j = 0; j < W; j += 64 / int64_t(sizeof(T))) {
    __builtin_prefetch(v.xhat + at + j);
    if (v.xhat_x != nullptr) __builtin_prefetch(v.xhat_x + at + j);
  }
}

// dU by steps (scan.h): step i's d_gh rows of the lane, in its scratch, join those held, with the h_in rows they
// pair with written transposed beside them; once `chunk` steps are held, and at the last step, one product adds
// h_in^T d_gh into the lane's dU^T. The h0 term is left out as after the loop (scan.h: h0_term_zero).
template <typename T>
void steps_into_dU(const Problem& p, const Views<T>& v, Carry<T>& k, int64_t i, int64_t t, const T* h_prev) {
  const int64_t H = p.H, W = p.W(), nb = k.rows, ld = k.chunk * nb;
  if (!(i == 0 && h0_term_zero(v, nb, W, W, d_gh_row(p, v, k, t, k.b0)))) {
    const T* h_in = v.hr != nullptr ? v.hr + (t * p.B + k.b0) * H : h_prev + k.b0 * H;
    transpose_block(nb, H, h_in, H, k.ht.data() + k.held * nb, ld);
    ++k.held;
  }
  if (k.held > 0 && (k.held == k.chunk || i == 0)) {
    add_product(H, W, k.held * nb, k.ht.data(), ld, k.gh.data(), W, k.du.data(), W);
    k.held = 0;
  }
}

// Step i on the lane's rows; returns what the lane's carries hold for step i-1.
template <typename T>
Live backward_step(const Problem& p, const Views<T>& v, const Lane& lane, const StepProduct<T>& times_u,
                   Carry<T>& k, Live live, int64_t i, bool cut, bool product) {
  const int64_t t = p.time(i), B = p.B, H = p.H, W = p.W(), b0 = lane.b0, nb = lane.rows();
  const T* h_prev = i == 0 ? v.h0 : v.hs + p.before(t) * B * H;
  const T* c_prev = !p.lstm() ? nullptr : i == 0 ? v.c0 : v.cs + p.before(t) * B * H;
  const bool around = goes_around(v), fetch = p.ln && i > 0 && W * int64_t(sizeof(T)) <= kPrefetchRowBytes;
  const int64_t t_next = fetch ? p.time(i - 1) : 0;
  for_lane_rows(p, lane, [&](int64_t b) {
    if (fetch) prefetch_ln_rows(p, v, t_next, b);
    backward_row(p, v, k, live, t, b, h_prev, c_prev, around);
  });
  const T* d_gh = d_gh_row(p, v, k, t, b0);         // the lane's rows of this step
  if (!k.du.empty()) steps_into_dU(p, v, k, i, t, h_prev);   // (before a cut: the step's d_gh reaches U all the same)
  if (cut) {                                       // truncated BPTT: the state was detached here
    std::fill_n(k.h.begin() + k.at(b0, H), nb * H, T(0));
    if (p.lstm()) std::fill_n(k.c.begin() + k.at(b0, H), nb * H, T(0));
    return Live{};
  }
  if (product) times_u(d_gh, k.gw.data() + k.at(b0, H));   // d_gh U  (rows, H)
  if (v.cut != nullptr) {                          // rows with padding: each cut at its own k-th step
    for (int64_t b = b0; b < b0 + nb; ++b) {
      if (v.cut[t * B + b] == T(0)) continue;
      const int64_t r = k.at(b, H);
      std::fill_n(k.h.begin() + r, H, T(0));
      if (p.lstm()) std::fill_n(k.c.begin() + r, H, T(0));
      if (product) std::fill_n(k.gw.begin() + r, H, T(0));
    }
  }
  return Live{around || p.gru(), product};        // h: else nothing reaches h_{t-1} but through U
}

// The carries for rows [b0, b1): what reaches the last states (d_hT, d_cT; null: zeros), and scratch; threads:
// how many may run the lane's rows (Carry::xs has a row for each), counted before the lanes' parallel region:
// inside it at::get_num_threads() can read 1 (a lane's worker, on a process that never called
// torch.set_num_threads), and the second lane's thread then wrote its d_xi row past the end of xs.
template <typename T>
Carry<T> make_carry(const Problem& p, const Views<T>& v, int64_t b0, int64_t b1, const T* d_hT, const T* d_cT,
                    int64_t threads) {
  const int64_t H = p.H, n = (b1 - b0) * H;
  Carry<T> k;
  k.b0 = b0;
  k.h.assign(n, T(0));
  k.c.assign(p.lstm() ? n : 0, T(0));
  k.gw.resize(n);
  k.dh.resize(n);
  k.dc.resize(n);
  k.dy.resize(p.ln && (p.gru() || (p.lstm() && !v.act_keep)) ? static_cast<size_t>((b1 - b0) * p.W()) : 0);
  k.xs.resize(v.stream ? static_cast<size_t>(threads * p.W()) : 0);
  if (v.dU_lanes != nullptr) {
    k.rows = b1 - b0;
    k.chunk = std::max<int64_t>(1, kDUChunkRows / k.rows);
    k.gh.resize(static_cast<size_t>(k.chunk * k.rows * p.W()));
    k.ht.resize(static_cast<size_t>(p.H * k.chunk * k.rows));
    k.du.assign(static_cast<size_t>(p.H * p.W()), T(0));
  }
  if (d_hT != nullptr) std::copy(d_hT + b0 * H, d_hT + b1 * H, k.h.begin());
  if (d_cT != nullptr) std::copy(d_cT + b0 * H, d_cT + b1 * H, k.c.begin());
  return k;
}

}  // namespace

template <typename T>
void backward_loop(const Problem& p, const Views<T>& v, int64_t truncate, const T* d_hT, const T* d_cT,
                   T* d_h0, T* d_c0) {
  // what reaches step -1, all rows: each lane's own carries (scratch included) leave their rows here
  const size_t BH = static_cast<size_t>(p.B * p.H);
  Carry<T> k;
  k.h.resize(BH);
  k.gw.resize(BH);
  k.c.resize(p.lstm() ? BH : 0);
  Live last;
  const int64_t threads = at::get_num_threads();
  for_lanes<T>(p, [&](const Lane& lane, int64_t l) {
    const StepProduct<T> times_u(v.w, p.W(), p.H, lane.rows(), true, p.T);
    Carry<T> own = make_carry(p, v, lane.b0, lane.b1, d_hT, d_cT, threads);
    Live live{d_hT != nullptr, false};
    for (int64_t i = p.T - 1; i >= 0; --i) {
      live = backward_step(p, v, lane, times_u, own, live, i, truncate > 0 && i > 0 && i % truncate == 0,
                           i > 0 || d_h0 != nullptr);     // step 0's product feeds only d_h0
    }
    const int64_t r0 = k.at(lane.b0, p.H);           // the lane's rows among all
    std::copy(own.h.begin(), own.h.end(), k.h.begin() + r0);
    std::copy(own.gw.begin(), own.gw.end(), k.gw.begin() + r0);
    std::copy(own.c.begin(), own.c.end(), k.c.begin() + r0);
    if (v.dU_lanes != nullptr) std::copy(own.du.begin(), own.du.end(), v.dU_lanes + l * p.H * p.W());
    if (l == 0) last = live;
  });
  // what reaches the initial state: the carry, plus the last product through U
  const T* none = nullptr;
  if (d_h0 != nullptr) {
    gather_dh(p.B * p.H, last.h ? k.h.data() : none, last.gw ? k.gw.data() : none, v.rec, none, 1, none,
              d_h0);
  }
  if (p.lstm()) std::copy(k.c.begin(), k.c.end(), d_c0);
}

template void backward_loop<float>(const Problem&, const Views<float>&, int64_t, const float*, const float*,
                                   float*, float*);
template void backward_loop<double>(const Problem&, const Views<double>&, int64_t, const double*,
                                    const double*, double*, double*);

}  // namespace rnnkit
