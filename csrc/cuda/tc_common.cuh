// Device primitives of the fp16/bf16 tensor-core kernels (forward and backward), sm80 and newer:
// cp.async, ldmatrix, mma.sync m16n8k16, packing, exp2, reciprocal, quad reductions, and the swizzled
// shared-memory layout of a (rows x HD) tile with the loaders that fill it.
//
// Notation used in every comment below, for one warp:
//   lane = threadIdx.x % 32,  g = lane / 4 (the "group", 0..7),  t = lane % 4 (thread in group, 0..3).
//
// Fragments of mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"); a 32-bit register holds two 16-bit elements,
// the lower column / lower k index in the low half:
//   A (16 x 16, m x k), 4 regs:  a[0] = A[g    ][2t, 2t+1]     a[1] = A[g + 8][2t, 2t+1]
//                                a[2] = A[g    ][2t+8, 2t+9]   a[3] = A[g + 8][2t+8, 2t+9]
//   B (16 x 8,  k x n), 2 regs:  b[0] = B[2t, 2t+1][g]         b[1] = B[2t+8, 2t+9][g]
//   C (16 x 8,  m x n), 4 fp32:  c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g + 8][2t, 2t+1]
// So the accumulator of S = Q K^T over 8 keys, converted pairwise with pack2, is directly half of an A
// fragment of P for the next product: A(P)[k-step kk] = { pack(c[2kk][0..1]), pack(c[2kk][2..3]),
// pack(c[2kk+1][0..1]), pack(c[2kk+1][2..3]) } where c[j] is the accumulator of keys 8j..8j+7.
//
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane 8i + r gives the address of row r of 8x8 matrix
// i (16 contiguous bytes); register i of lane (g, t) receives matrix i's row g, columns 2t and 2t+1
// (with .trans: matrix i's rows 2t and 2t+1 at column g, i.e. the transposed matrix).
// Two lane-address patterns cover every operand (see ldsm_rows16 / ldsm_rows8x2 below):
//   rows16  (row = lane % 16,                  chunk = lane / 16):
//       plain:  the A fragment of a row-major [m][k] 16x16 block (Q, dO, P from smem ...)
//       .trans: the B fragments of TWO n-tiles from a row-major [k][n] 16x16 block (V in P V):
//               r[0], r[1] = b[0], b[1] of n 0..7;  r[2], r[3] = b[0], b[1] of n 8..15
//   rows8x2 (row = (lane % 8) + 8 * (lane / 16), chunk = (lane / 8) % 2):
//       plain:  the B fragments of TWO n-tiles from a row-major [n][k] 16x16 block (K in Q K^T):
//               r[0], r[1] = b[0], b[1] of n 0..7;  r[2], r[3] = b[0], b[1] of n 8..15
//       .trans: the A fragment of a 16x16 block stored transposed, [k][m] row-major (e.g. dS^T from dS)
// "chunk" is a 16-byte column unit (8 elements) relative to the block's first column.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fused_attn {
namespace tc {

// ------------------------------------------------------------------------------------------------
// Addresses, cp.async

// 32-bit shared-space address of a generic pointer into shared memory (what ldmatrix / cp.async take).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy, asynchronous, L2 only (.cg). When pred is false nothing is read and
// the 16 destination bytes are zero-filled (src-size 0); gsrc must still be a valid-looking pointer.
__device__ __forceinline__ void cp_async16(uint32_t sdst, const void* gsrc, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sdst), "l"(gsrc), "r"(src_bytes)
               : "memory");
}
// Close the current group of cp.async issued by this thread.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight. Other threads' copies
// are visible only after a barrier that follows this wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ------------------------------------------------------------------------------------------------
// ldmatrix (see the header comment for which lane gives which row and what each register receives)

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Lane -> (row, chunk) within a 16 x 16 block for the two address patterns of the header comment.
__device__ __forceinline__ int ldsm_rows16_row(int lane) { return lane & 15; }
__device__ __forceinline__ int ldsm_rows16_chunk(int lane) { return lane >> 4; }
__device__ __forceinline__ int ldsm_rows8x2_row(int lane) { return (lane & 7) | ((lane >> 4) << 3); }
__device__ __forceinline__ int ldsm_rows8x2_chunk(int lane) { return (lane >> 3) & 1; }

// ------------------------------------------------------------------------------------------------
// mma.sync m16n8k16, fp32 accumulate: c += A * B with the fragments of the header comment.

template <typename Elem>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<Elem, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same<Elem, __nv_bfloat16>::value, "Elem must be __half or __nv_bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ------------------------------------------------------------------------------------------------
// Conversions

// Two floats -> one register of two Elem, round to nearest; lo goes to the low half (lower column).
template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<Elem, __half>::value) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// One register of two Elem -> two floats (x = low half).
template <typename Elem>
__device__ __forceinline__ float2 unpack2(uint32_t v) {
  if constexpr (std::is_same<Elem, __half>::value) {
    __half2 h = *reinterpret_cast<__half2*>(&v);
    return __half22float2(h);
  } else {
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&v);
    return __bfloat1622float2(h);
  }
}

