// The Python module fused_attn._C: loading it registers the ops (ops.cpp); it also tells Python what this
// build holds and the CUDA kernels' tile shapes, which block masks need to list tiles at each kernel's
// granularity. Built by setup.py only; the CMake build exposes the ops alone.
#include <torch/extension.h>

#include "cuda/sm90/tiles.h"
#include "cuda/tiles.h"
#include "kernels.h"
#ifdef FA_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda/launch.h"
#include "cuda/sm90/launch.h"
#endif

#ifndef FA_CUDA_ARCHS
#define FA_CUDA_ARCHS ""
#endif

namespace {

py::dict build_info() {
  using fused_attn::DType;
  py::dict info;
  py::list backends;
  backends.append("cpu");
  info["cpu_dtypes"] = py::make_tuple("float16", "bfloat16", "float32", "float64");
  info["cpu_isa"] = std::string(fused_attn::cpu_isa());
  info["cpu_bf16_gemm"] = fused_attn::cpu_bf16_gemm();
#ifdef FA_WITH_CUDA
  backends.append("cuda");
  py::dict tc;
  const std::pair<DType, const char*> dts[] = {{DType::f16, "float16"}, {DType::bf16, "bfloat16"}};
  for (const auto& [dt, name] : dts) {
    py::list hds;
    for (int hd : fused_attn::kTcHeadDims)
      if (fused_attn::tc_has(dt, hd)) hds.append(hd);
    tc[name] = hds;
  }
  info["cuda_tensor_core_head_dims"] = tc;
  py::dict h90;
  for (const auto& [dt, name] : dts) {
    py::list hds;
    for (int hd : fused_attn::kSm90HeadDims)
      if (fused_attn::sm90_has(dt, hd)) hds.append(hd);
    h90[name] = hds;
  }
  info["cuda_sm90_head_dims"] = h90;
  info["cuda_generic_dtypes"] = py::make_tuple("float32", "float64");
  info["cuda_archs"] = std::string(FA_CUDA_ARCHS);
#endif
  info["backends"] = backends;
  return info;
}

// {"tc": {hd: (fwd_tq, fwd_tk, bwd_tq, bwd_tk)}, "generic": (...)}: the CUDA kernels' tiles.
py::dict tile_table() {
  py::dict tc;
  for (int hd : fused_attn::kTcHeadDims) {
    const auto t = fused_attn::tc_tiles(hd);
    tc[py::int_(hd)] = py::make_tuple(t.fwd_tq, t.fwd_tk, t.bwd_tq, t.bwd_tk);
  }
  const auto g = fused_attn::kGenericTiles;
  py::dict h90;
  for (int hd : fused_attn::kSm90HeadDims) {
    const auto t = fused_attn::sm90_tiles(hd);
    h90[py::int_(hd)] = py::make_tuple(t.fwd_tq, t.fwd_tk, t.bwd_tq, t.bwd_tk);
  }
  py::dict out;
  out["tc"] = tc;
  out["sm90"] = h90;
  out["generic"] = py::make_tuple(g.fwd_tq, g.fwd_tk, g.bwd_tq, g.bwd_tk);
  return out;
}

#ifdef FA_WITH_CUDA
fused_attn::DType tc_dtype(const std::string& name) {
  if (name == "float16") return fused_attn::DType::f16;
  if (name == "bfloat16") return fused_attn::DType::bf16;
  throw py::value_error("dtype: expected 'float16' or 'bfloat16', got '" + name + "'");
}
#endif

// The Hopper head dim that runs fp16/bf16 head dim d on CUDA device `device`, or 0 when the mma.sync
// kernels run it (the same choice as ops.cpp's dispatch, which checks the block-sparse lists against it).
int cuda_sm90_head_dim(int device, const std::string& dtype, int64_t d) {
#ifdef FA_WITH_CUDA
  return fused_attn::sm90_choose(device, tc_dtype(dtype), d);
#else
  (void)device, (void)dtype, (void)d;
  return 0;
#endif
}

// Which kernel family runs fp16/bf16 on each visible CUDA device, and why (read at call time: it follows
// FUSED_ATTN_FORCE_SM80).
py::dict cuda_paths() {
  py::dict out;
#ifdef FA_WITH_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return out;
  }
  for (int dev = 0; dev < n; ++dev) {
    const std::string why = fused_attn::sm90_unavailable(dev);
    out[py::str("cuda:" + std::to_string(dev))] =
        why.empty() ? std::string("sm90: wgmma/TMA kernels for float16/bfloat16 at their head dims, mma.sync for the rest")
                    : "mma.sync (sm80 design): " + why;
  }
#endif
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn kernels; the ops are under torch.ops.fused_attn";
  m.def("build_info", &build_info, "What this build holds: backends, dtypes, head dims, CUDA archs");
  m.def("tile_table", &tile_table, "Tile shapes of the CUDA kernels");
  m.def("cuda_sm90_head_dim", &cuda_sm90_head_dim, "Hopper head dim for (device, dtype, d), 0 for mma.sync");
  m.def("cuda_paths", &cuda_paths, "The kernel family that runs fp16/bf16 on each CUDA device, and why");
}
