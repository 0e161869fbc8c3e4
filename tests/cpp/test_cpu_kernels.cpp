// Standalone test of the CPU kernels (csrc/cpu) in fp64 against a naive O(Sq * Sk) fp64 attention written
// here from the rule in the README ("Which key a query sees") (not from mask.h, so the two can disagree and the test can fail).
// Builds AttnParams itself, links libtorch only for ATen's parallel_for and cpublas; no torch tensors.
// Prints one line per case and "N passed, N failed"; exit status 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "params.h"

using fused_attn::AttnParams;
using fused_attn::DType;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Case {
  std::string name;
  int64_t b = 1, hq = 1, hk = 1, sq = 1, sk = 1, d = 8;
  int64_t left = -1, right = -1;
  // Block-sparse: layout block (bq, bk); list granularity = (gq * bq, gk * bk); layout_batch 1 = broadcast.
  bool sparse = false;
  int64_t bq = 16, bk = 16, gq = 1, gk = 1, layout_batch = 0;
  double density = 0.5;
  bool bshd = false;  // q/k/v/o/grads stored as (B, S, H, D) instead of (B, H, S, D)
  double scale = 0;   // 0: 1/sqrt(D)
};

struct Layout {
  int64_t nqb = 0, nkb = 0, bm = 0, h = 0;
  std::vector<uint8_t> m;
  bool at(int64_t b, int64_t h_, int64_t qb, int64_t kb) const {
    return m[((b % bm) * h + h_) * nqb * nkb + qb * nkb + kb] != 0;
  }
};

// The rule, written from the spec: 0 <= j < Sk, i + (Sk-Sq) - left <= j <= i + (Sk-Sq) + right, layout.
bool ref_visible(const Case& c, const Layout* lay, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (j < 0 || j >= c.sk) return false;
  const int64_t off = c.sk - c.sq;
  if (c.left >= 0 && j < i + off - c.left) return false;
  if (c.right >= 0 && j > i + off + c.right) return false;
  if (lay && !lay->at(b, h, i / c.bq, j / c.bk)) return false;
  return true;
}

// Dense (B, H, S, D) tensor in a chosen memory order.
struct Tensor {
  int64_t b, h, s, d;
  fused_attn::Strides st;
  std::vector<double> data;
  Tensor(int64_t b_, int64_t h_, int64_t s_, int64_t d_, bool bshd) : b(b_), h(h_), s(s_), d(d_) {
    if (bshd) {
      st.b = s * h * d;
      st.s = h * d;
      st.h = d;
    } else {
      st.b = h * s * d;
      st.h = s * d;
      st.s = d;
    }
    data.assign(b * h * s * d, std::nan(""));
  }
  double& at(int64_t bi, int64_t hi, int64_t si, int64_t di) { return data[st.at(bi, hi, si) + di]; }
  double at(int64_t bi, int64_t hi, int64_t si, int64_t di) const { return data[st.at(bi, hi, si) + di]; }
};

void fill_random(Tensor& t, std::mt19937_64& rng, double amp) {
  std::uniform_real_distribution<double> u(-amp, amp);
  for (int64_t bi = 0; bi < t.b; ++bi)
    for (int64_t hi = 0; hi < t.h; ++hi)
      for (int64_t si = 0; si < t.s; ++si)
        for (int64_t di = 0; di < t.d; ++di) t.at(bi, hi, si, di) = u(rng);
}

// Kernel-granularity tile lists, built here from the layout. Entry kt when every element of the tile the
// layout allows, -kt-1 when only some, absent when none.
struct Lists {
  std::vector<int32_t> kv_cnt, kv_idx, q_cnt, q_idx;
  int64_t nqt = 0, nkt = 0;
};

