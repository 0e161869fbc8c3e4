// Op schemas, argument checks and dispatch of linear (kernelized) attention. Host code only: the kernels
// live in cpu/linear.cpp. Two ops in the namespace fused_attn, added to the library of ops.cpp:
//   linear_fwd(q, k, v, s0?, z0?, causal, feature_map, normalize, scale, eps) -> (out, den, s, z)
//   linear_bwd(dout, ds?, dz?, q, k, v, out, den, s0?, z0?, causal, feature_map, normalize, scale, eps)
//       -> (dq, dk, dv, ds0, dz0)
// den (B, H, Sq) is each row's denominator (1 when not normalised), kept for the backward; (s, z) the
// state over all keys. State tensors are float32 (float64 for float64 inputs). fused_attn/_linear_ops.py
// registers fake kernels and autograd; fused_attn/_linear_args.py checks user input with friendly messages
// first, the checks here guard direct calls of the ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "linear_kernels.h"

#ifdef FA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime_api.h>

#include <cstdlib>

#include "cuda/linear_launch.h"
#endif

namespace fused_attn {
namespace {

using at::Tensor;

std::string lin_shape(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

FeatureMap feature_of(const std::string& name) {
  if (name == "elu1") return FeatureMap::elu1;
  if (name == "relu") return FeatureMap::relu;
  if (name == "identity") return FeatureMap::identity;
  TORCH_CHECK_VALUE(false, "feature_map: expected 'elu1', 'relu' or 'identity', got '", name, "'");
  return FeatureMap::elu1;
}

at::ScalarType state_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double eps) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected 4-D (B, H, Sq, Dk), got shape ", lin_shape(q));
  TORCH_CHECK_VALUE(k.dim() == 4, "k: expected 4-D (B, H, Sk, Dk), got shape ", lin_shape(k));
  TORCH_CHECK_VALUE(v.dim() == 4, "v: expected 4-D (B, H, Sk, Dv), got shape ", lin_shape(v));
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble,
                   "q: expected dtype float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK_TYPE(k.scalar_type() == st && v.scalar_type() == st, "k, v: expected the dtype of q (", st,
                   "), got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), "k, v: expected the device of q (",
                    q.device(), "), got ", k.device(), " and ", v.device());
  TORCH_CHECK_VALUE(q.size(3) > 0 && v.size(3) > 0, "q, v: expected head dims >= 1, got q ", lin_shape(q),
                    " and v ", lin_shape(v));
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    "k: expected (B, H, *, Dk) of q ", lin_shape(q), ", got ", lin_shape(k));
  TORCH_CHECK_VALUE(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
                    "v: expected (B, H, Sk, *) of k ", lin_shape(k), ", got ", lin_shape(v));
  TORCH_CHECK_VALUE(!causal || q.size(2) == k.size(2), "k: causal linear attention expects the length of q (",
                    q.size(2), "), got ", lin_shape(k));
  TORCH_CHECK_VALUE(eps >= 0, "eps: expected a float >= 0, got ", eps);
  for (const Tensor* t : {&q, &k, &v})
    TORCH_CHECK_VALUE(t->size(3) <= 1 || t->stride(3) == 1,
                      "q, k, v: expected unit stride in the head dim, got strides ", t->strides());
}

// Optional state-shaped tensors: (B, H, Dk, Dv) and (B, H, Dk) in the state dtype, both or neither.
void check_state(const char* what, const std::optional<Tensor>& s, const std::optional<Tensor>& z, const Tensor& q,
                 const Tensor& v, bool need_pair) {
  if (need_pair)
    TORCH_CHECK_VALUE(s.has_value() == z.has_value(), what, ": expected both tensors (S, z) or neither");
  const auto sd = state_type(q);
  if (s.has_value()) {
    TORCH_CHECK_VALUE(s->dim() == 4 && s->size(0) == q.size(0) && s->size(1) == q.size(1) &&
                          s->size(2) == q.size(3) && s->size(3) == v.size(3),
                      what, " S: expected shape (B, H, Dk, Dv) = (", q.size(0), ", ", q.size(1), ", ", q.size(3),
                      ", ", v.size(3), "), got ", lin_shape(*s));
    TORCH_CHECK_TYPE(s->scalar_type() == sd, what, " S: expected dtype ", sd, ", got ", s->scalar_type());
    TORCH_CHECK_VALUE(s->device() == q.device(), what, " S: expected the device of q");
  }
  if (z.has_value()) {
    TORCH_CHECK_VALUE(z->dim() == 3 && z->size(0) == q.size(0) && z->size(1) == q.size(1) && z->size(2) == q.size(3),
                      what, " z: expected shape (B, H, Dk) = (", q.size(0), ", ", q.size(1), ", ", q.size(3),
                      "), got ", lin_shape(*z));
    TORCH_CHECK_TYPE(z->scalar_type() == sd, what, " z: expected dtype ", sd, ", got ", z->scalar_type());
    TORCH_CHECK_VALUE(z->device() == q.device(), what, " z: expected the device of q");
  }
}

DType kernel_dtype(const Tensor& t) { return t.scalar_type() == at::kDouble ? DType::f64 : DType::f32; }

// fp16/bf16 run through the fp32 kernels (the CPU has no fast half arithmetic to use).
Tensor compute(const Tensor& t) {
  return (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) ? t.to(at::kFloat) : t;
}

Strides strides4(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

LinearParams base(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, const std::string& fm,
                  bool normalize, double scale, double eps) {
  LinearParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.sq = q.size(2);
  p.sk = k.size(2);
  p.dk_dim = q.size(3);
  p.dv_dim = v.size(3);
  p.q_st = strides4(q);
  p.k_st = strides4(k);
  p.v_st = strides4(v);
  p.causal = causal;
  p.normalize = normalize;
  p.feature = feature_of(fm);
  p.scale = scale;
  p.eps = eps;
  return p;
}

// Contiguous copies of the optional state tensors (initial state s0/z0; in the backward also the incoming
// state gradients ds/dz), kept alive for the kernels; p points at them.
struct StateIn {
  Tensor s0, z0, ds, dz;
};
StateIn set_state_in(LinearParams& p, const std::optional<Tensor>& s0_in, const std::optional<Tensor>& z0_in,
                     const std::optional<Tensor>& ds_in = std::nullopt,
                     const std::optional<Tensor>& dz_in = std::nullopt) {
  StateIn st;
  if (s0_in.has_value()) {
    st.s0 = s0_in->contiguous();
    st.z0 = z0_in->contiguous();
    p.s0 = st.s0.data_ptr();
    p.z0 = st.z0.data_ptr();
  }
  if (ds_in.has_value()) {
    st.ds = ds_in->contiguous();
    p.ds_out = st.ds.data_ptr();
  }
  if (dz_in.has_value()) {
    st.dz = dz_in->contiguous();
    p.dz_out = st.dz.data_ptr();
  }
  return st;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_fwd_cpu(const Tensor& q_in, const Tensor& k_in,
                                                          const Tensor& v_in, const std::optional<Tensor>& s0_in,
                                                          const std::optional<Tensor>& z0_in, bool causal,
                                                          std::string feature_map, bool normalize, double scale,
                                                          double eps) {
  check_inputs(q_in, k_in, v_in, causal, eps);
  check_state("initial state", s0_in, z0_in, q_in, v_in, true);
  TORCH_CHECK_VALUE(causal || !s0_in.has_value(), "initial_state: only causal linear attention continues a "
                    "sequence; got causal=False with an initial state");
  const Tensor q = compute(q_in), k = compute(k_in), v = compute(v_in);
  const auto sd = state_type(q_in);
  const int64_t b = q.size(0), h = q.size(1), dk = q.size(3), dv = v.size(3);
  Tensor out = at::empty({b, h, q.size(2), dv}, q.options());
  Tensor den = at::empty({b, h, q.size(2)}, q.options().dtype(sd));
  Tensor s = at::empty({b, h, dk, dv}, q.options().dtype(sd));
  Tensor z = at::empty({b, h, dk}, q.options().dtype(sd));
  LinearParams p = base(q, k, v, causal, feature_map, normalize, scale, eps);
  const StateIn state = set_state_in(p, s0_in, z0_in);
  p.o = out.data_ptr();
  p.o_st = strides4(out);
  p.den = den.data_ptr();
  p.s_out = s.data_ptr();
  p.z_out = z.data_ptr();
  if (b * h > 0) cpu_linear_fwd(p, kernel_dtype(q));
  return {out.to(q_in.scalar_type()), den, s, z};
}

// The backward's gradient inputs and outputs: dout, out, den in; dq, dk, dv, ds0, dz0 out (CPU and CUDA).
void set_bwd_io(LinearParams& p, const Tensor& dout, const Tensor& out, const Tensor& den, Tensor& dq, Tensor& dk,
                Tensor& dv, Tensor& ds0, Tensor& dz0) {
  p.dout = dout.data_ptr();
  p.do_st = strides4(dout);
  p.o = const_cast<void*>(out.data_ptr());
  p.o_st = strides4(out);
  p.den = const_cast<void*>(den.data_ptr());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_st = strides4(dq);
  p.dk_st = strides4(dk);
  p.dv_st = strides4(dv);
  p.ds0 = ds0.data_ptr();
  p.dz0 = dz0.data_ptr();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_bwd_cpu(
    const Tensor& dout_in, const std::optional<Tensor>& ds_in, const std::optional<Tensor>& dz_in,
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out_in, const Tensor& den_in,
    const std::optional<Tensor>& s0_in, const std::optional<Tensor>& z0_in, bool causal, std::string feature_map,
    bool normalize, double scale, double eps) {
  check_inputs(q_in, k_in, v_in, causal, eps);
  check_state("initial state", s0_in, z0_in, q_in, v_in, true);
  check_state("state gradient", ds_in, dz_in, q_in, v_in, false);
  const auto sd = state_type(q_in);
  const int64_t b = q_in.size(0), h = q_in.size(1), sq = q_in.size(2), dk = q_in.size(3), dv = v_in.size(3);
  TORCH_CHECK_VALUE(dout_in.dim() == 4 && dout_in.size(0) == b && dout_in.size(1) == h && dout_in.size(2) == sq &&
                        dout_in.size(3) == dv && out_in.sizes() == dout_in.sizes(),
                    "dout, out: expected shape (B, H, Sq, Dv) = (", b, ", ", h, ", ", sq, ", ", dv, "), got ",
                    lin_shape(dout_in), " and ", lin_shape(out_in));
  TORCH_CHECK_VALUE(den_in.dim() == 3 && den_in.size(0) == b && den_in.size(1) == h && den_in.size(2) == sq &&
                        den_in.scalar_type() == sd,
                    "den: expected ", sd, " of shape (B, H, Sq), got ", lin_shape(den_in));
  const Tensor q = compute(q_in), k = compute(k_in), v = compute(v_in);
  const auto ct = q.scalar_type();
  // dO arrives with whatever strides autograd made (an expanded scalar gradient has stride 0 in every
  // dim): rows are read through strides, but the head dim must be unit stride.
  const Tensor dout = dout_in.to(ct).contiguous();
  const Tensor out = out_in.to(ct).contiguous();
  const Tensor den = den_in.contiguous();
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk_t = at::empty(k.sizes(), k.options());
  Tensor dv_t = at::empty(v.sizes(), v.options());
  Tensor ds0 = at::empty({b, h, dk, dv}, q.options().dtype(sd));
  Tensor dz0 = at::empty({b, h, dk}, q.options().dtype(sd));
  LinearParams p = base(q, k, v, causal, feature_map, normalize, scale, eps);
  const StateIn state = set_state_in(p, s0_in, z0_in, ds_in, dz_in);
  set_bwd_io(p, dout, out, den, dq, dk_t, dv_t, ds0, dz0);
  if (b * h > 0) cpu_linear_bwd(p, kernel_dtype(q));
  const auto back = q_in.scalar_type();
  return {dq.to(back), dk_t.to(back), dv_t.to(back), ds0, dz0};
}

// --------------------------------------------------------------------------------------------- CUDA
#ifdef FA_WITH_CUDA

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kFloat: return DType::f32;
    default: return DType::f64;
  }
}

// The tensor-core kernel moves rows in 16-byte pieces: a view whose rows do not start 16-byte aligned is
// copied (ordinary tensors never are).
Tensor rows_aligned16(const Tensor& t) {
  if (t.numel() == 0) return t;
  const int64_t e = static_cast<int64_t>(t.element_size());
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i < 3 && ok; ++i) ok = t.size(i) <= 1 || (t.stride(i) * e) % 16 == 0;
  return ok ? t : t.contiguous();
}

// Segments of the tensor-core kernels' two-level scan: enough (batch x head, segment) blocks for two per SM,
// each segment at least two 64-row chunks (a segment costs one extra pass over its keys for its sum); 1
// when batch x head alone fill the GPU. FUSED_ATTN_LINEAR_SEGMENTS=n forces n (tests), clamped to the chunks.
int64_t sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 1;
  }
  return n;
}

