// Op schemas, argument checks and dispatch. Host code only: kernels live in cpu/ and cuda/.
//
// Ops in the namespace fused_attn (schemas at the end of this file):
//   fwd / bwd                 fixed-length batches (B, H, S, D), every pattern, softcap, ALiBi
//   varlen_fwd / varlen_bwd   packed variable-length batches (total, H, D) with cu_seqlens
//   kvcache_fwd               a KV cache (contiguous or paged), new keys appended in place; forward only
// `sparse` is empty (no block layout) or the block mask's tensors prepared for this call's kernels:
//   [layout u8 (Bm, Hm, nqb, nkb), fwd kv counts, fwd kv indices, bwd kv counts, bwd kv indices,
//    bwd q counts, bwd q indices]
// and sparse_shape is [bq, bk, fwd_tq, fwd_tk, bwd_tq, bwd_tk]: the layout's block size and the tile
// granularity of each pass's lists (fused_attn/_ops.py builds both). The Python layer validates user
// input with friendly messages first; the checks here guard direct calls of the ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>

#include "kernels.h"
#include "mask.h"
#include "cuda/tiles.h"

#ifdef FA_WITH_CUDA
// c10's stream and guard only: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which a
// toolkit with just the compiler and runtime lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"
#include "cuda/sm90/launch.h"
#endif

namespace fused_attn {
namespace {

using at::Tensor;

std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    default:
      TORCH_CHECK_TYPE(false, "q: expected dtype float16, bfloat16, float32 or float64, got ",
                       t.scalar_type());
  }
  return DType::f32;
}

void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected 4-D (B, H, S, D), got shape ", shape_str(q));
  TORCH_CHECK_VALUE(k.dim() == 4, "k: expected 4-D (B, H, S, D), got shape ", shape_str(k));
  TORCH_CHECK_VALUE(v.dim() == 4, "v: expected 4-D (B, H, S, D), got shape ", shape_str(v));
  dtype_of(q);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "k, v: expected the dtype of q (", q.scalar_type(), "), got ", k.scalar_type(), " and ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(),
                    "k, v: expected the device of q (", q.device(), "), got ", k.device(), " and ", v.device());
  TORCH_CHECK_VALUE(q.size(3) > 0 && k.size(3) == q.size(3) && v.size(3) == q.size(3),
                    "k, v: expected head dim D = q.shape[-1] = ", q.size(3), " (> 0), got k ", shape_str(k),
                    " and v ", shape_str(v));
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                    "k, v: expected batch ", q.size(0), " (q.shape[0]), got k ", shape_str(k), " and v ",
                    shape_str(v));
  TORCH_CHECK_VALUE(v.size(1) == k.size(1) && v.size(2) == k.size(2),
                    "v: expected the heads and length of k ", shape_str(k), ", got ", shape_str(v));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "k: expected a head count dividing q's ", q.size(1), ", got ", k.size(1));
  for (auto* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->size(3) <= 1 || t->stride(3) == 1,
                      "q, k, v: expected unit stride in the head dim, got strides ", t->strides());
}

Strides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Fills the block-sparse part of the params from the prepared lists, checking what they claim.
void set_sparse(AttnParams& p, const std::vector<Tensor>& sparse, at::IntArrayRef shape, bool backward,
                const Tensor& q) {
  if (sparse.empty()) return;
  TORCH_CHECK_VALUE(sparse.size() == 7 && shape.size() == 6,
                    "sparse: expected 7 tensors and sparse_shape of 6 ints, got ", sparse.size(), " and ",
                    shape.size());
  for (size_t i = 0; i < sparse.size(); ++i) {
    const Tensor& t = sparse[i];
    TORCH_CHECK_VALUE(t.device() == q.device(), "block_mask: its tensors are on ", t.device(),
                      " but q is on ", q.device(), "; call block_mask.to(q.device)");
    TORCH_CHECK_TYPE(t.scalar_type() == (i == 0 ? at::kByte : at::kInt), "sparse[", i, "]: expected ",
                     (i == 0 ? "uint8" : "int32"), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == (i == 0 || i % 2 == 0 ? 4 : 3), "sparse[", i, "]: wrong rank, shape ",
                      shape_str(t));
    TORCH_CHECK_VALUE(t.stride(-1) == 1, "sparse[", i, "]: expected unit stride in the last dim");
  }
  const Tensor& lay = sparse[0];
  TORCH_CHECK_VALUE(lay.size(0) == 1 || lay.size(0) == q.size(0), "block_mask: layout batch ", lay.size(0),
                    " does not match q's batch ", q.size(0));
  TORCH_CHECK_VALUE(lay.size(1) == 1 || lay.size(1) == q.size(1), "block_mask: layout heads ", lay.size(1),
                    " does not match q's heads ", q.size(1));
  p.sparse = true;
  p.layout.p = lay.data_ptr<uint8_t>();
  p.layout.sb = lay.size(0) == 1 ? 0 : lay.stride(0);
  p.layout.sh = lay.size(1) == 1 ? 0 : lay.stride(1);
  p.layout.sr = lay.stride(2);
  p.layout.bq = shape[0];
  p.layout.bk = shape[1];
  TORCH_CHECK_VALUE(shape[0] > 0 && shape[1] > 0, "block_mask: block size must be positive");
  TORCH_CHECK_VALUE(lay.size(2) == cdiv(p.sq, shape[0]) && lay.size(3) == cdiv(p.sk, shape[1]),
                    "block_mask: layout ", shape_str(lay), " with blocks (", shape[0], ", ", shape[1],
                    ") does not cover Sq = ", p.sq, ", Sk = ", p.sk);
  auto list = [&](const Tensor& cnt, const Tensor& idx) {
    TileList l;
    l.cnt = cnt.data_ptr<int32_t>();
    l.idx = idx.data_ptr<int32_t>();
    l.cnt_b = cnt.size(0) == 1 ? 0 : cnt.stride(0);
    l.cnt_h = cnt.size(1) == 1 ? 0 : cnt.stride(1);
    l.idx_b = idx.size(0) == 1 ? 0 : idx.stride(0);
    l.idx_h = idx.size(1) == 1 ? 0 : idx.stride(1);
    l.idx_r = idx.stride(2);
    return l;
  };
  const int64_t tq = backward ? shape[4] : shape[2], tk = backward ? shape[5] : shape[3];
  p.list_tq = tq;
  p.list_tk = tk;
  const Tensor& kc = backward ? sparse[3] : sparse[1];
  const Tensor& ki = backward ? sparse[4] : sparse[2];
  TORCH_CHECK_VALUE(kc.size(2) >= cdiv(p.sq, tq) && ki.size(3) >= cdiv(p.sk, tk),
                    "sparse: key-tile lists ", shape_str(ki), " too small for tiles (", tq, ", ", tk, ")");
  p.kv_list = list(kc, ki);
  if (backward) {
    TORCH_CHECK_VALUE(sparse[5].size(2) >= cdiv(p.sk, tk) && sparse[6].size(3) >= cdiv(p.sq, tq),
                      "sparse: query-tile lists ", shape_str(sparse[6]), " too small for tiles (", tq, ", ",
                      tk, ")");
    p.q_list = list(sparse[5], sparse[6]);
  }
}

