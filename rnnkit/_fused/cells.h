// The built-in cells' step math on one batch row, forward and backward: a line-by-line copy of
// rnnkit/cells/{rnn,lstm,gru,layernorm}.py (read their docstrings for the equations). One row is H
// units (G*H pre-activations); the scan calls these for each row b of each step. Every loop here is
// a straight elementwise loop over j that gcc vectorises (__restrict__: the rows never overlap, and
// without it gcc gives up on loops that touch many arrays).
//
// The bias b_hh is passed as its own row `b`: for Elman and LSTM the engine folds it into xi (one
// pre-activation a = xi + b + U h), for GRU it belongs to gh = U h + b. Under layer normalisation the
// bias goes into the normalised sum instead, and the cell gets a row of zeros; xi is normalised too
// when the layer hands it over raw (its own gamma and beta), else it comes in normalised. Elman and LSTM
// add the two normalised rows, so there both norms run as one (layernorm_pair_rows, and
// layernorm_backward_pair under their one gradient) and the cell reads its whole pre-activation from gh
// (xi null: preact<kWhole>); the LSTM's backward then forms its gates again (lstm_gates_again).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "fastmath.h"
#include "rowsum.h"

namespace rnnkit {

// ---- Elman (rnn.py): h = g(a),  a = xi + gh ---------------------------------------------------------

// The cell's pre-activation at j: xi + b + gh, or gh alone (kWhole: the paired layer norms wrote all of it
// there; the other two rows would be zeros).
template <bool kWhole, typename T>
inline T preact(const T* __restrict__ xi, const T* __restrict__ b, const T* __restrict__ gh, int64_t j) {
  if constexpr (kWhole) {
    return gh[j];
  } else {
    return xi[j] + b[j] + gh[j];
  }
}

template <bool kWhole, typename T>
void elman_forward_rows(int64_t H, bool relu, const T* __restrict__ xi, const T* __restrict__ b,
                        const T* __restrict__ gh, T* __restrict__ h) {
  if (relu) {
    for (int64_t j = 0; j < H; ++j) {
      T a = preact<kWhole>(xi, b, gh, j);
      h[j] = a < T(0) ? T(0) : a;                  // relu, NaN kept
    }
  } else {
    for (int64_t j = 0; j < H; ++j) h[j] = tanh_(preact<kWhole>(xi, b, gh, j));
  }
}

// xi null: gh is the whole pre-activation.
template <typename T>
void elman_forward(int64_t H, bool relu, const T* xi, const T* b, const T* gh, T* h) {
  xi == nullptr ? elman_forward_rows<true>(H, relu, xi, b, gh, h) : elman_forward_rows<false>(H, relu, xi, b, gh, h);
}

// da = dh * g'(a), with g' read off h: tanh' = 1 - h^2; relu: da = 0 where h <= 0, else dh (a select, as
// torch's threshold_backward: a NaN h passes dh on, and an infinite dh times 0 is not NaN)
template <typename T>
void elman_backward(int64_t H, bool relu, const T* __restrict__ dh, const T* __restrict__ h,
                    T* __restrict__ da) {
  if (relu) {
    for (int64_t j = 0; j < H; ++j) da[j] = h[j] <= T(0) ? T(0) : dh[j];
  } else {
    for (int64_t j = 0; j < H; ++j) da[j] = dh[j] * (T(1) - h[j] * h[j]);
  }
}

// ---- LSTM (lstm.py), gate blocks i, f, g, o -------------------------------------------------------

// act = the gates of the pre-activation a(j): sigmoid, sigmoid, tanh, sigmoid over the four blocks
template <typename T, typename A>
void lstm_gates(int64_t H, const A& a, T* __restrict__ act) {
  for (int64_t j = 0; j < 2 * H; ++j) act[j] = sigmoid_(a(j));
  for (int64_t j = 2 * H; j < 3 * H; ++j) act[j] = tanh_(a(j));
  for (int64_t j = 3 * H; j < 4 * H; ++j) act[j] = sigmoid_(a(j));
}

// act = [sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)];  c = f c_prev + i g;  h = o tanh(c)
template <bool kWhole, typename T>
void lstm_forward_rows(int64_t H, const T* __restrict__ xi, const T* __restrict__ b, const T* __restrict__ gh,
                       const T* __restrict__ c_prev, T* __restrict__ act, T* __restrict__ tc, T* __restrict__ h,
                       T* __restrict__ c) {
  lstm_gates(H, [&](int64_t j) { return preact<kWhole>(xi, b, gh, j); }, act);
  const T *i = act, *f = act + H, *g = act + 2 * H, *o = act + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    c[j] = f[j] * c_prev[j] + i[j] * g[j];
    tc[j] = tanh_(c[j]);
    h[j] = o[j] * tc[j];
  }
}

