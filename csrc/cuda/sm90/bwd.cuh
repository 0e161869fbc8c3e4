// Backward pass of fp16/bf16 attention for Hopper (sm_90a): warp-specialised, TMA-fed, wgmma-computed.
//
//   1. delta = rowsum(dO * O) - dlse: the mma.sync family's delta_kernel (bwd_kernel.cuh), shared.
//   2. dkdv_kernel: one block of 384 threads per (key tile of TK keys, kv head, batch).
//      warpgroup 0 (producer): TMA loads K and V of the tile once, then for every (query head of the GQA
//        group, query tile of QueryTiles) item the Q and dO tiles (64 rows) into a 2-stage ring; its first
//        warp also copies the item's 64 lse (log2 units, +inf where no key is seen) and delta values into
//        the stage (st.shared, read with ld.shared by every consumer thread). full[s]: 1 arrive.expect_tx +
//        32 lanes; empty[s]: one arrival per consumer thread (256), after its last read of the stage.
//      warpgroups 1, 2 (consumers): warpgroup c owns keys 64 (c % KG) .. + 63 of the tile and columns
//        [HDP (c / KG), + HDP) of dK and dV, KG = TK / 64 key groups, HDP = HD / (2 / KG). Per item:
//          S^T = K_c Q^T, dP^T = V_c dO^T   wgmma m64n64k16, A (keys) and B (queries) from shared memory
//          P^T = 2^(S^T scale log2 e - lse), dS^T = P^T (dP^T - delta)   (mask.h's rule where needed;
//                                            kMod: softcap / ALiBi through score_mod.cuh, dS^T times g)
//          dV += P^T dO, dK += dS^T Q        wgmma m64n{HDP}k16, A = P^T / dS^T from registers (the
//                                            accumulator layout of S^T is the A fragment layout), B N-major
//          dQ += dS K (non-deterministic)    dS^T goes to the warpgroup's own shared tile; wgmma with A =
//                                            dS (M-major from that tile), B = K (N-major), then fp32 atomics
//                                            into dq_accum: KG = 2 splits dQ's K (keys) between the
//                                            warpgroups, KG = 1 its N (columns).
//        Epilogue: dK * scale and dV through the K / V tiles and TMA stores (a packed batch: plain stores
//        of the sequence's keys, see common.cuh store_rows).
//   3. dq_convert_kernel (bwd_kernel.cuh): dq = dq_accum in Elem. Deterministic mode: dq_kernel instead, one
//      block of 256 threads (producer + one consumer warpgroup) per (64-row query tile, query head, batch)
//      over KeyTiles, dQ in registers, no atomics: bit-identical from run to run.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../../mask.h"
#include "../bwd_kernel.cuh"
#include "../score_mod.cuh"
#include "common.cuh"
#include "fwd.cuh"
#include "tiles.h"
#include "wgmma.cuh"

