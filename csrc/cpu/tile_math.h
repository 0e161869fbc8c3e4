// Tile-level helpers shared by the CPU forward and backward kernels: small row-major GEMMs, the exp-based
// softmax steps on a score tile, and transposes for the pre-passes. Float and double overloads, so the
// kernels are one template over the element type.
//
// Why these choices (measured on the 2-core Xeon (Sapphire Rapids) dev box, see notes/cpu_kernels.md):
// - GEMM: at::native::cpublas::brgemm(float) is the exported (TORCH_API) small-GEMM entry point of
//   libtorch_cpu (oneDNN ukernel, else MKL). cpublas::gemm and its helpers are declared in CPUBlas.h but
//   not exported from libtorch_cpu.so, so an extension cannot link them. brgemm has no transpose flags:
//   the kernels pre-transpose K (and Q, dO in the backward) once per head, which costs O(S*D).
//   64x64x64 brgemm runs at ~170 GFLOP/s on one core, as fast as MKL sgemm at that size.
// - exp: a base-2 polynomial exp on GCC vector extensions, compiled per ISA with target_clones (AVX-512,
//   AVX2, baseline) and picked at load time, so the package is fast without -march flags and still runs
//   on any x86-64. Max relative error ~2 ulp. Double uses std::exp2 (fp64 is for accuracy, not speed).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "../mask.h"

// at::parallel_for is a header template: without -fopenmp it quietly runs on one thread.
#if !defined(_OPENMP)
#pragma message("fused_attn CPU kernels compiled without -fopenmp: at::parallel_for will use one thread")
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__)
#define FA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_CPU_CLONES
#endif
#define FA_CPU_INLINE inline __attribute__((always_inline))

// The 64-byte vector helpers below are always inlined, so the "vector ABI changes" note GCC gives for
// them is moot. It is reported at the end of the translation unit, so it cannot be pushed/popped here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fused_attn {
namespace cpu {

// ---------------------------------------------------------------------------------------------------
// Scheduling. Tasks differ in cost (causal: the last query tile visits every key tile, the first one),
// and at::parallel_for hands each thread one contiguous range, which leaves one core idle for the tail.
// So each thread pulls the next task from a shared counter, most expensive first. Every task writes
// only its own outputs in a fixed order, so results do not depend on which thread ran what.
// make() builds one thread's scratch; body(scratch, task) runs one task.
template <typename Make, typename Body>
void run_tasks(const std::vector<int64_t>& cost, Make make, Body body) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    auto scratch = make();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(scratch, order[t]);
  });
}

// Leading dimension for a pre-transposed (D x S) buffer: S rounded up to 16 plus 16 elements, so that
// the D rows of a tile do not sit a multiple of 4 KiB apart (S = 1024, 2048, ... would otherwise put
// every row of a GEMM operand in the same L1 sets).
inline int64_t padded_ld(int64_t s) { return (s + 15) / 16 * 16 + 16; }

// ---------------------------------------------------------------------------------------------------
// GEMM: C (M x N, ldc) = A (M x K, lda) * B (K x N, ldb) [+ C when accumulate], all row-major.

inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 float* c, int64_t ldc, bool accumulate) {
  // A size-1 dimension may carry any stride (0, 1, ...); the row stride of a one-row operand is never
  // used, so make it one the GEMM accepts (ld >= columns).
  if (m == 1) {
    lda = std::max(lda, k);
    ldc = std::max(ldc, n);
  }
  if (k == 1) ldb = std::max(ldb, n);
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c);
}

// fp64: a plain loop nest (i, k, j), vectorised along j by the compiler.
inline void gemm(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb,
                 double* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    double* __restrict__ ci = c + i * ldc;
    if (!accumulate)
      for (int64_t j = 0; j < n; ++j) ci[j] = 0.0;
    for (int64_t kk = 0; kk < k; ++kk) {
      const double aik = a[i * lda + kk];
      const double* __restrict__ bk = b + kk * ldb;
      for (int64_t j = 0; j < n; ++j) ci[j] += aik * bk[j];
    }
  }
}

