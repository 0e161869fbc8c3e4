// Host-emulator check of the CUDA kernels: runs the real launchers and kernels (as converted by
// gen_kernels.py) on emu_runtime.h and compares out, lse, dq, dk, dv with a float64 reference; the decode
// (flash_kvcache) cases are in emu_decode.h.
//
// Build (run_all.py does this):
//   tensor cores: g++ -std=c++20 -O2 -pthread -I shim -I build/gen -DEMU_ELEM=__half -DEMU_HD=64 emu_main.cpp
//   fp32 / fp64:  g++ -std=c++20 -O2 -pthread -I shim -I build/gen -DEMU_GENERIC -DEMU_T=double emu_main.cpp
// Run: ./binary [case-name-substring] [--order fwd|rev|random|free] [--eager] [--seed N] [-v]
// Prints one line per (case, pass) and ends with "N passed, N failed"; exit status 1 on any failure.
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifdef EMU_GENERIC
#include "cuda/decode.cu"
#include "cuda/generic.cu"
using Elem = EMU_T;
using Lse = EMU_T;
constexpr int kHD = 0;
#elif defined(EMU_SM90)
#include "cuda/sm90/bwd.cuh"
#include "cuda/sm90/fwd.cuh"
using Elem = EMU_ELEM;
using Lse = float;
constexpr int kHD = EMU_HD;
#else
#include "cuda/bwd_kernel.cuh"
#include "cuda/decode.cu"
#include "cuda/decode_kernel.cuh"
#include "cuda/fwd_kernel.cuh"
using Elem = EMU_ELEM;
using Lse = float;
constexpr int kHD = EMU_HD;
#endif

using namespace fused_attn;

// ------------------------------------------------------------------------------------------------
// Element codecs and bit patterns

constexpr bool kTc = sizeof(Elem) == 2;
constexpr bool kBf16 = std::is_same<Elem, __nv_bfloat16>::value;

double to_d(__half h) { return emu_f16_bits_to_f32(h.x); }
double to_d(__nv_bfloat16 h) { return emu_bf16_bits_to_f32(h.x); }
double to_d(float f) { return f; }
double to_d(double f) { return f; }
template <typename S>
S from_d(double x) {
  if constexpr (std::is_same<S, __half>::value) return __half{emu_f32_to_f16_bits(static_cast<float>(x))};
  else if constexpr (std::is_same<S, __nv_bfloat16>::value) return __nv_bfloat16{emu_f32_to_bf16_bits(static_cast<float>(x))};
  else return static_cast<S>(x);
}
// Padding of inputs: NaN, so that a kernel that reads past d (or past a row) and uses it shows NaN.
template <typename S>
S nan_pattern() {
  S s;
  std::memset(&s, 0xff, sizeof(S));
  return s;
}
// Outputs start as this NaN pattern: still there afterwards = never written; in padding = untouched.
template <typename S>
S sentinel() {
  S s;
  if constexpr (sizeof(S) == 2) { const uint16_t b = 0x7fa5; std::memcpy(&s, &b, 2); }
  else if constexpr (sizeof(S) == 4) { const uint32_t b = 0x7fa5a5a5u; std::memcpy(&s, &b, 4); }
  else { const uint64_t b = 0x7ff5a5a5a5a5a5a5ull; std::memcpy(&s, &b, 8); }
  return s;
}
template <typename S>
bool same_bits(const S& a, const S& b) { return std::memcmp(&a, &b, sizeof(S)) == 0; }

// ------------------------------------------------------------------------------------------------
// A (B, H, S, D) tensor in a buffer with padded rows and either (B, H, S, D) or (B, S, H, D) storage.

template <typename S>
struct Tensor4 {
  int64_t B = 0, H = 0, S_ = 0, D = 0;
  Strides st;
  std::vector<S> buf;
  Tensor4(int64_t b, int64_t h, int64_t s, int64_t d, int64_t pad, bool bshd, S fill) : B(b), H(h), S_(s), D(d) {
    const int64_t row = d + pad;
    if (bshd) st = {s * h * row, row, h * row};
    else st = {h * s * row, s * row, row};
    buf.assign(static_cast<size_t>(b * st.b + 8), fill);  // + 8: a tail that must stay untouched
  }
  S& at(int64_t b, int64_t h, int64_t s, int64_t x) { return buf[st.at(b, h, s) + x]; }
  bool logical(size_t idx) const {  // whether buffer index idx is an element of the tensor
    if (idx >= static_cast<size_t>(B * st.b)) return false;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < S_; ++s) {
          const int64_t o = st.at(b, h, s);
          if (static_cast<int64_t>(idx) >= o && static_cast<int64_t>(idx) < o + D) return true;
        }
    return false;
  }
};

// ------------------------------------------------------------------------------------------------
// Cases

