// The inner products of the fused heatmap_decode on the CPU: the heatmaps of
// a chunk of prototypes on one feature map, by a register-blocked
// micro-kernel written as plain loops, compiled per instruction set (isa.h).
// Its multiply-adds are fused (FMA) where the ISA has them: the AVX2 and
// AVX-512 variants agree to the bit, the baseline one to float rounding.
#include "heatmap_gemm.h"

#include <cstdint>

#include "isa.h"

namespace escape_fast::heatmap_cpu {
namespace {

// heat[t, p] = sum_c pt[c, t] * feat[c, p] for NK prototypes (pt: the
// prototypes transposed to [C, NK]) on the pixels [p0, p0 + PJ). The NK x PJ
// accumulators live in registers across the whole loop over channels (16
// AVX-512 registers for NK = 8), so each feature vector loaded is used NK
// times: a small GEMM micro-kernel written as plain loops.
template <typename T, int NK, int PJ>
ESCAPE_FAST_INLINE void micro_tile(const T* feat, const T* pt, int64_t C, int64_t HW, int64_t p0, T* heat) {
  T acc[NK][PJ] = {};
  for (int64_t c = 0; c < C; ++c) {
    const T* f = feat + c * HW + p0;
    const T* w = pt + c * NK;
#pragma GCC unroll 16
    for (int t = 0; t < NK; ++t) {
#pragma GCC unroll 32
      for (int j = 0; j < PJ; ++j) acc[t][j] += w[t] * f[j];
    }
  }
  for (int t = 0; t < NK; ++t) {
    for (int j = 0; j < PJ; ++j) heat[t * HW + p0 + j] = acc[t][j];
  }
}

// The same for nk <= NK prototypes and the last np < PJ pixels.
template <typename T, int NK, int PJ>
ESCAPE_FAST_INLINE void tail_tile(const T* feat, const T* pt, int64_t C, int64_t HW, int64_t p0, int64_t np,
                                  T* heat) {
  T acc[NK][PJ] = {};
  for (int64_t c = 0; c < C; ++c) {
    const T* f = feat + c * HW + p0;
    for (int t = 0; t < NK; ++t) {
      for (int64_t j = 0; j < np; ++j) acc[t][j] += pt[c * NK + t] * f[j];
    }
  }
  for (int t = 0; t < NK; ++t) {
    for (int64_t j = 0; j < np; ++j) heat[t * HW + p0 + j] = acc[t][j];
  }
}

// heat[k] = sum_c proto[k, c] * feat[c] for the nk prototypes of a chunk
// (pt: C * nk scratch). The chunk is cut into register tiles of 8 prototypes
// (then 4, 2, 1 for the rest); the pixel panel is the outer loop, so one
// panel of features (C x PJ values, 32 KiB for C = 256 in float32) stays in
// L1/L2 while every tile of the chunk consumes it: the features stream from
// memory once per chunk instead of once per tile.
template <typename T>
ESCAPE_FAST_INLINE void chunk_heatmaps_body(const T* feat, const T* proto, int64_t nk, int64_t C, int64_t HW,
                                            T* heat, T* pt) {
  constexpr int PJ = 128 / sizeof(T);  // two 64-byte vectors of pixels
  int64_t starts[64], sizes[64];       // register tiles; nk <= 128 (the caller's chunks)
  int n_tiles = 0;
  for (int64_t k = 0; k < nk; ++n_tiles) {
    const int64_t rest = nk - k;
    const int64_t nt = rest >= 8 ? 8 : rest >= 4 ? 4 : rest >= 2 ? 2 : 1;
    starts[n_tiles] = k;
    sizes[n_tiles] = nt;
    for (int64_t c = 0; c < C; ++c) {  // transpose the tile's prototypes to [C, nt]
      for (int64_t t = 0; t < nt; ++t) pt[k * C + c * nt + t] = proto[(k + t) * C + c];
    }
    k += nt;
  }
  int64_t p0 = 0;
  for (; p0 + PJ <= HW; p0 += PJ) {
    for (int i = 0; i < n_tiles; ++i) {
      const int64_t k = starts[i];
      const T* w = pt + k * C;
      T* h = heat + k * HW;
      switch (sizes[i]) {
        case 8: micro_tile<T, 8, PJ>(feat, w, C, HW, p0, h); break;
        case 4: micro_tile<T, 4, PJ>(feat, w, C, HW, p0, h); break;
        case 2: micro_tile<T, 2, PJ>(feat, w, C, HW, p0, h); break;
        default: micro_tile<T, 1, PJ>(feat, w, C, HW, p0, h); break;
      }
    }
  }
  if (p0 < HW) {
    for (int i = 0; i < n_tiles; ++i) {
      const int64_t k = starts[i];
      const T* w = pt + k * C;
      T* h = heat + k * HW;
      switch (sizes[i]) {
        case 8: tail_tile<T, 8, PJ>(feat, w, C, HW, p0, HW - p0, h); break;
        case 4: tail_tile<T, 4, PJ>(feat, w, C, HW, p0, HW - p0, h); break;
        case 2: tail_tile<T, 2, PJ>(feat, w, C, HW, p0, HW - p0, h); break;
        default: tail_tile<T, 1, PJ>(feat, w, C, HW, p0, HW - p0, h); break;
      }
    }
  }
}

}  // namespace

ESCAPE_FAST_ISA_VARIANTS(chunk_heatmaps,
                         (const float* feat, const float* proto, int64_t nk, int64_t C, int64_t HW, float* heat,
                          float* pt),
                         (feat, proto, nk, C, HW, heat, pt))
ESCAPE_FAST_ISA_VARIANTS(chunk_heatmaps,
                         (const double* feat, const double* proto, int64_t nk, int64_t C, int64_t HW, double* heat,
                          double* pt),
                         (feat, proto, nk, C, HW, heat, pt))

}  // namespace escape_fast::heatmap_cpu
