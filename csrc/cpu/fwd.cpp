// CPU forward: tiled FlashAttention. One task per (batch, query head, query tile) keeps the output
// tile, running max m and running sum l in cache while it walks the key tiles that mask.h says to visit:
//   S = Q_tile (scale K_tile)^T            (GEMM; K pre-transposed and pre-scaled once per head)
//   mask S to -inf where needed            (only on tiles tile_needs_mask says are partial)
//   m' = max(m, rowmax S), P = exp(S - m'), l = l * exp(m - m') + rowsum P
//   O = O * exp(m - m') + P V              (GEMM)
// and finally O /= l, lse = m + log l (all in base 2, see tile_math.h). Rows that see no key end with
// out 0 and lse -inf.
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <stdexcept>
#include <string>

#include "../kernels.h"
#include "../mask.h"
#include "tile_math.h"

namespace fused_attn {
namespace {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.6931471805599453094;

// Dense tiles (no block layout): 128 query rows x 128 keys. Measured at B1 H8 S2048 D64 fp32, one thread
// (notes/cpu_kernels.md), time relative to torch SDPA, dense / causal: 64x64 1.01 / 0.99, 64x128
// 0.99 / 0.91, 128x128 0.92 / 0.87, 128x256 0.91 / 0.86, 64x256 0.91 / 0.94.
constexpr int64_t kFwdTileQ = 128;
constexpr int64_t kFwdTileK = 128;

// Tasks: (b, h, query tile) over every sequence's own tiles; cost = key tiles visited; group = b.
struct FwdTasks {
  struct Task {
    int64_t b, h, qt;
  };
  std::vector<Task> tasks;
  std::vector<int64_t> cost, group;
  FwdTasks(const AttnParams& p, const std::vector<SeqInfo>& seqs, int64_t tq, int64_t tk) {
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t h = 0; h < p.hq; ++h)
        for (int64_t qt = 0; qt < cdiv(seqs[b].sq, tq); ++qt) {
          tasks.push_back({b, h, qt});
          cost.push_back(KeyTiles(p, b, h, qt, tq, tk).count());
          group.push_back(b);
        }
  }
};

// Rows [row0, row0 + qn) of head h, sequence rows of batch entry b: out = acc / norm, lse = (m + log2 l) ln 2 (l
// and norm the same sum, except in the bf16 forward); a row that saw no key: out 0, lse -inf (a NaN sum, from a
// NaN score, gives a NaN row).
template <typename T>
void finish_rows(const AttnParams& p, int64_t b, int64_t h, int64_t row0, int64_t qn, bool started, const T* m,
                 const T* l, const T* norm, const T* acc, T* o, T* lse) {
  const int64_t d = p.d;
  T* lrow = lse + b * p.lse_b + h * p.lse_h + row0;
  for (int64_t r = 0; r < qn; ++r) {
    T* orow = o + p.o_st.at(b, h, row0 + r);
    if (!started || l[r] == 0) {
      for (int64_t c = 0; c < d; ++c) orow[c] = 0;
      lrow[r] = -std::numeric_limits<T>::infinity();
    } else {
      const T inv = T(1) / norm[r];
      const T* ar = acc + r * d;
      for (int64_t c = 0; c < d; ++c) orow[c] = ar[c] * inv;
      lrow[r] = (m[r] + std::log2(l[r])) * static_cast<T>(kLn2);
    }
  }
}

// Mask (-inf), then the modifiers, which keep -inf, then one online-softmax step on the score tile of (b, h)
// at query row q0, key k0 (qn x kn, ld): in fp32 the modifiers run inside the softmax step's first pass over
// the tile (tile_math.h), in fp64 as their own pass.
template <typename T>
void softmax_tile(const AttnParams& p, const TileVisit& vis, const ScoreMod& mod, int64_t b, int64_t h, int64_t q0,
                  int64_t qn, int64_t k0, int64_t kn, T* s, int64_t ld, T* m, T* l, T* alpha) {
  const bool masked = tile_needs_mask(p, vis, b, q0, q0 + qn, k0, k0 + kn);
  if (masked) cpu::mask_tile(p, vis, b, h, q0, qn, k0, kn, s, ld, false);
  if constexpr (std::is_same_v<T, float>) {
    if (mod.active()) {
      const cpu::RowMod rm = cpu::RowMod::of(mod, q0, k0, masked);
      cpu::softmax_step(s, qn, kn, ld, m, l, alpha, &rm);
      return;
    }
  } else {
    if (mod.active()) cpu::score_mod_tile(mod, q0, qn, k0, kn, s, ld, false, static_cast<T*>(nullptr));
  }
  cpu::softmax_step(s, qn, kn, ld, m, l, alpha);
}

// acc's rows *= alpha (the running max moved).
template <typename T>
void rescale_rows(T* acc, int64_t rows, int64_t d, const T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    if (alpha[r] == T(1)) continue;
    T* ar = acc + r * d;
    const T a = alpha[r];
    for (int64_t c = 0; c < d; ++c) ar[c] *= a;
  }
}

