// CUDA kernels of linear (kernelized) attention (csrc/linear_params.h has the math; csrc/cpu/linear.cpp the
// CPU twin). Two families:
//
// 1. lin_tc_fwd_kernel<Elem, HD>: fp16 / bf16 forward on tensor cores (mma.sync m16n8k16, fp32 accumulate),
//    Dk, Dv multiples of 8, both padded to HD = 64 or 128. One block (4 warps) per (batch, head) walks
//    the sequence in chunks of kC = 64 rows. Per chunk, with Qf = phi(scale Q), Kf = phi(K) applied in
//    shared memory right after the chunk lands (rows / columns past the data stay 0, so padding adds
//    nothing even for elu1 where phi(0) = 1):
//      A = mask(Qf Kf^T)     warp w: its 16 query rows x the chunk's keys <= its last row (mma)
//      O = A V + Qf S        A re-packed as the A fragment (as flash's P), V by ldmatrix.trans; S (the fp32
//                            state before the chunk, in shared memory) split into hi + lo Elem parts so the
//                            product keeps ~16 mantissa bits of the fp32 state (two mma per fragment)
//      den = rowsum(A) + Qf z + eps
//      S += Kf^T V           Kf^T as an A fragment by ldmatrix.trans (rows8x2 pattern), fp32 accumulate,
//                            added into the fp32 state; z += colsum(Kf)
//    Non-causal: the state over all key chunks first, then every query chunk against it (no intra part).
//    Parallel over (batch, head) only: the chunk scan is serial inside a block (see notes/linear-cuda.md).
//
// 2. lin_generic_*<T>: fp32 / fp64 (and fp16 / bf16 backward, upcast to fp32 by the host), any Dk, Dv up to
//    kGenericMaxD, on CUDA cores. The recurrence row by row (a chunk of one row), one block of kGThreads per
//    (batch, head), state in a float64 work buffer in global memory (owned column- or row-wise by threads,
//    so no thread reads another's state entry between barriers), the short vectors in shared memory:
//      forward:  P += kf_i v_i^T, z += kf_i; out_i = qf_i P / (qf_i . z + eps)     (causal, inclusive)
//      backward pass 1 (dq): dQf_i = P dN_i + dd_i z  with P, z inclusive of row i
//      backward pass 2 (dk, dv, reverse): G += qf_i dN_i^T, g += dd_i qf_i; dKf_i = G v_i + g, dV_i = G^T kf_i
//    with dN = dO / den, dd = -(dN . o) (0 when not normalised); dS0 = G, dz0 = g at the start.
//    Non-causal: the totals first, then every row against them. The correct path (gradcheck in fp64 runs on
//    it), not the fast one.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../linear_params.h"
#include "tc_common.cuh"

namespace fused_attn {
namespace lin {

constexpr int kGThreads = 128;
constexpr int kGenericMaxD = 1024;  // 3 (Dk + Dv) doubles of shared memory <= 48 KB

template <typename T>
__device__ __forceinline__ T texp(T x);
template <>
__device__ __forceinline__ float texp<float>(float x) { return expf(x); }
template <>
__device__ __forceinline__ double texp<double>(double x) { return exp(x); }

// phi(x) of the feature map (x already scaled).
template <typename T>
__device__ __forceinline__ T phi(T x, FeatureMap fm) {
  if (fm == FeatureMap::elu1) return x > T(0) ? x + T(1) : texp<T>(x);
  if (fm == FeatureMap::relu) return x > T(0) ? x : T(0);
  return x;
}
// phi'(x) from f = phi(x): elu1 min(1, f), relu [f > 0], identity 1 (as the CPU kernels).
template <typename T>
__device__ __forceinline__ T phi_grad(T f, FeatureMap fm) {
  if (fm == FeatureMap::elu1) return f < T(1) ? f : T(1);
  if (fm == FeatureMap::relu) return f > T(0) ? T(1) : T(0);
  return T(1);
}

// ================================================================================================
// fp16 / bf16 on tensor cores

template <int HD>
struct TcCfg {
  static constexpr int kC = 64;         // rows per chunk
  static constexpr int kThreads = 128;  // 4 warps x 16 rows
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kTileBytes = kC * HD * 2;
  // fp32 state row length: + 4 floats, so the B-fragment reads of S (rows 2t, column g) hit 32 distinct banks.
  static constexpr int kLdS = HD + 4;
  static constexpr int kStateBytes = (HD * kLdS + HD) * 4;
  // Forward: Qf, Kf, V tiles + state. Backward: Qf, Kf, V, dN tiles + state + a second state vector + per-row
  // 1/den and dd (twice).
  static constexpr int kSmemFwd = 3 * kTileBytes + kStateBytes;
  static constexpr int kSmemBwd = 4 * kTileBytes + kStateBytes + (HD + 3 * kC) * 4;
  static_assert(HD == 64 || HD == 128, "tensor-core linear attention is built for HD 64 and 128");
};

// Element pair (r, col), (r, col + 1) of a swizzled tile, col even.
template <int HD>
__device__ __forceinline__ uint32_t* tile_word(char* tile, int r, int col) {
  return reinterpret_cast<uint32_t*>(tile + tc::Swz<HD>::offset(r, col >> 3) + (col & 7) * 2);
}
template <typename Elem, int HD>
__device__ __forceinline__ float2 tile_pair(const char* tile, int r, int col) {
  return tc::unpack2<Elem>(*tile_word<HD>(const_cast<char*>(tile), r, col));
}

// phi(scale x) in place on rows < rows, columns < d (d % 8 == 0) of a swizzled kC x HD tile. Rows and
// columns past the data keep the zeros the loader put there (phi(0) = 1 for elu1 would add phantom keys).
template <typename Elem, int HD>
__device__ __forceinline__ void features_tile(char* tile, int rows, int d, float scale, FeatureMap fm, int tid) {
  constexpr int kPairs = HD / 2;
  for (int idx = tid; idx < rows * kPairs; idx += TcCfg<HD>::kThreads) {
    const int r = idx / kPairs;
    const int col = 2 * (idx - r * kPairs);
    if (col >= d) continue;
    uint32_t* w = tile_word<HD>(tile, r, col);
    const float2 x = tc::unpack2<Elem>(*w);
    *w = tc::pack2<Elem>(phi(x.x * scale, fm), phi(x.y * scale, fm));
  }
}

// An fp32 pair as hi + lo Elem pairs: hi = round(x), lo = round(x - hi). A product against both keeps ~16
// mantissa bits of the fp32 state instead of Elem's 8 / 11.
template <typename Elem>
__device__ __forceinline__ void split2(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = tc::pack2<Elem>(x, y);
  const float2 h = tc::unpack2<Elem>(hi);
  lo = tc::pack2<Elem>(x - h.x, y - h.y);
}

template <typename Elem, int HD>
struct TcWarp {
  using C = TcCfg<HD>;
  int lane, warp, g, t, wrow;
  tc::LdsmLane<HD> la, lb;  // rows16 (A operands, and B of [k][n] tiles by .trans); rows8x2 (B of [n][k] tiles)
  __device__ __forceinline__ TcWarp(int tid)
      : lane(tid & 31), warp(tid >> 5), g((tid & 31) >> 2), t(tid & 3), wrow((tid >> 5) * 16),
        la(tc::ldsm_rows16_row(tid & 31), tc::ldsm_rows16_chunk(tid & 31)),
        lb(tc::ldsm_rows8x2_row(tid & 31), tc::ldsm_rows8x2_chunk(tid & 31)) {}

