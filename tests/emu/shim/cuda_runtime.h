// Host stand-in for <cuda_runtime.h>, used only by the emulator (tests/emu). The CUDA keywords become
// plain C++, and the device built-ins (threadIdx, __syncthreads, shuffles, atomics, ...) are declared by
// emu_runtime.h, which implements them on host threads.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __grid_constant__
// __shared__ is rewritten by gen_kernels.py: one left behind would make a per-thread array, silently.
#define __shared__ static_assert(false, "__shared__ must be rewritten by gen_kernels.py");

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}

typedef struct CUstream_st* cudaStream_t;

#include "../emu_runtime.h"
