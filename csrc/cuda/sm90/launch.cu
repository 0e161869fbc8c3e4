// Dispatch of the Hopper kernels: the registry of the generated instantiations and the run-time choice of
// the Hopper path. Host code only (compiled for every arch of the build like launch.cu).
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "launch.h"
#include "tmap.h"

namespace fused_attn {
namespace {

// Zero-initialised before any static constructor runs, so registration order does not matter.
TcLauncher g_sm90[2][2][kNumSm90HeadDims];

int hd_index(int hd) {
  for (int i = 0; i < kNumSm90HeadDims; ++i)
    if (kSm90HeadDims[i] == hd) return i;
  return -1;
}
int dt_index(DType dt) { return dt == DType::f16 ? 0 : dt == DType::bf16 ? 1 : -1; }

bool any_sm90_kernel() {
  for (auto& a : g_sm90)
    for (auto& b : a)
      for (TcLauncher f : b)
        if (f) return true;
  return false;
}

bool forced_off() {
  const char* e = std::getenv("FUSED_ATTN_FORCE_SM80");
  return e && *e && std::string(e) != "0";
}

// Compute capability per device, read once (up to 64 devices).
std::string device_check(int device) {
  static std::mutex mu;
  static std::string cached[64];
  static bool known[64] = {};
  if (device < 0 || device >= 64) return "device index out of range";
  std::lock_guard<std::mutex> lk(mu);
  if (!known[device]) {
    int major = 0, minor = 0;
    std::string why;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
      (void)cudaGetLastError();
      why = "cannot query the device";
    } else if (major != 9 || minor != 0) {
      why = "compute capability " + std::to_string(major) + "." + std::to_string(minor) +
            " (the sm_90a kernels run on 9.0 only)";
    } else if (!sm90::encode_tiled_fn()) {
      why = "the CUDA driver has no cuTensorMapEncodeTiled";
    }
    cached[device] = why;
    known[device] = true;
  }
  return cached[device];
}

}  // namespace

bool register_sm90_kernel(TcPass pass, DType dt, int hd, TcLauncher fn) {
  const int h = hd_index(hd), d = dt_index(dt);
  if (h < 0 || d < 0) return false;
  g_sm90[static_cast<int>(pass)][d][h] = fn;
  return true;
}

bool sm90_has(DType dt, int hd) {
  const int h = hd_index(hd), d = dt_index(dt);
  return h >= 0 && d >= 0 && g_sm90[0][d][h] && g_sm90[1][d][h];
}

int sm90_head_dim(DType dt, int64_t d) {
  if (d <= 0 || d % 8 != 0) return 0;
  for (int hd : kSm90HeadDims)
    if (hd >= d && sm90_has(dt, hd)) return hd;
  return 0;
}

std::string sm90_unavailable(int device) {
  if (forced_off()) return "FUSED_ATTN_FORCE_SM80 is set";
  if (!any_sm90_kernel()) return "this build holds no sm_90a kernels";
  return device_check(device);
}

int sm90_choose(int device, DType dt, int64_t d) {
  const int hd = sm90_head_dim(dt, d);
  return hd && sm90_unavailable(device).empty() ? hd : 0;
}

static void run(TcPass pass, const AttnParams& p, DType dt, int hd, cudaStream_t stream) {
  const int h = hd_index(hd), d = dt_index(dt);
  const TcLauncher fn = (h < 0 || d < 0) ? nullptr : g_sm90[static_cast<int>(pass)][d][h];
  if (!fn)
    throw std::invalid_argument("q: no sm_90a kernel for head dim " + std::to_string(hd) +
                                " in this build (see fused_attn.build_info())");
  fn(p, stream);
}

void sm90_fwd(const AttnParams& p, DType dt, int hd, cudaStream_t stream) { run(TcPass::fwd, p, dt, hd, stream); }
void sm90_bwd(const AttnParams& p, DType dt, int hd, cudaStream_t stream) { run(TcPass::bwd, p, dt, hd, stream); }

}  // namespace fused_attn
