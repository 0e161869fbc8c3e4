// Forward attention on tensor cores, fp16 / bf16 in, fp32 accumulate (FlashAttention-2 scheme), sm80+.
//
// One thread block per (query tile, head, batch). The block's kWarps warps split the tile's query rows,
// 16 rows each (one m16n8k16 row block), so every warp runs its own online softmax without talking to
// the others; the K/V tiles are shared through shared memory, double-buffered: while the block computes
// on tile i, cp.async brings tile i+1 into the other stage.
//
// Per key tile and warp:
//   S (16 x kTk, fp32 accumulators)  = Q_w (16 x HD, A fragments) * K^T   (K via ldmatrix, rows8x2)
//   x = S * scale * log2(e) (kMod: softcap and ALiBi through score_mod.cuh instead), masked to -inf where
//   needed (mask.h's rule, only on tiles that need it)
//   m_new = max(m, rowmax x); alpha = 2^(m - m_new); P = 2^(x - m_new); l = alpha l + rowsum P
//   O (16 x HD, fp32) = alpha O + P (A fragments straight from the S accumulators) * V (ldmatrix.trans)
// and at the end O / l is staged through shared memory and written with 16-byte stores, and
// lse = (m + log2 l) * ln 2. A row whose running max is still -inf uses 0 in its place, so a row that sees
// no key ends with O = 0, l = 0, lse = -inf and no NaN on the way.
//
// Packed variable-length batches: block (qt, h, b) works on sequence b's query rows q_off + qt * kTq ..
// against its keys k_off .. (AttnParams::seq); the grid is sized by the longest sequence and blocks past
// their sequence's last query tile exit at once. lse of a packed batch is (Hq, total_q) (lse_b = 0).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "../mask.h"
#include "../params.h"
#include "score_mod.cuh"
#include "sequence.cuh"
#include "tc_common.cuh"
#include "tiles.h"

