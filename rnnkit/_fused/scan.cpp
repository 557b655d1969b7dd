// The fused scan as two torch operators, torch.ops.rnnkit_fused.forward / .backward (and random.h's
// mask sampler, .bernoulli_mask): tensors in, buffers allocated here once per call, raw pointers
// handed to the loops (forward.cpp, backward.cpp).
// The Python side (__init__.py) checks shapes, dtypes and devices before calling; the checks here
// are a safety net only. Registered with TORCH_LIBRARY rather than pybind11, which keeps the compile
// to a few seconds (no torch/extension.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/add.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "blas.h"
#include "cores.h"
#include "ukernel.h"
#include "floating.h"
#include "pool.h"
#include "random.h"
#include "scan.h"

namespace rnnkit {
namespace {

using at::Tensor;
using Opt = std::optional<Tensor>;

bool has(const Opt& t) { return t.has_value() && t->defined(); }

template <typename T>
T* ptr(const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; }

template <typename T>
T* ptr(const Opt& t) { return has(t) ? t->data_ptr<T>() : nullptr; }

void check(const Tensor& t, const Tensor& like, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == like.scalar_type() && t.is_contiguous(),
              "rnnkit fused scan: ", what, " must be a contiguous CPU tensor of dtype ", like.scalar_type());
}

void check(const Opt& t, const Tensor& like, const char* what) {
  if (has(t)) check(*t, like, what);
}

Problem problem(int64_t cell, bool ln, bool reverse, int64_t T, int64_t B, const Tensor& w) {
  TORCH_CHECK(cell >= 0 && cell <= 3, "rnnkit fused scan: unknown cell code ", cell);
  const auto kind = static_cast<CellKind>(cell);
  const int64_t G = kind == CellKind::kLSTM ? 4 : kind == CellKind::kGRU ? 3 : 1;
  const int64_t H = w.size(1);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == G * H, "rnnkit fused scan: weight_hh must be (G*H, H)");
  return Problem{kind, ln, reverse, T, B, H, G};
}

// A (T|1, B|1, H) tensor as rows, with its strides (0 along a dimension of size 1).
template <typename T>
Rows<T> rows(const Opt& z, const Problem& p) {
  Rows<T> r;
  if (!has(z)) return r;
  TORCH_CHECK(z->dim() == 3 && z->size(2) == p.H && (z->size(0) == 1 || z->size(0) == p.T) &&
                  (z->size(1) == 1 || z->size(1) == p.B) && (z->stride(2) == 1 || z->stride(2) == 0),
              "rnnkit fused scan: a (T|1, B|1, H) tensor with unit or zero stride along H expected");
  r.p = z->data_ptr<T>();
  r.st = z->size(0) == 1 ? 0 : z->stride(0);
  r.sb = z->size(1) == 1 ? 0 : z->stride(1);
  r.sj = z->stride(2);
  return r;
}

// The gradient of out: any strides will do (out.sum() sends a scalar expanded to (T, B, H)).
void check_grad(const Opt& g, const Tensor& like) {
  if (has(g)) {
    TORCH_CHECK(g->device().is_cpu() && g->scalar_type() == like.scalar_type() && g->dim() == 3,
                "rnnkit fused scan: the gradient of out must be a (T, B, H) CPU tensor of dtype ", like.scalar_type());
  }
}

// Elman and LSTM without LN add b_ih where they add b_hh (a = xi + b_ih + b_hh + U h): the forward adds
// one row b_hh + b_ih instead of b_ih to every row of xi, and the backward's sum of d_gh serves both
// gradients (d_xi is d_gh there). The GRU (b_ih's n block sits outside r (U h + b_hh)) and LN (b_ih is
// inside xi's normalised sum) add it per row.
bool xb_folds_into_b(const Problem& p) { return !p.ln && !p.gru(); }