template <typename T>
struct FwdScratch {
  std::unique_ptr<T[]> s, acc, m, l, alpha, qc;
};

template <typename T>
void fwd_impl(const AttnParams& p) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t nb = p.batch, hq = p.hq, hk = p.hk, d = p.d, grp = p.group();
  if (nb == 0 || hq == 0 || p.sq == 0) return;
  if (p.block_table) throw std::invalid_argument("cpu_fwd: paged K/V go through cpu_kvcache_fwd");
  const int64_t tq = p.sparse ? p.list_tq : kFwdTileQ;
  const int64_t tk = p.sparse ? p.list_tk : kFwdTileK;

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* o = static_cast<T*>(p.o);
  T* lse = static_cast<T*>(p.lse);

  // Sequences (one per batch entry; their own lengths and row offsets when the batch is packed).
  std::vector<SeqInfo> seqs(nb);
  for (int64_t b = 0; b < nb; ++b) seqs[b] = p.seq(b);

  // Pre-pass: kt[b, kvh] = c * K^T, (D x Sk_b), the B operand of S = Q K^T, with c = scale * log2(e): scores
  // are in base 2 from here on (tile_math.h), lse is converted back at the end. With a softcap, c = scale:
  // the cap needs the natural-unit score, and score_mod_tile moves it to base 2.
  const bool capped = p.softcap > 0;
  const T kscale = static_cast<T>(capped ? p.scale : p.scale * kLog2e);
  std::vector<int64_t> ldk(nb), kt_off(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) {
    ldk[b] = cpu::padded_ld(seqs[b].sk);
    kt_off[b + 1] = kt_off[b] + hk * d * ldk[b];
  }
  const cpu::ThreadScratch<T, 0> kt_buf(kt_off[nb]);
  T* const kt = kt_buf.get();
  // Rows further apart than D (a (B, S, H, D) view, a packed batch: H * D apart) are copied to contiguous rows
  // for the GEMMs: V here beside K^T, each task's Q tile in its scratch. Rows 2 KiB apart (H 8, D 64 fp32)
  // fall in two of L1's 64 sets, so a 128-row tile thrashes it: one thread measured 8% slower on such views,
  // and a packed batch 17% slower than the same sequences as contiguous (1, H, S, D) calls.
  const bool copy_q = p.q_st.s != d, copy_v = p.v_st.s != d;
  std::vector<int64_t> vc_off(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) vc_off[b + 1] = vc_off[b] + (copy_v ? hk * seqs[b].sk * d : 0);
  const cpu::ThreadScratch<T, 1> vc_buf(vc_off[nb]);  // empty unless copy_v
  T* const vc = vc_buf.get();
  at::parallel_for(0, nb * hk, 1, [&](int64_t beg, int64_t end) {
    for (int64_t bh = beg; bh < end; ++bh) {
      const int64_t b = bh / hk, h = bh % hk;
      const SeqInfo& s = seqs[b];
      cpu::transpose_scaled(k + p.k_st.at(b, h, s.k_off), p.k_st.s, s.sk, d, kt + kt_off[b] + h * d * ldk[b],
                            ldk[b], kscale);
      if (copy_v) {
        const T* src = v + p.v_st.at(b, h, s.k_off);
        T* dst = vc + vc_off[b] + h * s.sk * d;
        for (int64_t r = 0; r < s.sk; ++r) std::copy(src + r * p.v_st.s, src + r * p.v_st.s + d, dst + r * d);
      }
    }
  });

  const FwdTasks ft(p, seqs, tq, tk);
  const std::vector<FwdTasks::Task>& tasks = ft.tasks;

  auto make = [&] {
    FwdScratch<T> w;
    w.s.reset(new T[tq * tk]);
    w.acc.reset(new T[tq * d]);
    w.m.reset(new T[tq]);
    w.l.reset(new T[tq]);
    w.alpha.reset(new T[tq]);
    if (copy_q) w.qc.reset(new T[tq * d]);
    return w;
  };

  auto body = [&](FwdScratch<T>& w, int64_t t) {
    const int64_t b = tasks[t].b, h = tasks[t].h, qt = tasks[t].qt, kvh = h / grp;
    const SeqInfo& sinfo = seqs[b];
    const int64_t sq = sinfo.sq, sk = sinfo.sk;
    const int64_t q0 = qt * tq, qn = imin(tq, sq - q0);
    const ScoreMod mod(p, b, h, sinfo);
    T* s = w.s.get();
    T* acc = w.acc.get();
    T* m = w.m.get();
    T* l = w.l.get();
    T* alpha = w.alpha.get();
    for (int64_t r = 0; r < qn; ++r) {
      m[r] = kNegInf;
      l[r] = 0;
    }
    const T* qtile = q + p.q_st.at(b, h, sinfo.q_off + q0);
    int64_t ldq = p.q_st.s;
    if (copy_q) {
      for (int64_t r = 0; r < qn; ++r) std::copy(qtile + r * ldq, qtile + r * ldq + d, w.qc.get() + r * d);
      qtile = w.qc.get();
      ldq = d;
    }
    const T* kth = kt + kt_off[b] + kvh * d * ldk[b];
    const T* vh = copy_v ? vc + vc_off[b] + kvh * sk * d : v + p.v_st.at(b, kvh, sinfo.k_off);
    const int64_t ldv = copy_v ? d : p.v_st.s;
    bool started = false;

    const KeyTiles tiles(p, b, h, qt, tq, tk);
    for (int64_t it = 0; it < tiles.count(); ++it) {
      const TileVisit vis = tiles.get(it);
      if (vis.tile < 0) continue;
      const int64_t k0 = vis.tile * tk;
      if (k0 >= sk) continue;
      const int64_t kn = imin(tk, sk - k0);

      cpu::gemm(qn, kn, d, qtile, ldq, kth + k0, ldk[b], s, tk, false);
      softmax_tile(p, vis, mod, b, h, q0, qn, k0, kn, s, tk, m, l, alpha);
      if (started) rescale_rows(acc, qn, d, alpha);
      cpu::gemm(qn, d, kn, s, tk, vh + k0 * ldv, ldv, acc, d, started);
      started = true;
    }

    finish_rows(p, b, h, sinfo.q_off + q0, qn, started, m, l, l, acc, o, lse);
  };

  cpu::run_tasks(ft.cost, make, body, &ft.group);  // sequence by sequence (tile_math.h)
}