void check_tiles(const AttnParams& p, int64_t tq, int64_t tk, const char* kernel) {
  TORCH_CHECK_VALUE(!p.sparse || (p.list_tq == tq && p.list_tk == tk), "sparse: lists built for tiles (",
                    p.list_tq, ", ", p.list_tk, ") but the ", kernel, " kernel runs tiles (", tq, ", ", tk,
                    ")");
}

// The fields every op fills alike: data pointers, sizes, (b, h, s) strides, scale and window.
struct Dims {
  int64_t batch, hq, hk, sq, sk, d;
};
AttnParams common_params(const Tensor& q, const Tensor& k, const Tensor& v, const Dims& n, Strides qs,
                         Strides ks, Strides vs, double scale, int64_t wl, int64_t wr) {
  TORCH_CHECK_VALUE(wl >= -1 && wr >= -1, "window: expected entries >= -1, got (", wl, ", ", wr, ")");
  AttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = n.batch;
  p.hq = n.hq;
  p.hk = n.hk;
  p.sq = n.sq;
  p.sk = n.sk;
  p.d = n.d;
  p.q_st = qs;
  p.k_st = ks;
  p.v_st = vs;
  p.scale = scale;
  p.window_left = wl;
  p.window_right = wr;
  return p;
}

AttnParams base_params(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t wl,
                       int64_t wr) {
  return common_params(q, k, v, {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)},
                       strides_of(q), strides_of(k), strides_of(v), scale, wl, wr);
}

// Output and lse of the (B, H, S, D) / (B, H, S) layout (packed batches set theirs themselves).
void set_out(AttnParams& p, const Tensor& out, const Tensor& lse) {
  p.o = out.data_ptr();
  p.o_st = strides_of(out);
  p.lse = lse.data_ptr();
  p.lse_b = lse.stride(0);
  p.lse_h = lse.stride(1);
}

at::ScalarType lse_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_bwd_shapes(const Tensor& q, const Tensor& dout, const Tensor& out, const Tensor& lse) {
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout, out: expected shape ",
                    shape_str(q), ", got ", shape_str(dout), " and ", shape_str(out));
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                        lse.size(2) == q.size(2) && lse.scalar_type() == lse_type(q),
                    "lse: expected ", lse_type(q), " of shape (B, Hq, Sq), got ", shape_str(lse));
}

// The tensors of a backward call, kept alive for its kernels; set_bwd points the params at them.
struct BwdTensors {
  Tensor dout, out, lse, dlse, dq, dk, dv, delta;
};

void set_bwd(AttnParams& p, BwdTensors& t, const std::optional<Tensor>& dlse) {
  t.delta = at::empty_like(t.lse);
  set_out(p, t.out, t.lse);
  if (dlse.has_value()) {
    t.dlse = dlse->to(t.lse.scalar_type()).contiguous();
    TORCH_CHECK_VALUE(t.dlse.sizes() == t.lse.sizes(), "dlse: expected shape ", shape_str(t.lse));
    p.dlse = t.dlse.data_ptr();
  }
  p.dout = t.dout.data_ptr();
  p.do_st = strides_of(t.dout);
  p.dq = t.dq.data_ptr();
  p.dk = t.dk.data_ptr();
  p.dv = t.dv.data_ptr();
  p.dq_st = strides_of(t.dq);
  p.dk_st = strides_of(t.dk);
  p.dv_st = strides_of(t.dv);
  p.delta = t.delta.data_ptr();
}

// set_bwd for a packed batch: (total, H, D) tensors with batch stride 0, lse / delta (Hq, total_q).
void set_varlen_bwd(AttnParams& p, BwdTensors& t, const std::optional<Tensor>& dlse) {
  set_bwd(p, t, dlse);
  p.lse_b = 0;
  p.lse_h = t.lse.stride(0);
  auto packed = [](const Tensor& x) { return Strides{0, x.stride(1), x.stride(0)}; };
  p.o_st = packed(t.out);
  p.do_st = packed(t.dout);
  p.dq_st = packed(t.dq);
  p.dk_st = packed(t.dk);
  p.dv_st = packed(t.dv);
}

// softcap and ALiBi slopes (float32, (B or 1, Hq), contiguous; the Python layer reshapes (Hq,) to (1, Hq)).
void set_score_mod(AttnParams& p, double softcap, const std::optional<Tensor>& alibi, const Tensor& q) {
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), "softcap: expected a finite float >= 0, got ",
                    softcap);
  p.softcap = softcap;
  if (!alibi.has_value()) return;
  const Tensor& a = *alibi;
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "alibi_slopes: expected float32, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.device() == q.device(), "alibi_slopes: expected q's device ", q.device(), ", got ",
                    a.device());
  TORCH_CHECK_VALUE(a.dim() == 2 && (a.size(0) == 1 || a.size(0) == p.batch) && a.size(1) == p.hq &&
                        a.is_contiguous(),
                    "alibi_slopes: expected a contiguous (1 or B, Hq) = (1 or ", p.batch, ", ", p.hq,
                    ") tensor, got ", shape_str(a));
  p.alibi = a.data_ptr<float>();
  p.alibi_b = a.size(0) == 1 ? 0 : a.stride(0);
}