// Inputs shared by both passes, as pointers. `b` is never null (zeros when the layer has no bias),
// and the cell sees zeros in its place under LN, where the bias goes into the normalised sum.
template <typename T>
Views<T> input_views(const Problem& p, const Tensor& w, const Tensor& b, const Tensor& zero_w,
                     const Tensor& h0, const Opt& c0, const Opt& gamma, const Opt& beta, const Opt& gamma_x,
                     const Opt& beta_x, const Opt& xb, const Opt& mask, const Opt& rec, const Opt& zh,
                     const Opt& zc) {
  Views<T> v{};
  v.w = ptr<T>(w);
  v.b = ptr<T>(b);
  v.cell_b = p.ln ? ptr<T>(zero_w) : v.b;
  v.h0 = ptr<T>(h0);
  v.h0_zero = all_zero(p.B * p.H, v.h0);
  v.c0 = ptr<T>(c0);
  v.gamma = ptr<T>(gamma);
  v.beta = ptr<T>(beta);
  v.gamma_x = ptr<T>(gamma_x);
  v.beta_x = ptr<T>(beta_x);
  v.xb = ptr<T>(xb);
  v.mask = ptr<T>(mask);
  v.rec = ptr<T>(rec);
  v.zone[0] = rows<T>(zh, p);
  v.zone[1] = rows<T>(zc, p);
  TORCH_CHECK(v.zone[0].sj == 1 && v.zone[1].sj == 1, "rnnkit fused scan: zoneout shares must be contiguous");
  return v;
}

// ---- forward ---------------------------------------------------------------------------------------

// Whether act (absent for Elman without zoneout or padding) has a slot per step: the forward writes it so,
// and the backward reads the gates there, else forms them again (scan.h: Views::act_keep).
bool act_slots_every_step(const Problem& p, const Opt& act) {
  return has(act) && act->size(0) == p.T;
}

// What forward allocates. act/aux/hr/xhat/inv/xhat_x/inv_x have T slots when kept for backward, else 1;
// act has 1 too when the backward forms the gates again (act_keep false: gates_formed_again).
struct Buffers {
  Tensor out, hs, cs, act, aux, hr, xhat, inv, xhat_x, inv_x;
};

Buffers allocate(const Problem& p, bool keep, bool act_keep, bool blended, bool masked, bool dropped, bool raw_xi,
                 const at::TensorOptions& o) {
  const int64_t T = p.T, B = p.B, H = p.H, W = p.W(), S = keep ? T : 1;
  Buffers f;
  f.hs = pooled_empty({T, B, H}, o);
  f.out = masked ? pooled_empty({T, B, H}, o) : f.hs;
  if (p.lstm()) f.cs = pooled_empty({T, B, H}, o);
  if (!p.elman()) {
    f.act = pooled_empty({act_keep ? T : 1, B, W}, o);
    f.aux = pooled_empty({S, B, H}, o);
  } else if (keep && blended) {
    f.act = pooled_empty({T, B, H}, o);               // the cell's own h_t, before zoneout and padding
  }
  if (dropped) f.hr = pooled_empty({S, B, H}, o);
  if (p.ln) {
    f.xhat = pooled_empty({S, B, W}, o);
    f.inv = at::empty({S, B}, o);
  }
  if (raw_xi) {
    f.xhat_x = pooled_empty({S, B, W}, o);
    f.inv_x = at::empty({S, B}, o);
  }
  return f;
}

template <typename T>
void run_forward(const Problem& p, Views<T> v, const Tensor& xi, const Buffers& f, bool keep) {
  v.xi = ptr<T>(xi);
  v.hs = ptr<T>(f.hs);
  v.cs = ptr<T>(f.cs);
  v.out = ptr<T>(f.out);
  v.act = ptr<T>(f.act);
  v.aux = ptr<T>(f.aux);
  v.hr = ptr<T>(f.hr);
  v.xhat = ptr<T>(f.xhat);
  v.inv = ptr<T>(f.inv);
  v.xhat_x = ptr<T>(f.xhat_x);
  v.inv_x = ptr<T>(f.inv_x);
  v.keep = keep ? 1 : 0;
  v.act_keep = act_slots_every_step(p, f.act) ? 1 : 0;
  forward_loop<T>(p, v);
}