struct Case {
  std::string name;
  int B, Hq, Hk, Sq, Sk, d;
  int64_t left = -1, right = -1;
  int bq = 0, bk = 0;        // block-sparse layout block size (0: dense)
  bool layout_bcast = false;  // layout batch-broadcast (Bm = 1, batch stride 0)
  bool dlse = false;
  bool kv_bshd = false;  // k, v, dk, dv stored (B, S, H, D)
  // Packed variable-length batch: per-sequence lengths (B of each). q, out, dout, dq are then (total_q, Hq, d),
  // k, v, dk, dv (total_k, Hk, d), lse (Hq, total_q); Sq and Sk are the max_seqlen the kernels get (>= every
  // length: a larger value only adds blocks that exit at once).
  std::vector<int> lens_q, lens_k;
  double softcap = 0;  // > 0: softcap
  int alibi = 0;       // ALiBi slopes: 0 none, 1 (1, Hq) broadcast over batch, 2 (B, Hq)
  double qmul = 1;     // q scaled by this: scores large enough that the cap bites
  bool nan_inputs = false;  // one NaN in a query row and one in a key (run_case)
  bool varlen() const { return !lens_q.empty(); }
};

std::vector<Case> cases(int hd) {
  const int full = hd ? hd : 64;
  std::vector<Case> c;
  c.push_back({"dense", 1, 2, 1, 130, 200, full, -1, -1, 0, 0, false, true, true});
  c.push_back({"causal_sq_gt_sk", 1, 2, 2, 150, 97, hd ? full : 96, -1, 0});
  c.push_back({"window_gqa_b2", 2, 4, 2, 77, 300, hd ? full : 40, 40, 10, 0, 0, false, true, false});
  c.push_back({"sparse_partial", 2, 2, 1, 200, 150, hd ? full : 160, -1, -1, 16, 32, true, true, true});
  c.push_back({"sparse_causal", 1, 2, 2, 193, 193, hd ? full : 256, -1, 0, 32, 16, false, false, false});
  c.push_back({"single", 1, 1, 1, 1, 1, hd ? full : 1, -1, -1, 0, 0, false, true, false});
  c.push_back({"ragged_small_d", 1, 2, 1, 97, 130, hd ? std::max(8, hd - 24) : 59, -1, -1, 0, 0, false, true, true});
  // Packed batches: lengths 0 and 1, Sq_b != Sk_b both ways, a sequence without keys and one without queries,
  // GQA; the second gets max_seqlen above the longest lengths.
  Case v1{"varlen_causal", 6, 4, 2, 130, 150, hd ? full : 40, -1, 0, 0, 0, false, true, false};
  v1.lens_q = {70, 0, 1, 130, 33, 9};
  v1.lens_k = {100, 12, 0, 97, 33, 150};
  c.push_back(v1);
  Case v2{"varlen_window", 4, 2, 1, 200, 256, hd ? full : 96, 30, 7, 0, 0, false, true, false};
  v2.lens_q = {17, 129, 1, 64};
  v2.lens_k = {40, 129, 5, 0};
  c.push_back(v2);
  // Score modifiers, alone, together, with a packed batch and with a block layout.
  Case m1{"softcap", 1, 2, 1, 130, 200, hd ? full : 64, -1, -1, 0, 0, false, true, true};
  m1.softcap = 1.5;
  m1.qmul = 2;
  c.push_back(m1);
  Case m2{"alibi_window_gqa", 2, 4, 2, 77, 160, hd ? full : 59, 60, 20, 0, 0, false, true, false};
  m2.alibi = 2;
  c.push_back(m2);
  Case m3{"mods_varlen_causal", 4, 2, 2, 128, 100, hd ? full : 160, -1, 0, 0, 0, false, true, false};
  m3.lens_q = {40, 0, 128, 1};
  m3.lens_k = {60, 7, 100, 1};
  m3.softcap = 2.0;
  m3.alibi = 1;
  m3.qmul = 2;
  c.push_back(m3);
  Case m4{"sparse_mods", 1, 2, 2, 100, 100, hd ? full : 256, -1, 0, 32, 16, false, false, false};
  m4.softcap = 3.0;
  m4.alibi = 1;
  m4.qmul = 2;
  c.push_back(m4);
  // NaN inputs: one element of a query row and one of a key. The rows whose visible scores include a NaN must
  // come out NaN (out and lse), as in PyTorch, and every other row as usual; in the backward, the heads the NaN
  // reaches must show NaN in dq, dk and dv, and every other head must be exact as usual.
  Case n1{"nan_inputs", 2, 4, 2, 77, 150, hd ? full : 40, -1, 0, 0, 0, false, true, false};
  n1.nan_inputs = true;
  c.push_back(n1);
  // Many key tiles per query tile and query tiles per key tile: pipelines and rings wrap several times.
  c.push_back({"many_tiles", 1, 2, 1, 300, 700, full, -1, -1, 0, 0, false, false, true});
  return c;
}

// ------------------------------------------------------------------------------------------------
// Block layout and kernel-granularity lists, built the way fused_attn/_sparse.py's tile_lists does:
// per (tile row, tile column) "any" over the layout blocks the tile meets (blocks past the layout count
// as not allowed) and "all" (blocks past the layout count as allowed); entries: visible tiles first in
// ascending order, code t when all, -t-1 when only some; then the invisible ones, also ascending.

struct Layout {
  int Bm, Hm, nqb, nkb, bq, bk;
  std::vector<uint8_t> v;
  uint8_t at(int b, int h, int i, int j) const { return v[((static_cast<size_t>(b) * Hm + h) * nqb + i) * nkb + j]; }
};

struct Lists {
  int rows, cols;  // per (b, h): rows lists of cols entries
  std::vector<int32_t> cnt, idx;
};