// ---------------------------------------------------------------------------------------------------
// bf16 forward on CPUs whose oneDNN brgemm takes bf16 (AMX / AVX512-BF16: cpublas::could_pack): the two
// products in bf16 with fp32 accumulation, as on the GPU. S = Q K^T from bf16 Q and K (exact products), scaled
// by scale * log2(e) in fp32 (K cannot carry the scale without a bf16 rounding); the softmax step, masks and
// modifiers are the fp32 path's; P rounded to bf16 for O += P V (the GPU kernels' rounding); O, l, m in fp32.
// B operands in brgemm's VNNI layout, packed once per head in 64-key chunks (cpublas::pack takes N <= 64):
// K^T per chunk (K = d, N = 64 keys), V per chunk and 64 columns (K = 64 keys, N <= 64). Keys past the
// sequence are zero in both, so every chunk is a full 64 keys. Dense / causal / window / modifiers, d % 32 ==
// 0, no block layout, no packed batch (cpu_fwd_bf16_ok); everything else takes the fp32 kernels.
constexpr int64_t kLpChunk = 64;

namespace cb = at::native::cpublas;
using bf16 = c10::BFloat16;

}  // namespace

// In cpu:: for FA_CPU_BY_WIDTH (tile_math.h).
namespace cpu {
// Helpers of the bf16-GEMM forward: s[r][c] *= c for a tile, and P (fp32) rounded to bf16 (round to
// nearest even; columns [cols, cols_pad) zero) with each row's sum of the rounded values added to sum[r].
template <typename F>
FA_CPU_INLINE void scale_tile_f32_body(float* s, int64_t rows, int64_t cols, int64_t ld, float c) {
  constexpr int W = vec::width<F>;
  const int64_t cv = cols - cols % W;
  const F vc = vec::splat<F>(c);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    for (int64_t x = 0; x < cv; x += W) vec::store(row + x, vec::load<F>(row + x) * vc);
    if (cv < cols) vec::store_part(row + cv, vec::load_part<F>(row + cv, cols - cv, 0.0f) * vc, cols - cv);
  }
}
FA_CPU_BY_WIDTH(void, scale_tile_f32, (float* s, int64_t rows, int64_t cols, int64_t ld, float c),
                (s, rows, cols, ld, c))

