// What the C++ and CUDA implementations of the escape_fast ops share: the
// dtype dispatch, and the entry point of every op on every backend. Each op
// file (cpu/<op>.cpp, cuda/<op>.cu) defines its entry points; the backend's
// register file (cpu/register.cpp, cuda/register.cu) binds them to the one
// schema of ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace escape_fast {

// Dispatch float32 and float64 (the dtypes every op supports).
#define ESCAPE_FAST_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Every backend's entry points, with the arguments of the schema in ops.cpp.
#define ESCAPE_FAST_DECLARE_OPS(SUFFIX)                                                                         \
  at::Tensor prototype_heatmaps_##SUFFIX(const at::Tensor& features, const at::Tensor& prototypes);             \
  Pair decode_heatmaps_##SUFFIX(const at::Tensor& heatmaps, const at::Tensor& center, const at::Tensor& scale,  \
                                const at::Tensor& rotation, int64_t kernel);                                   \
  Pair heatmap_decode_##SUFFIX(const at::Tensor& features, const at::Tensor& prototypes,                        \
                               const at::Tensor& center, const at::Tensor& scale, const at::Tensor& rotation,   \
                               int64_t kernel);                                                                 \
  at::Tensor keypoint_pool_##SUFFIX(const at::Tensor& features, const at::Tensor& keypoints,                    \
                                    const at::Tensor& visible, double sigma);                                   \
  at::Tensor keypoint_pool_backward_##SUFFIX(const at::Tensor& grad, const at::Tensor& keypoints,               \
                                             const at::Tensor& visible, double sigma, int64_t height,           \
                                             int64_t width);                                                    \
  Triple sinkhorn_log_##SUFFIX(const at::Tensor& scores, const at::Tensor& bins, const at::Tensor& valid,      \
                               int64_t iters);                                                                  \
  Pair sinkhorn_log_backward_##SUFFIX(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& bins, \
                                      const at::Tensor& valid, const at::Tensor& u_hist,                        \
                                      const at::Tensor& v_hist);

// The registration of one backend's entry points (in its register file).
#define ESCAPE_FAST_REGISTER_OPS(M, SUFFIX)                              \
  M.impl("prototype_heatmaps", &prototype_heatmaps_##SUFFIX);             \
  M.impl("decode_heatmaps", &decode_heatmaps_##SUFFIX);                   \
  M.impl("heatmap_decode", &heatmap_decode_##SUFFIX);                     \
  M.impl("keypoint_pool", &keypoint_pool_##SUFFIX);                       \
  M.impl("keypoint_pool_backward", &keypoint_pool_backward_##SUFFIX);     \
  M.impl("sinkhorn_log", &sinkhorn_log_##SUFFIX);                         \
  M.impl("sinkhorn_log_backward", &sinkhorn_log_backward_##SUFFIX);

ESCAPE_FAST_DECLARE_OPS(cpu)
#ifdef ESCAPE_FAST_WITH_CUDA
ESCAPE_FAST_DECLARE_OPS(cuda)
#endif

}  // namespace escape_fast
