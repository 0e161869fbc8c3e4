// Host-emulator check of the linear-attention CUDA kernels (csrc/cuda/linear.cu, linear_kernel.cuh, as
// converted by gen_kernels.py): runs the real launchers and kernels on emu_runtime.h and compares out, den,
// the final state (s, z) and, for fp32 / fp64, dq, dk, dv, ds0, dz0 with a float64 reference computed in
// the quadratic (masked) form, independent of the kernels' recurrences.
//
// Build (run_all.py --family linear does this):
//   g++ -std=c++20 -O2 -pthread -I shim -I build/gen emu_linear.cpp -o build/emu_linear
// Run: ./emu_linear [case-name-substring] [--dtype fp16,bf16,fp32,fp64] [--order ...] [--eager] [--seed N]
// One line per (case, dtype, pass); ends with "N passed, N failed"; exit status 1 on any failure.
// fp16 / bf16 run the tensor-core kernels (cases whose Dk, Dv fit them; other head dims run on the GPU as
// the fp32 kernels on upcast inputs, which the fp32 lines cover).
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/linear.cu"

using namespace fused_attn;

namespace {

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
template <typename S>
S nan_pattern() {
  S s;
  std::memset(&s, 0xff, sizeof(S));
  return s;
}
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

// (B, H, S, D) with rows pad elements apart beyond D (NaN for inputs, the sentinel for outputs) and a tail.
template <typename S>
struct Buf {
  int64_t B, H, S_, D, ld;
  Strides st;
  std::vector<S> v;
  Buf(int64_t b, int64_t h, int64_t s, int64_t d, int64_t pad, S fill) : B(b), H(h), S_(s), D(d), ld(d + pad) {
    st = {h * s * ld, s * ld, ld};
    v.assign(static_cast<size_t>(b * h * s * ld + 8), fill);
  }
  S& at(int64_t b, int64_t h, int64_t s, int64_t x) { return v[st.at(b, h, s) + x]; }
  size_t logical(int64_t b, int64_t h, int64_t s, int64_t x) const { return ((b * H + h) * S_ + s) * D + x; }
};

struct LCase {
  std::string name;
  int B, H, Sq, Sk, Dk, Dv;
  bool causal;
  FeatureMap fm;
  bool normalize;
  double scale;
  bool state;   // initial state (s0, z0)
  bool dstate;  // gradients of the final state (ds, dz)
  int segments = 1;  // the tensor-core kernels' two-level scan (LinearParams::segments)
};

std::vector<LCase> cases() {
  return {
      {"causal_elu1", 1, 2, 97, 97, 64, 64, true, FeatureMap::elu1, true, 1.0, false, false},
      {"noncausal_relu_sq_ne_sk", 2, 1, 97, 300, 32, 64, false, FeatureMap::relu, true, 0.7, false, true, 2},
      {"causal_identity_unnorm_dk_ne_dv", 1, 2, 300, 300, 128, 96, true, FeatureMap::identity, false, 0.5, false, true,
       3},
      {"single", 1, 1, 1, 1, 64, 64, true, FeatureMap::elu1, true, 1.0, false, false},
      {"state_elu1", 1, 2, 130, 130, 64, 128, true, FeatureMap::elu1, true, 0.5, true, true},
      {"state_segments", 1, 2, 300, 300, 64, 64, true, FeatureMap::elu1, true, 1.0, true, true, 5},
      {"noncausal_elu1_unnorm", 1, 1, 65, 65, 128, 128, false, FeatureMap::elu1, false, 1.0, false, false, 2},
      {"odd_d_relu", 1, 2, 97, 97, 59, 40, true, FeatureMap::relu, true, 1.0, true, false},  // generic only
  };
}

double phi_d(double x, FeatureMap fm) {
  return fm == FeatureMap::elu1 ? (x > 0 ? x + 1 : std::exp(x)) : fm == FeatureMap::relu ? (x > 0 ? x : 0) : x;
}
double dphi_d(double x, FeatureMap fm) {
  return fm == FeatureMap::elu1 ? (x > 0 ? 1 : std::exp(x)) : fm == FeatureMap::relu ? (x > 0 ? 1 : 0) : 1;
}

struct Ref {
  std::vector<double> o, den, s, z, dq, dk, dv, ds0, dz0;
};

// Quadratic form, float64. Inputs logical (B, H, S, D) arrays.
Ref reference(const LCase& c, const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
              const std::vector<double>& s0, const std::vector<double>& z0, const std::vector<double>& dout,
              const std::vector<double>& dsf, const std::vector<double>& dzf, double eps) {
  const int B = c.B, H = c.H, Sq = c.Sq, Sk = c.Sk, Dk = c.Dk, Dv = c.Dv;
  Ref R;
  R.o.assign(size_t(B) * H * Sq * Dv, 0);
  R.den.assign(size_t(B) * H * Sq, 0);
  R.s.assign(size_t(B) * H * Dk * Dv, 0);
  R.z.assign(size_t(B) * H * Dk, 0);
  R.dq.assign(size_t(B) * H * Sq * Dk, 0);
  R.dk.assign(size_t(B) * H * Sk * Dk, 0);
  R.dv.assign(size_t(B) * H * Sk * Dv, 0);
  R.ds0.assign(size_t(B) * H * Dk * Dv, 0);
  R.dz0.assign(size_t(B) * H * Dk, 0);
  for (int bh = 0; bh < B * H; ++bh) {
    std::vector<double> qf(size_t(Sq) * Dk), kf(size_t(Sk) * Dk), w(size_t(Sq) * Sk, 0), dn(size_t(Sq) * Dv), dd(Sq);
    const double* S0 = s0.empty() ? nullptr : &s0[size_t(bh) * Dk * Dv];
    const double* Z0 = z0.empty() ? nullptr : &z0[size_t(bh) * Dk];
    const double* DS = dsf.empty() ? nullptr : &dsf[size_t(bh) * Dk * Dv];
    const double* DZ = dzf.empty() ? nullptr : &dzf[size_t(bh) * Dk];
    auto Q = [&](int i, int a) { return q[(size_t(bh) * Sq + i) * Dk + a]; };
    auto K = [&](int j, int a) { return k[(size_t(bh) * Sk + j) * Dk + a]; };
    auto V = [&](int j, int x) { return v[(size_t(bh) * Sk + j) * Dv + x]; };
    for (int i = 0; i < Sq; ++i)
      for (int a = 0; a < Dk; ++a) qf[size_t(i) * Dk + a] = phi_d(Q(i, a) * c.scale, c.fm);
    for (int j = 0; j < Sk; ++j)
      for (int a = 0; a < Dk; ++a) kf[size_t(j) * Dk + a] = phi_d(K(j, a), c.fm);
    auto vis = [&](int i, int j) { return !c.causal || j <= i; };
    for (int i = 0; i < Sq; ++i) {
      double den = c.normalize ? eps : 1;
      std::vector<double> num(Dv, 0);
      for (int j = 0; j < Sk; ++j) {
        if (!vis(i, j)) continue;
        double x = 0;
        for (int a = 0; a < Dk; ++a) x += qf[size_t(i) * Dk + a] * kf[size_t(j) * Dk + a];
        w[size_t(i) * Sk + j] = x;
        if (c.normalize) den += x;
        for (int y = 0; y < Dv; ++y) num[y] += x * V(j, y);
      }
      for (int a = 0; a < Dk; ++a) {
        const double f = qf[size_t(i) * Dk + a];
        if (S0)
          for (int y = 0; y < Dv; ++y) num[y] += f * S0[size_t(a) * Dv + y];
        if (Z0 && c.normalize) den += f * Z0[a];
      }
      R.den[size_t(bh) * Sq + i] = den;
      for (int y = 0; y < Dv; ++y) R.o[(size_t(bh) * Sq + i) * Dv + y] = num[y] / den;
    }
    for (int a = 0; a < Dk; ++a) {
      for (int y = 0; y < Dv; ++y) {
        double x = S0 ? S0[size_t(a) * Dv + y] : 0;
        for (int j = 0; j < Sk; ++j) x += kf[size_t(j) * Dk + a] * V(j, y);
        R.s[(size_t(bh) * Dk + a) * Dv + y] = x;
      }
      double x = Z0 ? Z0[a] : 0;
      for (int j = 0; j < Sk; ++j) x += kf[size_t(j) * Dk + a];
      R.z[size_t(bh) * Dk + a] = x;
    }
    // Backward.
    for (int i = 0; i < Sq; ++i) {
      double dot = 0;
      for (int y = 0; y < Dv; ++y) {
        const double g = dout[(size_t(bh) * Sq + i) * Dv + y] / R.den[size_t(bh) * Sq + i];
        dn[size_t(i) * Dv + y] = g;
        dot += g * R.o[(size_t(bh) * Sq + i) * Dv + y];
      }
      dd[i] = c.normalize ? -dot : 0;
    }
    std::vector<double> dqf(size_t(Sq) * Dk, 0), dkf(size_t(Sk) * Dk, 0);
    for (int i = 0; i < Sq; ++i)
      for (int j = 0; j < Sk; ++j) {
        if (!vis(i, j)) continue;
        double dw = dd[i];
        for (int y = 0; y < Dv; ++y) dw += dn[size_t(i) * Dv + y] * V(j, y);
        for (int a = 0; a < Dk; ++a) {
          dqf[size_t(i) * Dk + a] += dw * kf[size_t(j) * Dk + a];
          dkf[size_t(j) * Dk + a] += dw * qf[size_t(i) * Dk + a];
        }
        for (int y = 0; y < Dv; ++y) R.dv[(size_t(bh) * Sk + j) * Dv + y] += w[size_t(i) * Sk + j] * dn[size_t(i) * Dv + y];
      }
    for (int i = 0; i < Sq; ++i)
      for (int a = 0; a < Dk; ++a) {
        double x = dqf[size_t(i) * Dk + a];
        if (S0)
          for (int y = 0; y < Dv; ++y) x += S0[size_t(a) * Dv + y] * dn[size_t(i) * Dv + y];
        if (Z0) x += dd[i] * Z0[a];
        R.dq[(size_t(bh) * Sq + i) * Dk + a] = x * dphi_d(Q(i, a) * c.scale, c.fm) * c.scale;
      }
    for (int j = 0; j < Sk; ++j) {
      for (int a = 0; a < Dk; ++a) {
        double x = dkf[size_t(j) * Dk + a];
        if (DS)
          for (int y = 0; y < Dv; ++y) x += DS[size_t(a) * Dv + y] * V(j, y);
        if (DZ) x += DZ[a];
        R.dk[(size_t(bh) * Sk + j) * Dk + a] = x * dphi_d(K(j, a), c.fm);
      }
      if (DS)
        for (int y = 0; y < Dv; ++y) {
          double x = 0;
          for (int a = 0; a < Dk; ++a) x += DS[size_t(a) * Dv + y] * kf[size_t(j) * Dk + a];
          R.dv[(size_t(bh) * Sk + j) * Dv + y] += x;
        }
    }
    for (int a = 0; a < Dk; ++a) {
      for (int y = 0; y < Dv; ++y) {
        double x = DS ? DS[size_t(a) * Dv + y] : 0;
        for (int i = 0; i < Sq; ++i) x += qf[size_t(i) * Dk + a] * dn[size_t(i) * Dv + y];
        R.ds0[(size_t(bh) * Dk + a) * Dv + y] = x;
      }
      double x = DZ ? DZ[a] : 0;
      for (int i = 0; i < Sq; ++i) x += dd[i] * qf[size_t(i) * Dk + a];
      R.dz0[size_t(bh) * Dk + a] = x;
    }
  }
  return R;
}

struct Stats {
  long errors = 0;
  double err = 0, ref_max = 0;
  std::string first;
  void fail(const std::string& s) {
    if (errors++ == 0) first = s;
  }
  double rel() const { return err / std::max(ref_max, 1e-2); }
};

template <typename S>
void compare_buf(Stats& st, Buf<S>& t, const std::vector<double>& ref, const char* what) {
  std::vector<uint8_t> logical(t.v.size(), 0);
  for (int64_t b = 0; b < t.B; ++b)
    for (int64_t h = 0; h < t.H; ++h)
      for (int64_t s = 0; s < t.S_; ++s)
        for (int64_t x = 0; x < t.D; ++x) {
          logical[t.st.at(b, h, s) + x] = 1;
          const S got = t.at(b, h, s, x);
          const double r = ref[t.logical(b, h, s, x)];
          if (same_bits(got, sentinel<S>())) {
            st.fail(std::string(what) + " element never written");
            continue;
          }
          const double gd = to_d(got);
          if (!std::isfinite(gd)) {
            st.fail(std::string(what) + " non-finite");
            continue;
          }
          st.err = std::max(st.err, std::fabs(gd - r));
          st.ref_max = std::max(st.ref_max, std::fabs(r));
        }
  for (size_t i = 0; i < t.v.size(); ++i)
    if (!logical[i] && !same_bits(t.v[i], sentinel<S>())) {
      st.fail(std::string(what) + " written outside the tensor (padding or tail)");
      break;
    }
}

template <typename S>
void compare_vec(Stats& st, const std::vector<S>& got, const std::vector<double>& ref, const char* what) {
  for (size_t i = 0; i < ref.size(); ++i) {
    if (same_bits(got[i], sentinel<S>())) {
      st.fail(std::string(what) + " element never written");
      continue;
    }
    const double g = to_d(got[i]);
    if (!std::isfinite(g)) {
      st.fail(std::string(what) + " non-finite");
      continue;
    }
    st.err = std::max(st.err, std::fabs(g - ref[i]));
    st.ref_max = std::max(st.ref_max, std::fabs(ref[i]));
  }
  for (size_t i = ref.size(); i < got.size(); ++i)
    if (!same_bits(got[i], sentinel<S>())) {
      st.fail(std::string(what) + " written past its end");
      break;
    }
}

struct Totals {
  int passed = 0, failed = 0;
};

void report(Totals& tot, const std::string& name, const char* dt, const char* pass,
            std::vector<std::pair<const char*, Stats>>& parts, double bound, long emu_errors, const std::string& thrown) {
  bool ok = emu_errors == 0 && thrown.empty();
  std::string line;
  char buf[160];
  for (auto& [what, st] : parts) {
    const bool good = st.errors == 0 && st.rel() <= bound;
    ok &= good;
    std::snprintf(buf, sizeof buf, " %s %.1e%s", what, st.rel(), good ? "" : "!");
    line += buf;
    if (st.errors) line += " (" + st.first + ")";
  }
  if (emu_errors) line += " emulator errors: " + std::to_string(emu_errors);
  if (!thrown.empty()) line += " threw: " + thrown;
  std::printf("%s %-34s %-4s %-8s bound %.0e:%s\n", ok ? "ok  " : "FAIL", name.c_str(), dt, pass, bound, line.c_str());
  std::fflush(stdout);
  (ok ? tot.passed : tot.failed)++;
}

template <typename Elem>
constexpr const char* dt_name() {
  if constexpr (std::is_same<Elem, __half>::value) return "fp16";
  else if constexpr (std::is_same<Elem, __nv_bfloat16>::value) return "bf16";
  else if constexpr (std::is_same<Elem, float>::value) return "fp32";
  else return "fp64";
}

template <typename Elem>
void run_case(const LCase& c, unsigned seed, Totals& tot) {
  constexpr bool kTc = sizeof(Elem) == 2;
  using St = std::conditional_t<std::is_same<Elem, double>::value, double, float>;  // state / den type
  if (kTc && !linear_tc_fits(c.Dk, c.Dv)) return;
  const double eps = 1e-6;
  const double bound_fwd = kTc ? (std::is_same<Elem, __half>::value ? 3e-3 : 2e-2) : sizeof(Elem) == 4 ? 1e-5 : 1e-12;
  const double bound_bwd = kTc ? (std::is_same<Elem, __half>::value ? 5e-3 : 4e-2) : sizeof(Elem) == 4 ? 2e-5 : 1e-12;
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const int pad = 8;  // 16-byte aligned rows for the 16-bit types
  Buf<Elem> q(c.B, c.H, c.Sq, c.Dk, pad, nan_pattern<Elem>()), k(c.B, c.H, c.Sk, c.Dk, pad, nan_pattern<Elem>()),
      v(c.B, c.H, c.Sk, c.Dv, pad, nan_pattern<Elem>());
  std::vector<double> qd(size_t(c.B) * c.H * c.Sq * c.Dk), kd(size_t(c.B) * c.H * c.Sk * c.Dk),
      vd(size_t(c.B) * c.H * c.Sk * c.Dv);
  auto fill = [&](Buf<Elem>& t, std::vector<double>& d) {
    for (int64_t b = 0; b < t.B; ++b)
      for (int64_t h = 0; h < t.H; ++h)
        for (int64_t s = 0; s < t.S_; ++s)
          for (int64_t x = 0; x < t.D; ++x) {
            const Elem e = from_d<Elem>(nd(rng));
            t.at(b, h, s, x) = e;
            d[t.logical(b, h, s, x)] = to_d(e);
          }
  };
  fill(q, qd);
  fill(k, kd);
  fill(v, vd);
  const size_t nS = size_t(c.B) * c.H * c.Dk * c.Dv, nZ = size_t(c.B) * c.H * c.Dk;
  std::vector<St> s0, z0;
  std::vector<double> s0d, z0d;
  if (c.state) {
    // A state as a previous piece of the sequence would leave: z > 0 and S of either sign.
    for (size_t i = 0; i < nS; ++i) s0.push_back(static_cast<St>(nd(rng) * 3));
    for (size_t i = 0; i < nZ; ++i) z0.push_back(static_cast<St>(5 + std::fabs(nd(rng)) * 5));
    for (St x : s0) s0d.push_back(x);
    for (St x : z0) z0d.push_back(x);
  }
  std::vector<double> dout(size_t(c.B) * c.H * c.Sq * c.Dv), dsd, dzd;
  for (double& x : dout) x = nd(rng);
  if (c.dstate) {
    for (size_t i = 0; i < nS; ++i) dsd.push_back(static_cast<double>(static_cast<St>(nd(rng))));
    for (size_t i = 0; i < nZ; ++i) dzd.push_back(static_cast<double>(static_cast<St>(nd(rng))));
  }
  // The backward runs on the kernel's own forward outputs (as autograd does); for the reference's out and den
  // the small difference is inside the tolerances.
  const Ref R = reference(c, qd, kd, vd, s0d, z0d, dout, dsd, dzd, eps);

  LinearParams p;
  p.q = q.v.data();
  p.k = k.v.data();
  p.v = v.v.data();
  p.q_st = q.st;
  p.k_st = k.st;
  p.v_st = v.st;
  p.batch = c.B;
  p.heads = c.H;
  p.sq = c.Sq;
  p.sk = c.Sk;
  p.dk_dim = c.Dk;
  p.dv_dim = c.Dv;
  p.causal = c.causal;
  p.normalize = c.normalize;
  p.feature = c.fm;
  p.scale = c.scale;
  p.eps = eps;
  if (c.state) {
    p.s0 = s0.data();
    p.z0 = z0.data();
  }
  Buf<Elem> o(c.B, c.H, c.Sq, c.Dv, pad, sentinel<Elem>());
  std::vector<St> den(size_t(c.B) * c.H * c.Sq + 8, sentinel<St>()), s(nS + 8, sentinel<St>()), z(nZ + 8, sentinel<St>());
  std::vector<double> work(nS, std::nan(""));
  p.o = o.v.data();
  p.o_st = o.st;
  p.den = den.data();
  p.s_out = s.data();
  p.z_out = z.data();
  p.work = kTc ? nullptr : work.data();
  std::vector<float> seg_state;
  if (kTc && c.segments > 1) {
    p.segments = c.segments;
    seg_state.assign(size_t(c.B) * c.H * (c.segments + 1) * (c.Dk * c.Dv + 2 * c.Dk), std::nanf(""));
    p.seg_state = seg_state.data();
  }
  auto register_inputs = [&] {
    emu::clear_regions();
    emu::add_region("q", q.v.data(), q.v.size() * sizeof(Elem), false);
    emu::add_region("k", k.v.data(), k.v.size() * sizeof(Elem), false);
    emu::add_region("v", v.v.data(), v.v.size() * sizeof(Elem), false);
  };
  auto register_bwd = [&](const void* d, size_t bytes) {
    register_inputs();
    emu::add_region("dout", d, bytes, false);
  };
  register_inputs();
  const DType dt = std::is_same<Elem, __half>::value ? DType::f16 : std::is_same<Elem, __nv_bfloat16>::value ? DType::bf16
                   : std::is_same<Elem, float>::value ? DType::f32 : DType::f64;
  {
    const long e0 = emu::g_errors.load();
    std::string thrown;
    try {
      linear_cuda_fwd(p, dt, nullptr);
    } catch (const std::exception& e) {
      thrown = e.what();
    }
    std::vector<std::pair<const char*, Stats>> parts{{"out", {}}, {"den", {}}, {"s", {}}, {"z", {}}};
    compare_buf(parts[0].second, o, R.o, "out");
    compare_vec(parts[1].second, den, R.den, "den");
    compare_vec(parts[2].second, s, R.s, "s");
    compare_vec(parts[3].second, z, R.z, "z");
    report(tot, c.name, dt_name<Elem>(), "forward", parts, bound_fwd, emu::g_errors.load() - e0, thrown);
  }
  {
    Buf<Elem> dob(c.B, c.H, c.Sq, c.Dv, pad, nan_pattern<Elem>());
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t i = 0; i < c.Sq; ++i)
          for (int64_t x = 0; x < c.Dv; ++x) {
            const Elem e = from_d<Elem>(dout[dob.logical(b, h, i, x)]);
            dob.at(b, h, i, x) = e;
            dout[dob.logical(b, h, i, x)] = to_d(e);  // the reference below sees the rounded dO
          }
    // The reference's gradients again, from the dO the kernels see.
    const Ref Rb = reference(c, qd, kd, vd, s0d, z0d, dout, dsd, dzd, eps);
    std::vector<St> ds, dz;
    for (double x : dsd) ds.push_back(static_cast<St>(x));
    for (double x : dzd) dz.push_back(static_cast<St>(x));
    Buf<Elem> dq(c.B, c.H, c.Sq, c.Dk, pad, sentinel<Elem>()), dk(c.B, c.H, c.Sk, c.Dk, pad, sentinel<Elem>()),
        dv(c.B, c.H, c.Sk, c.Dv, pad, sentinel<Elem>());
    std::vector<St> ds0(nS + 8, sentinel<St>()), dz0(nZ + 8, sentinel<St>());
    LinearParams g = p;
    g.dout = dob.v.data();
    g.do_st = dob.st;
    g.ds_out = c.dstate ? ds.data() : nullptr;
    g.dz_out = c.dstate ? dz.data() : nullptr;
    g.dq = dq.v.data();
    g.dk = dk.v.data();
    g.dv = dv.v.data();
    g.dq_st = dq.st;
    g.dk_st = dk.st;
    g.dv_st = dv.st;
    g.ds0 = ds0.data();
    g.dz0 = dz0.data();
    std::fill(work.begin(), work.end(), std::nan(""));
    std::fill(seg_state.begin(), seg_state.end(), std::nanf(""));
    register_bwd(dob.v.data(), dob.v.size() * sizeof(Elem));
    const long e0 = emu::g_errors.load();
    std::string thrown;
    try {
      linear_cuda_bwd(g, dt, nullptr);
    } catch (const std::exception& e) {
      thrown = e.what();
    }
    std::vector<std::pair<const char*, Stats>> parts{{"dq", {}}, {"dk", {}}, {"dv", {}}, {"ds0", {}}, {"dz0", {}}};
    compare_buf(parts[0].second, dq, Rb.dq, "dq");
    compare_buf(parts[1].second, dk, Rb.dk, "dk");
    compare_buf(parts[2].second, dv, Rb.dv, "dv");
    compare_vec(parts[3].second, ds0, Rb.ds0, "ds0");
    compare_vec(parts[4].second, dz0, Rb.dz0, "dz0");
    report(tot, c.name, dt_name<Elem>(), "backward", parts, bound_bwd, emu::g_errors.load() - e0, thrown);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string filter, dtype;
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
    } else if (a == "--dtype" && i + 1 < argc) {
      dtype = argv[++i];
    } else if (a == "-v") {
      emu::g_cfg.verbose = 1;
    } else {
      filter = a;
    }
  }
  Totals tot;
  const auto cs = cases();
  for (size_t i = 0; i < cs.size(); ++i) {
    if (!filter.empty() && cs[i].name.find(filter) == std::string::npos) continue;
    const unsigned seed = emu::g_cfg.seed * 1000u + static_cast<unsigned>(i);
    auto want = [&](const char* d) { return dtype.empty() || ("," + dtype + ",").find("," + std::string(d) + ",") != std::string::npos; };
    if (want("fp16")) run_case<__half>(cs[i], seed, tot);
    if (want("bf16")) run_case<__nv_bfloat16>(cs[i], seed, tot);
    if (want("fp32")) run_case<float>(cs[i], seed, tot);
    if (want("fp64")) run_case<double>(cs[i], seed, tot);
  }
  std::printf("%d passed, %d failed\n", tot.passed, tot.failed);
  return tot.failed ? 1 : 0;
}
