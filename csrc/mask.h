// The visibility rule, defined once and used by every kernel (CPU, CUDA tensor-core, CUDA generic).
// fused_attn/reference.py mirrors it in PyTorch; tests hold the two together.
//
// Query i sees key j iff
//   0 <= j < Sk,
//   i + (Sk - Sq) - left <= j <= i + (Sk - Sq) + right      (a bound of -1 is unbounded),
//   and, with a block layout, layout[b, h, i / bq, j / bk].
// Causal is right = 0, folded in by the host before any kernel runs. Sq and Sk are the lengths of the
// sequence (AttnParams::seq(b)): per sequence in a packed variable-length batch or a KV cache.
//
// Every kernel asks two things of the policies here: which tiles to visit (the trip count, which is what
// makes cost follow the pattern) and whether a visited tile needs per-element masking.
#pragma once
#include "params.h"

namespace fused_attn {

FA_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
FA_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
FA_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The window band of one sequence, aligned bottom-right (FlashAttention's convention).
struct Band {
  int64_t sq, sk, left, right;

  FA_HD Band(const AttnParams& p, const SeqInfo& s)
      : sq(s.sq), sk(s.sk), left(p.window_left), right(p.window_right) {}
  FA_HD Band(const AttnParams& p, int64_t b) : Band(p, p.seq(b)) {}

  FA_HD int64_t offset() const { return sk - sq; }

  FA_HD bool visible(int64_t i, int64_t j) const {
    if (j < 0 || j >= sk) return false;
    const int64_t d = j - i - offset();
    if (left >= 0 && d < -left) return false;
    if (right >= 0 && d > right) return false;
    return true;
  }

  // Keys [kbeg, kend) that any query row in [q0, q1) can see (q1 clipped to Sq). Empty when kend <= kbeg.
  FA_HD void key_range(int64_t q0, int64_t q1, int64_t& kbeg, int64_t& kend) const {
    q1 = imin(q1, sq);
    kbeg = left < 0 ? 0 : imax(0, q0 + offset() - left);
    kend = right < 0 ? sk : imin(sk, q1 - 1 + offset() + right + 1);
    if (q1 <= q0) kend = kbeg;
  }

  // Query rows [qbeg, qend) that can see any key in [k0, k1) (k1 clipped to Sk).
  FA_HD void query_range(int64_t k0, int64_t k1, int64_t& qbeg, int64_t& qend) const {
    k1 = imin(k1, sk);
    qbeg = right < 0 ? 0 : imax(0, k0 - offset() - right);
    qend = left < 0 ? sq : imin(sq, k1 - 1 - offset() + left + 1);
    if (k1 <= k0) qend = qbeg;
  }

  // True when every (i, j) of the tile [q0, q1) x [k0, k1) is inside the sequence bounds and the band,
  // so the kernel may skip per-element masking there.
  FA_HD bool tile_full(int64_t q0, int64_t q1, int64_t k0, int64_t k1) const {
    if (q1 > sq || k1 > sk) return false;
    // The tightest constraints come from the corners: left bound from the last row vs first key,
    // right bound from the first row vs last key.
    if (left >= 0 && k0 < (q1 - 1) + offset() - left) return false;
    if (right >= 0 && (k1 - 1) > q0 + offset() + right) return false;
    return true;
  }

  // True when no (i, j) of the tile is visible.
  FA_HD bool tile_empty(int64_t q0, int64_t q1, int64_t k0, int64_t k1) const {
    int64_t kb, ke;
    key_range(q0, q1, kb, ke);
    return ke <= kb || k1 <= kb || k0 >= ke;
  }
};

// One visited tile: its index along the iterated axis, and whether the block layout must be checked
// per element inside it.
struct TileVisit {
  int64_t tile;
  bool layout_partial;
};

// Key tiles (of width tk) to visit for query tile qt (rows [qt*tq, qt*tq + tq)) of (b, h).
// Dense and windowed: the contiguous run of tiles that meets the band. Block-sparse: the listed tiles
// (the list is at granularity (tq, tk); the host guarantees that), minus those outside the band.
struct KeyTiles {
  const AttnParams* p;
  int64_t b, h, qt, tq, tk;
  int64_t first, n;  // dense: tiles [first, first + n); sparse: n list entries

  FA_HD KeyTiles(const AttnParams& prm, int64_t b_, int64_t h_, int64_t qt_, int64_t tq_, int64_t tk_)
      : p(&prm), b(b_), h(h_), qt(qt_), tq(tq_), tk(tk_) {
    int64_t kb, ke;
    Band(prm, b).key_range(qt * tq, qt * tq + tq, kb, ke);
    if (ke <= kb) {
      first = 0;
      n = 0;
    } else if (prm.sparse) {
      first = 0;
      n = prm.kv_list.count(b, h, qt);
    } else {
      first = kb / tk;
      n = cdiv(ke, tk) - first;
    }
  }
  FA_HD int64_t count() const { return n; }
  // Sparse entries outside the band come back with tile = -1: skip them.
  FA_HD TileVisit get(int64_t i) const {
    if (!p->sparse) return {first + i, false};
    const int e = p->kv_list.entry(b, h, qt, static_cast<int>(i));
    const int64_t t = e >= 0 ? e : -static_cast<int64_t>(e) - 1;
    if (Band(*p, b).tile_empty(qt * tq, qt * tq + tq, t * tk, t * tk + tk)) return {-1, false};
    return {t, e < 0};
  }
};

// Query tiles (of height tq) to visit for key tile kt of (b, h) with h a query head; the mirror of KeyTiles
// for the backward pass.
struct QueryTiles {
  const AttnParams* p;
  int64_t b, h, kt, tq, tk;
  int64_t first, n;

  FA_HD QueryTiles(const AttnParams& prm, int64_t b_, int64_t h_, int64_t kt_, int64_t tq_, int64_t tk_)
      : p(&prm), b(b_), h(h_), kt(kt_), tq(tq_), tk(tk_) {
    int64_t qb, qe;
    Band(prm, b).query_range(kt * tk, kt * tk + tk, qb, qe);
    if (qe <= qb) {
      first = 0;
      n = 0;
    } else if (prm.sparse) {
      first = 0;
      n = prm.q_list.count(b, h, kt);
    } else {
      first = qb / tq;
      n = cdiv(qe, tq) - first;
    }
  }
  FA_HD int64_t count() const { return n; }
  FA_HD TileVisit get(int64_t i) const {
    if (!p->sparse) return {first + i, false};
    const int e = p->q_list.entry(b, h, kt, static_cast<int>(i));
    const int64_t t = e >= 0 ? e : -static_cast<int64_t>(e) - 1;
    if (Band(*p, b).tile_empty(t * tq, t * tq + tq, kt * tk, kt * tk + tk)) return {-1, false};
    return {t, e < 0};
  }
};

// Whether a visited tile of sequence b needs per-element masking at all.
FA_HD bool tile_needs_mask(const AttnParams& p, const TileVisit& v, int64_t b, int64_t q0, int64_t q1,
                           int64_t k0, int64_t k1) {
  return v.layout_partial || !Band(p, b).tile_full(q0, q1, k0, k1);
}

// The per-element rule inside a tile that needs masking (i, j relative to sequence b).
FA_HD bool element_visible(const AttnParams& p, const TileVisit& v, int64_t b, int64_t h, int64_t i,
                           int64_t j) {
  const Band band(p, b);
  if (i >= band.sq || !band.visible(i, j)) return false;
  return !v.layout_partial || p.layout.allows(b, h, i, j);
}

// Score modifiers of one (sequence, query head), applied to the scaled score s = scale * q.k of query i
// and key j before masking (fused_attn/reference.py mirrors them):
//   softcap c > 0:  s <- c * tanh(s / c)
//   ALiBi slope a:  s <- s - a * |i + (Sk - Sq) - j|
// Kernels that work in base 2 multiply the result by log2(e). The backward needs d(modified)/ds, which is
// 1 - tanh(s / c)^2 with a cap and 1 without (ALiBi's term does not depend on s).
struct ScoreMod {
  double cap = 0.0, inv_cap = 0.0;  // cap 0: no softcap
  double slope = 0.0;               // 0: no ALiBi
  int64_t offset = 0;               // Sk - Sq of the sequence

  FA_HD ScoreMod(const AttnParams& p, int64_t b, int64_t h, const SeqInfo& s)
      : cap(p.softcap), inv_cap(p.softcap > 0 ? 1.0 / p.softcap : 0.0),
        slope(p.alibi ? static_cast<double>(p.alibi[b * p.alibi_b + h]) : 0.0), offset(s.sk - s.sq) {}

  FA_HD bool active() const { return cap > 0 || slope != 0; }
  // The ALiBi penalty a * |i + offset - j| (>= 0), subtracted from the (capped) score.
  FA_HD double alibi_bias(int64_t i, int64_t j) const {
    const int64_t d = i + offset - j;
    return slope * static_cast<double>(d < 0 ? -d : d);
  }
};

}  // namespace fused_attn