// xi null: gh is the whole pre-activation.
template <typename T>
void lstm_forward(int64_t H, const T* xi, const T* b, const T* gh, const T* c_prev, T* act, T* tc, T* h, T* c) {
  xi == nullptr ? lstm_forward_rows<true>(H, xi, b, gh, c_prev, act, tc, h, c)
                : lstm_forward_rows<false>(H, xi, b, gh, c_prev, act, tc, h, c);
}

// do = dh tanh(c);  dc += dh o (1 - tanh(c)^2);  d[i, f, g, o] = [dc g, dc c_prev, dc i, do] times
// each gate's slope (sigmoid' = a (1 - a), tanh' = 1 - g^2);  dc_prev (direct) = dc f.
// dc comes in holding the gradient of c_t from step t+1 and leaves holding dc_{t-1}'s direct part.
template <typename T>
void lstm_backward(int64_t H, const T* __restrict__ dh, T* __restrict__ dc, const T* __restrict__ act,
                   const T* __restrict__ tc, const T* __restrict__ c_prev, T* __restrict__ d_pre) {
  const T *i = act, *f = act + H, *g = act + 2 * H, *o = act + 3 * H;
  T *di = d_pre, *df = d_pre + H, *dg = d_pre + 2 * H, *dob = d_pre + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    T d_o = dh[j] * tc[j];
    T dct = dh[j] * o[j] * (T(1) - tc[j] * tc[j]);
    T dcj = dc[j] + dct;
    di[j] = dcj * g[j] * (i[j] * (T(1) - i[j]));
    df[j] = dcj * c_prev[j] * (f[j] * (T(1) - f[j]));
    dg[j] = dcj * i[j] * (T(1) - g[j] * g[j]);
    dob[j] = d_o * (o[j] * (T(1) - o[j]));
    dc[j] = dcj * f[j];
  }
}

// ---- GRU (gru.py), blocks r, z, n; reset applied after the recurrent product --------------------

// r, z = sigmoid(x_rz + h_rz);  hn = gh_n;  n = tanh(x_n + r hn);  h = n + z (h_prev - n)
// gates = [r, z, n] is also what the trace records.
template <typename T>
void gru_forward(int64_t H, const T* __restrict__ xi, const T* __restrict__ b, const T* __restrict__ gh,
                 const T* __restrict__ h_prev, T* __restrict__ gates, T* __restrict__ hn, T* __restrict__ h) {
  for (int64_t j = 0; j < 2 * H; ++j) gates[j] = sigmoid_(xi[j] + (gh[j] + b[j]));
  const T *r = gates, *z = gates + H;
  T* n = gates + 2 * H;
  for (int64_t j = 0; j < H; ++j) {
    hn[j] = gh[2 * H + j] + b[2 * H + j];
    n[j] = tanh_(xi[2 * H + j] + r[j] * hn[j]);
    h[j] = n[j] + z[j] * (h_prev[j] - n[j]);
  }
}

// dn = dh (1 - z);  dan = dn (1 - n^2);  d_xi = [dan hn r(1-r), dh (h_prev - n) z(1-z), dan];
// d_gh = d_xi with its n block times r;  dh_prev (direct) = dh z.
template <typename T>
void gru_backward(int64_t H, const T* __restrict__ dh, const T* __restrict__ gates, const T* __restrict__ hn,
                  const T* __restrict__ h_prev, T* __restrict__ d_xi, T* __restrict__ d_gh,
                  T* __restrict__ dh_prev) {
  const T *r = gates, *z = gates + H, *n = gates + 2 * H;
  for (int64_t j = 0; j < H; ++j) {
    T dn = dh[j] - dh[j] * z[j];
    T dan = dn - dn * n[j] * n[j];
    T dr = dan * hn[j] * (r[j] - r[j] * r[j]);
    T dz = dh[j] * (h_prev[j] - n[j]) * (z[j] - z[j] * z[j]);
    d_xi[j] = dr;
    d_xi[H + j] = dz;
    d_xi[2 * H + j] = dan;
    d_gh[j] = dr;
    d_gh[H + j] = dz;
    d_gh[2 * H + j] = dan * r[j];
    dh_prev[j] = dh[j] * z[j];
  }
}

