// CPU KV-cache attention (flash_kvcache's forward): q (B, Hq, Sq, D) against a contiguous or paged cache,
// read in its own dtype and computed in fp32 (fp64 for fp64). One task per (batch, query head, query row):
// walk the visible keys of the row (mask.h's Band on the sequence's own length), online softmax.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "../kernels.h"
#include "../mask.h"

namespace fused_attn {
namespace {

template <typename S, typename C>
void kvcache_impl(const AttnParams& p) {
  const S* q = static_cast<const S*>(p.q);
  const S* k = static_cast<const S*>(p.k);
  const S* v = static_cast<const S*>(p.v);
  S* o = static_cast<S*>(p.o);
  C* lse = static_cast<C*>(p.lse);
  const int64_t d = p.d, rows = p.batch * p.hq * p.sq;
  at::parallel_for(0, rows, 1, [&](int64_t beg, int64_t end) {
    std::unique_ptr<C[]> acc(new C[d]), qr(new C[d]);
    for (int64_t r = beg; r < end; ++r) {
      const int64_t i = r % p.sq, h = (r / p.sq) % p.hq, b = r / p.sq / p.hq, kvh = h / p.group();
      const SeqInfo s = p.seq(b);
      const Band band(p, s);
      const ScoreMod mod(p, b, h, s);
      const S* qi = q + p.q_st.at(b, h, i);
      for (int64_t c = 0; c < d; ++c) {
        qr[c] = static_cast<C>(qi[c]);
        acc[c] = 0;
      }
      C m = -std::numeric_limits<C>::infinity(), l = 0;
      int64_t kb, ke;
      band.key_range(i, i + 1, kb, ke);
      for (int64_t j = kb; j < ke; ++j) {
        const S* kj = k + p.k_row(b, kvh, j, s);
        C x = 0;
        for (int64_t c = 0; c < d; ++c) x += qr[c] * static_cast<C>(kj[c]);
        x *= static_cast<C>(p.scale);
        if (mod.cap > 0) x = static_cast<C>(mod.cap) * std::tanh(x * static_cast<C>(mod.inv_cap));
        if (mod.slope != 0) x -= static_cast<C>(mod.alibi_bias(i, j));
        const C m_new = x > m ? x : m;
        const C alpha = std::exp(m - m_new), pj = std::exp(x - m_new);
        l = l * alpha + pj;
        const S* vj = v + p.v_row(b, kvh, j, s);
        for (int64_t c = 0; c < d; ++c) acc[c] = acc[c] * alpha + pj * static_cast<C>(vj[c]);
        m = m_new;
      }
      S* oi = o + p.o_st.at(b, h, i);
      const bool any = l > 0;
      for (int64_t c = 0; c < d; ++c) oi[c] = static_cast<S>(any ? acc[c] / l : C(0));
      lse[b * p.lse_b + h * p.lse_h + i] = any ? m + std::log(l) : -std::numeric_limits<C>::infinity();
    }
  });
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
