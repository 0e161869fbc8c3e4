// KV-cache decoding on CUDA, the parts that are not tensor-core code: the fp32 / fp64 split kernel (the
// correct path, for gradcheck-style accuracy checks and fp32 inputs, not the fast one), the combine kernel
// of every dtype, and the split-count heuristic.
//
// fp32 / fp64 split kernel: one block of 4 warps per (query row (b, h, i), split). Each warp takes every
// 4th key of the split: a warp-wide dot product (lane c holds columns c, c + 32, ...), the score modifiers
// and the rule of mask.h, an online softmax in the input's precision (natural exp), O += p v. The warps'
// (max, sum, O) are merged through shared memory in warp order. K / V are re-read for each head of a GQA
// group (from L2 mostly); the tensor-core kernel is the one that packs the group.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "decode.h"
#include "launch.h"
#include "tc_common.cuh"

namespace fused_attn {
namespace dec {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxD = 256;

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dtanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dtanh(double x) { return tanh(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}
template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T y = __shfl_xor_sync(0xffffffffu, x, off);
    x = y > x ? y : x;
  }
  return x;
}

// kPer = columns per lane (D <= 32 kPer), a compile-time bucket so that q and o stay in registers.
template <typename T, int kPer>
__global__ void __launch_bounds__(kThreads) generic_decode_kernel(const __grid_constant__ AttnParams p) {
  __shared__ T wm[kWarps], wl[kWarps];
  __shared__ T wo[kWarps * kMaxD];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t split = blockIdx.x % p.num_splits, row = blockIdx.x / p.num_splits;
  const int64_t i = row % p.sq, h = (row / p.sq) % p.hq, b = row / (p.sq * p.hq);
  const int64_t kvh = h / p.group();
  const int d = static_cast<int>(p.d);
  const SeqInfo s = p.seq(b);
  const Band band(p, s);
  int64_t kb, ke, s0, s1;
  band.key_range(i, i + 1, kb, ke);
  decode_split_range(kb, ke, p.num_splits, split, s0, s1);

  const T* qrow = static_cast<const T*>(p.q) + p.q_st.at(b, h, s.q_off + i);
  T q[kPer], o[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int c = lane + 32 * u;
    q[u] = c < d ? qrow[c] : T(0);
    o[u] = T(0);
  }
  const T scale = static_cast<T>(p.scale);
  const T cap = static_cast<T>(p.softcap);
  const T slope = p.alibi ? static_cast<T>(p.alibi[b * p.alibi_b + h]) : T(0);
  const int64_t offset = s.sk - s.sq;
  T m = T(-INFINITY), l = T(0);
  for (int64_t j = s0 + warp; j < s1; j += kWarps) {
    if (!band.visible(i, j)) continue;  // warp-uniform
    const T* krow = decode_kv_row(p, static_cast<const T*>(p.k), p.k_st, b, kvh, s.k_off, j);
    const T* vrow = decode_kv_row(p, static_cast<const T*>(p.v), p.v_st, b, kvh, s.k_off, j);
    T dot = T(0);
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int c = lane + 32 * u;
      if (c < d) dot += q[u] * krow[c];
    }
    T x = warp_sum(dot) * scale;
    if (cap > T(0)) x = cap * dtanh(x / cap);
    if (slope != T(0)) {
      const int64_t dist = i + offset - j;
      x -= slope * static_cast<T>(dist < 0 ? -dist : dist);
    }
    const T m_new = x > m ? x : m;
    const T alpha = dexp(m - m_new);  // m = -inf: 0
    const T pj = dexp(x - m_new);
    l = l * alpha + pj;
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int c = lane + 32 * u;
      o[u] = o[u] * alpha + (c < d ? pj * vrow[c] : T(0));
    }
    m = m_new;
  }

  // Merge the warps in warp order.
  if (lane == 0) {
    wm[warp] = m;
    wl[warp] = l;
  }
  __syncthreads();
  T mm = T(-INFINITY);
  for (int w = 0; w < kWarps; ++w) mm = wm[w] > mm ? wm[w] : mm;
  const T f = l != T(0) ? dexp(m - mm) : T(0);  // a NaN sum (NaN score) carries on
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const int c = lane + 32 * u;
    if (c < kMaxD) wo[warp * kMaxD + c] = o[u] * f;
  }
  T ll = T(0);
  for (int w = 0; w < kWarps; ++w)
    if (wl[w] != T(0)) ll += wl[w] * dexp(wm[w] - mm);
  __syncthreads();
  const T inv = ll == T(0) ? T(0) : T(1) / ll;  // NaN: a NaN row
  const bool direct = p.num_splits <= 1;
  for (int c = threadIdx.x; c < d; c += kThreads) {
    T acc = T(0);
    for (int w = 0; w < kWarps; ++w) acc += wo[w * kMaxD + c];
    if (direct)
      static_cast<T*>(p.o)[p.o_st.at(b, h, s.q_off + i) + c] = acc * inv;
    else
      static_cast<T*>(p.o_part)[decode_part_row(p, split, b, h, i) * p.d + c] = acc * inv;
  }
  if (threadIdx.x == 0) {
    const T lse = ll == T(0) ? T(-INFINITY) : mm + dlog(ll);
    if (direct)
      static_cast<T*>(p.lse)[b * p.lse_b + h * p.lse_h + s.q_off + i] = lse;
    else
      static_cast<T*>(p.lse_part)[decode_part_row(p, split, b, h, i)] = lse;
  }
}

