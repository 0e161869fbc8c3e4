// CPU backward (FlashAttention-2 math, scores recomputed tile by tile from lse).
//
// Structure: one task per (batch, kv head, chunk of key tiles). For each key tile it owns, the task walks
// the query tiles that mask.h lists for every query head of the GQA group (QueryTiles) and does, on tiles
// stored key-major (rows = keys, columns = queries):
//   S^T  = K_tile (scale Q_tile)^T          dP^T = V_tile dO_tile^T
//   P^T = exp(S^T - lse), dS^T = scale * P^T * (dP^T - delta)   (one pass over both tiles; base 2)
//   dV  += P^T dO                           dK  += dS^T Q
//   dQ^T += K_tile^T dS^T                   (into the chunk's own dQ^T buffer)
// dK and dV of a key tile are finished in cache by one task. dQ is accumulated by the single task that
// owns (batch, kv head, chunk) into that chunk's buffer, and the chunks are summed in a fixed order at the
// end: no atomics, the same bits on every run (for a given thread count, which fixes the chunk count).
//
// Why one pass and not a dK/dV pass plus a separate dQ pass over KeyTiles: the separate dQ pass
// recomputes S, P and dP, 7 tile GEMMs per visited tile instead of 5 here (+40% backward GEMM work).
// Measured at B1 H8 S2048 D64 fp32 (notes/cpu_kernels.md), this one-pass version is only a few percent
// ahead of torch's SDPA forward+backward on dense attention, so the two-pass plan would fall behind it.
// Chunks exist only to give the threads enough tasks when batch * kv heads is small; each costs one
// fp32 (B, Hq, D, Sq) buffer.
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>

#include "../kernels.h"
#include "../mask.h"
#include "tile_math.h"

namespace fused_attn {
namespace {

constexpr double kLog2e = 1.4426950408889634074;

// Dense tiles (no block layout): 128 keys per task step x 64 query rows. Measured at B1 H8 S2048 D64
// fp32, one thread, forward + backward time relative to torch SDPA, dense / causal (notes/cpu_kernels.md):
// (tq, tk) = 64x64 0.99 / 0.92, 64x128 0.96 / 0.86, 128x128 0.97 / 0.84, 64x256 0.98 / 0.86. Alone, the
// five tile GEMMs run at 146 GFLOP/s with 64x64 tiles and 156 with 64x128 (oneDNN brgemm, one core).
// Re-swept after the tile-blocked transposed copies (backward alone, one thread, 3 runs each, loaded
// machine, +-5%): SDPA/ours 64x128 1.06, 128x128 1.10, 64x256 1.09, 64x64 0.98, 128x64 1.02; the three
// best are within noise, so 64x128 stays (fewer masked elements on causal / window edges than 256).
constexpr int64_t kBwdTileQ = 64;
constexpr int64_t kBwdTileK = 128;

// Chunks of key tiles per (batch, kv head): enough tasks for ~4 per thread, at most 16, and the dQ^T
// buffers together at most 2^26 elements beyond the first.
int64_t pick_chunks(int64_t nbhk, int64_t nkt, int64_t dq_elems) {
  const int64_t want = cdiv(4 * static_cast<int64_t>(at::get_num_threads()), imax(nbhk, 1));
  int64_t c = imax(1, imin(imin(want, nkt), 16));
  while (c > 1 && (c - 1) * dq_elems > (int64_t{1} << 26)) --c;
  return c;
}

template <typename T>
struct BwdScratch {
  std::unique_ptr<T[]> st, dpt, dk, dv, dmod;
};

template <typename T>
void bwd_impl(const AttnParams& p) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const int64_t nb = p.batch, hq = p.hq, hk = p.hk, d = p.d, grp = p.group();
  if (nb == 0 || hq == 0) return;
  if (p.block_table) throw std::invalid_argument("cpu_bwd: paged K/V have no backward");
  const int64_t tq = p.sparse ? p.list_tq : kBwdTileQ;
  const int64_t tk = p.sparse ? p.list_tk : kBwdTileK;
  const T scale = static_cast<T>(p.scale);
  const T l2e = static_cast<T>(kLog2e);
  // Q^T is pre-scaled so that S^T = K (c Q)^T comes out in base 2 (c = scale * log2 e); with a softcap the
  // cap needs natural units (c = scale) and score_mod_tile moves the tile to base 2.
  const bool capped = p.softcap > 0;
  const T qscale = static_cast<T>(capped ? p.scale : p.scale * kLog2e);

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* o = static_cast<const T*>(p.o);
  const T* dout = static_cast<const T*>(p.dout);
  const T* lse = static_cast<const T*>(p.lse);
  T* delta = static_cast<T*>(p.delta);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);