template <typename F>
FA_CPU_INLINE void round_bf16_f32_body(const float* src, int64_t rows, int64_t cols, int64_t cols_pad, int64_t ld,
                                       uint16_t* dst, int64_t ldd, float* sum) {
  constexpr int W = vec::width<F>;
  using I = vec::int_of<F>;
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = src + r * ld;
    uint16_t* b = dst + r * ldd;
    typedef uint16_t H __attribute__((vector_size(2 * W)));
    F acc = vec::splat<F>(0.0f);
    auto round = [&](F v) {  // the bf16 bits of v in the low halves
      const I u = (I)v;
      return (I)(((u + vec::splat_i<F>(0x7fff) + ((u >> 16) & vec::splat_i<F>(1))) >> 16) & vec::splat_i<F>(0xffff));
    };
    const int64_t cv = cols - cols % W;
    for (int64_t x = 0; x < cv; x += W) {
      const I rb = round(vec::load<F>(a + x));
      acc += (F)(rb << 16);
      const H h = __builtin_convertvector(rb, H);
      std::memcpy(b + x, &h, sizeof(h));
    }
    if (cv < cols) {
      const I rb = round(vec::load_part<F>(a + cv, cols - cv, 0.0f));
      acc += (F)(rb << 16);
      const H h = __builtin_convertvector(rb, H);
      std::memcpy(b + cv, &h, 2 * (cols - cv));
    }
    for (int64_t x = cols; x < cols_pad; ++x) b[x] = 0;
    sum[r] += vec::hsum(acc);
  }
}
FA_CPU_BY_WIDTH(void, round_bf16_f32,
                (const float* src, int64_t rows, int64_t cols, int64_t cols_pad, int64_t ld, uint16_t* dst,
                 int64_t ldd, float* sum),
                (src, rows, cols, cols_pad, ld, dst, ldd, sum))
}  // namespace cpu

namespace {

void fwd_bf16_impl(const AttnParams& p) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t nb = p.batch, hq = p.hq, hk = p.hk, d = p.d, grp = p.group();
  if (nb == 0 || hq == 0 || p.sq == 0) return;
  const int64_t tq = kFwdTileQ, tk = kFwdTileK;  // tk a multiple of kLpChunk
  const bf16* q = static_cast<const bf16*>(p.q);
  const bf16* k = static_cast<const bf16*>(p.k);
  const bf16* v = static_cast<const bf16*>(p.v);
  float* o = static_cast<float*>(p.o);
  float* lse = static_cast<float*>(p.lse);
  std::vector<SeqInfo> seqs(nb);
  for (int64_t b = 0; b < nb; ++b) seqs[b] = p.seq(b);
  const bool capped = p.softcap > 0;
  const float kscale = static_cast<float>(capped ? p.scale : p.scale * kLog2e);