// One warp per output row (b, h, i): lse = log sum_t exp(lse_t), out = sum_t exp(lse_t - lse) o_t, in split
// order (the per-lane partial sums of the lse are reduced by a fixed shuffle tree).
template <typename T, typename P>
__global__ void __launch_bounds__(kThreads) combine_kernel(const __grid_constant__ AttnParams p, int64_t rows) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= rows) return;  // whole warps
  const int64_t i = row % p.sq, h = (row / p.sq) % p.hq, b = row / (p.sq * p.hq);
  const int64_t ns = p.num_splits;
  const int d = static_cast<int>(p.d);
  const P* lp = static_cast<const P*>(p.lse_part);
  const P* op = static_cast<const P*>(p.o_part);
  P mx = P(-INFINITY), nans = P(0);
  for (int64_t t = lane; t < ns; t += 32) {
    const P x = lp[decode_part_row(p, t, b, h, i)];
    mx = x > mx ? x : mx;
    if (x != x) nans += P(1);
  }
  mx = warp_max(mx);
  // A part with a NaN lse (a NaN score in its keys) makes the row NaN, as its single-pass result would be.
  const bool nan = warp_sum(nans) > P(0);
  P sum = P(0);
  if (mx != P(-INFINITY))
    for (int64_t t = lane; t < ns; t += 32) sum += dexp(lp[decode_part_row(p, t, b, h, i)] - mx);
  sum = warp_sum(sum);
  const bool any = sum > P(0);
  const P lse = nan ? P(NAN) : any ? mx + dlog(sum) : P(-INFINITY);
  T* orow = static_cast<T*>(p.o) + p.o_st.at(b, h, i);
  auto weighted = [&](int c) {
    P acc = nan ? P(NAN) : P(0);
    if (any && !nan)
      for (int64_t t = 0; t < ns; ++t) {
        const int64_t r = decode_part_row(p, t, b, h, i);
        const P w = dexp(lp[r] - lse);  // a split that saw nothing: exp(-inf) = 0
        if (w > P(0)) acc += w * op[r * p.d + c];
      }
    return acc;
  };
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
    for (int c = lane; c < d; c += 32) orow[c] = static_cast<T>(weighted(c));
  } else {  // fp16 / bf16: pairs of columns (d is a multiple of 8 on the tensor-core path)
    for (int c = 2 * lane; c < d; c += 64)
      *reinterpret_cast<uint32_t*>(orow + c) = tc::pack2<T>(weighted(c), weighted(c + 1));
  }
  if (lane == 0) static_cast<P*>(p.lse)[b * p.lse_b + h * p.lse_h + i] = lse;
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fused_attn ") + what + ": CUDA launch failed: " + cudaGetErrorString(err));
}

