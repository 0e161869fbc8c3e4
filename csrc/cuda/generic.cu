// fp32 / fp64 attention on CUDA cores (no tensor cores): forward and backward.
//
// Why this exists: torch.autograd.gradcheck must run in fp64 on the GPU kernel itself, and fp32 inputs
// must work on CUDA. It is the correct path, not the fast one; the design keeps shared memory small
// and every index obvious.
//
// Design (same for every kernel here):
// - A block of 256 threads owns one 32 x 32 tile pair at a time (kGenericTiles). Q/K/V/dO are staged
//   through shared memory in chunks of 32 head-dim columns, zero-filled past Sq/Sk/D, so any D up to
//   256 runs without a per-D shared-memory size (fp64: at most 34 KB static, no opt-in needed).
// - Score tiles (S, dP: 32 x 32) use a 2 x 2 register micro-tile per thread: rows ty, ty+16 and columns
//   tx, tx+16 (ty = tid/16, tx = tid%16). One half-warp holds a whole score row, so row max / row sum
//   are 4 xor-shuffles within 16 lanes.
// - Row accumulators (O, dQ, dK, dV: 32 x D) live in registers: thread owns row tid/8 and, in chunk c,
//   columns c*32 + tid%8 + 8m (m = 0..3). The array has kMaxCh*4 entries, kMaxCh a compile-time bucket
//   of D (64 / 128 / 256), and is only indexed inside fully unrolled chunk loops, so it never goes to
//   local memory.
// - Padded leading dimension 33 (kLd): the reads of the micro-tile loops (16 distinct rows at one
//   column) hit 16 distinct banks (bank pairs for double), the owner loops read 8 consecutive columns.
// The visibility rule comes only from mask.h (KeyTiles / QueryTiles for the trip count, tile_needs_mask
// and element_visible inside a tile), the score modifiers from its ScoreMod (softcap, ALiBi; natural units
// here, exact tanh), and packed variable-length batches from AttnParams::seq: a block works on sequence b's
// rows q_off + .. and keys k_off + .., blocks past their sequence's last tile exit at once, and delta walks
// the (Hq, total_q) rows as one run. Unlike the tensor-core kernels this is one instantiation for every
// case: the features cost a few uniform branches, and no kernel here spills with them (ptxas -v).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../mask.h"
#include "launch.h"

