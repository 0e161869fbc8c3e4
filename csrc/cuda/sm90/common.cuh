// What the Hopper forward and backward kernels share: the shared-memory tile layout that TMA writes and
// wgmma reads, its descriptors, and the host-side tensor maps.
//
// Tile layout ("SW128 tile"): a ROWS x HD tile of 2-byte elements is stored as HD / 64 column blocks, one
// after the other, each ROWS rows of 128 bytes (64 elements). Inside a block, 16-byte chunk c of row r
// sits at chunk c ^ (r % 8): the 128-byte swizzle, which is what a TMA box {64, ROWS} with
// CU_TENSOR_MAP_SWIZZLE_128B writes when the block starts 1024-byte aligned (the pattern repeats every
// 8 rows = 1024 bytes, and is taken from address bits 7-9). The same bytes are
//   - a K-major wgmma operand (rows = M or N, 16 consecutive columns = one k-step): start = block +
//     row0 * 128 + (k16 % 4) * 32, SBO = 1024 (next 8 rows), LBO unused;
//   - an MN-major operand (rows = K, columns = N): start = block 0 + k0 * 128 (k0 % 8 == 0),
//     LBO = ROWS * 128 (next 64 columns = next block), SBO = 1024 (next 8 rows of K).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../../params.h"
#include "ptx.cuh"
#include "tmap.h"

namespace fused_attn {
namespace sm90 {

template <int ROWS>
struct Sw128Tile {
  static_assert(ROWS % 8 == 0, "whole 8-row swizzle atoms");
  static constexpr uint32_t kBlockBytes = ROWS * 128;  // one 64-column block
  // Byte offset of element (r, col) (col even: a pair shares the 4-byte word).
  __device__ __forceinline__ static uint32_t offset(int r, int col) {
    return static_cast<uint32_t>((col >> 6) * kBlockBytes + r * 128 + ((((col >> 3) & 7) ^ (r & 7)) << 4) +
                                 ((col & 7) << 1));
  }
  // Descriptors are a base descriptor plus an encoded byte offset (the start-address field is the low
  // 14 bits and every address here is < 2^18, so the addition never carries out of it): the per-k-step
  // descriptors are then one 64-bit add of a constant, which the compiler rematerialises instead of
  // keeping dozens of them live across the main loop.
  // K-major descriptor base of a tile at `base` (rows from 0, columns from 0).
  __device__ __forceinline__ static uint64_t kmajor_base(uint32_t base) { return make_desc_sw128(base, 16, 1024); }
  // ... of rows [row0, row0 + M or N) x columns [16 ks, 16 ks + 16).
  __device__ __forceinline__ static uint64_t kmajor(uint64_t desc0, int row0, int ks) {
    return desc0 + static_cast<uint64_t>(((ks >> 2) * kBlockBytes + row0 * 128 + (ks & 3) * 32) >> 4);
  }
  // MN-major descriptor base of a tile at `base` (LBO = next 64 columns, SBO = next 8 rows).
  __device__ __forceinline__ static uint64_t mnmajor_base(uint32_t base) {
    return make_desc_sw128(base, kBlockBytes, 1024);
  }
  // ... of rows [k0, k0 + 16) (K, k0 % 8 == 0) x columns [64 cb0, ...) (N).
  __device__ __forceinline__ static uint64_t mnmajor(uint64_t desc0, int k0, int cb0 = 0) {
    return desc0 + static_cast<uint64_t>((cb0 * kBlockBytes + k0 * 128) >> 4);
  }
};

// The accumulator registers of a wgmma: fence each one (see reg_fence) after a wait and before an issue.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) reg_fence(r[i]);
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) reg_fence(r[i][j]);
}

