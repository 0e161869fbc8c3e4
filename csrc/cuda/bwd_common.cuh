// Device primitives that only the backward kernels need, on top of tc_common.cuh: a 4-byte cp.async for
// the per-row lse / delta vectors, and the fp32 pair atomic of the dQ accumulator.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tc_common.cuh"

namespace fused_attn {
namespace tc {

// 4-byte global -> shared copy, asynchronous (.ca: the only cache mode that takes sizes below 16).
// When pred is false nothing is read and the destination word is zero-filled (src-size 0).
__device__ __forceinline__ void cp_async4(uint32_t sdst, const void* gsrc, bool pred) {
  const int src_bytes = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(sdst), "l"(gsrc), "r"(src_bytes)
               : "memory");
}

// dst[0] += a, dst[1] += b in global memory, result unused (compiles to RED). dst must be 8-byte
// aligned. sm90 has a vector form that halves the number of atomic instructions; sm80 takes two.
__device__ __forceinline__ void red_add_f32x2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

}  // namespace tc
}  // namespace fused_attn

namespace fused_attn {
namespace tc {

// Per-lane ldmatrix offsets (like tc::LdsmLane) for NB consecutive 16-column blocks starting at a
// run-time chunk cb (even) that is fixed per warp (a warp's share of the head dim, where cb % 8 is not a
// compile-time constant): one register per block, indexed by a compile-time block number.
template <int W, int NB>
struct LdsmCols {
  uint32_t o[NB];
  __device__ __forceinline__ LdsmCols(int r, int cl, int cb) {
#pragma unroll
    for (int j = 0; j < NB; ++j) o[j] = Swz<W>::ldsm_offset(r, cb + 2 * j, cl);
  }
  // row0: multiple of 8.
  __device__ __forceinline__ uint32_t at(int row0, int j) const { return o[j] + row0 * Swz<W>::kRowBytes; }
};

}  // namespace tc
}  // namespace fused_attn
