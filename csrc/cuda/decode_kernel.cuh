// KV-cache decoding on tensor cores (flash_kvcache), fp16 / bf16 in, fp32 accumulate, sm80+: split-KV.
//
// Decoding reads the whole cache once per step and does little arithmetic per byte, so the kernel is
// shaped by memory: every byte of K / V is read from global memory once per (kv head, split), and there are
// enough blocks in flight to cover the SMs even at batch 1 (the key range is split; decode_splits() picks
// the count, a combine kernel merges the parts by their lse).
//
// One thread block of 4 warps per (split, row tile, kv head, batch). The query tile packs the GQA group:
// tile row r is query position r / G and query head kvh * G + r % G (G = Hq / Hk), so the group's heads
// (times Sq positions for chunked prefill or speculative decoding) share each K / V tile loaded into
// shared memory. Two shapes (template WM, the warps along the rows):
//   WM = 1 (G * Sq <= 16): one 16-row mma block; the 4 warps split each 64-key tile, 16 keys each, with
//          their own online softmax, merged through shared memory at the end. A 64-row tile would make
//          3 warps of 4 compute on padding and read every K / V tile from shared memory 4 times.
//   WM = 4 (more rows, HD <= 128): 64 rows, 16 per warp, each warp over the whole key tile (the forward's
//          shape). Above HD = 128 more rows take several 16-row tiles (WM = 1).
// K / V tiles (64 keys) come in with cp.async, double-buffered, row by row through the page table when the
// cache is paged (one block_table entry per row, read by the threads that copy it), into the swizzled
// layout of tc_common.cuh. Per tile and warp, as in fwd_kernel.cuh:
//   S = Q K^T (ldmatrix + mma.sync m16n8k16), x = S * scale [softcap, * log2 e, - ALiBi], masked to -inf
//   where mask.h's rule, the split's end or the sequence's end hides a key (only on tiles that need it),
//   online softmax in base 2, O += P V with P taken from the S accumulators.
// End: the warps' (max, sum, O) are merged through shared memory in fixed warp order; one split writes
// out and lse directly, several write their normalised O and lse to p.o_part / p.lse_part for
// decode_combine (decode.cu).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "../mask.h"
#include "../params.h"
#include "decode.h"
#include "tc_common.cuh"