namespace fused_attn {
namespace sm90 {

struct BwdParams {
  CUtensorMap tq, tk, tv, tdo, tdk, tdv;
  AttnParams p;
};

template <int HD>
struct BwdCfg {
  static constexpr int TQ = sm90_tiles(HD).bwd_tq;  // 64 query rows per item
  static constexpr int TK = sm90_tiles(HD).bwd_tk;  // keys per block
  static constexpr int KG = TK / 64;                // key groups (consumer warpgroups with distinct keys)
  static constexpr int DS = 2 / KG;                 // head-dim splits of dK / dV
  static constexpr int HDP = HD / DS;               // dK / dV columns per consumer warpgroup
  static constexpr int NQ = KG == 2 ? HD : HD / 2;  // dQ columns per consumer warpgroup
  static constexpr int kStages = 2;
  static constexpr int kThreads = 384;
  static_assert(TQ == 64 && (KG == 1 || KG == 2) && HD % 64 == 0 && HDP % 64 == 0 && NQ % 64 == 0, "tiles");
  static constexpr uint32_t kKVBytes = TK * HD * 2;  // K or V tile
  static constexpr uint32_t kQBytes = TQ * HD * 2;   // Q or dO tile
  static constexpr uint32_t kDsBytes = 64 * TQ * 2;  // one warpgroup's dS^T (64 keys x 64 queries)
  static constexpr uint32_t kOffV = kKVBytes;
  static constexpr uint32_t kOffQ = 2 * kKVBytes;                  // stage s: Q at + 2 s kQBytes, dO after it
  static constexpr uint32_t kOffDs = kOffQ + kStages * 2 * kQBytes;  // consumer c: + c kDsBytes
  static constexpr uint32_t kOffVec = kOffDs + 2 * kDsBytes;         // stage s: lse[64], delta[64] floats
  static constexpr uint32_t kOffBar = kOffVec + kStages * 2 * TQ * 4;
  static constexpr int kNumBars = 1 + 2 * kStages;  // K/V, full, empty
  static constexpr int kSmem = kOffBar + 8 * kNumBars + 1024;
  static_assert(kSmem <= 232448, "shared memory");
  // Named barriers: 5, 6 = consumer warpgroup c's dS^T tile is written; 7 = both consumers are done with
  // K and V (epilogue).
  static constexpr int kBarDs = 5, kBarEpi = 7;
};

__device__ __forceinline__ float lse_log2(float lse) {
  return lse == -INFINITY ? INFINITY : lse * 1.4426950408889634f;  // a row that sees nothing: P = 0
}

// kMod: softcap / ALiBi on (score_mod.cuh; dS takes the cap's derivative g).
template <typename Elem, int HD, bool kMod>
__global__ void __launch_bounds__(BwdCfg<HD>::kThreads, 1) dkdv_kernel(const __grid_constant__ BwdParams prm) {
  using C = BwdCfg<HD>;
  using KT = Sw128Tile<C::TK>;
  using QT = Sw128Tile<C::TQ>;
  using ST = Sw128Tile<64>;  // dS^T: 64 keys x 64 queries, one column block
  const AttnParams& p = prm.p;
  extern __shared__ __align__(1024) char smem[];
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sK = base, sV = base + C::kOffV, sBar = base + C::kOffBar;
  const uint32_t barKV = sBar;
  auto full = [&](int s) { return sBar + 8 * (1 + s); };
  auto empty = [&](int s) { return sBar + 8 * (1 + C::kStages + s); };
  auto sQ = [&](int s) { return base + C::kOffQ + s * 2 * C::kQBytes; };
  auto sdO = [&](int s) { return base + C::kOffQ + s * 2 * C::kQBytes + C::kQBytes; };
  auto vec = [&](int s) { return base + C::kOffVec + s * 2 * C::TQ * 4; };  // lse[TQ], then delta[TQ]

  const int tid = threadIdx.x;
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);  // warp-uniform (see fwd.cuh)
  const int64_t kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int64_t k0 = kt * C::TK;
  const int group = static_cast<int>(p.hq) / static_cast<int>(p.hk);
  const int64_t h0 = hk * group;
  // Packed batch: the grid covers max_seqlen_k; a key tile past this sequence's keys leaves at once.
  if (k0 >= p.seq(b).sk) return;

  if (tid == 0) {
    mbar_init(barKV, 1);
    for (int s = 0; s < C::kStages; ++s) {
      mbar_init(full(s), 1 + 32);  // the producer's expect_tx + its warp's 32 lse / delta writers
      // Every consumer thread arrives: the lse / delta vector is read with ordinary loads by all 256, and an
      // arrival of one thread per warpgroup would not order the other warps' reads before the producer's
      // next writes (compute-sanitizer racecheck on an H100 reported exactly that).
      mbar_init(empty(s), 2 * 128);
    }
    fence_mbar_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------------------------------------------------------------------------- producer
    setmaxnreg_dec<24>();
    if (tid < 32) {
      // Tensor-map coordinates of sequence b (packed: one batch of total rows, common.cuh map_rows).
      const SeqInfo si = p.seq(b);
      const int tb = map_batch(p, b);
      if (tid == 0) {
        mbar_arrive_expect_tx(barKV, 2 * C::kKVBytes);
#pragma unroll
        for (int cb = 0; cb < HD / 64; ++cb) {
          tma_load_4d(sK + cb * KT::kBlockBytes, &prm.tk, barKV, cb * 64, static_cast<int>(si.k_off + k0),
                      static_cast<int>(hk), tb);
          tma_load_4d(sV + cb * KT::kBlockBytes, &prm.tv, barKV, cb * 64, static_cast<int>(si.k_off + k0),
                      static_cast<int>(hk), tb);
        }
      }
      int gi = 0, idx = 0, it = 0;
      TileVisit cur{-1, false};
      while (bwd::next_query_item<C::TQ, C::TK>(SeqView<false>(p, b), h0, group, kt, gi, idx, cur)) {
        const int s = it % C::kStages;
        const uint32_t ph = (it / C::kStages) & 1;
        const int64_t h = h0 + gi;
        const int64_t q0 = cur.tile * C::TQ;
        mbar_wait(empty(s), ph ^ 1);
        if (tid == 0) {
          mbar_arrive_expect_tx(full(s), 2 * C::kQBytes);
#pragma unroll
          for (int cb = 0; cb < HD / 64; ++cb) {
            tma_load_4d(sQ(s) + cb * QT::kBlockBytes, &prm.tq, full(s), cb * 64, static_cast<int>(si.q_off + q0),
                        static_cast<int>(h), tb);
            tma_load_4d(sdO(s) + cb * QT::kBlockBytes, &prm.tdo, full(s), cb * 64, static_cast<int>(si.q_off + q0),
                        static_cast<int>(h), tb);
          }
        }
        // lse (log2 units) and delta of the item's 64 rows, 2 per lane; rows past Sq_b: P = 0, delta = 0
        // (in a packed batch they are the next sequence's rows).
        const uint32_t v = vec(s) + 4 * tid;  // row tid + 32 i at v + 128 i
#pragma unroll
        for (int i = 0; i < C::TQ / 32; ++i) {
          const int64_t row = q0 + tid + 32 * i;
          const int64_t off = b * p.lse_b + h * p.lse_h + si.q_off + row;
          st_shared_f32(v + 128 * i, row < si.sq ? lse_log2(static_cast<const float*>(p.lse)[off]) : INFINITY);
          st_shared_f32(v + 4 * C::TQ + 128 * i, row < si.sq ? static_cast<const float*>(p.delta)[off] : 0.f);
        }
        mbar_arrive(full(s));
        ++it;
        ++idx;
      }
    }
    return;
  }