Lists tile_lists(const Layout& L, int tq, int tk, bool transposed) {
  const int ntq = static_cast<int>(cdiv(static_cast<int64_t>(L.nqb) * L.bq, tq));
  const int ntk = static_cast<int>(cdiv(static_cast<int64_t>(L.nkb) * L.bk, tk));
  Lists out;
  out.rows = transposed ? ntk : ntq;
  out.cols = transposed ? ntq : ntk;
  out.cnt.assign(static_cast<size_t>(L.Bm) * L.Hm * out.rows, 0);
  out.idx.assign(static_cast<size_t>(L.Bm) * L.Hm * out.rows * out.cols, 0);
  for (int b = 0; b < L.Bm; ++b)
    for (int h = 0; h < L.Hm; ++h)
      for (int r = 0; r < out.rows; ++r) {
        std::vector<int32_t> vis, hid;
        for (int c = 0; c < out.cols; ++c) {
          const int qt = transposed ? c : r, kt = transposed ? r : c;
          bool any = false, all = true;
          for (int i = qt * tq / L.bq; i <= (qt * tq + tq - 1) / L.bq; ++i)
            for (int j = kt * tk / L.bk; j <= (kt * tk + tk - 1) / L.bk; ++j) {
              if (i >= L.nqb || j >= L.nkb) continue;
              any |= L.at(b, h, i, j) != 0;
              all &= L.at(b, h, i, j) != 0;
            }
          (any ? vis : hid).push_back(all ? c : -c - 1);
        }
        const size_t row = (static_cast<size_t>(b) * L.Hm + h) * out.rows + r;
        out.cnt[row] = static_cast<int32_t>(vis.size());
        vis.insert(vis.end(), hid.begin(), hid.end());
        std::copy(vis.begin(), vis.end(), out.idx.begin() + row * out.cols);
      }
  return out;
}

TileList as_tile_list(const Lists& l, const Layout& L) {
  TileList t;
  t.cnt = l.cnt.data();
  t.idx = l.idx.data();
  t.cnt_b = L.Bm == 1 ? 0 : static_cast<int64_t>(L.Hm) * l.rows;
  t.cnt_h = l.rows;
  t.idx_b = L.Bm == 1 ? 0 : static_cast<int64_t>(L.Hm) * l.rows * l.cols;
  t.idx_h = static_cast<int64_t>(l.rows) * l.cols;
  t.idx_r = l.cols;
  return t;
}

Layout make_layout(const Case& c, std::mt19937& rng) {
  Layout L{c.layout_bcast ? 1 : c.B, c.Hq, static_cast<int>(cdiv(c.Sq, c.bq)), static_cast<int>(cdiv(c.Sk, c.bk)),
           c.bq, c.bk, {}};
  L.v.resize(static_cast<size_t>(L.Bm) * L.Hm * L.nqb * L.nkb);
  // Regions of 64 x 64 elements are all on, all off or random, so that every kernel's tiles come out
  // full, partial and empty; block row 0 is off (its query rows see nothing).
  for (int b = 0; b < L.Bm; ++b)
    for (int h = 0; h < L.Hm; ++h)
      for (int i = 0; i < L.nqb; ++i)
        for (int j = 0; j < L.nkb; ++j) {
          const unsigned mode = (static_cast<unsigned>(i * c.bq / 64) * 7 + (j * c.bk / 64) * 3 + h + b) % 3;
          uint8_t on = mode == 0 ? 1 : mode == 1 ? 0 : static_cast<uint8_t>(rng() % 2);
          if (i == 0) on = 0;
          L.v[((static_cast<size_t>(b) * L.Hm + h) * L.nqb + i) * L.nkb + j] = on;
        }
  return L;
}

// ------------------------------------------------------------------------------------------------
// Reference (float64) and comparison

struct Ref {
  std::vector<double> o, lse, dq, dk, dv;  // logical (B, H, S, d), lse (B, Hq, Sq)
  std::vector<uint8_t> row_sees, key_seen;  // (B, Hq, Sq), (B, Hk, Sk)
};

struct Stats {
  long errors = 0, nans = 0;  // nans: NaN elements seen in the slices compare() was told to take loosely
  double err = 0, ref_max = 0;
  std::string first;
  void fail(const std::string& s) {
    if (errors++ == 0) first = s;
  }
};