  // s[8 np + ..] = X[wrow .. wrow + 15] . Y[16 np .. 16 np + 15]^T over the HD columns, for np in [lo, hi)
  // (16-row groups of the chunk); other groups are left 0. X and Y are row-major [row][HD] tiles.
  __device__ __forceinline__ void xyT(uint32_t uX, uint32_t uY, int lo, int hi, float (&s)[C::kC / 8][4]) const {
#pragma unroll
    for (int j = 0; j < C::kC / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
      uint32_t xa[4];
      tc::ldsm_x4(uX + la(wrow, 2 * ks), xa);
#pragma unroll
      for (int np = 0; np < C::kC / 16; ++np) {
        if (np < lo || np >= hi) continue;
        uint32_t yb[4];
        tc::ldsm_x4(uY + lb(np * 16, 2 * ks), yb);
        tc::mma16816<Elem>(s[2 * np], xa, yb[0], yb[1]);
        tc::mma16816<Elem>(s[2 * np + 1], xa, yb[2], yb[3]);
      }
    }
  }
  // o += P(s) . Z over the chunk rows of 16-row groups kk in [lo, hi): s (this warp's 16 x kC accumulators)
  // re-packed as A fragments, Z a row-major [chunk row][HD] tile read transposed into B fragments.
  __device__ __forceinline__ void pz(const float (&s)[C::kC / 8][4], uint32_t uZ, int lo, int hi,
                                     float (&o)[HD / 8][4]) const {
#pragma unroll
    for (int kk = 0; kk < C::kC / 16; ++kk) {
      if (kk < lo || kk >= hi) continue;
      uint32_t pa[4];
      pa[0] = tc::pack2<Elem>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = tc::pack2<Elem>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = tc::pack2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = tc::pack2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {
        uint32_t zb[4];
        tc::ldsm_x4_trans(uZ + la(kk * 16, 2 * dp), zb);
        tc::mma16816<Elem>(o[2 * dp], pa, zb[0], zb[1]);
        tc::mma16816<Elem>(o[2 * dp + 1], pa, zb[2], zb[3]);
      }
    }
  }
  // o += X[wrow .. wrow + 15] . M with M the fp32 state (HD x HD, row length kLdS): M = S when !kTrans,
  // M = S^T when kTrans; S split into hi + lo Elem parts as the fragments are built.
  template <bool kTrans>
  __device__ __forceinline__ void xs(uint32_t uX, const float* sS, float (&o)[HD / 8][4]) const {
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
      uint32_t xa[4];
      tc::ldsm_x4(uX + la(wrow, 2 * ks), xa);
#pragma unroll
      for (int nt = 0; nt < HD / 8; ++nt) {
        // B[k][n] for k = 16 ks + 2t (+1, +8, +9), n = 8 nt + g.
        float b00, b01, b10, b11;
        if (kTrans) {
          const float* s = sS + (8 * nt + g) * C::kLdS + 16 * ks + 2 * t;
          b00 = s[0], b01 = s[1], b10 = s[8], b11 = s[9];
        } else {
          const float* s = sS + (16 * ks + 2 * t) * C::kLdS + 8 * nt + g;
          b00 = s[0], b01 = s[C::kLdS], b10 = s[8 * C::kLdS], b11 = s[9 * C::kLdS];
        }
        uint32_t h0, l0, h1, l1;
        split2<Elem>(b00, b01, h0, l0);
        split2<Elem>(b10, b11, h1, l1);
        tc::mma16816<Elem>(o[nt], xa, h0, h1);
        tc::mma16816<Elem>(o[nt], xa, l0, l1);
      }
    }
  }
  // S += A^T B over the chunk (A, B row-major [chunk row][HD] tiles; fp32 accumulate, added into the fp32
  // state). Warp w owns the state rows of m-tiles w, w + 4, ... : no other thread touches them.
  __device__ __forceinline__ void add_aTb(uint32_t uA, uint32_t uB, float* sS) const {
#pragma unroll 1
    for (int mt = warp; mt < HD / 16; mt += C::kWarps) {
      float acc[HD / 8][4];
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < C::kC / 16; ++kk) {
        uint32_t aa[4];
        tc::ldsm_x4_trans(uA + lb(kk * 16, 2 * mt), aa);  // A fragment of A^T: the [k][m] block, transposed
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t bb[4];
          tc::ldsm_x4_trans(uB + la(kk * 16, 2 * dp), bb);
          tc::mma16816<Elem>(acc[2 * dp], aa, bb[0], bb[1]);
          tc::mma16816<Elem>(acc[2 * dp + 1], aa, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < HD / 8; ++nt) {
        float* r0 = sS + (16 * mt + g) * C::kLdS + 8 * nt + 2 * t;
        r0[0] += acc[nt][0];
        r0[1] += acc[nt][1];
        r0[8 * C::kLdS] += acc[nt][2];
        r0[8 * C::kLdS + 1] += acc[nt][3];
      }
    }
  }
};

// vec[a] += sum over rows r < n of A[r][a] (w ? w[r] : 1), a < d: one thread per column.
template <typename Elem, int HD>
__device__ __forceinline__ void add_col_sums(const char* tileA, int n, int d, const float* w, float* vec, int tid) {
  for (int a = tid; a < d; a += TcCfg<HD>::kThreads) {
    float s = 0.f;
    for (int r = 0; r < n; ++r) {
      const float2 x = tile_pair<Elem, HD>(tileA, r, a & ~1);
      s += ((a & 1) ? x.y : x.x) * (w ? w[r] : 1.f);
    }
    vec[a] += s;
  }
}

// The state (HD x kLdS, zero past d0 x d1) and its vector (HD, zero past d0) from src / vsrc (contiguous
// d0 x d1 and d0, fp32) or zero.
template <int HD>
__device__ __forceinline__ void init_state(float* sS, float* sZ, const float* src, const float* vsrc, int d0, int d1,
                                           int tid) {
  for (int e = tid; e < HD * HD; e += TcCfg<HD>::kThreads) {
    const int r = e / HD, c = e % HD;
    sS[r * TcCfg<HD>::kLdS + c] = (src && r < d0 && c < d1) ? src[r * d1 + c] : 0.f;
  }
  for (int a = tid; a < HD; a += TcCfg<HD>::kThreads) sZ[a] = (vsrc && a < d0) ? vsrc[a] : 0.f;
}
template <int HD>
__device__ __forceinline__ void store_state(const float* sS, const float* sZ, float* dst, float* vdst, int d0, int d1,
                                            int tid) {
  for (int e = tid; e < d0 * d1; e += TcCfg<HD>::kThreads) dst[e] = sS[(e / d1) * TcCfg<HD>::kLdS + e % d1];
  for (int a = tid; a < d0; a += TcCfg<HD>::kThreads) vdst[a] = sZ[a];
}

// Rows [r0, r0 + n) of a (B, H, S, D) tensor into a swizzled tile (zero past n and d), asynchronously.
template <typename Elem, int HD>
__device__ __forceinline__ void load_chunk(char* tile, const Elem* base, int64_t rs, int64_t r0, int n, int d,
                                           int tid) {
  tc::load_tile_async<Elem, HD, TcCfg<HD>::kC, TcCfg<HD>::kThreads>(tc::smem_u32(tile), base + r0 * rs, rs, n, d,
                                                                    tid);
}

// Two-level scan over segments of chunks (p.segments > 1): lin_tc_segsum_kernel writes each segment's
// contribution to its slot, lin_scan_kernel turns the slots into the state entering each segment (in scan
// order, from the initial state) and slot nseg into the total, and the main kernels run one block per
// (batch x head, segment) from its slot. A slot is S (Dk x Dv), z (Dk) and a second vector (Dk, the dkdv
// pass's fp32-dd g), fp32.
__device__ __forceinline__ int64_t seg_begin(int64_t s, int64_t nseg, int64_t nch) { return s * nch / nseg; }
__device__ __forceinline__ int64_t slot_floats(const LinearParams& p) { return p.dk_dim * p.dv_dim + 2 * p.dk_dim; }
__device__ __forceinline__ float* seg_slot(const LinearParams& p, int64_t bh, int64_t s) {
  return static_cast<float*>(p.seg_state) + (bh * (p.segments + 1) + s) * slot_floats(p);
}

// Writes this warp's 16 rows of an accumulator o (columns < d) to rows i0 + .. of dst (rows < n), each
// element times mul(r, col) (r: the row within the chunk).
template <typename Elem, int HD, typename Mul>
__device__ __forceinline__ void write_rows(const TcWarp<Elem, HD>& W, const float (&o)[HD / 8][4], Elem* dst,
                                           const Strides& st, int64_t b, int64_t h, int64_t i0, int n, int d, Mul mul) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int lr = W.wrow + W.g + 8 * r;
    if (lr >= n) continue;
    Elem* row = dst + st.at(b, h, i0 + lr);
#pragma unroll
    for (int nt = 0; nt < HD / 8; ++nt) {
      const int col = 8 * nt + 2 * W.t;
      if (col < d) {
        const float2 m = mul(lr, col);
        *reinterpret_cast<uint32_t*>(row + col) = tc::pack2<Elem>(o[nt][2 * r] * m.x, o[nt][2 * r + 1] * m.y);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward

template <typename Elem, int HD>
__global__ void __launch_bounds__(TcCfg<HD>::kThreads, 1) lin_tc_fwd_kernel(const __grid_constant__ LinearParams p) {
  using C = TcCfg<HD>;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const TcWarp<Elem, HD> W(tid);
  const int64_t bh = blockIdx.x, seg = blockIdx.y, nseg = p.segments;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  char* cQ = smem;
  char* cK = smem + C::kTileBytes;
  char* cV = cK + C::kTileBytes;
  float* sS = reinterpret_cast<float*>(cV + C::kTileBytes);  // HD x kLdS, the state (0 past dk / dv)
  float* sZ = sS + HD * C::kLdS;                              // HD
  const uint32_t uQ = tc::smem_u32(cQ), uK = tc::smem_u32(cK), uV = tc::smem_u32(cV);
  const Elem* qg = static_cast<const Elem*>(p.q) + p.q_st.at(b, h, 0);
  const Elem* kg = static_cast<const Elem*>(p.k) + p.k_st.at(b, h, 0);
  const Elem* vg = static_cast<const Elem*>(p.v) + p.v_st.at(b, h, 0);
  const float scale = static_cast<float>(p.scale);
  const float eps = static_cast<float>(p.eps);
  if (nseg > 1) {
    const float* sl = seg_slot(p, bh, p.causal ? seg : nseg);
    init_state<HD>(sS, sZ, sl, sl + dk * dv, dk, dv, tid);
  } else {
    init_state<HD>(sS, sZ, p.s0 ? static_cast<const float*>(p.s0) + bh * dk * dv : nullptr,
                   p.z0 ? static_cast<const float*>(p.z0) + bh * dk : nullptr, dk, dv, tid);
  }

  // This warp's 16 rows of the query chunk in cQ (n valid rows, first row i0): o (the intra part, row sums
  // dsum) + Qf S, divided by den, written to out and den.
  auto emit = [&](int64_t i0, int n, float (&o)[HD / 8][4], const float (&dsum)[2]) {
    W.template xs<false>(uQ, sS, o);
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float qz = 0.f;
      if (p.normalize) {
#pragma unroll 4
        for (int m = 0; m < HD / 8; ++m) {
          const int col = 8 * m + 2 * W.t;
          const float2 x = tile_pair<Elem, HD>(cQ, W.wrow + W.g + 8 * r, col);
          qz += x.x * sZ[col] + x.y * sZ[col + 1];
        }
      }
      const float den = p.normalize ? tc::quad_sum(qz + dsum[r]) + eps : 1.f;
      inv[r] = 1.f / den;
      const int lr = W.wrow + W.g + 8 * r;
      if (W.t == 0 && lr < n) static_cast<float*>(p.den)[bh * p.sq + i0 + lr] = den;
    }
    write_rows<Elem, HD>(W, o, static_cast<Elem*>(p.o), p.o_st, b, h, i0, n, dv, [&](int lr, int) {
      const float x = inv[(lr - W.wrow) >> 3];
      return make_float2(x, x);
    });
  };

  if (p.causal) {
    const int64_t nch = (p.sq + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = seg_begin(seg, nseg, nch); c < seg_begin(seg + 1, nseg, nch); ++c) {
      const int64_t i0 = c * C::kC;
      const int n = static_cast<int>(p.sq - i0 < C::kC ? p.sq - i0 : C::kC);
      load_chunk<Elem, HD>(cQ, qg, p.q_st.s, i0, n, dk, tid);
      load_chunk<Elem, HD>(cK, kg, p.k_st.s, i0, n, dk, tid);
      load_chunk<Elem, HD>(cV, vg, p.v_st.s, i0, n, dv, tid);
      tc::cp_async_commit();
      tc::cp_async_wait<0>();
      __syncthreads();
      features_tile<Elem, HD>(cQ, n, dk, scale, p.feature, tid);
      features_tile<Elem, HD>(cK, n, dk, 1.f, p.feature, tid);
      __syncthreads();
      // A = mask(Qf Kf^T) over the keys up to this warp's last row (16-key groups 0 .. warp), rounded to Elem
      // here as the A V product will see it, so that the row sums divide exactly the weights used: one key
      // gives out = v (bf16: 5e-3 of |v| off with fp32 sums, emulator), and the backward's dN . v + dd cancels.
      float s[C::kC / 8][4];
      W.xyT(uQ, uK, 0, W.warp + 1, s);
      float dsum[2] = {0.f, 0.f};
#pragma unroll
      for (int jn = 0; jn < C::kC / 8; ++jn)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
          const int row = W.wrow + W.g + 8 * (e >> 1), key = 8 * jn + 2 * W.t;
          const float2 r = tc::unpack2<Elem>(tc::pack2<Elem>(key > row ? 0.f : s[jn][e], key + 1 > row ? 0.f : s[jn][e + 1]));
          s[jn][e] = r.x;
          s[jn][e + 1] = r.y;
          dsum[e >> 1] += r.x + r.y;
        }
      float o[HD / 8][4];
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
      W.pz(s, uV, 0, W.warp + 1, o);
      emit(i0, n, o, dsum);
      __syncthreads();  // every warp has read the state before this chunk is added to it
      W.add_aTb(uK, uV, sS);
      add_col_sums<Elem, HD>(cK, n, dk, nullptr, sZ, tid);
      __syncthreads();  // the state is complete, and Q / K / V may be refilled
    }
  } else {
    const int64_t nk = nseg > 1 ? 0 : (p.sk + C::kC - 1) / C::kC;  // segments: the scan made the total
#pragma unroll 1
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t j0 = c * C::kC;
      const int n = static_cast<int>(p.sk - j0 < C::kC ? p.sk - j0 : C::kC);
      load_chunk<Elem, HD>(cK, kg, p.k_st.s, j0, n, dk, tid);
      load_chunk<Elem, HD>(cV, vg, p.v_st.s, j0, n, dv, tid);
      tc::cp_async_commit();
      tc::cp_async_wait<0>();
      __syncthreads();
      features_tile<Elem, HD>(cK, n, dk, 1.f, p.feature, tid);
      __syncthreads();
      W.add_aTb(uK, uV, sS);
      add_col_sums<Elem, HD>(cK, n, dk, nullptr, sZ, tid);
      __syncthreads();
    }
    const int64_t nq = (p.sq + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = seg_begin(seg, nseg, nq); c < seg_begin(seg + 1, nseg, nq); ++c) {
      const int64_t i0 = c * C::kC;
      const int n = static_cast<int>(p.sq - i0 < C::kC ? p.sq - i0 : C::kC);
      load_chunk<Elem, HD>(cQ, qg, p.q_st.s, i0, n, dk, tid);
      tc::cp_async_commit();
      tc::cp_async_wait<0>();
      __syncthreads();
      features_tile<Elem, HD>(cQ, n, dk, scale, p.feature, tid);
      __syncthreads();
      float o[HD / 8][4];
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
      const float dsum[2] = {0.f, 0.f};
      emit(i0, n, o, dsum);
      __syncthreads();  // Q is refilled next
    }
  }
  if (nseg == 1)  // (with segments the scan writes the final state)
    store_state<HD>(sS, sZ, static_cast<float*>(p.s_out) + bh * dk * dv, static_cast<float*>(p.z_out) + bh * dk,
                    dk, dv, tid);
}