Lists build_lists(const Case& c, const Layout& lay) {
  Lists L;
  const int64_t tq = c.gq * c.bq, tk = c.gk * c.bk;
  L.nqt = (c.sq + tq - 1) / tq;
  L.nkt = (c.sk + tk - 1) / tk;
  const int64_t bm = lay.bm;
  L.kv_cnt.assign(bm * c.hq * L.nqt, 0);
  L.kv_idx.assign(bm * c.hq * L.nqt * L.nkt, 0);
  L.q_cnt.assign(bm * c.hq * L.nkt, 0);
  L.q_idx.assign(bm * c.hq * L.nkt * L.nqt, 0);
  auto tile_state = [&](int64_t b, int64_t h, int64_t qt, int64_t kt) {  // 0 none, 1 some, 2 all
    int64_t allowed = 0, total = 0;
    for (int64_t qb = qt * c.gq; qb < std::min((qt + 1) * c.gq, lay.nqb); ++qb)
      for (int64_t kb = kt * c.gk; kb < std::min((kt + 1) * c.gk, lay.nkb); ++kb) {
        ++total;
        allowed += lay.at(b, h, qb, kb);
      }
    return allowed == 0 ? 0 : (allowed == total ? 2 : 1);
  };
  for (int64_t b = 0; b < bm; ++b)
    for (int64_t h = 0; h < c.hq; ++h) {
      for (int64_t qt = 0; qt < L.nqt; ++qt)
        for (int64_t kt = 0; kt < L.nkt; ++kt) {
          const int s = tile_state(b, h, qt, kt);
          if (!s) continue;
          const int64_t r = (b * c.hq + h) * L.nqt + qt;
          L.kv_idx[r * L.nkt + L.kv_cnt[r]++] = s == 2 ? int32_t(kt) : int32_t(-kt - 1);
        }
      for (int64_t kt = 0; kt < L.nkt; ++kt)
        for (int64_t qt = 0; qt < L.nqt; ++qt) {
          const int s = tile_state(b, h, qt, kt);
          if (!s) continue;
          const int64_t r = (b * c.hq + h) * L.nkt + kt;
          L.q_idx[r * L.nqt + L.q_cnt[r]++] = s == 2 ? int32_t(qt) : int32_t(-qt - 1);
        }
    }
  return L;
}

struct RefOut {
  Tensor o, dq, dk, dv;
  std::vector<double> lse;
};

RefOut reference(const Case& c, const Layout* lay, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& dout, double scale) {
  RefOut r{Tensor(c.b, c.hq, c.sq, c.d, false), Tensor(c.b, c.hq, c.sq, c.d, false),
           Tensor(c.b, c.hk, c.sk, c.d, false), Tensor(c.b, c.hk, c.sk, c.d, false), {}};
  std::fill(r.o.data.begin(), r.o.data.end(), 0.0);
  std::fill(r.dq.data.begin(), r.dq.data.end(), 0.0);
  std::fill(r.dk.data.begin(), r.dk.data.end(), 0.0);
  std::fill(r.dv.data.begin(), r.dv.data.end(), 0.0);
  r.lse.assign(c.b * c.hq * c.sq, -kInf);
  const int64_t grp = c.hq / c.hk;
  std::vector<double> s(c.sk), pr(c.sk), dp(c.sk);
  for (int64_t b = 0; b < c.b; ++b)
    for (int64_t h = 0; h < c.hq; ++h) {
      const int64_t kh = h / grp;
      for (int64_t i = 0; i < c.sq; ++i) {
        double mx = -kInf;
        for (int64_t j = 0; j < c.sk; ++j) {
          s[j] = -kInf;
          if (!ref_visible(c, lay, b, h, i, j)) continue;
          double acc = 0;
          for (int64_t e = 0; e < c.d; ++e) acc += q.at(b, h, i, e) * k.at(b, kh, j, e);
          s[j] = scale * acc;
          mx = std::max(mx, s[j]);
        }
        if (mx == -kInf) continue;  // sees nothing: o 0, lse -inf, no gradient
        double sum = 0;
        for (int64_t j = 0; j < c.sk; ++j) sum += (pr[j] = std::exp(s[j] - mx));
        r.lse[(b * c.hq + h) * c.sq + i] = mx + std::log(sum);
        for (int64_t j = 0; j < c.sk; ++j) pr[j] /= sum;
        for (int64_t e = 0; e < c.d; ++e) {
          double acc = 0;
          for (int64_t j = 0; j < c.sk; ++j) acc += pr[j] * v.at(b, kh, j, e);
          r.o.at(b, h, i, e) = acc;
        }
        double delta = 0;
        for (int64_t j = 0; j < c.sk; ++j) {
          double acc = 0;
          for (int64_t e = 0; e < c.d; ++e) acc += dout.at(b, h, i, e) * v.at(b, kh, j, e);
          dp[j] = acc;
          delta += pr[j] * acc;
        }
        for (int64_t j = 0; j < c.sk; ++j) {
          if (pr[j] == 0) continue;
          const double ds = pr[j] * (dp[j] - delta);
          for (int64_t e = 0; e < c.d; ++e) {
            r.dv.at(b, kh, j, e) += pr[j] * dout.at(b, h, i, e);
            r.dq.at(b, h, i, e) += scale * ds * k.at(b, kh, j, e);
            r.dk.at(b, kh, j, e) += scale * ds * q.at(b, h, i, e);
          }
        }
      }
    }
  return r;
}

