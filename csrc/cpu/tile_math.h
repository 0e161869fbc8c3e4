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
// - exp: a base-2 polynomial exp on GCC vector extensions. The vector code is written once over the vector
//   type and compiled at each x86 level's register width (16 lanes AVX-512, 8 AVX2, 4 baseline), picked at
//   load time (FA_CPU_BY_WIDTH), so the package is fast without -march flags and still runs on any x86-64.
//   Max relative error ~2 ulp. Double uses std::exp2 (fp64 is for accuracy, not speed).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "../mask.h"

// at::parallel_for is a header template: without -fopenmp it quietly runs on one thread.
#if !defined(_OPENMP)
#pragma message("fused_attn CPU kernels compiled without -fopenmp: at::parallel_for will use one thread")
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
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
// group (optional, one entry per task; tasks of one sequence share one): tasks run group by group, most
// expensive first within a group. Interleaving the tasks of every sequence (longest first over the whole
// batch) made a packed batch's working set all of its K and V (134 MB for 32k tokens, H 8, D 64 in fp32)
// instead of one sequence's: 23% slower than calling flash() on each sequence (AVX2 EPYC, L3 32 MB). The
// dynamic pull keeps both threads busy across group boundaries, and the last group's shortest tasks end it.
// Flush to zero (MXCSR.FTZ) on the calling thread while in scope, the thread's previous mode restored after:
// a result below the normal range (|x| < 2^-126 in fp32) becomes 0 instead of a subnormal. The kernels' tasks
// run under it. ALiBi's bias takes far keys' P down to 2^-125 (exp2's cut), and dS = P (dP - delta) then
// comes out subnormal; Intel cores take a microcode assist for each subnormal result and operand, in the
// softmax steps and in the GEMMs that read dS. Measured on the AVX-512 Xeon (one thread, B1 H8 S2048 D64 fp32
// causal, slopes in [0, 0.1)): fwd+bwd with ALiBi 193-195 ms against 133-136 plain; with FTZ 130-133 and
// 126-128. Inputs are read as they are (DAZ stays off), and subnormal values carry less than 2^-126 of any
// result the kernels compute, so only results that are themselves below the normal range change (to 0).
class FlushToZero {
 public:
#if defined(__x86_64__) || defined(__i386__)
  FlushToZero() : old_(_mm_getcsr()) { _mm_setcsr(old_ | 0x8000u); }
  ~FlushToZero() { _mm_setcsr(old_); }

 private:
  unsigned old_;
#endif
};

template <typename Make, typename Body>
void run_tasks(const std::vector<int64_t>& cost, Make make, Body body, const std::vector<int64_t>* group = nullptr) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (group && (*group)[a] != (*group)[b]) return (*group)[a] < (*group)[b];
    return cost[a] > cost[b];
  });
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    const FlushToZero ftz;
    auto scratch = make();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) body(scratch, order[t]);
  });
}

// Scratch of the calling thread kept from call to call, grown when a call needs more (contents undefined).
// For the per-call copies of K^T and V (and the backward's transposed copies), which for a packed batch are as
// large as K and V themselves: a fresh buffer above glibc's mmap threshold (32 MiB at most) is mapped and
// zero-filled page by page on every call, which took 5% of a 32k-token packed forward in page faults. A request
// above kKeepBytes gets its own buffer, freed at the end of the call (there the page faults weigh little
// against the call's quadratic work), so a thread keeps at most kKeepBytes per slot. A slot is live only
// inside one kernel call, and a kernel call never calls another one.
template <typename T, int kSlot>
class ThreadScratch {
 public:
  static constexpr int64_t kKeepBytes = int64_t(256) << 20;
  explicit ThreadScratch(int64_t n) {
    if (n * static_cast<int64_t>(sizeof(T)) > kKeepBytes) {
      own_.reset(new T[n]);
      ptr_ = own_.get();
      return;
    }
    thread_local std::unique_ptr<T[]> buf;
    thread_local int64_t cap = 0;
    if (cap < n) {
      buf.reset();
      buf.reset(new T[n]);
      cap = n;
    }
    ptr_ = buf.get();
  }
  T* get() const { return ptr_; }

 private:
  std::unique_ptr<T[]> own_;
  T* ptr_ = nullptr;
};

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
// Vectorised fp32 helpers on GCC vector extensions, written once for any width W (4, 8 or 16 lanes) and
// compiled at the width of each ISA's registers: 16 lanes (one zmm) for x86-64-v4 (AVX-512), 8 (one ymm)
// for x86-64-v3 (AVX2 + FMA), 4 (one xmm) for baseline x86-64 and other architectures. The kernels that use
// them are templates over the vector type with one entry point per ISA (FA_CPU_BY_WIDTH below), picked once
// at load time, so the package is fast without -march flags and still runs on any x86-64.
// (One 16-lane type for every ISA, through target_clones, was the first version: on AVX2 GCC lowers a
// 64-byte vector to two ymm partly through the stack and its conditionals (max, select) to scalar code, which
// made the forward's softmax step 28% of the forward and a softcap +70%; notes/cpu_kernels.md.)

namespace vec {
template <int W>
struct Lanes;
template <>
struct Lanes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};
template <>
struct Lanes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct Lanes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};
template <typename F>
constexpr int width = static_cast<int>(sizeof(F) / sizeof(float));
template <typename F>
using int_of = typename Lanes<width<F>>::I;

