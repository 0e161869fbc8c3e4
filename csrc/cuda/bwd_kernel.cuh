// Backward pass of the fp16/bf16 tensor-core attention (FlashAttention-2 algorithm), sm80 and newer,
// mma.sync m16n8k16 with fp32 accumulation, raw PTX through tc_common.cuh.
//
//   1. delta_kernel:  delta[b, h, i] = rowsum(dO * O) (fp32, lse layout).
//   2. dkdv_kernel:   one block per (key tile, kv head, batch). K and V of the tile stay in shared memory;
//                     the block walks the query heads of its GQA group and, for each, the query tiles of
//                     QueryTiles (mask.h), recomputing P and dS, accumulating dK and dV in registers and
//                     (non-deterministic mode) adding dQ into the fp32 workspace with atomics.
//   3. dq_convert_kernel (non-deterministic): dq = dq_accum in Elem.
//      dq_kernel (deterministic): one block per (query tile, query head, batch) over KeyTiles, dQ in
//      registers, no atomics, so the result is bit-identical run to run.
//
// Warp layout of dkdv_kernel ("key-split"): warp w owns the 16 keys 16 * (w % WK) .. + 15 of the tile and
// the head-dim columns (w / WK) * HDW .. + HDW - 1 of dK and dV. It computes S^T = K Q^T and
// dP^T = V dO^T for its 16 keys against the whole query tile, so the accumulators of P^T and dS^T are,
// after pack2, directly the A fragments of dV += P^T dO and dK += dS^T Q (no shared-memory round trip
// for P, and dS goes to shared memory only for dQ). With WH = 2 (head dims > 128) the two warps of a key
// group compute the same S^T / dP^T: 2 of the 5 products are done twice, the price of keeping dK and dV
// of a 256-wide head in registers without a P exchange through shared memory.
//
// Packed variable-length batches (AttnParams::seq): blocks work on sequence b's rows q_off + .. and keys
// k_off + .., the grids are sized by the longest sequence, and blocks past their sequence's last tile exit
// at once. delta and the dQ conversion walk the (Hq, total_q) rows as one run (row_batches / row_len).
// Score modifiers (softcap, ALiBi) live in the kMod instantiations of dkdv_kernel and dq_kernel only
// (score_mod.cuh): P is computed from the modified score, and dS is multiplied by g = 1 - tanh^2.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../mask.h"
#include "bwd_common.cuh"
#include "score_mod.cuh"
#include "sequence.cuh"
#include "tc_common.cuh"
#include "tiles.h"

namespace fused_attn {
namespace bwd {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Dynamic shared memory a block may opt into on sm80 (A100: 163 KB). Keeping every kernel under it lets
// one binary run on sm80 and sm90; a second pipeline stage is used only where it fits.
constexpr int kSmemCap = 166912;
constexpr double kLog2e = 1.4426950408889634;

constexpr int cmax(int a, int b) { return a > b ? a : b; }

template <int HD>
struct Cfg {
  // Tiles from tiles.h: 64 query rows x 128 keys up to HD 128 (8 warps x 16 keys; dK + dV accumulators
  // are HD regs/thread), 64 x 64 above (4 key groups x 2 column halves, so dK + dV stay <= 128 regs).
  static constexpr TileShape kTiles = tc_tiles(HD);
  static constexpr int TQ = kTiles.bwd_tq;
  static constexpr int TK = kTiles.bwd_tk;

  // dkdv_kernel: key groups x head-dim groups.
  static constexpr int WK = TK / 16;
  static constexpr int WH = kWarps / WK;
  static constexpr int HDW = HD / WH;
  // dQ product inside dkdv_kernel (dQ = dS K, TQ x HD): row groups x column groups.
  static constexpr int DQ_WM = TQ / 16;
  static constexpr int DQ_WN = kWarps / DQ_WM;
  static constexpr int DQ_N = HD / DQ_WN;

  static constexpr int kTileQ = TQ * HD * 2;  // bytes of a Q or dO tile (Swz<HD>)
  static constexpr int kTileK = TK * HD * 2;  // bytes of a K or V tile
  static constexpr int kTileS = TK * TQ * 2;  // bytes of the dS^T tile (Swz<TQ>)
  static constexpr int main_bytes(int st) { return 2 * kTileK + st * 2 * kTileQ + kTileS + st * 2 * TQ * 4; }
  static constexpr int kStages = main_bytes(2) <= kSmemCap ? 2 : 1;
  static constexpr int kSmem = main_bytes(kStages);

  // dq_kernel: 16-row groups x key splits; the key splits are summed once at the end, in a fixed order.
  static constexpr int QWM = TQ / 16;
  static constexpr int QWS = kWarps / QWM;
  static constexpr int TKS = TK / QWS;
  static constexpr int kRedLd = HD + 8;  // fp32 row of the split reduction; +8 keeps float2 stores conflict-free
  static constexpr int dq_bytes(int st) { return 2 * kTileQ + st * 2 * kTileK; }
  static constexpr int kQStages = dq_bytes(2) <= kSmemCap ? 2 : 1;
  static constexpr int kQSmem = cmax(dq_bytes(kQStages), TQ * kRedLd * 4);

