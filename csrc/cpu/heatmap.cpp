// CPU kernels of escape_fast::prototype_heatmaps, decode_heatmaps and the
// fused heatmap_decode (see escape_fast/reference.py for the specification).
//
// decode: per map, a separable in-image mean filter (row sums, then column
// sums divided by the in-image cell count), the first maximum in row-major
// order, the quarter-cell shift and the crop's inverse map.
// fused: per (b, chunk of prototypes), the chunk's heatmaps are accumulated
// by a register-blocked micro-kernel (heatmap_gemm.cpp) in a thread-local
// buffer (features read once per chunk, not once per keypoint) and decoded
// there; the [B, K, H, W] heatmaps are never stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// No fused multiply-add contraction in the filter, the argmax and the crop
// map: they give the same bits on every ISA variant (isa.h). The inner
// products (heatmap_gemm.cpp) keep their FMAs.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "checks.h"
#include "escape_fast.h"
#include "heatmap_common.h"
#include "heatmap_gemm.h"
#include "isa.h"

namespace escape_fast {
namespace {

// Most prototypes per work item of the fused kernel: a chunk's heatmaps
// (68 x 64 x 64 floats = 1.1 MiB) sit in a thread-local buffer.
constexpr int64_t kChunkMax = 128;

// Separable in-image mean filter of one H x W map: out = box(in) / count.
// Sums run over ascending x (then y) like a direct window sum; the inner
// loops run over contiguous x so that the compiler vectorizes them.
template <typename T>
ESCAPE_FAST_INLINE void box_filter(const T* in, T* tmp, T* out, int64_t H, int64_t W, int64_t r) {
  const int64_t rx = std::min(r, W - 1);
  for (int64_t y = 0; y < H; ++y) {
    const T* row = in + y * W;
    T* t = tmp + y * W;
    std::fill(t, t + W, T(0));
    for (int64_t dx = -rx; dx <= rx; ++dx) {
      const int64_t x0 = std::max<int64_t>(0, -dx);
      const int64_t x1 = std::min<int64_t>(W, W - dx);
      for (int64_t x = x0; x < x1; ++x) t[x] += row[x + dx];
    }
  }
  for (int64_t y = 0; y < H; ++y) {
    const int64_t y0 = std::max<int64_t>(0, y - r);
    const int64_t y1 = std::min<int64_t>(H - 1, y + r);
    T* o = out + y * W;
    std::fill(o, o + W, T(0));
    for (int64_t yy = y0; yy <= y1; ++yy) {
      const T* t = tmp + yy * W;
      for (int64_t x = 0; x < W; ++x) o[x] += t[x];
    }
    const int64_t cy = y1 - y0 + 1;
    for (int64_t x = 0; x < W; ++x) {
      const int64_t cx = std::min<int64_t>(W - 1, x + r) - std::max<int64_t>(0, x - r) + 1;
      o[x] /= static_cast<T>(cy * cx);  // the count is an exact integer in T
    }
  }
}

// Argmax (first maximum), quarter-cell shift and inverse crop map of one
// smoothed map; writes (x, y) image pixels and the peak value, which is NaN
// when the map holds a NaN or an infinity (how the public op learns of
// non-finite input without a separate pass over the features).
template <typename T>
ESCAPE_FAST_INLINE void decode_smoothed(const T* s, int64_t H, int64_t W, const heatmap::CropMap<T>& crop, T* coord, T* value) {
  int64_t best = 0;
  T best_v = s[0];
  bool finite = std::isfinite(s[0]);
  for (int64_t i = 1; i < H * W; ++i) {
    finite &= std::isfinite(s[i]);
    if (s[i] > best_v) {  // strictly greater: the smallest index wins ties
      best_v = s[i];
      best = i;
    }
  }
  heatmap::decode_peak(s, H, W, best, crop, coord);
  *value = finite ? best_v : std::numeric_limits<T>::quiet_NaN();
}

// What both decode ops write: map (b, k), smoothed, decoded into coords / values.
template <typename T>
struct Decoder {
  const T *center, *scale, *rotation;
  T *coords, *values;
  int64_t H, W;

