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
// fp16 / bf16 forward on tensor cores

template <int HD>
struct TcCfg {
  static constexpr int kC = 64;        // rows per chunk
  static constexpr int kThreads = 128;  // 4 warps x 16 query rows
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kTileBytes = kC * HD * 2;
  // fp32 state row length: + 4 floats, so the B-fragment reads (rows 2t, columns g) hit 32 distinct banks.
  static constexpr int kLdS = HD + 4;
  static constexpr int kSmem = 3 * kTileBytes + (HD * kLdS + HD) * 4;
  static_assert(HD == 64 || HD == 128, "tensor-core linear attention is built for HD 64 and 128");
};

// phi(scale x) in place on rows < rows, columns < d (d % 8 == 0) of a swizzled kC x HD tile, two elements
// (one 32-bit word) at a time.
template <typename Elem, int HD>
__device__ __forceinline__ void features_tile(char* tile, int rows, int d, float scale, FeatureMap fm, int tid) {
  using Sw = tc::Swz<HD>;
  constexpr int kPairs = HD / 2;
  for (int idx = tid; idx < rows * kPairs; idx += TcCfg<HD>::kThreads) {
    const int r = idx / kPairs;
    const int col = 2 * (idx - r * kPairs);
    if (col >= d) continue;
    uint32_t* w = reinterpret_cast<uint32_t*>(tile + Sw::offset(r, col >> 3) + (col & 7) * 2);
    const float2 x = tc::unpack2<Elem>(*w);
    *w = tc::pack2<Elem>(phi(x.x * scale, fm), phi(x.y * scale, fm));
  }
}

// Element (r, col) of a swizzled tile, col even: the pair (col, col + 1).
template <typename Elem, int HD>
__device__ __forceinline__ float2 tile_pair(const char* tile, int r, int col) {
  return tc::unpack2<Elem>(*reinterpret_cast<const uint32_t*>(tile + tc::Swz<HD>::offset(r, col >> 3) + (col & 7) * 2));
}

// An fp32 pair as hi + lo Elem pairs: hi = round(x), lo = round(x - hi).
template <typename Elem>
__device__ __forceinline__ void split2(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = tc::pack2<Elem>(x, y);
  const float2 h = tc::unpack2<Elem>(hi);
  lo = tc::pack2<Elem>(x - h.x, y - h.y);
}