// ------------------------------------------------------------------------------------------------
// Backward. Two kernels, one block per (batch, head) each: dq (the prefix state P, z forward over chunks)
// and dk / dv (the suffix state G, g in reverse), with dN = dO / den and dd = -(dN . o) (0 when not
// normalised) per row:
//   dq pass:    dA = mask(dN V^T + dd 1^T),  dQf = dA Kf + dN P^T + dd z^T;  then P += Kf^T V, z += colsum Kf
//   dk/dv pass: dA^T = mask(V dN^T + 1 dd^T),  dKf = dA^T Qf + V G^T + 1 g^T,
//               A^T = mask(Kf Qf^T),  dV = A^T dN + Kf G;  then G += Qf^T dN, g += Qf^T dd
// dq = dQf phi'(Qf) scale, dk = dKf phi'(Kf), phi' read off the (rounded) features as the CPU kernels do.

// The chunk's dO (rows i0 + .., already in cD) becomes dN = dO / den in place; sInv[r] = 1 / den,
// sDD[r] = dd (0 for rows >= n). dd is the dot of the ROUNDED dN (the one the mma products see) with o: in
// dN . v_j + dd the two then cancel as they do in exact arithmetic (a single key: dq = 0 up to eps), where
// an fp32 dN here gave dq errors of 1e-2 of the floor at S = 1 (emulator, fp16). sDDx[r]: dd from the fp32
// dN, for the one output that is a plain sum of dd (dz0 = dz + sum dd qf), where the rounded one left
// 2e-2 of the floor at S = 1. One warp per 16 rows.
template <typename Elem, int HD>
__device__ __forceinline__ void prepare_dout(const LinearParams& p, const TcWarp<Elem, HD>& W, char* cD, float* sInv,
                                             float* sDD, float* sDDx, int64_t b, int64_t h, int64_t i0, int n, int dv,
                                             int tid) {
  const int64_t bh = b * p.heads + h;
  if (W.lane < 16) {
    const int lr = W.wrow + W.lane;
    sInv[lr] = lr < n ? 1.f / static_cast<const float*>(p.den)[bh * p.sq + i0 + lr] : 0.f;
  }
  __syncthreads();
  constexpr int kPairs = HD / 2;
  for (int idx = tid; idx < n * kPairs; idx += TcCfg<HD>::kThreads) {
    const int r = idx / kPairs;
    const int col = 2 * (idx - r * kPairs);
    if (col >= dv) continue;
    uint32_t* w = tile_word<HD>(cD, r, col);
    const float2 x = tc::unpack2<Elem>(*w);
    *w = tc::pack2<Elem>(x.x * sInv[r], x.y * sInv[r]);
  }
  __syncthreads();
  for (int r = 0; r < 16; ++r) {
    const int lr = W.wrow + r;
    float dot = 0.f, dotx = 0.f;
    if (lr < n && p.normalize) {
      const Elem* oo = static_cast<const Elem*>(p.o) + p.o_st.at(b, h, i0 + lr);
      const Elem* go = static_cast<const Elem*>(p.dout) + p.do_st.at(b, h, i0 + lr);
      for (int col = 2 * W.lane; col < dv; col += 64) {
        const float2 x = tile_pair<Elem, HD>(cD, lr, col);
        const float2 y = tc::unpack2<Elem>(*reinterpret_cast<const uint32_t*>(oo + col));
        const float2 z = tc::unpack2<Elem>(*reinterpret_cast<const uint32_t*>(go + col));
        dot += x.x * y.x + x.y * y.y;
        dotx += z.x * y.x + z.y * y.y;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      dot += __shfl_xor_sync(0xffffffffu, dot, off);
      dotx += __shfl_xor_sync(0xffffffffu, dotx, off);
    }
    if (W.lane == 0) {
      sDD[lr] = -dot;
      sDDx[lr] = -dotx * sInv[lr];
    }
  }
}

template <typename Elem, int HD>
struct BwdSmem {
  using C = TcCfg<HD>;
  char *cQ, *cK, *cV, *cD;
  float *sS, *sZ, *sZx, *sInv, *sDD, *sDDx;
  uint32_t uQ, uK, uV, uD;
  __device__ __forceinline__ explicit BwdSmem(char* smem) {
    cQ = smem;
    cK = cQ + C::kTileBytes;
    cV = cK + C::kTileBytes;
    cD = cV + C::kTileBytes;
    sS = reinterpret_cast<float*>(cD + C::kTileBytes);
    sZ = sS + HD * C::kLdS;
    sZx = sZ + HD;
    sInv = sZx + HD;
    sDD = sInv + C::kC;
    sDDx = sDD + C::kC;
    uQ = tc::smem_u32(cQ);
    uK = tc::smem_u32(cK);
    uV = tc::smem_u32(cV);
    uD = tc::smem_u32(cD);
  }
};

// Loads the tiles of chunk rows [i0, i0 + n) that `what` names (bits: 1 Q, 2 K, 4 V, 8 dO), applies the
// feature maps and turns dO into dN. Ends with a barrier.
template <typename Elem, int HD>
__device__ __forceinline__ void bwd_chunk(const LinearParams& p, const TcWarp<Elem, HD>& W, const BwdSmem<Elem, HD>& m,
                                          int64_t b, int64_t h, int64_t i0, int n, int what, int tid) {
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  if (what & 1) load_chunk<Elem, HD>(m.cQ, static_cast<const Elem*>(p.q) + p.q_st.at(b, h, 0), p.q_st.s, i0, n, dk, tid);
  if (what & 2) load_chunk<Elem, HD>(m.cK, static_cast<const Elem*>(p.k) + p.k_st.at(b, h, 0), p.k_st.s, i0, n, dk, tid);
  if (what & 4) load_chunk<Elem, HD>(m.cV, static_cast<const Elem*>(p.v) + p.v_st.at(b, h, 0), p.v_st.s, i0, n, dv, tid);
  if (what & 8)
    load_chunk<Elem, HD>(m.cD, static_cast<const Elem*>(p.dout) + p.do_st.at(b, h, 0), p.do_st.s, i0, n, dv, tid);
  tc::cp_async_commit();
  tc::cp_async_wait<0>();
  __syncthreads();
  if (what & 1) features_tile<Elem, HD>(m.cQ, n, dk, static_cast<float>(p.scale), p.feature, tid);
  if (what & 2) features_tile<Elem, HD>(m.cK, n, dk, 1.f, p.feature, tid);
  if (what & 8) prepare_dout<Elem, HD>(p, W, m.cD, m.sInv, m.sDD, m.sDDx, b, h, i0, n, dv, tid);
  __syncthreads();
}

template <typename Elem, int HD>
__global__ void __launch_bounds__(TcCfg<HD>::kThreads, 1) lin_tc_dq_kernel(const __grid_constant__ LinearParams p) {
  using C = TcCfg<HD>;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const TcWarp<Elem, HD> W(tid);
  const BwdSmem<Elem, HD> m(smem);
  const int64_t bh = blockIdx.x, seg = blockIdx.y, nseg = p.segments;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  const float scale = static_cast<float>(p.scale);
  if (nseg > 1) {
    const float* sl = seg_slot(p, bh, p.causal ? seg : nseg);
    init_state<HD>(m.sS, m.sZ, sl, sl + dk * dv, dk, dv, tid);
  } else {
    init_state<HD>(m.sS, m.sZ, p.s0 ? static_cast<const float*>(p.s0) + bh * dk * dv : nullptr,
                   p.z0 ? static_cast<const float*>(p.z0) + bh * dk : nullptr, dk, dv, tid);
  }

  // dQf += dN P^T + dd z^T for this warp's rows, then dq = dQf phi'(Qf) scale.
  auto emit = [&](int64_t i0, int n, float (&o)[HD / 8][4]) {
    W.template xs<true>(m.uD, m.sS, o);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float dd = m.sDD[W.wrow + W.g + 8 * r];
#pragma unroll
      for (int nt = 0; nt < HD / 8; ++nt) {
        o[nt][2 * r] += dd * m.sZ[8 * nt + 2 * W.t];
        o[nt][2 * r + 1] += dd * m.sZ[8 * nt + 2 * W.t + 1];
      }
    }
    write_rows<Elem, HD>(W, o, static_cast<Elem*>(p.dq), p.dq_st, b, h, i0, n, dk, [&](int lr, int col) {
      const float2 f = tile_pair<Elem, HD>(m.cQ, lr, col);
      return make_float2(phi_grad(f.x, p.feature) * scale, phi_grad(f.y, p.feature) * scale);
    });
  };

  if (p.causal) {
    const int64_t nch = (p.sq + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = seg_begin(seg, nseg, nch); c < seg_begin(seg + 1, nseg, nch); ++c) {
      const int64_t i0 = c * C::kC;
      const int n = static_cast<int>(p.sq - i0 < C::kC ? p.sq - i0 : C::kC);
      bwd_chunk<Elem, HD>(p, W, m, b, h, i0, n, 1 | 2 | 4 | 8, tid);
      float s[C::kC / 8][4];
      W.xyT(m.uD, m.uV, 0, W.warp + 1, s);  // dN V^T
#pragma unroll
      for (int jn = 0; jn < C::kC / 8; ++jn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = W.wrow + W.g + 8 * (e >> 1), key = 8 * jn + 2 * W.t + (e & 1);
          s[jn][e] = key > row ? 0.f : s[jn][e] + m.sDD[row];
        }
      float o[HD / 8][4];
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
      W.pz(s, m.uK, 0, W.warp + 1, o);  // dA Kf
      emit(i0, n, o);
      __syncthreads();  // every warp has read P and z
      W.add_aTb(m.uK, m.uV, m.sS);
      add_col_sums<Elem, HD>(m.cK, n, dk, nullptr, m.sZ, tid);
      __syncthreads();
    }
  } else {
    const int64_t nk = nseg > 1 ? 0 : (p.sk + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t j0 = c * C::kC;
      const int n = static_cast<int>(p.sk - j0 < C::kC ? p.sk - j0 : C::kC);
      bwd_chunk<Elem, HD>(p, W, m, b, h, j0, n, 2 | 4, tid);
      W.add_aTb(m.uK, m.uV, m.sS);
      add_col_sums<Elem, HD>(m.cK, n, dk, nullptr, m.sZ, tid);
      __syncthreads();
    }
    const int64_t nq = (p.sq + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = seg_begin(seg, nseg, nq); c < seg_begin(seg + 1, nseg, nq); ++c) {
      const int64_t i0 = c * C::kC;
      const int n = static_cast<int>(p.sq - i0 < C::kC ? p.sq - i0 : C::kC);
      bwd_chunk<Elem, HD>(p, W, m, b, h, i0, n, 1 | 8, tid);
      float o[HD / 8][4];
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
      emit(i0, n, o);
      __syncthreads();
    }
  }
}

