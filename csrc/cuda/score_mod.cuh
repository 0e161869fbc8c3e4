// Score modifiers (mask.h's ScoreMod: softcap and ALiBi) on the fp32 score accumulators of the tensor-core
// kernels, which work in base 2. A raw accumulator a = q.k of query i and key j becomes
//   without a cap:  x = log2(e) * scale * a
//   with cap c:     x = log2(e) * c * tanh(scale * a / c),   g = 1 - tanh^2   (d(capped) / d(scale * a))
// and ALiBi subtracts log2(e) * slope * |i + (Sk - Sq) - j|. The backward multiplies dS by g.
// Only the kernels' kMod instantiations contain this code: a call without modifiers runs the plain ones.
#pragma once

#include <cuda_runtime.h>

#include "../mask.h"
#include "tc_common.cuh"

namespace fused_attn {
namespace tc {

// tanh(y) = 1 - 2 / (1 + 2^(2 log2(e) y)) on ex2.approx and rcp.approx (both emulated by tests/emu).
// What the softmax needs is a small absolute error in c * tanh, and here it stays below 2.4e-7 over the
// whole range (swept on the host with the emulator's models, rcp pushed to its 1-ulp bound; 3.1e-7 with
// ex2 also pushed to a 2^-22 relative error): rcp adds 1 ulp of a value <= 1, and ex2's relative error
// enters scaled by 2e / (1 + e)^2 <= 1/2. tanh.approx.f32 (sm75+, one MUFU op instead of two) has a
// relative error of about 2^-11 per the PTX ISA, some 1000x more: the size of fp16's own rounding of P.
// Saturates to +-1 for large |y| (2^big = inf, 1 / inf = 0); never NaN for finite y.
__device__ __forceinline__ float tanh_fast(float y) {
  return 1.f - 2.f * fast_rcp(1.f + fast_exp2(2.8853900817779268f * y));
}

// The modifiers of one (sequence, query head) in the form the fragment loops use.
struct ModFrag {
  float pre;       // a -> argument: scale / c with a cap, log2(e) * scale without
  float post;      // log2(e) * c (cap only)
  float slope;     // log2(e) * ALiBi slope; 0 without ALiBi
  bool cap;
  int64_t offset;  // Sk - Sq of the sequence

  __device__ __forceinline__ ModFrag(const AttnParams& p, int64_t b, int64_t h, const SeqInfo& s) {
    const ScoreMod m(p, b, h, s);
    constexpr double kL2e = 1.4426950408889634;
    cap = m.cap > 0;
    pre = static_cast<float>(cap ? p.scale * m.inv_cap : p.scale * kL2e);
    post = static_cast<float>(kL2e * m.cap);
    slope = static_cast<float>(kL2e * m.slope);
    offset = m.offset;
  }

  // ALiBi distance i + (Sk - Sq) - j of (row i, column j) as a float (exact below 2^24); the fragment
  // loops add compile-time steps to the distance of their first element.
  __device__ __forceinline__ float dist(int64_t i, int64_t j) const { return static_cast<float>(i + offset - j); }

  // x (base 2) of the raw accumulator a at ALiBi distance d.
  __device__ __forceinline__ float score(float a, float d) const {
    const float x = cap ? post * tanh_fast(a * pre) : a * pre;
    return x - slope * fabsf(d);
  }
  // The same, with g = d(capped) / d(scale * a) for the backward (1 without a cap).
  __device__ __forceinline__ float score(float a, float d, float& g) const {
    float x;
    if (cap) {
      const float t = tanh_fast(a * pre);
      x = post * t;
      g = 1.f - t * t;
    } else {
      x = a * pre;
      g = 1.f;
    }
    return x - slope * fabsf(d);
  }
};

}  // namespace tc
}  // namespace fused_attn
