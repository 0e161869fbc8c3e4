// Host stand-in for <cuda_bf16.h> (tests/emu): storage types and conversions (round to nearest even;
// NaN -> the canonical 0x7fff as cvt.rn.bf16.f32 gives).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline uint16_t emu_f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float emu_bf16_bits_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{{emu_f32_to_bf16_bits(lo)}, {emu_f32_to_bf16_bits(hi)}};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return float2{emu_bf16_bits_to_f32(h.x.x), emu_bf16_bits_to_f32(h.y.x)};
}