  // Sequences: their own lengths and row offsets when the batch is packed. Per-sequence buffers below are
  // laid out back to back: qoff[b] / koff[b] count query / key tile blocks of the earlier sequences.
  std::vector<SeqInfo> seqs(nb);
  std::vector<int64_t> nqt(nb), nkt(nb), qoff(nb + 1, 0), koff(nb + 1, 0), roff(nb + 1, 0);
  for (int64_t b = 0; b < nb; ++b) {
    seqs[b] = p.seq(b);
    nqt[b] = cdiv(seqs[b].sq, tq);
    nkt[b] = cdiv(seqs[b].sk, tk);
    qoff[b + 1] = qoff[b] + nqt[b];
    koff[b + 1] = koff[b] + nkt[b];
    roff[b + 1] = roff[b] + seqs[b].sq;
  }
  const int64_t max_nkt = *std::max_element(nkt.begin(), nkt.end());

  // Pre-pass per (b, query head): delta = rowsum(dO * O) - dlse; qt = c * Q^T and dot = dO^T; lse_adj =
  // log2(e) * lse, or +inf for rows that see nothing (then P = 2^(s - lse_adj) = 0, never inf or NaN).
  // The transposed copies (qt, dot, kt and the dQ^T accumulators) are stored tile by tile: one contiguous
  // (D x tq) block per query tile (D x tk per key tile), leading dimension tq (tk). With one (D x S) matrix
  // per head instead, each GEMM operand row sat on its own 4 KiB page (ld ~ S), ~200 pages per tile step
  // against an L1 DTLB of 64-96 entries; see notes/cpu_kernels.md for the measured gain.
  // Buffer index of (b, h, query tile qi): ((qoff[b] * hq) + h * nqt[b] + qi) * qblk.
  const int64_t qblk = d * tq, kblk = d * tk;
  auto qbuf = [&](int64_t b, int64_t h, int64_t qi) { return (qoff[b] * hq + h * nqt[b] + qi) * qblk; };
  auto kbuf = [&](int64_t b, int64_t h, int64_t ki) { return (koff[b] * hk + h * nkt[b] + ki) * kblk; };
  auto rbuf = [&](int64_t b, int64_t h) { return roff[b] * hq + h * seqs[b].sq; };  // lse_adj rows
  const int64_t qtotal = qoff[nb] * hq * qblk;
  // Per-call copies as large as Q, dO and K: the calling thread's kept buffers (tile_math.h ThreadScratch).
  const cpu::ThreadScratch<T, 0> qt_buf(qtotal);
  const cpu::ThreadScratch<T, 1> dot_buf(qtotal);
  const cpu::ThreadScratch<T, 2> kt_buf(koff[nb] * hk * kblk);
  const cpu::ThreadScratch<T, 3> lse_buf(roff[nb] * hq);
  T* const qt = qt_buf.get();
  T* const dot = dot_buf.get();
  T* const kt = kt_buf.get();
  T* const lse_adj = lse_buf.get();
  at::parallel_for(0, nb * hq, 1, [&](int64_t beg, int64_t end) {
    for (int64_t bh = beg; bh < end; ++bh) {
      const int64_t b = bh / hq, h = bh % hq;
      const SeqInfo& si = seqs[b];
      const int64_t row0 = b * p.lse_b + h * p.lse_h + si.q_off;
      const T* lrow = lse + row0;
      T* drow = delta + row0;
      T* arow = lse_adj + rbuf(b, h);
      // lse / delta rows are contiguous: row i sits at offset i.
      cpu::row_dots(o + p.o_st.at(b, h, si.q_off), p.o_st.s, dout + p.do_st.at(b, h, si.q_off), p.do_st.s, si.sq,
                    d, drow);
      for (int64_t i = 0; i < si.sq; ++i) {
        // A gradient reaching lse (return_lse=True) adds dlse_i * P_ij to dS_ij: fold it into delta.
        if (p.dlse) drow[i] -= static_cast<const T*>(p.dlse)[row0 + i];
        arow[i] = lrow[i] == -kInf ? kInf : lrow[i] * l2e;
      }
      for (int64_t qi = 0; qi < nqt[b]; ++qi) {
        const int64_t q0 = qi * tq, qn = imin(tq, si.sq - q0);
        cpu::transpose_scaled(q + p.q_st.at(b, h, si.q_off + q0), p.q_st.s, qn, d, qt + qbuf(b, h, qi), tq,
                              qscale);
        cpu::transpose_scaled(dout + p.do_st.at(b, h, si.q_off + q0), p.do_st.s, qn, d, dot + qbuf(b, h, qi),
                              tq, T(1));
      }
    }
  });
  at::parallel_for(0, nb * hk, 1, [&](int64_t beg, int64_t end) {
    for (int64_t bh = beg; bh < end; ++bh) {
      const int64_t b = bh / hk, h = bh % hk;
      for (int64_t ki = 0; ki < nkt[b]; ++ki) {
        const int64_t k0 = ki * tk, kn = imin(tk, seqs[b].sk - k0);
        cpu::transpose_scaled(k + p.k_st.at(b, h, seqs[b].k_off + k0), p.k_st.s, kn, d, kt + kbuf(b, h, ki),
                              tk, T(1));
      }
    }
  });