template <typename F>
FA_CPU_INLINE F splat(float x) {
  return F{} + x;
}
template <typename F>
FA_CPU_INLINE int_of<F> splat_i(int32_t x) {
  return int_of<F>{} + x;
}
template <typename F>
FA_CPU_INLINE F load(const float* p) {
  F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename F>
FA_CPU_INLINE void store(float* p, F v) {
  std::memcpy(p, &v, sizeof(v));
}
// The first n (< W) lanes from p, the rest `fill`.
template <typename F>
FA_CPU_INLINE F load_part(const float* p, int64_t n, float fill) {
  float tmp[width<F>];
  for (int i = 0; i < width<F>; ++i) tmp[i] = i < n ? p[i] : fill;
  return load<F>(tmp);
}
template <typename F>
FA_CPU_INLINE void store_part(float* p, F v, int64_t n) {
  float tmp[width<F>];
  store(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
// n lanes (n = W when kFull) from / to p; the missing lanes read as `fill`.
template <typename F, bool kFull>
FA_CPU_INLINE F load_n(const float* p, int64_t n, float fill) {
  if constexpr (kFull)
    return load<F>(p);
  else
    return load_part<F>(p, n, fill);
}
template <typename F, bool kFull>
FA_CPU_INLINE void store_n(float* p, F v, int64_t n) {
  if constexpr (kFull)
    store(p, v);
  else
    store_part(p, v, n);
}
// a > b ? a : b and a < b ? a : b (the second operand where either is NaN), as one maxps / minps: GCC lowers
// the vector ternary to a compare and a blend. Inline assembly: the builtins of an ISA the translation unit is
// not compiled for are not declared, and each width is only ever inlined into the entry point of its own ISA
// (FA_CPU_BY_WIDTH).
template <typename F>
FA_CPU_INLINE F vmax(F a, F b) {
#if defined(__GNUC__) && defined(__x86_64__)
  F r;
  if constexpr (width<F> == 16)
    asm("vmaxps %2, %1, %0" : "=v"(r) : "v"(a), "vm"(b));
  else if constexpr (width<F> == 8)
    asm("vmaxps %2, %1, %0" : "=x"(r) : "x"(a), "xm"(b));
  else
    asm("maxps %2, %0" : "=x"(r) : "0"(a), "x"(b));
  return r;
#else
  return a > b ? a : b;
#endif
}
template <typename F>
FA_CPU_INLINE F vmin(F a, F b) {
#if defined(__GNUC__) && defined(__x86_64__)
  F r;
  if constexpr (width<F> == 16)
    asm("vminps %2, %1, %0" : "=v"(r) : "v"(a), "vm"(b));
  else if constexpr (width<F> == 8)
    asm("vminps %2, %1, %0" : "=x"(r) : "x"(a), "xm"(b));
  else
    asm("minps %2, %0" : "=x"(r) : "0"(a), "x"(b));
  return r;
#else
  return a < b ? a : b;
#endif
}
// 0, 1, 2, ... W - 1
template <typename F>
FA_CPU_INLINE F iota() {
  if constexpr (width<F> == 16)
    return F{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  else if constexpr (width<F> == 8)
    return F{0, 1, 2, 3, 4, 5, 6, 7};
  else
    return F{0, 1, 2, 3};
}
// Lane i <- lane i ^ w (w = W/2, ..., 2, 1): the steps of a horizontal reduction as a shuffle tree, a fixed
// order for a given width (a loop through memory here cost ~10% of the forward in store-forwarding stalls).
template <typename F>
FA_CPU_INLINE F swap_lanes(F v, int w) {
  using I = int_of<F>;
  if constexpr (width<F> == 16) {
    switch (w) {
      case 8: return __builtin_shuffle(v, I{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
      case 4: return __builtin_shuffle(v, I{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
      case 2: return __builtin_shuffle(v, I{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
      default: return __builtin_shuffle(v, I{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    }
  } else if constexpr (width<F> == 8) {
    switch (w) {
      case 4: return __builtin_shuffle(v, I{4, 5, 6, 7, 0, 1, 2, 3});
      case 2: return __builtin_shuffle(v, I{2, 3, 0, 1, 6, 7, 4, 5});
      default: return __builtin_shuffle(v, I{1, 0, 3, 2, 5, 4, 7, 6});
    }
  } else {
    return w == 2 ? __builtin_shuffle(v, I{2, 3, 0, 1}) : __builtin_shuffle(v, I{1, 0, 3, 2});
  }
}
template <typename F>
FA_CPU_INLINE float hmax(F v) {
  for (int w = width<F> / 2; w >= 1; w /= 2) v = vmax(v, swap_lanes(v, w));
  return v[0];
}
template <typename F>
FA_CPU_INLINE float hsum(F v) {
  for (int w = width<F> / 2; w >= 1; w /= 2) v += swap_lanes(v, w);
  return v[0];
}

// y[u] <- c[0] f[u]^(N-1) + ... + c[N-1] for u < U, by Horner's rule, each step on all U vectors before the
// next (see tanh_of_exp_n).
template <typename F, int U, int N>
FA_CPU_INLINE void horner_n(F* y, const F* f, const float (&c)[N]) {
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) y[u] = splat<F>(c[0]) * f[u] + c[1];
#pragma GCC unroll 8
  for (int i = 2; i < N; ++i)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) y[u] = y[u] * f[u] + c[i];
}

// 2^x for x <= 127; exactly 0 below -125 and for -inf, so masked scores give P = 0; NaN stays NaN (so a NaN
// score makes its row's sum and output NaN, as in PyTorch, instead of being dropped as a zero). The low cut is
// an and-not with x < -125, false for NaN: as many operations as an and with x >= -125. (The NaN comes out
// as NaN when its low 9 payload bits are 0, as for the NaN of float("nan"), 0/0, inf - inf and every
// fp16/bf16 NaN converted; other payloads end as a finite value.)
// The kernels work in base 2 (scores pre-scaled by log2(e), as FlashAttention does), which saves the
// two-constant ln2 range reduction. n = round(x) through the 1.5 * 2^23 trick (the low bits of t hold n),
// f = x - n in [-0.5, 0.5], 2^f by a degree-6 polynomial (relative-error fit, 1e-7 max in fp32 with
// rounding), and 2^n added straight into the exponent bits. ~14 vector ops per vector, against ~24 for a
// natural-base Cephes exp with clamps. kClampHigh = false where x <= 127 is known, as in x = score - row max
// (<= 0) in the softmax steps and x = score - lse (above 0 by rounding at most) in the backward: one min less.
template <typename F, bool kClampHigh = true>
FA_CPU_INLINE F exp2(F x) {
  using I = int_of<F>;
  const F magic = F{} + 12582912.0f;
  const I cut = x < (F{} + -125.0f);
  if constexpr (kClampHigh) x = vmin(F{} + 127.0f, x);  // NaN stays
  const F t = x + magic;
  const F f = x - (t - magic);
  F y;
  horner_n<F, 1>(&y, &f, {1.535612594e-4f, 1.339881786e-3f, 9.618427777e-3f, 5.550332683e-2f, 2.402264799e-1f,
                          6.931472027e-1f, 1.0f});
  const I bits = (I)y + ((I)t << 23);
  return (F)(bits & ~cut);
}
// 2^x for x <= 0 (a rounding step above 0 is fine: all it needs is x <= 127); -inf gives 0, NaN NaN.
template <typename F>
FA_CPU_INLINE F exp2_nonpos(F x) {
  return exp2<F, false>(x);
}

// The ISA level the width-dispatched kernels run at: 4 (x86-64-v4), 3 (x86-64-v3) or 1 (anything else),
// read once. FUSED_ATTN_CPU_ISA=v1 or v3 lowers it (the tests run every width a machine has that way); a
// level the CPU lacks is never taken.
inline int isa_level() {
  static const int level = [] {
    int have = 1;
#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__)
    __builtin_cpu_init();
    const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") &&
                    __builtin_cpu_supports("movbe");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512cd");
    have = v4 ? 4 : v3 ? 3 : 1;
#endif
    const char* e = std::getenv("FUSED_ATTN_CPU_ISA");
    const int want = e == nullptr ? 4 : std::strcmp(e, "v1") == 0 ? 1 : std::strcmp(e, "v3") == 0 ? 3 : 4;
    return std::min(have, want);
  }();
  return level;
}
}  // namespace vec

// One kernel body template `name##_body<F>` compiled at each width, and `name` calling the one for this CPU.
// params and args are parenthesised lists. (target_clones cannot pick a width: one source, one type.)
#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__)
#define FA_CPU_BY_WIDTH(ret, name, params, args)                                                              \
  __attribute__((target("arch=x86-64-v4"))) static ret name##_v4 params {                                    \
    return name##_body<vec::Lanes<16>::F> args;                                                               \
  }                                                                                                           \
  __attribute__((target("arch=x86-64-v3"))) static ret name##_v3 params {                                    \
    return name##_body<vec::Lanes<8>::F> args;                                                                \
  }                                                                                                           \
  static ret name##_v1 params { return name##_body<vec::Lanes<4>::F> args; }                                  \
  static ret name params {                                                                                    \
    switch (vec::isa_level()) {                                                                               \
      case 4: return name##_v4 args;                                                                          \
      case 3: return name##_v3 args;                                                                          \
      default: return name##_v1 args;                                                                         \
    }                                                                                                         \
  }
#else
#define FA_CPU_BY_WIDTH(ret, name, params, args) \
  static ret name params { return name##_body<vec::Lanes<4>::F> args; }
#endif

// ---------------------------------------------------------------------------------------------------
// Score modifiers (mask.h's ScoreMod) on a score tile, before masking. With a softcap the tile holds the
// natural-unit scores s = scale * q.k and leaves as x = log2(e) * (cap * tanh(s / cap)); without one it
// holds x = log2(e) * s already. Then ALiBi subtracts log2(e) * slope * |i + offset - j|. With dmod non-null
// (the backward), dmod gets d(capped)/ds = 1 - tanh^2 at the same positions (ld shared with s).
// tanh by vec::tanh_of_exp below: a libm tanh per score cost as much as the whole forward.

// The modifiers on one vector of a line: y <- cap_mul * tanh(y / cap) (when there is a cap; xk =
// cap_arg_scale(1 / cap)), then y -= a * |dstart + step * lane| (when a != 0); -inf stays -inf (masked scores
// stay masked). g, when non-null, gets d(capped)/dy = 1 - tanh^2. Always inlined, so it is compiled for
// each ISA entry point of its caller (a lambda or an out-of-line helper would be compiled for the baseline ISA
// only).
namespace vec {
template <typename F>
FA_CPU_INLINE F alibi_dist(float dstart, float step) {
  const F dd = splat<F>(dstart) + iota<F>() * step;
  return (F)((int_of<F>)dd & splat_i<F>(0x7fffffff));  // |dd| by clearing the sign bit
}

// The tanh's exponent per natural-unit score: score_mod_k's input is cap_arg_scale(1 / cap) * s.
inline double cap_arg_scale(double inv_cap) { return 2.0 * 1.4426950408889634074 * inv_cap; }

// tanh(u) from x = 2 log2(e) u, as E / (E + 2) with E = e^(2u) - 1 = 2^x - 1, accurate relative to tanh(u)
// itself for small u as for large (~3 ulp): 1 - 2 / (1 + e^(2u)) loses that near 0, where its absolute error
// (~1e-7) times a cap of 50 moved the scores 30x more than PyTorch's fp32 tanh does. E is computed without
// the cancellation of 2^x - 1: x = n + f (f in [-0.5, 0.5]), 2^f - 1 = f q(f) (q of degree 5, a relative-error
// fit, 1.2e-7 in fp32), E = 2^n (f q) + (2^n - 1), exact for n = 0. |x| is clamped at 30, where tanh is 1 in
// fp32, so -inf comes out as -1 (callers restore masked -inf); NaN stays NaN (vmin / vmax return their second
// operand when either is NaN).
//
// On U vectors: x[u] <- tanh(u) for the exponent x = x[u] * xk, each step taken on all U before the next.
// GCC emits the statements in source order, and one vector's chain (~60 cycles: the polynomial, the division)
// written out whole filled the out-of-order window with dependent work: four interleaved took a tanh pass over
// a tile from 9.6 to 8.6 cycles a vector (one thread, AVX2 EPYC).
template <typename F, int U>
FA_CPU_INLINE void tanh_of_exp_n(F* x, float xk) {
  using I = int_of<F>;
  const F magic = splat<F>(12582912.0f);
  F t[U], f[U], q[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) x[u] = vmax(splat<F>(-30.0f), vmin(splat<F>(30.0f), x[u] * xk));  // NaN stays
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) t[u] = x[u] + magic;
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) f[u] = x[u] - (t[u] - magic);
  horner_n<F, U>(q, f, {1.5403502038680017e-4f, 1.3390736421570182e-3f, 9.618237614631653e-3f,
                        5.550357326865196e-2f, 2.4022649228572845e-1f, 6.931471824645996e-1f});
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    const F pw = (F)(((I)t[u] << 23) + splat_i<F>(0x3f800000));  // 2^n
    x[u] = pw * (f[u] * q[u]) + (pw - 1.0f);                     // E
  }
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) x[u] = x[u] / (x[u] + 2.0f);
}
// One vector: tanh(u) of x * xk.
template <typename F>
FA_CPU_INLINE F tanh_of_exp(F x, float xk) {
  tanh_of_exp_n<F, 1>(&x, xk);
  return x;
}

// The capped score from th = tanh(s / cap): cap_mul * th, less the ALiBi bias when kAlibi; g, when non-null,
// gets d(capped)/ds = 1 - th^2.
template <typename F, bool kAlibi>
FA_CPU_INLINE F capped_of_tanh(F th, float cap_mul, float a, float dstart, float step, F* g) {
  if (g) *g = splat<F>(1.0f) - th * th;
  F y = cap_mul * th;
  if constexpr (kAlibi) y -= a * alibi_dist<F>(dstart, step);
  return y;
}

// The modifiers with the choices fixed at compile time (kCap: a softcap, kAlibi: an ALiBi bias, kMask: the
// input may hold -inf, which must stay -inf), so the per-vector loops carry no branches. On U consecutive
// vectors y[u] of a line in place (vector u starts at distance dstart + u W step; the tanh's chains
// interleaved, tanh_of_exp_n); g, when non-null, gets U vectors of d(capped)/ds.
template <typename F, int U, bool kCap, bool kAlibi, bool kMask>
FA_CPU_INLINE void score_mod_n(F* y, float xk, float cap_mul, float a, float dstart, float step, F* g) {
  constexpr int W = width<F>;
  if constexpr (!kCap) {  // -inf minus a finite bias stays -inf, no select needed
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      if (g) g[u] = splat<F>(1.0f);
      if constexpr (kAlibi) y[u] -= a * alibi_dist<F>(dstart + step * static_cast<float>(u * W), step);
    }
  } else {
    const float ninf = -std::numeric_limits<float>::infinity();
    int_of<F> masked[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u)
      if constexpr (kMask) masked[u] = y[u] == splat<F>(ninf);
    tanh_of_exp_n<F, U>(y, xk);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      y[u] = capped_of_tanh<F, kAlibi>(y[u], cap_mul, a, dstart + step * static_cast<float>(u * W), step,
                                       g ? g + u : nullptr);
      if constexpr (kMask) y[u] = masked[u] ? splat<F>(ninf) : y[u];
    }
  }
}
// One vector.
template <typename F, bool kCap, bool kAlibi, bool kMask>
FA_CPU_INLINE F score_mod_k(F y, float xk, float cap_mul, float a, float dstart, float step, F* g) {
  score_mod_n<F, 1, kCap, kAlibi, kMask>(&y, xk, cap_mul, a, dstart, step, g);
  return y;
}

// row[c] <- tanh(row[c] / cap) (xk = cap_arg_scale(1 / cap)) for c < n, four vectors at a time. No -inf
// in the row (its tanh comes out as -1).
template <typename F>
FA_CPU_INLINE void tanh_row(float* row, int64_t n, float xk) {
  constexpr int W = width<F>;
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) {
    F x[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) x[u] = load<F>(row + c + u * W);
    tanh_of_exp_n<F, 4>(x, xk);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) store(row + c + u * W, x[u]);
  }
  for (; c + W <= n; c += W) store(row + c, tanh_of_exp(load<F>(row + c), xk));
  if (c < n) store_part(row + c, tanh_of_exp(load_part<F>(row + c, n - c, 0.0f), xk), n - c);
}
}  // namespace vec

