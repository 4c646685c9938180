// CPU kernel of escape_fast::smooth_features: the decoder's in-image mean
// filter on every channel of [B, C, H, W] features, one plane at a time.
//
// It computes what escape_fast.ops.smooth_features' torch path computes, to
// the bit: a row pass (each cell the sum of its in-image window along x, in
// ascending order, divided by the window's cell count), then the same along
// y on the row means, all in the features' dtype. The torch path runs two
// avg_pool2d on channels-last copies; here the planes are filtered where
// they lie, with no layout conversion (which cost the Predictor 70% of the
// filter's time). No FMA is involved (sums and one division).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "escape_fast.h"
#include "isa.h"

namespace escape_fast {
namespace {

// Planes [begin, end) of in -> out (H x W each); tmp: H * W scratch.
template <typename T>
ESCAPE_FAST_INLINE void smooth_planes_body(const T* in, T* out, int64_t H, int64_t W, int64_t r, int64_t begin,
                                           int64_t end) {
  std::vector<T> tmp(H * W);
  const int64_t rx = std::min(r, W - 1), ry = std::min(r, H - 1);
  for (int64_t p = begin; p < end; ++p) {
    const T* plane = in + p * H * W;
    T* o = out + p * H * W;
    // rows: t[x] = sum over dx ascending of row[x + dx] (in-image), then / count
    for (int64_t y = 0; y < H; ++y) {
      const T* row = plane + y * W;
      T* t = tmp.data() + y * W;
      std::fill(t, t + W, T(0));
      for (int64_t dx = -rx; dx <= rx; ++dx) {
        const int64_t x0 = std::max<int64_t>(0, -dx), x1 = std::min<int64_t>(W, W - dx);
        for (int64_t x = x0; x < x1; ++x) t[x] += row[x + dx];
      }
      for (int64_t x = 0; x < W; ++x) {
        t[x] /= static_cast<T>(std::min<int64_t>(W - 1, x + r) - std::max<int64_t>(0, x - r) + 1);
      }
    }
    // columns: the same over y on the row means
    for (int64_t y = 0; y < H; ++y) {
      const int64_t y0 = std::max<int64_t>(0, y - ry), y1 = std::min<int64_t>(H - 1, y + ry);
      T* oy = o + y * W;
      std::fill(oy, oy + W, T(0));
      for (int64_t yy = y0; yy <= y1; ++yy) {
        const T* t = tmp.data() + yy * W;
        for (int64_t x = 0; x < W; ++x) oy[x] += t[x];
      }
      const T count = static_cast<T>(y1 - y0 + 1);
      for (int64_t x = 0; x < W; ++x) oy[x] /= count;
    }
  }
}

#define ESCAPE_FAST_SMOOTH_VARIANTS(T)                                                                  \
  ESCAPE_FAST_ISA_VARIANTS(smooth_planes,                                                              \
                           (const T* in, T* out, int64_t H, int64_t W, int64_t r, int64_t begin,        \
                            int64_t end),                                                               \
                           (in, out, H, W, r, begin, end))
ESCAPE_FAST_SMOOTH_VARIANTS(float)
ESCAPE_FAST_SMOOTH_VARIANTS(double)
#undef ESCAPE_FAST_SMOOTH_VARIANTS

}  // namespace

at::Tensor smooth_features_cpu(const at::Tensor& features, int64_t kernel) {
  TORCH_CHECK(features.device().is_cpu(), "smooth_features: expected a CPU tensor");
  TORCH_CHECK(features.dim() == 4, "smooth_features: features must be [B, C, H, W], got ", features.dim(), "-d");
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, "smooth_features: kernel must be odd and positive, got ", kernel);
  const auto in = features.contiguous();
  auto out = at::empty_like(in);
  const int64_t planes = in.size(0) * in.size(1), H = in.size(2), W = in.size(3);
  if (planes == 0 || H == 0 || W == 0) return out;
  const int64_t r = kernel / 2;
  ESCAPE_FAST_DISPATCH_FLOATING(in.scalar_type(), "smooth_features_cpu", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) { smooth_planes(src, dst, H, W, r, begin, end); });
  });
  return out;
}

// This file's op on the CPU dispatch key (the schema is csrc/ops.cpp's); it has no CUDA kernel.
TORCH_LIBRARY_IMPL(escape_fast, CPU, m) { m.impl("smooth_features", &smooth_features_cpu); }

}  // namespace escape_fast
