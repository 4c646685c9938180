// CUDA kernels of escape_fast::prototype_heatmaps, decode_heatmaps and the
// fused heatmap_decode (specification: escape_fast/reference.py).
//
// Fused kernel: one block per (b, tile of KT prototypes). The tile's KT
// heatmaps are accumulated in registers (each thread: kPix pixels x KT
// prototypes, features read straight from global memory, coalesced along the
// pixels, once per tile) and stored in shared memory; then, map by map, a
// separable in-image box filter in shared memory, a block argmax with
// first-index ties, and one thread doing the quarter-cell shift and the crop
// inverse map. The [B, K, H, W] heatmaps never reach global memory.
// When a tile does not fit in shared memory even for KT = 1 (very large
// grids), the op falls back to cuBLAS heatmaps + the decode kernel.
//
// Decode kernel: one block per (b, k) map, the map and the row sums in
// shared memory (or in a global scratch buffer when they do not fit).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cmath>

#include "checks.h"
#include "escape_fast.h"
#include "heatmap_common.h"

namespace escape_fast {
namespace {

constexpr int kThreads = 512;  // 16 warps: one resident block per SM must hide latency alone
constexpr int kWarps = kThreads / 32;
constexpr int kPix = 4;        // pixels per thread per pass of the heatmap loop

// In-place separable in-image mean filter of one H x W map (shared or global
// memory) with tmp (H * W) holding the row sums. Window sums run over
// ascending x, then ascending y, exactly as the CPU kernel. Called by the
// whole block; ends with a barrier so that map is ready for every thread.
template <typename T>
__device__ void block_box_filter(T* map, T* tmp, int H, int W, int r) {
  const int HW = H * W;
  for (int i = threadIdx.x; i < HW; i += blockDim.x) {
    const int y = i / W, x = i - y * W;
    const int x0 = max(0, x - r), x1 = min(W - 1, x + r);
    const T* row = map + y * W;
    T s = T(0);
    for (int xx = x0; xx <= x1; ++xx) s += row[xx];
    tmp[i] = s;
  }
  __syncthreads();  // every row sum is written before any column reads it
  for (int i = threadIdx.x; i < HW; i += blockDim.x) {
    const int y = i / W, x = i - y * W;
    const int x0 = max(0, x - r), x1 = min(W - 1, x + r);
    const int y0 = max(0, y - r), y1 = min(H - 1, y + r);
    T s = T(0);
    for (int yy = y0; yy <= y1; ++yy) s += tmp[yy * W + x];
    map[i] = s / static_cast<T>((y1 - y0 + 1) * (x1 - x0 + 1));  // exact integer count
  }
  __syncthreads();
}

// (v, i) beats (bv, bi) when larger, or equal with a smaller flat index: the
// first maximum in row-major order wins whatever the reduction order.
template <typename T>
__device__ inline void take_better(T v, int i, T& bv, int& bi) {
  if (v > bv || (v == bv && i < bi)) {
    bv = v;
    bi = i;
  }
}

template <typename T>
__device__ inline void warp_argmax(T& bv, int& bi) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T ov = __shfl_xor_sync(0xffffffffu, bv, offset);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, offset);
    take_better(ov, oi, bv, bi);
  }
}

// First maximum of s[0, n) over the block; every thread gets the result.
// out_v is NaN when s holds a NaN or an infinity (the public op's finite
// check reads the peaks instead of the whole input).
// red_v / red_i: kWarps + 1 slots of shared memory.
template <typename T>
__device__ void block_argmax(const T* s, int n, T* red_v, int* red_i, T& out_v, int& out_i) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T bv = T(-INFINITY);
  int bi = INT_MAX;
  int nonfinite = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    nonfinite |= !isfinite(s[i]);
    take_better(s[i], i, bv, bi);
  }
  warp_argmax(bv, bi);
  if (lane == 0) {
    red_v[warp] = bv;
    red_i[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    bv = lane < kWarps ? red_v[lane] : T(-INFINITY);
    bi = lane < kWarps ? red_i[lane] : INT_MAX;
    warp_argmax(bv, bi);
    if (lane == 0) {
      red_v[kWarps] = bv;
      red_i[kWarps] = bi;
    }
  }
  __syncthreads();
  out_v = red_v[kWarps];
  out_i = red_i[kWarps];
  // a barrier (the slots are free again for the next call) that also ORs the flags
  if (__syncthreads_or(nonfinite)) out_v = T(NAN);
}

