// Argument checks shared by the CPU and CUDA implementations of each op, so
// that both backends reject bad input with the same message. Device checks
// (CPU or CUDA) stay in each backend's file.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <initializer_list>

namespace escape_fast::checks {

inline void floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void same_device(const char* op, const at::Tensor& ref, std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->device() == ref.device(), op, ": all tensors must be on ", ref.device(), ", got ", t->device());
  }
}

// center [B, 2], scale [B, 2], rotation [B] in the dtype and on the device of ref; odd kernel.
inline void crop(const char* op, const at::Tensor& ref, int64_t B, const at::Tensor& center, const at::Tensor& scale,
                 const at::Tensor& rotation, int64_t kernel) {
  TORCH_CHECK(center.dim() == 2 && center.size(0) == B && center.size(1) == 2, op,
              ": center must be [B, 2] with B=", B, ", got ", center.sizes());
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == B && scale.size(1) == 2, op,
              ": scale must be [B, 2] with B=", B, ", got ", scale.sizes());
  TORCH_CHECK(rotation.dim() == 1 && rotation.size(0) == B, op, ": rotation must be [B] with B=", B, ", got ",
              rotation.sizes());
  for (const at::Tensor* t : {&center, &scale, &rotation}) {
    TORCH_CHECK(t->scalar_type() == ref.scalar_type(), op, ": center, scale and rotation must have dtype ",
                ref.scalar_type(), ", got ", t->scalar_type());
  }
  same_device(op, ref, {&center, &scale, &rotation});
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, op, ": kernel must be a positive odd int, got ", kernel);
}

// features [B, C, H, W] and prototypes [B, K, C] of one floating dtype, on one device.
inline void features_prototypes(const char* op, const at::Tensor& features, const at::Tensor& prototypes) {
  TORCH_CHECK(features.dim() == 4, op, ": features must be [B, C, H, W], got ", features.sizes());
  TORCH_CHECK(prototypes.dim() == 3 && prototypes.size(0) == features.size(0) &&
                  prototypes.size(2) == features.size(1),
              op, ": prototypes must be [B, K, C] with B=", features.size(0), " C=", features.size(1), ", got ",
              prototypes.sizes());
  floating(op, "features", features);
  TORCH_CHECK(prototypes.scalar_type() == features.scalar_type(), op, ": prototypes must have dtype ",
              features.scalar_type(), ", got ", prototypes.scalar_type());
  TORCH_CHECK(prototypes.device() == features.device(), op, ": features and prototypes must be on one device");
}

// decode_heatmaps: heatmaps [B, K, H, W] of a floating dtype, a crop per item, a
// maximum to find; returns {B, K, H, W}.
inline std::array<int64_t, 4> decode_inputs(const at::Tensor& maps, const at::Tensor& center,
                                            const at::Tensor& scale, const at::Tensor& rotation, int64_t kernel) {
  const char* op = "decode_heatmaps";
  TORCH_CHECK(maps.dim() == 4, op, ": heatmaps must be [B, K, H, W], got ", maps.sizes());
  floating(op, "heatmaps", maps);
  const int64_t B = maps.size(0), K = maps.size(1), H = maps.size(2), W = maps.size(3);
  crop(op, maps, B, center, scale, rotation, kernel);
  TORCH_CHECK(B * K == 0 || H * W > 0, op, ": empty heatmaps ", maps.sizes(), " have no maximum");
  return {B, K, H, W};
}

// heatmap_decode: features [B, C, H, W], prototypes [B, K, C], a crop per item, a
// maximum to find; returns {B, C, H, W, K}.
inline std::array<int64_t, 5> fused_decode_inputs(const at::Tensor& features, const at::Tensor& prototypes,
                                                  const at::Tensor& center, const at::Tensor& scale,
                                                  const at::Tensor& rotation, int64_t kernel) {
  const char* op = "heatmap_decode";
  features_prototypes(op, features, prototypes);
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t K = prototypes.size(1);
  crop(op, features, B, center, scale, rotation, kernel);
  TORCH_CHECK(B * K == 0 || H * W > 0, op, ": empty feature grid ", features.sizes(), " has no maximum");
  return {B, C, H, W, K};
}