// dst (cols x rows, ld_dst) = scale * src (rows x cols, ld_src)^T [+ dst when accumulate], in 16x16
// blocks for cache reuse.
template <typename T>
void transpose_scaled(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst,
                      T scale, bool accumulate = false) {
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    const int64_t r1 = r0 + kB < rows ? r0 + kB : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t c1 = c0 + kB < cols ? c0 + kB : cols;
      if (accumulate) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] += scale * src[r * ld_src + c];
      } else {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = scale * src[r * ld_src + c];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Masking. Sets the scores of a visited tile that the rule hides to -inf: query rows [q0, q0 + qn) by keys
// [k0, k0 + kn), stored row-major by query (transposed = false) or by key (transposed = true, the
// backward's layout). Without a partly visible block the visible keys of a query row are one interval,
// Band::key_range of that row (and the visible queries of a key, Band::query_range), so a line is masked
// with two fills; inside a partly visible block every element asks element_visible.
template <typename T>
void mask_tile(const AttnParams& p, const TileVisit& v, int64_t b, int64_t h, int64_t q0, int64_t qn,
               int64_t k0, int64_t kn, T* s, int64_t ld, bool transposed) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const Band band(p, b);
  const int64_t lines = transposed ? kn : qn, len = transposed ? qn : kn;
  for (int64_t r = 0; r < lines; ++r) {
    T* line = s + r * ld;
    if (v.layout_partial) {
      for (int64_t c = 0; c < len; ++c) {
        const int64_t i = transposed ? q0 + c : q0 + r, j = transposed ? k0 + r : k0 + c;
        if (!element_visible(p, v, b, h, i, j)) line[c] = kNegInf;
      }
      continue;
    }
    int64_t beg, end, base;
    if (transposed) {
      band.query_range(k0 + r, k0 + r + 1, beg, end);
      base = q0;
    } else {
      band.key_range(q0 + r, q0 + r + 1, beg, end);
      base = k0;
    }
    const int64_t lo = imin(imax(beg - base, 0), len);  // first visible column
    const int64_t hi = imax(imin(end - base, len), lo);  // one past the last visible column
    for (int64_t c = 0; c < lo; ++c) line[c] = kNegInf;
    for (int64_t c = hi; c < len; ++c) line[c] = kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------------
// Vectorised fp32 exp (16 lanes; GCC lowers the 64-byte vector to 1 zmm, 2 ymm or 4 xmm registers).

namespace vec {
typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
constexpr int kW = 16;

FA_CPU_INLINE f16 splat(float x) { return f16{} + x; }
FA_CPU_INLINE i16 splat_i(int32_t x) { return i16{} + x; }
FA_CPU_INLINE f16 load(const float* p) {
  f16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FA_CPU_INLINE void store(float* p, f16 v) { std::memcpy(p, &v, sizeof(v)); }
// The first n (< 16) lanes from p, the rest `fill`.
FA_CPU_INLINE f16 load_part(const float* p, int64_t n, float fill) {
  float tmp[kW];
  for (int i = 0; i < kW; ++i) tmp[i] = i < n ? p[i] : fill;
  return load(tmp);
}
FA_CPU_INLINE void store_part(float* p, f16 v, int64_t n) {
  float tmp[kW];
  store(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
FA_CPU_INLINE f16 vmax(f16 a, f16 b) { return a > b ? a : b; }
// Horizontal max and sum as a shuffle tree (a fixed order on every ISA); a loop through memory here
// cost ~10% of the forward in store-forwarding stalls.
FA_CPU_INLINE f16 swap_halves(f16 v, int w) {
  switch (w) {
    case 8: return __builtin_shuffle(v, i16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    case 4: return __builtin_shuffle(v, i16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    case 2: return __builtin_shuffle(v, i16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    default: return __builtin_shuffle(v, i16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  }
}
FA_CPU_INLINE float hmax(f16 v) {
  v = vmax(v, swap_halves(v, 8));
  v = vmax(v, swap_halves(v, 4));
  v = vmax(v, swap_halves(v, 2));
  v = vmax(v, swap_halves(v, 1));
  return v[0];
}
FA_CPU_INLINE float hsum(f16 v) {
  v += swap_halves(v, 8);
  v += swap_halves(v, 4);
  v += swap_halves(v, 2);
  v += swap_halves(v, 1);
  return v[0];
}

// 2^x for x <= 127; exactly 0 below -125 (also for -inf and NaN), so masked scores give P = 0.
// The kernels work in base 2 (scores pre-scaled by log2(e), as FlashAttention does), which saves the
// two-constant ln2 range reduction. n = round(x) through the 1.5 * 2^23 trick (the low bits of t hold n),
// f = x - n in [-0.5, 0.5], 2^f by a degree-6 polynomial (relative-error fit, 1e-7 max in fp32 with
// rounding), and 2^n added straight into the exponent bits. ~15 vector ops per 16 elements, against
// ~24 for a natural-base Cephes exp with clamps: the forward's softmax step went from 24% to 19% of its
// GEMM time (perf, one thread, B1 H8 S2048 D64).
// Written once for any float vector F with its int32 twin I (decode.cpp uses 8 lanes).
template <typename F, typename I>
FA_CPU_INLINE F exp2_lanes(F x) {
  const I keep = x >= (F{} + -125.0f);
  x = x < (F{} + 127.0f) ? x : (F{} + 127.0f);
  const F magic = F{} + 12582912.0f;
  const F t = x + magic;
  const F f = x - (t - magic);
  F y = F{} + 1.535612594e-4f;
  y = y * f + 1.339881786e-3f;
  y = y * f + 9.618427777e-3f;
  y = y * f + 5.550332683e-2f;
  y = y * f + 2.402264799e-1f;
  y = y * f + 6.931472027e-1f;
  y = y * f + 1.0f;
  const I bits = (I)y + ((I)t << 23);
  return (F)(bits & keep);
}
FA_CPU_INLINE f16 exp2(f16 x) { return exp2_lanes<f16, i16>(x); }
}  // namespace vec

// ---------------------------------------------------------------------------------------------------
// Score modifiers (mask.h's ScoreMod) on a score tile, before masking. With a softcap the tile holds the
// natural-unit scores s = scale * q.k and leaves as x = log2(e) * (cap * tanh(s / cap)); without one it
// holds x = log2(e) * s already. Then ALiBi subtracts log2(e) * slope * |i + offset - j|. With dmod non-null
// (the backward), dmod gets d(capped)/ds = 1 - tanh^2 at the same positions (ld shared with s).
// tanh(y) = sign(y) (1 - e) / (1 + e) with e = 2^(-2 log2(e) |y|), on the vector exp2 above: a libm tanh
// per score cost as much as the whole forward.

// The modifiers on one vector of a line: y <- cap_mul * tanh(y * inv_cap) (when inv_cap > 0), then
// y -= a * |dstart + step * lane| (when a != 0); -inf stays -inf (masked scores stay masked). g, when
// non-null, gets d(capped)/dy = 1 - tanh^2. Always inlined, so it is compiled for each target clone of its
// caller (a lambda or an out-of-line helper would be compiled for the baseline ISA only).
namespace vec {
FA_CPU_INLINE f16 alibi_dist(float dstart, float step) {
  const f16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const f16 dd = splat(dstart) + iota * step;
  return (f16)((i16)dd & splat_i(0x7fffffff));  // |dd| by clearing the sign bit
}
FA_CPU_INLINE f16 score_mod(f16 y, float inv_cap, float cap_mul, float a, float dstart, float step, f16* g) {
  if (inv_cap <= 0.0f) {  // ALiBi alone: -inf minus a finite bias stays -inf, no select needed
    if (g) *g = splat(1.0f);
    return a != 0.0f ? y - a * alibi_dist(dstart, step) : y;
  }
  const float ninf = -std::numeric_limits<float>::infinity();
  const i16 masked = y == splat(ninf);
  if (inv_cap > 0.0f) {
    const f16 u = y * inv_cap;
    const f16 au = u < splat(0.0f) ? -u : u;
    const f16 e = exp2(au * (-2.0f * 1.4426950408889634f));  // in (0, 1]
    const f16 th = (splat(1.0f) - e) / (splat(1.0f) + e);
    const f16 t = u < splat(0.0f) ? -th : th;
    if (g) *g = splat(1.0f) - t * t;
    y = t * cap_mul;
  }
  if (a != 0.0f) y -= a * alibi_dist(dstart, step);
  return masked ? splat(ninf) : y;
}
}  // namespace vec

// One line of a tile through vec::score_mod (the backward's separate pass; the forward fuses the same
// arithmetic into its softmax step).
FA_CPU_CLONES static void mod_row_f32(float* x, int64_t n, float inv_cap, float cap_mul, float a, float d0,
                                      float step, float* dmod) {
  for (int64_t c = 0; c < n; c += vec::kW) {
    const int64_t w = n - c < vec::kW ? n - c : vec::kW;
    vec::f16 g;
    const vec::f16 y0 = w == vec::kW ? vec::load(x + c) : vec::load_part(x + c, w, 0.0f);
    const vec::f16 y = vec::score_mod(y0, inv_cap, cap_mul, a, d0 + step * static_cast<float>(c), step,
                                      dmod ? &g : nullptr);
    if (w == vec::kW) {
      vec::store(x + c, y);
      if (dmod) vec::store(dmod + c, g);
    } else {
      vec::store_part(x + c, y, w);
      if (dmod) vec::store_part(dmod + c, g, w);
    }
  }
}

inline void mod_row(float* x, int64_t n, double inv_cap, double cap_mul, double a, double d0, double step,
                    float* dmod) {
  mod_row_f32(x, n, static_cast<float>(inv_cap), static_cast<float>(cap_mul), static_cast<float>(a),
              static_cast<float>(d0), static_cast<float>(step), dmod);
}
inline void mod_row(double* x, int64_t n, double inv_cap, double cap_mul, double a, double d0, double step,
                    double* dmod) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    if (x[c] == kNegInf) {  // masked: stays -inf; its dmod must still be written (P = 0 there, 0 * junk = NaN)
      if (dmod) dmod[c] = 0.0;
      continue;
    }
    double y = x[c];
    if (inv_cap > 0) {
      const double t = std::tanh(y * inv_cap);
      if (dmod) dmod[c] = 1.0 - t * t;
      y = cap_mul * t;
    }
    if (a != 0) {
      const double dd = d0 + step * static_cast<double>(c);
      y -= a * (dd < 0 ? -dd : dd);
    }
    x[c] = y;
  }
}

// Score modifiers (mask.h's ScoreMod) on a score tile. With a softcap the tile holds the natural-unit
// scores s = scale * q.k and leaves as x = log2(e) * (cap * tanh(s / cap)); without one it holds
// x = log2(e) * s already. Then ALiBi subtracts log2(e) * slope * |i + offset - j|. Entries already masked
// to -inf stay -inf. With dmod non-null (the backward), dmod gets d(capped)/ds = 1 - tanh^2 at the same
// positions (ld shared with s). Rows are query rows q0.. (transposed = false) or key rows k0.. (transposed
// = true, the backward's layout). tanh(y) = sign(y) (1 - e) / (1 + e) with e = 2^(-2 log2(e) |y|), on the
// vector exp2 above.
template <typename T>
void score_mod_tile(const ScoreMod& mod, int64_t q0, int64_t qn, int64_t k0, int64_t kn, T* s, int64_t ld,
                    bool transposed, T* dmod) {
  constexpr double kL2e = 1.4426950408889634074;
  const int64_t lines = transposed ? kn : qn, len = transposed ? qn : kn;
  const double a = kL2e * mod.slope;
  for (int64_t r = 0; r < lines; ++r) {
    // distance i + offset - j along the line: +1 per query step, -1 per key step
    const int64_t d0 = transposed ? q0 + mod.offset - (k0 + r) : q0 + r + mod.offset - k0;
    mod_row(s + r * ld, len, mod.cap > 0 ? mod.inv_cap : 0.0, kL2e * mod.cap, a, static_cast<double>(d0),
            transposed ? 1.0 : -1.0, dmod ? dmod + r * ld : nullptr);
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward: one online-softmax step on a score tile s (rows x cols, ld), scores already scaled (base 2:
// scale * log2(e) * q.k) and masked (-inf). Per row: m_new = max(m, rowmax); s <- 2^(s - m_new);
// l <- l * alpha + rowsum with alpha = 2^(m - m_new), returned in alpha[r] for rescaling the output
// accumulator. A row whose max is still -inf uses 0 in place of the max (so P = 0 and alpha = 1, never
// NaN).

// With a score modifier (fwd.cpp passes `mod` for tiles of a ScoreMod-active call), the first pass over
// each row applies vec::score_mod in registers and stores the result before the second pass reads it,
// instead of a separate pass over the tile: one read and one write of the tile less.
struct RowMod {
  float inv_cap = 0.0f, cap_mul = 0.0f, a = 0.0f;
  float d0 = 0.0f;  // distance i + offset - j at row 0, column 0; +1 per row, -1 per column
};

FA_CPU_CLONES static void softmax_step_f32(float* s, int64_t rows, int64_t cols, int64_t ld, float* m,
                                           float* l, float* alpha, const RowMod* mod) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t cv = cols - cols % vec::kW;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    vec::f16 vm = vec::splat(kNegInf);
    if (mod) {
      const float dr = mod->d0 + static_cast<float>(r);
      for (int64_t c = 0; c < cv; c += vec::kW) {
        const vec::f16 y = vec::score_mod(vec::load(row + c), mod->inv_cap, mod->cap_mul, mod->a,
                                          dr - static_cast<float>(c), -1.0f, nullptr);
        vec::store(row + c, y);
        vm = vec::vmax(vm, y);
      }
      if (cv < cols) {
        const vec::f16 y = vec::score_mod(vec::load_part(row + cv, cols - cv, kNegInf), mod->inv_cap,
                                          mod->cap_mul, mod->a, dr - static_cast<float>(cv), -1.0f, nullptr);
        vec::store_part(row + cv, y, cols - cv);
        vm = vec::vmax(vm, y);
      }
    } else {
      for (int64_t c = 0; c < cv; c += vec::kW) vm = vec::vmax(vm, vec::load(row + c));
      if (cv < cols) vm = vec::vmax(vm, vec::load_part(row + cv, cols - cv, kNegInf));
    }
    const float tile_max = vec::hmax(vm);
    const float m_old = m[r];
    const float m_new = tile_max > m_old ? tile_max : m_old;
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    alpha[r] = m_old == m_new ? 1.0f : std::exp2(m_old - m_use);
    const vec::f16 vsub = vec::splat(m_use);
    vec::f16 vs = vec::splat(0.0f);
    for (int64_t c = 0; c < cv; c += vec::kW) {
      const vec::f16 e = vec::exp2(vec::load(row + c) - vsub);
      vec::store(row + c, e);
      vs += e;
    }
    if (cv < cols) {
      const vec::f16 e = vec::exp2(vec::load_part(row + cv, cols - cv, kNegInf) - vsub);
      vec::store_part(row + cv, e, cols - cv);
      vs += e;
    }
    l[r] = l[r] * alpha[r] + vec::hsum(vs);
    m[r] = m_new;
  }
}

inline void softmax_step(float* s, int64_t rows, int64_t cols, int64_t ld, float* m, float* l, float* alpha,
                         const RowMod* mod = nullptr) {
  softmax_step_f32(s, rows, cols, ld, m, l, alpha, mod);
}

inline void softmax_step(double* s, int64_t rows, int64_t cols, int64_t ld, double* m, double* l,
                         double* alpha) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    double* row = s + r * ld;
    double tile_max = kNegInf;
    for (int64_t c = 0; c < cols; ++c) tile_max = row[c] > tile_max ? row[c] : tile_max;
    const double m_old = m[r];
    const double m_new = tile_max > m_old ? tile_max : m_old;
    const double m_use = m_new == kNegInf ? 0.0 : m_new;
    alpha[r] = m_old == m_new ? 1.0 : std::exp2(m_old - m_use);
    double sum = 0.0;
    for (int64_t c = 0; c < cols; ++c) {
      row[c] = std::exp2(row[c] - m_use);
      sum += row[c];
    }
    l[r] = l[r] * alpha[r] + sum;
    m[r] = m_new;
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, on transposed tiles (rows = keys, cols = queries), one pass over the S^T and dP^T tiles:
//   s[r][c]  <- P = 2^(s[r][c] - lse_adj[c])   (base 2: s and lse_adj carry a factor log2(e);
//                                                lse_adj = +inf for rows that see nothing, so P = 0)
//   dp[r][c] <- scale * P * (dp[r][c] - delta[c])
// Fused (the dP^T GEMM now runs before it) so dS uses P from registers instead of re-reading the 32 KiB
// P tile that the dP^T GEMM had pushed out of L1; measured together with the tile-blocked layout.

FA_CPU_CLONES static void probs_dsoft_f32(float* s, float* dp, int64_t rows, int64_t cols, int64_t ld,
                                          const float* lse_adj, const float* delta, float scale) {
  const int64_t cv = cols - cols % vec::kW;
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = s + r * ld;
    float* drow = dp + r * ld;
    for (int64_t c = 0; c < cv; c += vec::kW) {
      const vec::f16 pr = vec::exp2(vec::load(srow + c) - vec::load(lse_adj + c));
      vec::store(srow + c, pr);
      vec::store(drow + c, (pr * scale) * (vec::load(drow + c) - vec::load(delta + c)));
    }
    if (cv < cols) {
      const int64_t n = cols - cv;
      const vec::f16 x = vec::load_part(srow + cv, n, 0.0f) - vec::load_part(lse_adj + cv, n, 0.0f);
      const vec::f16 pr = vec::exp2(x);
      vec::store_part(srow + cv, pr, n);
      const vec::f16 g = vec::load_part(drow + cv, n, 0.0f) - vec::load_part(delta + cv, n, 0.0f);
      vec::store_part(drow + cv, (pr * scale) * g, n);
    }
  }
}

inline void probs_dsoft(float* s, float* dp, int64_t rows, int64_t cols, int64_t ld, const float* lse_adj,
                        const float* delta, float scale) {
  probs_dsoft_f32(s, dp, rows, cols, ld, lse_adj, delta, scale);
}
inline void probs_dsoft(double* s, double* dp, int64_t rows, int64_t cols, int64_t ld, const double* lse_adj,
                        const double* delta, double scale) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const double pr = std::exp2(s[r * ld + c] - lse_adj[c]);
      s[r * ld + c] = pr;
      dp[r * ld + c] = (pr * scale) * (dp[r * ld + c] - delta[c]);
    }
}

// ---------------------------------------------------------------------------------------------------
// fp32 transposes and row dots for the pre/post passes. The scalar 16x16-block transpose above cost ~3% of
// the backward (perf, one thread, B1 H8 S2048 D64: Q, dO, K in and dQ out, 4M elements per call); here a
// full 16x16 block is transposed in registers by four butterfly stages of two-source shuffles.

namespace vec {
// Stage with stride s on rows a (bit s clear) and b = a + s: elements whose column bit s differs from the
// row bit s swap places, so after s = 1, 2, 4, 8 element (r, c) sits at (c, r).
FA_CPU_INLINE void bfly(f16& a, f16& b, int s) {
  f16 x, y;
  switch (s) {
    case 1:
      x = __builtin_shuffle(a, b, i16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30});
      y = __builtin_shuffle(a, b, i16{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
      break;
    case 2:
      x = __builtin_shuffle(a, b, i16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29});
      y = __builtin_shuffle(a, b, i16{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
      break;
    case 4:
      x = __builtin_shuffle(a, b, i16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27});
      y = __builtin_shuffle(a, b, i16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
      break;
    default:
      x = __builtin_shuffle(a, b, i16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23});
      y = __builtin_shuffle(a, b, i16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
      break;
  }
  a = x;
  b = y;
}
}  // namespace vec

FA_CPU_CLONES static void transpose_scaled_f32(const float* src, int64_t ld_src, int64_t rows, int64_t cols,
                                               float* dst, int64_t ld_dst, float scale, bool accumulate) {
  constexpr int64_t kB = vec::kW;
  const int64_t rv = rows - rows % kB, cv = cols - cols % kB;
  for (int64_t r0 = 0; r0 < rv; r0 += kB)
    for (int64_t c0 = 0; c0 < cv; c0 += kB) {
      vec::f16 t[kB];
      for (int64_t i = 0; i < kB; ++i) t[i] = vec::load(src + (r0 + i) * ld_src + c0) * scale;
      for (int s = 1; s < kB; s *= 2)
        for (int64_t i = 0; i < kB; ++i)
          if (!(i & s)) vec::bfly(t[i], t[i + s], s);
      for (int64_t i = 0; i < kB; ++i) {
        float* out = dst + (c0 + i) * ld_dst + r0;
        vec::store(out, accumulate ? vec::load(out) + t[i] : t[i]);
      }
    }
  // Edges (rows or cols not a multiple of 16): element by element.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < rv ? cv : 0; c < cols; ++c) {
      float& out = dst[c * ld_dst + r];
      out = accumulate ? out + scale * src[r * ld_src + c] : scale * src[r * ld_src + c];
    }
}

inline void transpose_scaled(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
                             int64_t ld_dst, float scale, bool accumulate = false) {
  transpose_scaled_f32(src, ld_src, rows, cols, dst, ld_dst, scale, accumulate);
}

// out[i] = sum_c a[i][c] * b[i][c] for n rows of length d (strides lda, ldb): the backward's delta.
// 16-lane partial sums; the scalar loop this replaces was one serial add chain per row.
FA_CPU_CLONES static void row_dots_f32(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n,
                                       int64_t d, float* out) {
  const int64_t dv = d - d % vec::kW;
  for (int64_t i = 0; i < n; ++i) {
    const float* ai = a + i * lda;
    const float* bi = b + i * ldb;
    vec::f16 acc = vec::splat(0.0f);
    for (int64_t c = 0; c < dv; c += vec::kW) acc += vec::load(ai + c) * vec::load(bi + c);
    float sum = vec::hsum(acc);
    for (int64_t c = dv; c < d; ++c) sum += ai[c] * bi[c];
    out[i] = sum;
  }
}

inline void row_dots(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d,
                     float* out) {
  row_dots_f32(a, lda, b, ldb, n, d, out);
}
inline void row_dots(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t n, int64_t d,
                     double* out) {
  for (int64_t i = 0; i < n; ++i) {
    double sum = 0;
    for (int64_t c = 0; c < d; ++c) sum += a[i * lda + c] * b[i * ldb + c];
    out[i] = sum;
  }
}

}  // namespace cpu
}  // namespace fused_attn
