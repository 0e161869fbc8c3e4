// Host launch of the linear-attention CUDA kernels (linear_kernel.cuh). The handful of instantiations
// lives here, in one file: tensor-core forward, dq and dk/dv <fp16, bf16> x HD <64, 128>, generic forward,
// dq and dk/dv <float, double>.
#include <stdexcept>
#include <string>

#include "linear_kernel.cuh"
#include "linear_launch.h"

namespace fused_attn {
namespace {

void check_launch(const std::string& where) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(where + ": launch failed: " + cudaGetErrorString(err));
}

unsigned grid_of(const LinearParams& p, const std::string& where) {
  const int64_t n = p.batch * p.heads;
  if (n > 2147483647LL) throw std::invalid_argument(where + ": batch * heads = " + std::to_string(n) + " > 2^31 - 1");
  return static_cast<unsigned>(n);
}

template <typename Kernel>
void launch_tc(Kernel kernel, int smem, const LinearParams& p, cudaStream_t stream, const std::string& where) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess)
    throw std::runtime_error(where + ": cannot get " + std::to_string(smem) + " bytes of shared memory: " +
                             cudaGetErrorString(err));
  const dim3 grid(grid_of(p, where), static_cast<unsigned>(p.segments));
  kernel<<<grid, lin::TcCfg<128>::kThreads, smem, stream>>>(p);
  check_launch(where);
}

// The segment sums (keys or queries) and their scan from (init_s, init_z); the total to out_s / out_z.
template <typename Elem, int HD, bool kQueries>
void seg_scan(const LinearParams& p, cudaStream_t stream, const std::string& where, const void* init_s,
              const void* init_z, bool reverse, void* out_s, void* out_z, bool zx) {
  launch_tc(lin::lin_tc_segsum_kernel<Elem, HD, kQueries>, lin::TcCfg<HD>::kSmemBwd, p, stream, where);
  const int64_t slot = p.dk_dim * p.dv_dim + 2 * p.dk_dim;
  const dim3 grid(static_cast<unsigned>((slot + 255) / 256), static_cast<unsigned>(p.batch * p.heads));
  lin::lin_scan_kernel<<<grid, 256, 0, stream>>>(p, static_cast<const float*>(init_s),
                                                 static_cast<const float*>(init_z), reverse, static_cast<float*>(out_s),
                                                 static_cast<float*>(out_z), zx);
  check_launch(where);
}

void check_segments(const LinearParams& p, const std::string& where) {
  if (p.segments < 1 || p.segments > 65535 || (p.segments > 1 && (!p.seg_state || p.batch * p.heads > 65535)))
    throw std::invalid_argument(where + ": segments = " + std::to_string(p.segments) +
                                ", expected 1, or 2 .. 65535 with seg_state and batch * heads <= 65535");
}

template <typename Elem, int HD>
void tc_fwd(const LinearParams& p, cudaStream_t stream) {
  const std::string where = "fused_attn linear forward (tensor cores, HD " + std::to_string(HD) + ")";
  check_segments(p, where);
  if (p.segments > 1) seg_scan<Elem, HD, false>(p, stream, where, p.s0, p.z0, false, p.s_out, p.z_out, false);
  launch_tc(lin::lin_tc_fwd_kernel<Elem, HD>, lin::TcCfg<HD>::kSmemFwd, p, stream, where);
}

template <typename Elem, int HD>
void tc_bwd(const LinearParams& p, cudaStream_t stream) {
  const std::string where = "fused_attn linear backward (tensor cores, HD " + std::to_string(HD) + ")";
  check_segments(p, where);
  // The dq pass's scan and the dk/dv pass's scan share seg_state: stream order keeps them apart.
  if (p.segments > 1) seg_scan<Elem, HD, false>(p, stream, where, p.s0, p.z0, false, nullptr, nullptr, false);
  launch_tc(lin::lin_tc_dq_kernel<Elem, HD>, lin::TcCfg<HD>::kSmemBwd, p, stream, where);
  if (p.segments > 1) seg_scan<Elem, HD, true>(p, stream, where, p.ds_out, p.dz_out, true, p.ds0, p.dz0, true);
  launch_tc(lin::lin_tc_dkdv_kernel<Elem, HD>, lin::TcCfg<HD>::kSmemBwd, p, stream, where);
}