// dst = src (rows, cols) less its column means, taken and subtracted in double: a float32 weight whose
// entries share a large offset keeps the relative precision of its centred entries (the product of the
// centred U then has no cancellation; taking the mean out of U h after the product, as LN's two-pass
// moments do in a call too short to centre (_fused/__init__.py: _centres), cancels it there: float32 LSTM
// with U + 10 in every entry, 4.4e-6 off the float64 engine that way, 2.2e-5 with the centring in float,
// ~1e-7 in double). By hand, as torch's ops in double copy the weight twice: 4096 x 1024, 1.0 against
// 17.7 ms, and 8192 x 2048 30 against 90.
template <typename T>
void center_columns(int64_t rows, int64_t cols, const T* src, T* dst) {
  std::vector<double> mean(cols, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) mean[j] += double(src[r * cols + j]);
  }
  for (int64_t j = 0; j < cols; ++j) mean[j] /= double(rows);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) dst[r * cols + j] = T(double(src[r * cols + j]) - mean[j]);
  }
}

// centered(t): t (rows, ...) less its mean over dim 0: under LN, U, b_hh, W_ih and b_ih, whose products'
// rows then have zero mean (mean(U h + b) = mean(U) h + mean(b)), which the forward, told `centred`, does
// not compute (cells.h: layernorm_rows).
Tensor centered(const Tensor& t) {
  TORCH_CHECK(t.dim() >= 1 && t.size(0) > 0, "rnnkit centered: expected a tensor with rows");
  const Tensor src = t.contiguous();
  Tensor out = at::empty_like(src);
  with_floating(src, "rnnkit centered", [&](auto zero) {
    using S = decltype(zero);
    center_columns(src.size(0), src.numel() / src.size(0), ptr<S>(src), ptr<S>(out));
  });
  return out;
}

// Whether an LSTM's gates need not be kept for the backward: under the paired norms they are a function of
// the saved xhat and xhat_x, formed again there (cells.h: lstm_gates_again), which saves writing a (T, B, 4H)
// buffer and reading it back, for one more pass of the gates' sigmoids and tanh. Cost over the plain engine,
// 5 alternating processes against f061685 (benchmarks/extras_ab.py): training step LSTM H=64 B=64 T=100
// 1.237 -> 1.224x, B=32 T=200 1.227 -> 1.207x, B=64 T=200 1.224 -> 1.174x, H=128 B=32 T=100 1.213x both,
// H=256 B=32 T=100 1.122 -> 1.139x (the one loss: the recomputation outweighs the traffic there); forward
// 1.21-1.29 -> 1.14-1.17x at H=64, 1.103 -> 1.090x at H=256; peak memory of the step 37.4 -> 31.2 MiB
// (H=64 B=64 T=100), 77.1 -> 64.7 MiB (H=256 B=32 T=100). Kept when the caller wants every step's gates
// (the trace records them).
bool gates_formed_again(const Problem& p, bool ln_x, bool gates) {
  return p.lstm() && p.ln_paired(ln_x) && !gates;
}