// ---- layer normalisation (layernorm.py): of U h + b_hh inside the loop, and of xi = V x + b_ih ----

constexpr double kLayerNormEps = 1e-5;

// Shared by the single and the paired norms below.
// A row's value a less the row's mean m; kCentred: the mean is zero by construction, nothing subtracted.
template <bool kCentred, typename V, typename T>
inline V less_mean(V a, T m) {
  if constexpr (kCentred) {
    return a;
  } else {
    return a - m;
  }
}

// 1/s from the sum ss of a row's W squared deviations.
template <typename T>
inline T ln_inv(T ss, int64_t W) {
  return T(1) / std::sqrt(ss / T(W) + T(kLayerNormEps));
}

// LN's gradient at one feature: dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) / s with dxhat = dy gamma;
// m1 = mean(dy gamma), m2 = mean(dy gamma xhat) over the row.
template <typename T>
inline T ln_dx(T inv, T dy, T gamma, T xhat, T m1, T m2) {
  return inv * (dy * gamma - m1 - xhat * m2);
}

// f(std::bool_constant<flag>{}...): run-time switches made template parameters, so each combination is
// compiled as its own loop (no tests inside it). Not for the forward norms' `centred`: through it gcc
// inlined them differently, and the RNN B=64 T=200 H=64 forward with layer_norm measured 1.36x against
// 1.25x the plain engine with the plain ternary (4 alternating processes); the backward's measured the same.
template <typename F>
decltype(auto) with_flags(const F& f) {
  return f();
}

template <typename F, typename... Flags>
decltype(auto) with_flags(const F& f, bool flag, Flags... rest) {
  if (flag) return with_flags([&](auto... k) { return f(std::true_type{}, k...); }, rest...);
  return with_flags([&](auto... k) { return f(std::false_type{}, k...); }, rest...);
}

// y = xhat * gamma + beta, xhat = (a - mean(a)) / s over the row's W features of a = x + add (add: a bias
// row, or null). Saves xhat, returns 1/s. y may be x itself (the recurrent product is normalised in place).
// kCentred: the row's mean is zero by construction, and is not computed (a pass and a sum fewer: RNN
// B=64 T=200 H=64 training step with layer_norm 1.35x -> 1.28x the plain engine, alternating processes):
// the caller took the mean over the W features out of U, b_hh, W_ih and b_ih in double, or out of raw
// xi's rows in their own dtype (_fused/__init__.py: _centered; mean(U h + b) = mean(U) h + mean(b)), so
// the rows have no cancellation whatever the weights' offset. Else two passes for the moments (the mean,
// then the squares about it). The bias is added inside the passes as they read x: the bias used to be
// added by a pass of its own, written back, which made a row's forward LN 1.7x slower (W = 256, alone).
template <bool kCentred, typename T, typename... Rows>
T layernorm_rows(int64_t W, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ xhat, T* y,
                 const Rows*... rows) {
  const auto a = [](auto... r) { return (r + ...); };                  // x, or x + add
  T mu = T(0);
  if constexpr (!kCentred) mu = row_sum<T>(W, a, rows...) / T(W);
  const auto d = [&](auto... r) { return less_mean<kCentred>(a(r...), mu); };
  const T inv = ln_inv(row_sum<T>(W, [&](auto... r) { return d(r...) * d(r...); }, rows...), W);
  for (int64_t j = 0; j < W; ++j) {
    const T xh = d(rows[j]...) * inv;
    xhat[j] = xh;
    y[j] = xh * gamma[j] + beta[j];
  }
  return inv;
}

// Two levels, not one four-way dispatch: written as one, the forward with layer_norm measured 3.5% slower
// (LSTM B=64 T=200 H=64, 1.385x against 1.337x the plain engine, 6 alternating processes; inlining).
template <bool kCentred, typename T>
T layernorm_forward(int64_t W, const T* x, const T* __restrict__ add, const T* __restrict__ gamma,
                    const T* __restrict__ beta, T* __restrict__ xhat, T* y) {
  return add == nullptr ? layernorm_rows<kCentred>(W, gamma, beta, xhat, y, x)
                        : layernorm_rows<kCentred>(W, gamma, beta, xhat, y, x, add);
}

