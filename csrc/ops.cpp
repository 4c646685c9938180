// The one schema of every escape_fast op. Backends register implementations
// in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu with TORCH_LIBRARY_IMPL; the
// Python side (escape_fast/ops.py) adds fake (meta) kernels and autograd.
#include <torch/library.h>

#include "escape_fast.h"

TORCH_LIBRARY(escape_fast, m) {
  // features [B, C, H, W], prototypes [B, K, C] -> heatmaps [B, K, H, W]
  m.def("prototype_heatmaps(Tensor features, Tensor prototypes) -> Tensor");
  // heatmaps [B, K, H, W], center [B, 2], scale [B, 2], rotation [B] (degrees)
  // -> (coords [B, K, 2] image pixels, peak values [B, K])
  m.def(
      "decode_heatmaps(Tensor heatmaps, Tensor center, Tensor scale, "
      "Tensor rotation, int kernel) -> (Tensor, Tensor)");
  // the fusion of the two ops above; heatmaps never reach global memory
  m.def(
      "heatmap_decode(Tensor features, Tensor prototypes, Tensor center, "
      "Tensor scale, Tensor rotation, int kernel) -> (Tensor, Tensor)");
  // features [B, C, H, W] -> the in-image mean filter of side kernel on every channel
  m.def("smooth_features(Tensor features, int kernel) -> Tensor");
  // features [B, C, H, W], keypoints [B, K, 2] (cell units), visible [B, K]
  // bool -> pooled [B, K, C]
  m.def(
      "keypoint_pool(Tensor features, Tensor keypoints, Tensor visible, "
      "float sigma) -> Tensor");
  // grad [B, K, C] -> grad_features [B, C, height, width]
  m.def(
      "keypoint_pool_backward(Tensor grad, Tensor keypoints, Tensor visible, "
      "float sigma, SymInt height, SymInt width) -> Tensor");
  // scores [B, M, N], bin_score [B], valid [B, M] bool
  // -> (log_p [B, M + 1, N], u_history [B, iters, M + 1], v_history [B, iters, N])
  // The potentials after each iteration are saved for the backward replay.
  m.def(
      "sinkhorn_log(Tensor scores, Tensor bin_score, Tensor valid, int iters) "
      "-> (Tensor, Tensor, Tensor)");
  // grad [B, M + 1, N] -> (grad_scores [B, M, N], grad_bin_score [B])
  m.def(
      "sinkhorn_log_backward(Tensor grad, Tensor scores, Tensor bin_score, "
      "Tensor valid, Tensor u_history, Tensor v_history) -> (Tensor, Tensor)");
}

// Lets Python ask what was compiled in (escape_fast.info()).
TORCH_LIBRARY_FRAGMENT(escape_fast, m) {
  m.def("build_info() -> str", []() -> std::string {
    std::string s = "cpu";
#ifdef ESCAPE_FAST_WITH_CUDA
    s += "+cuda";
#endif
#ifdef _OPENMP
    s += " openmp";
#endif
    return s;
  });
}
