// Host-side launchers of the linear-attention CUDA kernels (csrc/cuda/linear.cu). Each checks its launches
// and throws std::runtime_error with the CUDA error string on failure; none synchronises the device.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernels.h"
#include "../linear_params.h"

namespace fused_attn {

// Whether fp16 / bf16 run on tensor cores for these head dims (else the caller upcasts to
// fp32 and runs the generic kernels).
bool linear_tc_fits(int64_t dk, int64_t dv);
// Largest Dk / Dv of the generic (fp32 / fp64) kernels.
int64_t linear_generic_max_d();

// Forward. dt f16 / bf16: tensor cores (linear_tc_fits must hold, rows 16-byte aligned; den, s0/z0, s_out,
// z_out float32). dt f32 / f64: generic, needs p.work (float64, B*H*Dk*Dv).
void linear_cuda_fwd(const LinearParams& p, DType dt, cudaStream_t stream);
// Backward: dt f16 / bf16 on tensor cores (as the forward; dout, out contiguous), f32 / f64 generic with p.work.
void linear_cuda_bwd(const LinearParams& p, DType dt, cudaStream_t stream);

}  // namespace fused_attn
