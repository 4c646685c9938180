// Log-domain Sinkhorn with a dustbin row (SPEC 6) on the CPU: forward with
// the potentials of every iteration saved, and the backward as a reverse
// replay of the unrolled iterations from those potentials.
//
// Layout of one problem: Z is (M + 1) x N, rows 0..M-1 are the scores and
// row M (the dustbin) holds bin_score in every column. Rows that are "on"
// (valid rows and the dustbin) take part in the transport; invalid rows keep
// u = 0 and are left out of every column sum. Problems are independent, so
// the batch is split over threads with at::parallel_for; the inner loops run
// along the contiguous column axis.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "escape_fast.h"

namespace escape_fast {
namespace {

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// log(sum exp(x_c + y_c)) over c < n; -inf when every term is -inf (the
// shift falls back to 0 so that no -inf - -inf = NaN appears).
template <typename T>
T row_logsumexp(const T* x, const T* y, int64_t n) {
  T m = kNegInf<T>;
  for (int64_t c = 0; c < n; ++c) m = std::max(m, x[c] + y[c]);
  const T shift = m == kNegInf<T> ? T(0) : m;
  T s = 0;
  for (int64_t c = 0; c < n; ++c) s += std::exp(x[c] + y[c] - shift);
  return shift + std::log(s);
}

// Per-problem setup shared by forward and backward.
template <typename T>
struct Problem {
  int64_t M, N;
  T log_n;
  std::vector<T> log_mu;    // [M + 1]
  std::vector<char> on;     // [M + 1]
  std::vector<T> bin_row;   // [N], the dustbin row of Z

  Problem(int64_t M_, int64_t N_) : M(M_), N(N_), log_n(std::log(T(N_))), log_mu(M_ + 1), on(M_ + 1), bin_row(N_) {}

  void load(const bool* valid, T bin) {
    int64_t m_valid = 0;
    for (int64_t r = 0; r < M; ++r) {
      on[r] = valid[r];
      m_valid += valid[r] ? 1 : 0;
      log_mu[r] = -log_n;
    }
    on[M] = 1;
    // log(max(N - M_valid, 0)) - log N: -inf when the keypoints fill every column.
    const T bin_mass = std::max(T(N - m_valid), T(0));
    log_mu[M] = std::log(bin_mass) - log_n;
    std::fill(bin_row.begin(), bin_row.end(), bin);
  }