  const int64_t nchunk = pick_chunks(nb * hk, max_nkt, qtotal);
  const cpu::ThreadScratch<T, 4> dqt_buf(nchunk * qtotal);
  T* const dqt = dqt_buf.get();

  // Tasks: t = (b * hk + kvh) * nchunk + c; cost = query tiles visited.
  const int64_t ntasks = nb * hk * nchunk;
  std::vector<int64_t> cost(ntasks, 0), group(ntasks);
  for (int64_t t = 0; t < ntasks; ++t) {
    const int64_t c = t % nchunk, b = t / nchunk / hk, kvh = (t / nchunk) % hk;
    group[t] = b;
    for (int64_t kti = c; kti < nkt[b]; kti += nchunk)
      for (int64_t hh = 0; hh < grp; ++hh) cost[t] += QueryTiles(p, b, kvh * grp + hh, kti, tq, tk).count();
  }

  auto make = [&] {
    BwdScratch<T> w;
    w.st.reset(new T[tk * tq]);
    w.dpt.reset(new T[tk * tq]);
    w.dk.reset(new T[tk * d]);
    w.dv.reset(new T[tk * d]);
    if (capped && !std::is_same_v<T, float>) w.dmod.reset(new T[tk * tq]);  // fp64's separate cap pass
    return w;
  };

