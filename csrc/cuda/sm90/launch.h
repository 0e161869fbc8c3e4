// Host-side entry points of the Hopper (sm_90a) kernels, and the choice between them and the mma.sync
// kernels. No device code: ops.cpp and bindings.cpp include this.
#pragma once
#include <cuda_runtime_api.h>

#include <string>

#include "../registry.h"
#include "tiles.h"

namespace fused_attn {

// Registration by the generated files (csrc/cuda/generated/sm90_*.cu), as for the mma.sync family.
bool register_sm90_kernel(TcPass pass, DType dt, int hd, TcLauncher fn);
bool sm90_has(DType dt, int hd);
// The compiled Hopper head dim that runs head dim d (the smallest one >= d), or 0.
int sm90_head_dim(DType dt, int64_t d);

// Why the Hopper kernels do not run on `device`, or "" when they do (for fp16/bf16 head dims they hold):
// FUSED_ATTN_FORCE_SM80 set, no sm_90a kernels in this build, a device that is not compute capability 9.0
// (the sm_90a code runs there only), or a driver without cuTensorMapEncodeTiled.
std::string sm90_unavailable(int device);
// The Hopper head dim to run fp16/bf16 head dim d on `device` with, or 0 for the mma.sync kernels.
int sm90_choose(int device, DType dt, int64_t d);

// Launchers. Needs p.delta (fp32 scratch, lse's shape) and, unless p.deterministic, p.dq_accum: fp32,
// zero-filled, rows padded to a multiple of sm90_tiles(hd).bwd_tq, hd columns.
void sm90_fwd(const AttnParams& p, DType dt, int hd, cudaStream_t stream);
void sm90_bwd(const AttnParams& p, DType dt, int hd, cudaStream_t stream);

}  // namespace fused_attn