int64_t pick_segments(int64_t bh, int64_t rows, int device) {
  const int64_t nch = (rows + 63) / 64;
  int64_t n;
  if (const char* env = std::getenv("FUSED_ATTN_LINEAR_SEGMENTS")) {
    n = std::atoll(env);
  } else {
    const int64_t sms = sm_count(device);
    n = bh >= 2 * sms ? 1 : std::min((2 * sms + bh - 1) / bh, nch / 2);
  }
  n = std::min<int64_t>(std::min<int64_t>(n, nch), 65535);
  return (n < 2 || bh > 65535) ? 1 : n;
}

// Allocates the scan's slots when p.segments > 1.
Tensor set_segments(LinearParams& p, const Tensor& q) {
  p.segments = pick_segments(p.batch * p.heads, std::max(p.sq, p.sk), q.device().index());
  if (p.segments == 1) return Tensor();
  Tensor t = at::empty({p.batch * p.heads * (p.segments + 1) * (p.dk_dim * p.dv_dim + 2 * p.dk_dim)},
                       q.options().dtype(at::kFloat));
  p.seg_state = t.data_ptr();
  return t;
}

void check_cuda_dims(const Tensor& q, const Tensor& v) {
  const int64_t mx = linear_generic_max_d();
  TORCH_CHECK_VALUE(q.size(3) <= mx && v.size(3) <= mx, "q, v: the CUDA linear-attention kernels take head dims <= ",
                    mx, ", got Dk = ", q.size(3), " and Dv = ", v.size(3));
}