namespace fused_attn {
namespace {

constexpr int kTile = 32;  // query rows and keys per tile, forward and backward
static_assert(kGenericTiles.fwd_tq == kTile && kGenericTiles.fwd_tk == kTile &&
                  kGenericTiles.bwd_tq == kTile && kGenericTiles.bwd_tk == kTile,
              "generic.cu's thread mappings are written for 32 x 32 tiles everywhere");
// 256 threads, __launch_bounds__(kThreads, 1): ptxas takes 78..244 registers (1 or 2 blocks per SM),
// no spills (nvcc 13.0, sm_80 and sm_90). Asking for 2 or 3 blocks (128 / 80 registers) spilled
// 8..390 bytes in most instantiations; leaving the minimum out altogether let ptxas pick 128 / 80 on
// its own and spill in dkdv<float, D <= 128> and fwd<float, D <= 128>, hence the explicit 1.
constexpr int kThreads = 256;
constexpr int kChunk = 32;         // head-dim columns staged per step
constexpr int kLd = kChunk + 1;    // padded row length of a staged chunk (bank-conflict free reads)
constexpr int kBuf = kTile * kLd;  // elements of one staged 32 x 32 chunk (or one 32 x 32 P / dS tile)
constexpr int kMaxD = 256;
constexpr int kStageIters = kTile * kChunk / kThreads;  // 4 elements per thread per staged chunk
static_assert(kTile * kChunk % kThreads == 0, "staging assumes whole passes");
static_assert(kThreads == 256 && kTile == 32 && kChunk == 32,
              "score (16 x 16 threads, 2 x 2 each) and owner (32 rows x 8 threads) mappings");

__device__ __forceinline__ float fexp(float x) { return expf(x); }
__device__ __forceinline__ double fexp(double x) { return exp(x); }
__device__ __forceinline__ float flog(float x) { return logf(x); }
__device__ __forceinline__ double flog(double x) { return log(x); }
template <typename T>
__device__ __forceinline__ T neg_inf() { return T(-INFINITY); }
template <typename T>
__device__ __forceinline__ T tmax(T a, T b) { return a > b ? a : b; }

// Reductions over the 16 lanes of a half-warp (one score row); every lane gets the same result
// (the xor butterfly pairs a+b with b+a, which IEEE addition makes equal).
template <typename T>
__device__ __forceinline__ T row_max16(T x) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x = tmax(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
template <typename T>
__device__ __forceinline__ T row_sum16(T x) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Stage rows [r0, r0 + 32) x columns [c0, c0 + 32) of one (b, h) slice into buf (row length kLd),
// zero past nrows / d so that padded rows and columns add nothing (and never carry NaN garbage).
// A warp loads one row: 32 consecutive elements.
template <typename T>
__device__ __forceinline__ void stage(T* buf, const T* base, int64_t row_stride, int64_t r0, int64_t nrows,
                                      int c0, int d) {
  static_assert(kThreads % kChunk == 0, "a warp stages whole rows");
  constexpr int kRowsPerPass = kThreads / kChunk;  // 8
  const int rr = threadIdx.x / kChunk, cc = threadIdx.x % kChunk;
  const bool col_ok = c0 + cc < d;
  // One pointer and one row step per call (not one 64-bit address per element): keeps registers low.
  const T* src = base + (r0 + rr) * row_stride + c0 + cc;
  const int64_t step = kRowsPerPass * row_stride;
#pragma unroll
  for (int i = 0; i < kStageIters; ++i) {
    T x = T(0);
    if (col_ok && r0 + rr + i * kRowsPerPass < nrows) x = src[i * step];
    buf[(rr + i * kRowsPerPass) * kLd + cc] = x;
  }
}

// s[r][c] += sum_k A[ty + 16r][k] * B[tx + 16c][k] over one staged chunk.
template <typename T>
__device__ __forceinline__ void micro_tile(const T* A, const T* B, int ty, int tx, T (&s)[2][2]) {
#pragma unroll 4
  for (int k = 0; k < kChunk; ++k) {
    const T a0 = A[ty * kLd + k], a1 = A[(ty + 16) * kLd + k];
    const T b0 = B[tx * kLd + k], b1 = B[(tx + 16) * kLd + k];
    s[0][0] += a0 * b0;
    s[0][1] += a0 * b1;
    s[1][0] += a1 * b0;
    s[1][1] += a1 * b1;
  }
}

// acc[ch*4 + m] += sum_j W[orow][j] * X[j][osub + 8m] (transposed: W[j][orow]) over the 32 rows of a
// staged chunk X. ch must be a compile-time constant after unrolling (it indexes registers). The tile's
// sum is formed on its own and then added: a sum over n keys / queries then rounds like kTile + n / kTile
// terms rather than n (dV over 1025 queries in fp32 failed the STYLE.md bound on an H100 before).
template <typename T, bool kTransW, int kN>
__device__ __forceinline__ void owner_update(T (&acc)[kN], int ch, const T* W, const T* X, int orow, int osub) {
  T o[4] = {T(0), T(0), T(0), T(0)};
#pragma unroll 4
  for (int j = 0; j < kTile; ++j) {
    const T w = kTransW ? W[j * kLd + orow] : W[orow * kLd + j];
#pragma unroll
    for (int m = 0; m < 4; ++m) o[m] += w * X[j * kLd + osub + 8 * m];
  }
#pragma unroll
  for (int m = 0; m < 4; ++m) acc[ch * 4 + m] += o[m];
}

// Writes the owner-mapped accumulator row (times mul) to dst (row pointer), columns < d.
template <typename T, int kMaxCh>
__device__ __forceinline__ void store_row(T* dst, const T (&acc)[kMaxCh * 4], T mul, int osub, int nch, int d) {
#pragma unroll
  for (int ch = 0; ch < kMaxCh; ++ch) {
    if (ch >= nch) break;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int c = ch * kChunk + osub + 8 * m;
      if (c < d) dst[c] = acc[ch * 4 + m] * mul;
    }
  }
}

// The params as seen through a pointer the compiler cannot follow. Used for the visibility-rule calls
// (tile lists, window, layout) inside the tile loops: read straight from the __grid_constant__ param,
// those ~40 int64 fields are loop-invariant, so the compiler hoists them all into registers before the
// loop (~80 registers, seen in the PTX); dK/dV in fp64 at D <= 256 then spilled even at 255 registers.
// Read through this pointer they are loaded where used, once per tile, and die there (dkdv<double>
// 255 -> 244 registers, dkdv<float, D <= 64> 200 -> 128, no spills).
__device__ __forceinline__ const AttnParams& opaque(const AttnParams& p) {
  const AttnParams* q = &p;
  asm volatile("" : "+l"(q));
  return *q;
}

// Sequence b (AttnParams::seq), read again through opaque() at each use instead of held across the loops.
__device__ __forceinline__ SeqInfo seq_of(const AttnParams& p, int64_t b) { return opaque(p).seq(b); }

// mask.h's ScoreMod in T, natural units: x = scale * q.k of query i, key j -> modified score; g = d(capped)/dx.
template <typename T>
__device__ __forceinline__ T ftanh(T x);
template <>
__device__ __forceinline__ float ftanh(float x) { return tanhf(x); }
template <>
__device__ __forceinline__ double ftanh(double x) { return tanh(x); }

template <typename T>
struct Mod {
  T cap, inv_cap, slope;
  int64_t offset;
  bool on;
  __device__ __forceinline__ Mod(const AttnParams& p, int64_t b, int64_t h) {
    const ScoreMod m(p, b, h, seq_of(p, b));
    cap = static_cast<T>(m.cap);
    inv_cap = static_cast<T>(m.inv_cap);
    slope = static_cast<T>(m.slope);
    offset = m.offset;
    on = m.active();
  }
  __device__ __forceinline__ T apply(T x, int64_t i, int64_t j, T& g) const {
    g = T(1);
    if (cap > T(0)) {
      const T t = ftanh(x * inv_cap);
      x = cap * t;
      g = T(1) - t * t;
    }
    const int64_t d = i + offset - j;
    return x - slope * static_cast<T>(d < 0 ? -d : d);
  }
};

// Block index -> (tile, head, batch). A 1-D grid (tile fastest) keeps consecutive blocks on the same
// head, so K/V (forward, dQ) or Q/dO (dK/dV) are shared in L2, and has no 65535 limit on heads/batch.
struct BlockCoord {
  int64_t tile, h, b;
};
__device__ __forceinline__ BlockCoord block_coord(int64_t ntiles, int64_t nheads) {
  const int64_t bid = blockIdx.x;
  const int64_t bh = bid / ntiles;
  return {bid - bh * ntiles, bh % nheads, bh / nheads};
}

// ------------------------------------------------------------------------------------------------
// Forward: one block per (query tile, query head, batch); online softmax over the key tiles.
template <typename T, int kMaxCh>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(const __grid_constant__ AttnParams p, int64_t nqt) {
  __shared__ T qs[kBuf];
  __shared__ T ks[kBuf];  // K chunks for S, then V chunks for P V
  __shared__ T ps[kBuf];
  __shared__ T row_s[kTile];  // per-row rescale factor, then 1 / l at the end

  const BlockCoord bc = block_coord(nqt, p.hq);
  const int64_t b = bc.b, h = bc.h, qt = bc.tile;
  const int64_t hkv = h / p.group();
  const int d = static_cast<int>(p.d);
  const int nch = (d + kChunk - 1) / kChunk;
  const int tid = threadIdx.x;
  const int ty = tid >> 4, tx = tid & 15;
  const int orow = tid >> 3, osub = tid & 7;
  const int64_t q0 = qt * kTile;
  const T scale = static_cast<T>(p.scale);

  const SeqInfo si = p.seq(b);
  if (q0 >= si.sq) return;  // past this sequence's query tiles (packed batch): the whole block leaves
  const T* qbase = static_cast<const T*>(p.q) + p.q_st.at(b, h, si.q_off);
  const T* kbase = static_cast<const T*>(p.k) + p.k_st.at(b, hkv, si.k_off);
  const T* vbase = static_cast<const T*>(p.v) + p.v_st.at(b, hkv, si.k_off);
  const Mod<T> mod(p, b, h);

  // Row state of rows ty and ty + 16, replicated in the 16 lanes that hold the row.
  T m[2] = {neg_inf<T>(), neg_inf<T>()};
  T l[2] = {T(0), T(0)};
  T acc[kMaxCh * 4];
#pragma unroll
  for (int i = 0; i < kMaxCh * 4; ++i) acc[i] = T(0);

  const int64_t n = KeyTiles(p, b, h, qt, kTile, kTile).count();
  for (int64_t it = 0; it < n; ++it) {
    const TileVisit v = KeyTiles(opaque(p), b, h, qt, kTile, kTile).get(it);
    if (v.tile < 0) continue;  // block-uniform: no barrier is skipped by part of the block
    const int64_t k0 = v.tile * kTile;

    T s[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
    for (int ch = 0; ch < nch; ++ch) {
      const SeqInfo sc = seq_of(p, b);
      stage(qs, qbase, p.q_st.s, q0, sc.sq, ch * kChunk, d);
      stage(ks, kbase, p.k_st.s, k0, sc.sk, ch * kChunk, d);
      __syncthreads();
      micro_tile(qs, ks, ty, tx, s);
      __syncthreads();  // ks is refilled below (V) or by the next chunk
    }

    const AttnParams& pm = opaque(p);
    const bool masked = tile_needs_mask(pm, v, b, q0, q0 + kTile, k0, k0 + kTile);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int il = ty + 16 * r;
      T x[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        x[c] = s[r][c] * scale;
        if (mod.on) {
          T g;
          x[c] = mod.apply(x[c], q0 + il, k0 + tx + 16 * c, g);
        }
        if (masked && !element_visible(pm, v, b, h, q0 + il, k0 + tx + 16 * c)) x[c] = neg_inf<T>();
      }
      const T mnew = tmax(m[r], row_max16(tmax(x[0], x[1])));
      // A row that has seen no key yet keeps max -inf: subtract 0 instead, so exp gives 0, not NaN.
      const T muse = mnew == neg_inf<T>() ? T(0) : mnew;
      const T p0 = fexp(x[0] - muse), p1 = fexp(x[1] - muse);
      const T alpha = fexp(m[r] - muse);  // 0 while the old max is -inf (then l and acc are 0)
      l[r] = l[r] * alpha + row_sum16(p0 + p1);
      m[r] = mnew;
      ps[il * kLd + tx] = p0;
      ps[il * kLd + tx + 16] = p1;
      if (tx == 0) row_s[il] = alpha;
    }

#pragma unroll
    for (int ch = 0; ch < kMaxCh; ++ch) {
      if (ch >= nch) break;
      stage(ks, vbase, p.v_st.s, k0, seq_of(p, b).sk, ch * kChunk, d);
      __syncthreads();  // also publishes ps and row_s
      const T a = row_s[orow];
#pragma unroll
      for (int mm = 0; mm < 4; ++mm) acc[ch * 4 + mm] *= a;
      owner_update<T, false>(acc, ch, ps, ks, orow, osub);
      __syncthreads();  // ks, ps and row_s are rewritten by the next tile
    }
  }

  // Epilogue: lse = m + log(l) (natural log), out = acc / l; a row that saw no key has l = 0:
  // lse = -inf and out = 0.
  const SeqInfo se = seq_of(p, b);
  T* lse = static_cast<T*>(p.lse) + b * p.lse_b + h * p.lse_h + se.q_off;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int il = ty + 16 * r;
    if (tx == 0) {
      const bool any = l[r] != T(0);  // l = 0: no key seen; NaN (a NaN score): a NaN row, as in PyTorch
      row_s[il] = any ? T(1) / l[r] : T(0);
      if (q0 + il < se.sq) lse[q0 + il] = any ? m[r] + flog(l[r]) : neg_inf<T>();
    }
  }
  __syncthreads();
  const int64_t row = q0 + orow;
  if (row < se.sq) {
    T* out = static_cast<T*>(p.o) + p.o_st.at(b, h, se.q_off + row);
    store_row<T, kMaxCh>(out, acc, row_s[orow], osub, nch, d);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward.

// delta_i = rowsum(dO_i * O_i): one warp per row, lanes over D.
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(const __grid_constant__ AttnParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const int64_t len = p.row_len();  // rows of lse: (B, Hq, Sq), or (Hq, total_q) for a packed batch
  if (row >= p.row_batches() * p.hq * len) return;  // warp-uniform
  const int64_t i = row % len, bh = row / len;
  const int64_t h = bh % p.hq, b = bh / p.hq;
  const T* o = static_cast<const T*>(p.o) + p.o_st.at(b, h, i);
  const T* dout = static_cast<const T*>(p.dout) + p.do_st.at(b, h, i);
  T acc = T(0);
  for (int64_t c = lane; c < p.d; c += 32) acc += o[c] * dout[c];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  // A gradient reaching lse (return_lse=True) adds dlse_i * P_ij to dS_ij: fold it into delta.
  if (lane == 0) {
    const int64_t at = b * p.lse_b + h * p.lse_h + i;
    static_cast<T*>(p.delta)[at] = p.dlse ? acc - static_cast<const T*>(p.dlse)[at] : acc;
  }
}

// Loads lse and delta of query rows [q0, q0 + 32) into shared memory (rows past Sq: -inf and 0, which
// make P = 0 there). Uses threads 0..63; the caller's next barrier publishes them.
template <typename T>
__device__ __forceinline__ void stage_row_stats(const AttnParams& p, int64_t b, int64_t h, int64_t q0, T* lse_s,
                                                T* dl_s) {
  const int tid = threadIdx.x;
  const SeqInfo si = seq_of(p, b);
  const int64_t off = b * p.lse_b + h * p.lse_h + si.q_off;
  if (tid < kTile) {
    const int64_t i = q0 + tid;
    lse_s[tid] = i < si.sq ? static_cast<const T*>(p.lse)[off + i] : neg_inf<T>();
  } else if (tid < 2 * kTile) {
    const int64_t i = q0 + tid - kTile;
    dl_s[tid - kTile] = i < si.sq ? static_cast<const T*>(p.delta)[off + i] : T(0);
  }
}

// For query tile q0 (query head h) against key tile k0 (kv head of h): S = Q K^T and dP = dO V^T
// through the four staging buffers, then P = exp(scale S - lse) (0 where masked or lse = -inf) and
// dS = scale * P * (dP - delta) in score mapping. Ends with a barrier after the last buffer read, so
// the caller may overwrite any of the four buffers right away (no barrier has been issued since).
template <typename T>
__device__ __forceinline__ void tile_p_ds(const AttnParams& p, const TileVisit& v, int64_t b, int64_t h,
                                          int64_t hkv, int64_t q0, int64_t k0, int d, int nch, T* qs, T* ks,
                                          T* os, T* vs, const T* lse_s, const T* dl_s, const Mod<T>& mod,
                                          T (&pr)[2][2], T (&ds)[2][2]) {
  const int tid = threadIdx.x;
  const int ty = tid >> 4, tx = tid & 15;
  const SeqInfo si = seq_of(p, b);
  const T* qbase = static_cast<const T*>(p.q) + p.q_st.at(b, h, si.q_off);
  const T* dobase = static_cast<const T*>(p.dout) + p.do_st.at(b, h, si.q_off);
  const T* kbase = static_cast<const T*>(p.k) + p.k_st.at(b, hkv, si.k_off);
  const T* vbase = static_cast<const T*>(p.v) + p.v_st.at(b, hkv, si.k_off);

  T s[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
  T dp[2][2] = {{T(0), T(0)}, {T(0), T(0)}};
  for (int ch = 0; ch < nch; ++ch) {
    stage(qs, qbase, p.q_st.s, q0, si.sq, ch * kChunk, d);
    stage(ks, kbase, p.k_st.s, k0, si.sk, ch * kChunk, d);
    stage(os, dobase, p.do_st.s, q0, si.sq, ch * kChunk, d);
    stage(vs, vbase, p.v_st.s, k0, si.sk, ch * kChunk, d);
    __syncthreads();
    micro_tile(qs, ks, ty, tx, s);
    micro_tile(os, vs, ty, tx, dp);
    __syncthreads();
  }

  const T scale = static_cast<T>(p.scale);
  const AttnParams& pm = opaque(p);
  const bool masked = tile_needs_mask(pm, v, b, q0, q0 + kTile, k0, k0 + kTile);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int il = ty + 16 * r;
    const T lse = lse_s[il];
    const T dl = dl_s[il];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      // lse = -inf only for a row that sees no key; guard anyway: exp(s - (-inf)) would be inf.
      const bool vis = (!masked || element_visible(pm, v, b, h, q0 + il, k0 + tx + 16 * c)) && lse != neg_inf<T>();
      T x = s[r][c] * scale, g = T(1);
      if (mod.on) x = mod.apply(x, q0 + il, k0 + tx + 16 * c, g);
      const T pv = vis ? fexp(x - lse) : T(0);
      pr[r][c] = pv;
      ds[r][c] = scale * pv * (dp[r][c] - dl) * g;
    }
  }
}

// Writes a score-mapped 32 x 32 tile as buf[i][j] (i query row, j key).
template <typename T>
__device__ __forceinline__ void put_tile(T* buf, const T (&x)[2][2]) {
  const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < 2; ++c) buf[(ty + 16 * r) * kLd + tx + 16 * c] = x[r][c];
}

// dK, dV: one block per (key tile, kv head, batch), looping over the group's query heads and, per
// head, the query tiles that see this key tile. Sums in a fixed order: deterministic, no atomics.
template <typename T, int kMaxCh>
__global__ void __launch_bounds__(kThreads, 1) dkdv_kernel(const __grid_constant__ AttnParams p, int64_t nkt) {
  __shared__ T qs[kBuf], ks[kBuf], os[kBuf], vs[kBuf];
  __shared__ T lse_s[kTile], dl_s[kTile];
  T* const ps = ks;   // P tile, written after tile_p_ds's last read of ks
  T* const dss = vs;  // scale * dS tile, likewise

  const BlockCoord bc = block_coord(nkt, p.hk);
  const int64_t b = bc.b, hkv = bc.h, kt = bc.tile;
  const int64_t group = p.group();
  const int d = static_cast<int>(p.d);
  const int nch = (d + kChunk - 1) / kChunk;
  const int tid = threadIdx.x;
  const int orow = tid >> 3, osub = tid & 7;
  const int64_t k0 = kt * kTile;
  if (k0 >= p.seq(b).sk) return;  // past this sequence's key tiles (packed batch): the whole block leaves

  T dk[kMaxCh * 4], dv[kMaxCh * 4];
#pragma unroll
  for (int i = 0; i < kMaxCh * 4; ++i) dk[i] = dv[i] = T(0);

  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hkv * group + g;
    const int64_t q_off = seq_of(p, b).q_off;
    const T* qbase = static_cast<const T*>(p.q) + p.q_st.at(b, h, q_off);
    const T* dobase = static_cast<const T*>(p.dout) + p.do_st.at(b, h, q_off);
    const Mod<T> mod(p, b, h);
    const int64_t n = QueryTiles(p, b, h, kt, kTile, kTile).count();
    for (int64_t it = 0; it < n; ++it) {
      const TileVisit v = QueryTiles(opaque(p), b, h, kt, kTile, kTile).get(it);
      if (v.tile < 0) continue;  // block-uniform
      const int64_t q0 = v.tile * kTile;
      // Safe: the previous tile's reads of lse_s / dl_s are followed by the barriers below.
      stage_row_stats(p, b, h, q0, lse_s, dl_s);
      T pr[2][2], ds[2][2];
      tile_p_ds(p, v, b, h, hkv, q0, k0, d, nch, qs, ks, os, vs, lse_s, dl_s, mod, pr, ds);
      put_tile(ps, pr);
      put_tile(dss, ds);
      // dV += P^T dO, dK += (scale dS)^T Q, chunk by chunk; this thread's row is key orow.
#pragma unroll
      for (int ch = 0; ch < kMaxCh; ++ch) {
        if (ch >= nch) break;
        const int64_t sq = seq_of(p, b).sq;
        stage(qs, qbase, p.q_st.s, q0, sq, ch * kChunk, d);
        stage(os, dobase, p.do_st.s, q0, sq, ch * kChunk, d);
        __syncthreads();  // also publishes ps and dss
        owner_update<T, true>(dv, ch, ps, os, orow, osub);
        owner_update<T, true>(dk, ch, dss, qs, orow, osub);
        __syncthreads();  // qs, os, ps, dss are rewritten by the next chunk / tile
      }
    }
  }

