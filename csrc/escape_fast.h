// Shared helpers for the C++ and CUDA implementations of escape_fast ops.
#pragma once

#include <ATen/ATen.h>

namespace escape_fast {

// Dispatch float32 and float64 (the dtypes every op supports).
#define ESCAPE_FAST_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

}  // namespace escape_fast