namespace fused_attn {
namespace dec {

template <int HD, int WM>
struct DecCfg {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTk = kDecodeTileK;  // keys per K / V tile
  static constexpr int kM = 16 * WM;        // query rows per block
  static constexpr int kKW = kWarps / WM;   // warps along the keys of a tile
  static constexpr int kKeysW = kTk / kKW;  // keys per warp per tile (16 or 64)
  static_assert(WM == 1 || WM == 4, "row warps: 1 or 4");
  static_assert(HD % 32 == 0 && kKeysW % 16 == 0, "tile shapes");
  // Q's A fragments stay in registers up to HD = 128 (as in the forward); above, they are re-read from
  // shared memory at every k-step.
  static constexpr bool kQInRegs = HD <= 128 && WM == 4;
  // Blocks per SM the register budget is sized for (ptxas -v, nvcc 13.0, sm_90, no spills): WM = 1 at
  // HD <= 128 takes <= 164 registers for 3 blocks, which shared memory (68 KB per block at HD = 128) also
  // allows; WM = 4 at HD <= 128 takes <= 245 for 2. HD > 128 gets 1 (a 3-block cap spilled 216 .. 868 bytes;
  // shared memory allows 1 block at HD = 256 anyway). Q in registers only for WM = 4: at WM = 1 the 32
  // registers of its fragments (HD = 128) are what the 3-block budget lacks, and re-reading Q costs one
  // ldmatrix per k-step next to one for K.
  static constexpr int kMinBlocks = HD > 128 ? 1 : (WM == 1 ? 3 : 2);
  static_assert(WM == 1 || HD <= 128, "WM = 4 only up to HD = 128");
  static constexpr int kQBytes = kM * HD * 2;
  static constexpr int kKVBytes = kTk * HD * 2;  // one K or one V tile
  // [Q][K0][V0][K1][V1]; after the loop the K / V area holds the fp32 merge buffer, kKW x kM rows
  // (64 in both shapes) of kObLd floats. kObLd = HD + 8: the 8 row groups of a warp's float2 stores then
  // start 8 banks apart (2 wavefronts per store, the minimum for 256 bytes) instead of all at bank 0.
  static constexpr int kSmem = kQBytes + 4 * kKVBytes;
  static constexpr int kObLd = HD + 8;
  static_assert(kKW * kM * kObLd * 4 <= 4 * kKVBytes, "merge buffer fits in the K / V stages");
  static constexpr int kNS = kKeysW / 8;  // S n-tiles per warp
  static constexpr int kNO = HD / 8;      // O n-tiles
  static constexpr int kKQ = HD / 16;     // k-steps of Q K^T
  static constexpr int kKP = kKeysW / 16; // k-steps of P V
};

// Everything a block needs to know about its sequence, rows and keys.
struct DecBlock {
  SeqInfo s;
  int64_t b, kvh, split, rt;
  int64_t rows;     // valid tile rows (G * Sq - rt * kM, at most kM)
  int64_t s0, s1;   // this split's keys
};

__device__ __forceinline__ DecBlock dec_block(const AttnParams& p, int64_t m_rows, int64_t nrt) {
  DecBlock k;
  k.split = blockIdx.x / nrt;
  k.rt = blockIdx.x - k.split * nrt;
  k.kvh = blockIdx.y;
  k.b = blockIdx.z;
  k.s = p.seq(k.b);
  const int64_t grp = p.group();
  const int64_t r0 = k.rt * m_rows;
  k.rows = imax(0, imin(m_rows, grp * k.s.sq - r0));
  k.s0 = k.s1 = 0;
  if (k.rows > 0) {
    int64_t kb, ke;
    Band(p, k.s).key_range(r0 / grp, (r0 + k.rows - 1) / grp + 1, kb, ke);
    decode_split_range(kb, ke, p.num_splits, k.split, k.s0, k.s1);
  }
  return k;
}

// Copy rows [k0, k0 + kTk) of K or V into a swizzled shared tile; rows at or past `end` and columns >= d
// are zero-filled (nothing read). kTPR threads share a row (as tc::load_tile_async), so each thread works
// out one row address (one block_table read) per step.
template <typename Elem, int HD, int ROWS, int NTHREADS>
__device__ __forceinline__ void load_kv_async(uint32_t sdst, const AttnParams& p, const Elem* base, const Strides& st,
                                              int64_t b, int64_t kvh, int64_t k_off, int64_t k0, int64_t end, int d,
                                              int tid) {
  using S = tc::Swz<HD>;
  constexpr int kC = HD / 8;
  constexpr int kTPR = kC % 8 == 0 ? 8 : 4;
  constexpr int kRowStep = NTHREADS / kTPR;
  static_assert(NTHREADS % kTPR == 0 && kRowStep % 8 == 0, "NTHREADS must be a multiple of 8 * kTPR");
  constexpr int kRowIters = (ROWS + kRowStep - 1) / kRowStep;
  constexpr int kPerRow = kC / kTPR;
  const int r0 = tid / kTPR;
  const int cb = tid % kTPR;
#pragma unroll
  for (int it = 0; it < kRowIters; ++it) {
    const int r = r0 + it * kRowStep;
    if (ROWS % kRowStep != 0 && r >= ROWS) break;
    const bool row_ok = k0 + r < end;
    const Elem* src = row_ok ? decode_kv_row(p, base, st, b, kvh, k_off, k0 + r) + cb * 8 : base;
#pragma unroll
    for (int k = 0; k < kPerRow; ++k) {
      const int c = cb + k * kTPR;
      const bool ok = row_ok && c * 8 < d;
      const uint32_t off = S::offset(r0, c) + static_cast<uint32_t>(it * kRowStep * S::kRowBytes);
      tc::cp_async16(sdst + off, ok ? src + k * kTPR * 8 : base, ok);
    }
  }
}

template <typename Elem, int HD, int WM>
__global__ void __launch_bounds__(DecCfg<HD, WM>::kThreads, DecCfg<HD, WM>::kMinBlocks)
    tc_decode_kernel(const __grid_constant__ AttnParams p, int64_t nrt) {
  using C = DecCfg<HD, WM>;
  extern __shared__ __align__(128) char smem[];
  __shared__ float part_m[C::kKW * C::kM], part_l[C::kKW * C::kM];  // per warp slice and tile row
  __shared__ float row_m[C::kM], row_l[C::kM];                        // merged

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp % WM;  // row block of this warp
  const int wk = warp / WM;  // key slice of this warp
  const int g = lane >> 2;
  const int t = lane & 3;
  const int d = static_cast<int>(p.d);
  const int64_t grp = p.group();

  const DecBlock blk = dec_block(p, C::kM, nrt);
  const int64_t b = blk.b, kvh = blk.kvh;
  const int64_t r0 = blk.rt * C::kM;
  const Band band(p, blk.s);

  // This thread's two accumulator rows (g, g + 8 of the warp's 16): position, head, validity.
  // (Rows past the group's are computed on zero Q and never written.)
  int64_t row_i[2];
  float slope[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int64_t rr = wm * 16 + g + 8 * e;
    row_i[e] = (r0 + rr) / grp;
    slope[e] = (p.alibi && rr < blk.rows) ? p.alibi[b * p.alibi_b + kvh * grp + (r0 + rr) % grp] : 0.f;
  }
  const bool capped = p.softcap > 0;
  const float cap = static_cast<float>(p.softcap), inv_cap = capped ? static_cast<float>(1.0 / p.softcap) : 0.f;
  const int64_t offset = blk.s.sk - blk.s.sq;

  const uint32_t sQ = tc::smem_u32(smem);
  const uint32_t sKV = sQ + C::kQBytes;
  const tc::LdsmLane<HD> la(tc::ldsm_rows16_row(lane), tc::ldsm_rows16_chunk(lane));
  const tc::LdsmLane<HD> lb(tc::ldsm_rows8x2_row(lane), tc::ldsm_rows8x2_chunk(lane));
  const Elem* kbase = static_cast<const Elem*>(p.k);
  const Elem* vbase = static_cast<const Elem*>(p.v);

  float o[C::kNO][4];
#pragma unroll
  for (int j = 0; j < C::kNO; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};

  const int n_tiles = static_cast<int>(cdiv(blk.s1 - blk.s0, C::kTk));
  if (n_tiles > 0) {
    auto load_kv = [&](int tile, int stage) {
      const int64_t k0 = blk.s0 + static_cast<int64_t>(tile) * C::kTk;
      const uint32_t sk = sKV + stage * 2 * C::kKVBytes;
      load_kv_async<Elem, HD, C::kTk, C::kThreads>(sk, p, kbase, p.k_st, b, kvh, blk.s.k_off, k0, blk.s1, d, tid);
      load_kv_async<Elem, HD, C::kTk, C::kThreads>(sk + C::kKVBytes, p, vbase, p.v_st, b, kvh, blk.s.k_off, k0,
                                                   blk.s1, d, tid);
    };
    // Q: tile row r is position (r0 + r) / G of head kvh * G + (r0 + r) % G; rows past the group's and
    // columns >= d are zero-filled.
    {
      const Elem* qbase = static_cast<const Elem*>(p.q);
      for (int idx = tid; idx < C::kM * (HD / 8); idx += C::kThreads) {
        const int r = idx / (HD / 8), c = idx % (HD / 8);
        const bool ok = r < blk.rows && c * 8 < d;
        const Elem* src = qbase;
        if (ok) src = qbase + p.q_st.at(b, kvh * grp + (r0 + r) % grp, blk.s.q_off + (r0 + r) / grp) + c * 8;
        tc::cp_async16(sQ + tc::Swz<HD>::offset(r, c), src, ok);
      }
    }
    tc::cp_async_commit();
    load_kv(0, 0);
    tc::cp_async_commit();
    tc::cp_async_wait<1>();
    __syncthreads();

    uint32_t qf[C::kQInRegs ? C::kKQ : 1][4];
    if constexpr (C::kQInRegs) {
#pragma unroll
      for (int ks = 0; ks < C::kKQ; ++ks) tc::ldsm_x4(sQ + la(wm * 16, 2 * ks), qf[ks]);
    }
    const float sl2 = static_cast<float>(p.scale * 1.4426950408889634);  // scale * log2(e)
    const float sc = static_cast<float>(p.scale);
    constexpr float kL2e = 1.4426950408889634f;
    // Tiles that need per-element checks: the split's or sequence's end inside the tile, or the band.
    const int64_t i_lo = r0 / grp, i_hi = (r0 + blk.rows - 1) / grp + 1;

    int stage = 0;
    for (int tile = 0; tile < n_tiles; ++tile) {
      const bool has_next = tile + 1 < n_tiles;
      if (has_next) {
        load_kv(tile + 1, stage ^ 1);
        tc::cp_async_commit();
        tc::cp_async_wait<1>();
      } else {
        tc::cp_async_wait<0>();
      }
      __syncthreads();

      const int64_t k0 = blk.s0 + static_cast<int64_t>(tile) * C::kTk;
      const int kw0 = wk * C::kKeysW;  // first key of this warp's slice, within the tile
      const bool need_mask = k0 + C::kTk > blk.s1 || !band.tile_full(i_lo, i_hi, k0, k0 + C::kTk);
      const uint32_t sK = sKV + stage * 2 * C::kKVBytes;
      const uint32_t sV = sK + C::kKVBytes;

      float s[C::kNS][4];
#pragma unroll
      for (int jn = 0; jn < C::kNS; ++jn) s[jn][0] = s[jn][1] = s[jn][2] = s[jn][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < C::kKQ; ++ks) {
        uint32_t qa[4];
        if constexpr (C::kQInRegs) {
          qa[0] = qf[ks][0];
          qa[1] = qf[ks][1];
          qa[2] = qf[ks][2];
          qa[3] = qf[ks][3];
        } else {
          tc::ldsm_x4(sQ + la(wm * 16, 2 * ks), qa);
        }
#pragma unroll
        for (int np = 0; np < C::kKeysW / 16; ++np) {
          uint32_t kb[4];
          tc::ldsm_x4(sK + lb(kw0 + np * 16, 2 * ks), kb);
          tc::mma16816<Elem>(s[2 * np], qa, kb[0], kb[1]);
          tc::mma16816<Elem>(s[2 * np + 1], qa, kb[2], kb[3]);
        }
      }

      // Scores to the log2 domain with the modifiers (mask.h's ScoreMod), then the rule.
#pragma unroll
      for (int jn = 0; jn < C::kNS; ++jn) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int er = e >> 1;
          const int64_t j = k0 + kw0 + jn * 8 + 2 * t + (e & 1);
          float x = s[jn][e];
          if (capped) {
            x = cap * tanhf(x * sc * inv_cap) * kL2e;
          } else {
            x *= sl2;
          }
          if (slope[er] != 0.f) {
            const int64_t dist = row_i[er] + offset - j;
            x -= kL2e * slope[er] * static_cast<float>(dist < 0 ? -dist : dist);
          }
          if (need_mask && !(j < blk.s1 && band.visible(row_i[er], j))) x = -INFINITY;
          s[jn][e] = x;
        }
      }

      // Online softmax, rows g (r = 0) and g + 8 (r = 1).
      float mx[2] = {m[0], m[1]};
#pragma unroll
      for (int jn = 0; jn < C::kNS; ++jn) {
        mx[0] = fmaxf(mx[0], fmaxf(s[jn][0], s[jn][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[jn][2], s[jn][3]));
      }
      float mu[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = tc::quad_max(mx[r]);
        mu[r] = mx[r] == -INFINITY ? 0.f : mx[r];
        const float alpha = tc::fast_exp2(m[r] - mu[r]);
        m[r] = mx[r];
        l[r] *= alpha;
#pragma unroll
        for (int jn = 0; jn < C::kNO; ++jn) {
          o[jn][2 * r] *= alpha;
          o[jn][2 * r + 1] *= alpha;
        }
      }
#pragma unroll
      for (int jn = 0; jn < C::kNS; ++jn) {
        s[jn][0] = tc::fast_exp2(s[jn][0] - mu[0]);
        s[jn][1] = tc::fast_exp2(s[jn][1] - mu[0]);
        s[jn][2] = tc::fast_exp2(s[jn][2] - mu[1]);
        s[jn][3] = tc::fast_exp2(s[jn][3] - mu[1]);
        l[0] += s[jn][0] + s[jn][1];
        l[1] += s[jn][2] + s[jn][3];
      }

      // O += P V over this warp's keys.
#pragma unroll
      for (int kk = 0; kk < C::kKP; ++kk) {
        uint32_t pa[4];
        pa[0] = tc::pack2<Elem>(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = tc::pack2<Elem>(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = tc::pack2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = tc::pack2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t vb[4];
          tc::ldsm_x4_trans(sV + la(kw0 + kk * 16, 2 * dp), vb);
          tc::mma16816<Elem>(o[2 * dp], pa, vb[0], vb[1]);
          tc::mma16816<Elem>(o[2 * dp + 1], pa, vb[2], vb[3]);
        }
      }
      __syncthreads();  // every warp is done with this stage before the next iteration refills it
      stage ^= 1;
    }
  }

  // Merge the key slices of each row (fixed order of wk), normalise, write.
#pragma unroll
  for (int r = 0; r < 2; ++r) l[r] = tc::quad_sum(l[r]);
  const int trow0 = wm * 16 + g;  // tile rows trow0 (r = 0) and trow0 + 8 (r = 1)
  if (t == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      part_m[wk * C::kM + trow0 + 8 * r] = m[r];
      part_l[wk * C::kM + trow0 + 8 * r] = l[r];
    }
  }
  __syncthreads();
  if (tid < C::kM) {
    float mm = -INFINITY, ll = 0.f;
    for (int w = 0; w < C::kKW; ++w) mm = fmaxf(mm, part_m[w * C::kM + tid]);
    for (int w = 0; w < C::kKW; ++w)
      if (part_l[w * C::kM + tid] != 0.f) ll += part_l[w * C::kM + tid] * tc::fast_exp2(part_m[w * C::kM + tid] - mm);
    row_m[tid] = mm;
    row_l[tid] = ll;
  }
  __syncthreads();
  // This warp's O rows scaled to the merged max, into the fp32 buffer [wk][tile row][HD] (the K / V stages
  // are free: the loop ended with a barrier).
  float* obuf = reinterpret_cast<float*>(smem + C::kQBytes);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int tr = trow0 + 8 * r;
    const float f = l[r] != 0.f ? tc::fast_exp2(m[r] - row_m[tr]) : 0.f;  // a NaN sum (NaN score) carries on
    float* dst = obuf + (wk * C::kM + tr) * C::kObLd;
#pragma unroll
    for (int jn = 0; jn < C::kNO; ++jn)
      *reinterpret_cast<float2*>(dst + jn * 8 + 2 * t) = make_float2(o[jn][2 * r] * f, o[jn][2 * r + 1] * f);
  }
  __syncthreads();