// ------------------------------------------------------------------------------------------------
// Math

// 2^x, MUFU.EX2 (approximate, flush-to-zero). exp2(-inf) = +0, which masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 1/x, MUFU.RCP (approximate, flush-to-zero). PTX ISA, rcp.approx.ftz.f32: at most 1 ulp from 1/x over the
// whole range; subnormal inputs and results flush to sign-preserving zero; 1/(+-0) = +-inf, 1/(+-inf) = +-0.
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Reductions over the 4 lanes of a group (lanes 4g..4g+3), i.e. over one accumulator row: every
// accumulator row g (or g + 8) is spread over the t = 0..3 lanes of group g, so after reducing each
// lane's own partial over its columns, these give the whole row's value to all 4 lanes.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

// ------------------------------------------------------------------------------------------------
// Swizzled shared-memory tile: ROWS x HD elements of 2 bytes, rows packed with no padding
// (HD * 2 bytes each), row r starting at byte r * HD * 2. A row is kChunks 16-byte chunks; logical
// chunk c of row r lives at physical chunk Swz<HD>::chunk(r, c) of that row. The permutation makes any
// 8 consecutive rows starting at a multiple of 8, read at one logical chunk (one ldmatrix phase), hit
// 8 distinct 16-byte bank groups:
//   - chunks in complete groups of 8 (c < kFull): XOR the low 3 bits with r % 8 (when the row length
//     is a multiple of 128 bytes every row starts at bank 0, and r % 8 spreads them);
//   - HD = 32, 96, 160 leave a trailing group of 4 chunks (and rows then alternate between starting at
//     bank 0 and bank 16): XOR the low 2 bits with (r / 2) % 4, so (r % 2, (r / 2) % 4) spreads them.
//     The complete groups of those HDs are conflict-free too: bank group = 4 (r % 2) + ((c ^ r) % 8),
//     a bijection of r % 8.
template <int HD>
struct Swz {
  static_assert(HD % 32 == 0, "tile width must be a multiple of 32 elements (4 chunks)");
  static constexpr int kChunks = HD / 8;
  static constexpr int kFull = kChunks & ~7;
  static constexpr int kRowBytes = HD * 2;

  __device__ __forceinline__ static int chunk(int r, int c) {
    if (kFull == kChunks || c < kFull) return (c & ~7) | ((c ^ r) & 7);
    return (c & ~3) | ((c ^ (r >> 1)) & 3);
  }
  // Byte offset of logical (row r, chunk c) from the tile's start.
  __device__ __forceinline__ static uint32_t offset(int r, int c) {
    return static_cast<uint32_t>(r * kRowBytes + chunk(r, c) * 16);
  }
  // Byte offset for an ldmatrix lane: c0 is the block's first chunk, EVEN and preferably a compile-time
  // constant (then the group test folds away); cl is the lane's chunk (0 or 1) from the pattern. Since
  // groups have 4 or 8 chunks, c0 and c0 + 1 are always in the same group.
  __device__ __forceinline__ static uint32_t ldsm_offset(int r, int c0, int cl) {
    int pc;
    if (kFull == kChunks || c0 < kFull)
      pc = (c0 & ~7) | (((c0 | cl) ^ r) & 7);
    else
      pc = (c0 & ~3) | (((c0 | cl) ^ (r >> 1)) & 3);
    return static_cast<uint32_t>(r * kRowBytes + pc * 16);
  }
};

// Per-lane ldmatrix offsets in a Swz<HD> tile, precomputed once so that every ldmatrix in an unrolled
// loop is "register + immediate": the swizzle's XOR makes the offset of (block row0, chunk c0) non-affine
// in c0, and left to itself the compiler may keep one register per (row0, c0) pair (64 for V at
// HD = 256). Here the lane-dependent part takes one register per value of c0 % 8 (4) plus, for
// HD % 64 == 32, per value of c0 % 4 in the trailing group (2); the rest is a compile-time constant.
// Construct with the lane's (row, chunk) from one of the two patterns, e.g.
//   LdsmLane<HD> a(ldsm_rows16_row(lane), ldsm_rows16_chunk(lane));
// then a(row0, c0) = Swz<HD>::ldsm_offset(row0 + row, c0, chunk) for row0 % 8 == 0 and even c0 (both
// preferably compile-time; row0 may be a run-time multiple of 8 such as warp * 16).
template <int HD>
struct LdsmLane {
  using S = Swz<HD>;
  uint32_t full[4];  // row * kRowBytes + physical chunk * 16, c0 % 8 = 0, 2, 4, 6 (complete groups)
  uint32_t tail[2];  // same for c0 % 4 = 0, 2 in the trailing group of 4 (HD % 64 == 32 only)
  __device__ __forceinline__ LdsmLane(int row, int cl) {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      full[e] = static_cast<uint32_t>(row * S::kRowBytes + ((((2 * e) | cl) ^ row) & 7) * 16);
#pragma unroll
    for (int e = 0; e < 2; ++e)
      tail[e] = static_cast<uint32_t>(row * S::kRowBytes + ((((2 * e) | cl) ^ (row >> 1)) & 3) * 16);
  }
  __device__ __forceinline__ uint32_t operator()(int row0, int c0) const {
    if (S::kFull == S::kChunks || c0 < S::kFull)
      return full[(c0 & 7) >> 1] + static_cast<uint32_t>(row0 * S::kRowBytes + (c0 & ~7) * 16);
    return tail[(c0 & 3) >> 1] + static_cast<uint32_t>(row0 * S::kRowBytes + (c0 & ~3) * 16);
  }
};