  // Packed K^T and V per (b, kv head): nch chunks of 64 keys; K^T chunk d x 64, V chunk 64 x d (as d / 64
  // column pieces of 64 x 64, the last narrower).
  std::vector<int64_t> nch(nb), off(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) {
    nch[b] = cdiv(seqs[b].sk, kLpChunk);
    off[b + 1] = off[b] + hk * nch[b] * kLpChunk * d;
  }
  std::vector<bf16> ktp(off[nb]), vp(off[nb]);
  at::parallel_for(0, nb * hk, 1, [&](int64_t beg, int64_t end) {
    std::vector<bf16> tmp(kLpChunk * d);
    for (int64_t bh = beg; bh < end; ++bh) {
      const int64_t b = bh / hk, h = bh % hk;
      const SeqInfo& si = seqs[b];
      for (int64_t c = 0; c < nch[b]; ++c) {
        const int64_t j0 = c * kLpChunk, jn = std::min(kLpChunk, si.sk - j0);
        bf16* kdst = ktp.data() + off[b] + (h * nch[b] + c) * kLpChunk * d;
        bf16* vdst = vp.data() + off[b] + (h * nch[b] + c) * kLpChunk * d;
        // K^T chunk (d x 64, keys past the sequence 0), then VNNI
        std::fill(tmp.begin(), tmp.end(), bf16(0.0f));
        for (int64_t j = 0; j < jn; ++j) {
          const bf16* kr = k + p.k_st.at(b, h, si.k_off + j0 + j);
          for (int64_t x = 0; x < d; ++x) tmp[x * kLpChunk + j] = kr[x];
        }
        cb::pack(d, kLpChunk, kLpChunk, kLpChunk, at::kBFloat16, at::kBFloat16, tmp.data(), kdst);
        // V chunk (64 x d, rows past the sequence 0), then VNNI per 64 columns
        std::fill(tmp.begin(), tmp.end(), bf16(0.0f));
        for (int64_t j = 0; j < jn; ++j) {
          const bf16* vr = v + p.v_st.at(b, h, si.k_off + j0 + j);
          std::copy(vr, vr + d, tmp.data() + j * d);
        }
        for (int64_t e = 0; e < d; e += kLpChunk) {
          const int64_t en = std::min(kLpChunk, d - e);
          cb::pack(kLpChunk, en, d, en, at::kBFloat16, at::kBFloat16, tmp.data() + e, vdst + e * kLpChunk);
        }
      }
    }
  });