  // ------------------------------------------------------------------------------------ consumers
  setmaxnreg_inc<240>();
  const int c = wg - 1;
  const int kg = c % C::KG, dp = c / C::KG;
  const int ti = tid % 128, wi = ti / 32, lane = ti % 32, g = lane / 4, t = lane % 4;
  const float scale = static_cast<float>(p.scale);
  const float sl2 = static_cast<float>(p.scale * 1.4426950408889634);
  const bool atomic_dq = !p.deterministic;
  const uint32_t sDs = base + C::kOffDs + c * C::kDsBytes;
  // This thread's keys: k0 + 64 kg + 16 wi + g (+ 8).
  const int64_t key0 = k0 + 64 * kg + 16 * wi + g;

  float dv[C::HDP / 2], dk[C::HDP / 2];
#pragma unroll
  for (int i = 0; i < C::HDP / 2; ++i) dv[i] = dk[i] = 0.f;

  mbar_wait(barKV, 0);
  int gi = 0, idx = 0, it = 0;
  TileVisit cur{-1, false};
  while (bwd::next_query_item<C::TQ, C::TK>(SeqView<false>(p, b), h0, group, kt, gi, idx, cur)) {
    const int s = it % C::kStages;
    const uint32_t ph = (it / C::kStages) & 1;
    const int64_t h = h0 + gi;
    const int64_t q0 = cur.tile * C::TQ;
    const tc::ModFrag mod(p, b, h, p.seq(b));  // kMod only

    // Visibility of this thread's 32 scores (bit 4 j + 2 i + e: key key0 + 8 i, query q0 + 8 j + 2 t + e),
    // while the item is still in flight.
    uint32_t vis = 0xffffffffu;
    if (tile_needs_mask(p, cur, b, q0, q0 + C::TQ, k0, k0 + C::TK)) {
      vis = 0;
#pragma unroll 1
      for (int x = 0; x < 32; ++x)
        if (element_visible(p, cur, b, h, q0 + 8 * (x >> 2) + 2 * t + (x & 1), key0 + 8 * ((x >> 1) & 1)))
          vis |= 1u << x;
    }

    mbar_wait(full(s), ph);
    const uint32_t bk = opaque_u32(base);
    float st[32], dpt[32];
    fence_regs(st);
    fence_regs(dpt);
    wgmma_fence();
    {
      const uint64_t dK = KT::kmajor_base(bk), dV = KT::kmajor_base(bk + C::kOffV);
      const uint64_t dQ = QT::kmajor_base(bk + C::kOffQ + s * 2 * C::kQBytes), dO = dQ + (C::kQBytes >> 4);
#pragma unroll
      for (int ks = 0; ks < HD / 16; ++ks)
        wgmma_ss<64, Elem, 0, 0>(st, KT::kmajor(dK, 64 * kg, ks), QT::kmajor(dQ, 0, ks), ks > 0);
#pragma unroll
      for (int ks = 0; ks < HD / 16; ++ks)
        wgmma_ss<64, Elem, 0, 0>(dpt, KT::kmajor(dV, 64 * kg, ks), QT::kmajor(dO, 0, ks), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(st);
    fence_regs(dpt);

    // P^T and dS^T (accumulator (j, i, e): key key0 + 8 i, query column 8 j + 2 t + e), as A fragments:
    // k-step kk covers queries 16 kk .. 16 kk + 15 = accumulator columns j = 2 kk, 2 kk + 1.
    const uint32_t v = vec(s);
    // kMod: ALiBi distance (query + Sk - Sq - key) of the thread's first score of the item.
    const float d0 = kMod ? mod.dist(q0 + 2 * t, key0) : 0.f;
    uint32_t pa[4][4], da[4][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 lse2 = ld_shared_f32x2(v + 4 * (8 * j + 2 * t));
      const float2 del2 = ld_shared_f32x2(v + 4 * (C::TQ + 8 * j + 2 * t));
      float pr[4], ds[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const float l2 = (x & 1) ? lse2.y : lse2.x;
        const float dl = (x & 1) ? del2.y : del2.x;
        float gcap = 1.f, sx;
        if constexpr (kMod)  // element 4 j + x: key + 8 (x / 2), query + 8 j + x % 2
          sx = mod.score(st[4 * j + x], d0 + static_cast<float>(8 * j + (x & 1) - 8 * (x >> 1)), gcap);
        else
          sx = st[4 * j + x] * sl2;
        const float pv = tc::fast_exp2(sx - l2);
        pr[x] = (vis >> (4 * j + x)) & 1u ? pv : 0.f;
        ds[x] = pr[x] * (dpt[4 * j + x] - dl);
        if constexpr (kMod) ds[x] *= gcap;
      }
      pa[j >> 1][2 * (j & 1)] = tc::pack2<Elem>(pr[0], pr[1]);
      pa[j >> 1][2 * (j & 1) + 1] = tc::pack2<Elem>(pr[2], pr[3]);
      da[j >> 1][2 * (j & 1)] = tc::pack2<Elem>(ds[0], ds[1]);
      da[j >> 1][2 * (j & 1) + 1] = tc::pack2<Elem>(ds[2], ds[3]);
    }

    if (atomic_dq) {
      // dS^T to this warpgroup's tile (row = key 16 wi + g (+ 8), column = query), for dQ = dS K below.
      const int r = 16 * wi + g;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        st_shared_u32(sDs + ST::offset(r, 16 * kk + 2 * t), da[kk][0]);
        st_shared_u32(sDs + ST::offset(r + 8, 16 * kk + 2 * t), da[kk][1]);
        st_shared_u32(sDs + ST::offset(r, 16 * kk + 8 + 2 * t), da[kk][2]);
        st_shared_u32(sDs + ST::offset(r + 8, 16 * kk + 8 + 2 * t), da[kk][3]);
      }
      fence_proxy_async();
    }

    fence_regs(dv);
    fence_regs(dk);
    fence_regs(pa);
    fence_regs(da);
    wgmma_fence();
    {
      const uint64_t dQn = QT::mnmajor_base(bk + C::kOffQ + s * 2 * C::kQBytes), dOn = dQn + (C::kQBytes >> 4);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_rs<C::HDP, Elem, 1>(dv, pa[kk], QT::mnmajor(dOn, 16 * kk, dp * C::HDP / 64), 1);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_rs<C::HDP, Elem, 1>(dk, da[kk], QT::mnmajor(dQn, 16 * kk, dp * C::HDP / 64), 1);
    }
    wgmma_commit();

    // dV and dK retire before dQ is issued: P^T and dS^T fragments stay live until then, and the dQ
    // accumulators on top of them would exceed the 240 registers (ptxas then serialises the wgmmas, C7512).
    wgmma_wait<0>();
    fence_regs(dv);
    fence_regs(dk);
    if (atomic_dq) {
      named_sync(C::kBarDs + c, 128);  // the whole dS^T tile is written (and fenced)
      float dq[C::NQ / 2];
      fence_regs(dq);
      wgmma_fence();
      const uint64_t dS = ST::mnmajor_base(opaque_u32(sDs));
      const uint64_t dKn = KT::mnmajor_base(opaque_u32(base));
      // Keys of this warpgroup (KG = 2) or all 64 (KG = 1); columns [cq, cq + NQ).
      const int cq = C::KG == 2 ? 0 : dp * C::NQ;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        wgmma_ss<C::NQ, Elem, 1, 1>(dq, ST::mnmajor(dS, 16 * kk), KT::mnmajor(dKn, 64 * kg + 16 * kk, cq / 64), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(dq);
      // dq_accum += scale * dQ: accumulator (j, i, e) = row q0 + 16 wi + g + 8 i, column cq + 8 j + 2 t + e
      // (packed batch: dqa_b = 0, row q_off + i).
      const SeqInfo si = p.seq(opaque_u32(static_cast<uint32_t>(b)));  // read here, not hoisted (see the epilogue)
      float* dqa = p.dq_accum + b * p.dqa_b + h * p.dqa_h + si.q_off * p.dqa_s;
#pragma unroll
      for (int j = 0; j < C::NQ / 8; ++j) {
        const int col = cq + 8 * j + 2 * t;
        if (col < p.d) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int64_t row = q0 + 16 * wi + g + 8 * i;
            if (row < si.sq) tc::red_add_f32x2(dqa + row * p.dqa_s + col, dq[4 * j + 2 * i] * scale, dq[4 * j + 2 * i + 1] * scale);
          }
        }
      }
    }
    mbar_arrive(empty(s));  // every consumer thread, after its last read of stage s (see mbar_init)
    ++it;
    ++idx;
  }