  const SeqInfo se = seq_of(p, b);
  const int64_t row = k0 + orow;
  if (row < se.sk) {
    store_row<T, kMaxCh>(static_cast<T*>(p.dk) + p.dk_st.at(b, hkv, se.k_off + row), dk, T(1), osub, nch, d);
    store_row<T, kMaxCh>(static_cast<T*>(p.dv) + p.dv_st.at(b, hkv, se.k_off + row), dv, T(1), osub, nch, d);
  }
}

// dQ: one block per (query tile, query head, batch), looping over the key tiles this tile sees.
template <typename T, int kMaxCh>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(const __grid_constant__ AttnParams p, int64_t nqt) {
  __shared__ T qs[kBuf], ks[kBuf], os[kBuf], vs[kBuf];
  __shared__ T lse_s[kTile], dl_s[kTile];
  T* const dss = ks;  // scale * dS tile, written after tile_p_ds's last read of ks
  T* const kc = qs;   // K chunks for dQ += dS K

  const BlockCoord bc = block_coord(nqt, p.hq);
  const int64_t b = bc.b, h = bc.h, qt = bc.tile;
  const int64_t hkv = h / p.group();
  const int d = static_cast<int>(p.d);
  const int nch = (d + kChunk - 1) / kChunk;
  const int tid = threadIdx.x;
  const int orow = tid >> 3, osub = tid & 7;
  const int64_t q0 = qt * kTile;
  if (q0 >= p.seq(b).sq) return;  // past this sequence's query tiles (packed batch): the whole block leaves
  const T* kbase = static_cast<const T*>(p.k) + p.k_st.at(b, hkv, seq_of(p, b).k_off);
  const Mod<T> mod(p, b, h);

  T dq[kMaxCh * 4];
#pragma unroll
  for (int i = 0; i < kMaxCh * 4; ++i) dq[i] = T(0);

  stage_row_stats(p, b, h, q0, lse_s, dl_s);  // published by the first barrier in tile_p_ds
  const int64_t n = KeyTiles(p, b, h, qt, kTile, kTile).count();
  for (int64_t it = 0; it < n; ++it) {
    const TileVisit v = KeyTiles(opaque(p), b, h, qt, kTile, kTile).get(it);
    if (v.tile < 0) continue;  // block-uniform
    const int64_t k0 = v.tile * kTile;
    T pr[2][2], ds[2][2];
    tile_p_ds(p, v, b, h, hkv, q0, k0, d, nch, qs, ks, os, vs, lse_s, dl_s, mod, pr, ds);
    put_tile(dss, ds);
    // dQ += (scale dS) K, chunk by chunk; this thread's row is query orow.
#pragma unroll
    for (int ch = 0; ch < kMaxCh; ++ch) {
      if (ch >= nch) break;
      stage(kc, kbase, p.k_st.s, k0, seq_of(p, b).sk, ch * kChunk, d);
      __syncthreads();  // also publishes dss
      owner_update<T, false>(dq, ch, dss, kc, orow, osub);
      __syncthreads();  // kc and dss are rewritten by the next chunk / tile
    }
  }

  const SeqInfo se = seq_of(p, b);
  const int64_t row = q0 + orow;
  if (row < se.sq)
    store_row<T, kMaxCh>(static_cast<T*>(p.dq) + p.dq_st.at(b, h, se.q_off + row), dq, T(1), osub, nch, d);
}

