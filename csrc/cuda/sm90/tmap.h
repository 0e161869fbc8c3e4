// Host side of the Hopper kernels' tensor maps: the driver's cuTensorMapEncodeTiled, obtained at run time
// through the CUDA runtime (cudaGetDriverEntryPointByVersion), so that nothing links against libcuda.
// Host code only (launch.cu includes it without any device code of the family).
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

namespace fused_attn {
namespace sm90 {

// The encoder, or null when the driver does not provide it (then the Hopper path is not used).
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled_fn() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    (void)cudaGetLastError();  // a failed query must not leave an error for the next launch check
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

}  // namespace sm90
}  // namespace fused_attn