unsigned blocks_of(int64_t n, const char* what) {
  if (n > 0x7fffffffLL)
    throw std::invalid_argument(std::string("fused_attn ") + what + ": " + std::to_string(n) +
                                " thread blocks, expected at most 2^31 - 1 (batch * heads * Sq * num_splits too large)");
  return static_cast<unsigned>(n);
}

template <typename T, typename P>
void combine(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.hq * p.sq;
  if (rows == 0) return;
  combine_kernel<T, P><<<blocks_of(cdiv(rows, kWarps), "decode combine"), kThreads, 0, stream>>>(p, rows);
  check_launch("decode combine");
}

template <typename T>
void generic_decode_impl(const AttnParams& p, cudaStream_t stream) {
  const unsigned blocks = blocks_of(p.batch * p.hq * p.sq * p.num_splits, "decode (fp32/fp64)");
  if (blocks == 0) return;
  if (p.d <= 64)
    generic_decode_kernel<T, 2><<<blocks, kThreads, 0, stream>>>(p);
  else if (p.d <= 128)
    generic_decode_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(p);
  else
    generic_decode_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(p);
  check_launch("decode (fp32/fp64)");
  if (p.num_splits > 1) combine<T, T>(p, stream);
}

}  // namespace
}  // namespace dec

using dec::combine;
using dec::generic_decode_impl;

void decode_combine(const AttnParams& p, DType dt, cudaStream_t stream) {
  switch (dt) {
    case DType::f16: return combine<__half, float>(p, stream);
    case DType::bf16: return combine<__nv_bfloat16, float>(p, stream);
    case DType::f32: return combine<float, float>(p, stream);
    case DType::f64: return combine<double, double>(p, stream);
  }
}

void generic_decode(const AttnParams& p, DType dt, cudaStream_t stream) {
  if (p.d < 1 || p.d > dec::kMaxD)
    throw std::invalid_argument("fused_attn decode (fp32/fp64): head dim d=" + std::to_string(p.d) +
                                ", expected 1 <= d <= " + std::to_string(dec::kMaxD));
  if (p.num_splits < 1 || (p.num_splits > 1 && (!p.o_part || !p.lse_part)))
    throw std::invalid_argument("fused_attn decode: num_splits=" + std::to_string(p.num_splits) +
                                " needs num_splits >= 1 and, above 1, the o_part / lse_part workspace");
  if (p.batch == 0 || p.hq == 0 || p.sq == 0) return;
  switch (dt) {
    case DType::f32: return generic_decode_impl<float>(p, stream);
    case DType::f64: return generic_decode_impl<double>(p, stream);
    default:
      throw std::invalid_argument("fused_attn decode (fp32/fp64): dtype f16/bf16 runs on the tensor-core kernel");
  }
}

// num_splits = 0: enough blocks for about two per SM, from the blocks one split gives (tensor cores:
// (kv head, batch, row tile of the GQA group x Sq); fp32 / fp64: (query head, batch, position)), with at least
// 4 tiles (256 keys) of the cache's capacity per split and at most 128 splits. No value is read from the GPU:
// the capacity stands in for the lengths, and the splits of a shorter sequence end early.
int64_t decode_splits(const AttnParams& p, bool tensor_cores, int sm_count) {
  const int64_t rows = p.group() * p.sq;
  const int64_t tile_rows = rows <= 16 || p.d > 128 ? 16 : 64;  // as tc_decode_run picks
  const int64_t blocks = tensor_cores ? p.batch * p.hk * cdiv(rows, tile_rows) : p.batch * p.hq * p.sq;
  const int64_t target = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  if (blocks <= 0 || blocks >= target) return 1;
  const int64_t most = imax(1, imin(128, p.sk / (4 * kDecodeTileK)));
  return imax(1, imin(cdiv(target, blocks), most));
}

}  // namespace fused_attn