namespace fused_attn {
namespace fwd_detail {

template <int HD>
struct FwdCfg {
  static constexpr int kTq = tc_tiles(HD).fwd_tq;
  static constexpr int kTk = tc_tiles(HD).fwd_tk;
  static_assert(kTq % 16 == 0 && kTk % 16 == 0 && HD % 32 == 0, "tile shapes must be multiples of 16");
  static constexpr int kWarps = kTq / 16;  // one 16-row block of the query tile per warp
  static constexpr int kThreads = kWarps * 32;
  // Q's A fragments (HD / 4 registers) stay in registers up to HD = 128. Above, the O accumulators
  // (HD / 2) and S accumulators (32) leave no room (ptxas -v with Q in registers: HD = 192 spilled, HD = 160 used all 255), so
  // Q is re-read from shared memory at each k-step there: one extra ldmatrix.x4 per 8 mma, as
  // FlashAttention-2 does for every head dim.
  static constexpr bool kQInRegs = HD <= 128;
  // Blocks per SM the register budget is sized for. HD = 32 fits 128 registers (2 blocks of 8 warps);
  // HD = 64 wants ~161 (ptxas -v) and spilled 50-100 bytes in its loop when capped at 128, so it runs
  // 1 block of 8 warps per SM. Not measured yet: HD = 64 with 2 blocks (accepting the small spill).
  static constexpr int kMinBlocks = HD <= 32 ? 2 : 1;
  static constexpr int kQBytes = kTq * HD * 2;
  static constexpr int kKVBytes = kTk * HD * 2;  // one K or one V tile
  // Layout: [Q][K stage 0][V stage 0][K stage 1][V stage 1]. HD = 256: 32 + 4 * 32 KB = 160 KB, inside
  // sm80's 163 KB opt-in limit; HD = 128: 32 + 4 * 16 = 96 KB.
  static constexpr int kSmem = kQBytes + 4 * kKVBytes;
  static constexpr int kNS = kTk / 8;   // S accumulator n-tiles (8 keys each)
  static constexpr int kNO = HD / 8;    // O accumulator n-tiles (8 columns each)
  static constexpr int kKQ = HD / 16;   // k-steps of Q K^T
  static constexpr int kKP = kTk / 16;  // k-steps of P V
};

// kVar: a packed variable-length batch (sequence.cuh). kMod: the score modifiers (softcap, ALiBi) are on.
// Template flags rather than run-time branches so that a plain call runs code with nothing of theirs in
// the register allocation.
template <typename Elem, int HD, bool kVar, bool kMod>
__global__ void __launch_bounds__(FwdCfg<HD>::kThreads, FwdCfg<HD>::kMinBlocks)
    tc_fwd_kernel(const __grid_constant__ AttnParams p) {
  using C = FwdCfg<HD>;
  using Sw = tc::Swz<HD>;
  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;  // accumulator row within the warp's 16 (and g + 8)
  const int t = lane & 3;   // accumulator column pair within an 8-wide n-tile

  // Heaviest query tiles first: under causal (bottom-right aligned) the last tiles see the most keys.
  const int64_t qt = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = h / p.group();
  const SeqView<kVar> sv(p, b);
  const int64_t q0 = qt * C::kTq;
  if (kVar && q0 >= sv.sq()) return;  // past this sequence's query tiles: the whole block leaves
  const int q_rows = static_cast<int>(imin(C::kTq, sv.sq() - q0));  // >= 1
  const int d = static_cast<int>(p.d);
  const int wrow = warp * 16;  // this warp's first row in the tile

  const Elem* qg = static_cast<const Elem*>(p.q) + p.q_st.at(b, h, sv.q_off() + q0);
  const Elem* kg = static_cast<const Elem*>(p.k) + p.k_st.at(b, hk, sv.k_off());
  const Elem* vg = static_cast<const Elem*>(p.v) + p.v_st.at(b, hk, sv.k_off());

  const uint32_t sQ = tc::smem_u32(smem);
  const uint32_t sKV = sQ + C::kQBytes;  // stage s: K at sKV + s * 2 * kKVBytes, V kKVBytes after it

  // Lane parts of the ldmatrix addresses (tc_common.cuh: rows16 for Q and V^T, rows8x2 for K).
  const tc::LdsmLane<HD> la(tc::ldsm_rows16_row(lane), tc::ldsm_rows16_chunk(lane));
  const tc::LdsmLane<HD> lb(tc::ldsm_rows8x2_row(lane), tc::ldsm_rows8x2_chunk(lane));

  const KeyTiles kts = sv.key_tiles(h, qt, C::kTq, C::kTk);
  // Loop state in 32 bits (tile counts and indices are < 2^31; registers are tight at HD <= 64).
  const int n = static_cast<int>(kts.count());
  // First tile to visit (sparse lists may hold tiles outside the band: tile = -1, skipped).
  int i = 0;
  int cur_tile = -1;
  bool cur_partial = false;
  for (; i < n; ++i) {
    const TileVisit v = kts.get(i);
    cur_tile = static_cast<int>(v.tile);
    cur_partial = v.layout_partial;
    if (cur_tile >= 0) break;
  }

  float o[C::kNO][4];
#pragma unroll
  for (int j = 0; j < C::kNO; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  // Running max (in the log2 domain, x = s * scale * log2 e) and this lane's partial row sums, for rows
  // g (index 0) and g + 8 (index 1); the sums are reduced over the quad only at the end.
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.f, 0.f};

  if (i < n) {
    auto load_kv = [&](int tile, int stage) {
      const int64_t k0 = static_cast<int64_t>(tile) * C::kTk;
      const int rows = static_cast<int>(imin(C::kTk, sv.sk() - k0));
      const uint32_t sk = sKV + stage * 2 * C::kKVBytes;
      tc::load_tile_async<Elem, HD, C::kTk, C::kThreads>(sk, kg + k0 * p.k_st.s, p.k_st.s, rows, d, tid);
      tc::load_tile_async<Elem, HD, C::kTk, C::kThreads>(sk + C::kKVBytes, vg + k0 * p.v_st.s, p.v_st.s, rows,
                                                         d, tid);
    };
    tc::load_tile_async<Elem, HD, C::kTq, C::kThreads>(sQ, qg, p.q_st.s, q_rows, d, tid);
    tc::cp_async_commit();
    load_kv(cur_tile, 0);
    tc::cp_async_commit();
    tc::cp_async_wait<1>();  // Q landed (this thread's part) ...
    __syncthreads();         // ... and everyone's.

    uint32_t qf[C::kQInRegs ? C::kKQ : 1][4];
    if constexpr (C::kQInRegs) {
#pragma unroll
      for (int ks = 0; ks < C::kKQ; ++ks) tc::ldsm_x4(sQ + la(wrow, 2 * ks), qf[ks]);
    }

    const float sl2 = static_cast<float>(p.scale * 1.4426950408889634);  // scale * log2(e)
    const tc::ModFrag mod(p, b, h, sv.info());  // kMod only (unused, and dropped, otherwise)
    int stage = 0;
    for (;;) {
      // Next tile to visit, prefetched into the other stage while this one is computed on. That stage
      // was last read in the previous iteration, which ended with a barrier.
      int j = i + 1;
      int nxt_tile = -1;
      bool nxt_partial = false;
      for (; j < n; ++j) {
        const TileVisit v = kts.get(j);
        nxt_tile = static_cast<int>(v.tile);
        nxt_partial = v.layout_partial;
        if (nxt_tile >= 0) break;
      }
      const bool has_next = j < n;
      if (has_next) {
        load_kv(nxt_tile, stage ^ 1);
        tc::cp_async_commit();
      }

      // Which of this lane's kNS * 4 scores the current tile shows (bit 4 jn + e), worked out while the
      // copies land and before the S accumulators are live. The test is per warp (its 16 rows), so under
      // causal only the warps that cross the diagonal pay for per-element checks. The loop is rolled on
      // purpose: unrolled, element_visible's int64 arithmetic (and the layout's divisions) takes registers
      // the accumulators need (spills at HD = 64 under the 128-register cap of 2 blocks per SM).
      static_assert(C::kNS * 4 <= 64, "visibility mask is 64 bits");
      const int64_t k0 = static_cast<int64_t>(cur_tile) * C::kTk;
      const TileVisit cur{cur_tile, cur_partial};
      const bool need_mask = sv.needs_mask(cur, q0 + wrow, q0 + wrow + 16, k0, k0 + C::kTk);
      uint64_t vis = 0;
      // Rows all past Sq (the ragged last query tile): element_visible is false throughout; skip the loop.
      if (need_mask && q0 + wrow < sv.sq()) {
        const int64_t row0 = q0 + wrow + g;
        const int64_t col0 = k0 + 2 * t;
#pragma unroll 1
        for (int idx = 0; idx < C::kNS * 4; ++idx) {
          const int64_t row = row0 + ((idx >> 1) & 1) * 8;
          const int64_t col = col0 + (idx >> 2) * 8 + (idx & 1);
          if (sv.visible(cur, h, row, col)) vis |= uint64_t(1) << idx;
        }
      }

      if (has_next)
        tc::cp_async_wait<1>();  // all but the prefetch: the current tile has landed
      else
        tc::cp_async_wait<0>();
      __syncthreads();

      const uint32_t sK = sKV + stage * 2 * C::kKVBytes;
      const uint32_t sV = sK + C::kKVBytes;

      // S = Q K^T for this warp's 16 rows and the tile's kTk keys.
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
          tc::ldsm_x4(sQ + la(wrow, 2 * ks), qa);
        }
#pragma unroll
        for (int np = 0; np < C::kTk / 16; ++np) {
          uint32_t kb[4];
          tc::ldsm_x4(sK + lb(np * 16, 2 * ks), kb);
          tc::mma16816<Elem>(s[2 * np], qa, kb[0], kb[1]);
          tc::mma16816<Elem>(s[2 * np + 1], qa, kb[2], kb[3]);
        }
      }

      // To the log2 domain (with the modifiers when on), then mask.
      if constexpr (kMod) {
        // Element (jn, e): query q0 + wrow + g + 8 (e / 2), key k0 + 8 jn + 2 t + (e % 2).
        const float d0 = mod.dist(q0 + wrow + g, k0 + 2 * t);
#pragma unroll
        for (int jn = 0; jn < C::kNS; ++jn)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            s[jn][e] = mod.score(s[jn][e], d0 + static_cast<float>(8 * (e >> 1) - 8 * jn - (e & 1)));
      } else {
#pragma unroll
        for (int jn = 0; jn < C::kNS; ++jn) {
          s[jn][0] *= sl2;
          s[jn][1] *= sl2;
          s[jn][2] *= sl2;
          s[jn][3] *= sl2;
        }
      }
      if (need_mask) {
#pragma unroll
        for (int jn = 0; jn < C::kNS; ++jn) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!((vis >> (4 * jn + e)) & 1)) s[jn][e] = -INFINITY;
        }
      }

