// Split-KV decoding on CUDA (flash_kvcache): what the split kernels (decode_kernel.cuh on tensor cores,
// decode.cu in fp32 / fp64) and the combine kernel share. Host launchers are declared in launch.h.
//
// Workspace of a call with num_splits > 1 (allocated by ops.cpp with the input's options): o_part
// (num_splits, B, Hq, Sq, D) and lse_part (num_splits, B, Hq, Sq), contiguous, fp32 (fp64 for fp64 inputs):
// each split's output normalised by its own sum, and its lse (-inf for a split that sees no key). The
// combine kernel weights split t by exp(lse_t - lse) with lse = log sum_t exp(lse_t), in split order.
#pragma once
#include <cuda_runtime_api.h>

#include "../kernels.h"
#include "../mask.h"

namespace fused_attn {

// Keys per K / V tile of the tensor-core split kernel; a split is a whole number of tiles.
constexpr int kDecodeTileK = 64;

// Split t of the key range [kb, ke) cut into ns parts of whole tiles: [kb + t * chunk, kb + (t + 1) * chunk)
// clipped to the range (empty for the last parts when the range is short).
FA_HD void decode_split_range(int64_t kb, int64_t ke, int64_t ns, int64_t t, int64_t& s0, int64_t& s1) {
  const int64_t n = ke > kb ? ke - kb : 0;
  const int64_t chunk = cdiv(cdiv(n, ns), kDecodeTileK) * kDecodeTileK;
  s0 = imin(kb + n, kb + t * chunk);
  s1 = imin(kb + n, s0 + chunk);
}

// Row (b, h, i) of split t in the workspace.
FA_HD int64_t decode_part_row(const AttnParams& p, int64_t t, int64_t b, int64_t h, int64_t i) {
  return ((t * p.batch + b) * p.hq + h) * p.sq + i;
}

// Address of key / value row j of (b, kvh), through the page table when the cache is paged. Page numbers are
// clamped to the pool: the host checks the entries in use (a GPU call reads them back once, in Python), but
// a direct call of the op with bad entries must not read outside the pool either.
template <typename T>
FA_HD const T* decode_kv_row(const AttnParams& p, const T* base, const Strides& st, int64_t b, int64_t kvh,
                             int64_t k_off, int64_t j) {
  if (p.block_table) {
    int64_t page = p.block_table[b * p.block_table_b + j / p.page_size];
    page = page < 0 ? 0 : (page >= p.num_pages ? p.num_pages - 1 : page);
    return base + page * st.b + kvh * st.h + (j % p.page_size) * st.s;
  }
  return base + st.at(b, kvh, k_off + j);
}

// Merges p.num_splits parts from the workspace into p.o / p.lse (decode.cu).
void decode_combine(const AttnParams& p, DType dt, cudaStream_t stream);

}  // namespace fused_attn
