// AttnParams: everything a kernel needs, as raw pointers, int64 strides and sizes.
// Built once on the host by ops.cpp and passed by value to every kernel (CPU and CUDA), so no
// kernel source includes torch headers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fused_attn {

// Strides of a (B, H, S, D) tensor in elements; the D stride is 1 by contract.
struct Strides {
  int64_t b = 0, h = 0, s = 0;
  FA_HD int64_t at(int64_t bi, int64_t hi, int64_t si) const { return bi * b + hi * h + si * s; }
};

// A list of tiles to visit, at the granularity of the kernel that reads it (tq query rows by tk keys).
// Row r of the list (for batch b, head h) holds cnt[r] entries; an entry e >= 0 is a tile whose every
// element the block layout allows; an entry e < 0 names tile (-e - 1), which the layout allows only in
// part, so the kernel checks the layout per element there. Broadcast over batch is a zero batch stride.
struct TileList {
  const int32_t* cnt = nullptr;
  const int32_t* idx = nullptr;
  int64_t cnt_b = 0, cnt_h = 0;           // cnt is (Bm, H, rows), row stride 1
  int64_t idx_b = 0, idx_h = 0, idx_r = 0;  // idx is (Bm, H, rows, width), entry stride 1
  FA_HD int count(int64_t b, int64_t h, int64_t row) const { return cnt[b * cnt_b + h * cnt_h + row]; }
  FA_HD int entry(int64_t b, int64_t h, int64_t row, int i) const {
    return idx[b * idx_b + h * idx_h + row * idx_r + i];
  }
};

// The user's block layout itself (uint8, (Bm, H, nqb, nkb)), read only inside partly visible tiles.
struct LayoutRef {
  const uint8_t* p = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;  // key-block stride 1
  int64_t bq = 1, bk = 1;          // block size in query rows and keys
  FA_HD bool allows(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return p[b * sb + h * sh + (i / bq) * sr + (j / bk)] != 0;
  }
};

struct AttnParams {
  // Inputs and outputs. Element type is the kernel's template argument; lse and delta are float for
  // 16- and 32-bit inputs and double for double inputs.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  void* lse = nullptr;
  // Backward only.
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* delta = nullptr;       // rowsum(dO * O) - dlse, same layout as lse
  const void* dlse = nullptr;  // optional gradient of lse (lse's type and layout); null means zero
  float* dq_accum = nullptr;   // fp32 (B, Hq, Sq_padded, D) workspace for the atomic dQ path

  int64_t batch = 0, hq = 0, hk = 0, sq = 0, sk = 0, d = 0;
  Strides q_st, k_st, v_st, o_st, do_st, dq_st, dk_st, dv_st;
  int64_t lse_b = 0, lse_h = 0;  // lse/delta are (B, Hq, Sq), contiguous in Sq
  int64_t dqa_b = 0, dqa_h = 0, dqa_s = 0;

  double scale = 1.0;
  // Window after folding causal in: -1 means unbounded on that side.
  int64_t window_left = -1, window_right = -1;

  // Block-sparse. When sparse is false the lists are unused and every tile of the band is visited.
  bool sparse = false;
  int64_t list_tq = 0, list_tk = 0;  // tile granularity of the lists below
  TileList kv_list;                   // per query tile: key tiles to visit (forward, dQ)
  TileList q_list;                    // per key tile: query tiles to visit (dK, dV)
  LayoutRef layout;

  bool deterministic = false;

  FA_HD int64_t group() const { return hq / hk; }  // query heads per key/value head
};

}  // namespace fused_attn