template <typename Elem, int HD>
__global__ void __launch_bounds__(TcCfg<HD>::kThreads, 1) lin_tc_fwd_kernel(const __grid_constant__ LinearParams p) {
  using C = TcCfg<HD>;
  extern __shared__ __align__(128) char smem[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int dk = static_cast<int>(p.dk_dim), dv = static_cast<int>(p.dv_dim);
  const int wrow = warp * 16;

  char* cQ = smem;
  char* cK = smem + C::kTileBytes;
  char* cV = cK + C::kTileBytes;
  float* sS = reinterpret_cast<float*>(cV + C::kTileBytes);  // HD x kLdS, the state (0 past dk / dv)
  float* sZ = sS + HD * C::kLdS;                              // HD
  const uint32_t uQ = tc::smem_u32(cQ), uK = tc::smem_u32(cK), uV = tc::smem_u32(cV);
  const tc::LdsmLane<HD> la(tc::ldsm_rows16_row(lane), tc::ldsm_rows16_chunk(lane));
  const tc::LdsmLane<HD> lb(tc::ldsm_rows8x2_row(lane), tc::ldsm_rows8x2_chunk(lane));

  const Elem* qg = static_cast<const Elem*>(p.q) + p.q_st.at(b, h, 0);
  const Elem* kg = static_cast<const Elem*>(p.k) + p.k_st.at(b, h, 0);
  const Elem* vg = static_cast<const Elem*>(p.v) + p.v_st.at(b, h, 0);
  const float scale = static_cast<float>(p.scale);
  const float eps = static_cast<float>(p.eps);

  {
    const float* s0 = p.s0 ? static_cast<const float*>(p.s0) + bh * dk * dv : nullptr;
    const float* z0 = p.z0 ? static_cast<const float*>(p.z0) + bh * dk : nullptr;
    for (int e = tid; e < HD * HD; e += C::kThreads) {
      const int r = e / HD, c = e % HD;
      sS[r * C::kLdS + c] = (s0 && r < dk && c < dv) ? s0[r * dv + c] : 0.f;
    }
    for (int a = tid; a < HD; a += C::kThreads) sZ[a] = (z0 && a < dk) ? z0[a] : 0.f;
  }

  // Chunk loads: rows past n and columns past d zero-filled.
  auto load = [&](uint32_t dst, const Elem* base, int64_t rs, int64_t r0, int n, int d) {
    tc::load_tile_async<Elem, HD, C::kC, C::kThreads>(dst, base + r0 * rs, rs, n, d, tid);
  };

  // S += Kf^T V, z += colsum(Kf) over the chunk in cK / cV (n valid rows). Warp w owns the state rows of
  // m-tiles w, w + 4, ... (16 rows each): no other thread touches them.
  auto update_state = [&](int n) {
#pragma unroll 1
    for (int mt = warp; mt < HD / 16; mt += C::kWarps) {
      float acc[HD / 8][4];
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < C::kC / 16; ++kk) {
        uint32_t ka[4];
        tc::ldsm_x4_trans(uK + lb(kk * 16, 2 * mt), ka);  // A of Kf^T: the [k][m] block, transposed
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t vb[4];
          tc::ldsm_x4_trans(uV + la(kk * 16, 2 * dp), vb);
          tc::mma16816<Elem>(acc[2 * dp], ka, vb[0], vb[1]);
          tc::mma16816<Elem>(acc[2 * dp + 1], ka, vb[2], vb[3]);
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
    if (tid < dk) {
      float s = 0.f;
      for (int r = 0; r < n; ++r) {
        const float2 x = tile_pair<Elem, HD>(cK, r, tid & ~1);
        s += (tid & 1) ? x.y : x.x;
      }
      sZ[tid] += s;
    }
  };

  // This warp's 16 rows of the query chunk in cQ (n valid rows, first row i0): O (+= the intra part already
  // in o, with its row sums in dsum) + Qf S, divided by den, written to out and den.
  auto emit = [&](int64_t i0, int n, float (&o)[HD / 8][4], float (&dsum)[2]) {
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
      uint32_t qa[4];
      tc::ldsm_x4(uQ + la(wrow, 2 * ks), qa);
#pragma unroll
      for (int nt = 0; nt < HD / 8; ++nt) {
        const float* s = sS + (16 * ks + 2 * t) * C::kLdS + 8 * nt + g;
        uint32_t h0, l0, h1, l1;
        split2<Elem>(s[0], s[C::kLdS], h0, l0);
        split2<Elem>(s[8 * C::kLdS], s[9 * C::kLdS], h1, l1);
        tc::mma16816<Elem>(o[nt], qa, h0, h1);
        tc::mma16816<Elem>(o[nt], qa, l0, l1);
      }
    }
    float den[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float qz = 0.f;
      if (p.normalize) {
#pragma unroll 4
        for (int m = 0; m < HD / 8; ++m) {
          const int col = 8 * m + 2 * t;
          const float2 x = tile_pair<Elem, HD>(cQ, wrow + g + 8 * r, col);
          qz += x.x * sZ[col] + x.y * sZ[col + 1];
        }
      }
      den[r] = p.normalize ? tc::quad_sum(qz + dsum[r]) + eps : 1.f;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int lr = wrow + g + 8 * r;
      if (lr >= n) continue;
      const int64_t row = i0 + lr;
      const float inv = 1.f / den[r];
      Elem* orow = static_cast<Elem*>(p.o) + p.o_st.at(b, h, row);
#pragma unroll
      for (int nt = 0; nt < HD / 8; ++nt) {
        const int col = 8 * nt + 2 * t;
        if (col < dv)
          *reinterpret_cast<uint32_t*>(orow + col) = tc::pack2<Elem>(o[nt][2 * r] * inv, o[nt][2 * r + 1] * inv);
      }
      if (t == 0) static_cast<float*>(p.den)[bh * p.sq + row] = den[r];
    }
  };

  if (p.causal) {
    const int64_t nch = (p.sq + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t i0 = c * C::kC;
      const int n = static_cast<int>(p.sq - i0 < C::kC ? p.sq - i0 : C::kC);
      load(uQ, qg, p.q_st.s, i0, n, dk);
      load(uK, kg, p.k_st.s, i0, n, dk);
      load(uV, vg, p.v_st.s, i0, n, dv);
      tc::cp_async_commit();
      tc::cp_async_wait<0>();
      __syncthreads();
      features_tile<Elem, HD>(cQ, n, dk, scale, p.feature, tid);
      features_tile<Elem, HD>(cK, n, dk, 1.f, p.feature, tid);
      __syncthreads();

      // A = mask(Qf Kf^T) over keys 0 .. wrow + 15 (16-key groups np <= warp).
      float s[C::kC / 8][4];
#pragma unroll
      for (int j = 0; j < C::kC / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < HD / 16; ++ks) {
        uint32_t qa[4];
        tc::ldsm_x4(uQ + la(wrow, 2 * ks), qa);
#pragma unroll
        for (int np = 0; np < C::kC / 16; ++np) {
          if (np > warp) break;
          uint32_t kb[4];
          tc::ldsm_x4(uK + lb(np * 16, 2 * ks), kb);
          tc::mma16816<Elem>(s[2 * np], qa, kb[0], kb[1]);
          tc::mma16816<Elem>(s[2 * np + 1], qa, kb[2], kb[3]);
        }
      }
      float dsum[2] = {0.f, 0.f};
#pragma unroll
      for (int jn = 0; jn < C::kC / 8; ++jn)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = wrow + g + 8 * (e >> 1), key = 8 * jn + 2 * t + (e & 1);
          if (key > row) s[jn][e] = 0.f;
          dsum[e >> 1] += s[jn][e];
        }
      float o[HD / 8][4];
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < C::kC / 16; ++kk) {
        if (kk > warp) break;
        uint32_t pa[4];
        pa[0] = tc::pack2<Elem>(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = tc::pack2<Elem>(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = tc::pack2<Elem>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = tc::pack2<Elem>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < HD / 16; ++dp) {
          uint32_t vb[4];
          tc::ldsm_x4_trans(uV + la(kk * 16, 2 * dp), vb);
          tc::mma16816<Elem>(o[2 * dp], pa, vb[0], vb[1]);
          tc::mma16816<Elem>(o[2 * dp + 1], pa, vb[2], vb[3]);
        }
      }
      emit(i0, n, o, dsum);
      __syncthreads();  // every warp has read the state before this chunk is added to it
      update_state(n);
      __syncthreads();  // the state is complete, and Q / K / V may be refilled
    }
  } else {
    const int64_t nk = (p.sk + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t j0 = c * C::kC;
      const int n = static_cast<int>(p.sk - j0 < C::kC ? p.sk - j0 : C::kC);
      load(uK, kg, p.k_st.s, j0, n, dk);
      load(uV, vg, p.v_st.s, j0, n, dv);
      tc::cp_async_commit();
      tc::cp_async_wait<0>();
      __syncthreads();
      features_tile<Elem, HD>(cK, n, dk, 1.f, p.feature, tid);
      __syncthreads();
      update_state(n);
      __syncthreads();
    }
    const int64_t nq = (p.sq + C::kC - 1) / C::kC;
#pragma unroll 1
    for (int64_t c = 0; c < nq; ++c) {
      const int64_t i0 = c * C::kC;
      const int n = static_cast<int>(p.sq - i0 < C::kC ? p.sq - i0 : C::kC);
      load(uQ, qg, p.q_st.s, i0, n, dk);
      tc::cp_async_commit();
      tc::cp_async_wait<0>();
      __syncthreads();
      features_tile<Elem, HD>(cQ, n, dk, scale, p.feature, tid);
      __syncthreads();
      float o[HD / 8][4];
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
      float dsum[2] = {0.f, 0.f};
      emit(i0, n, o, dsum);
      __syncthreads();  // Q is refilled next
    }
  }

  float* so = static_cast<float*>(p.s_out) + bh * dk * dv;
  for (int e = tid; e < dk * dv; e += C::kThreads) so[e] = sS[(e / dv) * C::kLdS + e % dv];
  for (int a = tid; a < dk; a += C::kThreads) static_cast<float*>(p.z_out)[bh * dk + a] = sZ[a];
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