// Returns [out, hs, cs, act, aux, hr, xhat, inv, xhat_x, inv_x, h_final, c_final]; absent entries are
// undefined (None). gamma_x, beta_x: xi comes raw, and is layer-normalised here (LN cells only). xb: xi
// comes without the input projection's bias b_ih, which is added here. centred (under LN): the caller
// promises rows of zero mean, U h + b and xi + xb alike (U, b, xb, and W_ih or xi's rows, taken centred:
// `centered` below), and LN does not compute their mean. gates: act must hold every step's gates (else
// it may hold only the last step's, gates_formed_again).
std::vector<Tensor> forward(int64_t cell, bool ln, bool reverse, bool keep, const Tensor& xi, const Tensor& w,
                            const Opt& b, const Tensor& h0, const Opt& c0, const Opt& gamma, const Opt& beta,
                            const Opt& gamma_x, const Opt& beta_x, const Opt& xb, const Opt& mask,
                            const Opt& rec, const Opt& zh, const Opt& zc, bool centred, bool gates) {
  TORCH_CHECK(xi.dim() == 3, "rnnkit fused scan: xi must be (T, B, G*H)");
  Problem p = problem(cell, ln, reverse, xi.size(0), xi.size(1), w);
  p.centred = ln && centred;
  for (auto* t : {&xi, &w, &h0}) check(*t, xi, "every input");
  for (auto* t : {&b, &c0, &gamma, &beta, &gamma_x, &beta_x, &xb, &mask, &rec, &zh, &zc}) check(*t, xi, "every input");
  TORCH_CHECK(!has(xb) || (xb->dim() == 1 && xb->size(0) == p.W()), "rnnkit fused scan: b_ih must be (G*H,)");
  TORCH_CHECK(has(gamma_x) == has(beta_x) && (ln || !has(gamma_x)),
              "rnnkit fused scan: gamma_x and beta_x come together, and only with layer normalisation");
  const auto o = xi.options();
  const Tensor zero_w = at::zeros({p.W()}, o);
  const bool fold = has(xb) && xb_folds_into_b(p);
  const Tensor bias = fold ? (has(b) ? at::add(*b, *xb) : *xb) : has(b) ? *b : zero_w;
  const Opt row_xb = fold ? Opt() : xb;                  // b_ih still to add per row
  const bool act_keep = keep && !gates_formed_again(p, has(gamma_x), gates);
  const Buffers f = allocate(p, keep, act_keep, has(mask) || has(zh) || has(zc), has(mask), has(rec), has(gamma_x), o);
  auto run = [&](auto zero) {
    using S = decltype(zero);
    run_forward<S>(p, input_views<S>(p, w, bias, zero_w, h0, c0, gamma, beta, gamma_x, beta_x, row_xb, mask, rec, zh, zc),
                   xi, f, keep);
  };
  with_floating(xi, "rnnkit fused scan", run);
  const int64_t last = reverse ? 0 : p.T - 1;
  Tensor h_final = f.hs[last].clone();
  Tensor c_final = p.lstm() ? f.cs[last].clone() : Tensor();
  return {f.out, f.hs, f.cs, f.act, f.aux, f.hr, f.xhat, f.inv, f.xhat_x, f.inv_x, h_final, c_final};
}

// ---- backward --------------------------------------------------------------------------------------

// Rows [r0, r0 + n) of dU, from a (T, B, n) gradient stored with leading dimension ld.
template <typename T>
struct GradRows {
  int64_t r0, n, ld;
  const T* d;
};

// dU = sum_t d_gh_t^T h_in_t with h_in_t = h_{t-1} r: from the saved h r, or else from the state
// sequence shifted by one step (h0, then h_t) as two products, so nothing is concatenated.
template <typename T>
void weight_grad(const Problem& p, const Views<T>& v, const GradRows<T>& g, T* dU) {
  const int64_t B = p.B, H = p.H, T1 = p.T - 1;
  T* out = dU + g.r0 * H;
  if (v.hr != nullptr) {
    gemm(true, false, g.n, H, p.T * B, g.d, g.ld, v.hr, H, T(0), out, H);
    return;
  }
  const T* g_first = p.reverse ? g.d + T1 * B * g.ld : g.d;           // the step that read h0
  const T* g_rest = p.reverse ? g.d : g.d + B * g.ld;                  // the steps that read h_t
  const T* h_rest = p.reverse ? v.hs + B * H : v.hs;
  const bool first_zero = h0_term_zero(v, B, g.n, g.ld, g_first);   // g_first^T h0: exactly zero
  if (!first_zero) gemm(true, false, g.n, H, B, g_first, g.ld, v.h0, H, T(0), out, H);
  if (T1 > 0) {
    gemm(true, false, g.n, H, T1 * B, g_rest, g.ld, h_rest, H, first_zero ? T(0) : T(1), out, H);
  } else if (first_zero) {
    std::fill(out, out + g.n * H, T(0));
  }
}

