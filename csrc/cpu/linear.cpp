// CPU linear (kernelized) attention, chunked: forward and backward, causal and not (csrc/linear_params.h
// has the math). The sequence is cut into chunks of kChunk rows. Per chunk, with Qf = phi(scale Q),
// Kf = phi(K) computed into scratch as the chunk is loaded (the feature map never makes a pass of its own):
//   A = mask(Qf Kf^T)               the intra-chunk weights, j <= i (tile GEMM)
//   O = A V + Qf P                   P = state before the chunk, (Dk x Dv), held in double (Acc below)
//   den = rowsum(A) + Qf z + eps     z = key-feature sum before the chunk
//   P += Kf^T V, z += colsum(Kf)
// so time is O(S (C (Dk + Dv) + Dk Dv)) per head. Backward, with dN = dO / den and
// dd_i = -(dN_i . o_i) (the gradient of the denominator; 0 when not normalised):
//   pass 1, forward over chunks (the prefix state P again):
//     dA = mask(dN V^T + dd 1^T),  dQf = dA Kf + dN P^T + dd z^T
//   pass 2, reverse over chunks (the suffix state G = dS_final + sum over later chunks of Qf^T dN,
//   g = dz_final + sum Qf^T dd):
//     dKf = mask(dA)^T Qf + V G^T + 1 g^T,  dV = mask(A)^T dN + Kf G,  then G += Qf^T dN, g += Qf^T dd
//   and dS0 = G, dz0 = g at the start of the sequence. dq = dQf * phi'(scale q) * scale, dk = dKf * phi'(k),
// phi' read off the features themselves (elu1: min(1, f); relu: f > 0; identity: 1).
// Non-causal: the state over all keys first (a reduction), then every query chunk on its own.
//
// Parallel: at::parallel_for over (batch, head); when there are fewer (batch, head) pairs than threads,
// each sequence is also cut into segments and scanned in two levels (segment sums in parallel, a short
// serial prefix over segments, then every segment from its own starting state in parallel).
// The brgemm B operand has no transpose flag, so every GEMM above reads operands laid out for it: the
// chunk loaders write Kf^T, Q^T, V^T, dN^T where a GEMM wants them (O(C D) per chunk, against
// O(C^2 D) for the GEMMs).
#include <memory>
#include <stdexcept>
#include <string>

#include "../linear_kernels.h"
#include "tile_math.h"

