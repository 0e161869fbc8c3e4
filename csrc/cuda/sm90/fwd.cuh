// Forward pass of fp16/bf16 attention for Hopper (sm_90a): warp-specialised, TMA-fed, wgmma-computed, in
// the manner of FlashAttention-3.
//
// One block of 384 threads per (query tile of 128 rows, query head, batch), heaviest tiles first:
//   warpgroup 0 (producer, 24 registers after setmaxnreg): one thread walks the visible key tiles of
//     mask.h's KeyTiles and issues TMA loads: Q once, then K and V of each tile into a 2-stage ring.
//     Each ring slot has a "full" mbarrier (the producer's arrive.expect_tx + the copy's bytes) and an
//     "empty" one (one arrival per consumer warpgroup when its wgmmas no longer read the slot).
//   warpgroups 1, 2 (consumers, 240 registers): 64 query rows each. Per key tile j:
//     S = Q K_j^T    wgmma m64n{BN}k16, A = Q and B = K from shared memory (K-major descriptors)
//     online softmax in the log2 domain on S (mask.h's rule on tiles that need it), P in registers
//     O += P V_j     wgmma m64n{HD}k16, A = P from registers, B = V from shared memory (N-major)
//   Intra-warpgroup pipelining: S_{j+1} = Q K_{j+1}^T is issued together with O += P_j V_j, and the
//   softmax of S_{j+1} runs while P_j V_j is still on the tensor cores; O is rescaled once that retires.
//   Ping-pong: the two consumer warpgroups take turns issuing their GEMMs (named barriers 1 and 2), so
//   one warpgroup's exponentials overlap the other's GEMMs.
//   Epilogue: O / l in Elem through the warpgroup's rows of the Q tile (st.shared, fence.proxy.async) and
//   a TMA store (rows past Sq, columns past d are dropped by the tensor map; the last tile of a sequence in
//   a packed batch goes out by plain stores of its rows instead); lse = (m + log2 l) ln 2.
// Rows that see no key keep m = -inf, l = 0: O = 0, lse = -inf, no NaN (as in the mma.sync kernels).
// Softcap and ALiBi (mask.h's ScoreMod) run in a kMod instantiation through score_mod.cuh, as in the
// mma.sync family.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../../mask.h"
#include "../score_mod.cuh"
#include "../tc_common.cuh"
#include "common.cuh"
#include "tiles.h"
#include "wgmma.cuh"