  // Epilogue: dK * scale and dV into the K and V tiles once both consumers are done reading them, then
  // this warpgroup's part goes out by TMA (keys past Sk, columns past d are dropped by the tensor map), or,
  // for a packed batch, by plain stores of the keys < Sk_b (the keys after them are the next sequence's).
  named_sync(C::kBarEpi, 256);
  {
    const int r = 64 * kg + 16 * wi + g;
#pragma unroll
    for (int j = 0; j < C::HDP / 8; ++j) {
      const int col = dp * C::HDP + 8 * j + 2 * t;
      st_shared_u32(sK + KT::offset(r, col), tc::pack2<Elem>(dk[4 * j] * scale, dk[4 * j + 1] * scale));
      st_shared_u32(sK + KT::offset(r + 8, col), tc::pack2<Elem>(dk[4 * j + 2] * scale, dk[4 * j + 3] * scale));
      st_shared_u32(sV + KT::offset(r, col), tc::pack2<Elem>(dv[4 * j], dv[4 * j + 1]));
      st_shared_u32(sV + KT::offset(r + 8, col), tc::pack2<Elem>(dv[4 * j + 2], dv[4 * j + 3]));
    }
  }
  fence_proxy_async();
  named_sync(C::kBarDs + c, 128);
  if (p.varlen()) {
    // Packed batch: keys < Sk_b by plain stores (a box would also cover the next sequence's first keys).
    // Sequence b and the thread's place come from opaque copies of b and the thread index: otherwise the
    // compiler hoists the cu_seqlens loads and the address arithmetic into the main loop, where their
    // registers made the kMod kernels spill (and so did a TMA store of the tiles wholly inside the sequence).
    const uint32_t tid_o = opaque_u32(static_cast<uint32_t>(tid));
    const int co = static_cast<int>(tid_o / 128) - 1, kgo = co % C::KG, dpo = co / C::KG, tio = tid_o % 128;
    const SeqInfo si = p.seq(opaque_u32(static_cast<uint32_t>(b)));
    const int64_t w0 = k0 + 64 * kgo;  // the warpgroup's first key within the sequence
    store_rows<KT, 64, C::HDP, 128>(sK, 64 * kgo, dpo * C::HDP, static_cast<Elem*>(p.dk) + p.dk_st.at(0, hk, si.k_off + w0),
                                    p.dk_st.s, si.sk - w0, p.d, tio);
    store_rows<KT, 64, C::HDP, 128>(sV, 64 * kgo, dpo * C::HDP, static_cast<Elem*>(p.dv) + p.dv_st.at(0, hk, si.k_off + w0),
                                    p.dv_st.s, si.sk - w0, p.d, tio);
  } else if (ti == 0) {
#pragma unroll
    for (int cb = dp * C::HDP / 64; cb < (dp + 1) * C::HDP / 64; ++cb) {
      const uint32_t off = cb * KT::kBlockBytes + 64 * kg * 128;
      tma_store_4d(&prm.tdk, sK + off, cb * 64, static_cast<int>(k0 + 64 * kg), static_cast<int>(hk),
                   static_cast<int>(b));
      tma_store_4d(&prm.tdv, sV + off, cb * 64, static_cast<int>(k0 + 64 * kg), static_cast<int>(hk),
                   static_cast<int>(b));
    }
    bulk_commit();
    bulk_wait_read<0>();
  }
}

// ------------------------------------------------------------------------------------------------
// Deterministic dQ: one consumer warpgroup (64 query rows) per block, over the key tiles of KeyTiles.

template <int HD>
struct DqCfg {
  static constexpr int TQ = sm90_tiles(HD).bwd_tq;
  static constexpr int TK = sm90_tiles(HD).bwd_tk;
  static constexpr int kStages = 2;
  static constexpr int kThreads = 256;
  static constexpr uint32_t kQBytes = TQ * HD * 2;
  static constexpr uint32_t kKVBytes = TK * HD * 2;
  static constexpr uint32_t kOffDo = kQBytes;
  static constexpr uint32_t kOffK = 2 * kQBytes;                // stage s: K at + 2 s kKVBytes, V after it
  static constexpr uint32_t kOffBar = kOffK + kStages * 2 * kKVBytes;
  static constexpr int kNumBars = 1 + 2 * kStages;  // Q/dO, full, empty
  static constexpr int kSmem = kOffBar + 8 * kNumBars + 1024;
  static_assert(kSmem <= 232448, "shared memory");
};

template <typename Elem, int HD, bool kMod>
__global__ void __launch_bounds__(DqCfg<HD>::kThreads, 1) dq_kernel(const __grid_constant__ BwdParams prm) {
  using C = DqCfg<HD>;
  using QT = Sw128Tile<C::TQ>;
  using KT = Sw128Tile<C::TK>;
  const AttnParams& p = prm.p;
  extern __shared__ __align__(1024) char smem[];
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sQ = base, sdO = base + C::kOffDo, sBar = base + C::kOffBar;
  const uint32_t barQ = sBar;
  auto full = [&](int s) { return sBar + 8 * (1 + s); };
  auto empty = [&](int s) { return sBar + 8 * (1 + C::kStages + s); };
  auto sK = [&](int s) { return base + C::kOffK + s * 2 * C::kKVBytes; };

  const int tid = threadIdx.x;
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int64_t qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / p.group();
  const int64_t q0 = qt * C::TQ;
  const SeqInfo si = p.seq(b);
  if (q0 >= si.sq) return;  // packed batch: a query tile past this sequence's rows
  const int tb = map_batch(p, b);
  const KeyTiles kts(p, b, h, qt, C::TQ, C::TK);
  const int n = static_cast<int>(kts.count());

  if (tid == 0) {
    mbar_init(barQ, 1);
    for (int s = 0; s < C::kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 1);
    }
    fence_mbar_init();
  }
  __syncthreads();