// Quarter-cell shift on the smoothed map s and the crop's inverse map
// (heatmap_common.h, shared with the CPU kernel); writes the peak value.
template <typename T>
__device__ void write_keypoint(const T* s, int H, int W, int best, T best_v, const T* center, const T* scale,
                               T rotation, T* coord, T* value) {
  heatmap::decode_peak(s, H, W, best, heatmap::CropMap<T>::make(center, scale, rotation, H, W), coord);
  *value = best_v;
}

// ---------------------------------------------------------------------------
// fused kernel
// ---------------------------------------------------------------------------
template <typename T, int KT>
__global__ void __launch_bounds__(kThreads)
    heatmap_decode_kernel(const T* __restrict__ feat, const T* __restrict__ proto, const T* __restrict__ center,
                          const T* __restrict__ scale, const T* __restrict__ rotation, T* __restrict__ coords,
                          T* __restrict__ values, int C, int H, int W, int K, int tiles, int r) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ T red_v[kWarps + 1];
  __shared__ int red_i[kWarps + 1];
  const int HW = H * W;
  T* heat = reinterpret_cast<T*>(smem_raw);  // [KT, HW] heatmaps, then smoothed maps
  T* tmp = heat + KT * HW;                    // [HW] row sums of the box filter
  T* pt = tmp + HW;                           // [C, KT] prototypes of the tile, transposed

  const int b = blockIdx.x / tiles;
  const int k0 = (blockIdx.x % tiles) * KT;
  const int nk = min(KT, K - k0);
  const T* pb = proto + (static_cast<int64_t>(b) * K + k0) * C;
  for (int i = threadIdx.x; i < C * KT; i += blockDim.x) {
    const int c = i / KT, t = i - c * KT;
    pt[i] = t < nk ? pb[static_cast<int64_t>(t) * C + c] : T(0);  // zero rows of a partial tile
  }
  __syncthreads();

  // Heatmaps: pixel p = base + j * kThreads + tid, so a warp's loads of one
  // channel are contiguous; the KT weights of channel c are one broadcast
  // read of shared memory each.
  const T* fb = feat + static_cast<int64_t>(b) * C * HW;
  for (int base = 0; base < HW; base += kThreads * kPix) {
    T acc[KT][kPix];
#pragma unroll
    for (int t = 0; t < KT; ++t) {
#pragma unroll
      for (int j = 0; j < kPix; ++j) acc[t][j] = T(0);
    }
#pragma unroll 4
    for (int c = 0; c < C; ++c) {
      const T* fc = fb + static_cast<int64_t>(c) * HW;
      T f[kPix];
#pragma unroll
      for (int j = 0; j < kPix; ++j) {
        const int p = base + j * kThreads + threadIdx.x;
        f[j] = p < HW ? __ldg(fc + p) : T(0);
      }
#pragma unroll
      for (int t = 0; t < KT; ++t) {
        const T w = pt[c * KT + t];
#pragma unroll
        for (int j = 0; j < kPix; ++j) acc[t][j] += w * f[j];
      }
    }
#pragma unroll
    for (int j = 0; j < kPix; ++j) {
      const int p = base + j * kThreads + threadIdx.x;
      if (p < HW) {
#pragma unroll
        for (int t = 0; t < KT; ++t) heat[t * HW + p] = acc[t][j];
      }
    }
  }
  __syncthreads();

  for (int t = 0; t < nk; ++t) {  // nk is the same for the whole block
    T* s = heat + t * HW;
    block_box_filter(s, tmp, H, W, r);
    T best_v;
    int best;
    block_argmax(s, HW, red_v, red_i, best_v, best);
    if (threadIdx.x == 0) {
      const int64_t bk = static_cast<int64_t>(b) * K + k0 + t;
      write_keypoint(s, H, W, best, best_v, center + 2 * b, scale + 2 * b, rotation[b], coords + 2 * bk,
                     values + bk);
    }
  }
}

// ---------------------------------------------------------------------------
// decode kernel: one block per map
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    decode_heatmaps_kernel(const T* __restrict__ maps, T* __restrict__ scratch, const T* __restrict__ center,
                           const T* __restrict__ scale, const T* __restrict__ rotation, T* __restrict__ coords,
                           T* __restrict__ values, int K, int H, int W, int r, bool use_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ T red_v[kWarps + 1];
  __shared__ int red_i[kWarps + 1];
  const int HW = H * W;
  const int64_t bk = blockIdx.x;
  const int b = static_cast<int>(bk / K);
  T* s = use_smem ? reinterpret_cast<T*>(smem_raw) : scratch + bk * 2 * HW;
  T* tmp = s + HW;
  const T* m = maps + bk * HW;
  for (int i = threadIdx.x; i < HW; i += blockDim.x) s[i] = m[i];
  __syncthreads();
  block_box_filter(s, tmp, H, W, r);
  T best_v;
  int best;
  block_argmax(s, HW, red_v, red_i, best_v, best);
  if (threadIdx.x == 0) {
    write_keypoint(s, H, W, best, best_v, center + 2 * b, scale + 2 * b, rotation[b], coords + 2 * bk,
                   values + bk);
  }
}