// fp16 / bf16 with Dk, Dv multiples of 8 <= 128: the tensor-core kernels on the inputs as they are. Everything
// else on the fp32 / fp64 kernels, fp16 / bf16 (other head dims) upcast to fp32 around them.
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_fwd_cuda(const Tensor& q_in, const Tensor& k_in,
                                                           const Tensor& v_in, const std::optional<Tensor>& s0_in,
                                                           const std::optional<Tensor>& z0_in, bool causal,
                                                           std::string feature_map, bool normalize, double scale,
                                                           double eps) {
  check_inputs(q_in, k_in, v_in, causal, eps);
  check_state("initial state", s0_in, z0_in, q_in, v_in, true);
  TORCH_CHECK_VALUE(causal || !s0_in.has_value(), "initial_state: only causal linear attention continues a "
                    "sequence; got causal=False with an initial state");
  check_cuda_dims(q_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const bool tc = (q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16) &&
                  linear_tc_fits(q_in.size(3), v_in.size(3));
  const Tensor q = tc ? rows_aligned16(q_in) : compute(q_in);
  const Tensor k = tc ? rows_aligned16(k_in) : compute(k_in);
  const Tensor v = tc ? rows_aligned16(v_in) : compute(v_in);
  const auto sd = state_type(q_in);
  const int64_t b = q.size(0), h = q.size(1), dk = q.size(3), dv = v.size(3);
  Tensor out = at::empty({b, h, q.size(2), dv}, q.options());
  Tensor den = at::empty({b, h, q.size(2)}, q.options().dtype(sd));
  Tensor s = at::empty({b, h, dk, dv}, q.options().dtype(sd));
  Tensor z = at::empty({b, h, dk}, q.options().dtype(sd));
  if (b * h == 0) return {out.to(q_in.scalar_type()), den, s, z};
  LinearParams p = base(q, k, v, causal, feature_map, normalize, scale, eps);
  const StateIn state = set_state_in(p, s0_in, z0_in);
  Tensor work;
  if (!tc) {
    work = at::empty({b, h, dk, dv}, q.options().dtype(at::kDouble));
    p.work = work.data_ptr();
  } else {
    work = set_segments(p, q);
  }
  p.o = out.data_ptr();
  p.o_st = strides4(out);
  p.den = den.data_ptr();
  p.s_out = s.data_ptr();
  p.z_out = z.data_ptr();
  linear_cuda_fwd(p, tc ? dtype_of(q) : kernel_dtype(q), c10::cuda::getCurrentCUDAStream().stream());
  return {out.to(q_in.scalar_type()), den, s, z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_bwd_cuda(
    const Tensor& dout_in, const std::optional<Tensor>& ds_in, const std::optional<Tensor>& dz_in,
    const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& out_in, const Tensor& den_in,
    const std::optional<Tensor>& s0_in, const std::optional<Tensor>& z0_in, bool causal, std::string feature_map,
    bool normalize, double scale, double eps) {
  check_inputs(q_in, k_in, v_in, causal, eps);
  check_state("initial state", s0_in, z0_in, q_in, v_in, true);
  check_state("state gradient", ds_in, dz_in, q_in, v_in, false);
  check_cuda_dims(q_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto sd = state_type(q_in);
  const int64_t b = q_in.size(0), h = q_in.size(1), sq = q_in.size(2), dk = q_in.size(3), dv = v_in.size(3);
  TORCH_CHECK_VALUE(dout_in.dim() == 4 && dout_in.size(0) == b && dout_in.size(1) == h && dout_in.size(2) == sq &&
                        dout_in.size(3) == dv && out_in.sizes() == dout_in.sizes(),
                    "dout, out: expected shape (B, H, Sq, Dv) = (", b, ", ", h, ", ", sq, ", ", dv, "), got ",
                    lin_shape(dout_in), " and ", lin_shape(out_in));
  TORCH_CHECK_VALUE(den_in.dim() == 3 && den_in.size(0) == b && den_in.size(1) == h && den_in.size(2) == sq &&
                        den_in.scalar_type() == sd,
                    "den: expected ", sd, " of shape (B, H, Sq), got ", lin_shape(den_in));
  const bool tc = (q_in.scalar_type() == at::kHalf || q_in.scalar_type() == at::kBFloat16) &&
                  linear_tc_fits(dk, dv);
  const Tensor q = tc ? rows_aligned16(q_in) : compute(q_in);
  const Tensor k = tc ? rows_aligned16(k_in) : compute(k_in);
  const Tensor v = tc ? rows_aligned16(v_in) : compute(v_in);
  const auto ct = q.scalar_type();
  // Contiguous: 16-byte aligned rows for the tensor cores (an expanded scalar gradient has stride 0).
  const Tensor dout = dout_in.to(ct).contiguous();
  const Tensor out = out_in.to(ct).contiguous();
  const Tensor den = den_in.contiguous();
  Tensor dq = at::empty(q.sizes(), q.options());
  Tensor dk_t = at::empty(k.sizes(), k.options());
  Tensor dv_t = at::empty(v.sizes(), v.options());
  Tensor ds0 = at::empty({b, h, dk, dv}, q.options().dtype(sd));
  Tensor dz0 = at::empty({b, h, dk}, q.options().dtype(sd));
  const auto back = q_in.scalar_type();
  if (b * h == 0) return {dq.to(back), dk_t.to(back), dv_t.to(back), ds0, dz0};
  LinearParams p = base(q, k, v, causal, feature_map, normalize, scale, eps);
  const StateIn state = set_state_in(p, s0_in, z0_in, ds_in, dz_in);
  Tensor work;
  if (!tc) {
    work = at::empty({b, h, dk, dv}, q.options().dtype(at::kDouble));
    p.work = work.data_ptr();
  } else {
    work = set_segments(p, q);
  }
  set_bwd_io(p, dout, out, den, dq, dk_t, dv_t, ds0, dz0);
  linear_cuda_bwd(p, tc ? dtype_of(q) : kernel_dtype(q), c10::cuda::getCurrentCUDAStream().stream());
  return {dq.to(back), dk_t.to(back), dv_t.to(back), ds0, dz0};
}

#endif  // FA_WITH_CUDA

}  // namespace
}  // namespace fused_attn

TORCH_LIBRARY_FRAGMENT(fused_attn, m) {
  m.def(
      "linear_fwd(Tensor q, Tensor k, Tensor v, Tensor? s0, Tensor? z0, bool causal, str feature_map, "
      "bool normalize, float scale, float eps) -> (Tensor out, Tensor den, Tensor s, Tensor z)");
  m.def(
      "linear_bwd(Tensor dout, Tensor? ds, Tensor? dz, Tensor q, Tensor k, Tensor v, Tensor out, Tensor den, "
      "Tensor? s0, Tensor? z0, bool causal, str feature_map, bool normalize, float scale, float eps) -> "
      "(Tensor dq, Tensor dk, Tensor dv, Tensor ds0, Tensor dz0)");
}

TORCH_LIBRARY_IMPL(fused_attn, CPU, m) {
  m.impl("linear_fwd", &fused_attn::linear_fwd_cpu);
  m.impl("linear_bwd", &fused_attn::linear_bwd_cpu);
}

#ifdef FA_WITH_CUDA
TORCH_LIBRARY_IMPL(fused_attn, CUDA, m) {
  m.impl("linear_fwd", &fused_attn::linear_fwd_cuda);
  m.impl("linear_bwd", &fused_attn::linear_bwd_cuda);
}
#endif