  const FwdTasks ft(p, seqs, tq, tk);
  const std::vector<FwdTasks::Task>& tasks = ft.tasks;
  struct Scratch {
    std::unique_ptr<float[]> s, acc, m, l, lb, alpha;
    std::unique_ptr<bf16[]> pb;
  };
  auto make = [&] {
    Scratch w;
    w.s.reset(new float[tq * tk]);
    w.acc.reset(new float[tq * d]);
    w.m.reset(new float[tq]);
    w.l.reset(new float[tq]);
    w.lb.reset(new float[tq]);
    w.alpha.reset(new float[tq]);
    w.pb.reset(new bf16[tq * tk]);
    return w;
  };
  auto body = [&](Scratch& w, int64_t t) {
    const int64_t b = tasks[t].b, h = tasks[t].h, qt = tasks[t].qt, kvh = h / grp;
    const SeqInfo& si = seqs[b];
    const int64_t sk = si.sk, q0 = qt * tq, qn = imin(tq, si.sq - q0);
    const ScoreMod mod(p, b, h, si);
    float* s = w.s.get();
    float* acc = w.acc.get();
    float* m = w.m.get();
    float* l = w.l.get();
    float* alpha = w.alpha.get();
    float* lb = w.lb.get();
    for (int64_t r = 0; r < qn; ++r) {
      m[r] = kNegInf;
      l[r] = 0;
      lb[r] = 0;
    }
    const bf16* qtile = q + p.q_st.at(b, h, si.q_off + q0);
    const int64_t ldq = p.q_st.s;
    const bf16* kh = ktp.data() + off[b] + kvh * nch[b] * kLpChunk * d;
    const bf16* vh = vp.data() + off[b] + kvh * nch[b] * kLpChunk * d;
    bool started = false;
    const KeyTiles tiles(p, b, h, qt, tq, tk);
    for (int64_t it = 0; it < tiles.count(); ++it) {
      const TileVisit vis = tiles.get(it);
      if (vis.tile < 0) continue;
      const int64_t k0 = vis.tile * tk;
      if (k0 >= sk) continue;
      const int64_t kn = imin(tk, sk - k0), kc = cdiv(kn, kLpChunk);
      for (int64_t c = 0; c < kc; ++c)
        cb::brgemm(qn, kLpChunk, d, ldq, kLpChunk, tk, false, qtile,
                   kh + (k0 / kLpChunk + c) * kLpChunk * d, s + c * kLpChunk);
      cpu::scale_tile_f32(s, qn, kn, tk, kscale);
      softmax_tile(p, vis, mod, b, h, q0, qn, k0, kn, s, tk, m, l, alpha);
      for (int64_t r = 0; r < qn; ++r) lb[r] *= alpha[r];
      if (started) rescale_rows(acc, qn, d, alpha);
      // P V takes P in bf16; the output is normalised by the sum of those same rounded values (lb), so that
      // its weights sum to 1 (l, of the fp32 P, gives lse)
      cpu::round_bf16_f32(s, qn, kn, kc * kLpChunk, tk, reinterpret_cast<uint16_t*>(w.pb.get()), tk, lb);
      for (int64_t c = 0; c < kc; ++c) {
        const bf16* vc = vh + (k0 / kLpChunk + c) * kLpChunk * d;
        for (int64_t e = 0; e < d; e += kLpChunk) {
          const int64_t en = std::min(kLpChunk, d - e);
          cb::brgemm(qn, en, kLpChunk, tk, en, d, started || c > 0, w.pb.get() + c * kLpChunk, vc + e * kLpChunk,
                     acc + e);
        }
      }
      started = true;
    }
    cb::brgemm_release();
    finish_rows(p, b, h, si.q_off + q0, qn, started, m, l, lb, acc, o, lse);
  };
  cpu::run_tasks(ft.cost, make, body, &ft.group);
}

}  // namespace

bool cpu_bf16_gemm() {
  static const bool can = [] {
    const char* e = std::getenv("FUSED_ATTN_CPU_BF16_GEMM");
    if (e && e[0] == '0') return false;
    try {
      return at::native::cpublas::could_pack(at::kBFloat16);
    } catch (...) {
      return false;
    }
  }();
  return can;
}

bool cpu_fwd_bf16_ok(const AttnParams& p) {
  return cpu_bf16_gemm() && !p.sparse && !p.cu_seqlens_q && !p.block_table && p.d % 32 == 0 && p.d <= 256;
}

void cpu_fwd_bf16(const AttnParams& p) { fwd_bf16_impl(p); }

const char* cpu_isa() {
  switch (cpu::vec::isa_level()) {
    case 4: return "x86-64-v4";
    case 3: return "x86-64-v3";
    default: return "baseline";
  }
}

void cpu_fwd(const AttnParams& p, DType dt) {
  switch (dt) {
    case DType::f32:
      fwd_impl<float>(p);
      return;
    case DType::f64:
      fwd_impl<double>(p);
      return;
    default:
      throw std::invalid_argument("cpu_fwd: dtype " + std::to_string(static_cast<int>(dt)) +
                                  " is not supported; expected f32 or f64 (the caller upcasts fp16/bf16)");
  }
}

}  // namespace fused_attn
