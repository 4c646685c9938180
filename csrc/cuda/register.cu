// The CUDA entry points of every op (cuda/<op>.cu), bound to the schema of ops.cpp.
#include <torch/library.h>

#include "escape_fast.h"

namespace escape_fast {

TORCH_LIBRARY_IMPL(escape_fast, CUDA, m) { ESCAPE_FAST_REGISTER_OPS(m, cuda) }

}  // namespace escape_fast