// Whether the lanes sum dU as their loops go (scan.h: dU by steps) rather than one product after the loop. Only
// under LN, where d_gh is a row of its own (without it, d_gh is d_xi's row, or for the GRU partly).
bool dU_by_steps(const Problem& p, bool paired, int64_t lanes, bool is_float) {
  if (g_dU_by_steps == 0 || lanes < 2 || !p.ln) return false;
  if (g_dU_by_steps == 2) return true;
  return paired && is_float && p.H <= kDUByStepsMaxH[p.lstm() ? 1 : 0] && products_on_ukernel();
}

// The blocks of d_gh over all steps: one, or for the GRU without LN d_xi's r, z blocks and d_ghn.
template <typename T>
std::vector<GradRows<T>> grad_rows(const Problem& p, const Views<T>& v) {
  const int64_t H = p.H, W = p.W();
  if (v.d_ghn == nullptr) return {{0, W, W, v.d_gh}};
  return {{0, 2 * H, W, v.d_xi}, {2 * H, H, H, v.d_ghn}};
}

// Returns [d_xi, d_w, d_b, d_h0, d_c0, d_gamma, d_beta, d_gamma_x, d_beta_x, d_xb]; d_xb: the sum of d_xi,
// the gradient of b_ih when the forward added it (xb); d_h0 undefined without need_h0 (the last step's
// product through U is then skipped).
std::vector<Tensor> backward(int64_t cell, bool ln, bool reverse, int64_t truncate, const Tensor& w,
                             const Opt& b, const Tensor& h0, const Opt& c0, const Opt& gamma, const Opt& beta,
                             const Opt& gamma_x, const Opt& beta_x,
                             const Opt& mask, const Opt& rec, const Opt& zh, const Opt& zc, const Opt& cut,
                             const Tensor& hs,
                             const Opt& cs, const Opt& act, const Opt& aux, const Opt& hr, const Opt& xhat,
                             const Opt& inv, const Opt& xhat_x, const Opt& inv_x, const Opt& d_out,
                             const Opt& d_hT, const Opt& d_cT, const Opt& gn, bool need_w, bool need_b,
                             bool need_xb, bool need_h0) {
  const Problem p = problem(cell, ln, reverse, hs.size(0), hs.size(1), w);
  for (auto* t : {&b, &c0, &gamma, &beta, &gamma_x, &beta_x, &mask, &rec, &zh, &zc, &cut, &cs, &act, &aux, &hr,
                  &xhat, &inv, &xhat_x, &inv_x, &d_hT, &d_cT, &gn}) {
    check(*t, hs, "every input");
  }
  check_grad(d_out, hs);
  const auto o = hs.options();
  const int64_t T = p.T, B = p.B, H = p.H, W = p.W();
  const Tensor zero_w = at::zeros({W}, o);
  const Tensor bias = has(b) ? *b : zero_w;
  Tensor d_xi = pooled_empty({T, B, W}, o);
  const bool gru_plain = p.gru() && !p.ln;
  const int64_t lanes = lane_count(p, int64_t(hs.element_size()));
  const bool by_steps = need_w && dU_by_steps(p, p.ln_paired(has(gamma_x)), lanes, hs.scalar_type() == at::kFloat);
  Tensor d_gh = by_steps ? Tensor()                            // (no buffer: the lanes' scratch holds its rows)
                : p.ln ? pooled_empty({T, B, W}, o) : gru_plain ? pooled_empty({1, B, W}, o) : d_xi;
  Tensor dU_lanes = by_steps ? at::empty({lanes, H, W}, o) : Tensor();
  Tensor d_ghn = gru_plain ? pooled_empty({T, B, H}, o) : Tensor();
  Tensor d_h0 = need_h0 ? at::empty({B, H}, o) : Tensor(), d_c0 = p.lstm() ? at::empty({B, H}, o) : Tensor();
  Tensor d_w = need_w && !by_steps ? at::empty({W, H}, o) : Tensor();
  TORCH_CHECK(has(gamma_x) == (has(xhat_x) && has(inv_x)), "rnnkit fused scan: xi's LN needs xhat_x and inv_x");
  // the forward kept one step of an LSTM's gates (gates_formed_again): the rest are formed again
  TORCH_CHECK(!p.lstm() || has(act), "rnnkit fused scan: the LSTM's backward needs act");
  const bool act_keep = !p.lstm() || act_slots_every_step(p, act);
  const auto whole = [&](const Opt& t) { return has(t) && t->numel() == T * B * W; };
  TORCH_CHECK(act_keep || (act->size(0) == 1 && p.ln_paired(has(gamma_x)) && has(beta) && has(beta_x) &&
                           whole(xhat) && whole(xhat_x)),
              "rnnkit fused scan: the LSTM's gates were not kept, and what forms them again is missing");
  const bool want_b = need_b && has(b), xb_is_b = xb_folds_into_b(p);
  // the slots of Views::acc to sum: LN's four (two when xi comes normalised, three when the norms are
  // paired), d b_hh, d b_ih
  const bool shared_dy = p.ln_paired(has(gamma_x));          // one d_y for both norms: d beta_x = d beta
  const bool wanted[kAccSlots] = {p.ln, p.ln, p.ln && has(gamma_x), p.ln && has(gamma_x) && !shared_dy,
                                  want_b || (need_xb && xb_is_b), need_xb && !xb_is_b};
  const bool any_sum = std::any_of(wanted, wanted + kAccSlots, [](bool x) { return x; });
  const int64_t stride = acc_stride(W, int64_t(hs.element_size()));
  Tensor acc = any_sum ? at::zeros({at::get_num_threads(), stride}, o) : Tensor();
  auto run = [&](auto zero) {
    using S = decltype(zero);
    Views<S> v = input_views<S>(p, w, bias, zero_w, h0, c0, gamma, beta, gamma_x, beta_x, std::nullopt, mask, rec,
                                zh, zc);
    v.hs = ptr<S>(hs);
    v.cs = ptr<S>(cs);
    v.act = ptr<S>(act);
    v.aux = ptr<S>(aux);
    v.hr = ptr<S>(hr);
    v.xhat = ptr<S>(xhat);
    v.inv = ptr<S>(inv);
    v.xhat_x = ptr<S>(xhat_x);
    v.inv_x = ptr<S>(inv_x);
    v.keep = 1;
    v.act_keep = act_keep ? 1 : 0;
    v.cut = ptr<S>(cut);
    v.d_out = rows<S>(d_out, p);
    v.gn = ptr<S>(gn);
    v.d_xi = ptr<S>(d_xi);
    v.d_gh = ptr<S>(d_gh);
    v.d_ghn = ptr<S>(d_ghn);
    v.gh_keep = gru_plain ? 0 : 1;
    v.acc = ptr<S>(acc);
    v.acc_stride = stride;
    v.acc_b = wanted[4];
    v.acc_xb = wanted[5];
    v.stream = gru_plain && worth_streaming(T * B, W * int64_t(sizeof(S)));
    v.dU_lanes = ptr<S>(dU_lanes);
    backward_loop<S>(p, v, truncate, ptr<S>(d_hT), ptr<S>(d_cT), ptr<S>(d_h0), ptr<S>(d_c0));
    if (need_w && !by_steps) {
      for (const auto& g : grad_rows<S>(p, v)) weight_grad<S>(p, v, g, ptr<S>(d_w));
    }
  };
  with_floating(hs, "rnnkit fused scan", run);
  if (by_steps) d_w = dU_lanes.sum(0).t().contiguous();              // the lanes' shares of dU^T, added
  std::vector<Tensor> sums(kAccSlots);                 // the threads' sums added, one row per slot wanted
  if (any_sum) {
    const Tensor total = acc.narrow(1, 0, kAccSlots * W).sum(0).view({kAccSlots, W});
    for (int64_t k = 0; k < kAccSlots; ++k) {
      if (wanted[k]) sums[k] = total[k].clone();
    }
  }
  if (shared_dy) sums[3] = sums[1].clone();           // backward.cpp: layernorm_backward_pair
  Tensor d_b = want_b ? sums[4] : Tensor();
  Tensor d_xb = !need_xb ? Tensor() : !xb_is_b ? sums[5] : want_b ? sums[4].clone() : sums[4];   // own storage
  return {d_xi, d_w, d_b, d_h0, d_c0, sums[0], sums[1], sums[2], sums[3], d_xb};
}