namespace fused_attn {
namespace {

// The short reductions (feature sums, denominators, the dO . o dots) accumulate in double, and so does the
// state across chunks (see Acc below): O(C D) and O(Dk Dv) work per chunk against O(C^2 D) and
// O(C Dk Dv) in the GEMMs; with fp32 sums the state z was 2-5x PyTorch's (pairwise) error.
//
// Rows per chunk. 64 keeps A and the chunk operands of one head in L1/L2 at D = 64; see the
// measurements in notes/linear.md.
constexpr int64_t kChunk = 64;
constexpr double kLog2e = 1.4426950408889634074;

// ---------------------------------------------------------------------------------------------------
// Feature maps. dst (rows x d, ld_dst) = phi(scale * src), src rows ld_src apart with unit stride.

namespace vec = cpu::vec;  // FA_CPU_BY_WIDTH below names vec::isa_level

template <typename F>
FA_CPU_INLINE void features_f32_body(const float* src, int64_t ld_src, int64_t rows, int64_t d, float scale,
                                     FeatureMap fm, float* dst, int64_t ld_dst) {
  constexpr int W = vec::width<F>;
  const int64_t dv = d - d % W;
  const F zero = vec::splat<F>(0.0f), one = vec::splat<F>(1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    float* o = dst + r * ld_dst;
    for (int64_t c = 0; c < dv; c += W) {
      const F x = vec::load<F>(s + c) * scale;
      F y;
      if (fm == FeatureMap::elu1)
        y = x > zero ? x + one : vec::exp2(x * static_cast<float>(kLog2e));
      else if (fm == FeatureMap::relu)
        y = x > zero ? x : zero;
      else
        y = x;
      vec::store(o + c, y);
    }
    for (int64_t c = dv; c < d; ++c) {
      const float x = s[c] * scale;
      o[c] = fm == FeatureMap::elu1 ? (x > 0 ? x + 1 : std::exp(x)) : fm == FeatureMap::relu ? (x > 0 ? x : 0) : x;
    }
  }
}
FA_CPU_BY_WIDTH(void, features_f32,
                (const float* src, int64_t ld_src, int64_t rows, int64_t d, float scale, FeatureMap fm, float* dst,
                 int64_t ld_dst),
                (src, ld_src, rows, d, scale, fm, dst, ld_dst))

void features(const float* src, int64_t ld_src, int64_t rows, int64_t d, float scale, FeatureMap fm, float* dst,
              int64_t ld_dst) {
  features_f32(src, ld_src, rows, d, scale, fm, dst, ld_dst);
}

void features(const double* src, int64_t ld_src, int64_t rows, int64_t d, double scale, FeatureMap fm,
              double* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < d; ++c) {
      const double x = src[r * ld_src + c] * scale;
      dst[r * ld_dst + c] =
          fm == FeatureMap::elu1 ? (x > 0 ? x + 1 : std::exp(x)) : fm == FeatureMap::relu ? (x > 0 ? x : 0) : x;
    }
}

// phi'(x) from f = phi(x): elu1 min(1, f) (f = x + 1 > 1 for x > 0, e^x <= 1 otherwise), relu [f > 0].
template <typename T>
inline T feature_grad(T f, FeatureMap fm) {
  return fm == FeatureMap::elu1 ? (f < T(1) ? f : T(1)) : fm == FeatureMap::relu ? (f > T(0) ? T(1) : T(0)) : T(1);
}

// ---------------------------------------------------------------------------------------------------
// Two-level scans. Every scan here carries an additive state (a sum over chunks), so a segment's starting
// state is the scan's initial state plus the sums of the segments before it in scan order. States are
// held in double whatever T is: a chunk's contribution comes out of a T GEMM and is added in double, and
// kernels read a T copy (Chunk::pm). That costs O(Dk Dv) per chunk against O(C Dk Dv) for the GEMM, and
// keeps the state exact to T's precision over any number of chunks (64k rows are 1024 chunk additions).
using Acc = double;

// Segments per sequence: 1 when (batch, head) pairs alone fill the threads; otherwise enough to give
// every thread work, each at least two chunks long (a segment's sum costs one extra GEMM per chunk).
int64_t segments(int64_t nbh, int64_t nchunks) {
  const int64_t nt = at::get_num_threads();
  if (nbh >= nt) return 1;
  return imax(1, imin(cdiv(nt, nbh), nchunks / 2));
}

inline int64_t seg_begin(int64_t s, int64_t nseg, int64_t nchunks) { return s * nchunks / nseg; }

// init(bh, state): the scan's initial state. sum(w, bh, c0, c1, part): part = the segment's contribution
// (part is zeroed first). run(w, bh, c0, c1, state): the segment's chunks in scan order from `state`,
// leaving the state after them. finish(bh, state): the final state. make(): one thread's scratch.
template <typename Make, typename Init, typename Sum, typename Run, typename Finish>
void segmented_scan(int64_t nbh, int64_t nchunks, int64_t ss, bool reverse, Make make, Init init, Sum sum,
                    Run run, Finish finish) {
  const int64_t nseg = segments(nbh, nchunks);
  if (nseg == 1) {
    at::parallel_for(0, nbh, 1, [&](int64_t beg, int64_t end) {
      auto w = make();
      std::vector<Acc> st(ss);
      for (int64_t bh = beg; bh < end; ++bh) {
        init(bh, st.data());
        run(w, bh, 0, nchunks, st.data());
        finish(bh, st.data());
      }
    });
    return;
  }
  // Segment s in scan order is chunk segment s (forward) or nseg - 1 - s (reverse).
  auto range = [&](int64_t s, int64_t& c0, int64_t& c1) {
    const int64_t g = reverse ? nseg - 1 - s : s;
    c0 = seg_begin(g, nseg, nchunks);
    c1 = seg_begin(g + 1, nseg, nchunks);
  };
  std::vector<Acc> part(nbh * nseg * ss, 0.0), start(nbh * nseg * ss);
  at::parallel_for(0, nbh * nseg, 1, [&](int64_t beg, int64_t end) {
    auto w = make();
    for (int64_t t = beg; t < end; ++t) {
      const int64_t bh = t / nseg, s = t % nseg;
      if (s == nseg - 1) continue;  // the last segment's sum feeds no later segment
      int64_t c0, c1;
      range(s, c0, c1);
      sum(w, bh, c0, c1, part.data() + t * ss);
    }
  });
  for (int64_t bh = 0; bh < nbh; ++bh) {
    Acc* st = start.data() + bh * nseg * ss;
    init(bh, st);
    for (int64_t s = 1; s < nseg; ++s) {
      const Acc* prev = st + (s - 1) * ss;
      const Acc* add = part.data() + (bh * nseg + s - 1) * ss;
      for (int64_t i = 0; i < ss; ++i) st[s * ss + i] = prev[i] + add[i];
    }
  }
  at::parallel_for(0, nbh * nseg, 1, [&](int64_t beg, int64_t end) {
    auto w = make();
    for (int64_t t = beg; t < end; ++t) {
      int64_t c0, c1;
      range(t % nseg, c0, c1);
      run(w, t / nseg, c0, c1, start.data() + t * ss);
    }
  });
  for (int64_t bh = 0; bh < nbh; ++bh) finish(bh, start.data() + (bh * nseg + nseg - 1) * ss);
}

// Every (bh, chunk segment) on its own, in parallel: body(w, bh, c0, c1).
template <typename Make, typename Body>
void parallel_chunks(int64_t nbh, int64_t nchunks, Make make, Body body) {
  const int64_t nseg = segments(nbh, nchunks);
  at::parallel_for(0, nbh * nseg, 1, [&](int64_t beg, int64_t end) {
    auto w = make();
    for (int64_t t = beg; t < end; ++t) {
      const int64_t s = t % nseg;
      body(w, t / nseg, seg_begin(s, nseg, nchunks), seg_begin(s + 1, nseg, nchunks));
    }
  });
}

// totals[bh] = init(bh) + sum over all chunks (segment sums in parallel, then added in segment order).
template <typename Make, typename Init, typename Sum>
std::vector<Acc> reduce_chunks(int64_t nbh, int64_t nchunks, int64_t ss, Make make, Init init, Sum sum) {
  const int64_t nseg = segments(nbh, nchunks);
  std::vector<Acc> part(nbh * nseg * ss, 0.0), total(nbh * ss);
  at::parallel_for(0, nbh * nseg, 1, [&](int64_t beg, int64_t end) {
    auto w = make();
    for (int64_t t = beg; t < end; ++t) {
      const int64_t s = t % nseg;
      sum(w, t / nseg, seg_begin(s, nseg, nchunks), seg_begin(s + 1, nseg, nchunks), part.data() + t * ss);
    }
  });
  for (int64_t bh = 0; bh < nbh; ++bh) {
    Acc* tot = total.data() + bh * ss;
    init(bh, tot);
    for (int64_t s = 0; s < nseg; ++s) {
      const Acc* add = part.data() + (bh * nseg + s) * ss;
      for (int64_t i = 0; i < ss; ++i) tot[i] += add[i];
    }
  }
  return total;
}

// ---------------------------------------------------------------------------------------------------
// One thread's chunk buffers and the loaders that fill them. C = kChunk; n = rows of this chunk.

template <typename T>
struct Chunk {
  const LinearParams& p;
  int64_t dk, dv;
  std::unique_ptr<T[]> qf, qt, kf, kt, vc, vt, dn, dnt, dd, a, a2, oc, oc2, pm, gt, tmp;