// ---------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------
void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got ", t.device());
}

// Blocks may use more than the default 48 KiB of dynamic shared memory only
// after opting in, per kernel.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

size_t smem_optin() {
  // Static shared memory of the kernels (the reduction slots) is small but
  // counts against the same limit.
  const size_t reserve = (kWarps + 1) * (sizeof(double) + sizeof(int));
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - reserve;
}

template <typename T>
void launch_decode(const at::Tensor& maps, const at::Tensor& center, const at::Tensor& scale,
                   const at::Tensor& rotation, at::Tensor& coords, at::Tensor& values, int64_t r) {
  const int64_t B = maps.size(0), K = maps.size(1), H = maps.size(2), W = maps.size(3);
  const int64_t HW = H * W;
  const size_t bytes = 2 * HW * sizeof(T);
  const bool use_smem = bytes <= smem_optin();
  at::Tensor scratch;  // map + row sums per block when they do not fit on chip
  if (!use_smem) scratch = at::empty({B * K, 2 * HW}, maps.options());
  auto kernel = decode_heatmaps_kernel<T>;
  if (use_smem) allow_smem(kernel, bytes);
  kernel<<<static_cast<unsigned>(B * K), kThreads, use_smem ? bytes : 0, at::cuda::getCurrentCUDAStream()>>>(
      maps.data_ptr<T>(), use_smem ? nullptr : scratch.data_ptr<T>(), center.data_ptr<T>(), scale.data_ptr<T>(),
      rotation.data_ptr<T>(), coords.data_ptr<T>(), values.data_ptr<T>(), static_cast<int>(K), static_cast<int>(H),
      static_cast<int>(W), static_cast<int>(r), use_smem);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
size_t fused_bytes(int kt, int64_t C, int64_t HW) {
  return (static_cast<size_t>(kt) * HW + HW + static_cast<size_t>(C) * kt) * sizeof(T);
}

template <typename T, int KT>
void launch_fused(const at::Tensor& feat, const at::Tensor& proto, const at::Tensor& center, const at::Tensor& scale,
                  const at::Tensor& rotation, at::Tensor& coords, at::Tensor& values, int64_t r) {
  const int64_t B = feat.size(0), C = feat.size(1), H = feat.size(2), W = feat.size(3);
  const int64_t K = proto.size(1);
  const int64_t tiles = (K + KT - 1) / KT;
  const size_t bytes = fused_bytes<T>(KT, C, H * W);
  auto kernel = heatmap_decode_kernel<T, KT>;
  allow_smem(kernel, bytes);
  kernel<<<static_cast<unsigned>(B * tiles), kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
      feat.data_ptr<T>(), proto.data_ptr<T>(), center.data_ptr<T>(), scale.data_ptr<T>(), rotation.data_ptr<T>(),
      coords.data_ptr<T>(), values.data_ptr<T>(), static_cast<int>(C), static_cast<int>(H), static_cast<int>(W),
      static_cast<int>(K), static_cast<int>(tiles), static_cast<int>(r));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Prototypes per block: the largest tile (fewest re-reads of the features)
// that still gives every SM a block; 0 when not even one map fits on chip.
template <typename T>
int choose_tile(int64_t B, int64_t K, int64_t C, int64_t HW) {
  constexpr int kMaxTile = sizeof(T) == 4 ? 8 : 4;  // register budget of acc[KT][kPix]
  const size_t limit = smem_optin();
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int smallest_fit = 0;
  for (int kt = kMaxTile; kt >= 1; kt /= 2) {
    if (fused_bytes<T>(kt, C, HW) > limit) continue;
    smallest_fit = kt;
    if (B * ((K + kt - 1) / kt) >= sms) return kt;
  }
  return smallest_fit;
}

}  // namespace

at::Tensor prototype_heatmaps_cuda(const at::Tensor& features, const at::Tensor& prototypes) {
  check_cuda("prototype_heatmaps", features);
  checks::features_prototypes("prototype_heatmaps", features, prototypes);
  const at::cuda::OptionalCUDAGuard guard(features.device());
  return heatmap::prototype_heatmaps_gemm(features, prototypes);
}