// ------------------------------------------------------------------------------------------------
// Host side.

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(err));
}

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::f32: return "f32";
    case DType::f64: return "f64";
  }
  return "unknown";
}

void check_params(const AttnParams& p, const char* what) {
  if (p.d < 1 || p.d > kMaxD)
    throw std::invalid_argument(std::string(what) + ": head dim d=" + std::to_string(p.d) + ", expected 1 <= d <= " +
                                std::to_string(kMaxD));
  if (p.hk < 1 || p.hq % p.hk != 0)
    throw std::invalid_argument(std::string(what) + ": hq=" + std::to_string(p.hq) + ", hk=" + std::to_string(p.hk) +
                                ", expected hq to be a multiple of hk");
  if (p.sparse && (p.list_tq != kTile || p.list_tk != kTile))
    throw std::invalid_argument(std::string(what) + ": block-sparse list granularity (" + std::to_string(p.list_tq) +
                                ", " + std::to_string(p.list_tk) + "), expected (" + std::to_string(kTile) + ", " +
                                std::to_string(kTile) + ") (kGenericTiles)");
}

// Blocks of a 1-D grid; 0 means nothing to launch.
unsigned grid_of(int64_t blocks, const char* what) {
  if (blocks > 0x7fffffffLL)
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(blocks) +
                                " thread blocks, expected at most 2^31 - 1 (batch * heads * tiles too large)");
  return static_cast<unsigned>(blocks);
}