// Max |a - b| over the tensor relative to max(1, max |b|); NaN anywhere counts as failure.
double rel_err(const Tensor& a, const Tensor& b) {
  double err = 0, mag = 1;
  for (int64_t bi = 0; bi < a.b; ++bi)
    for (int64_t hi = 0; hi < a.h; ++hi)
      for (int64_t si = 0; si < a.s; ++si)
        for (int64_t di = 0; di < a.d; ++di) {
          const double x = a.at(bi, hi, si, di), y = b.at(bi, hi, si, di);
          if (std::isnan(x)) return kInf;
          err = std::max(err, std::fabs(x - y));
          mag = std::max(mag, std::fabs(y));
        }
  return err / mag;
}

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("  FAIL %s\n", what.c_str());
  }
}

void run_case(const Case& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const double scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(double(c.d));
  Tensor q(c.b, c.hq, c.sq, c.d, c.bshd), k(c.b, c.hk, c.sk, c.d, c.bshd), v(c.b, c.hk, c.sk, c.d, c.bshd);
  Tensor dout(c.b, c.hq, c.sq, c.d, c.bshd);
  fill_random(q, rng, 2.0);
  fill_random(k, rng, 2.0);
  fill_random(v, rng, 1.0);
  fill_random(dout, rng, 1.0);

  Layout lay;
  Lists lists;
  if (c.sparse) {
    lay.nqb = (c.sq + c.bq - 1) / c.bq;
    lay.nkb = (c.sk + c.bk - 1) / c.bk;
    lay.bm = c.layout_batch > 0 ? c.layout_batch : c.b;
    lay.h = c.hq;
    std::bernoulli_distribution keep(c.density);
    lay.m.resize(lay.bm * lay.h * lay.nqb * lay.nkb);
    for (auto& x : lay.m) x = keep(rng) ? 1 : 0;
    // Make the first query block of head 0 see nothing, so empty rows are always exercised.
    for (int64_t kb = 0; kb < lay.nkb; ++kb) lay.m[kb] = 0;
    lists = build_lists(c, lay);
  }

  Tensor o(c.b, c.hq, c.sq, c.d, c.bshd), dq(c.b, c.hq, c.sq, c.d, c.bshd);
  Tensor dk(c.b, c.hk, c.sk, c.d, c.bshd), dv(c.b, c.hk, c.sk, c.d, c.bshd);
  std::vector<double> lse(c.b * c.hq * c.sq, std::nan("")), delta(c.b * c.hq * c.sq, std::nan(""));

  AttnParams p;
  p.q = q.data.data();
  p.k = k.data.data();
  p.v = v.data.data();
  p.o = o.data.data();
  p.lse = lse.data();
  p.dout = dout.data.data();
  p.dq = dq.data.data();
  p.dk = dk.data.data();
  p.dv = dv.data.data();
  p.delta = delta.data();
  p.batch = c.b;
  p.hq = c.hq;
  p.hk = c.hk;
  p.sq = c.sq;
  p.sk = c.sk;
  p.d = c.d;
  p.q_st = q.st;
  p.k_st = k.st;
  p.v_st = v.st;
  p.o_st = o.st;
  p.do_st = dout.st;
  p.dq_st = dq.st;
  p.dk_st = dk.st;
  p.dv_st = dv.st;
  p.lse_b = c.hq * c.sq;
  p.lse_h = c.sq;
  p.scale = scale;
  p.window_left = c.left;
  p.window_right = c.right;
  p.deterministic = true;
  if (c.sparse) {
    p.sparse = true;
    p.list_tq = c.gq * c.bq;
    p.list_tk = c.gk * c.bk;
    const int64_t bstride = lay.bm == 1 && c.b > 1 ? 0 : 1;
    p.kv_list.cnt = lists.kv_cnt.data();
    p.kv_list.idx = lists.kv_idx.data();
    p.kv_list.cnt_h = lists.nqt;
    p.kv_list.cnt_b = bstride * c.hq * lists.nqt;
    p.kv_list.idx_r = lists.nkt;
    p.kv_list.idx_h = lists.nqt * lists.nkt;
    p.kv_list.idx_b = bstride * c.hq * lists.nqt * lists.nkt;
    p.q_list.cnt = lists.q_cnt.data();
    p.q_list.idx = lists.q_idx.data();
    p.q_list.cnt_h = lists.nkt;
    p.q_list.cnt_b = bstride * c.hq * lists.nkt;
    p.q_list.idx_r = lists.nqt;
    p.q_list.idx_h = lists.nkt * lists.nqt;
    p.q_list.idx_b = bstride * c.hq * lists.nkt * lists.nqt;
    p.layout.p = lay.m.data();
    p.layout.sr = lay.nkb;
    p.layout.sh = lay.nqb * lay.nkb;
    p.layout.sb = bstride * lay.h * lay.nqb * lay.nkb;
    p.layout.bq = c.bq;
    p.layout.bk = c.bk;
  }

  std::printf("%s: B%lld Hq%lld Hk%lld Sq%lld Sk%lld D%lld window(%lld,%lld)%s%s\n", c.name.c_str(),
              (long long)c.b, (long long)c.hq, (long long)c.hk, (long long)c.sq, (long long)c.sk,
              (long long)c.d, (long long)c.left, (long long)c.right, c.sparse ? " sparse" : "",
              c.bshd ? " bshd" : "");

  std::string err;
  try {
    fused_attn::cpu_fwd(p, DType::f64);
    fused_attn::cpu_bwd(p, DType::f64);
  } catch (const std::exception& e) {
    check(false, c.name + ": threw " + e.what());
    return;
  }

  const RefOut r = reference(c, c.sparse ? &lay : nullptr, q, k, v, dout, scale);
  const double tol = 1e-10;
  int64_t empty_rows = 0;
  bool lse_ok = true;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (r.lse[i] == -kInf) {
      ++empty_rows;
      lse_ok &= lse[i] == -kInf;
    } else {
      lse_ok &= std::fabs(lse[i] - r.lse[i]) <= tol * std::max(1.0, std::fabs(r.lse[i]));
    }
  }
  const double eo = rel_err(o, r.o), edq = rel_err(dq, r.dq), edk = rel_err(dk, r.dk), edv = rel_err(dv, r.dv);
  std::printf("  rows seeing nothing %lld; rel err o %.2e dq %.2e dk %.2e dv %.2e\n", (long long)empty_rows, eo,
              edq, edk, edv);
  check(lse_ok, c.name + ": lse");
  check(eo <= tol, c.name + ": out");
  check(edq <= tol, c.name + ": dq");
  check(edk <= tol, c.name + ": dk");
  check(edv <= tol, c.name + ": dv");

  // Determinism: a second backward gives the same bits.
  Tensor dq2 = dq, dk2 = dk, dv2 = dv;
  p.dq = dq2.data.data();
  p.dk = dk2.data.data();
  p.dv = dv2.data.data();
  fused_attn::cpu_bwd(p, DType::f64);
  check(std::memcmp(dq.data.data(), dq2.data.data(), dq.data.size() * sizeof(double)) == 0 &&
            std::memcmp(dk.data.data(), dk2.data.data(), dk.data.size() * sizeof(double)) == 0 &&
            std::memcmp(dv.data.data(), dv2.data.data(), dv.data.size() * sizeof(double)) == 0,
        c.name + ": deterministic backward");
}

}  // namespace

