// The fused scan's backward through time, the same lines as rnnkit/engine.py's _Scan.backward, steps
// in reverse processing order. Per step and batch row:
//     dh      = carry_h + (d_gh_{t+1} U) * r + m_t d_out_t     all that reaches h_t; ||dh|| to the trace
//     d_pass  = d - d m_t;  d = d m_t                          padding: the kept state passes around
//     d_pass += d z_t;      d = d - d z_t                      zoneout: so does the kept share
//     d_xi, d_gh, direct = cell backward(d)                    (cells.h)
//     carry   = direct + d_pass                                what reaches s_{t-1} around U
// then one product per step, d_gh_t U (B, H), unless truncated BPTT cuts the carry right here.
// The weight gradients come after the loop as one product over all steps: dU = sum_t d_gh_t^T (h_{t-1} r).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "blas.h"
#include "cells.h"
#include "scan.h"

namespace rnnkit {
namespace {

// Per-row scratch of the loop, (B, H) each, plus the LN path's (B, W) d_y.
template <typename T>
struct Carry {
  std::vector<T> h, c, gw, dh, dc, dy;             // carries to step t-1; d_gh U; d_new of h and c
  bool have_gw = false;                            // gw holds step t+1's d_gh U
};

// the gradient that reaches h_t: around the cell, through U (times the dropout mask), from out_t
template <typename T>
void gather_dh(int64_t H, const T* carry, const T* gw, const T* rec, const T* d_out, const T* m, T* dh) {
  for (int64_t j = 0; j < H; ++j) dh[j] = carry[j];
  if (gw != nullptr && rec != nullptr) {
    for (int64_t j = 0; j < H; ++j) dh[j] += gw[j] * rec[j];
  } else if (gw != nullptr) {
    for (int64_t j = 0; j < H; ++j) dh[j] += gw[j];
  }
  if (d_out != nullptr && m != nullptr) {
    const T mv = *m;
    for (int64_t j = 0; j < H; ++j) dh[j] += d_out[j] * mv;
  } else if (d_out != nullptr) {
    for (int64_t j = 0; j < H; ++j) dh[j] += d_out[j];
  }
}

template <typename T>
T norm(int64_t H, const T* d) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < H; ++j) s += d[j] * d[j];
  return std::sqrt(s);
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
  } else {
    for (int64_t j = 0; j < H; ++j) pass[j] = T(0);
  }
  if (z != nullptr) {
    for (int64_t j = 0; j < H; ++j) {
      pass[j] += d[j] * z[j];
      d[j] = d[j] - d[j] * z[j];
    }
  }
}

template <typename T>
void add_into(int64_t H, const T* a, T* acc) {     // acc = a + acc  (direct + pass, in that order)
  for (int64_t j = 0; j < H; ++j) acc[j] = a[j] + acc[j];
}

// The cell's step backward for row b of step t; the LN path then maps d_y to the raw d_gh.
template <typename T>
void cell_backward(const Problem& p, const Views<T>& v, Carry<T>& k, int64_t t, int64_t b,
                   const T* h_prev, const T* c_prev) {
  const int64_t H = p.H, W = p.W(), row = t * p.B + b;
  T *dh = k.dh.data() + b * H, *dc = k.dc.data() + b * H, *ch = k.h.data() + b * H;
  T* d_xi = v.d_xi + row * W;
  T* d_y = !p.ln ? v.d_gh + row * W : p.gru() ? k.dy.data() + b * W : d_xi;   // what the cell calls d_gh
  if (p.elman()) {
    const T* hc = v.act ? v.act + row * H : v.hs + row * H;
    elman_backward(H, p.cell == CellKind::kRelu, dh, hc, d_xi);
  } else if (p.lstm()) {
    lstm_backward(H, dh, dc, v.act + row * W, v.aux + row * H, c_prev, d_xi);
    add_into(H, dc, k.c.data() + b * H);               // carry_c = dc f + d_pass
  } else {
    gru_backward(H, dh, v.act + row * W, v.aux + row * H, h_prev, d_xi, d_y, dc);
    add_into(H, dc, ch);                               // carry_h = dh z + d_pass
  }
  if (p.ln) layernorm_backward(W, d_y, v.xhat + row * W, v.inv[row], v.gamma, v.d_gh + row * W);
}