template <typename T>
T layernorm_forward(bool centred, int64_t W, const T* x, const T* __restrict__ add, const T* __restrict__ gamma,
                    const T* __restrict__ beta, T* __restrict__ xhat, T* y) {
  return centred ? layernorm_forward<true>(W, x, add, gamma, beta, xhat, y)
                 : layernorm_forward<false>(W, x, add, gamma, beta, xhat, y);
}

// The paired norms' output at one feature, written once for the forward and for the LSTM backward that forms
// the gates again from the saved xhat and xhat_x (lstm_gates_again): the same expression, the same value.
template <typename T>
inline T ln_pair_out(T xh, T xx, T gamma, T beta, T gamma_x, T beta_x) {
  return (xh * gamma + beta) + (xx * gamma_x + beta_x);
}

// Both layer norms of a row whose normalised rows the cell adds (Elman, LSTM: a = xi + gh), fused:
// y = LN(x + add) gamma + beta + LN(x2 + add2) gamma_x + beta_x, the moments of both rows taken in the same
// passes (independent chains) and y written once, so the cell reads that one row (xi null).
// layernorm_rows' passes with a second row beside the first. add and add2 are rows (never null: the
// caller passes a row of zeros for an absent bias). Saves xhat, xhat_x; returns (1/s, 1/s_x). y may be x.
template <bool kCentred, typename T>
std::array<T, 2> layernorm_pair_rows(int64_t W, const T* x, const T* __restrict__ add, const T* __restrict__ x2,
                                     const T* __restrict__ add2, const T* __restrict__ gamma,
                                     const T* __restrict__ beta, const T* __restrict__ gamma_x,
                                     const T* __restrict__ beta_x, T* __restrict__ xhat, T* __restrict__ xhat_x,
                                     T* y) {
  // row_sums' lambdas take the rows in the order passed: (x, add, x2, add2)
  T mu = T(0), mu_x = T(0);
  if constexpr (!kCentred) {
    const auto [s, s_x] = row_sums<T>(W, std::tuple{[](auto a, auto b, auto, auto) { return a + b; },
                                                    [](auto, auto, auto a, auto b) { return a + b; }},
                                      x, add, x2, add2);
    mu = s / T(W);
    mu_x = s_x / T(W);
  }
  const auto dev = [](auto a, auto b, T m) { return less_mean<kCentred>(a + b, m); };
  const auto square = [&](auto a, auto b, T m) { return dev(a, b, m) * dev(a, b, m); };
  const auto [ss, ss_x] = row_sums<T>(W, std::tuple{[&](auto a, auto b, auto, auto) { return square(a, b, mu); },
                                                    [&](auto, auto, auto a, auto b) { return square(a, b, mu_x); }},
                                      x, add, x2, add2);
  const T inv = ln_inv(ss, W), inv_x = ln_inv(ss_x, W);
  for (int64_t j = 0; j < W; ++j) {
    const T xh = dev(x[j], add[j], mu) * inv, xx = dev(x2[j], add2[j], mu_x) * inv_x;
    xhat[j] = xh;
    xhat_x[j] = xx;
    y[j] = ln_pair_out(xh, xx, gamma[j], beta[j], gamma_x[j], beta_x[j]);
  }
  return {inv, inv_x};
}

template <typename T>
std::array<T, 2> layernorm_pair_forward(bool centred, int64_t W, const T* x, const T* add, const T* x2,
                                        const T* add2, const T* gamma, const T* beta, const T* gamma_x,
                                        const T* beta_x, T* xhat, T* xhat_x, T* y) {
  return centred ? layernorm_pair_rows<true>(W, x, add, x2, add2, gamma, beta, gamma_x, beta_x, xhat, xhat_x, y)
                 : layernorm_pair_rows<false>(W, x, add, x2, add2, gamma, beta, gamma_x, beta_x, xhat, xhat_x, y);
}

// LN's own gradient (ln_dx), its mean term kept: dx has zero mean, so U, b_hh, W_ih and b_ih taken centred
// in the forward get their gradients as they are (dx^T h is the gradient of U and of its centred copy
// alike). dx may be dy itself. The row's share of the parameters' gradients is added on the way:
// dgamma += dy xhat, dbeta += dy.
template <typename T>
void layernorm_backward(int64_t W, const T* dy, const T* __restrict__ xhat, T inv, const T* __restrict__ gamma,
                        T* __restrict__ dgamma, T* __restrict__ dbeta, T* dx) {
  // row_sums' lambdas take the rows in the order passed: (dy, gamma, xhat)
  const auto [s1, s2] = row_sums<T>(W, std::tuple{[](auto d, auto g, auto) { return d * g; },
                                                   [](auto d, auto g, auto xh) { return d * g * xh; }},
                                     dy, gamma, xhat);
  for (int64_t j = 0; j < W; ++j) {
    dgamma[j] += dy[j] * xhat[j];
    dbeta[j] += dy[j];
  }
  const T m1 = s1 / T(W), m2 = s2 / T(W);
  for (int64_t j = 0; j < W; ++j) dx[j] = ln_dx(inv, dy[j], gamma[j], xhat[j], m1, m2);
}

