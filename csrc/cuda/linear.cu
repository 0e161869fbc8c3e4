// Host launch of the linear-attention CUDA kernels (linear_kernel.cuh). The handful of instantiations
// lives here, in one file: tensor-core forward <fp16, bf16> x HD <64, 128>, generic <float, double>.
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

template <typename Elem, int HD>
void tc_fwd(const LinearParams& p, cudaStream_t stream) {
  using C = lin::TcCfg<HD>;
  const std::string where = "fused_attn linear forward (tensor cores, HD " + std::to_string(HD) + ")";
  auto kernel = lin::lin_tc_fwd_kernel<Elem, HD>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess)
    throw std::runtime_error(where + ": cannot get " + std::to_string(C::kSmem) + " bytes of shared memory: " +
                             cudaGetErrorString(err));
  const unsigned grid = grid_of(p, where);
  kernel<<<grid, C::kThreads, C::kSmem, stream>>>(p);
  check_launch(where);
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

}  // namespace

bool linear_tc_fits(int64_t dk, int64_t dv) { return dk % 8 == 0 && dv % 8 == 0 && dk <= 128 && dv <= 128; }

int64_t linear_generic_max_d() { return lin::kGenericMaxD; }

void linear_cuda_fwd(const LinearParams& p, DType dt, cudaStream_t stream) {
  if (p.batch * p.heads == 0) return;
  if (dt == DType::f16 || dt == DType::bf16) {
    if (!linear_tc_fits(p.dk_dim, p.dv_dim))
      throw std::invalid_argument("linear_cuda_fwd: tensor-core path needs Dk, Dv multiples of 8 <= 128, got " +
                                  std::to_string(p.dk_dim) + ", " + std::to_string(p.dv_dim));
    const bool small = p.dk_dim <= 64 && p.dv_dim <= 64;
    if (dt == DType::f16)
      small ? tc_fwd<__half, 64>(p, stream) : tc_fwd<__half, 128>(p, stream);
    else
      small ? tc_fwd<__nv_bfloat16, 64>(p, stream) : tc_fwd<__nv_bfloat16, 128>(p, stream);
    return;
  }
  if (p.dk_dim > lin::kGenericMaxD || p.dv_dim > lin::kGenericMaxD)
    throw std::invalid_argument("linear_cuda_fwd: Dk, Dv must be <= " + std::to_string(lin::kGenericMaxD));
  if (dt == DType::f32) generic_fwd<float>(p, stream);
  else generic_fwd<double>(p, stream);
}

void linear_cuda_bwd(const LinearParams& p, DType dt, cudaStream_t stream) {
  if (p.batch * p.heads == 0) return;
  if (dt != DType::f32 && dt != DType::f64)
    throw std::invalid_argument("linear_cuda_bwd: dtype " + std::to_string(static_cast<int>(dt)) +
                                " is not supported; expected f32 or f64 (the caller upcasts fp16/bf16)");
  if (p.dk_dim > lin::kGenericMaxD || p.dv_dim > lin::kGenericMaxD)
    throw std::invalid_argument("linear_cuda_bwd: Dk, Dv must be <= " + std::to_string(lin::kGenericMaxD));
  if (dt == DType::f32) generic_bwd<float>(p, stream);
  else generic_bwd<double>(p, stream);
}

}  // namespace fused_attn