template <typename T, int kMaxCh>
void fwd_impl(const AttnParams& p, cudaStream_t stream) {
  const int64_t nqt = cdiv(p.sq, kTile);
  const unsigned blocks = grid_of(nqt * p.hq * p.batch, "generic_fwd");
  if (blocks == 0) return;
  fwd_kernel<T, kMaxCh><<<blocks, kThreads, 0, stream>>>(p, nqt);
  check_launch("generic_fwd");
}

template <typename T, int kMaxCh>
void bwd_impl(const AttnParams& p, cudaStream_t stream) {
  // Every launch below may be empty (Sq = 0 or Sk = 0); the others still run, so that dk / dv of keys
  // no query sees and dq of rows that see no key are written as zeros.
  const unsigned rows = grid_of(cdiv(p.row_batches() * p.hq * p.row_len(), kThreads / 32), "generic_bwd");
  if (rows > 0) {
    delta_kernel<T><<<rows, kThreads, 0, stream>>>(p);
    check_launch("generic_bwd (delta)");
  }

  const int64_t nkt = cdiv(p.sk, kTile);
  const unsigned kv_blocks = grid_of(nkt * p.hk * p.batch, "generic_bwd");
  if (kv_blocks > 0) {
    dkdv_kernel<T, kMaxCh><<<kv_blocks, kThreads, 0, stream>>>(p, nkt);
    check_launch("generic_bwd (dk, dv)");
  }

  const int64_t nqt = cdiv(p.sq, kTile);
  const unsigned q_blocks = grid_of(nqt * p.hq * p.batch, "generic_bwd");
  if (q_blocks > 0) {
    dq_kernel<T, kMaxCh><<<q_blocks, kThreads, 0, stream>>>(p, nqt);
    check_launch("generic_bwd (dq)");
  }
}