std::tuple<at::Tensor, at::Tensor> decode_heatmaps_cuda(const at::Tensor& heatmaps, const at::Tensor& center,
                                                        const at::Tensor& scale, const at::Tensor& rotation,
                                                        int64_t kernel) {
  check_cuda("decode_heatmaps", heatmaps);
  const auto dims = checks::decode_inputs(heatmaps, center, scale, rotation, kernel);
  const int64_t B = dims[0], K = dims[1], H = dims[2], W = dims[3];
  TORCH_CHECK(H * W < INT_MAX / 2 && B * K < INT_MAX, "decode_heatmaps: heatmaps ", heatmaps.sizes(), " too large");
  const at::cuda::OptionalCUDAGuard guard(heatmaps.device());
  auto coords = at::empty({B, K, 2}, heatmaps.options());
  auto values = at::empty({B, K}, heatmaps.options());
  if (B * K == 0) return {coords, values};
  const auto maps = heatmaps.contiguous();
  const auto cen = center.contiguous(), sca = scale.contiguous(), rot = rotation.contiguous();
  const int64_t r = std::min<int64_t>(kernel / 2, std::max(H, W));  // wider windows change nothing
  ESCAPE_FAST_DISPATCH_FLOATING(maps.scalar_type(), "decode_heatmaps_cuda",
                                [&] { launch_decode<scalar_t>(maps, cen, sca, rot, coords, values, r); });
  return {coords, values};
}

std::tuple<at::Tensor, at::Tensor> heatmap_decode_cuda(const at::Tensor& features, const at::Tensor& prototypes,
                                                       const at::Tensor& center, const at::Tensor& scale,
                                                       const at::Tensor& rotation, int64_t kernel) {
  check_cuda("heatmap_decode", features);
  const auto dims = checks::fused_decode_inputs(features, prototypes, center, scale, rotation, kernel);
  const int64_t B = dims[0], C = dims[1], H = dims[2], W = dims[3], K = dims[4];
  TORCH_CHECK(H * W < INT_MAX / 16 && C < INT_MAX / 16 && B * K < INT_MAX, "heatmap_decode: inputs ",
              features.sizes(), " x ", prototypes.sizes(), " too large");
  const at::cuda::OptionalCUDAGuard guard(features.device());
  auto coords = at::empty({B, K, 2}, features.options());
  auto values = at::empty({B, K}, features.options());
  if (B * K == 0) return {coords, values};
  const auto cen = center.contiguous(), sca = scale.contiguous(), rot = rotation.contiguous();
  const int64_t r = std::min<int64_t>(kernel / 2, std::max(H, W));
  ESCAPE_FAST_DISPATCH_FLOATING(features.scalar_type(), "heatmap_decode_cuda", [&] {
    const int kt = choose_tile<scalar_t>(B, K, C, H * W);
    if (kt == 0) {
      // Not even one map fits on chip: materialize the heatmaps (cuBLAS) and
      // decode them from global memory.
      const auto maps = at::matmul(prototypes, features.reshape({B, C, H * W})).reshape({B, K, H, W}).contiguous();
      launch_decode<scalar_t>(maps, cen, sca, rot, coords, values, r);
      return;
    }
    const auto feat = features.contiguous(), proto = prototypes.contiguous();
    switch (kt) {
      case 8:
        launch_fused<scalar_t, sizeof(scalar_t) == 4 ? 8 : 4>(feat, proto, cen, sca, rot, coords, values, r);
        break;
      case 4:
        launch_fused<scalar_t, 4>(feat, proto, cen, sca, rot, coords, values, r);
        break;
      case 2:
        launch_fused<scalar_t, 2>(feat, proto, cen, sca, rot, coords, values, r);
        break;
      default:
        launch_fused<scalar_t, 1>(feat, proto, cen, sca, rot, coords, values, r);
        break;
    }
  });
  return {coords, values};
}

// This file's ops on the CUDA dispatch key (the schema is csrc/ops.cpp's); an op without
// a CUDA kernel would simply not be registered here.
TORCH_LIBRARY_IMPL(escape_fast, CUDA, m) {
  m.impl("prototype_heatmaps", &prototype_heatmaps_cuda);
  m.impl("decode_heatmaps", &decode_heatmaps_cuda);
  m.impl("heatmap_decode", &heatmap_decode_cuda);
}

}  // namespace escape_fast
