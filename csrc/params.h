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

// One sequence of the batch: its row offsets into packed tensors and its lengths. Fixed-length batches:
// offsets 0 and the lengths of the call. Variable-length (packed) batches: rows [q_off, q_off + sq) of
// q / out / lse and [k_off, k_off + sk) of k / v. KV cache: sk = keys in the cache after this call.
struct SeqInfo {
  int64_t q_off, k_off, sq, sk;
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
  // fp32 workspace of the atomic dQ path (CUDA tensor cores), zero-filled, row stride dqa_s, head dq_accum
  // columns: fixed-length (B, Hq, Sq_padded, hd) with Sq rounded up to the backward query tile; packed
  // batch (Hq, total_q, hd) with dqa_b = 0, row q_off + i for row i of sequence b, the same rows as lse (no
  // padding: only rows < Sq_b of a sequence are ever added to, and the conversion walks every row).
  float* dq_accum = nullptr;

  // sq / sk: the lengths of a fixed-length call, or the largest per-sequence lengths (grid sizes, buffer
  // sizes) when the lengths vary per sequence (see seq()).
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

  // ---- Per-sequence lengths (all null: every sequence has lengths (sq, sk), offsets 0).
  // Packed variable-length batch: q, out are (total_q, Hq, D) and k, v (total_k, Hk, D), given with batch
  // stride 0 (Strides.b = 0), head stride and row stride; lse / delta are (Hq, total_q) (lse_b = 0).
  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1), non-decreasing from 0
  const int32_t* cu_seqlens_k = nullptr;  // (batch + 1)
  int64_t total_q = 0, total_k = 0;       // rows of the packed tensors
  // KV cache: sequence b has seqlens_k[b] + seqlens_k_add keys (the cache's old keys plus the new ones).
  const int32_t* seqlens_k = nullptr;  // (batch)
  int64_t seqlens_k_add = 0;

  // ---- Paged K/V (KV cache). Null: key j of (b, h) is at k_st.at(b, h, k_off + j). Otherwise k and v are
  // page pools (num_pages, page_size, Hk, D) with k_st.b the page stride, k_st.s the slot stride, k_st.h
  // the head stride, and key j of sequence b lives in page block_table[b * block_table_b + j / page_size],
  // slot j % page_size.
  const int32_t* block_table = nullptr;
  int64_t block_table_b = 0, page_size = 0;
  int64_t num_pages = 0;  // pages in the pool: GPU kernels clamp the entries they read to it

  // ---- Score modifiers (mask.h, ScoreMod), applied to the scaled score s = scale * q.k:
  // softcap > 0: s <- softcap * tanh(s / softcap); ALiBi: s <- s - slope[b, h] * |i + (Sk - Sq) - j|.
  double softcap = 0.0;
  const float* alibi = nullptr;  // slopes, float32, (B or 1, Hq): slope of (b, h) at b * alibi_b + h
  int64_t alibi_b = 0;

  // ---- Split-KV (decode): the key range of each (batch, kv head) is cut into num_splits parts whose
  // partial results (out normalised by the part's own sum, and the part's lse) are merged by a combine
  // step. fp32 workspaces, fp64 for fp64 inputs (cuda/decode.h).
  int64_t num_splits = 1;
  void* o_part = nullptr;    // (num_splits, B, Hq, Sq, D)
  void* lse_part = nullptr;  // (num_splits, B, Hq, Sq)

  FA_HD int64_t group() const { return hq / hk; }  // query heads per key/value head

  FA_HD bool varlen() const { return cu_seqlens_q != nullptr; }

  // The rows of lse / delta (and of q, out, dq) as (row_batches(), Hq, row_len()) for passes that treat
  // every row alike (delta = rowsum(dO * O), the dQ conversion): a packed batch is one run of total_q rows.
  FA_HD int64_t row_batches() const { return varlen() ? 1 : batch; }
  FA_HD int64_t row_len() const { return varlen() ? total_q : sq; }

  // Sequence b's offsets and lengths. Offsets read from the device are clamped to the packed tensors and
  // lengths to [0, max]: cu_seqlens that were not checked on the host (a GPU call given max_seqlen, which
  // reads nothing back) can give a wrong answer but never an access outside the tensors.
  FA_HD SeqInfo seq(int64_t b) const {
    SeqInfo s{0, 0, sq, sk};
    if (cu_seqlens_q) {
      s.q_off = clamp(cu_seqlens_q[b], 0, total_q);
      s.sq = clamp(clamp(cu_seqlens_q[b + 1], s.q_off, total_q) - s.q_off, 0, sq);
    }
    if (cu_seqlens_k) {
      s.k_off = clamp(cu_seqlens_k[b], 0, total_k);
      s.sk = clamp(clamp(cu_seqlens_k[b + 1], s.k_off, total_k) - s.k_off, 0, sk);
    } else if (seqlens_k) {
      s.sk = clamp(static_cast<int64_t>(seqlens_k[b]) + seqlens_k_add, 0, sk);
    }
    return s;
  }
  static FA_HD int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

  // Element offset of key / value row j (0-based within sequence b, of s = seq(b)) for kv head h.
  FA_HD int64_t k_row(int64_t b, int64_t h, int64_t j, const SeqInfo& s) const {
    return block_table ? paged(k_st, b, h, j) : k_st.at(b, h, s.k_off + j);
  }
  FA_HD int64_t v_row(int64_t b, int64_t h, int64_t j, const SeqInfo& s) const {
    return block_table ? paged(v_st, b, h, j) : v_st.at(b, h, s.k_off + j);
  }
  FA_HD int64_t paged(const Strides& st, int64_t b, int64_t h, int64_t j) const {
    const int64_t page = block_table[b * block_table_b + j / page_size];
    return page * st.b + (j % page_size) * st.s + h * st.h;
  }
};

}  // namespace fused_attn