namespace fused_attn {
namespace sm90 {

struct FwdParams {
  CUtensorMap tq, tk, tv, to;
  AttnParams p;
};

template <int HD>
struct FwdCfg {
  static constexpr int kBM = sm90_tiles(HD).fwd_tq;  // query rows: 2 consumer warpgroups x 64
  static constexpr int kBN = sm90_tiles(HD).fwd_tk;  // keys per tile
  static constexpr int kStages = 2;
  static constexpr int kThreads = 384;
  static constexpr int kProducerRegs = 24;  // 128 x (24 + 240 + 240) = the 168 x 384 of the launch
  static constexpr int kConsumerRegs = 240;
  static_assert(HD % 64 == 0 && kBM == 128 && kBN % 64 == 0, "tile shapes");
  static constexpr uint32_t kQBytes = kBM * HD * 2;
  static constexpr uint32_t kKVBytes = kBN * HD * 2;  // one K or one V tile
  static constexpr uint32_t kOffK = kQBytes;
  static constexpr uint32_t kOffV = kOffK + kStages * kKVBytes;
  static constexpr uint32_t kOffBar = kOffV + kStages * kKVBytes;
  static constexpr int kNumBars = 1 + 4 * kStages;  // Q, full K, full V, empty K, empty V
  static constexpr int kSmem = kOffBar + 8 * kNumBars + 1024;  // + alignment slack for the 1024-byte base
  static_assert(kSmem <= 232448, "shared memory");
  static constexpr int kNS = kBN / 2;   // S accumulators per thread
  static constexpr int kNO = HD / 2;    // O accumulators per thread
  static constexpr int kKQ = HD / 16;   // k-steps of Q K^T
  static constexpr int kKP = kBN / 16;  // k-steps of P V
  // Named barriers: 1, 2 = "warpgroup w may issue its GEMMs"; 3, 4 = warpgroup w's epilogue.
  static constexpr int kBarSched = 1, kBarEpi = 3;
};

// Next visible entry of a KeyTiles list at or after index i (sparse lists may name tiles outside the band:
// tile = -1, skipped); returns n when there is none.
__device__ __forceinline__ int next_visible(const KeyTiles& kts, int i, int n, int& tile, bool& partial) {
  for (; i < n; ++i) {
    const TileVisit v = kts.get(i);
    if (v.tile >= 0) {
      tile = static_cast<int>(v.tile);
      partial = v.layout_partial;
      return i;
    }
  }
  return n;
}

// Which of this thread's kNS scores of key tile `tile` are visible (bit 4 j + 2 i + e: row wrow + g + 8 i,
// key 8 j + 2 t + e of the tile; wrow = the warp's first row), 0 when the warp's 16 rows need no
// per-element masking there. Rolled on purpose: it runs while the tile's GEMM is in flight, before the
// scores are live, and element_visible's int64 arithmetic unrolled would take registers the
// accumulators need.
template <int BN>
__device__ __forceinline__ uint64_t visible_bits(const AttnParams& p, int64_t b, int64_t h, int64_t wrow, int g,
                                                 int tile, bool partial, int t, bool& need) {
  static_assert(BN / 8 * 4 <= 64, "one bit per score");
  const int64_t k0 = static_cast<int64_t>(tile) * BN;
  const TileVisit cur{tile, partial};
  need = tile_needs_mask(p, cur, b, wrow, wrow + 16, k0, k0 + BN);
  uint64_t vis = 0;
  if (need && wrow < p.seq(b).sq) {
#pragma unroll 1
    for (int idx = 0; idx < BN / 8 * 4; ++idx) {
      const int64_t row = wrow + g + ((idx >> 1) & 1) * 8;
      const int64_t col = k0 + (idx >> 2) * 8 + 2 * t + (idx & 1);
      if (element_visible(p, cur, b, h, row, col)) vis |= uint64_t(1) << idx;
    }
  }
  return vis;
}

// Online softmax step on a fresh S tile (raw scores q.k): to base-2 scores (x = s scale log2 e; kMod:
// softcap and ALiBi through score_mod.cuh's ModFrag, d0 = the ALiBi distance of the thread's first
// element), masks, updates the running max m and row sums l (this lane's partial sums; reduced over the
// quad at the end), writes P as A fragments of P V and returns the factor alpha by which O must be
// rescaled (once the previous P V has retired).
template <typename Elem, int BN, bool kMod>
__device__ __forceinline__ void softmax_step(float (&s)[BN / 2], uint64_t vis, bool need, float sl2,
                                             const tc::ModFrag& mod, float d0, float (&m)[2], float (&l)[2],
                                             float (&alpha)[2], uint32_t (&pf)[BN / 16][4]) {
  if constexpr (kMod) {
    // Element 4 j + 2 i + e: row + 8 i, key + 8 j + e.
#pragma unroll
    for (int i = 0; i < BN / 2; ++i)
      s[i] = mod.score(s[i], d0 + static_cast<float>(8 * ((i >> 1) & 1) - 8 * (i >> 2) - (i & 1)));
  } else {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] *= sl2;
  }
  if (need) {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i)
      if (!((vis >> i) & 1)) s[i] = -INFINITY;
  }
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(s[4 * j], s[4 * j + 1]));
    mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
  }
  float mu[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = tc::quad_max(mx[r]);
    mu[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // no key seen yet: any finite value will do
    alpha[r] = tc::fast_exp2(m[r] - mu[r]);   // m = -inf -> 0 (O and l are 0 then anyway)
    m[r] = mx[r];
    l[r] *= alpha[r];
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    s[4 * j] = tc::fast_exp2(s[4 * j] - mu[0]);  // masked: 2^-inf = 0
    s[4 * j + 1] = tc::fast_exp2(s[4 * j + 1] - mu[0]);
    s[4 * j + 2] = tc::fast_exp2(s[4 * j + 2] - mu[1]);
    s[4 * j + 3] = tc::fast_exp2(s[4 * j + 3] - mu[1]);
    l[0] += s[4 * j] + s[4 * j + 1];
    l[1] += s[4 * j + 2] + s[4 * j + 3];
  }
  // A fragment of k-step kk (keys 16 kk .. 16 kk + 15): rows g / g + 8, keys 16 kk + 2t (+ 8).
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    pf[kk][0] = tc::pack2<Elem>(s[8 * kk], s[8 * kk + 1]);
    pf[kk][1] = tc::pack2<Elem>(s[8 * kk + 2], s[8 * kk + 3]);
    pf[kk][2] = tc::pack2<Elem>(s[8 * kk + 4], s[8 * kk + 5]);
    pf[kk][3] = tc::pack2<Elem>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// kMod: softcap / ALiBi on (a separate instantiation, so that plain calls keep their registers).
template <typename Elem, int HD, bool kMod>
__global__ void __launch_bounds__(FwdCfg<HD>::kThreads, 1) fwd_kernel(const __grid_constant__ FwdParams prm) {
  using C = FwdCfg<HD>;
  using QT = Sw128Tile<C::kBM>;
  using KT = Sw128Tile<C::kBN>;
  const AttnParams& p = prm.p;
  extern __shared__ __align__(1024) char smem[];
  const uint32_t base = (smem_u32(smem) + 1023u) & ~1023u;
  const uint32_t sQ = base, sK = base + C::kOffK, sV = base + C::kOffV, sBar = base + C::kOffBar;
  const uint32_t barQ = sBar;
  auto full_k = [&](int s) { return sBar + 8 * (1 + s); };
  auto full_v = [&](int s) { return sBar + 8 * (1 + C::kStages + s); };
  auto empty_k = [&](int s) { return sBar + 8 * (1 + 2 * C::kStages + s); };
  auto empty_v = [&](int s) { return sBar + 8 * (1 + 3 * C::kStages + s); };

  const int tid = threadIdx.x;
  // The warpgroup index, broadcast from lane 0 so that the compiler knows it is warp-uniform: descriptors
  // computed from it then live in uniform registers (a per-thread value would be moved into uniform
  // registers between the wgmmas, and ptxas serialises wgmmas whose inputs are defined in between).
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int64_t qt = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t q0 = qt * C::kBM;
  // Packed batch: the grid covers max_seqlen_q; a tile past this sequence's rows has nothing to do (the
  // whole block leaves before any barrier). Fixed length: every tile starts inside Sq.
  if (q0 >= p.seq(b).sq) return;
  const KeyTiles kts(p, b, h, qt, C::kBM, C::kBN);
  const int n = static_cast<int>(kts.count());

  if (tid == 0) {
    mbar_init(barQ, 1);
    for (int s = 0; s < C::kStages; ++s) {
      mbar_init(full_k(s), 1);
      mbar_init(full_v(s), 1);
      mbar_init(empty_k(s), 2);  // one arrival per consumer warpgroup
      mbar_init(empty_v(s), 2);
    }
    fence_mbar_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------------------------------------------------------------------------- producer
    setmaxnreg_dec<C::kProducerRegs>();
    if (tid == 0) {
      const int64_t hk = h / p.group();
      // Tensor-map coordinates of sequence b: packed tensors are one batch of total rows (common.cuh map_rows).
      const SeqInfo si = p.seq(b);
      const int tb = map_batch(p, b);
      const int qrow = static_cast<int>(si.q_off + q0), krow = static_cast<int>(si.k_off);
      int tile = -1;
      bool partial = false;
      int it = 0;
      for (int i = next_visible(kts, 0, n, tile, partial); i < n; i = next_visible(kts, i + 1, n, tile, partial)) {
        if (it == 0) {
          mbar_arrive_expect_tx(barQ, C::kQBytes);
#pragma unroll
          for (int cb = 0; cb < HD / 64; ++cb)
            tma_load_4d(sQ + cb * QT::kBlockBytes, &prm.tq, barQ, cb * 64, qrow, static_cast<int>(h), tb);
        }
        const int s = it % C::kStages;
        const uint32_t ph = (it / C::kStages) & 1;
        const int k0 = krow + tile * C::kBN;
        mbar_wait(empty_k(s), ph ^ 1);  // the first round passes at once (parity of the "preceding" phase)
        mbar_arrive_expect_tx(full_k(s), C::kKVBytes);
#pragma unroll
        for (int cb = 0; cb < HD / 64; ++cb)
          tma_load_4d(sK + s * C::kKVBytes + cb * KT::kBlockBytes, &prm.tk, full_k(s), cb * 64, k0,
                      static_cast<int>(hk), tb);
        mbar_wait(empty_v(s), ph ^ 1);
        mbar_arrive_expect_tx(full_v(s), C::kKVBytes);
#pragma unroll
        for (int cb = 0; cb < HD / 64; ++cb)
          tma_load_4d(sV + s * C::kKVBytes + cb * KT::kBlockBytes, &prm.tv, full_v(s), cb * 64, k0,
                      static_cast<int>(hk), tb);
        ++it;
      }
    }
    return;
  }

  // ------------------------------------------------------------------------------------ consumers
  setmaxnreg_inc<C::kConsumerRegs>();
  const int cw = wg - 1;  // consumer warpgroup 0 / 1: query rows 64 cw .. 64 cw + 63 of the tile
  const int ti = tid % 128;
  const int wi = ti / 32;
  const int lane = ti % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t rbase = q0 + 64 * cw + 16 * wi + g;  // this thread's rows: rbase, rbase + 8
  const float sl2 = static_cast<float>(p.scale * 1.4426950408889634);
  const tc::ModFrag mod(p, b, h, p.seq(b));  // kMod only (unused, and dropped, otherwise)
  // ALiBi distance (row + Sk - Sq - key) of this thread's first score of key tile `tile`.
  auto dist0 = [&](int tile) { return kMod ? mod.dist(q0 + 64 * cw + 16 * wi + g, int64_t(tile) * C::kBN + 2 * t) : 0.f; };

  float o[C::kNO];
#pragma unroll
  for (int i = 0; i < C::kNO; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};

  int tile = -1;
  bool partial = false;
  int i = next_visible(kts, 0, n, tile, partial);
  if (i < n) {
    const int sched_mine = C::kBarSched + cw, sched_other = C::kBarSched + (cw ^ 1);
    if (cw == 1) named_arrive(C::kBarSched, 256);  // warpgroup 0 issues first
    // Descriptor bases: this warpgroup's 64 rows of Q, stage 0 of K and V (stage s: + s kKVBytes >> 4),
    // recomputed from an opaque copy of the base address at each use (see opaque_u32).
    auto dQ = [&] { return QT::kmajor_base(opaque_u32(base) + 64 * cw * 128); };
    auto dK = [&] { return KT::kmajor_base(opaque_u32(base) + C::kOffK); };
    auto dV = [&] { return KT::mnmajor_base(opaque_u32(base) + C::kOffV); };
    float s[C::kNS];
    uint32_t pf[C::kKP][4];
    float alpha[2];

    // Prologue: S_0.
    mbar_wait(barQ, 0);
    mbar_wait(full_k(0), 0);
    named_sync(sched_mine, 256);
    wgmma_fence();
    {
      const uint64_t dq = dQ(), dk = dK();
#pragma unroll
      for (int ks = 0; ks < C::kKQ; ++ks)
        wgmma_ss<C::kBN, Elem, 0, 0>(s, QT::kmajor(dq, 0, ks), KT::kmajor(dk, 0, ks), ks > 0);
    }
    wgmma_commit();
    named_arrive(sched_other, 256);
    bool need;
    uint64_t vis = visible_bits<C::kBN>(p, b, h, q0 + 64 * cw + 16 * wi, g, tile, partial, t, need);
    wgmma_wait<0>();
    fence_regs(s);
    if (ti == 0) mbar_arrive(empty_k(0));
    softmax_step<Elem, C::kBN, kMod>(s, vis, need, sl2, mod, dist0(tile), m, l, alpha, pf);

    int it = 0;  // visible tiles consumed so far; ring slot it % kStages
    uint32_t pn[C::kKP][4];
    // One key tile: issue S of the next tile and P V of the current one, then the softmax of the next.
    // P alternates between pf and pn (the loop below is unrolled by two) so that no register copy
    // defines a wgmma's A fragment: ptxas serialises wgmmas whose inputs are moved in between (C7513).
    auto step = [&](uint32_t (&pa)[C::kKP][4], uint32_t (&pb)[C::kKP][4]) -> bool {
      int nt = -1;
      bool npart = false;
      const int j = next_visible(kts, i + 1, n, nt, npart);
      if (j >= n) return false;
      const int s0 = it % C::kStages, s1 = (it + 1) % C::kStages;
      const uint32_t ph0 = (it / C::kStages) & 1, ph1 = ((it + 1) / C::kStages) & 1;
      mbar_wait(full_k(s1), ph1);
      mbar_wait(full_v(s0), ph0);
      named_sync(sched_mine, 256);
      fence_regs(s);
      fence_regs(o);
      fence_regs(pa);
      wgmma_fence();
      const uint64_t dq = dQ(), dk = dK() + s1 * (C::kKVBytes >> 4), dv = dV() + s0 * (C::kKVBytes >> 4);
#pragma unroll
      for (int ks = 0; ks < C::kKQ; ++ks)
        wgmma_ss<C::kBN, Elem, 0, 0>(s, QT::kmajor(dq, 0, ks), KT::kmajor(dk, 0, ks), ks > 0);
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < C::kKP; ++kk) wgmma_rs<HD, Elem, 1>(o, pa[kk], KT::mnmajor(dv, 16 * kk), 1);
      wgmma_commit();
      named_arrive(sched_other, 256);
      vis = visible_bits<C::kBN>(p, b, h, q0 + 64 * cw + 16 * wi, g, nt, npart, t, need);
      wgmma_wait<1>();  // S of the new tile has retired; P V of the current one may still run
      fence_regs(s);
      if (ti == 0) mbar_arrive(empty_k(s1));
      softmax_step<Elem, C::kBN, kMod>(s, vis, need, sl2, mod, dist0(nt), m, l, alpha, pb);
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(pa);
      if (ti == 0) mbar_arrive(empty_v(s0));
#pragma unroll
      for (int x = 0; x < C::kNO; x += 4) {
        o[x] *= alpha[0];
        o[x + 1] *= alpha[0];
        o[x + 2] *= alpha[1];
        o[x + 3] *= alpha[1];
      }
      i = j;
      ++it;
      return true;
    };
    // The last tile: O += P V.
    auto last = [&](uint32_t (&pa)[C::kKP][4]) {
      const int s0 = it % C::kStages;
      mbar_wait(full_v(s0), (it / C::kStages) & 1);
      named_sync(sched_mine, 256);
      fence_regs(o);
      fence_regs(pa);
      wgmma_fence();
      const uint64_t dv = dV() + s0 * (C::kKVBytes >> 4);
#pragma unroll
      for (int kk = 0; kk < C::kKP; ++kk) wgmma_rs<HD, Elem, 1>(o, pa[kk], KT::mnmajor(dv, 16 * kk), 1);
      wgmma_commit();
      if (cw == 0) named_arrive(sched_other, 256);  // warpgroup 1's last turn: warpgroup 0 waits no more
      wgmma_wait<0>();
      fence_regs(o);
      if (ti == 0) mbar_arrive(empty_v(s0));
    };
    for (;;) {
      if (!step(pf, pn)) {
        last(pf);
        break;
      }
      if (!step(pn, pf)) {
        last(pn);
        break;
      }
    }
  }

  // ------------------------------------------------------------------------------------ epilogue
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = tc::quad_sum(l[r]);
    inv[r] = l[r] == 0.f ? 0.f : 1.f / l[r];  // l = 0: no key seen; NaN (a NaN score): a NaN row, as in PyTorch
  }
  // This warpgroup's rows of the Q tile are free: its last S GEMM has retired, the other warpgroup reads
  // only its own rows.
  const int r0 = 64 * cw + 16 * wi + g;
