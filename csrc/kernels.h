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
// bf16 forward through oneDNN's bf16 brgemm (AMX / AVX512-BF16), fp32 out and lse; where cpu_fwd_bf16_ok(p).
// cpu_bf16_gemm(): whether this CPU has those GEMMs (and FUSED_ATTN_CPU_BF16_GEMM=0 is not set; read once).
bool cpu_bf16_gemm();
bool cpu_fwd_bf16_ok(const AttnParams& p);
void cpu_fwd_bf16(const AttnParams& p);
// The vector width the CPU kernels run at on this machine (tile_math.h): "x86-64-v4" (16 lanes), "x86-64-v3"
// (8 lanes) or "baseline" (4 lanes); FUSED_ATTN_CPU_ISA=v1 / v3 lowers it.
const char* cpu_isa();
// Writes dq, dk, dv; p.delta is caller-allocated scratch of lse's shape and type.
void cpu_bwd(const AttnParams& p, DType dt);
// KV-cache attention (forward only): q (B, Hq, Sq, D) against the cache through p.seqlens_k (+
// p.seqlens_k_add), contiguous or paged (p.block_table). Reads q and the cache in their own dtype dt (every
// float dtype), computes in fp32 (fp64 for fp64), writes out in dt and lse in fp32 (fp64). p.num_splits:
// 0 picks the split of each key range over threads, n >= 1 forces n.
void cpu_kvcache_fwd(const AttnParams& p, DType dt);

}  // namespace fused_attn
