// The tensor-core kernels present in this build. Each generated .cu file (one per pass, dtype and head
// dim) registers its launcher here when the library loads, so a build narrowed to a few instantiations
// (FUSED_ATTN_HEAD_DIMS, FUSED_ATTN_DTYPES) links and reports exactly what it holds.
#pragma once
#include <cuda_runtime_api.h>

#include "../kernels.h"

namespace fused_attn {

enum class TcPass : int { fwd = 0, bwd = 1, decode = 2 };
using TcLauncher = void (*)(const AttnParams&, cudaStream_t);

bool register_tc_kernel(TcPass pass, DType dt, int hd, TcLauncher fn);
TcLauncher find_tc_kernel(TcPass pass, DType dt, int hd);

}  // namespace fused_attn