  static_assert(HD % 32 == 0 && HD <= 256, "head dim");
  static_assert(TK % 16 == 0 && WK * WH == kWarps && HDW % 16 == 0, "dK/dV warp layout");
  static_assert(TQ % 16 == 0 && DQ_WM * DQ_WN == kWarps && DQ_N % 16 == 0, "dQ warp layout");
  static_assert(TQ == 64, "dS^T tile is swizzled as 64-wide rows (Swz<TQ>)");
  static_assert(QWM * QWS == kWarps && QWS == 2 && TKS % 16 == 0, "dq_kernel warp layout");
  static_assert(kSmem <= kSmemCap && kQSmem <= kSmemCap, "shared memory");
};

// The lane index, re-read where it is used: ldmatrix addresses depend only on the lane, so without this
// the compiler hoists every one of them out of the main loop and keeps ~100 of them in registers.
__device__ __forceinline__ int lane_id_opaque() {
  int l;
  asm volatile("mov.u32 %0, %%laneid;\n" : "=r"(l));
  return l;
}

__device__ __forceinline__ int tid_opaque() {
  int v;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(v));
  return v;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

// lse in log2 units, with a row that saw no key (lse = -inf) mapped to +inf so that
// exp2(s * scale_log2 - m) is exactly 0 there instead of inf.
__device__ __forceinline__ float lse_log2(float lse) {
  return lse == neg_inf() ? pos_inf() : lse * static_cast<float>(kLog2e);
}

// ------------------------------------------------------------------------------------------------
// 1. delta = rowsum(dO * O): 8 threads per row, 16-byte loads, columns < d.
template <typename Elem, int HD>
__global__ void __launch_bounds__(kThreads) delta_kernel(const __grid_constant__ AttnParams p) {
  constexpr int kRowsPerBlock = kThreads / 8;
  const int sub = threadIdx.x & 7;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 3);
  const int64_t len = p.row_len();
  const int64_t nrows = p.row_batches() * p.hq * len;
  float acc = 0.f;
  int64_t i = 0, h = 0, b = 0;
  if (row < nrows) {
    i = row % len;
    const int64_t bh = row / len;
    h = bh % p.hq;
    b = bh / p.hq;
    const Elem* o = static_cast<const Elem*>(p.o) + p.o_st.at(b, h, i);
    const Elem* dout = static_cast<const Elem*>(p.dout) + p.do_st.at(b, h, i);
#pragma unroll
    for (int c0 = 0; c0 < HD; c0 += 64) {
      const int c = c0 + sub * 8;
      if (c < p.d) {
        const uint4 x = *reinterpret_cast<const uint4*>(o + c);
        const uint4 y = *reinterpret_cast<const uint4*>(dout + c);
        const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 a = tc::unpack2<Elem>(xs[j]), e = tc::unpack2<Elem>(ys[j]);
          acc = fmaf(a.x, e.x, acc);
          acc = fmaf(a.y, e.y, acc);
        }
      }
    }
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  // A gradient reaching lse (return_lse=True) adds dlse_i * P_ij to dS_ij: fold it into delta.
  if (row < nrows && sub == 0) {
    const int64_t at = b * p.lse_b + h * p.lse_h + i;
    static_cast<float*>(p.delta)[at] = p.dlse ? acc - static_cast<const float*>(p.dlse)[at] : acc;
  }
}

// acc (16 x 8NT, fp32) = A . B^T for one warp: A is 16 rows x HD at uA (ldmatrix lanes L16), B is 8NT rows
// x HD at uB (lanes L82), both Elem in swizzled shared memory. The dQ kernel's S = Q K^T and dP = dO V^T.
template <typename Elem, int HD, int NT>
__device__ __forceinline__ void warp_abt(float (&acc)[NT][4], uint32_t uA, uint32_t uB, const tc::LdsmLane<HD>& L16,
                                         const tc::LdsmLane<HD>& L82) {
  using namespace tc;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(uA + L16(0, 2 * kk), a);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4(uB + L82(16 * np, 2 * kk), b);
      mma16816<Elem>(acc[2 * np], a, b[0], b[1]);
      mma16816<Elem>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The (query head, query tile) items of one key tile, in order: heads h0 .. h0 + group - 1, each with the
// tiles of its QueryTiles list; entries with tile = -1 (sparse, outside the band) are skipped.
// On entry (gi, idx) is the first candidate; on success it names the item found and v holds it.
template <int TQ, int TK, bool kVar>
__device__ __forceinline__ bool next_query_item(const SeqView<kVar>& sv, int64_t h0, int group, int64_t kt, int& gi,
                                                int& idx, TileVisit& v) {
  for (; gi < group; ++gi, idx = 0) {
    const QueryTiles qts = sv.query_tiles(h0 + gi, kt, TQ, TK);
    const int n = static_cast<int>(qts.count());
    for (; idx < n; ++idx) {
      v = qts.get(idx);
      if (v.tile >= 0) return true;
    }
  }
  return false;
}

// ------------------------------------------------------------------------------------------------
// 2. dK, dV (and atomic dQ). kVar, kMod: packed batch, softcap / ALiBi (template flags: see tc_fwd_kernel).
template <typename Elem, int HD, bool kVar, bool kMod>
__global__ void __launch_bounds__(kThreads, 1) dkdv_kernel(const __grid_constant__ AttnParams p) {
  using C = Cfg<HD>;
  using namespace tc;
  constexpr int TQ = C::TQ, TK = C::TK, HDW = C::HDW;
  using SwzH = Swz<HD>;
  using SwzS = Swz<TQ>;

  extern __shared__ __align__(128) char smem[];
  char* sK = smem;
  char* sV = sK + C::kTileK;
  char* sQ = sV + C::kTileK;                         // [kStages] x (TQ x HD)
  char* sdO = sQ + C::kStages * C::kTileQ;           // [kStages] x (TQ x HD)
  char* sdS = sdO + C::kStages * C::kTileQ;          // dS^T: TK rows (keys) x TQ columns (queries)
  float* sLse = reinterpret_cast<float*>(sdS + C::kTileS);  // [kStages] x TQ, raw lse
  float* sDelta = sLse + C::kStages * TQ;                    // [kStages] x TQ

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int kg = warp % C::WK, hg = warp / C::WK;
  const int64_t kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqView<kVar> sv(p, b);
  const int64_t k0 = kt * TK;
  if (kVar && k0 >= sv.sk()) return;  // past this sequence's key tiles: the whole block leaves
  const int kvalid = static_cast<int>(imin(TK, sv.sk() - k0));
  const int d = static_cast<int>(p.d);
  // 32-bit: an int64 division is a call into a slow-path routine, and a call site costs registers.
  const int group = static_cast<int>(p.hq) / static_cast<int>(p.hk);
  const int64_t h0 = hk * group;
  const float scale = static_cast<float>(p.scale);
  const float scale_log2 = static_cast<float>(p.scale * kLog2e);
  const bool atomic_dq = !p.deterministic;

  const uint32_t uK = smem_u32(sK), uV = smem_u32(sV), udS = smem_u32(sdS);

  // K and V join the first committed group below.
  load_tile_async<Elem, HD, TK, kThreads>(uK, static_cast<const Elem*>(p.k) + p.k_st.at(b, hk, sv.k_off() + k0),
                                          p.k_st.s, kvalid, d, tid);
  load_tile_async<Elem, HD, TK, kThreads>(uV, static_cast<const Elem*>(p.v) + p.v_st.at(b, hk, sv.k_off() + k0),
                                          p.v_st.s, kvalid, d, tid);

  auto issue = [&](int st, int64_t h, int64_t qtile) {
    const int tid = tid_opaque();  // keeps the per-thread copy addresses out of the loop's live registers
    const int64_t q0 = qtile * TQ;
    const int qvalid = static_cast<int>(imin(TQ, sv.sq() - q0));
    const int64_t row0 = sv.q_off() + q0;  // packed row of the tile's first query
    load_tile_async<Elem, HD, TQ, kThreads>(smem_u32(sQ + st * C::kTileQ),
                                            static_cast<const Elem*>(p.q) + p.q_st.at(b, h, row0), p.q_st.s,
                                            qvalid, d, tid);
    load_tile_async<Elem, HD, TQ, kThreads>(smem_u32(sdO + st * C::kTileQ),
                                            static_cast<const Elem*>(p.dout) + p.do_st.at(b, h, row0),
                                            p.do_st.s, qvalid, d, tid);
    if (tid < TQ) {
      // Rows >= Sq read 0 here; they occur only in tiles that need masking, where element_visible drops them.
      const bool ok = tid < qvalid;
      const int64_t off = ok ? b * p.lse_b + h * p.lse_h + row0 + tid : 0;
      cp_async4(smem_u32(sLse + st * TQ + tid), static_cast<const float*>(p.lse) + off, ok);
      cp_async4(smem_u32(sDelta + st * TQ + tid), static_cast<const float*>(p.delta) + off, ok);
    }
  };

  float dv[HDW / 8][4], dk[HDW / 8][4];
#pragma unroll
  for (int n = 0; n < HDW / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dv[n][e] = dk[n][e] = 0.f;

  int gi = 0, idx = 0;  // query head in the group, entry of its QueryTiles list
  TileVisit cur{-1, false};
  bool have = next_query_item<TQ, TK>(sv, h0, group, kt, gi, idx, cur);
  int st = 0;
  if (C::kStages == 2 && have) {
    issue(0, h0 + gi, cur.tile);
    cp_async_commit();
  }

  while (have) {
    if (C::kStages == 2) {
      // Prefetch the next item into the other stage (last read in the previous iteration, which ended
      // with a barrier), then wait for the current one. The next item is looked up again at the end of
      // the iteration rather than kept: its state would stay live through the register peak below.
      int ngi = gi, nidx = idx + 1;
      TileVisit nxt{-1, false};
      if (next_query_item<TQ, TK>(sv, h0, group, kt, ngi, nidx, nxt)) {
        issue(st ^ 1, h0 + ngi, nxt.tile);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
    } else {
      issue(0, h0 + gi, cur.tile);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();

    const int64_t h = h0 + gi;
    const int64_t q0 = cur.tile * TQ;
    const uint32_t uQ = smem_u32(sQ + st * C::kTileQ), udO = smem_u32(sdO + st * C::kTileQ);

    // Visibility of this thread's 32 accumulator elements, one bit each (bit 4 n + e), computed before
    // the scores are live so that the int64 rule does not compete with the accumulators for registers.
    // Accumulator (n, e) of S^T / dP^T: key 16 kg + g + 8 (e / 2), query 8 n + 2 t + e % 2.
    static_assert(TQ / 8 * 4 == 32, "one mask bit per accumulator element");
    uint32_t vis = 0xffffffffu;
    if (sv.needs_mask(cur, q0, q0 + TQ, k0, k0 + TK)) {
      vis = 0;
#pragma unroll 1
      for (int j = 0; j < 32; ++j) {
        const int n = j >> 2, e = j & 3;
        if (sv.visible(cur, h, q0 + 8 * n + 2 * t + (e & 1), k0 + 16 * kg + g + 8 * (e >> 1)))
          vis |= 1u << j;
      }
    }

    const int lane = lane_id_opaque();
    const LdsmLane<HD> L16(ldsm_rows16_row(lane), ldsm_rows16_chunk(lane));
    const LdsmLane<HD> L82(ldsm_rows8x2_row(lane), ldsm_rows8x2_chunk(lane));
    const uint32_t uKw = uK + 16 * kg * SwzH::kRowBytes, uVw = uV + 16 * kg * SwzH::kRowBytes;  // warp's keys

    // The query tile in blocks of 32 queries (kSB n-tiles of 8). Per block: dP^T = V dO^T and
    // S^T = K Q^T for this warp's 16 keys; P^T = exp2(S^T * scale * log2e - lse * log2e), 0 where masked
    // or lse = -inf; dS^T = P^T * (dP^T - delta); both packed into A fragments (pack2 of accumulator
    // pairs), dS^T parked in shared memory for dQ, then dV += P^T dO and dK += dS^T Q over the block's
    // queries. Blocking keeps 32 fp32 scores live on top of the 2 * HDW / 2 dK / dV accumulators (the
    // register peak) at the price of re-reading the warp's K and V fragments once per block.
    // Accumulator (n, e) of a block: key 16 kg + g + 8 (e / 2), query 32 blk + 8 n + 2 t + e % 2.
    constexpr int kSB = 4;
    static_assert(TQ % (8 * kSB) == 0, "query blocks");
    const float* lse_s = sLse + st * TQ;
    const float* del_s = sDelta + st * TQ;
    // kMod: this head's modifiers; ALiBi distance of element (nl, e) of block blk (n = kSB blk + nl):
    // d0 + 8 n + (e % 2) - 8 (e / 2).
    const tc::ModFrag mod(p, b, h, sv.info());
    const float d0 = kMod ? mod.dist(q0 + 2 * t, k0 + 16 * kg + g) : 0.f;
    const LdsmCols<HD, (C::WH == 1 ? 1 : HDW / 16)> Lhd(ldsm_rows16_row(lane), ldsm_rows16_chunk(lane),
                                                       C::WH == 1 ? 0 : hg * HDW / 8);  // used when WH = 2
#pragma unroll
    for (int blk = 0; blk < TQ / (8 * kSB); ++blk) {
      float s[kSB][4], dp[kSB][4];
#pragma unroll
      for (int n = 0; n < kSB; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        uint32_t av[4], ak[4];
        ldsm_x4(uVw + L16(0, 2 * kk), av);
        ldsm_x4(uKw + L16(0, 2 * kk), ak);
#pragma unroll
        for (int np = 0; np < kSB / 2; ++np) {
          uint32_t bo[4], bq[4];
          ldsm_x4(udO + L82(8 * kSB * blk + 16 * np, 2 * kk), bo);
          ldsm_x4(uQ + L82(8 * kSB * blk + 16 * np, 2 * kk), bq);
          mma16816<Elem>(dp[2 * np], av, bo[0], bo[1]);
          mma16816<Elem>(dp[2 * np + 1], av, bo[2], bo[3]);
          mma16816<Elem>(s[2 * np], ak, bq[0], bq[1]);
          mma16816<Elem>(s[2 * np + 1], ak, bq[2], bq[3]);
        }
      }
#pragma unroll
      for (int nl = 0; nl < kSB; ++nl) {
        const int n = kSB * blk + nl;  // n-tile within the query tile
        const float2 l = *reinterpret_cast<const float2*>(lse_s + 8 * n + 2 * t);
        const float2 dl = *reinterpret_cast<const float2*>(del_s + 8 * n + 2 * t);
        const float m[2] = {lse_log2(l.x), lse_log2(l.y)};
        const float dd[2] = {dl.x, dl.y};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if constexpr (kMod) {
            float gm;
            const float x = mod.score(s[nl][e], d0 + static_cast<float>(8 * n + (e & 1) - 8 * (e >> 1)), gm);
            float pv = fast_exp2(x - m[e & 1]);
            pv = (vis >> (4 * n + e)) & 1u ? pv : 0.f;
            s[nl][e] = pv;
            dp[nl][e] = pv * (dp[nl][e] - dd[e & 1]) * gm;
          } else {
            float pv = fast_exp2(fmaf(s[nl][e], scale_log2, -m[e & 1]));
            pv = (vis >> (4 * n + e)) & 1u ? pv : 0.f;
            s[nl][e] = pv;
            dp[nl][e] = pv * (dp[nl][e] - dd[e & 1]);
          }
        }
      }
#pragma unroll
      for (int kl = 0; kl < kSB / 2; ++kl) {
        const int kk = kSB / 2 * blk + kl;  // k-step (16 queries) within the query tile
        uint32_t pa[4], da[4];
        pa[0] = pack2<Elem>(s[2 * kl][0], s[2 * kl][1]);
        pa[1] = pack2<Elem>(s[2 * kl][2], s[2 * kl][3]);
        pa[2] = pack2<Elem>(s[2 * kl + 1][0], s[2 * kl + 1][1]);
        pa[3] = pack2<Elem>(s[2 * kl + 1][2], s[2 * kl + 1][3]);
        da[0] = pack2<Elem>(dp[2 * kl][0], dp[2 * kl][1]);
        da[1] = pack2<Elem>(dp[2 * kl][2], dp[2 * kl][3]);
        da[2] = pack2<Elem>(dp[2 * kl + 1][0], dp[2 * kl + 1][1]);
        da[3] = pack2<Elem>(dp[2 * kl + 1][2], dp[2 * kl + 1][3]);
        if (atomic_dq && hg == 0) {
          // dS^T into the [key][query] tile (one copy: the hg = 0 warps). da[0]: key r, queries c, c + 1;
          // da[1]: key r + 8; da[2], da[3]: queries c + 8, c + 9 (chunk 2 kk + 1).
          const int r = 16 * kg + g;
          const int c = 16 * kk + 2 * t;
          *reinterpret_cast<uint32_t*>(sdS + SwzS::offset(r, c >> 3) + (c & 7) * 2) = da[0];
          *reinterpret_cast<uint32_t*>(sdS + SwzS::offset(r + 8, c >> 3) + (c & 7) * 2) = da[1];
          *reinterpret_cast<uint32_t*>(sdS + SwzS::offset(r, (c >> 3) + 1) + (c & 7) * 2) = da[2];
          *reinterpret_cast<uint32_t*>(sdS + SwzS::offset(r + 8, (c >> 3) + 1) + (c & 7) * 2) = da[3];
        }
        // dV += P^T dO, dK += dS^T Q over this warp's HDW columns; B = [query][hd] tiles, .trans.
#pragma unroll
        for (int np = 0; np < HDW / 16; ++np) {
          uint32_t bo[4], bq[4];
          uint32_t boff;
          if constexpr (C::WH == 1)
            boff = L16(16 * kk, 2 * np);
          else
            boff = Lhd.at(16 * kk, np);
          ldsm_x4_trans(udO + boff, bo);
          ldsm_x4_trans(uQ + boff, bq);
          mma16816<Elem>(dv[2 * np], pa, bo[0], bo[1]);
          mma16816<Elem>(dv[2 * np + 1], pa, bo[2], bo[3]);
          mma16816<Elem>(dk[2 * np], da, bq[0], bq[1]);
          mma16816<Elem>(dk[2 * np + 1], da, bq[2], bq[3]);
        }
      }
    }

    if (atomic_dq) {
      __syncthreads();

      const int mq = warp % C::DQ_WM, nq = warp / C::DQ_WM;
      const LdsmCols<TQ, 1> Lds(ldsm_rows8x2_row(lane), ldsm_rows8x2_chunk(lane), 2 * mq);
      // B = K columns nq * DQ_N ..: when DQ_N is a multiple of 64 the warp's first chunk is a multiple of 8
      // and L16 serves with a per-warp byte offset; otherwise one register per 16-column block.
      constexpr bool kDqAligned = (C::DQ_N / 8) % 8 == 0;
      const LdsmCols<HD, (kDqAligned ? 1 : C::DQ_N / 16)> Ldq(ldsm_rows16_row(lane), ldsm_rows16_chunk(lane),
                                                            kDqAligned ? 0 : nq * C::DQ_N / 8);
      const uint32_t uKq = uK + (kDqAligned ? nq * C::DQ_N * 2 : 0);
      float acc[C::DQ_N / 8][4];
#pragma unroll
      for (int n = 0; n < C::DQ_N / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < TK / 16; ++kk) {
        // A = dS (queries x keys) from the [key][query] tile: rows8x2 pattern with .trans.
        uint32_t a[4];
        ldsm_x4_trans(udS + Lds.at(16 * kk, 0), a);
#pragma unroll
        for (int np = 0; np < C::DQ_N / 16; ++np) {
          uint32_t bk[4];
          uint32_t boff;
          if constexpr (kDqAligned) boff = L16(16 * kk, 2 * np);
          else boff = Ldq.at(16 * kk, np);
          ldsm_x4_trans(uKq + boff, bk);
          mma16816<Elem>(acc[2 * np], a, bk[0], bk[1]);
          mma16816<Elem>(acc[2 * np + 1], a, bk[2], bk[3]);
        }
      }
      float* dqa = p.dq_accum + b * p.dqa_b + h * p.dqa_h + sv.q_off() * p.dqa_s;
#pragma unroll
      for (int n = 0; n < C::DQ_N / 8; ++n) {
        const int col = nq * C::DQ_N + 8 * n + 2 * t;
        if (col < d) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int64_t row = q0 + 16 * mq + g + 8 * r;
            if (row < sv.sq())
              red_add_f32x2(dqa + row * p.dqa_s + col, acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
          }
        }
      }
    }
    __syncthreads();  // this stage, sdS and (stage 1) the Q/dO tiles are free for the next iteration

    ++idx;
    have = next_query_item<TQ, TK>(sv, h0, group, kt, gi, idx, cur);
    if (C::kStages == 2) st ^= 1;
  }

  // Epilogue: dK * scale and dV through the (now free) K and V tiles, then 16-byte stores. The commit
  // matters when the block had no item: K and V were then never committed, and wait_group does not wait
  // for uncommitted copies.
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  {
    const int r = 16 * kg + g;
#pragma unroll
    for (int n = 0; n < HDW / 8; ++n) {
      const int col = hg * HDW + 8 * n + 2 * t;
      st_pair<Elem, HD>(sK, r, col, dk[n][0] * scale, dk[n][1] * scale);
      st_pair<Elem, HD>(sK, r + 8, col, dk[n][2] * scale, dk[n][3] * scale);
      st_pair<Elem, HD>(sV, r, col, dv[n][0], dv[n][1]);
      st_pair<Elem, HD>(sV, r + 8, col, dv[n][2], dv[n][3]);
    }
  }
  __syncthreads();
  store_tile<Elem, HD, TK, kThreads>(sK, static_cast<Elem*>(p.dk) + p.dk_st.at(b, hk, sv.k_off() + k0), p.dk_st.s,
                                     kvalid, d, tid);
  store_tile<Elem, HD, TK, kThreads>(sV, static_cast<Elem*>(p.dv) + p.dv_st.at(b, hk, sv.k_off() + k0), p.dv_st.s,
                                     kvalid, d, tid);
}

// ------------------------------------------------------------------------------------------------
// 3a. dq = dq_accum (fp32 workspace) in Elem; one thread per 8 columns.
template <typename Elem, int HD>
__global__ void __launch_bounds__(kThreads) dq_convert_kernel(const __grid_constant__ AttnParams p) {
  constexpr int kC = HD / 8;
  const int64_t id = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = id / kC;
  const int c = static_cast<int>(id - row * kC) * 8;
  const int64_t len = p.row_len();
  if (row >= p.row_batches() * p.hq * len || c >= p.d) return;
  const int64_t i = row % len, bh = row / len, h = bh % p.hq, b = bh / p.hq;
  const float* src = p.dq_accum + b * p.dqa_b + h * p.dqa_h + i * p.dqa_s + c;
  const float4 x = *reinterpret_cast<const float4*>(src);
  const float4 y = *reinterpret_cast<const float4*>(src + 4);
  uint4 out;
  out.x = tc::pack2<Elem>(x.x, x.y);
  out.y = tc::pack2<Elem>(x.z, x.w);
  out.z = tc::pack2<Elem>(y.x, y.y);
  out.w = tc::pack2<Elem>(y.z, y.w);
  *reinterpret_cast<uint4*>(static_cast<Elem*>(p.dq) + p.dq_st.at(b, h, i) + c) = out;
}

// ------------------------------------------------------------------------------------------------
// 3b. Deterministic dQ: one block per (query tile, query head, batch). Warp w owns query rows
// 16 (w % QWM) .. + 15 and keys (w / QWM) * TKS .. + TKS - 1 of each key tile; S, dP and dS stay in
// registers (the dS accumulator is directly the A fragment of dQ += dS K). The QWS = 2 key splits are
// summed once at the end through shared memory, always split 1 into split 0. kVar, kMod: as dkdv_kernel.
template <typename Elem, int HD, bool kVar, bool kMod>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(const __grid_constant__ AttnParams p) {
  using C = Cfg<HD>;
  using namespace tc;
  constexpr int TQ = C::TQ, TK = C::TK, TKS = C::TKS;
  using SwzH = Swz<HD>;

  extern __shared__ __align__(128) char smem[];
  char* sQ = smem;
  char* sdO = sQ + C::kTileQ;
  char* sK = sdO + C::kTileQ;               // [kQStages] x (TK x HD)
  char* sV = sK + C::kQStages * C::kTileK;  // [kQStages] x (TK x HD)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp % C::QWM, ks = warp / C::QWM;
  const int64_t qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = static_cast<int>(h) / (static_cast<int>(p.hq) / static_cast<int>(p.hk));
  const SeqView<kVar> sv(p, b);
  const int64_t q0 = qt * TQ;
  if (kVar && q0 >= sv.sq()) return;  // past this sequence's query tiles: the whole block leaves
  const int qvalid = static_cast<int>(imin(TQ, sv.sq() - q0));
  const int d = static_cast<int>(p.d);
  const float scale = static_cast<float>(p.scale);
  const float scale_log2 = static_cast<float>(p.scale * kLog2e);
  const int64_t row0 = sv.q_off() + q0;  // packed row of the tile's first query

  load_tile_async<Elem, HD, TQ, kThreads>(smem_u32(sQ), static_cast<const Elem*>(p.q) + p.q_st.at(b, h, row0),
                                          p.q_st.s, qvalid, d, tid);
  load_tile_async<Elem, HD, TQ, kThreads>(smem_u32(sdO), static_cast<const Elem*>(p.dout) + p.do_st.at(b, h, row0),
                                          p.do_st.s, qvalid, d, tid);

  // This thread's two query rows: q0 + 16 wm + g and + 8.
  float m[2], dd[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = q0 + 16 * wm + g + 8 * r;
    m[r] = pos_inf();
    dd[r] = 0.f;
    if (row < sv.sq()) {
      const int64_t off = b * p.lse_b + h * p.lse_h + sv.q_off() + row;
      m[r] = lse_log2(static_cast<const float*>(p.lse)[off]);
      dd[r] = static_cast<const float*>(p.delta)[off];
    }
  }

  auto issue = [&](int st, int64_t ktile) {
    const int tid = tid_opaque();  // keeps the per-thread copy addresses out of the loop's live registers
    const int64_t k0 = ktile * TK;
    const int kvalid = static_cast<int>(imin(TK, sv.sk() - k0));
    load_tile_async<Elem, HD, TK, kThreads>(smem_u32(sK + st * C::kTileK),
                                            static_cast<const Elem*>(p.k) + p.k_st.at(b, hk, sv.k_off() + k0), p.k_st.s,
                                            kvalid, d, tid);
    load_tile_async<Elem, HD, TK, kThreads>(smem_u32(sV + st * C::kTileK),
                                            static_cast<const Elem*>(p.v) + p.v_st.at(b, hk, sv.k_off() + k0), p.v_st.s,
                                            kvalid, d, tid);
  };

  const KeyTiles kts = sv.key_tiles(h, qt, TQ, TK);
  const tc::ModFrag mod(p, b, h, sv.info());  // kMod only
  const int64_t nk = kts.count();
  auto next_key = [&](int64_t i, TileVisit& v) -> int64_t {
    for (; i < nk; ++i) {
      v = kts.get(i);
      if (v.tile >= 0) return i;
    }
    return nk;
  };

  float acc[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

  TileVisit cur{-1, false};
  int64_t i = next_key(0, cur);
  int st = 0;
  if (C::kQStages == 2 && i < nk) {
    issue(0, cur.tile);
    cp_async_commit();
  }
  while (i < nk) {
    TileVisit nxt{-1, false};
    const int64_t ni = next_key(i + 1, nxt);
    if (C::kQStages == 2) {
      if (ni < nk) {
        issue(st ^ 1, nxt.tile);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
    } else {
      issue(0, cur.tile);
      cp_async_commit();
      cp_async_wait<0>();
    }
    __syncthreads();

    const int64_t k0 = cur.tile * TK;
    const int lane = lane_id_opaque();
    const LdsmLane<HD> L16(ldsm_rows16_row(lane), ldsm_rows16_chunk(lane));
    const LdsmLane<HD> L82(ldsm_rows8x2_row(lane), ldsm_rows8x2_chunk(lane));
    const uint32_t uQw = smem_u32(sQ) + 16 * wm * SwzH::kRowBytes, udOw = smem_u32(sdO) + 16 * wm * SwzH::kRowBytes;
    // This warp's TKS keys of the stage.
    const uint32_t uKs = smem_u32(sK + st * C::kTileK) + ks * TKS * SwzH::kRowBytes;
    const uint32_t uVs = smem_u32(sV + st * C::kTileK) + ks * TKS * SwzH::kRowBytes;

    // Visibility bits (bit 4 n + e) of this thread's accumulator elements, before the scores are live.
    // Accumulator (n, e): query q0 + 16 wm + g + 8 (e / 2), key k0 + ks * TKS + 8 n + 2 t + e % 2.
    constexpr int kBits = TKS / 8 * 4;
    static_assert(kBits <= 32, "one mask bit per accumulator element");
    uint32_t vis = 0xffffffffu;
    if (sv.needs_mask(cur, q0, q0 + TQ, k0, k0 + TK)) {
      vis = 0;
#pragma unroll 1
      for (int j = 0; j < kBits; ++j) {
        const int n = j >> 2, e = j & 3;
        if (sv.visible(cur, h, q0 + 16 * wm + g + 8 * (e >> 1), k0 + ks * TKS + 8 * n + 2 * t + (e & 1)))
          vis |= 1u << j;
      }
    }

    // S = Q K^T: 16 rows x TKS keys.
    float s[TKS / 8][4];
    warp_abt<Elem>(s, uQw, uKs, L16, L82);
    if constexpr (kMod) {
      // Element (n, e): query q0 + 16 wm + g + 8 (e / 2), key k0 + ks TKS + 8 n + 2 t + (e % 2). P g goes into
      // s (P is only needed for dS = P g (dP - delta) here).
      const float d0 = mod.dist(q0 + 16 * wm + g, k0 + ks * TKS + 2 * t);
#pragma unroll
      for (int n = 0; n < TKS / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float gm;
          const float x = mod.score(s[n][e], d0 + static_cast<float>(8 * (e >> 1) - 8 * n - (e & 1)), gm);
          const float pv = fast_exp2(x - m[e >> 1]) * gm;
          s[n][e] = (vis >> (4 * n + e)) & 1u ? pv : 0.f;
        }
    } else {
#pragma unroll
      for (int n = 0; n < TKS / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pv = fast_exp2(fmaf(s[n][e], scale_log2, -m[e >> 1]));
          s[n][e] = (vis >> (4 * n + e)) & 1u ? pv : 0.f;
        }
    }

    // dP = dO V^T, then dS = P * (dP - delta) (kMod: P g, see above).
    float dp[TKS / 8][4];
    warp_abt<Elem>(dp, udOw, uVs, L16, L82);
#pragma unroll
    for (int n = 0; n < TKS / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[n][e] = s[n][e] * (dp[n][e] - dd[e >> 1]);

    // dQ += dS K: A = dS from registers, B = K ([key][hd], .trans).
#pragma unroll
    for (int kk = 0; kk < TKS / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<Elem>(dp[2 * kk][0], dp[2 * kk][1]);
      a[1] = pack2<Elem>(dp[2 * kk][2], dp[2 * kk][3]);
      a[2] = pack2<Elem>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      a[3] = pack2<Elem>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int np = 0; np < HD / 16; ++np) {
        uint32_t bk[4];
        ldsm_x4_trans(uKs + L16(16 * kk, 2 * np), bk);
        mma16816<Elem>(acc[2 * np], a, bk[0], bk[1]);
        mma16816<Elem>(acc[2 * np + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();  // the stage just read may be refilled by the next iteration's prefetch

    i = ni;
    cur = nxt;
    if (C::kQStages == 2) st ^= 1;
  }

  // Sum the key splits in a fixed order: split 1 parks its partial in shared memory, split 0 adds it.
  // (Commit first: with no key tile the Q / dO copies were never committed.)
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
  if (ks == 1) {
#pragma unroll
    for (int n = 0; n < HD / 8; ++n)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        *reinterpret_cast<float2*>(red + (16 * wm + g + 8 * r) * C::kRedLd + 8 * n + 2 * t) =
            make_float2(acc[n][2 * r], acc[n][2 * r + 1]);
  }
  __syncthreads();
  if (ks == 0) {
    Elem* dq = static_cast<Elem*>(p.dq) + p.dq_st.at(b, h, row0);
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      const int col = 8 * n + 2 * t;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * wm + g + 8 * r;
        const float2 o = *reinterpret_cast<const float2*>(red + row * C::kRedLd + col);
        if (row < qvalid && col < d)
          *reinterpret_cast<uint32_t*>(dq + row * p.dq_st.s + col) =
              pack2<Elem>((acc[n][2 * r] + o.x) * scale, (acc[n][2 * r + 1] + o.y) * scale);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

inline void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fused_attn backward: ") + what + ": " + cudaGetErrorString(e));
}

template <typename Kernel>
inline void set_smem(Kernel kernel, int bytes, const char* what) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("fused_attn backward: ") + what + ": cannot use " +
                             std::to_string(bytes) + " bytes of shared memory: " + cudaGetErrorString(e));
}

// The two kernels that see scores, for one value of kMod.
template <typename Elem, int HD, bool kVar, bool kMod>
void run_score_kernels(const AttnParams& p, cudaStream_t stream) {
  using C = Cfg<HD>;
  // With Sq = 0 this still runs and writes dK = dV = 0.
  if (p.batch * p.hk * p.sk > 0) {
    auto kernel = dkdv_kernel<Elem, HD, kVar, kMod>;
    set_smem(kernel, C::kSmem, "dK/dV kernel");
    const dim3 grid(static_cast<unsigned>(cdiv(p.sk, C::TK)), static_cast<unsigned>(p.hk),
                    static_cast<unsigned>(p.batch));
    kernel<<<grid, kThreads, C::kSmem, stream>>>(p);
    check_launch("dK/dV kernel");
  }
  if (p.deterministic && p.batch * p.hq * p.sq > 0) {
    auto kernel = dq_kernel<Elem, HD, kVar, kMod>;
    set_smem(kernel, C::kQSmem, "dQ kernel");
    const dim3 grid(static_cast<unsigned>(cdiv(p.sq, C::TQ)), static_cast<unsigned>(p.hq),
                    static_cast<unsigned>(p.batch));
    kernel<<<grid, kThreads, C::kQSmem, stream>>>(p);
    check_launch("dQ kernel");
  }
}

}  // namespace bwd

template <typename Elem, int HD>
void tc_bwd_run(const AttnParams& p, cudaStream_t stream) {
  if (p.d <= 0 || p.d > HD || p.d % 8 != 0)
    throw std::invalid_argument("fused_attn backward: head dim d=" + std::to_string(p.d) +
                                " must be a positive multiple of 8 and at most " + std::to_string(HD));
  // Rows of lse / delta / dq: (B, Hq, Sq), or (Hq, total_q) for a packed batch.
  const int64_t rows = p.row_batches() * p.hq * p.row_len();
  if (rows > 0) {
    bwd::delta_kernel<Elem, HD><<<static_cast<unsigned>(cdiv(rows, bwd::kThreads / 8)), bwd::kThreads, 0, stream>>>(p);
    bwd::check_launch("delta kernel");
  }
  const bool mod = p.softcap > 0 || p.alibi;
  if (p.varlen())
    mod ? bwd::run_score_kernels<Elem, HD, true, true>(p, stream)
        : bwd::run_score_kernels<Elem, HD, true, false>(p, stream);
  else
    mod ? bwd::run_score_kernels<Elem, HD, false, true>(p, stream)
        : bwd::run_score_kernels<Elem, HD, false, false>(p, stream);
  if (rows > 0 && !p.deterministic) {
    const int64_t chunks = rows * (HD / 8);
    bwd::dq_convert_kernel<Elem, HD>
        <<<static_cast<unsigned>(cdiv(chunks, bwd::kThreads)), bwd::kThreads, 0, stream>>>(p);
    bwd::check_launch("dQ convert kernel");
  }
}

}  // namespace fused_attn