#pragma unroll
  for (int jn = 0; jn < HD / 8; ++jn) {
    const int col = 8 * jn + 2 * t;
    st_shared_u32(sQ + QT::offset(r0, col), tc::pack2<Elem>(o[4 * jn] * inv[0], o[4 * jn + 1] * inv[0]));
    st_shared_u32(sQ + QT::offset(r0 + 8, col), tc::pack2<Elem>(o[4 * jn + 2] * inv[1], o[4 * jn + 3] * inv[1]));
  }
  fence_proxy_async();
  named_sync(C::kBarEpi + cw, 128);
  const SeqInfo si = p.seq(b);
  const int64_t w0 = q0 + 64 * cw;  // the warpgroup's first row within the sequence
  if (p.varlen() && w0 + 64 > si.sq) {
    // The last rows of a sequence in a packed batch: the box would also cover the next sequence's first
    // rows, so rows < Sq_b go out by plain stores. Every other tile goes out whole by TMA.
    store_rows<QT, 64, HD, 128>(sQ, 64 * cw, 0, static_cast<Elem*>(p.o) + p.o_st.at(0, h, si.q_off + w0), p.o_st.s,
                                si.sq - w0, p.d, ti);
  } else if (ti == 0) {
#pragma unroll
    for (int cb = 0; cb < HD / 64; ++cb)
      tma_store_4d(&prm.to, sQ + cb * QT::kBlockBytes + 64 * cw * 128, cb * 64, static_cast<int>(si.q_off + w0),
                   static_cast<int>(h), map_batch(p, b));
    bulk_commit();
    bulk_wait_read<0>();
  }
  if (t == 0) {
    // lse: (B, Hq, Sq), or (Hq, total_q) with lse_b = 0 for a packed batch (row q_off + i).
    float* lse = static_cast<float*>(p.lse) + b * p.lse_b + h * p.lse_h + si.q_off;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = rbase + 8 * r;
      if (row < si.sq) lse[row] = l[r] == 0.f ? -INFINITY : m[r] * 0.6931471805599453f + logf(l[r]);
    }
  }
}

}  // namespace sm90