// scores [B, M, N] (N >= 1), bin_score [B] of the dtype of scores, valid [B, M] bool.
inline void sinkhorn_inputs(const char* op, const at::Tensor& scores, const at::Tensor& bin_score,
                            const at::Tensor& valid) {
  TORCH_CHECK(scores.dim() == 3, op, ": scores must be [B, M, N], got ", scores.sizes());
  floating(op, "scores", scores);
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

// grad [B, M + 1, N], u_history [B, T, M + 1], v_history [B, T, N] of the dtype of scores; returns T.
inline int64_t sinkhorn_backward_inputs(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& u,
                                        const at::Tensor& v) {
  const int64_t B = scores.size(0), M = scores.size(1), N = scores.size(2);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == M + 1 && grad.size(2) == N,
              "sinkhorn_log_backward: grad must be [B, M + 1, N] = [", B, ", ", M + 1, ", ", N, "], got ",
              grad.sizes());
  TORCH_CHECK(u.dim() == 3 && u.size(0) == B && u.size(2) == M + 1,
              "sinkhorn_log_backward: u_history must be [B, iters, M + 1], got ", u.sizes());
  const int64_t iters = u.size(1);
  TORCH_CHECK(v.dim() == 3 && v.size(0) == B && v.size(1) == iters && v.size(2) == N,
              "sinkhorn_log_backward: v_history must be [B, iters, N] = [", B, ", ", iters, ", ", N, "], got ",
              v.sizes());
  for (const at::Tensor* t : {&grad, &u, &v}) {
    TORCH_CHECK(t->scalar_type() == scores.scalar_type(),
                "sinkhorn_log_backward: grad and histories must have the dtype of scores (", scores.scalar_type(),
                "), got ", t->scalar_type());
  }
  return iters;
}

// keypoint_pool(_backward): keypoints [B, K, 2] of the dtype of ref (features or grad), visible [B, K]
// bool, a positive finite sigma, every tensor on ref's device.
inline void pool_inputs(const char* op, const at::Tensor& ref, const at::Tensor& keypoints,
                        const at::Tensor& visible, double sigma, int64_t batch) {
  TORCH_CHECK(keypoints.dim() == 3 && keypoints.size(0) == batch && keypoints.size(2) == 2, op,
              ": keypoints must be [B, K, 2] with B=", batch, ", got ", keypoints.sizes());
  TORCH_CHECK(visible.dim() == 2 && visible.size(0) == batch && visible.size(1) == keypoints.size(1), op,
              ": visible must be [B, K] = ", keypoints.sizes().slice(0, 2), ", got ", visible.sizes());
  TORCH_CHECK(keypoints.scalar_type() == ref.scalar_type(), op, ": keypoints must have dtype ", ref.scalar_type(),
              ", got ", keypoints.scalar_type());
  TORCH_CHECK(visible.scalar_type() == at::kBool, op, ": visible must be bool, got ", visible.scalar_type());
  TORCH_CHECK(sigma > 0 && std::isfinite(sigma), op, ": sigma must be a positive finite float, got ", sigma);
  same_device(op, ref, {&keypoints, &visible});
}

// keypoint_pool: features [B, C, H, W]; returns B.
inline int64_t pool_features(const at::Tensor& features, const at::Tensor& keypoints, const at::Tensor& visible,
                             double sigma) {
  TORCH_CHECK(features.dim() == 4, "keypoint_pool: features must be [B, C, H, W], got ", features.sizes());
  pool_inputs("keypoint_pool", features, keypoints, visible, sigma, features.size(0));
  return features.size(0);
}

// keypoint_pool_backward: grad [B, K, C] and a grid of height x width >= 0 cells.
inline void pool_backward(const at::Tensor& grad, const at::Tensor& keypoints, const at::Tensor& visible,
                          double sigma, int64_t height, int64_t width) {
  TORCH_CHECK(grad.dim() == 3, "keypoint_pool_backward: grad must be [B, K, C], got ", grad.sizes());
  TORCH_CHECK(height >= 0 && width >= 0, "keypoint_pool_backward: height and width must be >= 0, got ", height,
              " x ", width);
  pool_inputs("keypoint_pool_backward", grad, keypoints, visible, sigma, grad.size(0));
  TORCH_CHECK(keypoints.size(1) == grad.size(1), "keypoint_pool_backward: keypoints must be [B, K, 2] with K=",
              grad.size(1), " (from grad), got ", keypoints.sizes());
}

}  // namespace escape_fast::checks