  auto body = [&](BwdScratch<T>& w, int64_t t) {
    const int64_t c = t % nchunk, b = t / nchunk / hk, kvh = (t / nchunk) % hk;
    const SeqInfo& si = seqs[b];
    const int64_t sq = si.sq, sk = si.sk;
    T* st = w.st.get();
    T* dpt = w.dpt.get();
    T* dka = w.dk.get();
    T* dva = w.dv.get();
    T* dmod = w.dmod.get();
    // This task's dQ^T blocks: chunk c, batch b, the group's query heads (contiguous).
    T* dqt_c = dqt + c * qtotal;
    T* grp_beg = dqt_c + qbuf(b, kvh * grp, 0);
    std::fill(grp_beg, grp_beg + grp * nqt[b] * qblk, T(0));

    for (int64_t kti = c; kti < nkt[b]; kti += nchunk) {
      const int64_t k0 = kti * tk, kn = imin(tk, sk - k0);
      const T* ktile = k + p.k_st.at(b, kvh, si.k_off + k0);
      const T* vtile = v + p.v_st.at(b, kvh, si.k_off + k0);
      bool started = false;
      for (int64_t hh = 0; hh < grp; ++hh) {
        const int64_t h = kvh * grp + hh;
        const ScoreMod mod(p, b, h, si);
        const QueryTiles tiles(p, b, h, kti, tq, tk);
        for (int64_t it = 0; it < tiles.count(); ++it) {
          const TileVisit vis = tiles.get(it);
          if (vis.tile < 0) continue;
          const int64_t q0 = vis.tile * tq;
          if (q0 >= sq) continue;
          const int64_t qn = imin(tq, sq - q0);
          const int64_t row0 = b * p.lse_b + h * p.lse_h + si.q_off + q0;

          const int64_t qo = qbuf(b, h, vis.tile);
          cpu::gemm(kn, qn, d, ktile, p.k_st.s, qt + qo, tq, st, tq, false);
          const bool masked = tile_needs_mask(p, vis, b, q0, q0 + qn, k0, k0 + kn);
          if (masked) cpu::mask_tile(p, vis, b, h, q0, qn, k0, kn, st, tq, true);
          cpu::gemm(kn, qn, d, vtile, p.v_st.s, dot + qo, tq, dpt, tq, false);
          if constexpr (std::is_same_v<T, float>) {
            // fp32: the modifiers and the cap's chain rule run inside the P / dS pass (tile_math.h)
            const cpu::RowMod rm = cpu::RowMod::of(mod, q0, k0, masked);
            cpu::probs_dsoft(st, dpt, kn, qn, tq, lse_adj + rbuf(b, h) + q0, delta + row0, scale,
                             mod.active() ? &rm : nullptr);
          } else {
            if (mod.active()) cpu::score_mod_tile(mod, q0, qn, k0, kn, st, tq, true, dmod);
            cpu::probs_dsoft(st, dpt, kn, qn, tq, lse_adj + rbuf(b, h) + q0, delta + row0, scale);
            if (capped)  // chain rule through the cap: dS_raw = dS_capped * (1 - tanh^2)
              for (int64_t r = 0; r < kn; ++r)
                for (int64_t cc = 0; cc < qn; ++cc) dpt[r * tq + cc] *= dmod[r * tq + cc];
          }
          cpu::gemm(kn, d, qn, st, tq, dout + p.do_st.at(b, h, si.q_off + q0), p.do_st.s, dva, d, started);
          cpu::gemm(kn, d, qn, dpt, tq, q + p.q_st.at(b, h, si.q_off + q0), p.q_st.s, dka, d, started);
          cpu::gemm(d, qn, kn, kt + kbuf(b, kvh, kti), tk, dpt, tq, dqt_c + qo, tq, true);
          started = true;
        }
      }
      for (int64_t r = 0; r < kn; ++r) {
        T* dkr = dk + p.dk_st.at(b, kvh, si.k_off + k0 + r);
        T* dvr = dv + p.dv_st.at(b, kvh, si.k_off + k0 + r);
        if (started) {
          std::copy(dka + r * d, dka + r * d + d, dkr);
          std::copy(dva + r * d, dva + r * d + d, dvr);
        } else {
          std::fill(dkr, dkr + d, T(0));
          std::fill(dvr, dvr + d, T(0));
        }
      }
    }
  };

  cpu::run_tasks(cost, make, body, &group);  // sequence by sequence (tile_math.h)

  // dQ = sum over chunks (in chunk order) of dQ^T, transposed back into dq's strides. Chunks that own no
  // key tile of sequence b (c >= nkt[b]) never zeroed its blocks: they are skipped.
  at::parallel_for(0, nb * hq, 1, [&](int64_t beg, int64_t end) {
    for (int64_t bh = beg; bh < end; ++bh) {
      const int64_t b = bh / hq, h = bh % hq;
      const SeqInfo& si = seqs[b];
      for (int64_t qi = 0; qi < nqt[b]; ++qi) {
        const int64_t q0 = qi * tq, qn = imin(tq, si.sq - q0);
        T* dst = dq + p.dq_st.at(b, h, si.q_off + q0);
        bool first = true;
        for (int64_t c = 0; c < nchunk; ++c) {
          if (c >= nkt[b]) break;
          cpu::transpose_scaled(dqt + c * qtotal + qbuf(b, h, qi), tq, d, qn, dst, p.dq_st.s, T(1), !first);
          first = false;
        }
        if (first)
          for (int64_t r = 0; r < qn; ++r) std::fill(dst + r * p.dq_st.s, dst + r * p.dq_st.s + d, T(0));
      }
    }
  });
}

}  // namespace

void cpu_bwd(const AttnParams& p, DType dt) {
  switch (dt) {
    case DType::f32:
      bwd_impl<float>(p);
      return;
    case DType::f64:
      bwd_impl<double>(p);
      return;
    default:
      throw std::invalid_argument("cpu_bwd: dtype " + std::to_string(static_cast<int>(dt)) +
                                  " is not supported; expected f32 or f64 (the caller upcasts fp16/bf16)");
  }
}

}  // namespace fused_attn
