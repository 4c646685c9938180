// The heatmaps of nk <= 128 prototypes [nk, C] on one feature map [C, HW]
// into heat [nk, HW] (pt: C * nk scratch), for the CPU's instruction set (isa.h).
#pragma once

#include <cstdint>

namespace escape_fast::heatmap_cpu {

void chunk_heatmaps(const float* feat, const float* proto, int64_t nk, int64_t C, int64_t HW, float* heat,
                    float* pt);
void chunk_heatmaps(const double* feat, const double* proto, int64_t nk, int64_t C, int64_t HW, double* heat,
                    double* pt);

}  // namespace escape_fast::heatmap_cpu
