// Host stand-in for <cuda_fp16.h> (tests/emu): the storage types and the few conversions the kernels use.
// fp16 conversion goes through the compiler's _Float16 (IEEE binary16, round to nearest even).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __half {
  uint16_t x;
};
struct alignas(4) __half2 {
  __half x, y;  // x is the low 16 bits of the 32-bit register
};

inline uint16_t emu_f32_to_f16_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float emu_f16_bits_to_f32(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{{emu_f32_to_f16_bits(lo)}, {emu_f32_to_f16_bits(hi)}};
}
inline float2 __half22float2(__half2 h) { return float2{emu_f16_bits_to_f32(h.x.x), emu_f16_bits_to_f32(h.y.x)}; }