template <typename Elem, int HD>
__global__ void __launch_bounds__(TcCfg<HD>::kThreads, 1) lin_tc_dkdv_kernel(const __grid_constant__ LinearParams p) {
  using C = TcCfg<HD>;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const TcWarp<Elem, HD> W(tid);
  const BwdSmem<Elem, HD> m(smem);
  const int64_t bh = blockIdx.x, seg = blockIdx.y, nseg = p.segments;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  // g twice: sZ from the rounded dd (for dk, consistent with G), sZx from the fp32 dd (the dz0 output).
  if (nseg > 1) {
    const float* sl = seg_slot(p, bh, p.causal ? seg : nseg);
    init_state<HD>(m.sS, m.sZ, sl, sl + dk * dv, dk, dv, tid);
  } else {
    init_state<HD>(m.sS, m.sZ, p.ds_out ? static_cast<const float*>(p.ds_out) + bh * dk * dv : nullptr,
                   p.dz_out ? static_cast<const float*>(p.dz_out) + bh * dk : nullptr, dk, dv, tid);
    for (int a = tid; a < HD; a += C::kThreads)
      m.sZx[a] = (p.dz_out && a < dk) ? static_cast<const float*>(p.dz_out)[bh * dk + a] : 0.f;
  }

  // This warp's 16 key rows of the chunk in cK / cV (first row j0): dKf, dV from the intra parts (when
  // intra) and the suffix state G, g.
  auto emit = [&](int64_t j0, int n, bool intra) {
    float o[HD / 8][4];
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    if (intra) {
      float s[C::kC / 8][4];
      W.xyT(m.uV, m.uD, W.warp, C::kC / 16, s);  // V dN^T: keys (rows) x queries (columns >= the key)
#pragma unroll
      for (int jn = 0; jn < C::kC / 8; ++jn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = W.wrow + W.g + 8 * (e >> 1), query = 8 * jn + 2 * W.t + (e & 1);
          s[jn][e] = query < key ? 0.f : s[jn][e] + m.sDD[query];
        }
      W.pz(s, m.uQ, W.warp, C::kC / 16, o);  // dA^T Qf
    }
    W.template xs<true>(m.uV, m.sS, o);  // + V G^T
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int nt = 0; nt < HD / 8; ++nt) {
        o[nt][2 * r] += m.sZ[8 * nt + 2 * W.t];
        o[nt][2 * r + 1] += m.sZ[8 * nt + 2 * W.t + 1];
      }
    write_rows<Elem, HD>(W, o, static_cast<Elem*>(p.dk), p.dk_st, b, h, j0, n, dk, [&](int lr, int col) {
      const float2 f = tile_pair<Elem, HD>(m.cK, lr, col);
      return make_float2(phi_grad(f.x, p.feature), phi_grad(f.y, p.feature));
    });
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    if (intra) {
      float s[C::kC / 8][4];
      W.xyT(m.uK, m.uQ, W.warp, C::kC / 16, s);  // Kf Qf^T
#pragma unroll
      for (int jn = 0; jn < C::kC / 8; ++jn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = W.wrow + W.g + 8 * (e >> 1), query = 8 * jn + 2 * W.t + (e & 1);
          if (query < key) s[jn][e] = 0.f;
        }
      W.pz(s, m.uD, W.warp, C::kC / 16, o);  // A^T dN
    }
    W.template xs<false>(m.uK, m.sS, o);  // + Kf G
    write_rows<Elem, HD>(W, o, static_cast<Elem*>(p.dv), p.dv_st, b, h, j0, n, dv,
                         [](int, int) { return make_float2(1.f, 1.f); });
  };

  if (p.causal) {
    const int64_t nch = (p.sq + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = seg_begin(seg + 1, nseg, nch) - 1; c >= seg_begin(seg, nseg, nch); --c) {
      const int64_t i0 = c * C::kC;
      const int n = static_cast<int>(p.sq - i0 < C::kC ? p.sq - i0 : C::kC);
      bwd_chunk<Elem, HD>(p, W, m, b, h, i0, n, 1 | 2 | 4 | 8, tid);
      emit(i0, n, true);
      __syncthreads();  // every warp has read G and g
      W.add_aTb(m.uQ, m.uD, m.sS);
      add_col_sums<Elem, HD>(m.cQ, n, dk, m.sDD, m.sZ, tid);
      add_col_sums<Elem, HD>(m.cQ, n, dk, m.sDDx, m.sZx, tid);
      __syncthreads();
    }
  } else {
    const int64_t nq = nseg > 1 ? 0 : (p.sq + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = 0; c < nq; ++c) {
      const int64_t i0 = c * C::kC;
      const int n = static_cast<int>(p.sq - i0 < C::kC ? p.sq - i0 : C::kC);
      bwd_chunk<Elem, HD>(p, W, m, b, h, i0, n, 1 | 8, tid);
      W.add_aTb(m.uQ, m.uD, m.sS);
      add_col_sums<Elem, HD>(m.cQ, n, dk, m.sDD, m.sZ, tid);
      add_col_sums<Elem, HD>(m.cQ, n, dk, m.sDDx, m.sZx, tid);
      __syncthreads();
    }
    const int64_t nk = (p.sk + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = seg_begin(seg, nseg, nk); c < seg_begin(seg + 1, nseg, nk); ++c) {
      const int64_t j0 = c * C::kC;
      const int n = static_cast<int>(p.sk - j0 < C::kC ? p.sk - j0 : C::kC);
      bwd_chunk<Elem, HD>(p, W, m, b, h, j0, n, 2 | 4, tid);
      emit(j0, n, false);
      __syncthreads();
    }
  }
  if (nseg == 1)
    store_state<HD>(m.sS, m.sZx, static_cast<float*>(p.ds0) + bh * dk * dv, static_cast<float*>(p.dz0) + bh * dk, dk, dv,
                  tid);
}


