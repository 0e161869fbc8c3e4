// Entry points of the kernels, called by ops.cpp after every argument check has passed.
// No torch types cross this line: kernels see an AttnParams and, on the GPU, a stream.
#pragma once
#include "params.h"

namespace fused_attn {

enum class DType : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3 };

// CPU kernels (csrc/cpu/), fp32 and fp64 (ops.cpp upcasts fp16/bf16 to fp32 around them).
// Tiles: with a block layout, exactly (p.list_tq, p.list_tk), the granularity of the lists;
// otherwise the kernel's own choice.
void cpu_fwd(const AttnParams& p, DType dt);
// Writes dq, dk, dv; p.delta is caller-allocated scratch of lse's shape and type.
void cpu_bwd(const AttnParams& p, DType dt);

}  // namespace fused_attn
