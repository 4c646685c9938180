// Gaussian-weighted keypoint pooling (docs/method.md, "Keypoint features") on CUDA.
//
// Three kernels:
//   window_params  one thread per keypoint: its in-image window (a rectangle,
//                  the cells with |px - x| <= 3 sigma and |py - y| <= 3 sigma,
//                  tested in scalar_t exactly as escape_fast.reference does)
//                  and 1 / (sum of its Gaussian over that window);
//   pool_forward   one block per (keypoint, 64 channels): each warp owns 8
//                  channels, its lanes walk the window cells (consecutive
//                  lanes read consecutive pixels of a row), then a shuffle
//                  tree reduces the lanes (fixed order: deterministic);
//   pool_backward  a gather: one thread per (cell, 8 channels) loops over the
//                  keypoints of its image in order and adds the ones whose
//                  window holds the cell. Every output element is written by
//                  one thread, in a fixed order: deterministic, no atomics.
//                  Keypoints are staged in shared memory in chunks.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "escape_fast.h"

namespace escape_fast {
namespace {

constexpr int kThreads = 256;          // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kFwdChannelsPerWarp = 8;  // accumulators per lane in the forward
constexpr int kFwdChannelsPerBlock = kWarps * kFwdChannelsPerWarp;
constexpr int kBwdChannels = 8;         // accumulators per thread in the backward
constexpr int kKeypointChunk = kThreads;  // keypoints staged in shared memory at once

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t abs_(scalar_t v) {
  return v < scalar_t(0) ? -v : v;
}

// In-image window [lo, hi] of one axis; false when it holds no cell.
template <typename scalar_t>
__device__ bool axis_window(scalar_t center, scalar_t radius, int size, int& lo, int& hi) {
  const double c = static_cast<double>(center), r = static_cast<double>(radius);
  if (!isfinite(c)) return false;
  // Candidate range in double, clamped before the int conversion (far-away
  // keypoints cannot overflow) and widened by one cell; the exact test decides.
  const double first = fmax(ceil(c - r) - 1.0, 0.0);
  const double last = fmin(floor(c + r) + 1.0, static_cast<double>(size - 1));
  if (first > last) return false;
  lo = static_cast<int>(first);
  hi = static_cast<int>(last);
  while (lo <= hi && !(abs_(static_cast<scalar_t>(lo) - center) <= radius)) ++lo;
  while (hi >= lo && !(abs_(static_cast<scalar_t>(hi) - center) <= radius)) --hi;
  return lo <= hi;
}

// box[bk] = (x0, x1, y0, y1), empty (0, -1, 0, -1) for keypoints that pool
// to zero; inv_norm[bk] = 1 / sum of the Gaussian over the window (0 there).
template <typename scalar_t>
__global__ void window_params_kernel(const scalar_t* __restrict__ keypoints, const bool* __restrict__ visible,
                                     int64_t n, int height, int width, scalar_t radius, scalar_t two_s2,
                                     int4* __restrict__ box, scalar_t* __restrict__ inv_norm) {
  const int64_t bk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bk >= n) return;
  const scalar_t x = keypoints[bk * 2], y = keypoints[bk * 2 + 1];
  int x0, x1, y0, y1;
  if (!visible[bk] || !axis_window(x, radius, width, x0, x1) || !axis_window(y, radius, height, y0, y1)) {
    box[bk] = make_int4(0, -1, 0, -1);
    inv_norm[bk] = scalar_t(0);
    return;
  }
  // The Gaussian factors into gx(px) * gy(py): the window sum is a product.
  scalar_t sx = 0, sy = 0;
  for (int p = x0; p <= x1; ++p) {
    const scalar_t d = static_cast<scalar_t>(p) - x;
    sx += exp_(-(d * d) / two_s2);
  }
  for (int p = y0; p <= y1; ++p) {
    const scalar_t d = static_cast<scalar_t>(p) - y;
    sy += exp_(-(d * d) / two_s2);
  }
  box[bk] = make_int4(x0, x1, y0, y1);
  inv_norm[bk] = scalar_t(1) / (sx * sy);  // >= exp(-9) per factor: no underflow
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t warp_sum(scalar_t v) {
  // Fixed butterfly: every lane ends with the same, order-independent-of-timing sum.
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// grid (B * K, ceil(C / 64)), block 256.
template <typename scalar_t>
__global__ void pool_forward_kernel(const scalar_t* __restrict__ features, const scalar_t* __restrict__ keypoints,
                                    const int4* __restrict__ box, const scalar_t* __restrict__ inv_norm, int K,
                                    int C, int height, int width, scalar_t two_s2, scalar_t* __restrict__ out) {
  const int64_t bk = blockIdx.x;
  const int4 win = box[bk];
  if (win.y < win.x) return;  // pools to zero; out is zero-initialized
  const int64_t b = bk / K;
  const scalar_t x = keypoints[bk * 2], y = keypoints[bk * 2 + 1];
  const int ww = win.y - win.x + 1;
  const int n_cells = ww * (win.w - win.z + 1);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int c_first = blockIdx.y * kFwdChannelsPerBlock + warp * kFwdChannelsPerWarp;
  if (c_first >= C) return;  // warp-uniform: whole warps leave together
  const int64_t plane = static_cast<int64_t>(height) * width;
  const scalar_t* f = features + (b * C + c_first) * plane;

  scalar_t acc[kFwdChannelsPerWarp];
#pragma unroll
  for (int j = 0; j < kFwdChannelsPerWarp; ++j) acc[j] = 0;
  for (int idx = lane; idx < n_cells; idx += 32) {
    const int px = win.x + idx % ww, py = win.z + idx / ww;
    const scalar_t dx = static_cast<scalar_t>(px) - x, dy = static_cast<scalar_t>(py) - y;
    const scalar_t w = exp_(-(dx * dx + dy * dy) / two_s2);
    const int64_t offset = static_cast<int64_t>(py) * width + px;
#pragma unroll
    for (int j = 0; j < kFwdChannelsPerWarp; ++j) {
      if (c_first + j < C) acc[j] += f[j * plane + offset] * w;
    }
  }
  const scalar_t scale = inv_norm[bk];
#pragma unroll
  for (int j = 0; j < kFwdChannelsPerWarp; ++j) {
    const scalar_t total = warp_sum(acc[j]);  // all lanes take part (full mask)
    if (lane == j && c_first + j < C) out[bk * C + c_first + j] = total * scale;
  }
}

// grid (B * ceil(H * W / 256), ceil(C / 8)), block 256.
template <typename scalar_t>
__global__ void pool_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ keypoints,
                                     const int4* __restrict__ box, const scalar_t* __restrict__ inv_norm, int K,
                                     int C, int height, int width, int cell_blocks, scalar_t two_s2,
                                     scalar_t* __restrict__ out) {
  __shared__ scalar_t s_x[kKeypointChunk], s_y[kKeypointChunk], s_scale[kKeypointChunk];
  __shared__ int4 s_box[kKeypointChunk];
  __shared__ scalar_t s_grad[kBwdChannels][kKeypointChunk];

  const int64_t b = blockIdx.x / cell_blocks;
  const int n_cells = height * width;
  const int cell = (blockIdx.x % cell_blocks) * kThreads + threadIdx.x;
  const bool in_image = cell < n_cells;
  const int px = in_image ? cell % width : -1, py = in_image ? cell / width : -1;
  const int c0 = blockIdx.y * kBwdChannels;

  scalar_t acc[kBwdChannels];
#pragma unroll
  for (int j = 0; j < kBwdChannels; ++j) acc[j] = 0;

  for (int k0 = 0; k0 < K; k0 += kKeypointChunk) {
    const int count = min(kKeypointChunk, K - k0);
    __syncthreads();  // the previous chunk is no longer read
    if (threadIdx.x < count) {
      const int t = threadIdx.x;
      const int64_t bk = b * K + k0 + t;
      s_x[t] = keypoints[bk * 2];
      s_y[t] = keypoints[bk * 2 + 1];
      s_scale[t] = inv_norm[bk];
      s_box[t] = box[bk];
#pragma unroll
      for (int j = 0; j < kBwdChannels; ++j) s_grad[j][t] = c0 + j < C ? grad[bk * C + c0 + j] : scalar_t(0);
    }
    __syncthreads();
    for (int t = 0; t < count; ++t) {
      const int4 win = s_box[t];  // empty windows (x1 < x0) never match
      if (px < win.x || px > win.y || py < win.z || py > win.w) continue;
      const scalar_t dx = static_cast<scalar_t>(px) - s_x[t], dy = static_cast<scalar_t>(py) - s_y[t];
      const scalar_t w = exp_(-(dx * dx + dy * dy) / two_s2) * s_scale[t];
#pragma unroll
      for (int j = 0; j < kBwdChannels; ++j) acc[j] += s_grad[j][t] * w;
    }
  }
  if (!in_image) return;
#pragma unroll
  for (int j = 0; j < kBwdChannels; ++j) {
    if (c0 + j < C) out[(b * C + c0 + j) * static_cast<int64_t>(n_cells) + cell] = acc[j];  // coalesced
  }
}

void check_cuda(const char* op, const at::Tensor& main) {
  TORCH_CHECK(main.is_cuda(), op, ": every tensor must be a CUDA tensor");
}

// Every keypoint's window: the keypoints made contiguous, box [B*K] int4 (as an
// int32 tensor [B*K, 4]) and inv_norm [B*K], computed on the device.
struct Windows {
  at::Tensor keypoints, box, inv_norm;