  // No setmaxnreg here: 256 threads leave up to 255 registers per thread at launch.
  if (wg == 0) {
    if (tid == 0) {
      int tile = -1;
      bool partial = false;
      int it = 0;
      for (int i = next_visible(kts, 0, n, tile, partial); i < n; i = next_visible(kts, i + 1, n, tile, partial)) {
        if (it == 0) {
          mbar_arrive_expect_tx(barQ, 2 * C::kQBytes);
#pragma unroll
          for (int cb = 0; cb < HD / 64; ++cb) {
            tma_load_4d(sQ + cb * QT::kBlockBytes, &prm.tq, barQ, cb * 64, static_cast<int>(si.q_off + q0),
                        static_cast<int>(h), tb);
            tma_load_4d(sdO + cb * QT::kBlockBytes, &prm.tdo, barQ, cb * 64, static_cast<int>(si.q_off + q0),
                        static_cast<int>(h), tb);
          }
        }
        const int s = it % C::kStages;
        mbar_wait(empty(s), ((it / C::kStages) & 1) ^ 1);
        mbar_arrive_expect_tx(full(s), 2 * C::kKVBytes);
#pragma unroll
        for (int cb = 0; cb < HD / 64; ++cb) {
          const int krow = static_cast<int>(si.k_off) + tile * C::TK;
          tma_load_4d(sK(s) + cb * KT::kBlockBytes, &prm.tk, full(s), cb * 64, krow, static_cast<int>(hk), tb);
          tma_load_4d(sK(s) + C::kKVBytes + cb * KT::kBlockBytes, &prm.tv, full(s), cb * 64, krow,
                      static_cast<int>(hk), tb);
        }
        ++it;
      }
    }
    return;
  }