// Packed variable-length batches: q (total_q, Hq, D), k, v (total_k, Hk, D), cu_seqlens int32 (B + 1).
void check_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                  int64_t max_q, int64_t max_k) {
  TORCH_CHECK_VALUE(q.dim() == 3, "q: expected 3-D (total_q, Hq, D), got shape ", shape_str(q));
  TORCH_CHECK_VALUE(k.dim() == 3, "k: expected 3-D (total_k, Hk, D), got shape ", shape_str(k));
  TORCH_CHECK_VALUE(v.dim() == 3 && v.sizes() == k.sizes(), "v: expected k's shape ", shape_str(k), ", got ",
                    shape_str(v));
  dtype_of(q);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "k, v: expected the dtype of q (", q.scalar_type(), ")");
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), "k, v: expected the device of q");
  TORCH_CHECK_VALUE(q.size(2) > 0 && k.size(2) == q.size(2), "k: expected head dim ", q.size(2));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "k: expected a head count dividing q's ",
                    q.size(1), ", got ", k.size(1));
  for (auto* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->size(2) <= 1 || t->stride(2) == 1, "q, k, v: expected unit stride in the head dim");
  for (auto [name, c] : {std::pair<const char*, const Tensor*>{"cu_seqlens_q", &cu_q}, {"cu_seqlens_k", &cu_k}}) {
    TORCH_CHECK_TYPE(c->scalar_type() == at::kInt, name, ": expected int32, got ", c->scalar_type());
    TORCH_CHECK_VALUE(c->dim() == 1 && c->size(0) >= 1 && c->is_contiguous() && c->device() == q.device(),
                      name, ": expected a contiguous 1-D (B + 1) tensor on q's device, got ", shape_str(*c));
  }
  TORCH_CHECK_VALUE(cu_q.size(0) == cu_k.size(0), "cu_seqlens_k: expected ", cu_q.size(0),
                    " entries like cu_seqlens_q, got ", cu_k.size(0));
  TORCH_CHECK_VALUE(max_q >= 0 && max_k >= 0, "max_seqlen_q, max_seqlen_k: expected >= 0");
}

AttnParams varlen_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                         const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, int64_t wl, int64_t wr) {
  // Packed (total, H, D): batch stride 0, sequence b's rows found through cu_seqlens.
  AttnParams p = common_params(q, k, v, {cu_q.size(0) - 1, q.size(1), k.size(1), max_q, max_k, q.size(2)},
                               {0, q.stride(1), q.stride(0)}, {0, k.stride(1), k.stride(0)},
                               {0, v.stride(1), v.stride(0)}, scale, wl, wr);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  return p;
}

bool env_deterministic() {
  const char* e = std::getenv("FUSED_ATTN_DETERMINISTIC");
  return e && std::string(e) != "0" && std::string(e) != "";
}

// ---------------------------------------------------------------------------------------------- CPU

// Rows closer than D apart (a tensor expanded along S) are copied: the tile GEMMs need a leading dimension
// >= D.
Tensor rows_d_apart(const Tensor& t) {
  const int64_t sdim = t.dim() == 4 ? 2 : 0;  // the sequence dim: (B, H, S, D) or packed (total, H, D)
  return (t.dim() >= 3 && t.size(sdim) > 1 && t.stride(sdim) < t.size(-1)) ? t.contiguous() : t;
}

// fp16/bf16 run through the fp32 kernels (except the bf16 forward on CPUs with bf16 GEMMs, fwd_cpu).
Tensor cpu_compute(const Tensor& t) {
  return rows_d_apart((t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) ? t.to(at::kFloat) : t);
}

std::tuple<Tensor, Tensor> fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale,
                                   int64_t wl, int64_t wr, at::TensorList sparse_in, at::IntArrayRef sparse_shape,
                                   double softcap, const std::optional<Tensor>& alibi) {
  check_qkv(q_in, k_in, v_in);
  if (q_in.scalar_type() == at::kBFloat16 && sparse_in.empty() && q_in.numel() > 0 && k_in.size(2) > 0) {
    // bf16 through the bf16 GEMMs where the CPU has them (cpu_fwd_bf16_ok)
    const Tensor q = rows_d_apart(q_in), k = rows_d_apart(k_in), v = rows_d_apart(v_in);
    AttnParams p = base_params(q, k, v, scale, wl, wr);
    set_score_mod(p, softcap, alibi, q);
    if (cpu_fwd_bf16_ok(p)) {
      Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options().dtype(at::kFloat));
      Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
      set_out(p, out, lse);
      cpu_fwd_bf16(p);
      return {out.to(at::kBFloat16), lse};
    }
  }
  const Tensor q = cpu_compute(q_in), k = cpu_compute(k_in), v = cpu_compute(v_in);
  std::vector<Tensor> sparse(sparse_in.begin(), sparse_in.end());
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_type(q)));
  if (q.numel() == 0) return {out.to(q_in.scalar_type()), lse};
  if (k.size(2) == 0) return {out.zero_().to(q_in.scalar_type()), lse.fill_(-INFINITY)};
  AttnParams p = base_params(q, k, v, scale, wl, wr);
  set_sparse(p, sparse, sparse_shape, false, q);
  set_score_mod(p, softcap, alibi, q);
  set_out(p, out, lse);
  cpu_fwd(p, dtype_of(q));
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cpu(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                           const Tensor& v_in, const Tensor& out_in, const Tensor& lse,
                                           const std::optional<Tensor>& dlse, double scale, int64_t wl,
                                           int64_t wr, at::TensorList sparse_in, at::IntArrayRef sparse_shape,
                                           bool deterministic, double softcap,
                                           const std::optional<Tensor>& alibi) {
  (void)deterministic;  // the CPU backward is always deterministic
  check_qkv(q_in, k_in, v_in);
  const Tensor q = cpu_compute(q_in), k = cpu_compute(k_in), v = cpu_compute(v_in);
  BwdTensors t;
  t.dout = cpu_compute(dout_in).contiguous();
  t.out = cpu_compute(out_in).contiguous();
  check_bwd_shapes(q, t.dout, t.out, lse);
  std::vector<Tensor> sparse(sparse_in.begin(), sparse_in.end());
  t.dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  t.dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
  t.dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  auto back = [](const Tensor& g, const Tensor& like) { return g.to(like.scalar_type()); };
  if (q.numel() == 0 || k.numel() == 0) return {back(t.dq, q_in), back(t.dk, k_in), back(t.dv, v_in)};
  t.lse = lse.contiguous();
  AttnParams p = base_params(q, k, v, scale, wl, wr);
  set_sparse(p, sparse, sparse_shape, true, q);
  set_score_mod(p, softcap, alibi, q);
  set_bwd(p, t, dlse);
  p.deterministic = true;
  cpu_bwd(p, dtype_of(q));
  return {back(t.dq, q_in), back(t.dk, k_in), back(t.dv, v_in)};
}