// One line of a tile through vec::score_mod_k (the backward's separate pass; the forward fuses the same
// arithmetic into its softmax step).
template <typename F, bool kCap, bool kAlibi, bool kFull>
FA_CPU_INLINE void mod_row_vec(float* x, int64_t n, float inv_cap, float cap_mul, float a, float dstart, float step,
                               float* dmod) {
  F g;
  const F y = vec::score_mod_k<F, kCap, kAlibi, true>(vec::load_n<F, kFull>(x, n, 0.0f),
                                                       static_cast<float>(vec::cap_arg_scale(inv_cap)), cap_mul, a,
                                                       dstart, step, dmod ? &g : nullptr);
  vec::store_n<F, kFull>(x, y, n);
  if (dmod) vec::store_n<F, kFull>(dmod, g, n);
}
template <typename F, bool kCap, bool kAlibi>
FA_CPU_INLINE void mod_row_k(float* x, int64_t n, float inv_cap, float cap_mul, float a, float d0, float step,
                             float* dmod) {
  constexpr int W = vec::width<F>;
  const int64_t nv = n - n % W;
  for (int64_t c = 0; c < nv; c += W)
    mod_row_vec<F, kCap, kAlibi, true>(x + c, W, inv_cap, cap_mul, a, d0 + step * static_cast<float>(c), step,
                                       dmod ? dmod + c : nullptr);
  if (nv < n)
    mod_row_vec<F, kCap, kAlibi, false>(x + nv, n - nv, inv_cap, cap_mul, a, d0 + step * static_cast<float>(nv), step,
                                        dmod ? dmod + nv : nullptr);
}
template <typename F>
FA_CPU_INLINE void mod_row_f32_body(float* x, int64_t n, float inv_cap, float cap_mul, float a, float d0,
                                    float step, float* dmod) {
  if (inv_cap > 0.0f) {
    if (a != 0.0f)
      mod_row_k<F, true, true>(x, n, inv_cap, cap_mul, a, d0, step, dmod);
    else
      mod_row_k<F, true, false>(x, n, inv_cap, cap_mul, a, d0, step, dmod);
  } else {
    if (a != 0.0f)
      mod_row_k<F, false, true>(x, n, inv_cap, cap_mul, a, d0, step, dmod);
    else
      mod_row_k<F, false, false>(x, n, inv_cap, cap_mul, a, d0, step, dmod);
  }
}
FA_CPU_BY_WIDTH(void, mod_row_f32,
                (float* x, int64_t n, float inv_cap, float cap_mul, float a, float d0, float step, float* dmod),
                (x, n, inv_cap, cap_mul, a, d0, step, dmod))

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
// = true, the backward's layout). fp32 through vec::tanh_of_exp, fp64 through std::tanh.
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
// each row applies vec::score_mod_k in registers and stores the result before the second pass reads it,
// instead of a separate pass over the tile: one read and one write of the tile less. (Pre-scaling K^T / Q^T to
// the tanh's exponent would save score_mod_k's multiply, but the forward's K^T and the backward's Q^T then
// round differently: the backward's recomputed P missed the forward's lse by enough to fail the accuracy rule
// on dV at a cap of 50. Pre-scaled by scale alone, as now, they agree.)
//
// A softcap without ALiBi bounds every score to [-cap_mul, cap_mul] (base 2). When 2 cap_mul <= 125 (cap <=
// 43.3) the bound itself serves as every row's running max (m_fixed): 2^(y - cap_mul) lies in [2^-125, 1],
// never above 1 (as with the true max) and never below the normal range, so the result is the same softmax,
// and the forward skips the max scan, never rescales its accumulator (alpha = 1 after the first tile) and
// calls no exp2 for alpha. A larger cap, or ALiBi (its bias is unbounded below), takes the running max.
struct RowMod {
  float xk = 0.0f, cap_mul = 0.0f, a = 0.0f;  // xk = vec::cap_arg_scale(1 / cap) > 0: a softcap
  float d0 = 0.0f;      // distance i + offset - j at row 0, column 0; +1 per row, -1 per column
  bool masked = true;   // the tile may hold masked (-inf) scores
  float m_fixed = -std::numeric_limits<float>::infinity();  // finite: every row's max (above)
  // The tile's modifiers for a tile at query row q0, key k0 (base 2, as score_mod_tile).
  static RowMod of(const ScoreMod& mod, int64_t q0, int64_t k0, bool masked) {
    constexpr double kL2e = 1.4426950408889634074;
    RowMod r{mod.cap > 0 ? static_cast<float>(vec::cap_arg_scale(mod.inv_cap)) : 0.0f,
             static_cast<float>(kL2e * mod.cap), static_cast<float>(kL2e * mod.slope),
             static_cast<float>(q0 + mod.offset - k0), masked};
    if (mod.cap > 0 && r.a == 0.0f && 2.0f * r.cap_mul <= 125.0f) r.m_fixed = r.cap_mul;
    return r;
  }
  // Which instance of the modifier loops runs: 8 fixed max | 4 softcap | 2 ALiBi | 1 masked.
  int kind() const {
    return (m_fixed > -std::numeric_limits<float>::infinity() ? 8 : 0) | (xk > 0.0f ? 4 : 0) | (a != 0.0f ? 2 : 0) |
           (masked ? 1 : 0);
  }
};

