// The decoding math that the CPU (cpu/heatmap.cpp) and CUDA (cuda/heatmap.cu)
// kernels share, as inline host-device functions (torchvision's
// roi_align_common.h pattern): the quarter-cell shift toward the larger
// neighbour and the crop's map from heatmap cells back to image pixels. The
// specification is escape_fast/reference.py (decode_heatmaps,
// heatmap_to_image); the operation order follows it so that float results
// agree with the reference.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ESCAPE_FAST_HOST_DEVICE __host__ __device__
#else
#define ESCAPE_FAST_HOST_DEVICE
#endif

namespace escape_fast::heatmap {

ESCAPE_FAST_HOST_DEVICE inline float math_cos(float x) { return cosf(x); }
ESCAPE_FAST_HOST_DEVICE inline double math_cos(double x) { return cos(x); }
ESCAPE_FAST_HOST_DEVICE inline float math_sin(float x) { return sinf(x); }
ESCAPE_FAST_HOST_DEVICE inline double math_sin(double x) { return sin(x); }

template <typename T>
ESCAPE_FAST_HOST_DEVICE inline T sign(T v) {
  return static_cast<T>((v > T(0)) - (v < T(0)));
}

// mmpose's unit of crop scale, escape_fast.reference.PIXEL_STD: scale = padded box size / kPixelStd.
constexpr double kPixelStd = 200.0;

// The map of one crop from heatmap cells to image pixels:
// center + R(rotation) @ ((p - [W/2, H/2]) * kPixelStd * scale / [W, H]).
template <typename T>
struct CropMap {
  T cx, cy;        // center (image pixels)
  T fx, fy;        // kPixelStd * scale / [W, H]: image pixels per heatmap cell
  T cosr, sinr;    // rotation
  T half_w, half_h;

  ESCAPE_FAST_HOST_DEVICE static CropMap make(const T* center, const T* scale, T rotation, int64_t H, int64_t W) {
    CropMap c;
    c.cx = center[0];
    c.cy = center[1];
    // the operation order of reference.heatmap_to_image: (kPixelStd * s) / size
    c.fx = (static_cast<T>(kPixelStd) * scale[0]) / static_cast<T>(W);
    c.fy = (static_cast<T>(kPixelStd) * scale[1]) / static_cast<T>(H);
    // torch.deg2rad multiplies by pi / 180 rounded to T
    const T theta = rotation * static_cast<T>(0.017453292519943295769236907684886);
    c.cosr = math_cos(theta);
    c.sinr = math_sin(theta);
    c.half_w = static_cast<T>(W) / T(2);
    c.half_h = static_cast<T>(H) / T(2);
    return c;
  }

  // grid point (px, py) -> image pixels coord[0..1]
  ESCAPE_FAST_HOST_DEVICE void to_image(T px, T py, T* coord) const {
    const T ox = (px - half_w) * fx;
    const T oy = (py - half_h) * fy;
    coord[0] = ox * cosr - oy * sinr + cx;
    coord[1] = ox * sinr + oy * cosr + cy;
  }
};

// The decoded point of smoothed map s (row-major H x W) whose first maximum
// is cell ``best``: shifted by a quarter cell toward the larger neighbour in
// x and in y when strictly inside the border, then mapped to the image.
template <typename T>
ESCAPE_FAST_HOST_DEVICE inline void decode_peak(const T* s, int64_t H, int64_t W, int64_t best,
                                                const CropMap<T>& crop, T* coord) {
  const int64_t x = best % W, y = best / W;
  T px = static_cast<T>(x), py = static_cast<T>(y);
  if (x > 1 && x < W - 1 && y > 1 && y < H - 1) {
    px += T(0.25) * sign(s[best + 1] - s[best - 1]);
    py += T(0.25) * sign(s[best + W] - s[best - W]);
  }
  crop.to_image(px, py, coord);
}

// prototype_heatmaps on any device: the op is one batched GEMM, and the BLAS
// (CPU) or cuBLAS (CUDA) kernel behind at::matmul beats any hand loop.
inline at::Tensor prototype_heatmaps_gemm(const at::Tensor& features, const at::Tensor& prototypes) {
  const int64_t B = features.size(0), C = features.size(1), H = features.size(2), W = features.size(3);
  return at::matmul(prototypes, features.reshape({B, C, H * W})).reshape({B, prototypes.size(1), H, W});
}

}  // namespace escape_fast::heatmap