// Asynchronously copy a ROWS x HD tile from global memory into a swizzled shared tile (Swz<HD>), using
// NTHREADS threads (tid in [0, NTHREADS)), one 16-byte cp.async per (row, chunk). Rows >= rows_valid
// and columns >= d (d % 8 == 0) are zero-filled, nothing is read there. grow0 points at element
// (row 0, column 0) of the tile in global memory (already offset by batch, head and first row, in
// int64); row_stride is the S stride in elements. The caller commits and waits.
// Mapping: kTPR = 8 (4 when HD % 64 == 32) consecutive threads share a row and take chunks cb, cb + kTPR,
// ...; rows advance by NTHREADS / kTPR (a multiple of 8) per step. So a warp reads whole 128-byte (64)
// row segments, and the thread's swizzled offsets and global addresses are a fixed base plus
// compile-time steps: nothing per (row, chunk) for the compiler to hoist into registers across a
// caller's loop.
template <typename Elem, int HD, int ROWS, int NTHREADS>
__device__ __forceinline__ void load_tile_async(uint32_t sdst, const Elem* grow0, int64_t row_stride,
                                                int rows_valid, int d, int tid) {
  using S = Swz<HD>;
  constexpr int kC = HD / 8;
  constexpr int kTPR = kC % 8 == 0 ? 8 : 4;
  constexpr int kRowStep = NTHREADS / kTPR;
  static_assert(NTHREADS % kTPR == 0 && kRowStep % 8 == 0, "NTHREADS must be a multiple of 8 * kTPR");
  constexpr int kRowIters = (ROWS + kRowStep - 1) / kRowStep;
  constexpr int kPerRow = kC / kTPR;
  const int r0 = tid / kTPR;
  const int cb = tid % kTPR;
  const Elem* src = grow0 + static_cast<int64_t>(r0) * row_stride + cb * 8;
#pragma unroll
  for (int it = 0; it < kRowIters; ++it) {
    const int r = r0 + it * kRowStep;
    if (ROWS % kRowStep != 0 && r >= ROWS) break;
    const bool row_ok = r < rows_valid;
#pragma unroll
    for (int k = 0; k < kPerRow; ++k) {
      const int c = cb + k * kTPR;
      const bool ok = row_ok && c * 8 < d;
      // Swizzle depends on r % 8 and (r / 2) % 4 only, the same for r0 and r (kRowStep % 8 == 0).
      const uint32_t off = S::offset(r0, c) + static_cast<uint32_t>(it * kRowStep * S::kRowBytes);
      cp_async16(sdst + off, ok ? src + k * kTPR * 8 : grow0, ok);
    }
    src += kRowStep * row_stride;
  }
}

// Copy a swizzled shared tile (Swz<HD>, ROWS x HD) to global memory, 16 bytes per access, writing only
// rows < rows_valid and columns < d. Synchronous; the caller puts a barrier (or __syncwarp when one
// warp wrote and reads back its own rows) between filling the tile and calling this.
template <typename Elem, int HD, int ROWS, int NTHREADS>
__device__ __forceinline__ void store_tile(const char* ssrc, Elem* grow0, int64_t row_stride, int rows_valid,
                                           int d, int tid) {
  constexpr int kC = HD / 8;
  constexpr int kTotal = ROWS * kC;
  constexpr int kIters = (kTotal + NTHREADS - 1) / NTHREADS;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = tid + it * NTHREADS;
    if (kTotal % NTHREADS != 0 && idx >= kTotal) break;
    const int r = idx / kC;
    const int c = idx - r * kC;
    if (r < rows_valid && c * 8 < d) {
      const uint4 v = *reinterpret_cast<const uint4*>(ssrc + Swz<HD>::offset(r, c));
      *reinterpret_cast<uint4*>(grow0 + static_cast<int64_t>(r) * row_stride + c * 8) = v;
    }
  }
}

// Write one accumulator pair (row r, columns col, col + 1; col even) as two Elem into a swizzled shared
// tile (Swz<HD>): the epilogue path that stages an accumulator before store_tile. For the C fragment,
// r = row0 + g (c[0], c[1]) or row0 + g + 8 (c[2], c[3]) and col = 8 n + 2t. Conflict-free across a warp
// when the 8 groups write 8 consecutive rows (starting at a multiple of 8) at one column chunk.
template <typename Elem, int HD>
__device__ __forceinline__ void st_pair(char* stile, int r, int col, float lo, float hi) {
  *reinterpret_cast<uint32_t*>(stile + Swz<HD>::offset(r, col >> 3) + (col & 7) * 2) = pack2<Elem>(lo, hi);
}

}  // namespace tc
}  // namespace fused_attn