// Every element of t against ref: written, finite and within the bound where the reference is finite, NaN where
// it is NaN (NaN inputs), exactly 0 where must_be_zero says so; nothing written outside the tensor. loose(b, h),
// when given, names (batch, head) slices that a NaN input reached in the backward: there only "written" is
// checked, and NaNs are counted.
template <typename S>
void compare(Stats& st, Tensor4<S>& t, const std::vector<double>& ref, const char* what,
             const std::function<bool(int64_t, int64_t, int64_t)>& must_be_zero,
             const std::function<bool(int64_t, int64_t)>& loose = nullptr) {
  std::vector<uint8_t> logical(t.buf.size(), 0);
  for (int64_t b = 0; b < t.B; ++b)
    for (int64_t h = 0; h < t.H; ++h)
      for (int64_t s = 0; s < t.S_; ++s)
        for (int64_t x = 0; x < t.D; ++x) {
          logical[t.st.at(b, h, s) + x] = 1;
          const S got = t.at(b, h, s, x);
          const double r = ref[((b * t.H + h) * t.S_ + s) * t.D + x];
          char msg[200];
          if (same_bits(got, sentinel<S>())) {
            std::snprintf(msg, sizeof msg, "%s[%lld,%lld,%lld,%lld] never written", what, (long long)b, (long long)h,
                          (long long)s, (long long)x);
            st.fail(msg);
            continue;
          }
          const double g = to_d(got);
          if (loose && loose(b, h)) {
            st.nans += std::isnan(g);
            continue;
          }
          if (std::isnan(r)) {
            if (!std::isnan(g)) {
              std::snprintf(msg, sizeof msg, "%s[%lld,%lld,%lld,%lld] = %g (want NaN: the row sees a NaN)", what,
                            (long long)b, (long long)h, (long long)s, (long long)x, g);
              st.fail(msg);
            }
            continue;
          }
          if (!std::isfinite(g) || (must_be_zero(b, h, s) && g != 0.0)) {
            std::snprintf(msg, sizeof msg, "%s[%lld,%lld,%lld,%lld] = %g (want %g%s)", what, (long long)b,
                          (long long)h, (long long)s, (long long)x, g, r,
                          must_be_zero(b, h, s) ? ", exactly 0" : "");
            st.fail(msg);
            continue;
          }
          st.err = std::max(st.err, std::fabs(g - r));
          st.ref_max = std::max(st.ref_max, std::fabs(r));
        }
  for (size_t i = 0; i < t.buf.size(); ++i)
    if (!logical[i] && !same_bits(t.buf[i], sentinel<S>())) {
      st.fail(std::string(what) + ": write outside the tensor (padding or past the end) at buffer index " +
              std::to_string(i));
      break;
    }
}

// ------------------------------------------------------------------------------------------------

struct Totals {
  int passed = 0, failed = 0;
};

// Bounds about 5x to 10x above the largest error seen over the whole matrix (tests/emu/README.md).
double tolerance(const char* which) {
  const bool grad = which[0] == 'd';
  if (std::strcmp(which, "lse") == 0) return std::is_same<Elem, double>::value ? 1e-13 : 2e-6;
  if (std::is_same<Elem, double>::value) return 1e-13;
  if (std::is_same<Elem, float>::value) return grad ? 2e-5 : 1e-5;
  if (kBf16) return grad ? 4e-2 : 2e-2;
  return grad ? 5e-3 : 3e-3;
}

void report(Totals& tot, const Case& c, const char* pass, std::vector<std::pair<const char*, Stats>>& parts,
            long emu_errors, const std::string& thrown) {
  bool ok = emu_errors == 0 && thrown.empty();
  std::string detail;
  for (auto& [name, s] : parts) {
    // Inputs are O(1): a reference that is (nearly) zero everywhere is measured against 1e-2, so the
    // rounding of P and delta does not count as a failure there.
    const double rel = s.err / std::max(s.ref_max, 1e-2);
    const bool good = s.errors == 0 && rel <= tolerance(name);
    ok &= good;
    char buf[160];
    std::snprintf(buf, sizeof buf, " %s %.1e%s", name, rel, good ? "" : "(!)");
    detail += buf;
    if (s.errors) detail += std::string(" [") + std::to_string(s.errors) + " bad: " + s.first + "]";
  }
  if (emu_errors) detail += " [" + std::to_string(emu_errors) + " emulator errors]";
  if (!thrown.empty()) detail += " [threw: " + thrown + "]";
  const char* dt = std::is_same<Elem, __half>::value ? "fp16" : kBf16 ? "bf16" : sizeof(Elem) == 4 ? "fp32" : "fp64";
  std::printf("%s %s HD=%d d=%d %-16s %-9s:%s\n", ok ? "PASS" : "FAIL", dt, kHD, c.d, c.name.c_str(), pass,
              detail.c_str());
  std::fflush(stdout);
  (ok ? tot.passed : tot.failed)++;
}

