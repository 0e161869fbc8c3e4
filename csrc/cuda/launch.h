// Host-side launchers of the CUDA kernels. Each checks its launches and throws std::runtime_error with
// the CUDA error string on failure; none synchronises the device.
#pragma once
#include <cuda_runtime_api.h>

#include "../kernels.h"
#include "tiles.h"

namespace fused_attn {

// fp16 / bf16 on tensor cores. hd is the compiled head dim to run (>= p.d); tiles are tc_tiles(hd).
void tc_fwd(const AttnParams& p, DType dt, int hd, cudaStream_t stream);
// Needs p.delta (fp32 scratch, lse's shape) and, unless p.deterministic, p.dq_accum: fp32, zero-filled,
// rows padded to a multiple of the backward query tile, hd columns, strides dqa_*.
void tc_bwd(const AttnParams& p, DType dt, int hd, cudaStream_t stream);

// fp32 / fp64 without tensor cores; tiles are kGenericTiles.
void generic_fwd(const AttnParams& p, DType dt, cudaStream_t stream);
void generic_bwd(const AttnParams& p, DType dt, cudaStream_t stream);

// KV-cache decoding (flash_kvcache): p.num_splits >= 1 parts of each key range and, above 1, the workspace
// p.o_part / p.lse_part (decode.h); the split kernel, then a combine kernel. tc_decode: fp16 / bf16 at the
// compiled head dim hd; generic_decode: fp32 / fp64.
void tc_decode(const AttnParams& p, DType dt, int hd, cudaStream_t stream);
void generic_decode(const AttnParams& p, DType dt, cudaStream_t stream);
// The split count for num_splits = 0, from the SM count and the shapes (no value is read from the GPU).
int64_t decode_splits(const AttnParams& p, bool tensor_cores, int sm_count);

// Which instantiations this build holds (the build can be narrowed by environment variables).
bool tc_has(DType dt, int hd);

}  // namespace fused_attn