int main() {
  std::vector<Case> cases;
  auto add = [&](const std::string& name, std::function<void(Case&)> f) {
    Case c;
    c.name = name;
    f(c);
    cases.push_back(c);
  };
  add("dense", [](Case& c) { c.b = 2; c.hq = c.hk = 3; c.sq = c.sk = 97; c.d = 40; });
  add("dense_long", [](Case& c) { c.hq = c.hk = 2; c.sq = c.sk = 300; c.d = 64; });
  add("dense_seq1", [](Case& c) { c.hq = c.hk = 2; c.sq = 1; c.sk = 1; c.d = 59; });
  add("causal", [](Case& c) { c.b = 2; c.hq = c.hk = 2; c.sq = c.sk = 200; c.d = 33; c.right = 0; });
  add("window", [](Case& c) { c.hq = c.hk = 2; c.sq = c.sk = 257; c.d = 16; c.left = 40; c.right = 7; });
  add("window_narrow", [](Case& c) { c.hq = c.hk = 1; c.sq = c.sk = 200; c.d = 8; c.left = 0; c.right = 0; });
  add("sq_lt_sk_causal", [](Case& c) { c.hq = c.hk = 2; c.sq = 70; c.sk = 230; c.d = 24; c.right = 0; });
  add("sq_gt_sk_causal", [](Case& c) { c.hq = c.hk = 2; c.sq = 230; c.sk = 70; c.d = 24; c.right = 0; });
  add("sq_gt_sk_dense", [](Case& c) { c.hq = c.hk = 1; c.sq = 150; c.sk = 37; c.d = 20; });
  add("gqa", [](Case& c) { c.b = 2; c.hq = 6; c.hk = 2; c.sq = c.sk = 150; c.d = 32; });
  add("gqa_causal_mqa", [](Case& c) { c.hq = 4; c.hk = 1; c.sq = 130; c.sk = 180; c.d = 16; c.right = 0; });
  add("strided_bshd", [](Case& c) { c.b = 2; c.hq = 4; c.hk = 2; c.sq = c.sk = 120; c.d = 24; c.right = 0; c.bshd = true; });
  add("sparse", [](Case& c) { c.b = 2; c.hq = c.hk = 2; c.sq = c.sk = 160; c.d = 16; c.sparse = true; c.bq = c.bk = 16; });
  add("sparse_rect", [](Case& c) { c.hq = 4; c.hk = 2; c.sq = 150; c.sk = 210; c.d = 24; c.sparse = true; c.bq = 32; c.bk = 16; c.density = 0.3; });
  add("sparse_causal_bcast", [](Case& c) { c.b = 2; c.hq = c.hk = 2; c.sq = c.sk = 190; c.d = 16; c.right = 0; c.sparse = true; c.bq = 16; c.bk = 32; c.layout_batch = 1; });
  add("sparse_window_partial", [](Case& c) { c.hq = c.hk = 2; c.sq = c.sk = 170; c.d = 12; c.left = 50; c.right = 10; c.sparse = true; c.bq = 8; c.bk = 8; c.gq = 4; c.gk = 2; });
  add("sparse_tiny_tiles", [](Case& c) { c.hq = c.hk = 1; c.sq = 23; c.sk = 19; c.d = 5; c.sparse = true; c.bq = 1; c.bk = 3; c.density = 0.4; });
  add("scale_large", [](Case& c) { c.hq = c.hk = 1; c.sq = c.sk = 100; c.d = 16; c.scale = 4.0; c.right = 3; });

  uint64_t seed = 1234;
  for (const Case& c : cases) run_case(c, seed++);

  // fp16/bf16 are the caller's job: the kernels must refuse them.
  {
    AttnParams p;
    bool threw = false;
    try {
      fused_attn::cpu_fwd(p, DType::f16);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    check(threw, "cpu_fwd rejects f16");
    threw = false;
    try {
      fused_attn::cpu_bwd(p, DType::bf16);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    check(threw, "cpu_bwd rejects bf16");
  }

  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