// ------------------------------------------------------------------------------------- CPU, varlen

// cu_seqlens held on the CPU are checked here too (the Python layer checks them first, with friendlier
// messages): starts at 0, non-decreasing, ends at the packed total, no sequence longer than max_seqlen.
void check_cu_values(const Tensor& cu, int64_t total, int64_t max_len, const char* name, const char* max_name) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK_VALUE(c[0] == 0 && c[n - 1] == total, name, ": expected to start at 0 and end at ", total,
                    ", got ", c[0], " ... ", c[n - 1]);
  for (int64_t i = 0; i + 1 < n; ++i) {
    TORCH_CHECK_VALUE(c[i + 1] >= c[i], name, ": expected non-decreasing entries, got ", c[i], " then ",
                      c[i + 1], " at index ", i);
    TORCH_CHECK_VALUE(c[i + 1] - c[i] <= max_len, max_name, ": sequence ", i, " has ", c[i + 1] - c[i],
                      " rows, more than ", max_name, " = ", max_len);
  }
}

void set_varlen_out(AttnParams& p, const Tensor& out, const Tensor& lse) {
  p.o = out.data_ptr();
  p.o_st = {0, out.stride(1), out.stride(0)};
  p.lse = lse.data_ptr();
  p.lse_b = 0;
  p.lse_h = lse.stride(0);
}

std::tuple<Tensor, Tensor> varlen_fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                          const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k,
                                          double scale, int64_t wl, int64_t wr, double softcap,
                                          const std::optional<Tensor>& alibi) {
  check_varlen(q_in, k_in, v_in, cu_q, cu_k, max_q, max_k);
  check_cu_values(cu_q, q_in.size(0), max_q, "cu_seqlens_q", "max_seqlen_q");
  check_cu_values(cu_k, k_in.size(0), max_k, "cu_seqlens_k", "max_seqlen_k");
  const Tensor q = cpu_compute(q_in), k = cpu_compute(k_in), v = cpu_compute(v_in);
  Tensor out = at::zeros({q.size(0), q.size(1), q.size(2)}, q.options());
  Tensor lse = at::full({q.size(1), q.size(0)}, -INFINITY, q.options().dtype(lse_type(q)));
  if (q.numel() > 0 && cu_q.size(0) > 1) {
    AttnParams p = varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
    set_score_mod(p, softcap, alibi, q);
    set_varlen_out(p, out, lse);
    cpu_fwd(p, dtype_of(q));
  }
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_bwd_cpu(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                  const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                  const std::optional<Tensor>& dlse, const Tensor& cu_q,
                                                  const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale,
                                                  int64_t wl, int64_t wr, double softcap,
                                                  const std::optional<Tensor>& alibi, bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic
  check_varlen(q_in, k_in, v_in, cu_q, cu_k, max_q, max_k);
  check_cu_values(cu_q, q_in.size(0), max_q, "cu_seqlens_q", "max_seqlen_q");
  check_cu_values(cu_k, k_in.size(0), max_k, "cu_seqlens_k", "max_seqlen_k");
  const Tensor q = cpu_compute(q_in), k = cpu_compute(k_in), v = cpu_compute(v_in);
  TORCH_CHECK_VALUE(dout_in.sizes() == q.sizes() && out_in.sizes() == q.sizes(), "dout, out: expected shape ",
                    shape_str(q));
  TORCH_CHECK_VALUE(lse_in.dim() == 2 && lse_in.size(0) == q.size(1) && lse_in.size(1) == q.size(0) &&
                        lse_in.scalar_type() == lse_type(q),
                    "lse: expected ", lse_type(q), " of shape (Hq, total_q), got ", shape_str(lse_in));
  BwdTensors t;
  t.dout = cpu_compute(dout_in).contiguous();
  t.out = cpu_compute(out_in).contiguous();
  t.lse = lse_in.contiguous();
  t.dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  t.dk = at::zeros_like(k, at::MemoryFormat::Contiguous);
  t.dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  auto back = [](const Tensor& g, const Tensor& like) { return g.to(like.scalar_type()); };
  if (q.numel() > 0 && k.numel() > 0 && cu_q.size(0) > 1) {
    AttnParams p = varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
    set_score_mod(p, softcap, alibi, q);
    set_varlen_bwd(p, t, dlse);
    p.deterministic = true;
    cpu_bwd(p, dtype_of(q));
  }
  return {back(t.dq, q_in), back(t.dk, k_in), back(t.dv, v_in)};
}

// ---------------------------------------------------------------------------------------- KV cache

// q (B, Hq, Sq, D). Contiguous cache: k_cache, v_cache (B, Hk, S_max, D). Paged: (num_pages, page_size,
// Hk, D) pools with block_table int32 (B, max_pages). cache_seqlens int32 (B,). k_new, v_new (B, Hk, S_new, D).
struct KvCall {
  bool paged = false;
  int64_t s_new = 0, capacity = 0, page_size = 0;
};

KvCall check_kvcache(const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& seqlens,
                     const std::optional<Tensor>& k_new, const std::optional<Tensor>& v_new,
                     const std::optional<Tensor>& block_table) {
  KvCall c;
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected 4-D (B, Hq, Sq, D), got shape ", shape_str(q));
  dtype_of(q);
  c.paged = block_table.has_value();
  TORCH_CHECK_VALUE(kc.dim() == 4 && vc.sizes() == kc.sizes(), "k_cache, v_cache: expected two 4-D tensors of one shape, got ",
                    shape_str(kc), " and ", shape_str(vc));
  TORCH_CHECK_TYPE(kc.scalar_type() == q.scalar_type() && vc.scalar_type() == q.scalar_type(),
                   "k_cache, v_cache: expected q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(kc.device() == q.device() && vc.device() == q.device() && seqlens.device() == q.device(),
                    "k_cache, v_cache, cache_seqlens: expected q's device ", q.device());
  TORCH_CHECK_VALUE(kc.size(3) == q.size(3), "k_cache: expected head dim ", q.size(3), ", got ", shape_str(kc));
  for (auto* t : {&kc, &vc})
    TORCH_CHECK_VALUE(t->size(3) <= 1 || t->stride(3) == 1, "k_cache, v_cache: expected unit stride in D");
  const int64_t hk = c.paged ? kc.size(2) : kc.size(1);
  TORCH_CHECK_VALUE(hk > 0 && q.size(1) % hk == 0, "k_cache: expected a head count dividing q's ", q.size(1),
                    ", got ", hk);
  TORCH_CHECK_TYPE(seqlens.scalar_type() == at::kInt, "cache_seqlens: expected int32, got ", seqlens.scalar_type());
  TORCH_CHECK_VALUE(seqlens.dim() == 1 && seqlens.size(0) == q.size(0) && seqlens.is_contiguous(),
                    "cache_seqlens: expected a contiguous (B,) = (", q.size(0), ",) tensor, got ", shape_str(seqlens));
  if (c.paged) {
    const Tensor& bt = *block_table;
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kInt, "block_table: expected int32, got ", bt.scalar_type());
    TORCH_CHECK_VALUE(bt.dim() == 2 && bt.size(0) == q.size(0) && bt.stride(1) == 1 && bt.device() == q.device(),
                      "block_table: expected (B, max_pages) with unit stride in the last dim on q's device, got ",
                      shape_str(bt));
    c.page_size = kc.size(1);
    c.capacity = bt.size(1) * c.page_size;
  } else {
    TORCH_CHECK_VALUE(kc.size(0) == q.size(0), "k_cache: expected batch ", q.size(0), ", got ", shape_str(kc));
    c.capacity = kc.size(2);
  }
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), "k_new, v_new: expected both or neither");
  if (k_new.has_value()) {
    const Tensor& kn = *k_new;
    TORCH_CHECK_VALUE(kn.dim() == 4 && kn.size(0) == q.size(0) && kn.size(1) == hk && kn.size(3) == q.size(3) &&
                          v_new->sizes() == kn.sizes(),
                      "k_new, v_new: expected (B, Hk, S_new, D) = (", q.size(0), ", ", hk, ", S_new, ", q.size(3),
                      "), got ", shape_str(kn), " and ", shape_str(*v_new));
    TORCH_CHECK_TYPE(kn.scalar_type() == q.scalar_type() && v_new->scalar_type() == q.scalar_type(),
                     "k_new, v_new: expected q's dtype ", q.scalar_type());
    c.s_new = kn.size(2);
  }
  return c;
}

