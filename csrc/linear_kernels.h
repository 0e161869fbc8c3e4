// Entry points of the linear-attention kernels, called by linear_ops.cpp after every argument check has
// passed. No torch types cross this line.
#pragma once
#include "kernels.h"
#include "linear_params.h"

namespace fused_attn {

// CPU (csrc/cpu/linear.cpp), fp32 and fp64 (linear_ops.cpp upcasts fp16/bf16 to fp32 around them).
// Forward writes o, den, s_out, z_out; backward writes dq, dk, dv, ds0, dz0.
void cpu_linear_fwd(const LinearParams& p, DType dt);
void cpu_linear_bwd(const LinearParams& p, DType dt);

}  // namespace fused_attn
