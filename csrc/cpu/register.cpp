// The CPU entry points of every op (cpu/<op>.cpp), bound to the schema of ops.cpp.
#include <torch/library.h>

#include "escape_fast.h"

namespace escape_fast {

TORCH_LIBRARY_IMPL(escape_fast, CPU, m) { ESCAPE_FAST_REGISTER_OPS(m, cpu) }

}  // namespace escape_fast
