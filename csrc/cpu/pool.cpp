// Gaussian-weighted keypoint pooling (docs/method.md, "Keypoint features") on the CPU.
//
// The Gaussian of a keypoint at (x, y) lives on the cells with
// |px - x| <= 3 sigma and |py - y| <= 3 sigma (escape_fast.reference). That
// window is a rectangle, and exp(-(dx^2 + dy^2) / (2 sigma^2)) factors into
// gx(px) * gy(py), so a keypoint is described by two short 1-D weight arrays
// and its normalizer (sum gx) * (sum gy) over the in-image cells. Only the
// window is read (forward) or written (backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

// No fused multiply-add contraction: pooled features are the same bits on
// every ISA variant (isa.h), so a model's features do not depend on the CPU.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "checks.h"
#include "escape_fast.h"
#include "isa.h"

namespace escape_fast {
namespace {

// In-image window [lo, hi] along one axis: the cells p in [0, size) with
// |p - center| <= radius, tested in scalar_t exactly as the reference does.
// Returns false when the window has no in-image cell (or center is not finite).
template <typename scalar_t>
bool axis_window(scalar_t center, scalar_t radius, int64_t size, int64_t& lo, int64_t& hi) {
  if (!std::isfinite(static_cast<double>(center))) return false;
  const double c = static_cast<double>(center), r = static_cast<double>(radius);
  // Candidate range in double (clamped before the int conversion so far-away
  // keypoints cannot overflow), widened by one cell; the exact test decides.
  const double first = std::max(std::ceil(c - r) - 1.0, 0.0);
  const double last = std::min(std::floor(c + r) + 1.0, static_cast<double>(size - 1));
  if (first > last) return false;
  lo = static_cast<int64_t>(first);
  hi = static_cast<int64_t>(last);
  auto inside = [&](int64_t p) { return std::abs(static_cast<scalar_t>(p) - center) <= radius; };
  while (lo <= hi && !inside(lo)) ++lo;
  while (hi >= lo && !inside(hi)) --hi;
  return lo <= hi;
}

// One keypoint's separable window: rows [y0, y0 + gy.size()), columns
// [x0, x0 + gx.size()), weight gx[i] * gy[j] * inv_norm; empty when invalid.
template <typename scalar_t>
struct Window {
  int64_t x0 = 0, y0 = 0;
  std::vector<scalar_t> gx, gy;
  scalar_t inv_norm = 0;
  bool valid() const { return !gx.empty(); }
};

template <typename scalar_t>
Window<scalar_t> make_window(scalar_t x, scalar_t y, bool visible, double sigma, int64_t height,
                             int64_t width) {
  Window<scalar_t> win;
  const scalar_t radius = static_cast<scalar_t>(3.0 * sigma);
  const scalar_t two_s2 = static_cast<scalar_t>(2.0 * sigma * sigma);
  int64_t x0, x1, y0, y1;
  if (!visible || !axis_window(x, radius, width, x0, x1) || !axis_window(y, radius, height, y0, y1)) {
    return win;
  }
  win.x0 = x0;
  win.y0 = y0;
  scalar_t sx = 0, sy = 0;
  for (int64_t p = x0; p <= x1; ++p) {
    const scalar_t d = static_cast<scalar_t>(p) - x;
    win.gx.push_back(std::exp(-(d * d) / two_s2));
    sx += win.gx.back();
  }
  for (int64_t p = y0; p <= y1; ++p) {
    const scalar_t d = static_cast<scalar_t>(p) - y;
    win.gy.push_back(std::exp(-(d * d) / two_s2));
    sy += win.gy.back();
  }
  // The window always holds its nearest cell, whose weight is >= exp(-9):
  // the normalizer cannot underflow.
  win.inv_norm = scalar_t(1) / (sx * sy);
  return win;
}

// The windows of every keypoint of keypoints [B, K, 2] / visible [B, K], in parallel.
template <typename scalar_t>
std::vector<Window<scalar_t>> make_windows(const at::Tensor& keypoints, const at::Tensor& visible, double sigma,
                                           int64_t height, int64_t width) {
  const auto kp = keypoints.contiguous();
  const auto vis = visible.contiguous();
  const scalar_t* p = kp.data_ptr<scalar_t>();
  const bool* v = vis.data_ptr<bool>();
  std::vector<Window<scalar_t>> wins(vis.numel());
  at::parallel_for(0, vis.numel(), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      wins[i] = make_window<scalar_t>(p[i * 2], p[i * 2 + 1], v[i], sigma, height, width);
    }
  });
  return wins;
}

// The planes [begin, end) of the forward (pool_planes) and of the backward
// (unpool_planes), one variant per instruction set (isa.h).
template <typename scalar_t>
ESCAPE_FAST_INLINE void pool_planes_body(const scalar_t* f, const std::vector<Window<scalar_t>>& wins, int64_t K,
                                         int64_t C, int64_t H, int64_t W, scalar_t* o, int64_t begin, int64_t end) {
  for (int64_t bc = begin; bc < end; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    const scalar_t* plane = f + bc * H * W;
    for (int64_t k = 0; k < K; ++k) {
      const auto& win = wins[b * K + k];
      if (!win.valid()) continue;
      const int64_t ww = win.gx.size(), hh = win.gy.size();
      const scalar_t* gx = win.gx.data();
      scalar_t acc = 0;
      for (int64_t j = 0; j < hh; ++j) {
        const scalar_t* row = plane + (win.y0 + j) * W + win.x0;
        scalar_t racc = 0;
        for (int64_t i = 0; i < ww; ++i) racc += row[i] * gx[i];  // contiguous: vectorizes
        acc += racc * win.gy[j];
      }
      o[(b * K + k) * C + c] = acc * win.inv_norm;
    }
  }
}

