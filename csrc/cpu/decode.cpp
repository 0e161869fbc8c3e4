// CPU KV-cache attention (flash_kvcache's forward): q (B, Hq, Sq, D) against a contiguous or paged cache.
//
// Decoding reads every cached key and value once per call and does little arithmetic on each (4 query
// heads x 1 row against a D = 128 key is 512 multiply-adds per 512 bytes of fp32 K), so the kernel is built
// to stream K/V at memory speed:
//   - one task per (batch, kv head, block of query positions, split of the key range): the query rows of the
//     whole GQA group (Hq / Hk heads x the block's positions) are processed together, so each K/V byte is
//     read from memory once per group, not once per query head;
//   - K and V are read in their own dtype and converted in registers (fp16 / bf16 are never upcast as a
//     whole), through per-key row pointers that a paged cache fills a whole page at a time;
//   - per block of kBlockK keys: S = Q K^T with register-blocked dot products (rows x keys accumulators
//     across D, reduced by a shuffle tree), score modifiers and masking from mask.h, one online-softmax step
//     in base 2 (fp32; fp64 for fp64), O = alpha O + P V register-blocked over rows x columns; on x86-64
//     CPUs with AVX2 or AVX-512, blocks of 4 query rows (a GQA group of 4) run intrinsics tiles (avx2:: and
//     avx512:: below, chosen by pick_tiles);
//   - the next block's rows are prefetched whole, in address order, paced evenly over both products
//     (dv::RowPacer), so that memory is read while the products run;
//   - the splits of a key range keep (unnormalised O, running max, running sum) in a workspace and are merged
//     by their lse in split order afterwards, so the result does not depend on which thread ran what.
// num_splits = 0 picks the split count from the thread count and the key lengths (enough tasks for every
// thread when B * Hk is small, e.g. B = 1 with a long cache); n >= 1 forces n.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../kernels.h"
#include "../mask.h"
#include "tile_math.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__)
#include <immintrin.h>
#endif