  const bool direct = p.num_splits <= 1;
  for (int idx = tid; idx < C::kM * (HD / 2); idx += C::kThreads) {
    const int tr = idx / (HD / 2), col = 2 * (idx % (HD / 2));
    if (tr >= blk.rows || col >= d) continue;
    float a0 = 0.f, a1 = 0.f;
    for (int w = 0; w < C::kKW; ++w) {
      const float2 v = *reinterpret_cast<const float2*>(obuf + (w * C::kM + tr) * C::kObLd + col);
      a0 += v.x;
      a1 += v.y;
    }
    const float ll = row_l[tr];
    const float inv = ll == 0.f ? 0.f : 1.f / ll;  // NaN: a NaN row
    const int64_t i = (r0 + tr) / grp, h = kvh * grp + (r0 + tr) % grp;
    const int64_t qi = blk.s.q_off + i;
    if (direct) {
      Elem* orow = static_cast<Elem*>(p.o) + p.o_st.at(b, h, qi);
      *reinterpret_cast<uint32_t*>(orow + col) = tc::pack2<Elem>(a0 * inv, a1 * inv);
    } else {
      float* prow = static_cast<float*>(p.o_part) + decode_part_row(p, blk.split, b, h, i) * p.d;
      *reinterpret_cast<float2*>(prow + col) = make_float2(a0 * inv, a1 * inv);
    }
  }
  if (tid < blk.rows) {
    const float ll = row_l[tid];
    const float lse = ll == 0.f ? -INFINITY : row_m[tid] * 0.6931471805599453f + logf(ll);
    const int64_t i = (r0 + tid) / grp, h = kvh * grp + (r0 + tid) % grp;
    if (direct)
      static_cast<float*>(p.lse)[b * p.lse_b + h * p.lse_h + blk.s.q_off + i] = lse;
    else
      static_cast<float*>(p.lse_part)[decode_part_row(p, blk.split, b, h, i)] = lse;
  }
}

