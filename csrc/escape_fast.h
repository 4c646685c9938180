// What the C++ and CUDA implementations of the escape_fast ops share: the
// dtype dispatch. Each op file (cpu/<op>.cpp,
// cuda/<op>.cu) defines its entry points and registers them on its backend's
// dispatch key (TORCH_LIBRARY_IMPL) against the one schema of ops.cpp, as
// torchvision's csrc/ops do: an op may have kernels on one backend only.
#pragma once

#include <ATen/ATen.h>

namespace escape_fast {

// Dispatch float32 and float64 (the dtypes every op supports).
#define ESCAPE_FAST_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

}  // namespace escape_fast