// Both layer norms of a row whose normalised rows the cell adds (Elman, LSTM: a = xi + gh), so one d_y is
// the gradient of both: layernorm_backward twice, fused. d_y is read once, the four sums taken in one pass
// (four independent chains), and the second pass writes d_gh, d_xi (over d_y, in place) and adds the row
// into d gamma, d beta, d gamma_x and, when wanted (kB, kXb), d b_hh (the sum of d_gh) and d b_ih (of d_xi)
// there too: backward.cpp's add_into would read the rows once more. d beta_x is d beta's very sum: the
// caller copies it.
template <bool kB, bool kXb, typename T>
void layernorm_backward_pair_rows(int64_t W, T* d_y, const T* __restrict__ xhat, T inv, const T* __restrict__ gamma,
                                  const T* __restrict__ xhat_x, T inv_x, const T* __restrict__ gamma_x,
                                  T* __restrict__ dgamma, T* __restrict__ dbeta, T* __restrict__ dgamma_x,
                                  T* __restrict__ d_b, T* __restrict__ d_xb, T* __restrict__ d_gh) {
  // row_sums' lambdas take the rows in the order passed: (d_y, gamma, xhat, gamma_x, xhat_x)
  const auto sums = std::tuple{[](auto d, auto g, auto, auto, auto) { return d * g; },
                               [](auto d, auto g, auto xh, auto, auto) { return d * g * xh; },
                               [](auto d, auto, auto, auto gx, auto) { return d * gx; },
                               [](auto d, auto, auto, auto gx, auto xx) { return d * gx * xx; }};
  const auto [s1, s2, s3, s4] = row_sums<T>(W, sums, static_cast<const T*>(d_y), gamma, xhat, gamma_x, xhat_x);
  const T m1 = s1 / T(W), m2 = s2 / T(W), m3 = s3 / T(W), m4 = s4 / T(W);
  for (int64_t j = 0; j < W; ++j) {
    const T d = d_y[j];
    dgamma[j] += d * xhat[j];
    dbeta[j] += d;
    dgamma_x[j] += d * xhat_x[j];
    const T g = ln_dx(inv, d, gamma[j], xhat[j], m1, m2);
    const T gx = ln_dx(inv_x, d, gamma_x[j], xhat_x[j], m3, m4);
    d_gh[j] = g;
    d_y[j] = gx;
    if constexpr (kB) d_b[j] = g + d_b[j];
    if constexpr (kXb) d_xb[j] = gx + d_xb[j];
  }
}

// The gates of a row whose forward did not keep them (Views::act_keep 0): the pre-activation formed again
// from the paired norms' saved rows, by the forward's own expression (ln_pair_out).
template <typename T>
void lstm_gates_again(int64_t H, const T* __restrict__ xhat, const T* __restrict__ xhat_x,
                      const T* __restrict__ gamma, const T* __restrict__ beta, const T* __restrict__ gamma_x,
                      const T* __restrict__ beta_x, T* __restrict__ act) {
  lstm_gates(H, [&](int64_t j) { return ln_pair_out(xhat[j], xhat_x[j], gamma[j], beta[j], gamma_x[j], beta_x[j]); },
             act);
}

// d_b, d_xb: null when not wanted.
template <typename T>
void layernorm_backward_pair(int64_t W, T* d_y, const T* xhat, T inv, const T* gamma, const T* xhat_x, T inv_x,
                             const T* gamma_x, T* dgamma, T* dbeta, T* dgamma_x, T* d_b, T* d_xb, T* d_gh) {
  with_flags([&](auto kb, auto kxb) {
    layernorm_backward_pair_rows<decltype(kb)::value, decltype(kxb)::value>(W, d_y, xhat, inv, gamma, xhat_x, inv_x,
                                                                          gamma_x, dgamma, dbeta, dgamma_x, d_b, d_xb,
                                                                          d_gh);
  }, d_b != nullptr, d_xb != nullptr);
}

}  // namespace rnnkit