// Writes k_new / v_new into the cache at positions cache_seqlens[b] + t, on the device, without reading
// any value on the host (index_put_ with device index tensors).
void kvcache_append(const Tensor& kc, const Tensor& vc, const Tensor& seqlens, const Tensor& k_new,
                    const Tensor& v_new, const std::optional<Tensor>& block_table, const KvCall& c) {
  if (c.s_new == 0 || k_new.size(0) == 0) return;
  const auto iopt = seqlens.options().dtype(at::kLong);
  const Tensor pos = seqlens.to(at::kLong).unsqueeze(1) + at::arange(c.s_new, iopt).unsqueeze(0);  // (B, S_new)
  const Tensor kn = k_new.permute({0, 2, 1, 3}), vn = v_new.permute({0, 2, 1, 3});          // (B, S_new, Hk, D)
  if (c.paged) {
    const Tensor page = block_table->to(at::kLong).gather(1, at::floor_divide(pos, c.page_size));
    const Tensor slot = at::remainder(pos, c.page_size);
    kc.index_put_({page, slot}, kn);
    vc.index_put_({page, slot}, vn);
  } else {
    const Tensor bidx = at::arange(k_new.size(0), iopt).unsqueeze(1).expand_as(pos);
    using at::indexing::Slice;
    Tensor kk = kc, vv = vc;  // handles to the same storage: index_put_ writes the caller's cache
    kk.index_put_({bidx, Slice(), pos}, kn);
    vv.index_put_({bidx, Slice(), pos}, vn);
  }
}

AttnParams kvcache_params(const Tensor& q, const Tensor& kc, const Tensor& vc, const Tensor& seqlens,
                          const std::optional<Tensor>& block_table, const KvCall& c, double scale, int64_t wl,
                          int64_t wr) {
  // Paged pool (num_pages, page_size, Hk, D): (page, head, slot) strides, pages found through block_table.
  const Strides ks = c.paged ? Strides{kc.stride(0), kc.stride(2), kc.stride(1)} : strides_of(kc);
  const Strides vs = c.paged ? Strides{vc.stride(0), vc.stride(2), vc.stride(1)} : strides_of(vc);
  AttnParams p = common_params(q, kc, vc, {q.size(0), q.size(1), kc.size(c.paged ? 2 : 1), q.size(2), c.capacity,
                                           q.size(3)}, strides_of(q), ks, vs, scale, wl, wr);
  p.seqlens_k = seqlens.data_ptr<int32_t>();
  p.seqlens_k_add = c.s_new;
  if (c.paged) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_b = block_table->stride(0);
    p.page_size = c.page_size;
    p.num_pages = kc.size(0);
  }
  return p;
}