  const int ti = tid % 128, wi = ti / 32, lane = ti % 32, g = lane / 4, t = lane % 4;
  const float scale = static_cast<float>(p.scale);
  const float sl2 = static_cast<float>(p.scale * 1.4426950408889634);
  const tc::ModFrag mod(p, b, h, p.seq(b));  // kMod only
  const int64_t wrow = q0 + 16 * wi;  // this warp's first row; the thread's rows: wrow + g (+ 8)
  float m[2], dd[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = wrow + g + 8 * r;
    m[r] = INFINITY;
    dd[r] = 0.f;
    if (row < si.sq) {
      const int64_t off = b * p.lse_b + h * p.lse_h + si.q_off + row;
      m[r] = lse_log2(static_cast<const float*>(p.lse)[off]);
      dd[r] = static_cast<const float*>(p.delta)[off];
    }
  }
  float dq[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) dq[i] = 0.f;

  int tile = -1;
  bool partial = false;
  int it = 0;
  for (int i = next_visible(kts, 0, n, tile, partial); i < n; i = next_visible(kts, i + 1, n, tile, partial)) {
    const int s = it % C::kStages;
    bool need;
    const uint64_t vis = visible_bits<C::TK>(p, b, h, wrow, g, tile, partial, t, need);
    if (it == 0) mbar_wait(barQ, 0);
    mbar_wait(full(s), (it / C::kStages) & 1);
    const uint32_t bq = opaque_u32(base);
    // S = Q K^T, then P in place; dP = dO V^T; dS = P (dP - delta) as A fragments of dQ += dS K.
    float sc[C::TK / 2];
    fence_regs(sc);
    wgmma_fence();
    {
      const uint64_t dQd = QT::kmajor_base(bq), dKd = KT::kmajor_base(bq + C::kOffK + s * 2 * C::kKVBytes);
#pragma unroll
      for (int ks = 0; ks < HD / 16; ++ks) wgmma_ss<C::TK, Elem, 0, 0>(sc, QT::kmajor(dQd, 0, ks), KT::kmajor(dKd, 0, ks), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(sc);
    // P in place (kMod: P times the cap's derivative g, all dS needs here). Element 4 j + 2 i + e: row
    // + 8 i, key + 8 j + e.
    const float d0 = kMod ? mod.dist(wrow + g, static_cast<int64_t>(tile) * C::TK + 2 * t) : 0.f;
#pragma unroll
    for (int x = 0; x < C::TK / 2; ++x) {
      float gcap = 1.f, sx;
      if constexpr (kMod)
        sx = mod.score(sc[x], d0 + static_cast<float>(8 * ((x >> 1) & 1) - 8 * (x >> 2) - (x & 1)), gcap);
      else
        sx = sc[x] * sl2;
      const float pv = tc::fast_exp2(sx - m[(x >> 1) & 1]) * gcap;
      sc[x] = (!need || ((vis >> x) & 1)) ? pv : 0.f;
    }
    float dp[C::TK / 2];
    fence_regs(dp);
    fence_regs(sc);
    wgmma_fence();
    {
      const uint64_t dOd = QT::kmajor_base(opaque_u32(base) + C::kOffDo);
      const uint64_t dVd = KT::kmajor_base(opaque_u32(base) + C::kOffK + s * 2 * C::kKVBytes + C::kKVBytes);
#pragma unroll
      for (int ks = 0; ks < HD / 16; ++ks) wgmma_ss<C::TK, Elem, 0, 0>(dp, QT::kmajor(dOd, 0, ks), KT::kmajor(dVd, 0, ks), ks > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dp);
    uint32_t da[C::TK / 16][4];
#pragma unroll
    for (int kk = 0; kk < C::TK / 16; ++kk) {
      float x[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = sc[8 * kk + e] * (dp[8 * kk + e] - dd[(e >> 1) & 1]);
      da[kk][0] = tc::pack2<Elem>(x[0], x[1]);
      da[kk][1] = tc::pack2<Elem>(x[2], x[3]);
      da[kk][2] = tc::pack2<Elem>(x[4], x[5]);
      da[kk][3] = tc::pack2<Elem>(x[6], x[7]);
    }
    fence_regs(dq);
    fence_regs(da);
    wgmma_fence();
    {
      const uint64_t dKn = KT::mnmajor_base(opaque_u32(base) + C::kOffK + s * 2 * C::kKVBytes);
#pragma unroll
      for (int kk = 0; kk < C::TK / 16; ++kk) wgmma_rs<HD, Elem, 1>(dq, da[kk], KT::mnmajor(dKn, 16 * kk), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(dq);
    if (ti == 0) mbar_arrive(empty(s));
    ++it;
  }

  // dq = scale * dQ, straight from the accumulators (pairs of columns).
  Elem* dqg = static_cast<Elem*>(p.dq) + p.dq_st.at(b, h, si.q_off);
#pragma unroll
  for (int j = 0; j < HD / 8; ++j) {
    const int col = 8 * j + 2 * t;
    if (col < p.d) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = wrow + g + 8 * r;
        if (row < si.sq)
          *reinterpret_cast<uint32_t*>(dqg + row * p.dq_st.s + col) =
              tc::pack2<Elem>(dq[4 * j + 2 * r] * scale, dq[4 * j + 2 * r + 1] * scale);
      }
    }
  }
}

}  // namespace sm90

template <typename Elem, int HD>
void sm90_bwd_run(const AttnParams& p, cudaStream_t stream) {
  using C = sm90::BwdCfg<HD>;
  using D = sm90::DqCfg<HD>;
  const std::string where = "fused_attn sm90 backward (head dim " + std::to_string(HD) + "): ";
  if (p.d <= 0 || p.d > HD || p.d % 8 != 0)
    throw std::invalid_argument(where + "d = " + std::to_string(p.d) + ", expected a positive multiple of 8 <= " +
                                std::to_string(HD));
  if (p.sparse && (p.list_tq != C::TQ || p.list_tk != C::TK))
    throw std::invalid_argument(where + "block-sparse lists at tiles (" + std::to_string(p.list_tq) + ", " +
                                std::to_string(p.list_tk) + "), expected (" + std::to_string(C::TQ) + ", " +
                                std::to_string(C::TK) + ")");
  const sm90::MapRows mr = sm90::map_rows(p);  // tensor-map rows: packed tensors are one batch of total rows
  if (p.hq > 65535 || p.hk > 65535 || p.batch > 65535 || mr.q > INT_MAX || mr.k > INT_MAX)
    throw std::invalid_argument(where + "problem too large: Sq = " + std::to_string(mr.q) + ", Sk = " +
                                std::to_string(mr.k) + ", " + std::to_string(p.hq) + " heads, batch " +
                                std::to_string(p.batch) + " (at most 2^31 - 1 rows, 65535 heads and batch)");
  // Rows of lse / delta / dq_accum: (B, Hq, Sq), or one run of (Hq, total_q) for a packed batch.
  const int64_t rows = p.row_batches() * p.hq * p.row_len();
  if (rows > 0) {
    bwd::delta_kernel<Elem, HD><<<static_cast<unsigned>(cdiv(rows, bwd::kThreads / 8)), bwd::kThreads, 0, stream>>>(p);
    sm90::check_launch(where + "delta kernel: ");
  }
  constexpr bool bf16 = std::is_same<Elem, __nv_bfloat16>::value;
  const bool mods = p.softcap > 0 || p.alibi;
  sm90::BwdParams prm;
  prm.p = p;
  if (p.batch * p.hk * p.sk > 0) {
    // With Sq = 0 this still runs and writes dK = dV = 0 (no tensor map of Q or dO is read then).
    if (mr.q > 0) {
      sm90::make_tmap(&prm.tq, p.q, bf16, p.d, mr.q, p.hq, mr.b, p.q_st, C::TQ, "q");
      sm90::make_tmap(&prm.tdo, p.dout, bf16, p.d, mr.q, p.hq, mr.b, p.do_st, C::TQ, "dout");
    }
    sm90::make_tmap(&prm.tk, p.k, bf16, p.d, mr.k, p.hk, mr.b, p.k_st, C::TK, "k");
    sm90::make_tmap(&prm.tv, p.v, bf16, p.d, mr.k, p.hk, mr.b, p.v_st, C::TK, "v");
    if (!p.varlen()) {  // a packed batch's dK / dV go out by plain stores
      sm90::make_tmap(&prm.tdk, p.dk, bf16, p.d, p.sk, p.hk, p.batch, p.dk_st, 64, "dk");
      sm90::make_tmap(&prm.tdv, p.dv, bf16, p.d, p.sk, p.hk, p.batch, p.dv_st, 64, "dv");
    }
    auto kernel = mods ? sm90::dkdv_kernel<Elem, HD, true> : sm90::dkdv_kernel<Elem, HD, false>;
    sm90::set_smem(kernel, C::kSmem, where + "dK/dV kernel: ");
    const dim3 grid(static_cast<unsigned>(cdiv(p.sk, C::TK)), static_cast<unsigned>(p.hk),
                    static_cast<unsigned>(p.batch));
    kernel<<<grid, C::kThreads, C::kSmem, stream>>>(prm);
    sm90::check_launch(where + "dK/dV kernel: ");
  }
  if (rows == 0) return;
  if (!p.deterministic) {
    const int64_t chunks = rows * (HD / 8);
    bwd::dq_convert_kernel<Elem, HD><<<static_cast<unsigned>(cdiv(chunks, bwd::kThreads)), bwd::kThreads, 0, stream>>>(p);
    sm90::check_launch(where + "dQ convert kernel: ");
  } else {
    if (p.batch * p.hk * p.sk == 0) {
      sm90::make_tmap(&prm.tq, p.q, bf16, p.d, mr.q, p.hq, mr.b, p.q_st, D::TQ, "q");
      sm90::make_tmap(&prm.tdo, p.dout, bf16, p.d, mr.q, p.hq, mr.b, p.do_st, D::TQ, "dout");
    }
    auto kernel = mods ? sm90::dq_kernel<Elem, HD, true> : sm90::dq_kernel<Elem, HD, false>;
    sm90::set_smem(kernel, D::kSmem, where + "dQ kernel: ");
    const dim3 grid(static_cast<unsigned>(cdiv(p.sq, D::TQ)), static_cast<unsigned>(p.hq),
                    static_cast<unsigned>(p.batch));
    kernel<<<grid, D::kThreads, D::kSmem, stream>>>(prm);
    sm90::check_launch(where + "dQ kernel: ");
  }
}

}  // namespace fused_attn