// The first pass over a row with modifiers: y = mod(s) stored back, returns the running max vector (kMax;
// else -inf). Several vectors per step: the softcap's chain (expm1, division) is long, and with four
// independent ones interleaved (vec::tanh_of_exp_n) the pipes stay busy.
template <typename F, bool kCap, bool kAlibi, bool kMask, bool kMax = true>
FA_CPU_INLINE F mod_max_row(float* row, int64_t cols, const RowMod& md, float dr) {
  constexpr int W = vec::width<F>;
  constexpr int U = kCap ? 4 : 2;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t cv = cols - cols % W;
  F vm0 = vec::splat<F>(kNegInf), vm1 = vm0;
  int64_t c = 0;
  for (; c + U * W <= cv; c += U * W) {
    F y[U];
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) y[u] = vec::load<F>(row + c + u * W);
    vec::score_mod_n<F, U, kCap, kAlibi, kMask>(y, md.xk, md.cap_mul, md.a, dr - static_cast<float>(c), -1.0f,
                                                nullptr);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      vec::store(row + c + u * W, y[u]);
      if constexpr (kMax) {
        if (u % 2 == 0)
          vm0 = vec::vmax(vm0, y[u]);
        else
          vm1 = vec::vmax(vm1, y[u]);
      }
    }
  }
  for (; c < cv; c += W) {
    const F y = vec::score_mod_k<F, kCap, kAlibi, kMask>(vec::load<F>(row + c), md.xk, md.cap_mul, md.a,
                                                         dr - static_cast<float>(c), -1.0f, nullptr);
    vec::store(row + c, y);
    if constexpr (kMax) vm0 = vec::vmax(vm0, y);
  }
  if (cv < cols) {  // the missing lanes read as -inf and must stay -inf: kMask
    const F y = vec::score_mod_k<F, kCap, kAlibi, true>(vec::load_part<F>(row + cv, cols - cv, kNegInf), md.xk,
                                                        md.cap_mul, md.a, dr - static_cast<float>(cv), -1.0f, nullptr);
    vec::store_part(row + cv, y, cols - cv);
    if constexpr (kMax) vm0 = vec::vmax(vm0, y);
  }
  return vec::vmax(vm0, vm1);
}