// CPU: the cache is read in its own dtype by cpu_kvcache_fwd (kernels.h), which computes in fp32 (fp64 for
// fp64), splits the key range over threads and merges the parts by their lse.
std::tuple<Tensor, Tensor> kvcache_fwd_cpu(const Tensor& q, const Tensor& kc, const Tensor& vc,
                                           const Tensor& seqlens, const std::optional<Tensor>& k_new,
                                           const std::optional<Tensor>& v_new,
                                           const std::optional<Tensor>& block_table, double scale, int64_t wl,
                                           int64_t wr, double softcap, const std::optional<Tensor>& alibi,
                                           int64_t num_splits) {
  const KvCall c = check_kvcache(q, kc, vc, seqlens, k_new, v_new, block_table);
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits: expected >= 0 (0 picks), got ", num_splits);
  {
    const int32_t* sl = seqlens.data_ptr<int32_t>();
    for (int64_t b = 0; b < q.size(0); ++b)
      TORCH_CHECK_VALUE(sl[b] >= 0 && sl[b] + c.s_new <= c.capacity, "cache_seqlens: sequence ", b, " holds ",
                        sl[b], " tokens; with ", c.s_new, " new ones that is outside the cache's capacity of ",
                        c.capacity);
    if (c.paged) {
      const Tensor& bt = *block_table;
      const int64_t np = kc.size(0);
      for (int64_t b = 0; b < q.size(0); ++b)
        for (int64_t pg = 0; pg < cdiv(sl[b] + c.s_new, c.page_size); ++pg) {
          const int32_t e = bt.data_ptr<int32_t>()[b * bt.stride(0) + pg];
          TORCH_CHECK_VALUE(e >= 0 && e < np, "block_table: entry [", b, ", ", pg, "] = ", e,
                            " is outside [0, num_pages = ", np, ")");
        }
    }
  }
  if (k_new.has_value()) kvcache_append(kc, vc, seqlens, *k_new, *v_new, block_table, c);
  Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_type(q)));
  if (q.numel() == 0) return {out, lse};
  AttnParams p = kvcache_params(q, kc, vc, seqlens, block_table, c, scale, wl, wr);
  set_score_mod(p, softcap, alibi, q);
  set_out(p, out, lse);
  p.num_splits = num_splits;
  cpu_kvcache_fwd(p, dtype_of(q));
  return {out, lse};
}

// --------------------------------------------------------------------------------------------- CUDA
#ifdef FA_WITH_CUDA

// The compiled tensor-core head dim that runs head dim d (the smallest one >= d), or 0.
int tc_head_dim(DType dt, int64_t d) {
  if (d % 8 != 0) return 0;
  for (int i = 0; i < kNumTcHeadDims; ++i)
    if (kTcHeadDims[i] >= d && tc_has(dt, kTcHeadDims[i])) return kTcHeadDims[i];
  return 0;
}

int checked_tc_head_dim(const Tensor& q) {
  const DType dt = dtype_of(q);
  const int hd = tc_head_dim(dt, q.size(-1));
  TORCH_CHECK_VALUE(hd > 0, "q: head dim ", q.size(-1), " is not supported by the CUDA ", q.scalar_type(),
                    " kernels of this build: expected D <= 256 with D % 8 == 0 (see fused_attn.build_info())");
  return hd;
}

bool is_tc(const Tensor& q) { return q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16; }

// The tensor-core kernels move rows in 16-byte pieces: every row must start 16-byte aligned. A view
// that breaks this (an odd storage offset or row stride) is copied; ordinary tensors never are.
// (B, H, S, D) or packed (total, H, D).
Tensor rows_aligned(const Tensor& t) {
  if (t.numel() == 0) return t;
  const int64_t e = static_cast<int64_t>(t.element_size());
  const int64_t last = t.dim() - 1;
  bool ok = t.stride(last) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i < last && ok; ++i) ok = t.size(i) <= 1 || (t.stride(i) * e) % 16 == 0;
  return ok ? t : t.contiguous();
}

// The Hopper kernels read through tensor maps, whose strides must be positive multiples of 16 bytes: a
// tensor with a zero stride in a dimension of size > 1 (an expanded one) is copied.
Tensor tma_ready(const Tensor& t) {
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && t.stride(i) == 0) return t.contiguous();
  return t;
}

// What the chosen tensor-core family reads: 16-byte aligned rows, and for the Hopper kernels (hd90 != 0)
// strides a tensor map can describe.
Tensor kernel_ready(const Tensor& t, int hd90) { return hd90 ? tma_ready(rows_aligned(t)) : rows_aligned(t); }