  ESCAPE_FAST_INLINE heatmap::CropMap<T> crop(int64_t b) const {
    return heatmap::CropMap<T>::make(center + 2 * b, scale + 2 * b, rotation[b], H, W);
  }
  ESCAPE_FAST_INLINE void decode(const T* smooth, const heatmap::CropMap<T>& crop, int64_t bk) const {
    decode_smoothed(smooth, H, W, crop, coords + 2 * bk, values + bk);
  }
};

template <typename T>
Decoder<T> make_decoder(const at::Tensor& center, const at::Tensor& scale, const at::Tensor& rotation,
                        at::Tensor& coords, at::Tensor& values, int64_t H, int64_t W) {
  return {center.data_ptr<T>(), scale.data_ptr<T>(), rotation.data_ptr<T>(), coords.data_ptr<T>(),
          values.data_ptr<T>(), H, W};
}

// The work of a range [begin, end) of the parallel loops below, one variant
// per instruction set (isa.h): the box filter and the argmax vectorize as
// well as the inner products.
template <typename T>
ESCAPE_FAST_INLINE void decode_maps_body(const T* maps, const Decoder<T>& out, int64_t K, int64_t H, int64_t W,
                                         int64_t r, int64_t begin, int64_t end) {
  const int64_t HW = H * W;
  std::vector<T> tmp(HW), smooth(HW);
  for (int64_t i = begin; i < end; ++i) {
    box_filter(maps + i * HW, tmp.data(), smooth.data(), H, W, r);
    out.decode(smooth.data(), out.crop(i / K), i);
  }
}

// Work item i = (b, chunk of prototypes): heatmaps of the chunk, then each filtered and decoded.
template <typename T>
ESCAPE_FAST_INLINE void fused_chunks_body(const T* feat, const T* proto, const Decoder<T>& out, int64_t K,
                                          int64_t C, int64_t H, int64_t W, int64_t r, int64_t chunks,
                                          int64_t chunk, int64_t begin, int64_t end) {
  const int64_t HW = H * W;
  std::vector<T> heat(chunk * HW), tmp(HW), smooth(HW), pt(chunk * C);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / chunks;
    const int64_t k0 = (i % chunks) * chunk;
    const int64_t nk = std::min(chunk, K - k0);
    heatmap_cpu::chunk_heatmaps(feat + b * C * HW, proto + (b * K + k0) * C, nk, C, HW, heat.data(), pt.data());
    const auto crop = out.crop(b);
    for (int64_t t = 0; t < nk; ++t) {
      box_filter(heat.data() + t * HW, tmp.data(), smooth.data(), H, W, r);
      out.decode(smooth.data(), crop, b * K + k0 + t);
    }
  }
}

#define ESCAPE_FAST_HEATMAP_VARIANTS(T)                                                                         \
  ESCAPE_FAST_ISA_VARIANTS(decode_maps,                                                                        \
                           (const T* maps, const Decoder<T>& out, int64_t K, int64_t H, int64_t W, int64_t r,   \
                            int64_t begin, int64_t end),                                                        \
                           (maps, out, K, H, W, r, begin, end))                                                 \
  ESCAPE_FAST_ISA_VARIANTS(fused_chunks,                                                                       \
                           (const T* feat, const T* proto, const Decoder<T>& out, int64_t K, int64_t C,         \
                            int64_t H, int64_t W, int64_t r, int64_t chunks, int64_t chunk, int64_t begin,      \
                            int64_t end),                                                                       \
                           (feat, proto, out, K, C, H, W, r, chunks, chunk, begin, end))
ESCAPE_FAST_HEATMAP_VARIANTS(float)
ESCAPE_FAST_HEATMAP_VARIANTS(double)
#undef ESCAPE_FAST_HEATMAP_VARIANTS

// --------------------------------------------------------------------------
// ops
// --------------------------------------------------------------------------
}  // namespace