      // Online softmax, rows g (r = 0: elements 0, 1) and g + 8 (r = 1: elements 2, 3).
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
        mu[r] = mx[r] == -INFINITY ? 0.f : mx[r];    // no key seen yet: any finite value will do
        const float alpha = tc::fast_exp2(m[r] - mu[r]);  // m = -inf -> 0 (O and l are 0 then anyway)
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
        s[jn][0] = tc::fast_exp2(s[jn][0] - mu[0]);  // masked: 2^-inf = 0
        s[jn][1] = tc::fast_exp2(s[jn][1] - mu[0]);
        s[jn][2] = tc::fast_exp2(s[jn][2] - mu[1]);
        s[jn][3] = tc::fast_exp2(s[jn][3] - mu[1]);
        l[0] += s[jn][0] + s[jn][1];
        l[1] += s[jn][2] + s[jn][3];
      }

      // O += P V: the S accumulators of keys 16kk..16kk+15 are the A fragment of k-step kk.
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
          tc::ldsm_x4_trans(sV + la(kk * 16, 2 * dp), vb);
          tc::mma16816<Elem>(o[2 * dp], pa, vb[0], vb[1]);
          tc::mma16816<Elem>(o[2 * dp + 1], pa, vb[2], vb[3]);
        }
      }

      if (!has_next) break;
      __syncthreads();  // every warp is done with this stage before the next iteration refills it
      i = j;
      cur_tile = nxt_tile;
      cur_partial = nxt_partial;
      stage ^= 1;
    }
  }

  // Epilogue. Each warp stages its own 16 rows of O in its own 16 rows of the Q tile (only this warp
  // ever reads them, and no copy into Q is in flight), then writes them with 16-byte stores.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = tc::quad_sum(l[r]);
    inv[r] = l[r] == 0.f ? 0.f : 1.f / l[r];  // l = 0: no key seen; NaN (a NaN score): a NaN row, as in PyTorch
  }
  __syncwarp();