  const T* row(const T* z, int64_t r) const { return r < M ? z + r * N : bin_row.data(); }
};

template <typename T>
void forward_kernel(const at::Tensor& scores, const at::Tensor& bins, const at::Tensor& valid, int64_t iters,
                    at::Tensor& log_p, at::Tensor& u_hist, at::Tensor& v_hist) {
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  const T* z_all = scores.data_ptr<T>();
  const T* bin_all = bins.data_ptr<T>();
  const bool* valid_all = valid.data_ptr<bool>();
  T* out_all = log_p.data_ptr<T>();
  T* uh_all = u_hist.data_ptr<T>();
  T* vh_all = v_hist.data_ptr<T>();

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Problem<T> p(M, N);
    std::vector<T> u(M + 1), v(N), col_max(N), col_sum(N);
    for (int64_t b = begin; b < end; ++b) {
      const T* z = z_all + b * M * N;
      p.load(valid_all + b * M, bin_all[b]);
      std::fill(u.begin(), u.end(), T(0));
      std::fill(v.begin(), v.end(), T(0));
      for (int64_t t = 0; t < iters; ++t) {
        // row step: u_r = log_mu_r - logsumexp_c(Z_rc + v_c) on the on rows
        for (int64_t r = 0; r <= M; ++r) {
          if (p.on[r]) u[r] = p.log_mu[r] - row_logsumexp(p.row(z, r), v.data(), N);
        }
        // column step: v_c = -log N - logsumexp over on rows of (Z_rc + u_r),
        // accumulated row by row so that the inner loop stays contiguous.
        std::fill(col_max.begin(), col_max.end(), kNegInf<T>);
        for (int64_t r = 0; r <= M; ++r) {
          if (!p.on[r]) continue;
          const T* zr = p.row(z, r);
          const T ur = u[r];
          for (int64_t c = 0; c < N; ++c) col_max[c] = std::max(col_max[c], zr[c] + ur);
        }
        for (int64_t c = 0; c < N; ++c) {
          if (col_max[c] == kNegInf<T>) col_max[c] = 0;  // all terms -inf: sum 0, lse -inf
          col_sum[c] = 0;
        }
        for (int64_t r = 0; r <= M; ++r) {
          if (!p.on[r]) continue;
          const T* zr = p.row(z, r);
          const T ur = u[r];
          for (int64_t c = 0; c < N; ++c) col_sum[c] += std::exp(zr[c] + ur - col_max[c]);
        }
        for (int64_t c = 0; c < N; ++c) v[c] = -p.log_n - (col_max[c] + std::log(col_sum[c]));
        std::copy(u.begin(), u.end(), uh_all + (b * iters + t) * (M + 1));
        std::copy(v.begin(), v.end(), vh_all + (b * iters + t) * N);
      }
      T* out = out_all + b * (M + 1) * N;
      for (int64_t r = 0; r <= M; ++r) {
        const T* zr = p.row(z, r);
        const T ur = u[r];
        for (int64_t c = 0; c < N; ++c) out[r * N + c] = zr[c] + ur + v[c] + p.log_n;
      }
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& bins,
                     const at::Tensor& valid, const at::Tensor& u_hist, const at::Tensor& v_hist,
                     at::Tensor& grad_scores, at::Tensor& grad_bins) {
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  const int64_t iters = u_hist.size(1);
  const T* g_all = grad.data_ptr<T>();
  const T* z_all = scores.data_ptr<T>();
  const T* bin_all = bins.data_ptr<T>();
  const bool* valid_all = valid.data_ptr<bool>();
  const T* uh_all = u_hist.data_ptr<T>();
  const T* vh_all = v_hist.data_ptr<T>();
  T* gs_all = grad_scores.data_ptr<T>();
  T* gb_all = grad_bins.data_ptr<T>();

  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    Problem<T> p(M, N);
    std::vector<T> du(M + 1), dv(N), dv_prev(N), zeros(N, T(0)), dz_bin(N);
    for (int64_t b = begin; b < end; ++b) {
      const T* z = z_all + b * M * N;
      const T* g = g_all + b * (M + 1) * N;
      p.load(valid_all + b * M, bin_all[b]);
      // dZ rows 0..M-1 accumulate in the output, the dustbin row in dz_bin.
      T* dz = gs_all + b * M * N;
      auto dz_row = [&](int64_t r) { return r < M ? dz + r * N : dz_bin.data(); };
      // The output log_p = Z + u + v + log N: dZ starts at grad, du_T is the
      // row sum on the on rows (invalid rows have u fixed at 0), dv_T the
      // column sum over all rows.
      std::fill(dv.begin(), dv.end(), T(0));
      for (int64_t r = 0; r <= M; ++r) {
        const T* gr = g + r * N;
        T* dzr = dz_row(r);
        T s = 0;
        for (int64_t c = 0; c < N; ++c) {
          dzr[c] = gr[c];
          dv[c] += gr[c];
          s += gr[c];
        }
        du[r] = p.on[r] ? s : T(0);
      }
      for (int64_t t = iters; t >= 1; --t) {
        const T* u = uh_all + (b * iters + t - 1) * (M + 1);
        const T* v = vh_all + (b * iters + t - 1) * N;
        const T* vp = t >= 2 ? vh_all + (b * iters + t - 2) * N : zeros.data();
        std::fill(dv_prev.begin(), dv_prev.end(), T(0));
        for (int64_t r = 0; r <= M; ++r) {
          if (!p.on[r]) continue;
          const T* zr = p.row(z, r);
          T* dzr = dz_row(r);
          // column step of iteration t: Pc = exp(Z + u_t + v_t + log N), the
          // softmax over on rows whose normaliser v_t already holds.
          const T a = u[r] + p.log_n;
          T acc = 0;
          for (int64_t c = 0; c < N; ++c) {
            const T gc = dv[c] * std::exp(zr[c] + a + v[c]);
            dzr[c] -= gc;
            acc += gc;
          }
          const T dur = du[r] - acc;
          // row step: Pr = softmax_c(Z + v_{t-1}); its normaliser is
          // log_mu - u_t, except where log_mu = -inf (a dustbin with no mass)
          // and it has to be recomputed.
          const T lse = p.log_mu[r] == kNegInf<T> ? row_logsumexp(zr, vp, N) : p.log_mu[r] - u[r];
          for (int64_t c = 0; c < N; ++c) {
            const T gc = dur * std::exp(zr[c] + vp[c] - lse);
            dzr[c] -= gc;
            dv_prev[c] -= gc;
          }
        }
        std::swap(dv, dv_prev);
        std::fill(du.begin(), du.end(), T(0));  // u_{t-1} only feeds v_{t-1}
      }
      T s = 0;
      for (int64_t c = 0; c < N; ++c) s += dz_bin[c];
      gb_all[b] = s;
    }
  });
}

void check_inputs(const char* op, const at::Tensor& scores, const at::Tensor& bin_score, const at::Tensor& valid) {
  TORCH_CHECK(scores.dim() == 3, op, ": scores must be [B, M, N], got ", scores.sizes());
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
              ": scores must be float32 or float64, got ", scores.scalar_type());
  const int64_t B = scores.size(0), M = scores.size(1);
  TORCH_CHECK(scores.size(2) >= 1, op, ": scores needs at least one column, got ", scores.sizes());
  TORCH_CHECK(bin_score.dim() == 1 && bin_score.size(0) == B, op, ": bin_score must be [B] with B=", B, ", got ",
              bin_score.sizes());
  TORCH_CHECK(bin_score.scalar_type() == scores.scalar_type(), op, ": bin_score must have the dtype of scores (",
              scores.scalar_type(), "), got ", bin_score.scalar_type());
  TORCH_CHECK(valid.dim() == 2 && valid.size(0) == B && valid.size(1) == M, op, ": valid must be [B, M] = [", B,
              ", ", M, "], got ", valid.sizes());
  TORCH_CHECK(valid.scalar_type() == at::kBool, op, ": valid must be bool, got ", valid.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_log_cpu(const at::Tensor& scores_in,
                                                                const at::Tensor& bin_in,
                                                                const at::Tensor& valid_in, int64_t iters) {
  check_inputs("sinkhorn_log", scores_in, bin_in, valid_in);
  TORCH_CHECK(iters >= 0, "sinkhorn_log: iters must be >= 0, got ", iters);
  TORCH_CHECK(scores_in.device().is_cpu() && bin_in.device().is_cpu() && valid_in.device().is_cpu(),
              "sinkhorn_log (CPU kernel): all tensors must be on the CPU");
  const auto scores = scores_in.contiguous();
  const auto bins = bin_in.contiguous();
  const auto valid = valid_in.contiguous();
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  auto log_p = at::empty({B, M + 1, N}, scores.options());
  auto u_hist = at::empty({B, iters, M + 1}, scores.options());
  auto v_hist = at::empty({B, iters, N}, scores.options());
  if (B == 0) return {log_p, u_hist, v_hist};
  ESCAPE_FAST_DISPATCH_FLOATING(scores.scalar_type(), "sinkhorn_log_cpu", [&] {
    forward_kernel<scalar_t>(scores, bins, valid, iters, log_p, u_hist, v_hist);
  });
  return {log_p, u_hist, v_hist};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_log_backward_cpu(const at::Tensor& grad_in, const at::Tensor& scores_in,
                                                             const at::Tensor& bin_in, const at::Tensor& valid_in,
                                                             const at::Tensor& u_in, const at::Tensor& v_in) {
  check_inputs("sinkhorn_log_backward", scores_in, bin_in, valid_in);
  const int64_t B = scores_in.size(0), M = scores_in.size(1), N = scores_in.size(2);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == M + 1 && grad_in.size(2) == N,
              "sinkhorn_log_backward: grad must be [B, M + 1, N] = [", B, ", ", M + 1, ", ", N, "], got ",
              grad_in.sizes());
  TORCH_CHECK(u_in.dim() == 3 && u_in.size(0) == B && u_in.size(2) == M + 1,
              "sinkhorn_log_backward: u_history must be [B, iters, M + 1], got ", u_in.sizes());
  const int64_t iters = u_in.size(1);
  TORCH_CHECK(v_in.dim() == 3 && v_in.size(0) == B && v_in.size(1) == iters && v_in.size(2) == N,
              "sinkhorn_log_backward: v_history must be [B, iters, N] = [", B, ", ", iters, ", ", N, "], got ",
              v_in.sizes());
  for (const auto* t : {&grad_in, &u_in, &v_in}) {
    TORCH_CHECK(t->scalar_type() == scores_in.scalar_type(),
                "sinkhorn_log_backward: grad and histories must have the dtype of scores (", scores_in.scalar_type(),
                "), got ", t->scalar_type());
  }
  for (const auto* t : {&grad_in, &scores_in, &bin_in, &valid_in, &u_in, &v_in}) {
    TORCH_CHECK(t->device().is_cpu(), "sinkhorn_log_backward (CPU kernel): all tensors must be on the CPU");
  }
  const auto grad = grad_in.contiguous();
  const auto scores = scores_in.contiguous();
  const auto bins = bin_in.contiguous();
  const auto valid = valid_in.contiguous();
  const auto u_hist = u_in.contiguous();
  const auto v_hist = v_in.contiguous();
  auto grad_scores = at::empty({B, M, N}, scores.options());
  auto grad_bins = at::empty({B}, bins.options());
  if (B == 0) return {grad_scores, grad_bins};
  ESCAPE_FAST_DISPATCH_FLOATING(scores.scalar_type(), "sinkhorn_log_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad, scores, bins, valid, u_hist, v_hist, grad_scores, grad_bins);
  });
  return {grad_scores, grad_bins};
}

}  // namespace

TORCH_LIBRARY_IMPL(escape_fast, CPU, m) {
  m.impl("sinkhorn_log", &sinkhorn_log_cpu);
  m.impl("sinkhorn_log_backward", &sinkhorn_log_backward_cpu);
}

}  // namespace escape_fast