void run_case(const Case& c, unsigned seed, Totals& tot) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int64_t pad = kTc ? 8 : 3;
  const int G = c.Hq / c.Hk;
  const bool var = c.varlen();

  // Sequences: lengths and row offsets into the tensors. Fixed-length: B sequences of (Sq, Sk) at tensor
  // batch b; packed: one tensor batch of total rows, sequence b at rows cu[b] ...
  std::vector<int64_t> sq(c.B, c.Sq), sk(c.B, c.Sk), cq(c.B + 1, 0), ck(c.B + 1, 0);
  if (var)
    for (int b = 0; b < c.B; ++b) {
      sq[b] = c.lens_q[b];
      sk[b] = c.lens_k[b];
      cq[b + 1] = cq[b] + sq[b];
      ck[b + 1] = ck[b] + sk[b];
    }
  const int TB = var ? 1 : c.B;                  // tensor batch
  const int64_t TQ = var ? cq[c.B] : c.Sq;       // tensor rows of q (total_q when packed)
  const int64_t TK = var ? ck[c.B] : c.Sk;       // tensor rows of k
  // Tensor coordinates (tensor batch, row) of query i / key j of sequence b.
  const auto qb = [&](int b) { return var ? 0 : b; };
  const auto qr = [&](int b, int64_t i) { return var ? cq[b] + i : i; };
  const auto kr = [&](int b, int64_t j) { return var ? ck[b] + j : j; };

  // Packed tensors are (total, H, d): (B, S, H, D) storage with one batch.
  Tensor4<Elem> q(TB, c.Hq, TQ, c.d, pad, var, nan_pattern<Elem>());
  Tensor4<Elem> k(TB, c.Hk, TK, c.d, pad + 8, var || c.kv_bshd, nan_pattern<Elem>());
  Tensor4<Elem> v(TB, c.Hk, TK, c.d, pad, var || c.kv_bshd, nan_pattern<Elem>());
  Tensor4<Elem> dout(TB, c.Hq, TQ, c.d, pad, true, nan_pattern<Elem>());
  auto fill = [&](Tensor4<Elem>& t, double sd) {
    for (int64_t b = 0; b < t.B; ++b)
      for (int64_t h = 0; h < t.H; ++h)
        for (int64_t s = 0; s < t.S_; ++s)
          for (int64_t x = 0; x < t.D; ++x) t.at(b, h, s, x) = from_d<Elem>(sd * nd(rng));
  };
  fill(q, c.qmul);
  fill(k, 1.0);
  fill(v, 1.0);
  fill(dout, 1.0);
  if (c.nan_inputs) {  // sequence 0, head 1, row 5, column 3; the last sequence's key 100 (or its last) of kv head 0
    q.at(qb(0), std::min(1, c.Hq - 1), qr(0, std::min<int64_t>(5, sq[0] - 1)), std::min(3, c.d - 1)) = nan_pattern<Elem>();
    k.at(qb(c.B - 1), 0, kr(c.B - 1, std::min<int64_t>(100, sk[c.B - 1] - 1)), std::min(7, c.d - 1)) = nan_pattern<Elem>();
  }
  const size_t nrow = static_cast<size_t>(TB) * c.Hq * TQ;  // rows of lse: (B, Hq, Sq) or (Hq, total_q)
  const auto lrow = [&](int b, int h, int64_t i) { return (static_cast<size_t>(qb(b)) * c.Hq + h) * TQ + qr(b, i); };
  std::vector<Lse> dlse(nrow);
  for (auto& x : dlse) x = static_cast<Lse>(0.5 * nd(rng));
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.d)) * 1.3;
  std::vector<float> slopes;
  const int slope_rows = c.alibi == 2 ? c.B : 1;
  for (int i = 0; i < slope_rows * c.Hq; ++i) slopes.push_back(static_cast<float>(0.03 + 0.05 * (i % 5) + 0.01 * i));

  Layout L{};
  if (c.bq) L = make_layout(c, rng);
  auto sees = [&](int b, int h, int64_t i, int64_t j) {
    const int64_t dd = j - i - (sk[b] - sq[b]);
    if (c.left >= 0 && dd < -c.left) return false;
    if (c.right >= 0 && dd > c.right) return false;
    return !c.bq || L.at(L.Bm == 1 ? 0 : b, h, static_cast<int>(i / c.bq), static_cast<int>(j / c.bk)) != 0;
  };

  // Reference, indexed like the tensors: out / dq (TB, Hq, TQ, d), dk / dv (TB, Hk, TK, d), lse (TB, Hq, TQ).
  Ref R;
  const auto qi = [&](int b, int64_t h, int64_t i) { return ((qb(b) * c.Hq + h) * TQ + qr(b, i)) * c.d; };
  const auto ki = [&](int b, int64_t h, int64_t j) { return ((qb(b) * c.Hk + h) * TK + kr(b, j)) * c.d; };
  R.o.assign(nrow * c.d, 0);
  R.dq.assign(nrow * c.d, 0);
  R.lse.assign(nrow, -INFINITY);
  R.dk.assign(static_cast<size_t>(TB) * c.Hk * TK * c.d, 0);
  R.dv.assign(R.dk.size(), 0);
  R.row_sees.assign(nrow, 0);
  R.key_seen.assign(static_cast<size_t>(TB) * c.Hk * TK, 0);
  // (tensor batch, head) slices of dq and of dk / dv that a NaN reaches (the heads of the rows that see one).
  std::vector<uint8_t> nan_q(static_cast<size_t>(TB) * c.Hq, 0), nan_kv(static_cast<size_t>(TB) * c.Hk, 0);
  for (int b = 0; b < c.B; ++b)
    for (int h = 0; h < c.Hq; ++h) {
      const int hk = h / G;
      const double slope = c.alibi ? slopes[(c.alibi == 2 ? b : 0) * c.Hq + h] : 0.0;
      for (int64_t i = 0; i < sq[b]; ++i) {
        const int64_t tq = qr(b, i);
        std::vector<double> s(sk[b], -INFINITY), pr(sk[b], 0.0), dp(sk[b], 0.0), gm(sk[b], 1.0);
        double mx = -INFINITY;
        bool nan_row = false;
        for (int64_t j = 0; j < sk[b]; ++j) {
          if (!sees(b, h, i, j)) continue;
          double a = 0;
          for (int x = 0; x < c.d; ++x) a += to_d(q.at(qb(b), h, tq, x)) * to_d(k.at(qb(b), hk, kr(b, j), x));
          double x = a * scale;
          if (c.softcap > 0) {
            const double t = std::tanh(x / c.softcap);
            x = c.softcap * t;
            gm[j] = 1 - t * t;
          }
          s[j] = x - slope * std::fabs(static_cast<double>(i + sk[b] - sq[b] - j));
          nan_row |= std::isnan(s[j]);
          mx = std::max(mx, s[j]);
        }
        if (nan_row) {  // out and lse NaN; gradients of this head and its kv head are checked loosely
          const size_t row = lrow(b, h, i);
          R.row_sees[row] = 1;
          R.lse[row] = NAN;
          for (int x = 0; x < c.d; ++x) R.o[qi(b, h, i) + x] = NAN;
          nan_q[static_cast<size_t>(qb(b)) * c.Hq + h] = 1;
          nan_kv[static_cast<size_t>(qb(b)) * c.Hk + hk] = 1;
          continue;
        }
        if (mx == -INFINITY) continue;
        const size_t row = lrow(b, h, i);
        R.row_sees[row] = 1;
        double l = 0;
        for (int64_t j = 0; j < sk[b]; ++j)
          if (s[j] > -INFINITY) l += std::exp(s[j] - mx);
        R.lse[row] = mx + std::log(l);
        for (int64_t j = 0; j < sk[b]; ++j) {
          if (s[j] == -INFINITY) continue;
          pr[j] = std::exp(s[j] - mx) / l;
          R.key_seen[(static_cast<size_t>(qb(b)) * c.Hk + hk) * TK + kr(b, j)] = 1;
          for (int x = 0; x < c.d; ++x) {
            R.o[qi(b, h, i) + x] += pr[j] * to_d(v.at(qb(b), hk, kr(b, j), x));
            dp[j] += to_d(dout.at(qb(b), h, tq, x)) * to_d(v.at(qb(b), hk, kr(b, j), x));
          }
        }
        double delta = 0;
        for (int x = 0; x < c.d; ++x) delta += to_d(dout.at(qb(b), h, tq, x)) * R.o[qi(b, h, i) + x];
        const double dl = c.dlse ? to_d(dlse[row]) : 0.0;
        for (int64_t j = 0; j < sk[b]; ++j) {
          if (pr[j] == 0) continue;
          const double ds = pr[j] * (dp[j] - delta + dl) * gm[j];
          for (int x = 0; x < c.d; ++x) {
            R.dq[qi(b, h, i) + x] += scale * ds * to_d(k.at(qb(b), hk, kr(b, j), x));
            R.dk[ki(b, hk, j) + x] += scale * ds * to_d(q.at(qb(b), h, tq, x));
            R.dv[ki(b, hk, j) + x] += pr[j] * to_d(dout.at(qb(b), h, tq, x));
          }
        }
      }
    }
  // Tensor coordinates (tensor batch, head, row) -> whether the row sees nothing / the key is seen by nobody.
  const auto row_empty = [&](int64_t b, int64_t h, int64_t s) {
    return !R.row_sees[(static_cast<size_t>(b) * c.Hq + h) * TQ + s];
  };
  const auto key_unseen = [&](int64_t b, int64_t h, int64_t s) {
    return !R.key_seen[(static_cast<size_t>(b) * c.Hk + h) * TK + s];
  };

  // Parameters shared by both passes.
  AttnParams p;
  p.q = q.buf.data();
  p.k = k.buf.data();
  p.v = v.buf.data();
  p.batch = c.B;
  p.hq = c.Hq;
  p.hk = c.Hk;
  p.sq = c.Sq;
  p.sk = c.Sk;
  p.d = c.d;
  p.q_st = q.st;
  p.k_st = k.st;
  p.v_st = v.st;
  p.scale = scale;
  p.window_left = c.left;
  p.window_right = c.right;
  p.softcap = c.softcap;
  std::vector<int32_t> cu_q(cq.begin(), cq.end()), cu_k(ck.begin(), ck.end());
  if (var) {
    p.q_st.b = p.k_st.b = p.v_st.b = 0;  // packed tensors come with batch stride 0
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
    p.total_q = TQ;
    p.total_k = TK;
  }
  if (c.alibi) {
    p.alibi = slopes.data();
    p.alibi_b = c.alibi == 2 ? c.Hq : 0;
  }
  const int64_t lse_b = var ? 0 : static_cast<int64_t>(c.Hq) * TQ;