// Register accumulators are sized by a head-dim bucket (chunks of 32 columns): D <= 64 / 128 / 256.
// The small buckets take fewer registers (sm_90, fp32 forward: 93 / 106 / 152), so common head dims
// get 2 blocks per SM where the D <= 256 instantiation gets 1.
template <typename T, template <typename, int> class Impl>
void by_head_dim(const AttnParams& p, cudaStream_t stream) {
  if (p.d <= 64)
    Impl<T, 2>::run(p, stream);
  else if (p.d <= 128)
    Impl<T, 4>::run(p, stream);
  else
    Impl<T, 8>::run(p, stream);
}
template <typename T, int kMaxCh>
struct Fwd {
  static void run(const AttnParams& p, cudaStream_t s) { fwd_impl<T, kMaxCh>(p, s); }
};
template <typename T, int kMaxCh>
struct Bwd {
  static void run(const AttnParams& p, cudaStream_t s) { bwd_impl<T, kMaxCh>(p, s); }
};

}  // namespace

template <template <typename, int> class Impl>
void by_dtype(const AttnParams& p, DType dt, cudaStream_t stream, const char* name) {
  check_params(p, name);
  switch (dt) {
    case DType::f32: return by_head_dim<float, Impl>(p, stream);
    case DType::f64: return by_head_dim<double, Impl>(p, stream);
    default:
      throw std::invalid_argument(std::string(name) + ": dtype " + dtype_name(dt) +
                                  ", expected f32 or f64 (f16/bf16 run on the tensor-core kernels)");
  }
}

void generic_fwd(const AttnParams& p, DType dt, cudaStream_t stream) { by_dtype<Fwd>(p, dt, stream, "generic_fwd"); }
void generic_bwd(const AttnParams& p, DType dt, cudaStream_t stream) { by_dtype<Bwd>(p, dt, stream, "generic_bwd"); }

}  // namespace fused_attn