template <typename scalar_t>
ESCAPE_FAST_INLINE void unpool_planes_body(const scalar_t* gr, const std::vector<Window<scalar_t>>& wins,
                                           int64_t K, int64_t C, int64_t H, int64_t W, scalar_t* o, int64_t begin,
                                           int64_t end) {
  for (int64_t bc = begin; bc < end; ++bc) {
    const int64_t b = bc / C, c = bc % C;
    scalar_t* plane = o + bc * H * W;
    std::fill(plane, plane + H * W, scalar_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const auto& win = wins[b * K + k];
      if (!win.valid()) continue;
      const scalar_t scale = gr[(b * K + k) * C + c] * win.inv_norm;
      const int64_t ww = win.gx.size(), hh = win.gy.size();
      const scalar_t* gx = win.gx.data();
      for (int64_t j = 0; j < hh; ++j) {
        scalar_t* row = plane + (win.y0 + j) * W + win.x0;
        const scalar_t s = scale * win.gy[j];
        for (int64_t i = 0; i < ww; ++i) row[i] += s * gx[i];  // contiguous: vectorizes
      }
    }
  }
}

#define ESCAPE_FAST_POOL_VARIANTS(T)                                                                           \
  ESCAPE_FAST_ISA_VARIANTS(pool_planes,                                                                       \
                           (const T* f, const std::vector<Window<T>>& wins, int64_t K, int64_t C, int64_t H,   \
                            int64_t W, T* o, int64_t begin, int64_t end),                                      \
                           (f, wins, K, C, H, W, o, begin, end))                                               \
  ESCAPE_FAST_ISA_VARIANTS(unpool_planes,                                                                     \
                           (const T* gr, const std::vector<Window<T>>& wins, int64_t K, int64_t C, int64_t H,  \
                            int64_t W, T* o, int64_t begin, int64_t end),                                      \
                           (gr, wins, K, C, H, W, o, begin, end))
ESCAPE_FAST_POOL_VARIANTS(float)
ESCAPE_FAST_POOL_VARIANTS(double)
#undef ESCAPE_FAST_POOL_VARIANTS

}  // namespace

at::Tensor keypoint_pool_cpu(const at::Tensor& features, const at::Tensor& keypoints, const at::Tensor& visible,
                             double sigma) {
  TORCH_CHECK(features.device().is_cpu(), "keypoint_pool: features must be a CPU tensor");
  const int64_t B = checks::pool_features(features, keypoints, visible, sigma);
  const int64_t C = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t K = keypoints.size(1);
  auto out = at::zeros({B, K, C}, features.options());
  if (out.numel() == 0 || H == 0 || W == 0) return out;

  const auto feat = features.contiguous();
  ESCAPE_FAST_DISPATCH_FLOATING(features.scalar_type(), "keypoint_pool_cpu", [&] {
    const scalar_t* f = feat.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Windows first, then one task per (b, c) plane: the plane (H * W
    // values, 16 KiB at 64 x 64) stays in L1 while all K windows read it, so
    // the features stream through memory once.
    const auto wins = make_windows<scalar_t>(keypoints, visible, sigma, H, W);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) { pool_planes(f, wins, K, C, H, W, o, begin, end); });
  });
  return out;
}

at::Tensor keypoint_pool_backward_cpu(const at::Tensor& grad, const at::Tensor& keypoints,
                                      const at::Tensor& visible, double sigma, int64_t height, int64_t width) {
  TORCH_CHECK(grad.device().is_cpu(), "keypoint_pool_backward: grad must be a CPU tensor");
  checks::pool_backward(grad, keypoints, visible, sigma, height, width);
  const int64_t B = grad.size(0), K = grad.size(1), C = grad.size(2), H = height, W = width;
  if (B * C * H * W == 0 || K == 0) return at::zeros({B, C, H, W}, grad.options());
  // Each task zeroes its own plane just before adding to it (while it is in
  // cache) instead of a separate zero-fill pass over the whole output.
  auto out = at::empty({B, C, H, W}, grad.options());

  const auto g = grad.contiguous();
  ESCAPE_FAST_DISPATCH_FLOATING(grad.scalar_type(), "keypoint_pool_backward_cpu", [&] {
    const scalar_t* gr = g.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Windows first (B * K small objects), then one task per (b, c) plane
    // that adds its keypoints' windows in order k = 0..K-1: each output
    // cell is written by one thread in a fixed order, so the result is
    // deterministic without atomics.
    const auto wins = make_windows<scalar_t>(keypoints, visible, sigma, H, W);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      unpool_planes(gr, wins, K, C, H, W, o, begin, end);
    });
  });
  return out;
}

// This file's ops on the CPU dispatch key (the schema is csrc/ops.cpp's); an op without
// a CPU kernel would simply not be registered here.
TORCH_LIBRARY_IMPL(escape_fast, CPU, m) {
  m.impl("keypoint_pool", &keypoint_pool_cpu);
  m.impl("keypoint_pool_backward", &keypoint_pool_backward_cpu);
}

}  // namespace escape_fast