  explicit Chunk(const LinearParams& lp) : p(lp), dk(lp.dk_dim), dv(lp.dv_dim) {
    const int64_t c = kChunk;
    for (auto* b : {&qf, &qt, &kf, &kt}) b->reset(new T[c * dk]);
    for (auto* b : {&vc, &vt, &dn, &dnt, &oc}) b->reset(new T[c * dv]);
    for (auto* b : {&pm, &gt, &tmp}) b->reset(new T[dk * dv]);
    oc2.reset(new T[c * (dk > dv ? dk : dv)]);
    dd.reset(new T[c]);
    a.reset(new T[c * c]);
    a2.reset(new T[c * c]);
  }

  int64_t rows(int64_t c, int64_t s) const { return imin(kChunk, s - c * kChunk); }
  const T* row(const void* base, const Strides& st, int64_t bh, int64_t i) const {
    return static_cast<const T*>(base) + st.at(bh / p.heads, bh % p.heads, i);
  }

  // pm = the state matrix (the first dk * dv entries of st) in T.
  void sync(const Acc* st) {
    for (int64_t i = 0; i < dk * dv; ++i) pm[i] = static_cast<T>(st[i]);
  }
  // st += tmp (a chunk's contribution, from a GEMM), pm = st in T.
  void accumulate(Acc* st) {
    for (int64_t i = 0; i < dk * dv; ++i) {
      st[i] += tmp[i];
      pm[i] = static_cast<T>(st[i]);
    }
  }