std::string route() { return gemm_route(); }

void limit_route(const std::string& route) { limit_gemm_route(route); }

// Returns the previous setting; 0 switches lanes off (see scan.h).
int64_t set_min_lane_rows(int64_t rows) {
  TORCH_CHECK(rows >= 0, "rnnkit fused scan: min lane rows must be >= 0");
  const int64_t old = g_min_lane_rows;
  g_min_lane_rows = rows;
  return old;
}

// dU by steps (scan.h): 1 where it pays, 2 wherever lanes run, 0 never; returns the previous setting.
int64_t set_weight_grad_by_steps(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "rnnkit fused scan: weight_grad_by_steps takes 0, 1 or 2");
  const int64_t old = g_dU_by_steps;
  g_dU_by_steps = mode;
  return old;
}

}  // namespace
}  // namespace rnnkit

TORCH_LIBRARY(rnnkit_fused, m) {
  m.def("forward(int cell, bool ln, bool reverse, bool keep, Tensor xi, Tensor w, Tensor? b, Tensor h0, "
        "Tensor? c0, Tensor? gamma, Tensor? beta, Tensor? gamma_x, Tensor? beta_x, Tensor? xb, Tensor? mask, "
        "Tensor? rec, Tensor? zone_h, Tensor? zone_c, bool centred=False, bool gates=True) -> Tensor[]",
        &rnnkit::forward);
  m.def("backward(int cell, bool ln, bool reverse, int truncate, Tensor w, Tensor? b, Tensor h0, Tensor? c0, "
        "Tensor? gamma, Tensor? beta, Tensor? gamma_x, Tensor? beta_x, Tensor? mask, Tensor? rec, Tensor? zone_h, "
        "Tensor? zone_c, Tensor? cut, "
        "Tensor hs, "
        "Tensor? cs, Tensor? act, Tensor? aux, Tensor? hr, Tensor? xhat, Tensor? inv, Tensor? xhat_x, "
        "Tensor? inv_x, Tensor? d_out, Tensor? d_hT, Tensor? d_cT, Tensor? grad_norm, bool need_w, "
        "bool need_b, bool need_xb, bool need_h0=True) -> Tensor[]",
        &rnnkit::backward);
  m.def("bernoulli_mask(int[] shape, float p, int seed, ScalarType dtype) -> Tensor", &rnnkit::bernoulli_mask);
  m.def("centered(Tensor t) -> Tensor", &rnnkit::centered);
  m.def("gemm_route() -> str", &rnnkit::route);
  m.def("limit_gemm_route(str route) -> ()", &rnnkit::limit_route);
  m.def("dnnl_matmul_calls() -> int", &rnnkit::dnnl_matmul_calls);
  m.def("set_exact_shapes(int shapes, int taken_in=-1) -> int", &rnnkit::set_exact_shapes);
  m.def("exact_shapes_held() -> int", &rnnkit::exact_shapes_held);
  m.def("ukernel_products() -> int", &rnnkit::ukernel_products);
  m.def("set_min_lane_rows(int rows) -> int", &rnnkit::set_min_lane_rows);
  m.def("set_weight_grad_by_steps(int mode) -> int", &rnnkit::set_weight_grad_by_steps);
  m.def("core_round_trip_ns(int trips=20000) -> float", &rnnkit::core_round_trip_ns);
  m.def("pool_held_bytes() -> int", &rnnkit::pool_held_bytes);
  m.def("pool_peak_bytes() -> int", &rnnkit::pool_peak_bytes);
  m.def("release_pool() -> ()", &rnnkit::release_pool);
  m.def("set_pool_limit(int bytes) -> int", &rnnkit::set_pool_limit);
  m.def("set_pool_peak_multiple(int multiple) -> int", &rnnkit::set_pool_peak_multiple);
}
