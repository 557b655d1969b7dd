// The fused scan's forward, the same lines as rnnkit/engine.py's _Scan.forward:
//     gh_t  = (h_{t-1} * r) U^T                  one product per step into a reused (B, W) buffer
//     s~_t  = cell(xi_t, gh_t + b_hh, s_{t-1})    one pass over the step's rows (cells.h)
//     s_t   = s~_t + z_t (s_{t-1} - s~_t)         zoneout
//     s_t   = s_{t-1} + m_t (s_t - s_{t-1})       padding keeps the state
//     out_t = m_t h_t
// and it saves, per step, what the backward reads: the gate activations (which are also the trace's
// gates; not an LSTM's under the paired norms without a trace: scan.cpp, gates_formed_again), tanh(c_t)
// for the LSTM, U h + b_hh's n block for the GRU, h * r, LN's xhat and 1/s (of the
// recurrent product and, when the layer hands xi over raw, of xi: its LN is then done here, per row).
#include <algorithm>
#include <vector>

#include "blas.h"
#include "cells.h"
#include "scan.h"

namespace rnnkit {
namespace {

// s = new + z (prev - new);  then s = prev + m (s - prev).  s may be `nw` itself.
template <typename T>
void blend(int64_t H, const T* nw, const T* prev, const T* z, const T* m, T* s) {
  if (z != nullptr) {
    for (int64_t j = 0; j < H; ++j) s[j] = nw[j] + z[j] * (prev[j] - nw[j]);
  } else if (s != nw) {
    for (int64_t j = 0; j < H; ++j) s[j] = nw[j];
  }
  if (m != nullptr) {
    const T mv = *m;
    for (int64_t j = 0; j < H; ++j) s[j] = prev[j] + mv * (s[j] - prev[j]);
  }
}

// One batch row b of step t: the cell, then zoneout and padding, then the output.
// xn: the row's scratch for xi + b_ih, or for xi normalised by its own LN (GRU; xn_needed). xs: under LN,
// two rows in which the normalised rows are made before they are streamed out to xhat, xhat_x (null:
// written there directly).
template <typename T>
void forward_row(const Problem& p, const Views<T>& v, T* gh, T* xn, T* xs, int64_t t, int64_t b,
                 const T* h_prev, const T* c_prev) {
  const int64_t H = p.H, W = p.W(), slot = t * v.keep * p.B + b;   // slot: row of a per-step buffer
  const int64_t row = t * p.B + b;                                 // row of a (T, B, .) buffer
  const T* xi = v.xi + row * W;
  const bool ln_x = p.ln && v.gamma_x != nullptr;  // xi's LN here: it adds b_ih itself
  if (v.xb != nullptr && !ln_x) {                  // xi + b_ih, in the row's scratch
    for (int64_t j = 0; j < W; ++j) xn[j] = xi[j] + v.xb[j];
    xi = xn;
  }
  if (p.ln_paired(ln_x)) {                         // both norms, summed into gh; the cell reads gh alone
    T* xhat = v.xhat + slot * W;
    T* xhat_x = v.xhat_x + slot * W;
    // without b_ih, xi's norm adds cell_b: under LN the cell's bias row is all zeros (the biases are
    // inside the norms), so it serves as an absent bias
    const auto [inv, inv_x] = layernorm_pair_forward(p.centred, W, gh, v.b, xi, v.xb ? v.xb : v.cell_b, v.gamma,
                                                     v.beta, v.gamma_x, v.beta_x, xs ? xs : xhat,
                                                     xs ? xs + W : xhat_x, gh);
    v.inv[slot] = inv;
    v.inv_x[slot] = inv_x;
    if (xs) {
      stream_row(xhat, xs, W);
      stream_row(xhat_x, xs + W, W);
    }
    xi = nullptr;                                  // gh holds the whole pre-activation
  } else if (p.ln) {                               // LN(U h + b_hh) in place; GRU's LN(xi + b_ih) into xn
    T* xhat = v.xhat + slot * W;
    v.inv[slot] = layernorm_forward(p.centred, W, gh, v.b, v.gamma, v.beta, xs ? xs : xhat, gh);
    if (xs) stream_row(xhat, xs, W);
    if (ln_x) {
      T* xhat_x = v.xhat_x + slot * W;
      v.inv_x[slot] = layernorm_forward(p.centred, W, xi, v.xb, v.gamma_x, v.beta_x, xs ? xs : xhat_x, xn);
      if (xs) stream_row(xhat_x, xs, W);
      xi = xn;
    }
  }
  T* h = v.hs + row * H;
  const T* m = v.mask ? v.mask + row : nullptr;
  if (p.elman()) {
    T* hc = v.act ? v.act + slot * H : h;          // the cell's own h, when zoneout/padding change it
    elman_forward(H, p.cell == CellKind::kRelu, xi, v.cell_b, gh, hc);
    blend(H, hc, h_prev, v.zone[0].row(t, b), m, h);
  } else if (p.lstm()) {
    T* c = v.cs + row * H;
    T* act = v.act + (t * v.act_keep * p.B + b) * W;
    lstm_forward(H, xi, v.cell_b, gh, c_prev, act, v.aux + slot * H, h, c);
    blend(H, h, h_prev, v.zone[0].row(t, b), m, h);
    blend(H, c, c_prev, v.zone[1].row(t, b), m, c);
  } else {
    gru_forward(H, xi, v.cell_b, gh, h_prev, v.act + slot * W, v.aux + slot * H, h);
    blend(H, h, h_prev, v.zone[0].row(t, b), m, h);
  }
  if (v.out != v.hs) {                             // padded steps output zeros
    T* o = v.out + row * H;
    for (int64_t j = 0; j < H; ++j) o[j] = h[j] * *m;
  }
}

// Step i on the lane's rows: gh (the lane's rows of the step product, (rows, W)) = h_in U^T (zeros
// without `product`), then the row pass.
template <typename T>
void forward_step(const Problem& p, const Views<T>& v, const Lane& lane, const StepProduct<T>& times_ut,
                  T* gh, T* xn, T* xs, int64_t i, bool product) {
  const int64_t t = p.time(i), B = p.B, H = p.H, W = p.W(), b0 = lane.b0;
  const T* h_prev = i == 0 ? v.h0 : v.hs + p.before(t) * B * H;
  const T* c_prev = !p.lstm() ? nullptr : i == 0 ? v.c0 : v.cs + p.before(t) * B * H;
  const T* h_in = h_prev;
  if (v.rec != nullptr) {                          // variational dropout on h before U
    T* hr = v.hr + t * v.keep * B * H;
    for (int64_t k = b0 * H; k < lane.b1 * H; ++k) hr[k] = h_prev[k] * v.rec[k];
    h_in = hr;
  }
  if (product) {
    times_ut(h_in + b0 * H, gh);                   // gh = h_in U^T   (rows, W)
  } else {
    std::fill(gh, gh + lane.rows() * W, T(0));
  }
  // Under LN, row b of xi for the step processed next, fetched a step ahead: the LN's first pass over
  // the row otherwise waits on it (perf: 41% of layernorm_forward's samples on that load; LSTM B=64
  // T=200 H=64 forward with layer_norm 4.29 -> 4.10 ms, alternating processes). Only under LN, where
  // it was measured.
  const bool fetch = p.ln && i + 1 < p.T;
  const int64_t next = fetch ? p.time(i + 1) * B * W : 0;
  for_lane_rows(p, lane, [&](int64_t b) {
    const int64_t r = b - b0;
    if (fetch) {
      for (int64_t j = 0; j < W; j += 64 / int64_t(sizeof(T))) __builtin_prefetch(v.xi + next + b * W + j);
    }
    forward_row(p, v, gh + r * W, xn + r * W, xs ? xs + 2 * r * W : nullptr, t, b, h_prev + b * H,
                c_prev ? c_prev + b * H : nullptr);
  });
}

// forward_row writes xi + b_ih, or xi's own LN, into the row's scratch: when xi comes raw without the
// paired norms (which add b_ih and normalise xi as they go).
template <typename T>
bool xn_needed(const Problem& p, const Views<T>& v) {
  const bool ln_x = p.ln && v.gamma_x != nullptr;
  return ln_x ? !p.ln_paired(ln_x) : v.xb != nullptr;
}

}  // namespace

template <typename T>
void forward_loop(const Problem& p, const Views<T>& v) {
  const bool first_zero = v.h0_zero && all_finite(p.W() * p.H, v.w);   // h0 U exactly zero (0 * NaN is not)
  for_lanes<T>(p, [&](const Lane& lane, int64_t) {
    const StepProduct<T> times_ut(v.w, p.W(), p.H, lane.rows(), false, p.T);
    const size_t rows_w = static_cast<size_t>(lane.rows() * p.W());
    std::vector<T> gh(rows_w);                                     // the step's recurrent product, reused
    std::vector<T> xn(xn_needed(p, v) ? rows_w : 0);               // xi + b_ih, or xi normalised
    // LN's saved rows, read again only by the backward, go out by non-temporal stores (store.h) when
    // the buffers outgrow the caches: LSTM B=64 T=200 H=128 (2 KB rows, 26 MB each) forward with
    // layer_norm 13.0 -> 12.3 ms, training step 33.8 -> 31.8 (plain 26.7, 25.6), alternating processes.
    const bool stream = p.ln && v.keep && worth_streaming(p.T * p.B, p.W() * int64_t(sizeof(T)));
    std::vector<T> xs(stream ? 2 * rows_w : 0);                    // two rows each: rows may run on several threads
    for (int64_t i = 0; i < p.T; ++i) {
      forward_step(p, v, lane, times_ut, gh.data(), xn.data(), stream ? xs.data() : nullptr, i, i > 0 || !first_zero);
    }
  });
}

template void forward_loop<float>(const Problem&, const Views<float>&);
template void forward_loop<double>(const Problem&, const Views<double>&);

}  // namespace rnnkit