#ifdef EMU_SM90
  const TileShape tiles = sm90_tiles(kHD);
#else
  const TileShape tiles = kTc ? tc_tiles(kHD) : kGenericTiles;
#endif
  Lists fkv, bkv, bq;
  if (c.bq) {
    p.sparse = true;
    p.layout.p = L.v.data();
    p.layout.sb = L.Bm == 1 ? 0 : static_cast<int64_t>(L.Hm) * L.nqb * L.nkb;
    p.layout.sh = static_cast<int64_t>(L.nqb) * L.nkb;
    p.layout.sr = L.nkb;
    p.layout.bq = c.bq;
    p.layout.bk = c.bk;
    fkv = tile_lists(L, tiles.fwd_tq, tiles.fwd_tk, false);
    bkv = tile_lists(L, tiles.bwd_tq, tiles.bwd_tk, false);
    bq = tile_lists(L, tiles.bwd_tq, tiles.bwd_tk, true);
  }
  auto register_inputs = [&] {
    emu::clear_regions();
    emu::add_region("q", q.buf.data(), q.buf.size() * sizeof(Elem), false);
    emu::add_region("k", k.buf.data(), k.buf.size() * sizeof(Elem), false);
    emu::add_region("v", v.buf.data(), v.buf.size() * sizeof(Elem), false);
  };

  // Forward.
  Tensor4<Elem> o(TB, c.Hq, TQ, c.d, pad, var, sentinel<Elem>());
  Tensor4<Lse> lse(TB, c.Hq, TQ, 1, 0, false, sentinel<Lse>());
  {
    AttnParams f = p;
    f.o = o.buf.data();
    f.o_st = o.st;
    if (var) f.o_st.b = 0;
    f.lse = lse.buf.data();
    f.lse_b = lse_b;
    f.lse_h = TQ;
    if (c.bq) {
      f.list_tq = tiles.fwd_tq;
      f.list_tk = tiles.fwd_tk;
      f.kv_list = as_tile_list(fkv, L);
    }
    register_inputs();
    emu::add_region("o", o.buf.data(), o.buf.size() * sizeof(Elem), true);
    emu::add_region("lse", lse.buf.data(), lse.buf.size() * sizeof(Lse), true);
    const long e0 = emu::g_errors.load();
    std::string thrown;
    try {
#ifdef EMU_GENERIC
      generic_fwd(f, sizeof(Elem) == 4 ? DType::f32 : DType::f64, nullptr);
#elif defined(EMU_SM90)
      sm90_fwd_run<Elem, kHD>(f, nullptr);
#else
      tc_fwd_run<Elem, kHD>(f, nullptr);
#endif
    } catch (const std::exception& e) {
      thrown = e.what();
    }
    std::vector<std::pair<const char*, Stats>> parts{{"out", {}}, {"lse", {}}};
    compare(parts[0].second, o, R.o, "out", row_empty);
    // lse: -inf exactly where the row sees nothing; compare the others in absolute terms.
    Stats& ls = parts[1].second;
    for (size_t r = nrow; r < lse.buf.size(); ++r)
      if (!same_bits(lse.buf[r], sentinel<Lse>())) ls.fail("lse written past its end");
    for (size_t r = 0; r < nrow; ++r) {
      const double g = to_d(lse.buf[r]), w = R.lse[r];
      if (same_bits(lse.buf[r], sentinel<Lse>())) {
        ls.fail("lse[" + std::to_string(r) + "] never written");
      } else if (!R.row_sees[r]) {
        if (!(std::isinf(g) && g < 0)) ls.fail("lse of a row that sees nothing = " + std::to_string(g) + ", want -inf");
      } else if (std::isnan(w)) {
        if (!std::isnan(g)) ls.fail("lse[" + std::to_string(r) + "] = " + std::to_string(g) + ", want NaN (the row sees a NaN)");
      } else if (!std::isfinite(g)) {
        ls.fail("lse non-finite for a row that sees keys");
      } else {
        ls.err = std::max(ls.err, std::fabs(g - w));
        ls.ref_max = std::max(ls.ref_max, std::max(1.0, std::fabs(w)));
      }
    }
    report(tot, c, "forward", parts, emu::g_errors.load() - e0, thrown);
  }

  // Backward: atomic dQ (tensor cores only; sm80 two-atomic path or sm90 vector atomic alternating by
  // seed) and deterministic dQ.
  const int modes = kTc ? 2 : 1;
  for (int mode = 0; mode < modes; ++mode) {
    const bool deterministic = !kTc || mode == 1;
    AttnParams g = p;
    Tensor4<Elem> dq(TB, c.Hq, TQ, c.d, pad, var, sentinel<Elem>());
    Tensor4<Elem> dk(TB, c.Hk, TK, c.d, pad, var || c.kv_bshd, sentinel<Elem>());
    Tensor4<Elem> dv(TB, c.Hk, TK, c.d, pad, var || c.kv_bshd, sentinel<Elem>());
    std::vector<Lse> delta(nrow + 8, sentinel<Lse>());
    // dq_accum (params.h): (B, Hq, Sq padded to the backward query tile, HD), or (Hq, total_q, HD) packed.
    const int64_t rows_pad = !kTc ? 0 : var ? TQ : cdiv(c.Sq, tiles.bwd_tq) * tiles.bwd_tq;
    std::vector<float> dq_accum(kTc ? static_cast<size_t>(TB) * c.Hq * rows_pad * kHD : 0, 0.f);
    g.o = o.buf.data();
    g.o_st = o.st;
    g.lse = lse.buf.data();
    g.lse_b = lse_b;
    g.lse_h = TQ;
    g.dout = dout.buf.data();
    g.do_st = dout.st;
    g.dlse = c.dlse ? dlse.data() : nullptr;
    g.dq = dq.buf.data();
    g.dk = dk.buf.data();
    g.dv = dv.buf.data();
    g.dq_st = dq.st;
    g.dk_st = dk.st;
    g.dv_st = dv.st;
    if (var) g.o_st.b = g.do_st.b = g.dq_st.b = g.dk_st.b = g.dv_st.b = 0;
    g.delta = delta.data();
    g.deterministic = deterministic;
    if (!deterministic) {
      g.dq_accum = dq_accum.data();
      g.dqa_h = rows_pad * kHD;
      g.dqa_b = var ? 0 : c.Hq * g.dqa_h;
      g.dqa_s = kHD;
    }
    if (c.bq) {
      g.list_tq = tiles.bwd_tq;
      g.list_tk = tiles.bwd_tk;
      g.kv_list = as_tile_list(bkv, L);
      g.q_list = as_tile_list(bq, L);
    }
    register_inputs();
    emu::add_region("out", o.buf.data(), o.buf.size() * sizeof(Elem), false);
    emu::add_region("lse", lse.buf.data(), lse.buf.size() * sizeof(Lse), false);
    emu::add_region("dout", dout.buf.data(), dout.buf.size() * sizeof(Elem), false);
    emu::add_region("delta", delta.data(), delta.size() * sizeof(Lse), true);
    if (!deterministic) emu::add_region("dq_accum", dq_accum.data(), dq_accum.size() * sizeof(float), true);
    // The outputs (written by TMA stores in the Hopper kernels, which check their targets against these).
    emu::add_region("dq", dq.buf.data(), dq.buf.size() * sizeof(Elem), true);
    emu::add_region("dk", dk.buf.data(), dk.buf.size() * sizeof(Elem), true);
    emu::add_region("dv", dv.buf.data(), dv.buf.size() * sizeof(Elem), true);
    const int sm_saved = emu::g_cfg.sm;
#ifdef EMU_SM90
    if (!deterministic) emu::g_cfg.sm = 90;  // sm_90a code: the float2 atomic of red_add_f32x2
#else
    if (!deterministic) emu::g_cfg.sm = (seed & 1) ? 90 : 80;
#endif
    const long e0 = emu::g_errors.load();
    std::string thrown;
    try {
#ifdef EMU_GENERIC
      generic_bwd(g, sizeof(Elem) == 4 ? DType::f32 : DType::f64, nullptr);
#elif defined(EMU_SM90)
      sm90_bwd_run<Elem, kHD>(g, nullptr);
#else
      tc_bwd_run<Elem, kHD>(g, nullptr);
#endif
    } catch (const std::exception& e) {
      thrown = e.what();
    }
    emu::g_cfg.sm = sm_saved;
    std::vector<std::pair<const char*, Stats>> parts{{"dq", {}}, {"dk", {}}, {"dv", {}}};
    const auto loose_q = [&](int64_t b, int64_t h) { return nan_q[b * c.Hq + h] != 0; };
    const auto loose_kv = [&](int64_t b, int64_t h) { return nan_kv[b * c.Hk + h] != 0; };
    compare(parts[0].second, dq, R.dq, "dq", row_empty, loose_q);
    compare(parts[1].second, dk, R.dk, "dk", key_unseen, loose_kv);
    compare(parts[2].second, dv, R.dv, "dv", key_unseen, loose_kv);
    if (c.nan_inputs)
      for (auto& [name, st] : parts)
        if (st.nans == 0) st.fail(std::string("no NaN in the ") + name + " of the heads a NaN input reaches");
    for (size_t i = nrow; i < delta.size(); ++i)
      if (!same_bits(delta[i], sentinel<Lse>())) parts[0].second.fail("delta written past its end");
    for (int64_t b = 0; b < TB && !deterministic; ++b)
      for (int64_t h = 0; h < c.Hq; ++h)
        for (int64_t s = 0; s < rows_pad; ++s)
          for (int64_t x = 0; x < kHD; ++x)
            if ((s >= TQ || x >= c.d) && dq_accum[((b * c.Hq + h) * rows_pad + s) * kHD + x] != 0.f) {
              parts[0].second.fail("dq_accum written outside rows < Sq, columns < d");
              b = TB;
              h = c.Hq;
              s = rows_pad;
              break;
            }
    char pass[32];
    std::snprintf(pass, sizeof pass, "%s", deterministic ? (kTc ? "bwd-det" : "backward")
                                                         : emu::g_cfg.sm >= 90 || (seed & 1) ? "bwd-sm90" : "bwd-sm80");
    report(tot, c, pass, parts, emu::g_errors.load() - e0, thrown);
  }
}