// A segment's contribution to the scan state (p.segments > 1), block (batch x head, segment): keys
// (!kQueries: S += Kf^T V, z += colsum Kf over the segment's key chunks) or queries (kQueries: G += Qf^T dN,
// g += Qf^T dd with the rounded and with the fp32 dd) into seg_slot(seg).
template <typename Elem, int HD, bool kQueries>
__global__ void __launch_bounds__(TcCfg<HD>::kThreads, 1) lin_tc_segsum_kernel(const __grid_constant__ LinearParams p) {
  using C = TcCfg<HD>;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const TcWarp<Elem, HD> W(tid);
  const BwdSmem<Elem, HD> m(smem);
  const int64_t bh = blockIdx.x, seg = blockIdx.y, nseg = p.segments;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  init_state<HD>(m.sS, m.sZ, nullptr, nullptr, dk, dv, tid);
  for (int a = tid; a < HD; a += C::kThreads) m.sZx[a] = 0.f;
  const int64_t rows = kQueries || p.causal ? p.sq : p.sk;
  const int64_t nch = (rows + C::kC - 1) / C::kC;
#pragma unroll 1
  for (int64_t c = seg_begin(seg, nseg, nch); c < seg_begin(seg + 1, nseg, nch); ++c) {
    const int64_t i0 = c * C::kC;
    const int n = static_cast<int>(rows - i0 < C::kC ? rows - i0 : C::kC);
    __syncthreads();  // the previous chunk's tiles are no longer read
    bwd_chunk<Elem, HD>(p, W, m, b, h, i0, n, kQueries ? (1 | 8) : (2 | 4), tid);
    if (kQueries) {
      W.add_aTb(m.uQ, m.uD, m.sS);
      add_col_sums<Elem, HD>(m.cQ, n, dk, m.sDD, m.sZ, tid);
      add_col_sums<Elem, HD>(m.cQ, n, dk, m.sDDx, m.sZx, tid);
    } else {
      W.add_aTb(m.uK, m.uV, m.sS);
      add_col_sums<Elem, HD>(m.cK, n, dk, nullptr, m.sZ, tid);
    }
  }
  __syncthreads();
  float* sl = seg_slot(p, bh, seg);
  store_state<HD>(m.sS, m.sZ, sl, sl + dk * dv, dk, dv, tid);
  for (int a = tid; a < dk; a += C::kThreads) sl[dk * dv + dk + a] = m.sZx[a];
}

