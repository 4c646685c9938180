// The host-side setup that the CPU (cpu/sinkhorn.cpp) and CUDA (cuda/sinkhorn.cu)
// implementations of sinkhorn_log and its backward share: the argument checks
// (checks.h), contiguous inputs and the allocated outputs. Each backend adds its
// device checks and its launch.
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace escape_fast::sinkhorn {

// scores [B, M, N], bin_score [B], valid [B, M] -> log_p [B, M + 1, N] and the
// potentials after each iteration, u_hist [B, iters, M + 1], v_hist [B, iters, N].
struct Forward {
  at::Tensor scores, bin_score, valid, log_p, u_hist, v_hist;
  int64_t B, M, N, iters;

  static Forward make(const at::Tensor& scores, const at::Tensor& bin_score, const at::Tensor& valid, int64_t iters) {
    checks::sinkhorn_inputs("sinkhorn_log", scores, bin_score, valid);
    TORCH_CHECK(iters >= 0, "sinkhorn_log: iters must be >= 0, got ", iters);
    Forward f{scores.contiguous(), bin_score.contiguous(), valid.contiguous(), {}, {}, {},
              scores.size(0),      scores.size(1),    scores.size(2),     iters};
    f.log_p = at::empty({f.B, f.M + 1, f.N}, scores.options());
    f.u_hist = at::empty({f.B, iters, f.M + 1}, scores.options());
    f.v_hist = at::empty({f.B, iters, f.N}, scores.options());
    return f;
  }
};

// grad [B, M + 1, N] and the forward's inputs and histories -> grad_scores
// [B, M, N], grad_bin_score [B].
struct Backward {
  at::Tensor grad, scores, bin_score, valid, u_hist, v_hist, grad_scores, grad_bin_score;
  int64_t B, M, N, iters;

  static Backward make(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& bin_score,
                       const at::Tensor& valid, const at::Tensor& u_hist, const at::Tensor& v_hist) {
    checks::sinkhorn_inputs("sinkhorn_log_backward", scores, bin_score, valid);
    const int64_t iters = checks::sinkhorn_backward_inputs(grad, scores, u_hist, v_hist);
    Backward b{grad.contiguous(),   scores.contiguous(), bin_score.contiguous(), valid.contiguous(),
               u_hist.contiguous(), v_hist.contiguous(), {},                {},
               scores.size(0),      scores.size(1),      scores.size(2),    iters};
    b.grad_scores = at::empty({b.B, b.M, b.N}, scores.options());
    b.grad_bin_score = at::empty({b.B}, bin_score.options());
    return b;
  }
};

}  // namespace escape_fast::sinkhorn