// The Hopper head dim that runs q on its device (0: the mma.sync kernels run; fused_attn/_ops.py's
// kernel_tiles makes the same choice through bindings.cpp). q is (B, H, S, D), or packed (total, H, D).
int sm90_head_dim_for(const Tensor& q) {
  return is_tc(q) ? sm90_choose(q.get_device(), dtype_of(q), q.size(q.dim() - 1)) : 0;
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale,
                                    int64_t wl, int64_t wr, at::TensorList sparse_in, at::IntArrayRef sparse_shape,
                                    double softcap, const std::optional<Tensor>& alibi) {
  check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int hd90 = sm90_head_dim_for(q_in);
  const Tensor q = kernel_ready(q_in, hd90), k = kernel_ready(k_in, hd90), v = kernel_ready(v_in, hd90);
  std::vector<Tensor> sparse(sparse_in.begin(), sparse_in.end());
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_type(q)));
  const int hd = is_tc(q) && !hd90 ? checked_tc_head_dim(q) : 0;
  if (q.numel() == 0) return {out, lse};
  if (k.size(2) == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  AttnParams p = base_params(q, k, v, scale, wl, wr);
  set_sparse(p, sparse, sparse_shape, false, q);
  set_score_mod(p, softcap, alibi, q);
  set_out(p, out, lse);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (hd90) {
    check_tiles(p, sm90_tiles(hd90).fwd_tq, sm90_tiles(hd90).fwd_tk, "Hopper forward");
    sm90_fwd(p, dtype_of(q), hd90, stream);
  } else if (hd) {
    check_tiles(p, tc_tiles(hd).fwd_tq, tc_tiles(hd).fwd_tk, "tensor-core forward");
    tc_fwd(p, dtype_of(q), hd, stream);
  } else {
    check_tiles(p, kGenericTiles.fwd_tq, kGenericTiles.fwd_tk, "fp32/fp64 forward");
    generic_fwd(p, dtype_of(q), stream);
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cuda(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                            const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                            const std::optional<Tensor>& dlse, double scale, int64_t wl,
                                            int64_t wr, at::TensorList sparse_in, at::IntArrayRef sparse_shape,
                                            bool deterministic, double softcap,
                                            const std::optional<Tensor>& alibi) {
  check_qkv(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int hd90 = sm90_head_dim_for(q_in);
  const Tensor q = kernel_ready(q_in, hd90), k = kernel_ready(k_in, hd90), v = kernel_ready(v_in, hd90);
  check_bwd_shapes(q, dout_in, out_in, lse_in);
  BwdTensors t;
  // dO arrives with whatever strides autograd made (an expanded scalar gradient has stride 0).
  t.dout = kernel_ready(dout_in.to(q.scalar_type()), hd90);
  t.out = kernel_ready(out_in, hd90);
  t.lse = lse_in.contiguous();
  std::vector<Tensor> sparse(sparse_in.begin(), sparse_in.end());
  t.dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  t.dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  t.dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const int hd = is_tc(q) && !hd90 ? checked_tc_head_dim(q) : 0;
  if (q.numel() == 0 || k.numel() == 0) return {t.dq.zero_(), t.dk.zero_(), t.dv.zero_()};
  AttnParams p = base_params(q, k, v, scale, wl, wr);
  set_sparse(p, sparse, sparse_shape, true, q);
  set_score_mod(p, softcap, alibi, q);
  set_bwd(p, t, dlse);
  Tensor dq_accum;
  p.deterministic = deterministic || env_deterministic() || at::globalContext().deterministicAlgorithms();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (hd90 || hd) {
    const int h = hd90 ? hd90 : hd;
    const TileShape tiles = hd90 ? sm90_tiles(hd90) : tc_tiles(hd);
    check_tiles(p, tiles.bwd_tq, tiles.bwd_tk, hd90 ? "Hopper backward" : "tensor-core backward");
    if (!p.deterministic) {
      dq_accum = at::zeros({q.size(0), q.size(1), cdiv(q.size(2), tiles.bwd_tq) * tiles.bwd_tq, h},
                           q.options().dtype(at::kFloat));
      p.dq_accum = dq_accum.data_ptr<float>();
      p.dqa_b = dq_accum.stride(0);
      p.dqa_h = dq_accum.stride(1);
      p.dqa_s = dq_accum.stride(2);
    }
    if (hd90)
      sm90_bwd(p, dtype_of(q), hd90, stream);
    else
      tc_bwd(p, dtype_of(q), hd, stream);
  } else {
    check_tiles(p, kGenericTiles.bwd_tq, kGenericTiles.bwd_tk, "fp32/fp64 backward");
    generic_bwd(p, dtype_of(q), stream);
  }
  return {t.dq, t.dk, t.dv};
}

// Packed variable-length batches on the CUDA kernels (the same kernels as fwd_cuda / bwd_cuda, reading each
// sequence's offsets and lengths from cu_seqlens on the device). max_seqlen_q / max_seqlen_k size the
// grids; nothing is read back to the host. Rows outside every sequence (only possible with cu_seqlens the
// Python layer did not check) are left as allocated: AttnParams::seq clamps every sequence to the packed
// tensors, so such input gives a wrong answer there but no access outside the tensors.
std::tuple<Tensor, Tensor> varlen_fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                           const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k,
                                           double scale, int64_t wl, int64_t wr, double softcap,
                                           const std::optional<Tensor>& alibi) {
  check_varlen(q_in, k_in, v_in, cu_q, cu_k, max_q, max_k);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int hd90 = sm90_head_dim_for(q_in);
  const Tensor q = kernel_ready(q_in, hd90), k = kernel_ready(k_in, hd90), v = kernel_ready(v_in, hd90);
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(lse_type(q)));
  const int hd = is_tc(q) && !hd90 ? checked_tc_head_dim(q) : 0;
  AttnParams p = varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
  set_score_mod(p, softcap, alibi, q);
  if (q.numel() == 0 || p.batch == 0) return {out, lse};
  // No sequence has a key (or a query): every row sees nothing.
  if (k.size(0) == 0 || max_k == 0 || max_q == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  set_varlen_out(p, out, lse);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (hd90)
    sm90_fwd(p, dtype_of(q), hd90, stream);
  else if (hd)
    tc_fwd(p, dtype_of(q), hd, stream);
  else
    generic_fwd(p, dtype_of(q), stream);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_bwd_cuda(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                   const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                   const std::optional<Tensor>& dlse, const Tensor& cu_q,
                                                   const Tensor& cu_k, int64_t max_q, int64_t max_k, double scale,
                                                   int64_t wl, int64_t wr, double softcap,
                                                   const std::optional<Tensor>& alibi, bool deterministic) {
  check_varlen(q_in, k_in, v_in, cu_q, cu_k, max_q, max_k);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int hd90 = sm90_head_dim_for(q_in);
  const Tensor q = kernel_ready(q_in, hd90), k = kernel_ready(k_in, hd90), v = kernel_ready(v_in, hd90);
  TORCH_CHECK_VALUE(dout_in.sizes() == q.sizes() && out_in.sizes() == q.sizes(), "dout, out: expected shape ",
                    shape_str(q), ", got ", shape_str(dout_in), " and ", shape_str(out_in));
  TORCH_CHECK_VALUE(lse_in.dim() == 2 && lse_in.size(0) == q.size(1) && lse_in.size(1) == q.size(0) &&
                        lse_in.scalar_type() == lse_type(q),
                    "lse: expected ", lse_type(q), " of shape (Hq, total_q), got ", shape_str(lse_in));
  BwdTensors t;
  t.dout = kernel_ready(dout_in.to(q.scalar_type()), hd90);
  t.out = kernel_ready(out_in, hd90);
  t.lse = lse_in.contiguous();
  t.dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  t.dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  t.dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const int hd = is_tc(q) && !hd90 ? checked_tc_head_dim(q) : 0;
  AttnParams p = varlen_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, wl, wr);
  set_score_mod(p, softcap, alibi, q);
  if (q.numel() == 0 || k.numel() == 0 || p.batch == 0 || max_q == 0 || max_k == 0)
    return {t.dq.zero_(), t.dk.zero_(), t.dv.zero_()};
  set_varlen_bwd(p, t, dlse);
  p.deterministic = deterministic || env_deterministic() || at::globalContext().deterministicAlgorithms();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  Tensor dq_accum;
  if (hd90 || hd) {
    if (!p.deterministic) {
      // (Hq, total_q, head dim of the kernel): the rows of lse, no padding (params.h, dq_accum).
      dq_accum = at::zeros({q.size(1), q.size(0), hd90 ? hd90 : hd}, q.options().dtype(at::kFloat));
      p.dq_accum = dq_accum.data_ptr<float>();
      p.dqa_b = 0;
      p.dqa_h = dq_accum.stride(0);
      p.dqa_s = dq_accum.stride(1);
    }
    if (hd90)
      sm90_bwd(p, dtype_of(q), hd90, stream);
    else
      tc_bwd(p, dtype_of(q), hd, stream);
  } else {
    generic_bwd(p, dtype_of(q), stream);
  }
  return {t.dq, t.dk, t.dv};
}

// The tensor-core decode kernel copies cache rows in 16-byte pieces; the cache is written in place (and a
// paged pool is shared), so it is never copied: a view whose rows do not start 16-byte aligned is an error.
void check_rows_aligned(const Tensor& t, const char* name) {
  const int64_t e = static_cast<int64_t>(t.element_size());
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3 && ok; ++i) ok = t.size(i) <= 1 || (t.stride(i) * e) % 16 == 0;
  TORCH_CHECK_VALUE(ok, name, ": the CUDA kernels read its rows in 16-byte pieces: expected a 16-byte aligned "
                    "start and strides that are multiples of 16 bytes, got strides ", t.strides());
}

// No host synchronisation: lengths and page-table entries are read on the GPU (the Python layer checked
// them once), num_splits = 0 is decided from the shapes and the SM count, the append is a device-side
// index_put_.
std::tuple<Tensor, Tensor> kvcache_fwd_cuda(const Tensor& q_in, const Tensor& kc, const Tensor& vc,
                                            const Tensor& seqlens, const std::optional<Tensor>& k_new,
                                            const std::optional<Tensor>& v_new,
                                            const std::optional<Tensor>& block_table, double scale, int64_t wl,
                                            int64_t wr, double softcap, const std::optional<Tensor>& alibi,
                                            int64_t num_splits) {
  const KvCall c = check_kvcache(q_in, kc, vc, seqlens, k_new, v_new, block_table);
  TORCH_CHECK_VALUE(num_splits >= 0, "num_splits: expected >= 0 (0 picks), got ", num_splits);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const bool tc = is_tc(q_in);
  const Tensor q = tc ? rows_aligned(q_in) : q_in;
  const int hd = tc ? checked_tc_head_dim(q) : 0;
  if (tc) {
    check_rows_aligned(kc, "k_cache");
    check_rows_aligned(vc, "v_cache");
  }
  if (k_new.has_value()) kvcache_append(kc, vc, seqlens, *k_new, *v_new, block_table, c);
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_type(q)));
  if (q.numel() == 0) return {out, lse};
  AttnParams p = kvcache_params(q, kc, vc, seqlens, block_table, c, scale, wl, wr);
  set_score_mod(p, softcap, alibi, q);
  set_out(p, out, lse);
  int sms = 0;
  if (num_splits == 0 && cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.get_device()) != cudaSuccess) {
    (void)cudaGetLastError();  // not left behind for the launch checks
    sms = 0;
  }
  p.num_splits = num_splits > 0 ? num_splits : decode_splits(p, tc, sms);
  Tensor o_part, lse_part;
  if (p.num_splits > 1) {
    const auto wopt = q.options().dtype(lse_type(q));
    o_part = at::empty({p.num_splits, q.size(0), q.size(1), q.size(2), q.size(3)}, wopt);
    lse_part = at::empty({p.num_splits, q.size(0), q.size(1), q.size(2)}, wopt);
    p.o_part = o_part.data_ptr();
    p.lse_part = lse_part.data_ptr();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (tc)
    tc_decode(p, dtype_of(q), hd, stream);
  else
    generic_decode(p, dtype_of(q), stream);
  return {out, lse};
}
#endif  // FA_WITH_CUDA

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY(fused_attn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, Tensor[] sparse, "
      "int[] sparse_shape, float softcap=0.0, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, float scale, "
      "int window_left, int window_right, Tensor[] sparse, int[] sparse_shape, bool deterministic, "
      "float softcap=0.0, Tensor? alibi_slopes=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float scale, int window_left, int window_right, float softcap, Tensor? alibi_slopes) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, "
      "int window_left, int window_right, float softcap, Tensor? alibi_slopes, bool deterministic) -> "
      "(Tensor dq, Tensor dk, Tensor dv)");
  // Writes k_new / v_new into k_cache / v_cache in place (hence the alias annotations), then attends.
  m.def(
      "kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
      "Tensor? v_new, Tensor? block_table, float scale, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes, int num_splits) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("fwd", &fused_attn::fwd_cpu);
  m.impl("bwd", &fused_attn::bwd_cpu);
  m.impl("varlen_fwd", &fused_attn::varlen_fwd_cpu);
  m.impl("varlen_bwd", &fused_attn::varlen_bwd_cpu);
  m.impl("kvcache_fwd", &fused_attn::kvcache_fwd_cpu);
}

#ifdef FA_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("fwd", &fused_attn::fwd_cuda);
  m.impl("bwd", &fused_attn::bwd_cuda);
  m.impl("varlen_fwd", &fused_attn::varlen_fwd_cuda);
  m.impl("varlen_bwd", &fused_attn::varlen_bwd_cuda);
  m.impl("kvcache_fwd", &fused_attn::kvcache_fwd_cuda);
}
#endif