template <typename F>
FA_CPU_INLINE void softmax_step_f32_body(float* s, int64_t rows, int64_t cols, int64_t ld, float* m, float* l,
                                         float* alpha, const RowMod* mod) {
  constexpr int W = vec::width<F>;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t cv = cols - cols % W;
  // Per block of W rows: the exponent of alpha (m_old - m_use, 0 where the max did not move) and the tile's
  // row sums; alpha and l are then updated for the block with one vector exp2 (a libm exp2f per row took 2-3%
  // of a forward with ALiBi, whose row maxima move on most tiles).
  float dlt[W], tsum[W];
  for (int64_t r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    F vm = vec::splat<F>(kNegInf);
    if (mod) {
      const RowMod md = *mod;  // a local copy: stores to the row cannot alias it, so nothing is reloaded
      const float dr = md.d0 + static_cast<float>(r);
      switch (md.kind()) {
        case 13: mod_max_row<F, true, false, true, false>(row, cols, md, dr); vm = vec::splat<F>(md.m_fixed); break;
        case 12: mod_max_row<F, true, false, false, false>(row, cols, md, dr); vm = vec::splat<F>(md.m_fixed); break;
        case 7: vm = mod_max_row<F, true, true, true>(row, cols, md, dr); break;
        case 6: vm = mod_max_row<F, true, true, false>(row, cols, md, dr); break;
        case 5: vm = mod_max_row<F, true, false, true>(row, cols, md, dr); break;
        case 4: vm = mod_max_row<F, true, false, false>(row, cols, md, dr); break;
        case 3: case 2: vm = mod_max_row<F, false, true, false>(row, cols, md, dr); break;
        default: vm = mod_max_row<F, false, false, false>(row, cols, md, dr); break;
      }
    } else {
      for (int64_t c = 0; c < cv; c += W) vm = vec::vmax(vm, vec::load<F>(row + c));
      if (cv < cols) vm = vec::vmax(vm, vec::load_part<F>(row + cv, cols - cv, kNegInf));
    }
    const float tile_max = vec::hmax(vm);
    const float m_old = m[r];
    const float m_new = tile_max > m_old ? tile_max : m_old;
    const float m_use = m_new == kNegInf ? 0.0f : m_new;
    const F vsub = vec::splat<F>(m_use);
    F vs = vec::splat<F>(0.0f);
    for (int64_t c = 0; c < cv; c += W) {
      const F e = vec::exp2_nonpos(vec::load<F>(row + c) - vsub);
      vec::store(row + c, e);
      vs += e;
    }
    if (cv < cols) {
      const F e = vec::exp2_nonpos(vec::load_part<F>(row + cv, cols - cv, kNegInf) - vsub);
      vec::store_part(row + cv, e, cols - cv);
      vs += e;
    }
    const int64_t i = r % W;
    dlt[i] = m_old == m_new ? 0.0f : m_old - m_use;  // <= 0 (NaN stays NaN); 2^0 = 1 exactly
    tsum[i] = vec::hsum(vs);
    m[r] = m_new;
    if (i == W - 1 || r == rows - 1) {
      const int64_t r0 = r - i, n = i + 1;
      const F a = vec::exp2_nonpos(vec::load_part<F>(dlt, n, 0.0f));
      vec::store_part(alpha + r0, a, n);
      vec::store_part(l + r0, vec::load_part<F>(l + r0, n, 0.0f) * a + vec::load_part<F>(tsum, n, 0.0f), n);
    }
  }
}
FA_CPU_BY_WIDTH(void, softmax_step_f32,
                (float* s, int64_t rows, int64_t cols, int64_t ld, float* m, float* l, float* alpha,
                 const RowMod* mod),
                (s, rows, cols, ld, m, l, alpha, mod))

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