// Exclusive scan of the segment slots, in place, one thread per slot entry of one (batch x head): slot s
// becomes init + the slots before s in scan order (forward: 0 .. s - 1; reverse: s + 1 .. nseg - 1), slot
// nseg the total. init: init_s (Dk x Dv) and init_z (Dk, for both vectors), or 0. The total also goes to
// out_s / out_z when given (out_z from the first vector, or the second when zx).
__global__ void __launch_bounds__(256) lin_scan_kernel(const __grid_constant__ LinearParams p, const float* init_s,
                                                       const float* init_z, bool reverse, float* out_s, float* out_z,
                                                       bool zx) {
  const int64_t bh = blockIdx.y;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  const int64_t ns = p.dk_dim * p.dv_dim, dk = p.dk_dim;
  if (e >= slot_floats(p)) return;
  float acc = 0.f;
  if (e < ns) acc = init_s ? init_s[bh * ns + e] : 0.f;
  else acc = init_z ? init_z[bh * dk + (e - ns) % dk] : 0.f;
  for (int64_t i = 0; i < p.segments; ++i) {
    const int64_t s = reverse ? p.segments - 1 - i : i;
    float* x = seg_slot(p, bh, s) + e;
    const float t = *x;
    *x = acc;
    acc += t;
  }
  seg_slot(p, bh, p.segments)[e] = acc;
  if (out_s && e < ns) out_s[bh * ns + e] = acc;
  if (out_z && e >= ns && (e - ns >= dk) == zx) out_z[bh * dk + (e - ns) % dk] = acc;
}