template <typename T>
void backward_row(const Problem& p, const Views<T>& v, Carry<T>& k, int64_t t, int64_t b,
                  const T* h_prev, const T* c_prev) {
  const int64_t H = p.H, row = t * p.B + b;
  const T* m = v.mask ? v.mask + row : nullptr;
  T *dh = k.dh.data() + b * H, *ch = k.h.data() + b * H;
  gather_dh(H, ch, k.have_gw ? k.gw.data() + b * H : nullptr, v.rec ? v.rec + b * H : nullptr,
            v.d_out ? v.d_out + row * H : nullptr, m, dh);
  if (v.gn != nullptr) v.gn[row] = norm(H, dh);
  split(H, dh, m, v.zone[0].row(t, b), ch);            // ch: d_pass of h from here on
  if (p.lstm()) {
    T *dc = k.dc.data() + b * H, *cc = k.c.data() + b * H;
    std::memcpy(dc, cc, sizeof(T) * H);
    split(H, dc, m, v.zone[1].row(t, b), cc);
  }
  cell_backward(p, v, k, t, b, h_prev + b * H, c_prev ? c_prev + b * H : nullptr);
}

// LN's gamma and beta gradients: sums over the step's rows of d_y xhat and d_y (serial: a reduction).
template <typename T>
void layernorm_params(const Problem& p, const Views<T>& v, const Carry<T>& k, int64_t t) {
  const int64_t W = p.W();
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t row = t * p.B + b;
    const T* d_y = p.gru() ? k.dy.data() + b * W : v.d_xi + row * W;
    const T* xh = v.xhat + row * W;
    for (int64_t j = 0; j < W; ++j) {
      v.dgamma[j] += d_y[j] * xh[j];
      v.dbeta[j] += d_y[j];
    }
  }
}

template <typename T>
void backward_step(const Problem& p, const Views<T>& v, const StepProduct<T>& times_u, Carry<T>& k,
                   int64_t i, bool cut) {
  const int64_t t = p.time(i), B = p.B, H = p.H, W = p.W();
  const T* h_prev = i == 0 ? v.h0 : v.hs + p.before(t) * B * H;
  const T* c_prev = !p.lstm() ? nullptr : i == 0 ? v.c0 : v.cs + p.before(t) * B * H;
  for_rows(p, [&](int64_t b) { backward_row(p, v, k, t, b, h_prev, c_prev); });
  if (p.ln) layernorm_params(p, v, k, t);
  if (cut) {                                       // truncated BPTT: the state was detached here
    std::fill(k.h.begin(), k.h.end(), T(0));
    std::fill(k.c.begin(), k.c.end(), T(0));
    k.have_gw = false;
    return;
  }
  times_u(v.d_gh + t * B * W, k.gw.data());      // d_gh U  (B, H)
  k.have_gw = true;
}

}  // namespace

template <typename T>
void backward_loop(const Problem& p, const Views<T>& v, int64_t truncate, const T* d_hT, const T* d_cT,
                   T* d_h0, T* d_c0) {
  const size_t BH = static_cast<size_t>(p.B * p.H);
  Carry<T> k;
  k.h.assign(BH, T(0));
  k.c.assign(p.lstm() ? BH : 0, T(0));
  k.gw.resize(BH);
  k.dh.resize(BH);
  k.dc.resize(BH);
  k.dy.resize(p.ln && p.gru() ? static_cast<size_t>(p.B * p.W()) : 0);
  if (d_hT != nullptr) std::memcpy(k.h.data(), d_hT, sizeof(T) * BH);
  if (d_cT != nullptr) std::memcpy(k.c.data(), d_cT, sizeof(T) * BH);
  const StepProduct<T> times_u(v.w, p.W(), p.H, p.B, true);
  for (int64_t i = p.T - 1; i >= 0; --i) {
    backward_step(p, v, times_u, k, i, truncate > 0 && i > 0 && i % truncate == 0);
  }
  // what reaches the initial state: the carry, plus the last product through U
  const T* none = nullptr;
  gather_dh(p.B * p.H, k.h.data(), k.have_gw ? k.gw.data() : none, v.rec, none, none, d_h0);
  if (p.lstm()) std::memcpy(d_c0, k.c.data(), sizeof(T) * BH);
}

template void backward_loop<float>(const Problem&, const Views<float>&, int64_t, const float*, const float*,
                                   float*, float*);
template void backward_loop<double>(const Problem&, const Views<double>&, int64_t, const double*,
                                    const double*, double*, double*);

}  // namespace rnnkit