template <typename Elem, int HD>
void sm90_fwd_run(const AttnParams& p, cudaStream_t stream) {
  using C = sm90::FwdCfg<HD>;
  if (p.batch == 0 || p.hq == 0 || p.sq == 0) return;
  const std::string where = "fused_attn sm90 forward (head dim " + std::to_string(HD) + "): ";
  if (p.d > HD || p.d % 8 != 0)
    throw std::invalid_argument(where + "d = " + std::to_string(p.d) + ", expected a multiple of 8 <= " +
                                std::to_string(HD));
  if (p.sparse && (p.list_tq != C::kBM || p.list_tk != C::kBN))
    throw std::invalid_argument(where + "block-sparse lists at tiles (" + std::to_string(p.list_tq) + ", " +
                                std::to_string(p.list_tk) + "), expected (" + std::to_string(C::kBM) + ", " +
                                std::to_string(C::kBN) + ")");
  const int64_t nq = cdiv(p.sq, C::kBM);
  // Tensor-map rows (int32 coordinates): the call's lengths, or the packed tensors' total rows.
  const sm90::MapRows mr = sm90::map_rows(p);
  if (nq > INT_MAX || p.hq > 65535 || p.batch > 65535 || mr.q > INT_MAX || mr.k > INT_MAX)
    throw std::invalid_argument(where + "problem too large: Sq = " + std::to_string(mr.q) + ", Sk = " +
                                std::to_string(mr.k) + ", " + std::to_string(p.hq) + " heads, batch " +
                                std::to_string(p.batch) + " (at most 2^31 - 1 rows, 65535 heads and batch)");
  constexpr bool bf16 = std::is_same<Elem, __nv_bfloat16>::value;
  sm90::FwdParams prm;
  prm.p = p;
  // A packed batch is mapped as one batch of total rows (the kernel adds each sequence's offset).
  sm90::make_tmap(&prm.tq, p.q, bf16, p.d, mr.q, p.hq, mr.b, p.q_st, C::kBM, "q");
  sm90::make_tmap(&prm.tk, p.k, bf16, p.d, mr.k, p.hk, mr.b, p.k_st, C::kBN, "k");
  sm90::make_tmap(&prm.tv, p.v, bf16, p.d, mr.k, p.hk, mr.b, p.v_st, C::kBN, "v");
  sm90::make_tmap(&prm.to, p.o, bf16, p.d, mr.q, p.hq, mr.b, p.o_st, 64, "out");
  auto kernel = p.softcap > 0 || p.alibi ? sm90::fwd_kernel<Elem, HD, true> : sm90::fwd_kernel<Elem, HD, false>;
  sm90::set_smem(kernel, C::kSmem, where);
  const dim3 grid(static_cast<unsigned>(nq), static_cast<unsigned>(p.hq), static_cast<unsigned>(p.batch));
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(prm);
  sm90::check_launch(where);
}

}  // namespace fused_attn