// Rows [0, nrows) of a ROWS x COLS part of an SW128 tile (tile rows r0 .., columns c0 ..) to global memory
// at g (row stride ld elements), columns < d only, by the NT threads of a warpgroup in 8-byte pieces, a
// warp's stores covering whole rows. The packed-batch epilogues use it instead of a TMA store, whose box
// would also write the rows after the sequence's last one (the next sequence's). The tile was written with
// st.shared by these threads and synchronised; d % 8 == 0, so a piece of 4 columns is wholly in or out.
template <typename Tile, int ROWS, int COLS, int NT, typename Elem>
__device__ __forceinline__ void store_rows(uint32_t tile, int r0, int c0, Elem* g, int64_t ld, int64_t nrows,
                                           int64_t d, int ti) {
  static_assert(COLS % 4 == 0 && (ROWS * COLS / 4) % NT == 0, "whole pieces per thread");
  constexpr int kPer = COLS / 4;  // 8-byte pieces per row
#pragma unroll 4
  for (int x = ti; x < ROWS * kPer; x += NT) {
    const int r = x / kPer, col = c0 + 4 * (x % kPer);
    if (r < nrows && col < d)
      *reinterpret_cast<float2*>(g + r * ld + col) = ld_shared_f32x2(tile + Tile::offset(r0 + r, col));
  }
}

// ------------------------------------------------------------------------------------------------
// Host: tensor maps (the driver entry point: tmap.h).

// Rows and batches of the tensor maps: fixed-length calls map (B, H, S, D) as they are; a packed batch's
// (total, H, D) tensors (batch stride 0) are one batch of total_q / total_k rows.
struct MapRows {
  int64_t q, k, b;
};
inline MapRows map_rows(const AttnParams& p) {
  return p.varlen() ? MapRows{p.total_q, p.total_k, 1} : MapRows{p.sq, p.sk, p.batch};
}
// The batch coordinate of sequence b in those maps (its rows then start at SeqInfo::q_off / k_off).
__device__ __forceinline__ int map_batch(const AttnParams& p, int64_t b) {
  return p.varlen() ? 0 : static_cast<int>(b);
}

// A (B, H, S, D) tensor of 2-byte elements (unit stride in D) as a 4-D tensor map {D, S, H, B}, box
// {64, box_rows, 1, 1}, 128-byte swizzle; loads outside the tensor read zeros, stores there are dropped.
// Strides must be positive multiples of 16 bytes below 2^40 wherever the size is > 1 (ops.cpp copies other
// tensors first); for a size-1 dimension the stride is irrelevant and a valid one is put in its place.
inline void make_tmap(CUtensorMap* map, const void* base, bool bf16, int64_t d, int64_t s, int64_t h, int64_t b,
                      const Strides& st, int box_rows, const char* name) {
  const PFN_cuTensorMapEncodeTiled_v12000 enc = encode_tiled_fn();
  if (!enc) throw std::runtime_error("fused_attn sm90: the CUDA driver has no cuTensorMapEncodeTiled");
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(s), static_cast<cuuint64_t>(h),
                              static_cast<cuuint64_t>(b)};
  const int64_t sizes[3] = {s, h, b};
  const int64_t elems[3] = {st.s, st.h, st.b};
  cuuint64_t strides[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t bytes = elems[i] * 2;
    if (sizes[i] <= 1) {
      strides[i] = 16;
    } else if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40)) {
      throw std::invalid_argument(std::string(name) + ": stride " + std::to_string(elems[i]) +
                                  " elements cannot be described to the tensor memory accelerator "
                                  "(expected a positive multiple of 8 elements)");
    } else {
      strides[i] = static_cast<cuuint64_t>(bytes);
    }
  }
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t estr[4] = {1, 1, 1, 1};
  const CUresult r = enc(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                         const_cast<void*>(base), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                         CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error(std::string("fused_attn sm90: cuTensorMapEncodeTiled failed for ") + name +
                             " (error " + std::to_string(static_cast<int>(r)) + ")");
}

template <typename Kernel>
inline void set_smem(Kernel kernel, int bytes, const std::string& where) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess)
    throw std::runtime_error(where + "cannot get " + std::to_string(bytes) + " bytes of shared memory per block: " +
                             cudaGetErrorString(e));
}

inline void check_launch(const std::string& where) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(where + "launch failed: " + cudaGetErrorString(e));
}

}  // namespace sm90
}  // namespace fused_attn