#pragma unroll
  for (int jn = 0; jn < C::kNO; ++jn) {
    const int col = jn * 8 + 2 * t;
    tc::st_pair<Elem, HD>(smem, wrow + g, col, o[jn][0] * inv[0], o[jn][1] * inv[0]);
    tc::st_pair<Elem, HD>(smem, wrow + g + 8, col, o[jn][2] * inv[1], o[jn][3] * inv[1]);
  }
  __syncwarp();
  // Rows relative to the warp's first row: the swizzle depends on row % 8 only, and wrow % 16 == 0.
  Elem* og = static_cast<Elem*>(p.o) + p.o_st.at(b, h, sv.q_off() + q0 + wrow);
  tc::store_tile<Elem, HD, 16, 32>(smem + wrow * Sw::kRowBytes, og, p.o_st.s, q_rows - wrow, d, lane);

  if (t == 0) {
    float* lse = static_cast<float*>(p.lse) + b * p.lse_b + h * p.lse_h + sv.q_off();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = q0 + wrow + g + 8 * r;
      if (row < sv.sq()) lse[row] = l[r] == 0.f ? -INFINITY : m[r] * 0.6931471805599453f + logf(l[r]);
    }
  }
}


template <typename Elem, int HD, bool kVar, bool kMod>
void launch(const AttnParams& p, cudaStream_t stream, const std::string& where) {
  using C = FwdCfg<HD>;
  auto kernel = tc_fwd_kernel<Elem, HD, kVar, kMod>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess)
    throw std::runtime_error(where + "cannot get " + std::to_string(C::kSmem) +
                             " bytes of shared memory per block: " + cudaGetErrorString(err));
  const dim3 grid(static_cast<unsigned>(cdiv(p.sq, C::kTq)), static_cast<unsigned>(p.hq),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(where + "launch failed: " + cudaGetErrorString(err));
}
}  // namespace fwd_detail

template <typename Elem, int HD>
void tc_fwd_run(const AttnParams& p, cudaStream_t stream) {
  using C = fwd_detail::FwdCfg<HD>;
  if (p.batch == 0 || p.hq == 0 || p.sq == 0) return;
  const std::string where = "fused_attn forward (head dim " + std::to_string(HD) + "): ";
  if (p.d > HD || p.d % 8 != 0)
    throw std::invalid_argument(where + "d = " + std::to_string(p.d) + ", expected a multiple of 8 <= " +
                                std::to_string(HD));
  if (p.sparse && (p.list_tq != C::kTq || p.list_tk != C::kTk))
    throw std::invalid_argument(where + "block-sparse lists at tiles (" + std::to_string(p.list_tq) + ", " +
                                std::to_string(p.list_tk) + "), expected (" + std::to_string(C::kTq) + ", " +
                                std::to_string(C::kTk) + ")");
  const int64_t nq = cdiv(p.sq, C::kTq);
  if (nq > INT_MAX || p.hq > 65535 || p.batch > 65535)
    throw std::invalid_argument(where + "grid too large: " + std::to_string(nq) + " query tiles x " +
                                std::to_string(p.hq) + " heads x " + std::to_string(p.batch) +
                                " batch (at most 65535 heads and 65535 batch)");
  const bool mod = p.softcap > 0 || p.alibi;
  if (p.varlen())
    mod ? fwd_detail::launch<Elem, HD, true, true>(p, stream, where)
        : fwd_detail::launch<Elem, HD, true, false>(p, stream, where);
  else
    mod ? fwd_detail::launch<Elem, HD, false, true>(p, stream, where)
        : fwd_detail::launch<Elem, HD, false, false>(p, stream, where);
}

}  // namespace fused_attn