size_t generic_smem(const LinearParams& p) { return static_cast<size_t>(3 * p.dk_dim + 3 * p.dv_dim) * sizeof(double); }

template <typename T>
void generic_fwd(const LinearParams& p, cudaStream_t stream) {
  const std::string where = "fused_attn linear forward (fp32/fp64)";
  const unsigned grid = grid_of(p, where);
  lin::lin_generic_fwd_kernel<T><<<grid, lin::kGThreads, generic_smem(p), stream>>>(p);
  check_launch(where);
}

template <typename T>
void generic_bwd(const LinearParams& p, cudaStream_t stream) {
  const std::string where = "fused_attn linear backward (fp32/fp64)";
  const unsigned grid = grid_of(p, where);
  // The two passes share p.work: the dq pass's prefix state is dead before the reverse pass starts.
  lin::lin_generic_dq_kernel<T><<<grid, lin::kGThreads, generic_smem(p), stream>>>(p);
  check_launch(where);
  lin::lin_generic_dkdv_kernel<T><<<grid, lin::kGThreads, generic_smem(p), stream>>>(p);
  check_launch(where);
}

// fp16 / bf16 on tensor cores at HD 64 (both dims <= 64) or 128.
template <template <typename, int> class Run>
void tc_dispatch(const LinearParams& p, DType dt, cudaStream_t stream, const char* what) {
  if (!linear_tc_fits(p.dk_dim, p.dv_dim))
    throw std::invalid_argument(std::string(what) + ": tensor-core path needs Dk, Dv multiples of 8 <= 128, got " +
                                std::to_string(p.dk_dim) + ", " + std::to_string(p.dv_dim));
  const bool small = p.dk_dim <= 64 && p.dv_dim <= 64;
  if (dt == DType::f16)
    small ? Run<__half, 64>::go(p, stream) : Run<__half, 128>::go(p, stream);
  else
    small ? Run<__nv_bfloat16, 64>::go(p, stream) : Run<__nv_bfloat16, 128>::go(p, stream);
}
template <typename Elem, int HD>
struct RunFwd {
  static void go(const LinearParams& p, cudaStream_t s) { tc_fwd<Elem, HD>(p, s); }
};
template <typename Elem, int HD>
struct RunBwd {
  static void go(const LinearParams& p, cudaStream_t s) { tc_bwd<Elem, HD>(p, s); }
};

void check_generic(const LinearParams& p, const char* what) {
  if (p.dk_dim > lin::kGenericMaxD || p.dv_dim > lin::kGenericMaxD)
    throw std::invalid_argument(std::string(what) + ": Dk, Dv must be <= " + std::to_string(lin::kGenericMaxD));
}

}  // namespace

bool linear_tc_fits(int64_t dk, int64_t dv) { return dk % 8 == 0 && dv % 8 == 0 && dk <= 128 && dv <= 128; }

int64_t linear_generic_max_d() { return lin::kGenericMaxD; }

void linear_cuda_fwd(const LinearParams& p, DType dt, cudaStream_t stream) {
  if (p.batch * p.heads == 0) return;
  if (dt == DType::f16 || dt == DType::bf16) return tc_dispatch<RunFwd>(p, dt, stream, "linear_cuda_fwd");
  check_generic(p, "linear_cuda_fwd");
  if (dt == DType::f32) generic_fwd<float>(p, stream);
  else generic_fwd<double>(p, stream);
}

void linear_cuda_bwd(const LinearParams& p, DType dt, cudaStream_t stream) {
  if (p.batch * p.heads == 0) return;
  if (dt == DType::f16 || dt == DType::bf16) return tc_dispatch<RunBwd>(p, dt, stream, "linear_cuda_bwd");
  check_generic(p, "linear_cuda_bwd");
  if (dt == DType::f32) generic_bwd<float>(p, stream);
  else generic_bwd<double>(p, stream);
}

}  // namespace fused_attn