// ================================================================================================
// fp32 / fp64 on CUDA cores. T: the tensors' type; state and dot products in double.

// Shared vectors of one row, as double: qf, kf (Dk), v, dn, o (Dv).
template <typename T>
struct RowLoader {
  const LinearParams& p;
  int64_t b, h;
  int dk, dv;
  __device__ __forceinline__ const T* row(const void* base, const Strides& st, int64_t i) const {
    return static_cast<const T*>(base) + st.at(b, h, i);
  }
  __device__ __forceinline__ void q(double* qf, int64_t i) const {
    const T* r = row(p.q, p.q_st, i);
    for (int a = threadIdx.x; a < dk; a += kGThreads) qf[a] = phi(static_cast<double>(r[a]) * p.scale, p.feature);
  }
  __device__ __forceinline__ void k(double* kf, int64_t i) const {
    const T* r = row(p.k, p.k_st, i);
    for (int a = threadIdx.x; a < dk; a += kGThreads) kf[a] = phi(static_cast<double>(r[a]), p.feature);
  }
  __device__ __forceinline__ void v(double* vv, int64_t i) const {
    const T* r = row(p.v, p.v_st, i);
    for (int c = threadIdx.x; c < dv; c += kGThreads) vv[c] = static_cast<double>(r[c]);
  }
  // dn = dO / den and o (for dd).
  __device__ __forceinline__ void dout(double* dn, double* o, int64_t i) const {
    const T* g = row(p.dout, p.do_st, i);
    const T* orow = row(p.o, p.o_st, i);
    const double inv = 1.0 / static_cast<double>(static_cast<const T*>(p.den)[(b * p.heads + h) * p.sq + i]);
    for (int c = threadIdx.x; c < dv; c += kGThreads) {
      dn[c] = static_cast<double>(g[c]) * inv;
      o[c] = static_cast<double>(orow[c]);
    }
  }
  // dd = -(dn . o) when normalised (every thread computes it from shared memory).
  __device__ __forceinline__ double dd(const double* dn, const double* o) const {
    if (!p.normalize) return 0.0;
    double s = 0.0;
    for (int c = 0; c < dv; ++c) s += dn[c] * o[c];
    return -s;
  }
};

// Forward. p.work: (B, H, Dk, Dv) double, the running state P (column c owned by the threads c mod kGThreads).
template <typename T>
__global__ void __launch_bounds__(kGThreads) lin_generic_fwd_kernel(const __grid_constant__ LinearParams p) {
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x;
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  const RowLoader<T> ld{p, bh / p.heads, bh % p.heads, dk, dv};
  double* qf = reinterpret_cast<double*>(smem);
  double* kf = qf + dk;
  double* z = kf + dk;
  double* vv = z + dk;
  double* P = static_cast<double*>(p.work) + bh * dk * dv;
  for (int c = tid; c < dv; c += kGThreads)
    for (int a = 0; a < dk; ++a) P[a * dv + c] = p.s0 ? static_cast<const T*>(p.s0)[bh * dk * dv + a * dv + c] : 0.0;
  for (int a = tid; a < dk; a += kGThreads) z[a] = p.z0 ? static_cast<const T*>(p.z0)[bh * dk + a] : 0.0;

  // Adds row j's key and value (staged) to P (own columns) and z (own entries, done at staging).
  auto add_key = [&](int64_t j) {
    ld.k(kf, j);
    for (int a = tid; a < dk; a += kGThreads) z[a] += kf[a];
    ld.v(vv, j);
  };
  auto emit = [&](int64_t i, bool add) {
    double den = 1.0;
    if (p.normalize) {
      den = p.eps;
      for (int a = 0; a < dk; ++a) den += qf[a] * z[a];
    }
    T* orow = static_cast<T*>(p.o) + p.o_st.at(bh / p.heads, bh % p.heads, i);
    for (int c = tid; c < dv; c += kGThreads) {
      double acc = 0.0;
      for (int a = 0; a < dk; ++a) {
        double x = P[a * dv + c];
        if (add) {
          x += kf[a] * vv[c];
          P[a * dv + c] = x;
        }
        acc += qf[a] * x;
      }
      orow[c] = static_cast<T>(acc / den);
    }
    if (tid == 0) static_cast<T*>(p.den)[bh * p.sq + i] = static_cast<T>(den);
  };

  if (p.causal) {
    for (int64_t i = 0; i < p.sq; ++i) {
      ld.q(qf, i);
      add_key(i);
      __syncthreads();
      emit(i, true);
      __syncthreads();
    }
  } else {
    for (int64_t j = 0; j < p.sk; ++j) {
      add_key(j);
      __syncthreads();
      for (int c = tid; c < dv; c += kGThreads)
        for (int a = 0; a < dk; ++a) P[a * dv + c] += kf[a] * vv[c];
      __syncthreads();
    }
    for (int64_t i = 0; i < p.sq; ++i) {
      ld.q(qf, i);
      __syncthreads();
      emit(i, false);
      __syncthreads();
    }
  }
  T* so = static_cast<T*>(p.s_out) + bh * dk * dv;
  for (int c = tid; c < dv; c += kGThreads)
    for (int a = 0; a < dk; ++a) so[a * dv + c] = static_cast<T>(P[a * dv + c]);
  for (int a = tid; a < dk; a += kGThreads) static_cast<T*>(p.z_out)[bh * dk + a] = static_cast<T>(z[a]);
}