at::Tensor prototype_heatmaps_cpu(const at::Tensor& features, const at::Tensor& prototypes) {
  checks::features_prototypes("prototype_heatmaps", features, prototypes);
  TORCH_CHECK(features.device().is_cpu(), "prototype_heatmaps: expected CPU tensors");
  return heatmap::prototype_heatmaps_gemm(features, prototypes);
}

std::tuple<at::Tensor, at::Tensor> decode_heatmaps_cpu(const at::Tensor& heatmaps, const at::Tensor& center,
                                                       const at::Tensor& scale, const at::Tensor& rotation,
                                                       int64_t kernel) {
  TORCH_CHECK(heatmaps.device().is_cpu(), "decode_heatmaps: expected CPU tensors");
  const auto dims = checks::decode_inputs(heatmaps, center, scale, rotation, kernel);
  const int64_t B = dims[0], K = dims[1], H = dims[2], W = dims[3];
  auto coords = at::empty({B, K, 2}, heatmaps.options());
  auto values = at::empty({B, K}, heatmaps.options());
  if (B * K == 0) return {coords, values};

  const auto maps = heatmaps.contiguous();
  const auto cen = center.contiguous(), sca = scale.contiguous(), rot = rotation.contiguous();
  const int64_t r = std::min<int64_t>(kernel / 2, std::max(H, W));  // wider changes nothing
  ESCAPE_FAST_DISPATCH_FLOATING(maps.scalar_type(), "decode_heatmaps_cpu", [&] {
    const scalar_t* m = maps.data_ptr<scalar_t>();
    const auto out = make_decoder<scalar_t>(cen, sca, rot, coords, values, H, W);
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) { decode_maps(m, out, K, H, W, r, begin, end); });
  });
  return {coords, values};
}

std::tuple<at::Tensor, at::Tensor> heatmap_decode_cpu(const at::Tensor& features, const at::Tensor& prototypes,
                                                      const at::Tensor& center, const at::Tensor& scale,
                                                      const at::Tensor& rotation, int64_t kernel) {
  TORCH_CHECK(features.device().is_cpu(), "heatmap_decode: expected CPU tensors");
  const auto dims = checks::fused_decode_inputs(features, prototypes, center, scale, rotation, kernel);
  const int64_t B = dims[0], C = dims[1], H = dims[2], W = dims[3], K = dims[4];
  auto coords = at::empty({B, K, 2}, features.options());
  auto values = at::empty({B, K}, features.options());
  if (B * K == 0) return {coords, values};

  const auto feat = features.contiguous(), proto = prototypes.contiguous();
  const auto cen = center.contiguous(), sca = scale.contiguous(), rot = rotation.contiguous();
  const int64_t r = std::min<int64_t>(kernel / 2, std::max(H, W));  // wider changes nothing
  // Work items (b, chunk of prototypes): as few chunks as keep every thread
  // busy, since each chunk streams the features of its b once.
  const int64_t threads = at::get_num_threads();
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(K, (threads + B - 1) / B));
  chunks = std::max(chunks, (K + kChunkMax - 1) / kChunkMax);
  const int64_t chunk = (K + chunks - 1) / chunks;
  chunks = (K + chunk - 1) / chunk;
  ESCAPE_FAST_DISPATCH_FLOATING(feat.scalar_type(), "heatmap_decode_cpu", [&] {
    const scalar_t* f = feat.data_ptr<scalar_t>();
    const scalar_t* p = proto.data_ptr<scalar_t>();
    const auto out = make_decoder<scalar_t>(cen, sca, rot, coords, values, H, W);
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      fused_chunks(f, p, out, K, C, H, W, r, chunks, chunk, begin, end);
    });
  });
  return {coords, values};
}

// This file's ops on the CPU dispatch key (the schema is csrc/ops.cpp's); an op without
// a CPU kernel would simply not be registered here.
TORCH_LIBRARY_IMPL(escape_fast, CPU, m) {
  m.impl("prototype_heatmaps", &prototype_heatmaps_cpu);
  m.impl("decode_heatmaps", &decode_heatmaps_cpu);
  m.impl("heatmap_decode", &heatmap_decode_cpu);
}

}  // namespace escape_fast