  const int4* boxes() const {
    return reinterpret_cast<const int4*>(box.data_ptr<int>());
  }
};

Windows make_windows(const at::Tensor& keypoints, const at::Tensor& visible, double sigma, int64_t height,
                     int64_t width) {
  const auto kp = keypoints.contiguous();
  const auto vis = visible.contiguous();
  const int64_t n = vis.numel();
  auto box = at::empty({n, 4}, kp.options().dtype(at::kInt));
  auto inv = at::empty({n}, kp.options());
  if (n == 0) return {kp, box, inv};
  const auto stream = at::cuda::getCurrentCUDAStream();
  ESCAPE_FAST_DISPATCH_FLOATING(kp.scalar_type(), "keypoint_pool_window_params", [&] {
    const auto blocks = static_cast<unsigned>((n + kThreads - 1) / kThreads);
    window_params_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        kp.data_ptr<scalar_t>(), vis.data_ptr<bool>(), n, static_cast<int>(height), static_cast<int>(width),
        static_cast<scalar_t>(3.0 * sigma), static_cast<scalar_t>(2.0 * sigma * sigma),
        reinterpret_cast<int4*>(box.data_ptr<int>()), inv.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {kp, box, inv};
}

void check_sizes(const char* op, int64_t B, int64_t K, int64_t C, int64_t H, int64_t W) {
  constexpr int64_t int_max = std::numeric_limits<int>::max();
  TORCH_CHECK(H * W <= int_max - kThreads && C <= int_max && K <= int_max, op, ": sizes too large (B=", B,
              ", K=", K, ", C=", C, ", H=", H, ", W=", W, ")");
}

}  // namespace

at::Tensor keypoint_pool_cuda(const at::Tensor& features, const at::Tensor& keypoints, const at::Tensor& visible,
                              double sigma) {
  check_cuda("keypoint_pool", features);
  const int64_t B = checks::pool_features(features, keypoints, visible, sigma);
  const int64_t C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t K = keypoints.size(1);
  check_sizes("keypoint_pool", B, K, C, H, W);
  const c10::cuda::CUDAGuard guard(features.device());
  auto out = at::zeros({B, K, C}, features.options());
  if (out.numel() == 0 || H == 0 || W == 0) return out;

  const auto feat = features.contiguous();
  const auto win = make_windows(keypoints, visible, sigma, H, W);
  const int64_t channel_blocks = (C + kFwdChannelsPerBlock - 1) / kFwdChannelsPerBlock;
  TORCH_CHECK(channel_blocks <= 65535 && B * K <= std::numeric_limits<int>::max(),
              "keypoint_pool: too many channels or keypoints for one launch");
  const dim3 grid(static_cast<unsigned>(B * K), static_cast<unsigned>(channel_blocks));
  const auto stream = at::cuda::getCurrentCUDAStream();
  ESCAPE_FAST_DISPATCH_FLOATING(features.scalar_type(), "keypoint_pool_cuda", [&] {
    pool_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        feat.data_ptr<scalar_t>(), win.keypoints.data_ptr<scalar_t>(), win.boxes(),
        win.inv_norm.data_ptr<scalar_t>(), static_cast<int>(K), static_cast<int>(C), static_cast<int>(H),
        static_cast<int>(W), static_cast<scalar_t>(2.0 * sigma * sigma), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor keypoint_pool_backward_cuda(const at::Tensor& grad, const at::Tensor& keypoints,
                                       const at::Tensor& visible, double sigma, int64_t height, int64_t width) {
  check_cuda("keypoint_pool_backward", grad);
  checks::pool_backward(grad, keypoints, visible, sigma, height, width);
  const int64_t B = grad.size(0), K = grad.size(1), C = grad.size(2), H = height, W = width;
  check_sizes("keypoint_pool_backward", B, K, C, H, W);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto out = at::zeros({B, C, H, W}, grad.options());
  if (out.numel() == 0 || K == 0) return out;

  const auto g = grad.contiguous();
  const auto win = make_windows(keypoints, visible, sigma, H, W);
  const int64_t cell_blocks = (H * W + kThreads - 1) / kThreads;
  const int64_t channel_blocks = (C + kBwdChannels - 1) / kBwdChannels;
  TORCH_CHECK(B * cell_blocks <= std::numeric_limits<int>::max() && channel_blocks <= 65535,
              "keypoint_pool_backward: too many images, cells or channels for one launch");
  const dim3 grid(static_cast<unsigned>(B * cell_blocks), static_cast<unsigned>(channel_blocks));
  const auto stream = at::cuda::getCurrentCUDAStream();
  ESCAPE_FAST_DISPATCH_FLOATING(grad.scalar_type(), "keypoint_pool_backward_cuda", [&] {
    pool_backward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        g.data_ptr<scalar_t>(), win.keypoints.data_ptr<scalar_t>(), win.boxes(),
        win.inv_norm.data_ptr<scalar_t>(), static_cast<int>(K), static_cast<int>(C), static_cast<int>(H),
        static_cast<int>(W), static_cast<int>(cell_blocks), static_cast<scalar_t>(2.0 * sigma * sigma),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// This file's ops on the CUDA dispatch key (the schema is csrc/ops.cpp's); an op without
// a CUDA kernel would simply not be registered here.
TORCH_LIBRARY_IMPL(escape_fast, CUDA, m) {
  m.impl("keypoint_pool", &keypoint_pool_cuda);
  m.impl("keypoint_pool_backward", &keypoint_pool_backward_cuda);
}

}  // namespace escape_fast