  // qf (n x Dk) = phi(scale q rows); with_t: also qt (Dk x C) = qf^T.
  void load_q(int64_t bh, int64_t i0, int64_t n, bool with_t) {
    features(row(p.q, p.q_st, bh, i0), p.q_st.s, n, dk, static_cast<T>(p.scale), p.feature, qf.get(), dk);
    if (with_t) cpu::transpose_scaled(qf.get(), dk, n, dk, qt.get(), kChunk, T(1));
  }
  void load_k(int64_t bh, int64_t i0, int64_t n, bool with_t) {
    features(row(p.k, p.k_st, bh, i0), p.k_st.s, n, dk, T(1), p.feature, kf.get(), dk);
    if (with_t) cpu::transpose_scaled(kf.get(), dk, n, dk, kt.get(), kChunk, T(1));
  }
  // vc (n x Dv), and vt (Dv x C) = vc^T when with_t.
  void load_v(int64_t bh, int64_t i0, int64_t n, bool with_t) {
    for (int64_t r = 0; r < n; ++r) std::memcpy(vc.get() + r * dv, row(p.v, p.v_st, bh, i0 + r), dv * sizeof(T));
    if (with_t) cpu::transpose_scaled(vc.get(), dv, n, dv, vt.get(), kChunk, T(1));
  }
  // dn (n x Dv) = dO / den, dd = -(dn . o) when normalised (else 0); dnt = dn^T when with_t.
  void load_dout(int64_t bh, int64_t i0, int64_t n, bool with_t) {
    const T* den = static_cast<const T*>(p.den) + bh * p.sq + i0;
    for (int64_t r = 0; r < n; ++r) {
      const T* g = row(p.dout, p.do_st, bh, i0 + r);
      const T inv = T(1) / den[r];
      T* d = dn.get() + r * dv;
      for (int64_t c = 0; c < dv; ++c) d[c] = g[c] * inv;
      if (p.normalize) {
        const T* o = row(p.o, p.o_st, bh, i0 + r);
        Acc dot = 0;
        for (int64_t c = 0; c < dv; ++c) dot += static_cast<Acc>(d[c]) * o[c];
        dd[r] = static_cast<T>(-dot);
      } else {
        dd[r] = 0;
      }
    }
    if (with_t) cpu::transpose_scaled(dn.get(), dv, n, dv, dnt.get(), kChunk, T(1));
  }
};

// Keep the lower triangle (j <= i) of an n x n tile with row stride ld, zero the rest; with `add`, add
// add[i] to every kept element of row i first. upper = true keeps j >= i instead and adds add[j] (the
// transposed tile).
template <typename T>
void mask_tri(T* a, int64_t n, int64_t ld, bool upper, const T* add) {
  for (int64_t i = 0; i < n; ++i) {
    T* r = a + i * ld;
    if (upper) {
      for (int64_t j = 0; j < i; ++j) r[j] = 0;
      if (add)
        for (int64_t j = i; j < n; ++j) r[j] += add[j];
    } else {
      if (add)
        for (int64_t j = 0; j <= i; ++j) r[j] += add[i];
      for (int64_t j = i + 1; j < n; ++j) r[j] = 0;
    }
  }
}

// v[d] += sum_j m[d * ld + j] * (w ? w[j] : 1) for d < rows, j < n, summed in Acc.
template <typename T>
void add_row_sums(Acc* v, const T* m, int64_t rows, int64_t n, int64_t ld, const T* w) {
  for (int64_t d = 0; d < rows; ++d) {
    const T* r = m + d * ld;
    Acc s = 0;
    if (w)
      for (int64_t j = 0; j < n; ++j) s += static_cast<Acc>(r[j]) * w[j];
    else
      for (int64_t j = 0; j < n; ++j) s += r[j];
    v[d] += s;
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward. State: [P (Dk x Dv), z (Dk)].

template <typename T>
void fwd_impl(const LinearParams& p) {
  const int64_t nbh = p.batch * p.heads, dk = p.dk_dim, dv = p.dv_dim, ss = dk * dv + dk;
  const int64_t nq = cdiv(p.sq, kChunk), nk = cdiv(p.sk, kChunk);
  T* out = static_cast<T*>(p.o);
  T* den_all = static_cast<T*>(p.den);
  auto make = [&] { return Chunk<T>(p); };

  auto init = [&](int64_t bh, Acc* st) {
    if (p.s0) {
      const T* s0 = static_cast<const T*>(p.s0) + bh * dk * dv;
      const T* z0 = static_cast<const T*>(p.z0) + bh * dk;
      for (int64_t i = 0; i < dk * dv; ++i) st[i] = s0[i];
      for (int64_t i = 0; i < dk; ++i) st[dk * dv + i] = z0[i];
    } else {
      std::fill(st, st + ss, Acc(0));
    }
  };
  // P += Kf^T V, z += colsum Kf (the rows of kt).
  auto add_chunk_state = [&](Chunk<T>& w, int64_t n, Acc* st) {
    cpu::gemm(dk, dv, n, w.kt.get(), kChunk, w.vc.get(), dv, w.tmp.get(), dv, false);
    w.accumulate(st);
    add_row_sums<T>(st + dk * dv, w.kt.get(), dk, n, kChunk, nullptr);
  };
  auto sum = [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1, Acc* part) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n = w.rows(c, p.sk);
      w.load_k(bh, c * kChunk, n, true);
      w.load_v(bh, c * kChunk, n, false);
      add_chunk_state(w, n, part);
    }
  };
  auto finish = [&](int64_t bh, const Acc* st) {
    T* s = static_cast<T*>(p.s_out) + bh * dk * dv;
    T* z = static_cast<T*>(p.z_out) + bh * dk;
    for (int64_t i = 0; i < dk * dv; ++i) s[i] = static_cast<T>(st[i]);
    for (int64_t i = 0; i < dk; ++i) z[i] = static_cast<T>(st[dk * dv + i]);
  };
  // Rows [i0, i0 + n): oc holds the intra-chunk numerators and dd their weight sums when causal. Adds the
  // state's part (pm = P in T, z), divides, writes out and den.
  auto emit = [&](Chunk<T>& w, int64_t bh, int64_t i0, int64_t n, const Acc* st, bool causal) {
    const Acc* z = st + dk * dv;
    cpu::gemm(n, dv, dk, w.qf.get(), dk, w.pm.get(), dv, w.oc.get(), dv, causal);
    T* den = den_all + bh * p.sq + i0;
    for (int64_t r = 0; r < n; ++r) {
      T* o = out + p.o_st.at(bh / p.heads, bh % p.heads, i0 + r);
      const T* num = w.oc.get() + r * dv;
      if (!p.normalize) {
        den[r] = 1;
        std::memcpy(o, num, dv * sizeof(T));
        continue;
      }
      const T* a = w.qf.get() + r * dk;
      Acc dsum = causal ? static_cast<Acc>(w.dd[r]) : Acc(0);
      for (int64_t c = 0; c < dk; ++c) dsum += static_cast<Acc>(a[c]) * z[c];
      const T d = static_cast<T>(dsum + p.eps);
      den[r] = d;
      const T inv = T(1) / d;
      for (int64_t c = 0; c < dv; ++c) o[c] = num[c] * inv;
    }
  };

  if (p.causal) {
    auto run = [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1, Acc* st) {
      w.sync(st);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * kChunk, n = w.rows(c, p.sq);
        w.load_q(bh, i0, n, false);
        w.load_k(bh, i0, n, true);
        w.load_v(bh, i0, n, false);
        T* a = w.a.get();
        cpu::gemm(n, n, dk, w.qf.get(), dk, w.kt.get(), kChunk, a, kChunk, false);
        mask_tri<T>(a, n, kChunk, false, nullptr);
        if (p.normalize)
          for (int64_t r = 0; r < n; ++r) {
            Acc s = 0;
            for (int64_t j = 0; j <= r; ++j) s += a[r * kChunk + j];
            w.dd[r] = static_cast<T>(s);
          }
        cpu::gemm(n, dv, n, a, kChunk, w.vc.get(), dv, w.oc.get(), dv, false);
        emit(w, bh, i0, n, st, true);
        add_chunk_state(w, n, st);
      }
    };
    segmented_scan(nbh, nq, ss, false, make, init, sum, run, finish);
    return;
  }
  // Non-causal: every query sees the whole state.
  const std::vector<Acc> total = reduce_chunks(nbh, nk, ss, make, init, sum);
  for (int64_t bh = 0; bh < nbh; ++bh) finish(bh, total.data() + bh * ss);
  parallel_chunks(nbh, nq, make, [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1) {
    const Acc* st = total.data() + bh * ss;
    w.sync(st);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, n = w.rows(c, p.sq);
      w.load_q(bh, i0, n, false);
      emit(w, bh, i0, n, st, false);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Backward. Pass 1 state: [P^T (Dv x Dk), z (Dk)]; pass 2 state: [G (Dk x Dv), g (Dk)].

template <typename T>
void bwd_impl(const LinearParams& p) {
  const int64_t nbh = p.batch * p.heads, dk = p.dk_dim, dv = p.dv_dim, ss = dk * dv + dk;
  const int64_t nq = cdiv(p.sq, kChunk), nk = cdiv(p.sk, kChunk);
  const T scale = static_cast<T>(p.scale);
  auto make = [&] { return Chunk<T>(p); };
  auto grad_row = [&](void* base, const Strides& st, int64_t bh, int64_t i) {
    return static_cast<T*>(base) + st.at(bh / p.heads, bh % p.heads, i);
  };

  // ---- the prefix state, transposed.
  auto init_p = [&](int64_t bh, Acc* st) {
    if (p.s0) {
      const T* s0 = static_cast<const T*>(p.s0) + bh * dk * dv;
      const T* z0 = static_cast<const T*>(p.z0) + bh * dk;
      for (int64_t r = 0; r < dk; ++r)
        for (int64_t c = 0; c < dv; ++c) st[c * dk + r] = s0[r * dv + c];
      for (int64_t i = 0; i < dk; ++i) st[dk * dv + i] = z0[i];
    } else {
      std::fill(st, st + ss, Acc(0));
    }
  };
  auto add_p = [&](Chunk<T>& w, int64_t n, Acc* st) {
    cpu::gemm(dv, dk, n, w.vt.get(), kChunk, w.kf.get(), dk, w.tmp.get(), dk, false);
    w.accumulate(st);
    Acc* z = st + dk * dv;
    for (int64_t d = 0; d < dk; ++d) {
      Acc s = 0;
      for (int64_t j = 0; j < n; ++j) s += w.kf[j * dk + d];
      z[d] += s;
    }
  };
  auto sum_p = [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1, Acc* part) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n = w.rows(c, p.sk);
      w.load_k(bh, c * kChunk, n, false);
      w.load_v(bh, c * kChunk, n, true);
      add_p(w, n, part);
    }
  };
  // dq rows [i0, i0 + n), from oc2 = the intra-chunk part of dQf when intra: adds dN P^T + dd z^T.
  auto emit_dq = [&](Chunk<T>& w, int64_t bh, int64_t i0, int64_t n, const Acc* st, bool intra) {
    T* g = w.oc2.get();
    cpu::gemm(n, dk, dv, w.dn.get(), dv, w.pm.get(), dk, g, dk, intra);
    const Acc* z = st + dk * dv;
    for (int64_t r = 0; r < n; ++r) {
      T* dq = grad_row(p.dq, p.dq_st, bh, i0 + r);
      const T* gr = g + r * dk;
      const T* f = w.qf.get() + r * dk;
      const Acc ddr = w.dd[r];
      for (int64_t c = 0; c < dk; ++c)
        dq[c] = (gr[c] + static_cast<T>(ddr * z[c])) * feature_grad(f[c], p.feature) * scale;
    }
  };

  // ---- the suffix state, from the gradients of the final state.
  auto init_g = [&](int64_t bh, Acc* st) {
    std::fill(st, st + ss, Acc(0));
    if (p.ds_out) {
      const T* ds = static_cast<const T*>(p.ds_out) + bh * dk * dv;
      for (int64_t i = 0; i < dk * dv; ++i) st[i] = ds[i];
    }
    if (p.dz_out) {
      const T* dz = static_cast<const T*>(p.dz_out) + bh * dk;
      for (int64_t i = 0; i < dk; ++i) st[dk * dv + i] = dz[i];
    }
  };
  auto add_g = [&](Chunk<T>& w, int64_t n, Acc* st) {
    cpu::gemm(dk, dv, n, w.qt.get(), kChunk, w.dn.get(), dv, w.tmp.get(), dv, false);
    w.accumulate(st);
    add_row_sums<T>(st + dk * dv, w.qt.get(), dk, n, kChunk, w.dd.get());
  };
  auto sum_g = [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1, Acc* part) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n = w.rows(c, p.sq);
      w.load_q(bh, c * kChunk, n, true);
      w.load_dout(bh, c * kChunk, n, false);
      add_g(w, n, part);
    }
  };
  auto finish_g = [&](int64_t bh, const Acc* st) {
    T* ds0 = static_cast<T*>(p.ds0) + bh * dk * dv;
    T* dz0 = static_cast<T*>(p.dz0) + bh * dk;
    for (int64_t i = 0; i < dk * dv; ++i) ds0[i] = static_cast<T>(st[i]);
    for (int64_t i = 0; i < dk; ++i) dz0[i] = static_cast<T>(st[dk * dv + i]);
  };
  // dk, dv rows [i0, i0 + n): when intra, oc2 holds the intra-chunk part of dKf and oc that of dV. Adds
  // V G^T + 1 g^T and Kf G (pm = G in T).
  auto emit_dkv = [&](Chunk<T>& w, int64_t bh, int64_t i0, int64_t n, const Acc* st, bool intra) {
    T* gt = w.gt.get();
    cpu::transpose_scaled(w.pm.get(), dv, dk, dv, gt, dk, T(1));
    cpu::gemm(n, dk, dv, w.vc.get(), dv, gt, dk, w.oc2.get(), dk, intra);
    cpu::gemm(n, dv, dk, w.kf.get(), dk, w.pm.get(), dv, w.oc.get(), dv, intra);
    const Acc* g = st + dk * dv;
    for (int64_t r = 0; r < n; ++r) {
      T* dkr = grad_row(p.dk, p.dk_st, bh, i0 + r);
      const T* gr = w.oc2.get() + r * dk;
      const T* f = w.kf.get() + r * dk;
      for (int64_t c = 0; c < dk; ++c) dkr[c] = (gr[c] + static_cast<T>(g[c])) * feature_grad(f[c], p.feature);
      std::memcpy(grad_row(p.dv, p.dv_st, bh, i0 + r), w.oc.get() + r * dv, dv * sizeof(T));
    }
  };

  if (p.causal) {
    // Pass 1: dq, forward over chunks.
    auto run_p = [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1, Acc* st) {
      w.sync(st);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t i0 = c * kChunk, n = w.rows(c, p.sq);
        w.load_q(bh, i0, n, false);
        w.load_k(bh, i0, n, false);
        w.load_v(bh, i0, n, true);
        w.load_dout(bh, i0, n, false);
        T* da = w.a.get();
        cpu::gemm(n, n, dv, w.dn.get(), dv, w.vt.get(), kChunk, da, kChunk, false);
        mask_tri<T>(da, n, kChunk, false, p.normalize ? w.dd.get() : nullptr);
        cpu::gemm(n, dk, n, da, kChunk, w.kf.get(), dk, w.oc2.get(), dk, false);
        emit_dq(w, bh, i0, n, st, true);
        add_p(w, n, st);
      }
    };
    segmented_scan(nbh, nq, ss, false, make, init_p, sum_p, run_p, [](int64_t, const Acc*) {});
    // Pass 2: dk, dv, dS0, dz0, reverse over chunks.
    auto run_g = [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1, Acc* st) {
      w.sync(st);
      for (int64_t c = c1 - 1; c >= c0; --c) {
        const int64_t i0 = c * kChunk, n = w.rows(c, p.sq);
        w.load_q(bh, i0, n, true);
        w.load_k(bh, i0, n, false);
        w.load_v(bh, i0, n, false);
        w.load_dout(bh, i0, n, true);
        T* dat = w.a.get();  // dA^T (key rows, query columns)
        cpu::gemm(n, n, dv, w.vc.get(), dv, w.dnt.get(), kChunk, dat, kChunk, false);
        mask_tri<T>(dat, n, kChunk, true, p.normalize ? w.dd.get() : nullptr);
        cpu::gemm(n, dk, n, dat, kChunk, w.qf.get(), dk, w.oc2.get(), dk, false);
        T* at = w.a2.get();  // A^T
        cpu::gemm(n, n, dk, w.kf.get(), dk, w.qt.get(), kChunk, at, kChunk, false);
        mask_tri<T>(at, n, kChunk, true, nullptr);
        cpu::gemm(n, dv, n, at, kChunk, w.dn.get(), dv, w.oc.get(), dv, false);
        emit_dkv(w, bh, i0, n, st, true);
        add_g(w, n, st);
      }
    };
    segmented_scan(nbh, nq, ss, true, make, init_g, sum_g, run_g, finish_g);
    return;
  }
  // Non-causal: the total key state for dq, the total query-side sums for dk, dv.
  const std::vector<Acc> ptot = reduce_chunks(nbh, nk, ss, make, init_p, sum_p);
  const std::vector<Acc> gtot = reduce_chunks(nbh, nq, ss, make, init_g, sum_g);
  for (int64_t bh = 0; bh < nbh; ++bh) finish_g(bh, gtot.data() + bh * ss);
  parallel_chunks(nbh, nq, make, [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1) {
    const Acc* st = ptot.data() + bh * ss;
    w.sync(st);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, n = w.rows(c, p.sq);
      w.load_q(bh, i0, n, false);
      w.load_dout(bh, i0, n, false);
      emit_dq(w, bh, i0, n, st, false);
    }
  });
  parallel_chunks(nbh, nk, make, [&](Chunk<T>& w, int64_t bh, int64_t c0, int64_t c1) {
    const Acc* st = gtot.data() + bh * ss;
    w.sync(st);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, n = w.rows(c, p.sk);
      w.load_k(bh, i0, n, false);
      w.load_v(bh, i0, n, false);
      emit_dkv(w, bh, i0, n, st, false);
    }
  });
}

}  // namespace

void cpu_linear_fwd(const LinearParams& p, DType dt) {
  switch (dt) {
    case DType::f32: fwd_impl<float>(p); return;
    case DType::f64: fwd_impl<double>(p); return;
    default:
      throw std::invalid_argument("cpu_linear_fwd: dtype " + std::to_string(static_cast<int>(dt)) +
                                  " is not supported; expected f32 or f64 (the caller upcasts fp16/bf16)");
  }
}

void cpu_linear_bwd(const LinearParams& p, DType dt) {
  switch (dt) {
    case DType::f32: bwd_impl<float>(p); return;
    case DType::f64: bwd_impl<double>(p); return;
    default:
      throw std::invalid_argument("cpu_linear_bwd: dtype " + std::to_string(static_cast<int>(dt)) +
                                  " is not supported; expected f32 or f64 (the caller upcasts fp16/bf16)");
  }
}

}  // namespace fused_attn