#ifndef EMU_SM90  // the decode kernel is an mma.sync / generic kernel on every GPU
#include "emu_decode.h"
#endif

int main(int argc, char** argv) {
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--order" && i + 1 < argc) {
      const std::string o = argv[++i];
      emu::g_cfg.order = o == "fwd" ? emu::Order::serial_fwd : o == "rev" ? emu::Order::serial_rev
                         : o == "free" ? emu::Order::free : emu::Order::serial_random;
    } else if (a == "--eager") {
      emu::g_cfg.eager_copy = true;
    } else if (a == "--seed" && i + 1 < argc) {
      emu::g_cfg.seed = static_cast<unsigned>(std::stoul(argv[++i]));
    } else if (a == "-v") {
      emu::g_cfg.verbose = 1;
    } else {
      filter = a;
    }
  }
#ifdef EMU_SM90
  emu::g_cfg.max_smem = 232448;  // sm90's opt-in limit (227 KB)
  emu::g_cfg.track_s90 = true;
  emu::g_cfg.sm = 90;
#endif
  Totals tot;
  const auto cs = cases(kHD);
  for (size_t i = 0; i < cs.size(); ++i)
    if (filter.empty() || cs[i].name.find(filter) != std::string::npos)
      run_case(cs[i], emu::g_cfg.seed * 1000u + static_cast<unsigned>(i), tot);
#ifndef EMU_SM90
  const auto ds = decode_cases();
  for (size_t i = 0; i < ds.size(); ++i)
    if (filter.empty() || ds[i].name.find(filter) != std::string::npos)
      run_decode_case(ds[i], emu::g_cfg.seed * 1000u + 500u + static_cast<unsigned>(i), tot);
#endif
  std::printf("%d passed, %d failed\n", tot.passed, tot.failed);
  return tot.failed ? 1 : 0;
}