// With modifiers (mod non-null, fp32): s holds the raw scores and each one goes through vec::score_mod_k in
// registers first, and dS picks up the cap's chain-rule factor 1 - tanh^2 there too, instead of a separate
// modifier pass that stored the tile and a 1 - tanh^2 tile and a third pass multiplying it in. Distances for
// ALiBi on this transposed tile: mod->d0 at (0, 0), -1 per row (key), +1 per column (query).
// kTh: s holds th = tanh(s / cap) already (probs_dsoft_f32_body's tanh pass), not the raw score.
template <typename F, bool kCap, bool kAlibi, bool kMask, bool kFull, bool kTh>
FA_CPU_INLINE void probs_dsoft_vec(float* srow, float* drow, int64_t n, const float* lse_adj, const float* delta,
                                   float scale, const RowMod& md, float dstart) {
  F y = vec::load_n<F, kFull>(srow, n, 0.0f);
  F g;
  if constexpr (kTh)
    y = vec::capped_of_tanh<F, kAlibi>(y, md.cap_mul, md.a, dstart, 1.0f, &g);
  else if constexpr (kCap || kAlibi)
    y = vec::score_mod_k<F, kCap, kAlibi, kMask>(y, md.xk, md.cap_mul, md.a, dstart, 1.0f, kCap ? &g : nullptr);
  const F pr = vec::exp2_nonpos(y - vec::load_n<F, kFull>(lse_adj, n, 0.0f));
  F ds = (pr * scale) * (vec::load_n<F, kFull>(drow, n, 0.0f) - vec::load_n<F, kFull>(delta, n, 0.0f));
  if constexpr (kCap) ds *= g;
  vec::store_n<F, kFull>(srow, pr, n);
  vec::store_n<F, kFull>(drow, ds, n);
}
template <typename F, bool kCap, bool kAlibi, bool kMask, bool kTh = false>
FA_CPU_INLINE void probs_dsoft_row(float* srow, float* drow, int64_t cols, const float* lse_adj, const float* delta,
                                   float scale, const RowMod& md, float dline) {
  constexpr int W = vec::width<F>;
  const int64_t cv = cols - cols % W;
  for (int64_t c = 0; c < cv; c += W)
    probs_dsoft_vec<F, kCap, kAlibi, kMask, true, kTh>(srow + c, drow + c, W, lse_adj + c, delta + c, scale, md,
                                                       dline + static_cast<float>(c));
  if (cv < cols)
    probs_dsoft_vec<F, kCap, kAlibi, kMask, false, kTh>(srow + cv, drow + cv, cols - cv, lse_adj + cv, delta + cv,
                                                        scale, md, dline + static_cast<float>(cv));
}
// With a softcap on a tile without masked scores, each row takes two passes: the tanh (vec::tanh_row, four
// independent chains at a time) and then P and dS from it. Done in one pass, each vector's chain ran from the
// raw score through the tanh, exp2 and dS (~90 cycles) and the pass was latency-bound: 32 cycles a vector
// against 10.6 for the plain pass, two passes 21.5 (64 x 64 tile, one thread, AVX2 EPYC); softcap over plain
// forward+backward, B1 H8 S2048 D64 causal: +12-14% -> +7-8%. The results are the same bit for bit. Tiles
// with masked scores (the diagonal ones) keep the single pass, which keeps -inf out of the tanh.
template <typename F>
FA_CPU_INLINE void probs_dsoft_f32_body(float* s, float* dp, int64_t rows, int64_t cols, int64_t ld,
                                        const float* lse_adj, const float* delta, float scale, const RowMod* mod) {
  const RowMod md = mod ? *mod : RowMod{};
  const int kind = mod ? md.kind() & 7 : 0;  // the fixed max (8) is the forward's
  for (int64_t r = 0; r < rows; ++r) {
    float* srow = s + r * ld;
    float* drow = dp + r * ld;
    const float dl = md.d0 - static_cast<float>(r);
    switch (kind) {
      case 7: probs_dsoft_row<F, true, true, true>(srow, drow, cols, lse_adj, delta, scale, md, dl); break;
      case 6:
        vec::tanh_row<F>(srow, cols, md.xk);
        probs_dsoft_row<F, true, true, false, true>(srow, drow, cols, lse_adj, delta, scale, md, dl);
        break;
      case 5: probs_dsoft_row<F, true, false, true>(srow, drow, cols, lse_adj, delta, scale, md, dl); break;
      case 4:
        vec::tanh_row<F>(srow, cols, md.xk);
        probs_dsoft_row<F, true, false, false, true>(srow, drow, cols, lse_adj, delta, scale, md, dl);
        break;
      case 3: case 2: probs_dsoft_row<F, false, true, false>(srow, drow, cols, lse_adj, delta, scale, md, dl); break;
      default: probs_dsoft_row<F, false, false, false>(srow, drow, cols, lse_adj, delta, scale, md, dl); break;
    }
  }
}
FA_CPU_BY_WIDTH(void, probs_dsoft_f32,
                (float* s, float* dp, int64_t rows, int64_t cols, int64_t ld, const float* lse_adj,
                 const float* delta, float scale, const RowMod* mod),
                (s, dp, rows, cols, ld, lse_adj, delta, scale, mod))

