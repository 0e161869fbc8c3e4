// How the tensor-core kernels see sequence b of their call (AttnParams::seq), chosen at compile time:
//   SeqView<false>  fixed-length calls: offsets 0, the call's lengths read straight from the params, and
//                   mask.h's policies asked by batch index: the code these kernels had before packed batches.
//   SeqView<true>   packed variable-length batches: sequence b's offsets and lengths read once per block
//                   (cu_seqlens) and handed to the policies as a SeqInfo.
// Why a template and not one run-time path: the dK/dV kernel at head dim 128 uses 248 of its 255 registers
// on sm_80, and holding the four int64 of a SeqInfo across its loop (or only evaluating p.seq(b) ahead of
// mask.h's short-circuit) tipped it into 20-36 bytes of spills (ptxas -v, nvcc 13.0). Fixed-length calls
// keep the old register allocation this way; the packed instantiations are checked for spills on their own.
#pragma once

#include "../mask.h"
#include "../params.h"

namespace fused_attn {

template <bool kVar>
struct SeqView;

template <>
struct SeqView<false> {
  const AttnParams& p;
  int64_t b;
  __device__ __forceinline__ SeqView(const AttnParams& p_, int64_t b_) : p(p_), b(b_) {}
  __device__ __forceinline__ int64_t sq() const { return p.sq; }
  __device__ __forceinline__ int64_t sk() const { return p.sk; }
  __device__ __forceinline__ int64_t q_off() const { return 0; }
  __device__ __forceinline__ int64_t k_off() const { return 0; }
  __device__ __forceinline__ SeqInfo info() const { return SeqInfo{0, 0, p.sq, p.sk}; }
  __device__ __forceinline__ KeyTiles key_tiles(int64_t h, int64_t qt, int64_t tq, int64_t tk) const {
    return KeyTiles(p, b, h, qt, tq, tk);
  }
  __device__ __forceinline__ QueryTiles query_tiles(int64_t h, int64_t kt, int64_t tq, int64_t tk) const {
    return QueryTiles(p, b, h, kt, tq, tk);
  }
  __device__ __forceinline__ bool needs_mask(const TileVisit& v, int64_t q0, int64_t q1, int64_t k0,
                                             int64_t k1) const {
    return tile_needs_mask(p, v, b, q0, q1, k0, k1);
  }
  __device__ __forceinline__ bool visible(const TileVisit& v, int64_t h, int64_t i, int64_t j) const {
    return element_visible(p, v, b, h, i, j);
  }
};

// Nothing is held: every use reads sequence b again (p.seq(b): two or four L1-resident cu_seqlens loads and
// the clamps). The asm volatile of cp.async / ldmatrix keeps the compiler from hoisting those loads out of
// the loops, so no SeqInfo stays live across them; holding one (as int64 or int32) cost the packed dK/dV
// kernel 12-28 bytes of spills at head dim 128.
template <>
struct SeqView<true> {
  const AttnParams& p;
  int64_t b;
  __device__ __forceinline__ SeqView(const AttnParams& p_, int64_t b_) : p(p_), b(b_) {}
  __device__ __forceinline__ int64_t sq() const { return p.seq(b).sq; }
  __device__ __forceinline__ int64_t sk() const { return p.seq(b).sk; }
  __device__ __forceinline__ int64_t q_off() const { return p.seq(b).q_off; }
  __device__ __forceinline__ int64_t k_off() const { return p.seq(b).k_off; }
  __device__ __forceinline__ SeqInfo info() const { return p.seq(b); }
  __device__ __forceinline__ KeyTiles key_tiles(int64_t h, int64_t qt, int64_t tq, int64_t tk) const {
    return KeyTiles(p, b, h, qt, tq, tk);
  }
  __device__ __forceinline__ QueryTiles query_tiles(int64_t h, int64_t kt, int64_t tq, int64_t tk) const {
    return QueryTiles(p, b, h, kt, tq, tk);
  }
  __device__ __forceinline__ bool needs_mask(const TileVisit& v, int64_t q0, int64_t q1, int64_t k0,
                                             int64_t k1) const {
    return tile_needs_mask(p, v, b, q0, q1, k0, k1);
  }
  __device__ __forceinline__ bool visible(const TileVisit& v, int64_t h, int64_t i, int64_t j) const {
    return element_visible(p, v, b, h, i, j);
  }
};

}  // namespace fused_attn