// Backward pass 1: dq. p.work holds P^T (Dv x Dk; column a owned by the threads a mod kGThreads).
template <typename T>
__global__ void __launch_bounds__(kGThreads) lin_generic_dq_kernel(const __grid_constant__ LinearParams p) {
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  const RowLoader<T> ld{p, b, h, dk, dv};
  double* qf = reinterpret_cast<double*>(smem);
  double* kf = qf + dk;
  double* z = kf + dk;
  double* vv = z + dk;
  double* dn = vv + dv;
  double* ob = dn + dv;
  double* Pt = static_cast<double*>(p.work) + bh * dk * dv;
  for (int a = tid; a < dk; a += kGThreads) {
    for (int c = 0; c < dv; ++c) Pt[c * dk + a] = p.s0 ? static_cast<const T*>(p.s0)[bh * dk * dv + a * dv + c] : 0.0;
    z[a] = p.z0 ? static_cast<const T*>(p.z0)[bh * dk + a] : 0.0;
  }
  auto add_key = [&](int64_t j) {
    ld.k(kf, j);
    for (int a = tid; a < dk; a += kGThreads) z[a] += kf[a];
    ld.v(vv, j);
  };
  // dq_i (own entries a) = (P dN_i + dd z)[a] phi'(qf[a]) scale, P first advanced by the staged key when add.
  auto emit = [&](int64_t i, bool add) {
    const double dd = ld.dd(dn, ob);
    T* dq = static_cast<T*>(p.dq) + p.dq_st.at(b, h, i);
    for (int a = tid; a < dk; a += kGThreads) {
      double acc = 0.0;
      for (int c = 0; c < dv; ++c) {
        double x = Pt[c * dk + a];
        if (add) {
          x += kf[a] * vv[c];
          Pt[c * dk + a] = x;
        }
        acc += x * dn[c];
      }
      dq[a] = static_cast<T>((acc + dd * z[a]) * phi_grad(qf[a], p.feature) * p.scale);
    }
  };
  if (p.causal) {
    for (int64_t i = 0; i < p.sq; ++i) {
      ld.q(qf, i);
      add_key(i);
      ld.dout(dn, ob, i);
      __syncthreads();
      emit(i, true);
      __syncthreads();
    }
  } else {
    for (int64_t j = 0; j < p.sk; ++j) {
      add_key(j);
      __syncthreads();
      for (int a = tid; a < dk; a += kGThreads)
        for (int c = 0; c < dv; ++c) Pt[c * dk + a] += kf[a] * vv[c];
      __syncthreads();
    }
    for (int64_t i = 0; i < p.sq; ++i) {
      ld.q(qf, i);
      ld.dout(dn, ob, i);
      __syncthreads();
      emit(i, false);
      __syncthreads();
    }
  }
}

// Backward pass 2: dk, dv, ds0, dz0, reverse over rows. p.work holds G (Dk x Dv); g in shared memory.
// G is updated by column owners (c), then read by row owners (a) after a barrier.
template <typename T>
__global__ void __launch_bounds__(kGThreads) lin_generic_dkdv_kernel(const __grid_constant__ LinearParams p) {
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  const RowLoader<T> ld{p, b, h, dk, dv};
  double* qf = reinterpret_cast<double*>(smem);
  double* kf = qf + dk;
  double* gz = kf + dk;
  double* vv = gz + dk;
  double* dn = vv + dv;
  double* ob = dn + dv;
  double* G = static_cast<double*>(p.work) + bh * dk * dv;
  for (int c = tid; c < dv; c += kGThreads)
    for (int a = 0; a < dk; ++a) G[a * dv + c] = p.ds_out ? static_cast<const T*>(p.ds_out)[bh * dk * dv + a * dv + c] : 0.0;
  for (int a = tid; a < dk; a += kGThreads) gz[a] = p.dz_out ? static_cast<const T*>(p.dz_out)[bh * dk + a] : 0.0;

  // dV_j = G^T kf_j (own columns c), then, after a barrier, dKf_j = G v_j + g (own rows a).
  auto emit_dv = [&](int64_t j) {
    T* dvr = static_cast<T*>(p.dv) + p.dv_st.at(b, h, j);
    for (int c = tid; c < dv; c += kGThreads) {
      double acc = 0.0;
      for (int a = 0; a < dk; ++a) acc += G[a * dv + c] * kf[a];
      dvr[c] = static_cast<T>(acc);
    }
  };
  auto emit_dk = [&](int64_t j) {
    T* dkr = static_cast<T*>(p.dk) + p.dk_st.at(b, h, j);
    for (int a = tid; a < dk; a += kGThreads) {
      double acc = gz[a];
      for (int c = 0; c < dv; ++c) acc += G[a * dv + c] * vv[c];
      dkr[a] = static_cast<T>(acc * phi_grad(kf[a], p.feature));
    }
  };
  // G += qf dn^T (own columns), g += dd qf (own entries): a query row's share of the suffix state.
  auto add_q = [&]() {
    const double dd = ld.dd(dn, ob);
    for (int a = tid; a < dk; a += kGThreads) gz[a] += dd * qf[a];
    for (int c = tid; c < dv; c += kGThreads)
      for (int a = 0; a < dk; ++a) G[a * dv + c] += qf[a] * dn[c];
  };

  if (p.causal) {
    for (int64_t i = p.sq - 1; i >= 0; --i) {
      ld.q(qf, i);
      ld.k(kf, i);
      ld.v(vv, i);
      ld.dout(dn, ob, i);
      __syncthreads();
      add_q();
      emit_dv(i);
      __syncthreads();  // G complete for row i (other threads' columns)
      emit_dk(i);
      __syncthreads();
    }
  } else {
    for (int64_t i = 0; i < p.sq; ++i) {
      ld.q(qf, i);
      ld.dout(dn, ob, i);
      __syncthreads();
      add_q();
      __syncthreads();
    }
    for (int64_t j = 0; j < p.sk; ++j) {
      ld.k(kf, j);
      ld.v(vv, j);
      __syncthreads();
      emit_dv(j);
      emit_dk(j);
      __syncthreads();
    }
  }
  T* ds0 = static_cast<T*>(p.ds0) + bh * dk * dv;
  for (int c = tid; c < dv; c += kGThreads)
    for (int a = 0; a < dk; ++a) ds0[a * dv + c] = static_cast<T>(G[a * dv + c]);
  for (int a = tid; a < dk; a += kGThreads) static_cast<T*>(p.dz0)[bh * dk + a] = static_cast<T>(gz[a]);
}

}  // namespace lin
}  // namespace fused_attn
