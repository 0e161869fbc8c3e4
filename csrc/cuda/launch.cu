// Dispatch from (pass, dtype, head dim) to the registered tensor-core instantiation.
#include <stdexcept>
#include <string>

#include "launch.h"
#include "registry.h"

namespace fused_attn {
namespace {

// Zero-initialised before any static constructor runs, so registration order does not matter.
TcLauncher g_tc[3][2][kNumTcHeadDims];  // pass (TcPass), dtype, head dim

int hd_index(int hd) {
  for (int i = 0; i < kNumTcHeadDims; ++i)
    if (kTcHeadDims[i] == hd) return i;
  return -1;
}

int dt_index(DType dt) { return dt == DType::f16 ? 0 : dt == DType::bf16 ? 1 : -1; }

const char* dt_name(DType dt) {
  switch (dt) {
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f32: return "float32";
    default: return "float64";
  }
}

}  // namespace

bool register_tc_kernel(TcPass pass, DType dt, int hd, TcLauncher fn) {
  const int h = hd_index(hd), d = dt_index(dt);
  if (h < 0 || d < 0) return false;
  g_tc[static_cast<int>(pass)][d][h] = fn;
  return true;
}

TcLauncher find_tc_kernel(TcPass pass, DType dt, int hd) {
  const int h = hd_index(hd), d = dt_index(dt);
  return (h < 0 || d < 0) ? nullptr : g_tc[static_cast<int>(pass)][d][h];
}

bool tc_has(DType dt, int hd) {
  return find_tc_kernel(TcPass::fwd, dt, hd) != nullptr && find_tc_kernel(TcPass::bwd, dt, hd) != nullptr;
}

static void run_tc(TcPass pass, const AttnParams& p, DType dt, int hd, cudaStream_t stream) {
  const TcLauncher fn = find_tc_kernel(pass, dt, hd);
  if (!fn)
    throw std::invalid_argument(std::string("q: no tensor-core kernel for dtype ") + dt_name(dt) +
                                " and head dim " + std::to_string(hd) +
                                " in this build (see fused_attn.build_info())");
  fn(p, stream);
}

void tc_fwd(const AttnParams& p, DType dt, int hd, cudaStream_t stream) { run_tc(TcPass::fwd, p, dt, hd, stream); }
void tc_bwd(const AttnParams& p, DType dt, int hd, cudaStream_t stream) { run_tc(TcPass::bwd, p, dt, hd, stream); }
void tc_decode(const AttnParams& p, DType dt, int hd, cudaStream_t stream) {
  run_tc(TcPass::decode, p, dt, hd, stream);
}

}  // namespace fused_attn