template <typename Elem, int HD, int WM>
void launch_decode(const AttnParams& p, cudaStream_t stream) {
  using C = DecCfg<HD, WM>;
  const std::string where = "fused_attn decode (head dim " + std::to_string(HD) + "): ";
  const int64_t nrt = cdiv(p.group() * p.sq, C::kM);
  const int64_t nx = nrt * p.num_splits;
  if (nx > INT_MAX || p.hk > 65535 || p.batch > 65535)
    throw std::invalid_argument(where + "grid too large: " + std::to_string(nx) + " (row tiles x splits) x " +
                                std::to_string(p.hk) + " kv heads x " + std::to_string(p.batch) +
                                " batch (at most 65535 kv heads and 65535 batch)");
  auto kernel = tc_decode_kernel<Elem, HD, WM>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess)
    throw std::runtime_error(where + "cannot get " + std::to_string(C::kSmem) + " bytes of shared memory per block: " +
                             cudaGetErrorString(err));
  const dim3 grid(static_cast<unsigned>(nx), static_cast<unsigned>(p.hk), static_cast<unsigned>(p.batch));
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(p, nrt);
  err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(where + "launch failed: " + cudaGetErrorString(err));
}

}  // namespace dec

// The split kernel, then (more than one split) the combine kernel. Needs p.num_splits >= 1 and, for more
// than one, the workspace p.o_part / p.lse_part (decode.h).
template <typename Elem, int HD>
void tc_decode_run(const AttnParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.hq == 0 || p.sq == 0) return;
  if (p.d <= 0 || p.d > HD || p.d % 8 != 0)
    throw std::invalid_argument("fused_attn decode: head dim d=" + std::to_string(p.d) +
                                " must be a positive multiple of 8 and at most " + std::to_string(HD));
  if (p.num_splits < 1 || (p.num_splits > 1 && (!p.o_part || !p.lse_part)))
    throw std::invalid_argument("fused_attn decode: num_splits=" + std::to_string(p.num_splits) +
                                " needs num_splits >= 1 and, above 1, the o_part / lse_part workspace");
  // More than 16 rows: 64-row tiles, except above HD = 128, where WM = 4 spilled (88 bytes at HD = 256) and
  // 16-row tiles read each K / V tile once per 16 rows instead (from L2 after the first).
  if constexpr (HD <= 128) {
    if (p.group() * p.sq > 16) {
      dec::launch_decode<Elem, HD, 4>(p, stream);
    } else {
      dec::launch_decode<Elem, HD, 1>(p, stream);
    }
  } else {
    dec::launch_decode<Elem, HD, 1>(p, stream);
  }
  if (p.num_splits > 1) decode_combine(p, std::is_same<Elem, __half>::value ? DType::f16 : DType::bf16, stream);
}

}  // namespace fused_attn