inline void probs_dsoft(float* s, float* dp, int64_t rows, int64_t cols, int64_t ld, const float* lse_adj,
                        const float* delta, float scale, const RowMod* mod = nullptr) {
  probs_dsoft_f32(s, dp, rows, cols, ld, lse_adj, delta, scale, mod);
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
// fp32 transposes and row dots for the pre/post passes. The scalar 16x16-block transpose this replaced cost ~3%
// of the backward (perf, one thread, B1 H8 S2048 D64: Q, dO, K in and dQ out, 4M elements per call); here a
// full W x W block (W = the vector width) is transposed in registers by log2(W) butterfly stages of
// two-source shuffles. (At 16 lanes on AVX2 the same code went partly through the stack: 3.9% of the
// forward for 1M elements against 8.6% for the softmax step's 33M scores.)

namespace vec {
// Stage with stride s on rows a (bit s clear) and b = a + s: elements whose column bit s differs from the
// row bit s swap places, so after s = 1, 2, ..., W / 2 element (r, c) sits at (c, r). Masks: lane i of x is
// a[i] where bit s of i is clear, else b[i - s]; lane i of y is a[i + s] where it is clear, else b[i].
template <typename F>
FA_CPU_INLINE void bfly(F& a, F& b, int s) {
  using I = int_of<F>;
  F x, y;
  if constexpr (width<F> == 16) {
    switch (s) {
      case 1:
        x = __builtin_shuffle(a, b, I{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30});
        y = __builtin_shuffle(a, b, I{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
        break;
      case 2:
        x = __builtin_shuffle(a, b, I{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29});
        y = __builtin_shuffle(a, b, I{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
        break;
      case 4:
        x = __builtin_shuffle(a, b, I{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27});
        y = __builtin_shuffle(a, b, I{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
        break;
      default:
        x = __builtin_shuffle(a, b, I{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23});
        y = __builtin_shuffle(a, b, I{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
        break;
    }
  } else if constexpr (width<F> == 8) {
    switch (s) {
      case 1:
        x = __builtin_shuffle(a, b, I{0, 8, 2, 10, 4, 12, 6, 14});
        y = __builtin_shuffle(a, b, I{1, 9, 3, 11, 5, 13, 7, 15});
        break;
      case 2:
        x = __builtin_shuffle(a, b, I{0, 1, 8, 9, 4, 5, 12, 13});
        y = __builtin_shuffle(a, b, I{2, 3, 10, 11, 6, 7, 14, 15});
        break;
      default:
        x = __builtin_shuffle(a, b, I{0, 1, 2, 3, 8, 9, 10, 11});
        y = __builtin_shuffle(a, b, I{4, 5, 6, 7, 12, 13, 14, 15});
        break;
    }
  } else {
    if (s == 1) {
      x = __builtin_shuffle(a, b, I{0, 4, 2, 6});
      y = __builtin_shuffle(a, b, I{1, 5, 3, 7});
    } else {
      x = __builtin_shuffle(a, b, I{0, 1, 4, 5});
      y = __builtin_shuffle(a, b, I{2, 3, 6, 7});
    }
  }
  a = x;
  b = y;
}
}  // namespace vec

template <typename F>
FA_CPU_INLINE void transpose_scaled_f32_body(const float* src, int64_t ld_src, int64_t rows, int64_t cols,
                                             float* dst, int64_t ld_dst, float scale, bool accumulate) {
  constexpr int kB = vec::width<F>;
  const int64_t rv = rows - rows % kB, cv = cols - cols % kB;
  for (int64_t r0 = 0; r0 < rv; r0 += kB)
    for (int64_t c0 = 0; c0 < cv; c0 += kB) {
      F t[kB];
#pragma GCC unroll 16
      for (int i = 0; i < kB; ++i) t[i] = vec::load<F>(src + (r0 + i) * ld_src + c0) * scale;
#pragma GCC unroll 4
      for (int s = 1; s < kB; s *= 2)
#pragma GCC unroll 16
        for (int i = 0; i + s < kB; ++i)  // (i + s < kB holds wherever bit s of i is clear)
          if (!(i & s)) vec::bfly(t[i], t[i + s], s);
#pragma GCC unroll 16
      for (int i = 0; i < kB; ++i) {
        float* out = dst + (c0 + i) * ld_dst + r0;
        vec::store(out, accumulate ? vec::load<F>(out) + t[i] : t[i]);
      }
    }
  // Edges (rows or cols not a multiple of the width): element by element.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < rv ? cv : 0; c < cols; ++c) {
      float& out = dst[c * ld_dst + r];
      out = accumulate ? out + scale * src[r * ld_src + c] : scale * src[r * ld_src + c];
    }
}
FA_CPU_BY_WIDTH(void, transpose_scaled_f32,
                (const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst,
                 float scale, bool accumulate),
                (src, ld_src, rows, cols, dst, ld_dst, scale, accumulate))

inline void transpose_scaled(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst,
                             int64_t ld_dst, float scale, bool accumulate = false) {
  transpose_scaled_f32(src, ld_src, rows, cols, dst, ld_dst, scale, accumulate);
}

// out[i] = sum_c a[i][c] * b[i][c] for n rows of length d (strides lda, ldb): the backward's delta.
// Partial sums per lane; the scalar loop this replaces was one serial add chain per row.
template <typename F>
FA_CPU_INLINE void row_dots_f32_body(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n,
                                     int64_t d, float* out) {
  constexpr int W = vec::width<F>;
  const int64_t dv = d - d % W;
  for (int64_t i = 0; i < n; ++i) {
    const float* ai = a + i * lda;
    const float* bi = b + i * ldb;
    F acc = vec::splat<F>(0.0f);
    for (int64_t c = 0; c < dv; c += W) acc += vec::load<F>(ai + c) * vec::load<F>(bi + c);
    float sum = vec::hsum(acc);
    for (int64_t c = dv; c < d; ++c) sum += ai[c] * bi[c];
    out[i] = sum;
  }
}
FA_CPU_BY_WIDTH(void, row_dots_f32,
                (const float* a, int64_t lda, const float* b, int64_t ldb, int64_t n, int64_t d, float* out),
                (a, lda, b, ldb, n, d, out))

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