namespace fused_attn {
namespace {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.6931471805599453094;

// Keys per block: the K and V rows of one block (64 x D, 32 KB each in fp32 at D = 128) stay in L2 between
// the score and the output product. 128 measured within the noise of 64 with the paced prefetch (2 threads,
// B4 Hk8 S32k from DRAM, 3 interleaved runs, fp32 and bf16).
constexpr int64_t kBlockK = 64;
// Tasks over several kv heads (paged pools): bytes of K and V per key block, all heads together. With the next
// block being prefetched, two blocks stay in L2 (512 KB a core on the dev box). Keys per block, measured
// (one thread, CPU time, B4 Hk8 S16k, pages of 64, % of a one-thread sum's bandwidth, two runs each): fp32
// 16 / 32 / 64 keys 43-51 / 49-49 / 29-38%, bf16 38-45 / 44-47 / 30-40%.
constexpr int64_t kBlockBytes = int64_t(128) << 10;
// Key blocks ahead whose rows are prefetched. Two ahead measured the same as one (one thread, B4 Hk8 S16k,
// fp32 / bf16, contiguous and paged: within 2 points, the noise); so was the hint (T0, T1 or NTA). Both again
// with the paced prefetch (2 threads, B4 Hk8 S32k from DRAM, 3 interleaved runs): within the noise.
constexpr int64_t kPrefetchBlocks = 1;
// The prefetch hint: prefetcht1 (__builtin_prefetch locality 2). The hint made no difference on the AMD Zen 3
// box above, but on an Intel Xeon with AVX-512 (2 vCPUs, 48 KB L1d, 2 MB L2 a core) the non-temporal hint
// (prefetchnta) halved the speed: a block ahead is more than L1 holds, and NTA lines evicted from L1 are not
// kept in L2, so they were fetched from memory twice. Measured there (one thread, B4 Hq32 Hk8 D128 S16k, median
// of 40 calls): fp32 4.5 / 9.9 / 11.1 GB/s with NTA / T0 / T1, bf16 4.2 / 8.5 / 9.1; a sum over 1 GiB read
// 13.3 GB/s.
constexpr int kPrefetchLocality = 2;
// Query rows (heads of the group x positions) per task: enough to reuse each K/V block from cache when Sq
// is large (chunked prefill), small enough to keep the score tile and the output rows in L1/L2.
constexpr int64_t kTaskRows = 64;
// A split of the key range is never shorter than this many keys (its fixed cost: Q conversion, partial
// write, merge).
constexpr int64_t kMinSplitKeys = 512;
// Workspace of the split partials processed at once (bytes); forced large split counts run in waves.
constexpr int64_t kWorkspaceBudget = int64_t(64) << 20;

// ---------------------------------------------------------------------------------------------------
// 32-byte vectors for the score and output products: 8 floats or 4 doubles, one ymm register on AVX2 /
// AVX-512 machines (target_clones), two xmm on baseline x86-64. The softmax step is tile_math.h's, at each
// ISA's own width.
namespace dv {
typedef float f8 __attribute__((vector_size(32)));
typedef double d4 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));

template <typename C>
struct Vec;
template <>
struct Vec<float> {
  using T = f8;
  using U = u8;
  static constexpr int W = 8;
};
template <>
struct Vec<double> {
  typedef uint64_t u4 __attribute__((vector_size(32)));
  using T = d4;
  using U = u4;
  static constexpr int W = 4;
};

// An all-zero integer vector the compiler cannot see through. GCC folds a vector load into every FMA that
// uses it (vfmadd231ps mem, ...), also when one loaded operand feeds several FMAs, so the score loop loaded
// each query pair once per key (18 loads a step for 16 FMAs at 4 rows x 2 keys) and the output loop each P
// broadcast once per column vector: more loads than the two 32-byte load ports take a cycle. v ^ opaque_zero
// is computed once into a register (one vpxor, which can take the load) and then reused. Measured on the
// 2-core dev box (one thread, CPU time, K/V in L2, 3 runs alternating with the previous build, a shared and
// noisy machine): bf16 +14 to +36%, fp32 from -12% to +43%; from memory within the noise.
template <typename C>
FA_CPU_INLINE typename Vec<C>::U opaque_zero() {
  using U = typename Vec<C>::U;
  typename std::remove_reference<decltype(U{}[0])>::type z = 0;
  asm("" : "+r"(z));
  U v{};
  for (int i = 0; i < Vec<C>::W; ++i) v[i] = z;
  return v;
}
template <typename C>
FA_CPU_INLINE typename Vec<C>::T in_register(typename Vec<C>::T x, typename Vec<C>::U zero) {
  using T = typename Vec<C>::T;
  using U = typename Vec<C>::U;
  return (T)((U)x ^ zero);
}

FA_CPU_INLINE f8 load(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FA_CPU_INLINE d4 load(const double* p) {
  d4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FA_CPU_INLINE void store(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
FA_CPU_INLINE void store(double* p, d4 v) { std::memcpy(p, &v, sizeof(v)); }
// Broadcast of *p: the scalar into lane 0, then a shuffle with an all-zero mask (vmovss + vbroadcastss). A
// vector built from a non-constant scalar ({x, x, ...}, x - VT{}) is lowered in these helpers, which are
// compiled for baseline x86-64 and inlined into the clones, as a chain of vinsertps: 25% of the output loop.
FA_CPU_INLINE f8 splat(const float* p) {
  f8 v{};
  std::memcpy(&v, p, sizeof(float));
  return __builtin_shuffle(v, i8{});
}
FA_CPU_INLINE d4 splat(const double* p) {
  typedef int64_t l4 __attribute__((vector_size(32)));
  d4 v{};
  std::memcpy(&v, p, sizeof(double));
  return __builtin_shuffle(v, l4{});
}
FA_CPU_INLINE f8 splat(float x) { return splat(&x); }

// A "pair": 2W consecutive elements of the cache's dtype as two vectors of the compute type, converted in
// registers. fp32 / fp64: two plain loads, elements in order. fp16 / bf16: one 32-byte load of 16 elements
// seen as 8 32-bit words; the low halves (even elements) and the high halves (odd elements) become the two
// vectors, so the conversion is one shift or mask per vector (widening 8 halves in order took 5 ops on AVX2).
// The kernels keep Q and the output rows in the same permuted column order (pair_col below); a dot product
// does not care, and the output is put back in order when it is written.
template <typename S>
constexpr bool kSplitPairs = sizeof(S) == 2;

FA_CPU_INLINE void load_pair(const float* p, f8& a, f8& b) {
  a = load(p);
  b = load(p + 8);
}
FA_CPU_INLINE void load_pair(const double* p, d4& a, d4& b) {
  a = load(p);
  b = load(p + 4);
}
// bf16 is the top half of an fp32.
FA_CPU_INLINE void load_pair(const c10::BFloat16* p, f8& a, f8& b) {
  u8 w;
  std::memcpy(&w, p, sizeof(w));
  a = (f8)(w << 16);
  b = (f8)(w & 0xffff0000u);
}
// fp16 (the low 16 bits of x) by integer ops, exact for every input: exponent and mantissa moved into fp32's
// fields and multiplied by 2^112 (the bias difference; this also normalises subnormal halves), inf / NaN
// given fp32's all-ones exponent, sign put back. GCC 12 turns a vector _Float16 -> float conversion into one
// scalar vcvtph2ps per element, and an F16C intrinsic would not compile in the baseline clone.
FA_CPU_INLINE f8 half_bits_to_float(u8 x) {
  const u8 em = (x & 0x7fffu) << 13;
  const u8 sign = (x & 0x8000u) << 16;
  const u8 finite = (u8)((f8)em * 0x1p112f);
  const u8 special = (u8)(em >= (0x7c00u << 13));  // all ones where inf / NaN
  return (f8)((finite & ~special) | ((em | 0x7f800000u) & special) | sign);
}
FA_CPU_INLINE void load_pair(const c10::Half* p, f8& a, f8& b) {
  u8 w;
  std::memcpy(&w, p, sizeof(w));
  a = half_bits_to_float(w);
  b = half_bits_to_float(w >> 16);
}

// Column of position pos in the permuted order of a row of d columns: within each full group of g columns
// of a 16-bit dtype (16 for the 32-byte tiles, 32 for the AVX-512 ones), the first g / 2 positions hold the
// even columns and the rest the odd ones; elsewhere the identity.
template <typename S>
FA_CPU_INLINE int64_t pair_col(int64_t pos, int64_t d, int64_t g) {
  if (!kSplitPairs<S> || pos >= d - d % g) return pos;
  const int64_t base = pos - pos % g, e = pos % g, h = g / 2;
  return base + (e < h ? 2 * e : 2 * (e - h) + 1);
}

// Software prefetch of the bytes [p, p + n): the next key block's rows are requested while the current
// block is computed on. The hardware prefetchers alone left the loads of each block stalling on memory
// (perf, one thread, fp32: ~70% of the score and output loops' samples on the first K / V load of a row).
FA_CPU_INLINE void prefetch(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(c + off, 0, kPrefetchLocality);
}

// Rows to prefetch: n rows of `bytes` bytes each (none when n == 0).
template <typename S>
struct Pre {
  const S* const* rows = nullptr;
  int64_t n = 0, bytes = 0;
};

// Prefetch of whole rows (the next key block's), one 64-byte line at a time in address order within each row
// and row after row, spread evenly over a loop of `steps` iterations that calls step() once each. Issuing a
// block's lines in a burst (a row per key at the start of each product) or column by column across the rows
// (the output product's order) measured slower from memory: the core keeps only a couple of dozen misses in
// flight, so a burst stalls on them, and a strided order gives the hardware's stream prefetcher nothing to
// follow. (One thread, K/V from DRAM, a stand-alone copy of the output product: fp32 76-81 against 122-128
// cycles a key with the per-column prefetch.)
template <typename S>
struct RowPacer {
  const S* const* rows = nullptr;
  int64_t row_bytes = 0, total = 0, steps = 1;
  int64_t row = 0, off = 0, issued = 0, credit = 0;
  RowPacer(Pre<S> pre, int64_t loop_steps)
      : rows(pre.rows), row_bytes(pre.bytes), total(pre.n * ((pre.bytes + 63) / 64)),
        steps(std::max<int64_t>(loop_steps, 1)) {}
  FA_CPU_INLINE void issue() {
    __builtin_prefetch(reinterpret_cast<const char*>(rows[row]) + off, 0, kPrefetchLocality);
    off += 64;
    if (off >= row_bytes) {
      off = 0;
      ++row;
    }
    ++issued;
  }
  FA_CPU_INLINE void step() {
    credit += total;
    while (credit >= steps && issued < total) {
      credit -= steps;
      issue();
    }
  }
  void finish() {
    while (issued < total) issue();
  }
};

// Eight accumulators of 8 lanes -> the vector of their eight sums, in order, by a shuffle tree (halves,
// quarters, pairs): 9 shuffles and 7 additions for what 8 separate horizontal sums do in ~40.
FA_CPU_INLINE f8 reduce8(const f8 (&a)[8]) {
  auto halves = [](f8 x, f8 y) {
    return __builtin_shuffle(x, y, i8{0, 1, 2, 3, 8, 9, 10, 11}) + __builtin_shuffle(x, y, i8{4, 5, 6, 7, 12, 13, 14, 15});
  };
  auto quarters = [](f8 x, f8 y) {
    return __builtin_shuffle(x, y, i8{0, 1, 8, 9, 4, 5, 12, 13}) + __builtin_shuffle(x, y, i8{2, 3, 10, 11, 6, 7, 14, 15});
  };
  auto pairs = [](f8 x, f8 y) {
    return __builtin_shuffle(x, y, i8{0, 8, 2, 10, 4, 12, 6, 14}) + __builtin_shuffle(x, y, i8{1, 9, 3, 11, 5, 13, 7, 15});
  };
  // b_i: lanes 0-3 partial sums of a_i, lanes 4-7 of a_{i+4}
  const f8 b0 = halves(a[0], a[4]), b1 = halves(a[1], a[5]), b2 = halves(a[2], a[6]), b3 = halves(a[3], a[7]);
  // quarters(b0, b2): lane pairs hold a0, a2, a4, a6; quarters(b1, b3): a1, a3, a5, a7
  return pairs(quarters(b0, b2), quarters(b1, b3));
}

}  // namespace dv

// ---------------------------------------------------------------------------------------------------
// Scores: s[r * lds + j] = q_r . k_j for RN query rows and KN keys (Q in the permuted column order), RN x KN
// accumulators across D (index jj * RN + r), at most 8 so that they and the key pairs fit AVX2's 16 registers.
// pacer: the next block's rows, prefetched a share per column step.
template <int RN, int KN, typename S, typename C>
FA_CPU_INLINE void qk_micro(const C* q, int64_t ldq, const S* const* kr, int64_t d, C* s, int64_t lds,
                            dv::RowPacer<S>& pacer) {
  using VT = typename dv::Vec<C>::T;
  constexpr int W = dv::Vec<C>::W;
  static_assert(RN * KN <= 8, "at most 8 accumulators");
  const auto zero = dv::opaque_zero<C>();
  VT acc[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = VT{};
  const int64_t dp = d - d % (2 * W);
  for (int64_t c = 0; c < dp; c += 2 * W) {
    pacer.step();
    // The keys' pairs stay in registers while each query row's pair is loaded once (10 loads per 16 FMAs
    // at RN = 4, KN = 2; the q operands straight from memory made it 18, more than the 2 load ports take).
    VT ka[KN], kb[KN];
#pragma GCC unroll 8
    for (int jj = 0; jj < KN; ++jj) dv::load_pair(kr[jj] + c, ka[jj], kb[jj]);
#pragma GCC unroll 4
    for (int r = 0; r < RN; ++r) {
      const VT qa = dv::in_register<C>(dv::load(q + r * ldq + c), zero);
      const VT qb = dv::in_register<C>(dv::load(q + r * ldq + c + W), zero);
#pragma GCC unroll 8
      for (int jj = 0; jj < KN; ++jj) {
        acc[jj * RN + r] += qa * ka[jj];
        acc[jj * RN + r] += qb * kb[jj];
      }
    }
  }
  C sum[8];
  if constexpr (std::is_same<C, float>::value) {
    dv::store(sum, dv::reduce8(acc));
  } else {
    for (int i = 0; i < RN * KN; ++i) sum[i] = (acc[i][0] + acc[i][1]) + (acc[i][2] + acc[i][3]);
  }
  for (int64_t c = dp; c < d; ++c)  // the last d % 2W columns, in order
    for (int jj = 0; jj < KN; ++jj)
      for (int r = 0; r < RN; ++r) sum[jj * RN + r] += q[r * ldq + c] * static_cast<C>(kr[jj][c]);
#pragma GCC unroll 8
  for (int jj = 0; jj < KN; ++jj)
#pragma GCC unroll 4
    for (int r = 0; r < RN; ++r) s[r * lds + jj] = sum[jj * RN + r];
}

// Rows in blocks of 4 (a smaller block for the last ones), keys in blocks of KN: RN x KN accumulators plus
// 2 KN key vectors and 2 query vectors within 16 registers. pre (n == 0: none) holds the rows of the next
// block, pre.n of them, prefetched whole during the first row block (paced over its column steps).
template <int RN, typename S, typename C>
FA_CPU_INLINE void qk_rows(const C* q, int64_t ldq, const S* const* kr, int64_t kn, int64_t d, C* s, int64_t lds,
                           dv::Pre<S> pre) {
  constexpr int KN = RN == 1 ? 4 : RN == 2 ? 3 : 2;
  constexpr int W = dv::Vec<C>::W;
  const int64_t micros = kn / KN + kn % KN;
  dv::RowPacer<S> pacer(pre, micros * (d / (2 * W)));
  int64_t j = 0;
  for (; j + KN <= kn; j += KN) qk_micro<RN, KN, S, C>(q, ldq, kr + j, d, s + j, lds, pacer);
  for (; j < kn; ++j) qk_micro<RN, 1, S, C>(q, ldq, kr + j, d, s + j, lds, pacer);
  pacer.finish();
}

template <typename S, typename C>
FA_CPU_INLINE void qk_tile(const C* q, int64_t rows, int64_t ldq, const S* const* kr, int64_t kn, int64_t d, C* s,
                           int64_t lds, dv::Pre<S> pre) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4, pre = {})
    qk_rows<4, S, C>(q + r * ldq, ldq, kr, kn, d, s + r * lds, lds, pre);
  switch (rows - r) {
    case 3: qk_rows<3, S, C>(q + r * ldq, ldq, kr, kn, d, s + r * lds, lds, pre); break;
    case 2: qk_rows<2, S, C>(q + r * ldq, ldq, kr, kn, d, s + r * lds, lds, pre); break;
    case 1: qk_rows<1, S, C>(q + r * ldq, ldq, kr, kn, d, s + r * lds, lds, pre); break;
    default: break;
  }
}

constexpr int64_t kPvGroup = 4;

// Output: o_r = alpha_r o_r + sum_j p[r * ldp + j] v_j for RN rows over NP pairs of columns from c0 (the
// permuted order): RN x 2 NP accumulators stay in registers for the whole key block, and each V pair is
// loaded and converted once per row block. pb holds P pre-broadcast, pb[j * RN + r] = p[r][j] in every lane,
// so the loop multiplies by a plain vector load: a broadcast per (row, key, column pair) in the loop was
// 2 uops each (vmovss + vbroadcastss), as many as the FMAs.
template <int RN, int NP, typename S, typename C>
FA_CPU_INLINE void pv_micro(const typename dv::Vec<C>::T* pb, const C* alpha, const S* const* vr, int64_t kn,
                            int64_t c0, C* o, int64_t ldo, dv::RowPacer<S>& pacer) {
  using VT = typename dv::Vec<C>::T;
  constexpr int W = dv::Vec<C>::W;
  const auto zero = dv::opaque_zero<C>();
  VT acc[RN][2 * NP];
#pragma GCC unroll 4
  for (int r = 0; r < RN; ++r) {
    const VT a = dv::splat(alpha + r);
#pragma GCC unroll 8
    for (int cc = 0; cc < 2 * NP; ++cc) acc[r][cc] = a * dv::load(o + r * ldo + c0 + cc * W);
  }
  // Keys in groups of kPvGroup, one prefetch step per group (the pacer's bookkeeping once per 4 keys).
  for (int64_t j0 = 0; j0 < kn; j0 += kPvGroup) {
    pacer.step();
    const int64_t je = std::min(kn, j0 + kPvGroup);
#pragma GCC unroll 4
    for (int64_t j = j0; j < je; ++j) {
      VT x[2 * NP];
#pragma GCC unroll 4
      for (int np = 0; np < NP; ++np) dv::load_pair(vr[j] + c0 + 2 * np * W, x[2 * np], x[2 * np + 1]);
#pragma GCC unroll 4
      for (int r = 0; r < RN; ++r) {
        const VT pj = dv::in_register<C>(pb[j * RN + r], zero);
#pragma GCC unroll 8
        for (int cc = 0; cc < 2 * NP; ++cc) acc[r][cc] += pj * x[cc];
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int cc = 0; cc < 2 * NP; ++cc) dv::store(o + r * ldo + c0 + cc * W, acc[r][cc]);
}

template <int RN, typename S, typename C>
FA_CPU_INLINE void pv_rows(const C* pr, int64_t ldp, const C* alpha, const S* const* vr, int64_t kn, int64_t d,
                           C* o, int64_t ldo, dv::Pre<S> pre) {
  using VT = typename dv::Vec<C>::T;
  constexpr int W = dv::Vec<C>::W;
  constexpr int NP = RN <= 2 ? 2 : 1;
  alignas(32) VT pb[RN * kBlockK];
  for (int64_t j = 0; j < kn; ++j)
#pragma GCC unroll 4
    for (int r = 0; r < RN; ++r) pb[j * RN + r] = dv::splat(pr + r * ldp + j);
  // The next block's rows are prefetched whole, paced over the chunk loops below (one step per key of each).
  const int64_t wide = d / (2 * NP * W), narrow = (d - wide * 2 * NP * W) / (2 * W);
  dv::RowPacer<S> pacer(pre, (wide + narrow) * cdiv(kn, kPvGroup));
  int64_t c = 0;
  for (; c + 2 * NP * W <= d; c += 2 * NP * W) pv_micro<RN, NP, S, C>(pb, alpha, vr, kn, c, o, ldo, pacer);
  for (; c + 2 * W <= d; c += 2 * W) pv_micro<RN, 1, S, C>(pb, alpha, vr, kn, c, o, ldo, pacer);
  pacer.finish();
  for (; c < d; ++c)  // the last d % 2W columns, in order
    for (int r = 0; r < RN; ++r) {
      C a = alpha[r] * o[r * ldo + c];
      for (int64_t j = 0; j < kn; ++j) a += pr[r * ldp + j] * static_cast<C>(vr[j][c]);
      o[r * ldo + c] = a;
    }
}

template <typename S, typename C>
FA_CPU_INLINE void pv_tile(const C* pr, int64_t rows, int64_t ldp, const C* alpha, const S* const* vr, int64_t kn,
                           int64_t d, C* o, int64_t ldo, dv::Pre<S> pre) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4, pre = {})
    pv_rows<4, S, C>(pr + r * ldp, ldp, alpha + r, vr, kn, d, o + r * ldo, ldo, pre);
  switch (rows - r) {
    case 3: pv_rows<3, S, C>(pr + r * ldp, ldp, alpha + r, vr, kn, d, o + r * ldo, ldo, pre); break;
    case 2: pv_rows<2, S, C>(pr + r * ldp, ldp, alpha + r, vr, kn, d, o + r * ldo, ldo, pre); break;
    case 1: pv_rows<1, S, C>(pr + r * ldp, ldp, alpha + r, vr, kn, d, o + r * ldo, ldo, pre); break;
    default: break;
  }
}

// One compiled (and ISA-cloned) pair of tile functions per (cache dtype, compute type); the templates above
// are inlined into each clone.
#define FA_DECODE_TILES(S, C)                                                                                  \
  FA_CPU_CLONES void qk(const C* q, int64_t rows, int64_t ldq, const S* const* kr, int64_t kn, int64_t d, C* s, \
                        int64_t lds, dv::Pre<S> pre) {                                                         \
    qk_tile<S, C>(q, rows, ldq, kr, kn, d, s, lds, pre);                                                       \
  }                                                                                                            \
  FA_CPU_CLONES void pv(const C* pr, int64_t rows, int64_t ldp, const C* alpha, const S* const* vr, int64_t kn, \
                        int64_t d, C* o, int64_t ldo, dv::Pre<S> pre) {                                        \
    pv_tile<S, C>(pr, rows, ldp, alpha, vr, kn, d, o, ldo, pre);                                               \
  }
FA_DECODE_TILES(float, float)
FA_DECODE_TILES(c10::BFloat16, float)
FA_DECODE_TILES(c10::Half, float)
FA_DECODE_TILES(double, double)
#undef FA_DECODE_TILES

// ---------------------------------------------------------------------------------------------------
// AVX2 + FMA tiles for blocks of 4 query rows (a GQA group of 4, or 4 rows of a larger one), fp32 compute,
// d % 16 == 0: the decode shape. Written with intrinsics so that operands can be pinned in registers with an
// empty asm (the generic tiles xor them with an opaque zero, which costs a vector uop and a register each) and
// P is broadcast straight from the score row (vbroadcastss from memory is one load; the generic tiles build a
// pre-broadcast copy of P per block). Used where the CPU kernels run at x86-64-v3 width or wider, for the
// blocks the AVX-512 tiles below do not take (pick_tiles); for other row counts and head dims the generic
// tiles run. FUSED_ATTN_CPU_DECODE_GENERIC=1 forces the generic tiles (for comparison, and so tests cover
// both); FUSED_ATTN_CPU_ISA=v3 makes an AVX-512 CPU run the AVX2 tiles.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__)
#define FA_DECODE_AVX2 1
#define FA_AVX2 __attribute__((target("avx2,fma")))
#define FA_AVX2_INLINE inline __attribute__((always_inline, target("avx2,fma")))
namespace avx2 {

// Keeps x in a register: an FMA can no longer take it as a memory operand, so one load feeds every use.
template <typename T>
FA_AVX2_INLINE void pin(T& x) {
  asm("" : "+x"(x));
}

// 16 elements of the cache's dtype as two fp32 vectors in dv::load_pair's order (fp16 / bf16: even elements,
// then odd ones).
FA_AVX2_INLINE void pair(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}
FA_AVX2_INLINE void pair(const c10::BFloat16* p, __m256& a, __m256& b) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
FA_AVX2_INLINE void pair(const c10::Half* p, __m256& a, __m256& b) {
  dv::f8 x, y;
  dv::load_pair(p, x, y);
  a = reinterpret_cast<__m256>(x);
  b = reinterpret_cast<__m256>(y);
}

// Lanes 0-3: x's low + high half, lanes 4-7: y's.
FA_AVX2_INLINE __m256 halves(__m256 x, __m256 y) {
  return _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
}

// Sums of eight accumulators, in order, as one vector.
FA_AVX2_INLINE __m256 reduce8(const __m256 (&a)[8]) {
  const __m256 b0 = halves(a[0], a[4]), b1 = halves(a[1], a[5]), b2 = halves(a[2], a[6]), b3 = halves(a[3], a[7]);
  return _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
}

// Scores of 4 rows against KN keys (1 or 2): 4 KN accumulators across d. Q's rows are d apart. DC: d as a
// compile-time constant (0: use d), so that the four rows are addressed from one base register.
template <int KN, int DC, typename S>
FA_AVX2_INLINE __m256 qk_sums(const float* q, const S* k0, const S* k1, int64_t d_rt, dv::RowPacer<S>& pacer) {
  const int64_t d = DC ? DC : d_rt, ldq = d;
  const S* kr[2] = {k0, k1};
  __m256 acc[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 16) {
    pacer.step();
    __m256 ka[KN], kb[KN];
#pragma GCC unroll 2
    for (int jj = 0; jj < KN; ++jj) pair(kr[jj] + c, ka[jj], kb[jj]);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m256 qa = _mm256_loadu_ps(q + r * ldq + c);
      pin(qa);
#pragma GCC unroll 2
      for (int jj = 0; jj < KN; ++jj) acc[jj * 4 + r] = _mm256_fmadd_ps(qa, ka[jj], acc[jj * 4 + r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m256 qb = _mm256_loadu_ps(q + r * ldq + c + 8);
      pin(qb);
#pragma GCC unroll 2
      for (int jj = 0; jj < KN; ++jj) acc[jj * 4 + r] = _mm256_fmadd_ps(qb, kb[jj], acc[jj * 4 + r]);
    }
  }
  return reduce8(acc);  // lane jj * 4 + r: row r against key jj
}

// Scores of 4 rows against KN keys (1 or 2), stored one by one.
template <int KN, int DC, typename S>
FA_AVX2_INLINE void qk_micro(const float* q, const S* const* kr, int64_t d_rt, float* s, int64_t lds,
                             dv::RowPacer<S>& pacer) {
  alignas(32) float sum[8];
  _mm256_store_ps(sum, qk_sums<KN, DC, S>(q, kr[0], kr[KN - 1], d_rt, pacer));
#pragma GCC unroll 2
  for (int jj = 0; jj < KN; ++jj)
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) s[r * lds + jj] = sum[jj * 4 + r];
}

// Keys in groups of 8: the pairs (j + i, j + 4 + i), i = 0..3, give four vectors whose 128-bit halves hold the
// 4 rows' scores of one key each; a 4 x 4 transpose within each half turns them into each row's 8 scores in
// key order, stored with one vector store a row (storing the 32 scores one by one took a fifth of qk4's time).
template <int DC, typename S>
FA_AVX2 void qk4(const float* q, const S* const* kr, int64_t kn, int64_t d, float* s, int64_t lds,
                 dv::Pre<S> pre) {
  dv::RowPacer<S> pacer(pre, cdiv(kn, 2) * (d / 16));
  int64_t j = 0;
  for (; j + 8 <= kn; j += 8) {
    __m256 v[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) v[i] = qk_sums<2, DC, S>(q, kr[j + i], kr[j + 4 + i], d, pacer);
    const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    _mm256_storeu_ps(s + j, _mm256_shuffle_ps(t0, t2, 0x44));
    _mm256_storeu_ps(s + lds + j, _mm256_shuffle_ps(t0, t2, 0xee));
    _mm256_storeu_ps(s + 2 * lds + j, _mm256_shuffle_ps(t1, t3, 0x44));
    _mm256_storeu_ps(s + 3 * lds + j, _mm256_shuffle_ps(t1, t3, 0xee));
  }
  for (; j + 2 <= kn; j += 2) qk_micro<2, DC, S>(q, kr + j, d, s + j, lds, pacer);
  if (j < kn) qk_micro<1, DC, S>(q, kr + j, d, s + j, lds, pacer);
  pacer.finish();
}

// o_r = alpha_r o_r + sum_j p[r][j] v_j for 4 rows, 16 columns at a time (8 accumulators across the block).
// The output rows are d apart; DC as in qk4.
template <int DC, typename S>
FA_AVX2 void pv4(const float* pr, int64_t ldp, const float* alpha, const S* const* vr, int64_t kn, int64_t d_rt,
                 float* o, dv::Pre<S> pre) {
  const int64_t d = DC ? DC : d_rt, ldo = d;
  dv::RowPacer<S> pacer(pre, (d / 16) * cdiv(kn, kPvGroup));
  for (int64_t c = 0; c < d; c += 16) {
    __m256 acc[4][2];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m256 a = _mm256_broadcast_ss(alpha + r);
      acc[r][0] = _mm256_mul_ps(a, _mm256_loadu_ps(o + r * ldo + c));
      acc[r][1] = _mm256_mul_ps(a, _mm256_loadu_ps(o + r * ldo + c + 8));
    }
    for (int64_t j0 = 0; j0 < kn; j0 += kPvGroup) {
      pacer.step();
      const int64_t je = std::min(kn, j0 + kPvGroup);
#pragma GCC unroll 4
      for (int64_t j = j0; j < je; ++j) {
        __m256 x0, x1;
        pair(vr[j] + c, x0, x1);
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          const __m256 pj = _mm256_broadcast_ss(pr + r * ldp + j);
          acc[r][0] = _mm256_fmadd_ps(pj, x0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(pj, x1, acc[r][1]);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      _mm256_storeu_ps(o + r * ldo + c, acc[r][0]);
      _mm256_storeu_ps(o + r * ldo + c + 8, acc[r][1]);
    }
  }
  pacer.finish();
}

}  // namespace avx2

// ---------------------------------------------------------------------------------------------------
// AVX-512 tiles for blocks of 4 query rows, fp32 compute, fp32 or bf16 K/V, d % 32 == 0: the AVX2 tiles' plan
// at twice the width, with the 32 registers spent on more accumulators. Scores: 4 rows x 4 keys (16
// accumulators across d), reduced to one vector by a shuffle tree. Output: 4 rows x 64 columns (16
// accumulators), so that each pass over the key block reads 128 bytes of a bf16 row, two whole cache lines,
// and no line is read again by a later pass (the 16-column passes of the AVX2 tiles read each line twice,
// which misses L1 when a paged pool's 2 KB slot stride maps a block's rows onto a few cache sets).
// fp16 / bf16 pairs are 32 elements here (even elements, then odd ones), so Q and the output rows are kept in
// dv::pair_col's order with groups of 32 (kWideGroup) whenever these tiles run.
// Measured against the 32-byte tiles on the AVX-512 Xeon (one thread, Hq32 Hk8 D128 bf16, median of 30 calls,
// cycles at the nominal 2.6 GHz per key and kv head): B1 S2k from L3 114 -> 83 contiguous, 147 -> 125 paged;
// B2 S32k from memory 9.9 -> 10.4 GB/s contiguous, 8.5 -> 9.2 paged (a sum reads 13.3).
// GCC 12 reports "__Y may be used uninitialized" inside its own avx512fintrin.h for these intrinsics (the
// _mm512_undefined_* operands of the shift and shuffle builtins, a false positive): silenced for this section.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
#define FA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define FA_AVX512_INLINE inline __attribute__((always_inline, target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

template <typename T>
FA_AVX512_INLINE void pin(T& x) {
  asm("" : "+v"(x));
}

FA_AVX512_INLINE void pair(const float* p, __m512& a, __m512& b) {
  a = _mm512_loadu_ps(p);
  b = _mm512_loadu_ps(p + 16);
}
FA_AVX512_INLINE void pair(const c10::BFloat16* p, __m512& a, __m512& b) {
  const __m512i w = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Accumulator of query row r against key jj: jj + kRowOff[r], the order in which reduce16 leaves row r's four
// sums in the 128-bit lane r, key jj at element jj.
constexpr int kRowOff[4] = {0, 8, 4, 12};

// Within each 128-bit quarter: x's two pair sums, then y's.
FA_AVX512_INLINE __m512 pair_sums(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The 16 accumulators' sums as one vector: lane 4 q + e holds a[e + kRowOff[q]]. Halves of a_i and a_{i+8}
// added side by side, then 128-bit quarters, then pairs and elements within each quarter: 45 operations
// for 16 sums.
FA_AVX512_INLINE __m512 reduce16(const __m512 (&a)[16]) {
  __m512 b[8], c[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)  // quarters 0-1: a_i's partial sums, 2-3: a_{i+8}'s
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // quarters: a_i, a_{i+8}, a_{i+4}, a_{i+12}
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[i], b[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  return pair_sums(pair_sums(c[0], c[1]), pair_sums(c[2], c[3]));
}

// Scores of 4 rows (Q's rows d apart) against keys j .. j + 3 of kr (k: their row pointers; a short last group
// repeats its last key, and only valid scores are stored). DC as in the AVX2 tiles.
template <int DC, typename S>
FA_AVX512_INLINE void qk_group(const float* q, const S* const (&k)[4], int64_t valid, int64_t d_rt, float* s,
                               int64_t lds, dv::RowPacer<S>& pacer) {
  const int64_t d = DC ? DC : d_rt, ldq = d;
  __m512 acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 32) {
    pacer.step();
    __m512 ka[4], kb[4];
#pragma GCC unroll 4
    for (int jj = 0; jj < 4; ++jj) pair(k[jj] + c, ka[jj], kb[jj]);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m512 qa = _mm512_loadu_ps(q + r * ldq + c);
      pin(qa);
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) acc[jj + kRowOff[r]] = _mm512_fmadd_ps(qa, ka[jj], acc[jj + kRowOff[r]]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m512 qb = _mm512_loadu_ps(q + r * ldq + c + 16);
      pin(qb);
#pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) acc[jj + kRowOff[r]] = _mm512_fmadd_ps(qb, kb[jj], acc[jj + kRowOff[r]]);
    }
  }
  const __m512 sum = reduce16(acc);
  if (valid == 4) {
    _mm_storeu_ps(s, _mm512_extractf32x4_ps(sum, 0));
    _mm_storeu_ps(s + lds, _mm512_extractf32x4_ps(sum, 1));
    _mm_storeu_ps(s + 2 * lds, _mm512_extractf32x4_ps(sum, 2));
    _mm_storeu_ps(s + 3 * lds, _mm512_extractf32x4_ps(sum, 3));
  } else {
    const __mmask8 m = static_cast<__mmask8>((1u << valid) - 1);
    _mm_mask_storeu_ps(s, m, _mm512_extractf32x4_ps(sum, 0));
    _mm_mask_storeu_ps(s + lds, m, _mm512_extractf32x4_ps(sum, 1));
    _mm_mask_storeu_ps(s + 2 * lds, m, _mm512_extractf32x4_ps(sum, 2));
    _mm_mask_storeu_ps(s + 3 * lds, m, _mm512_extractf32x4_ps(sum, 3));
  }
}

template <int DC, typename S>
FA_AVX512 void qk4(const float* q, const S* const* kr, int64_t kn, int64_t d, float* s, int64_t lds,
                   dv::Pre<S> pre) {
  dv::RowPacer<S> pacer(pre, cdiv(kn, 4) * (d / 32));
  for (int64_t j = 0; j < kn; j += 4) {
    const int64_t valid = std::min<int64_t>(4, kn - j);
    const S* const k[4] = {kr[j], kr[j + std::min<int64_t>(1, valid - 1)], kr[j + std::min<int64_t>(2, valid - 1)],
                           kr[j + valid - 1]};
    qk_group<DC, S>(q, k, valid, d, s + j, lds, pacer);
  }
  pacer.finish();
}

// o_r = alpha_r o_r + sum_j p[r][j] v_j for 4 rows (d apart) over NP pairs of 32 columns from c.
template <int NP, typename S>
FA_AVX512_INLINE void pv_pass(const float* pr, int64_t ldp, const float* alpha, const S* const* vr, int64_t kn,
                              int64_t c, float* o, int64_t ldo, dv::RowPacer<S>& pacer) {
  __m512 acc[4][2 * NP];
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
    for (int cc = 0; cc < 2 * NP; ++cc) acc[r][cc] = _mm512_mul_ps(a, _mm512_loadu_ps(o + r * ldo + c + 16 * cc));
  }
  for (int64_t j0 = 0; j0 < kn; j0 += kPvGroup) {
    pacer.step();
    const int64_t je = std::min(kn, j0 + kPvGroup);
#pragma GCC unroll 4
    for (int64_t j = j0; j < je; ++j) {
      __m512 x[2 * NP];
#pragma GCC unroll 2
      for (int np = 0; np < NP; ++np) pair(vr[j] + c + 32 * np, x[2 * np], x[2 * np + 1]);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const __m512 pj = _mm512_set1_ps(pr[r * ldp + j]);
#pragma GCC unroll 4
        for (int cc = 0; cc < 2 * NP; ++cc) acc[r][cc] = _mm512_fmadd_ps(pj, x[cc], acc[r][cc]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
    for (int cc = 0; cc < 2 * NP; ++cc) _mm512_storeu_ps(o + r * ldo + c + 16 * cc, acc[r][cc]);
}

template <int DC, typename S>
FA_AVX512 void pv4(const float* pr, int64_t ldp, const float* alpha, const S* const* vr, int64_t kn, int64_t d_rt,
                   float* o, dv::Pre<S> pre) {
  const int64_t d = DC ? DC : d_rt, ldo = d;
  dv::RowPacer<S> pacer(pre, (d / 64 + (d % 64) / 32) * cdiv(kn, kPvGroup));
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) pv_pass<2, S>(pr, ldp, alpha, vr, kn, c, o, ldo, pacer);
  if (c < d) pv_pass<1, S>(pr, ldp, alpha, vr, kn, c, o, ldo, pacer);
  pacer.finish();
}

}  // namespace avx512
#pragma GCC diagnostic pop
#endif

// The cache dtypes the AVX-512 tiles take, and their column group (dv::pair_col).
template <typename S>
constexpr bool kWideTiles = std::is_same<S, float>::value || std::is_same<S, c10::BFloat16>::value;
constexpr int64_t kWideGroup = 32, kNarrowGroup = 16;

// Which tiles run the blocks of 4 query rows of a call: kTilesAvx512 where the CPU kernels run at x86-64-v4
// width (tile_math.h's isa_level(); build_info()["cpu_isa"]) for fp32 / bf16 caches whose GQA group is a
// multiple of 4 (so that every block is one of 4 rows) and d % 32 == 0; otherwise kTilesAvx2 at x86-64-v3
// width or wider (for blocks of 4 rows with d % 16 == 0; the generic tiles take the rest); kTilesGeneric on
// other CPUs, or with FUSED_ATTN_CPU_DECODE_GENERIC=1 (read per call).
enum DecodeTiles { kTilesGeneric = 0, kTilesAvx2 = 3, kTilesAvx512 = 4 };
template <typename S, typename C>
DecodeTiles pick_tiles(int64_t grp, int64_t d) {
#ifdef FA_DECODE_AVX2
  const char* env = std::getenv("FUSED_ATTN_CPU_DECODE_GENERIC");
  if (!std::is_same<C, float>::value || (env && env[0] == '1')) return kTilesGeneric;
  const int level = cpu::vec::isa_level();
  if (level >= 4 && kWideTiles<S> && grp % 4 == 0 && d % 32 == 0) return kTilesAvx512;
  return level >= 3 ? kTilesAvx2 : kTilesGeneric;
#else
  (void)grp;
  (void)d;
  return kTilesGeneric;
#endif
}

// fn(std::integral_constant<int, DC>) with DC = d for the head dims the AVX2 tiles compile as constants, 0
// (d at run time) for the others.
template <typename Fn>
void by_head_dim(int64_t d, Fn&& fn) {
  switch (d) {
    case 64: return fn(std::integral_constant<int, 64>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    case 256: return fn(std::integral_constant<int, 256>{});
    default: return fn(std::integral_constant<int, 0>{});
  }
}

// Score and output tiles of `rows` query rows: the AVX-512 or AVX2 tiles for the blocks of 4 rows where they
// apply (pick_tiles), the generic (cloned) tiles for the rest.
template <typename S, typename C>
void qk_any(DecodeTiles tiles, const C* q, int64_t rows, int64_t ldq, const S* const* kr, int64_t kn, int64_t d,
            C* s, int64_t lds, dv::Pre<S> pre) {
#ifdef FA_DECODE_AVX2
  if constexpr (std::is_same<C, float>::value && kWideTiles<S>) {
    if (tiles == kTilesAvx512) {  // rows % 4 == 0, d % 32 == 0 (pick_tiles)
      for (int64_t r = 0; r < rows; r += 4, pre = {}) {
        const float* qr = q + r * ldq;
        float* sr = s + r * lds;
        by_head_dim(d, [&](auto dc) { avx512::qk4<decltype(dc)::value, S>(qr, kr, kn, d, sr, lds, pre); });
      }
      return;
    }
  }
  if constexpr (std::is_same<C, float>::value) {
    if (tiles == kTilesAvx2 && rows >= 4 && d % 16 == 0 && ldq == d) {
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4, pre = {}) {
        const float* qr = q + r * ldq;
        float* sr = s + r * lds;
        by_head_dim(d, [&](auto dc) { avx2::qk4<decltype(dc)::value, S>(qr, kr, kn, d, sr, lds, pre); });
      }
      if (r < rows) qk(q + r * ldq, rows - r, ldq, kr, kn, d, s + r * lds, lds, {});
      return;
    }
  }
#endif
  (void)tiles;
  qk(q, rows, ldq, kr, kn, d, s, lds, pre);
}

template <typename S, typename C>
void pv_any(DecodeTiles tiles, const C* pr, int64_t rows, int64_t ldp, const C* alpha, const S* const* vr,
            int64_t kn, int64_t d, C* o, int64_t ldo, dv::Pre<S> pre) {
  // The output tiles pace the next block's rows over this block's kn keys: rows beyond those go out now.
  if (pre.n > kn) {
    for (int64_t j = kn; j < pre.n; ++j) dv::prefetch(pre.rows[j], pre.bytes);
    pre.n = kn;
  }
#ifdef FA_DECODE_AVX2
  if constexpr (std::is_same<C, float>::value && kWideTiles<S>) {
    if (tiles == kTilesAvx512) {
      for (int64_t r = 0; r < rows; r += 4, pre = {}) {
        const float* prr = pr + r * ldp;
        float* orr = o + r * ldo;
        by_head_dim(d, [&](auto dc) { avx512::pv4<decltype(dc)::value, S>(prr, ldp, alpha + r, vr, kn, d, orr, pre); });
      }
      return;
    }
  }
  if constexpr (std::is_same<C, float>::value) {
    if (tiles == kTilesAvx2 && rows >= 4 && d % 16 == 0 && ldo == d) {
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4, pre = {}) {
        const float* prr = pr + r * ldp;
        float* orr = o + r * ldo;
        by_head_dim(d, [&](auto dc) { avx2::pv4<decltype(dc)::value, S>(prr, ldp, alpha + r, vr, kn, d, orr, pre); });
      }
      if (r < rows) pv(pr + r * ldp, rows - r, ldp, alpha + r, vr, kn, d, o + r * ldo, ldo, {});
      return;
    }
  }
#endif
  (void)tiles;
  pv(pr, rows, ldp, alpha, vr, kn, d, o, ldo, pre);
}

// ---------------------------------------------------------------------------------------------------

// The split count for num_splits = 0: one split per (batch, kv head, query block) when those tasks already
// give every thread several of similar size; otherwise enough splits for ~8 tasks per thread, no split
// shorter than kMinSplitKeys keys.
int64_t pick_splits(int64_t groups, int64_t longest_keys) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  if (groups >= 8 * threads) return 1;
  const int64_t want = cdiv(8 * threads, std::max<int64_t>(groups, 1));
  return std::max<int64_t>(1, std::min(want, longest_keys / kMinSplitKeys));
}

template <typename S, typename C>
struct Scratch {
  std::unique_ptr<C[]> q, s, acc, m, l, alpha;
  std::unique_ptr<const S*[]> kr, vr;  // row pointers of the current and the next key block
};

template <typename S, typename C>
void kvcache_impl(const AttnParams& p) {
  constexpr C kNegInf = -std::numeric_limits<C>::infinity();
  const int64_t nb = p.batch, hk = p.hk, grp = p.group(), d = p.d;
  if (nb == 0 || p.hq == 0 || p.sq == 0 || d == 0) return;
  const S* q = static_cast<const S*>(p.q);
  const S* k = static_cast<const S*>(p.k);
  const S* v = static_cast<const S*>(p.v);
  S* o = static_cast<S*>(p.o);
  C* lse = static_cast<C*>(p.lse);

  std::vector<SeqInfo> seqs(nb);
  for (int64_t b = 0; b < nb; ++b) seqs[b] = p.seq(b);
  // Query positions per task, so that a task has about kTaskRows rows (at least the whole group).
  const int64_t qb = std::min(std::max<int64_t>(1, kTaskRows / grp), p.sq);
  const int64_t nqb = cdiv(p.sq, qb);
  // KV heads per task (ht) and keys per block (kbk). A paged pool (num_pages, page_size, Hk, D) keeps the Hk
  // heads of a slot side by side: one head's keys are D-element runs Hk * D elements apart, and a task per
  // head read 1/Hk of every page (measured: 25% of the read bandwidth against 57% for a contiguous cache, fp32
  // B4 S16k, 2 threads). So a task takes every head of its keys (while its rows stay within kTaskRows) and
  // reads the pool's slots whole; its key blocks shrink so that the K and V rows of one block (kbk slots of
  // every head) and those of the next, being prefetched, stay in L2. Contiguous caches (each head's keys one
  // run already) and pools laid out (num_pages, Hk, page_size, D) keep one head per task.
  const bool slot_major = p.block_table != nullptr && std::abs(p.k_st.h) < std::abs(p.k_st.s) &&
                          std::abs(p.v_st.h) < std::abs(p.v_st.s);
  int64_t ht = 1;
  if (slot_major)
    for (int64_t c = std::min(hk, std::max<int64_t>(1, kTaskRows / (grp * qb))); c >= 1; --c)
      if (hk % c == 0) {
        ht = c;
        break;
      }
  int64_t kbk = kBlockK;
  if (ht > 1) {
    const int64_t slot_bytes = 2 * ht * d * int64_t(sizeof(S));  // K and V of one key, every head of the task
    kbk = std::max<int64_t>(16, std::min(kBlockK, (kBlockBytes / slot_bytes) / 16 * 16));
  }
  const int64_t nhb = hk / ht;
  const int64_t head_rows = grp * qb;  // rows of one kv head in a task, at most
  const int64_t rows_max = ht * head_rows;
  const int64_t groups = nb * nhb * nqb;  // (b, block of kv heads, query block)

  // Key range of each (b, query block): the keys any of its rows sees.
  std::vector<int64_t> kbeg(nb * nqb), kend(nb * nqb);
  int64_t longest = 0;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t qi = 0; qi < nqb; ++qi) {
      int64_t kb, ke;
      Band(p, seqs[b]).key_range(qi * qb, qi * qb + qb, kb, ke);
      kbeg[b * nqb + qi] = kb;
      kend[b * nqb + qi] = std::max(kb, ke);
      longest = std::max(longest, ke - kb);
    }
  const int64_t ns = p.num_splits > 0 ? p.num_splits : pick_splits(groups, longest);
  // Split t of a range [kb, ke): [kb + t * chunk, kb + (t + 1) * chunk) clipped, chunk a multiple of kBlockK.
  auto split_range = [&](int64_t b, int64_t qi, int64_t t, int64_t& s0, int64_t& s1) {
    const int64_t kb = kbeg[b * nqb + qi], ke = kend[b * nqb + qi];
    const int64_t chunk = cdiv(cdiv(ke - kb, ns), kBlockK) * kBlockK;
    s0 = std::min(ke, kb + t * chunk);
    s1 = std::min(ke, s0 + chunk);
  };

  // Scores in base 2 (tile_math.h): Q is pre-scaled by scale * log2(e); with a softcap by scale only, and
  // score_mod_tile moves the capped score to base 2.
  const bool capped = p.softcap > 0;
  const DecodeTiles tiles = pick_tiles<S, C>(grp, d);
  const int64_t pgroup = tiles == kTilesAvx512 ? kWideGroup : kNarrowGroup;  // dv::pair_col's group
  const C qscale = static_cast<C>(capped ? p.scale : p.scale * kLog2e);
  const bool mods = capped || p.alibi != nullptr;

  // Partials of the splits (ns > 1): per (group, split) rows_max x d unnormalised outputs, then the running
  // max and sum of each row.
  const int64_t slot = rows_max * (d + 2);
  const int64_t groups_per_wave =
      ns == 1 ? groups
              : std::max<int64_t>(1, std::min(groups, kWorkspaceBudget / (ns * slot * int64_t(sizeof(C)))));
  std::vector<C> part(ns == 1 ? 0 : groups_per_wave * ns * slot);

  auto make = [&] {
    Scratch<S, C> w;
    w.q.reset(new C[rows_max * d]);
    w.s.reset(new C[head_rows * kBlockK]);
    w.acc.reset(new C[rows_max * d]);
    w.m.reset(new C[rows_max]);
    w.l.reset(new C[rows_max]);
    w.alpha.reset(new C[rows_max]);
    w.kr.reset(new const S*[(kPrefetchBlocks + 1) * ht * kbk]);
    w.vr.reset(new const S*[(kPrefetchBlocks + 1) * ht * kbk]);
    return w;
  };

  // Group g = (b, block of kv heads, query block). Task (group g, split t): rows r = (hh * grp + hg) * qn + i
  // (kv head kvh0 + hh of the task, query head hg of its group, query position q0 + i), so that the rows of
  // one query head are contiguous (mask_tile, score_mod_tile) and those of one kv head too (one qk / softmax /
  // pv call each).
  struct Where {
    int64_t b, kvh0, qi, q0, qn;
  };
  auto where = [&](int64_t g) {
    const int64_t b = g / (nhb * nqb), qi = g % nqb;
    return Where{b, ((g / nqb) % nhb) * ht, qi, qi * qb, std::min(qb, seqs[b].sq - qi * qb)};
  };
  auto body = [&](Scratch<S, C>& w, int64_t g, int64_t t, int64_t g0) {
    const Where at = where(g);
    const int64_t b = at.b, kvh0 = at.kvh0, q0 = at.q0, qn = at.qn;
    const SeqInfo& si = seqs[b];
    const int64_t hrows = grp * qn, rows = ht * hrows;
    int64_t s0, s1;
    split_range(b, at.qi, t, s0, s1);
    C* qc = w.q.get();
    C* s = w.s.get();
    C* acc = w.acc.get();
    C* m = w.m.get();
    C* l = w.l.get();
    C* alpha = w.alpha.get();
    for (int64_t r = 0; r < rows; ++r) {
      m[r] = kNegInf;
      l[r] = 0;
    }
    if (s1 > s0) {
      for (int64_t hh = 0; hh < ht; ++hh)
        for (int64_t hg = 0; hg < grp; ++hg)
          for (int64_t i = 0; i < qn; ++i) {
            const S* qrow = q + p.q_st.at(b, (kvh0 + hh) * grp + hg, si.q_off + q0 + i);
            C* dst = qc + ((hh * grp + hg) * qn + i) * d;
            for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<C>(qrow[dv::pair_col<S>(c, d, pgroup)]) * qscale;
          }
      std::fill(acc, acc + rows * d, C(0));
    }
    // Row pointers of the keys [k0, k0 + kn), kv head kvh0 + hh's at [hh * kbk, hh * kbk + kn); a paged cache
    // resolves one block_table entry per page.
    auto rows_of = [&](int64_t k0, int64_t kn, const S** kp_out, const S** vp_out) {
      if (p.block_table) {
        const int32_t* bt = p.block_table + b * p.block_table_b;
        for (int64_t j = k0; j < k0 + kn;) {
          const int64_t page = bt[j / p.page_size], slot0 = j % p.page_size;
          const int64_t n = std::min(p.page_size - slot0, k0 + kn - j);
          for (int64_t hh = 0; hh < ht; ++hh) {
            const S* kp = k + page * p.k_st.b + (kvh0 + hh) * p.k_st.h + slot0 * p.k_st.s;
            const S* vp = v + page * p.v_st.b + (kvh0 + hh) * p.v_st.h + slot0 * p.v_st.s;
            for (int64_t x = 0; x < n; ++x) {
              kp_out[hh * kbk + j - k0 + x] = kp + x * p.k_st.s;
              vp_out[hh * kbk + j - k0 + x] = vp + x * p.v_st.s;
            }
          }
          j += n;
        }
      } else {
        for (int64_t hh = 0; hh < ht; ++hh) {
          const S* kp = k + p.k_st.at(b, kvh0 + hh, si.k_off + k0);
          const S* vp = v + p.v_st.at(b, kvh0 + hh, si.k_off + k0);
          for (int64_t x = 0; x < kn; ++x) {
            kp_out[hh * kbk + x] = kp + x * p.k_st.s;
            vp_out[hh * kbk + x] = vp + x * p.v_st.s;
          }
        }
      }
    };
    const TileVisit whole{0, false};
    // What head hh's products prefetch of the next block (nn keys, row pointers `next`). One head per task,
    // or heads whose rows in a slot are not side by side: that head's rows. Several heads side by side in
    // each slot (the (num_pages, page_size, Hk, D) pool): the slots [hh nn / ht, (hh + 1) nn / ht) with every
    // head of the task in them, so that the next block is fetched in address order across the heads' turns.
    auto pre_of = [&](const S** next, int64_t hh, int64_t nn, int64_t head_stride) {
      if (nn <= 0) return dv::Pre<S>{};
      if (ht == 1 || head_stride != d) return dv::Pre<S>{next + hh * kbk, nn, d * int64_t(sizeof(S))};
      const int64_t x0 = hh * nn / ht, x1 = (hh + 1) * nn / ht;
      return dv::Pre<S>{next + x0, x1 - x0, ht * d * int64_t(sizeof(S))};
    };
    // Row pointers of blocks i and i + 1 in a ring of two; block i + 1's rows are prefetched during block i's
    // products (each head's during its own).
    constexpr int64_t dist = kPrefetchBlocks;
    auto ring_k = [&](int64_t i) { return w.kr.get() + (i % (dist + 1)) * ht * kbk; };
    auto ring_v = [&](int64_t i) { return w.vr.get() + (i % (dist + 1)) * ht * kbk; };
    for (int64_t i = 0; i < dist && s0 + i * kbk < s1; ++i)
      rows_of(s0 + i * kbk, std::min(kbk, s1 - s0 - i * kbk), ring_k(i), ring_v(i));
    for (int64_t k0 = s0, bi = 0; k0 < s1; k0 += kbk, ++bi) {
      const int64_t kn = std::min(kbk, s1 - k0);
      const S* const* kr = ring_k(bi);
      const S* const* vr = ring_v(bi);
      const S** kr_next = ring_k(bi + dist);
      const S** vr_next = ring_v(bi + dist);
      const int64_t nn = std::max<int64_t>(0, std::min(kbk, s1 - k0 - dist * kbk));
      if (nn > 0) rows_of(k0 + dist * kbk, nn, kr_next, vr_next);
      const bool need_mask = tile_needs_mask(p, whole, b, q0, q0 + qn, k0, k0 + kn);
      for (int64_t hh = 0; hh < ht; ++hh) {
        const int64_t r0 = hh * hrows;
        qk_any(tiles, qc + r0 * d, hrows, d, kr + hh * kbk, kn, d, s, kBlockK, pre_of(kr_next, hh, nn, p.k_st.h));
        if (mods || need_mask)
          for (int64_t hg = 0; hg < grp; ++hg) {
            const int64_t h = (kvh0 + hh) * grp + hg;
            C* sh = s + hg * qn * kBlockK;
            if (mods)
              cpu::score_mod_tile(ScoreMod(p, b, h, si), q0, qn, k0, kn, sh, kBlockK, false, static_cast<C*>(nullptr));
            if (need_mask) cpu::mask_tile(p, whole, b, h, q0, qn, k0, kn, sh, kBlockK, false);
          }
        cpu::softmax_step(s, hrows, kn, kBlockK, m + r0, l + r0, alpha + r0);
        pv_any(tiles, s, hrows, kBlockK, alpha + r0, vr + hh * kbk, kn, d, acc + r0 * d, d,
               pre_of(vr_next, hh, nn, p.v_st.h));
      }
    }

    if (ns > 1) {  // partial: unnormalised rows, max, sum
      C* dst = part.data() + ((g - g0) * ns + t) * slot;
      if (s1 > s0) std::copy(acc, acc + rows * d, dst);
      std::copy(m, m + rows, dst + rows_max * d);
      std::copy(l, l + rows, dst + rows_max * d + rows_max);
      return;
    }
    for (int64_t hh = 0; hh < ht; ++hh)
      for (int64_t hg = 0; hg < grp; ++hg) {
        const int64_t h = (kvh0 + hh) * grp + hg;
        for (int64_t i = 0; i < qn; ++i) {
          const int64_t r = (hh * grp + hg) * qn + i;
          S* orow = o + p.o_st.at(b, h, si.q_off + q0 + i);
          C* lrow = lse + b * p.lse_b + h * p.lse_h + si.q_off + q0 + i;
          if (l[r] == 0) {  // sees no key (a NaN sum gives a NaN row below)
            for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<S>(0);
            *lrow = kNegInf;
            continue;
          }
          const C inv = C(1) / l[r];
          const C* ar = acc + r * d;
          for (int64_t c = 0; c < d; ++c) orow[dv::pair_col<S>(c, d, pgroup)] = static_cast<S>(ar[c] * inv);
          *lrow = (m[r] + std::log2(l[r])) * static_cast<C>(kLn2);
        }
      }
  };

  // Merge of the splits of group g, in split order: max M of the parts' maxima, then sums weighted by
  // 2^(m_t - M).
  auto merge = [&](int64_t g, int64_t g0) {
    const Where at = where(g);
    const int64_t b = at.b, q0 = at.q0, qn = at.qn;
    const SeqInfo& si = seqs[b];
    C* base = part.data() + (g - g0) * ns * slot;
    for (int64_t hh = 0; hh < ht; ++hh)
      for (int64_t hg = 0; hg < grp; ++hg) {
        const int64_t h = (at.kvh0 + hh) * grp + hg;
        for (int64_t i = 0; i < qn; ++i) {
          const int64_t r = (hh * grp + hg) * qn + i;
          S* orow = o + p.o_st.at(b, h, si.q_off + q0 + i);
          C* lrow = lse + b * p.lse_b + h * p.lse_h + si.q_off + q0 + i;
          C mx = kNegInf;
          bool nan = false;  // a part's sum is NaN (a NaN score): the row is NaN, as its single-pass result
          for (int64_t t = 0; t < ns; ++t) {
            const C* pt = base + t * slot + rows_max * d;
            if (pt[rows_max + r] > 0) mx = std::max(mx, pt[r]);
            nan = nan || std::isnan(pt[rows_max + r]);
          }
          if (nan) {
            for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<S>(std::numeric_limits<C>::quiet_NaN());
            *lrow = std::numeric_limits<C>::quiet_NaN();
            continue;
          }
          if (mx == kNegInf) {
            for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<S>(0);
            *lrow = kNegInf;
            continue;
          }
          C sum = 0;
          C* out = nullptr;  // accumulated in the first contributing part's own row
          for (int64_t t = 0; t < ns; ++t) {
            C* pt = base + t * slot;
            const C lt = pt[rows_max * d + rows_max + r];
            if (!(lt > 0)) continue;
            const C wgt = std::exp2(pt[rows_max * d + r] - mx);
            sum += lt * wgt;
            C* row = pt + r * d;
            if (!out) {
              out = row;
              for (int64_t c = 0; c < d; ++c) out[c] *= wgt;
            } else {
              for (int64_t c = 0; c < d; ++c) out[c] += wgt * row[c];
            }
          }
          const C inv = C(1) / sum;
          for (int64_t c = 0; c < d; ++c) orow[dv::pair_col<S>(c, d, pgroup)] = static_cast<S>(out[c] * inv);
          *lrow = (mx + std::log2(sum)) * static_cast<C>(kLn2);
        }
      }
  };

  for (int64_t g0 = 0; g0 < groups; g0 += groups_per_wave) {
    const int64_t g1 = std::min(groups, g0 + groups_per_wave);
    std::vector<int64_t> cost;
    cost.reserve((g1 - g0) * ns);
    for (int64_t g = g0; g < g1; ++g) {
      const Where at = where(g);
      const int64_t rows = ht * grp * at.qn;
      for (int64_t t = 0; t < ns; ++t) {
        int64_t s0, s1;
        split_range(at.b, at.qi, t, s0, s1);
        cost.push_back(rows * (s1 - s0) + 1);
      }
    }
    cpu::run_tasks(cost, make, [&](Scratch<S, C>& w, int64_t task) { body(w, g0 + task / ns, task % ns, g0); });
    if (ns > 1)
      at::parallel_for(g0, g1, 1, [&](int64_t beg, int64_t end) {
        for (int64_t g = beg; g < end; ++g) merge(g, g0);
      });
  }
}

}  // namespace

void cpu_kvcache_fwd(const AttnParams& p, DType dt) {
  switch (dt) {
    case DType::f16: return kvcache_impl<c10::Half, float>(p);
    case DType::bf16: return kvcache_impl<c10::BFloat16, float>(p);
    case DType::f32: return kvcache_impl<float, float>(p);
    case DType::f64: return kvcache_impl<double, double>(p);
  }
  throw std::invalid_argument("cpu_kvcache_fwd: unknown dtype " + std::to_string(static_cast<int>(dt)));
}

}  // namespace fused_attn
