// Op schemas, argument checks and dispatch. Host code only: kernels live in cpu/ and cuda/.
//
// Two ops in the namespace fused_attn:
//   fwd(q, k, v, scale, window_left, window_right, sparse, sparse_shape) -> (out, lse)
//   bwd(dout, q, k, v, out, lse, dlse, scale, window_left, window_right, sparse, sparse_shape,
//       deterministic) -> (dq, dk, dv)
// `sparse` is empty (no block layout) or the block mask's tensors prepared for this call's kernels:
//   [layout u8 (Bm, Hm, nqb, nkb), fwd kv counts, fwd kv indices, bwd kv counts, bwd kv indices,
//    bwd q counts, bwd q indices]
// and sparse_shape is [bq, bk, fwd_tq, fwd_tk, bwd_tq, bwd_tk]: the layout's block size and the tile
// granularity of each pass's lists (fused_attn/_ops.py builds both). The Python layer validates user
// input with friendly messages first; the checks here guard direct calls of the ops.
#include <ATen/ATen.h>
#include <torch/library.h>

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

AttnParams base_params(const Tensor& q, const Tensor& k, const Tensor& v, double scale, int64_t wl,
                       int64_t wr) {
  TORCH_CHECK_VALUE(wl >= -1 && wr >= -1, "window: expected entries >= -1, got (", wl, ", ", wr, ")");
  AttnParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = q.size(0);
  p.hq = q.size(1);
  p.hk = k.size(1);
  p.sq = q.size(2);
  p.sk = k.size(2);
  p.d = q.size(3);
  p.q_st = strides_of(q);
  p.k_st = strides_of(k);
  p.v_st = strides_of(v);
  p.scale = scale;
  p.window_left = wl;
  p.window_right = wr;
  return p;
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
  p.o = const_cast<void*>(t.out.data_ptr());
  p.o_st = strides_of(t.out);
  p.lse = const_cast<void*>(t.lse.data_ptr());
  p.lse_b = t.lse.stride(0);
  p.lse_h = t.lse.stride(1);
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

bool env_deterministic() {
  const char* e = std::getenv("FUSED_ATTN_DETERMINISTIC");
  return e && std::string(e) != "0" && std::string(e) != "";
}

// ---------------------------------------------------------------------------------------------- CPU

// fp16/bf16 run through the fp32 kernels: the CPU has no fast half arithmetic to use. Rows closer than
// D apart (a tensor expanded along S) are copied: the tile GEMMs need a leading dimension >= D.
Tensor cpu_compute(const Tensor& t) {
  const Tensor c = (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) ? t.to(at::kFloat) : t;
  return (c.dim() == 4 && c.size(2) > 1 && c.stride(2) < c.size(3)) ? c.contiguous() : c;
}

std::tuple<Tensor, Tensor> fwd_cpu(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale,
                                   int64_t wl, int64_t wr, at::TensorList sparse_in,
                                   at::IntArrayRef sparse_shape) {
  check_qkv(q_in, k_in, v_in);
  const Tensor q = cpu_compute(q_in), k = cpu_compute(k_in), v = cpu_compute(v_in);
  std::vector<Tensor> sparse(sparse_in.begin(), sparse_in.end());
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_type(q)));
  if (q.numel() == 0) return {out.to(q_in.scalar_type()), lse};
  if (k.size(2) == 0) return {out.zero_().to(q_in.scalar_type()), lse.fill_(-INFINITY)};
  AttnParams p = base_params(q, k, v, scale, wl, wr);
  set_sparse(p, sparse, sparse_shape, false, q);
  p.o = out.data_ptr();
  p.o_st = strides_of(out);
  p.lse = lse.data_ptr();
  p.lse_b = lse.stride(0);
  p.lse_h = lse.stride(1);
  cpu_fwd(p, dtype_of(q));
  return {out.to(q_in.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd_cpu(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                           const Tensor& v_in, const Tensor& out_in, const Tensor& lse,
                                           const std::optional<Tensor>& dlse, double scale, int64_t wl,
                                           int64_t wr, at::TensorList sparse_in, at::IntArrayRef sparse_shape,
                                           bool deterministic) {
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
  set_bwd(p, t, dlse);
  p.deterministic = true;
  cpu_bwd(p, dtype_of(q));
  return {back(t.dq, q_in), back(t.dk, k_in), back(t.dv, v_in)};
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
  const int hd = tc_head_dim(dt, q.size(3));
  TORCH_CHECK_VALUE(hd > 0, "q: head dim ", q.size(3), " is not supported by the CUDA ", q.scalar_type(),
                    " kernels of this build: expected D <= 256 with D % 8 == 0 (see fused_attn.build_info())");
  return hd;
}

bool is_tc(const Tensor& q) { return q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16; }

// The tensor-core kernels move rows in 16-byte pieces: every row must start 16-byte aligned. A view
// that breaks this (an odd storage offset or row stride) is copied; ordinary tensors never are.
Tensor rows_aligned(const Tensor& t) {
  if (t.numel() == 0) return t;
  const int64_t e = static_cast<int64_t>(t.element_size());
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int i = 0; i < 3 && ok; ++i) ok = t.size(i) <= 1 || (t.stride(i) * e) % 16 == 0;
  return ok ? t : t.contiguous();
}

std::tuple<Tensor, Tensor> fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, double scale,
                                    int64_t wl, int64_t wr, at::TensorList sparse_in, at::IntArrayRef sparse_shape) {
  check_qkv(q_in, k_in, v_in);
  const Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  const c10::cuda::CUDAGuard guard(q.device());
  std::vector<Tensor> sparse(sparse_in.begin(), sparse_in.end());
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_type(q)));
  const int hd = is_tc(q) ? checked_tc_head_dim(q) : 0;
  if (q.numel() == 0) return {out, lse};
  if (k.size(2) == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  AttnParams p = base_params(q, k, v, scale, wl, wr);
  set_sparse(p, sparse, sparse_shape, false, q);
  p.o = out.data_ptr();
  p.o_st = strides_of(out);
  p.lse = lse.data_ptr();
  p.lse_b = lse.stride(0);
  p.lse_h = lse.stride(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (hd) {
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
                                            bool deterministic) {
  check_qkv(q_in, k_in, v_in);
  const Tensor q = rows_aligned(q_in), k = rows_aligned(k_in), v = rows_aligned(v_in);
  const c10::cuda::CUDAGuard guard(q.device());
  check_bwd_shapes(q, dout_in, out_in, lse_in);
  BwdTensors t;
  // dO arrives with whatever strides autograd made (an expanded scalar gradient has stride 0).
  t.dout = rows_aligned(dout_in.to(q.scalar_type()));
  t.out = rows_aligned(out_in);
  t.lse = lse_in.contiguous();
  std::vector<Tensor> sparse(sparse_in.begin(), sparse_in.end());
  t.dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  t.dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  t.dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  const int hd = is_tc(q) ? checked_tc_head_dim(q) : 0;
  if (q.numel() == 0 || k.numel() == 0) return {t.dq.zero_(), t.dk.zero_(), t.dv.zero_()};
  AttnParams p = base_params(q, k, v, scale, wl, wr);
  set_sparse(p, sparse, sparse_shape, true, q);
  set_bwd(p, t, dlse);
  Tensor dq_accum;
  p.deterministic = deterministic || env_deterministic() || at::globalContext().deterministicAlgorithms();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (hd) {
    const TileShape tiles = tc_tiles(hd);
    check_tiles(p, tiles.bwd_tq, tiles.bwd_tk, "tensor-core backward");
    if (!p.deterministic) {
      dq_accum = at::zeros({q.size(0), q.size(1), cdiv(q.size(2), tiles.bwd_tq) * tiles.bwd_tq, hd},
                           q.options().dtype(at::kFloat));
      p.dq_accum = dq_accum.data_ptr<float>();
      p.dqa_b = dq_accum.stride(0);
      p.dqa_h = dq_accum.stride(1);
      p.dqa_s = dq_accum.stride(2);
    }
    tc_bwd(p, dtype_of(q), hd, stream);
  } else {
    check_tiles(p, kGenericTiles.bwd_tq, kGenericTiles.bwd_tk, "fp32/fp64 backward");
    generic_bwd(p, dtype_of(q), stream);
  }
  return {t.dq, t.dk, t.dv};
}
#endif  // FA_WITH_CUDA

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY(fused_attn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, Tensor[] sparse, "
      "int[] sparse_shape) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, float scale, "
      "int window_left, int window_right, Tensor[] sparse, int[] sparse_shape, bool deterministic) -> "
      "(Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("fwd", &fused_attn::fwd_cpu);
  m.impl("bwd", &fused_attn::bwd_cpu);
}

#ifdef FA_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("fwd", &fused_attn::fwd_cuda);
  m.impl("bwd", &fused_attn::bwd_cuda);
}
#endif
