// The Python module fused_attn._C: loading it registers the ops (ops.cpp); it also tells Python what this
// build holds and the CUDA kernels' tile shapes, which block masks need to list tiles at each kernel's
// granularity. Built by setup.py only; the CMake build exposes the ops alone.
#include <torch/extension.h>

#include "cuda/tiles.h"
#include "kernels.h"
#ifdef FA_WITH_CUDA
#include "cuda/launch.h"
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
  py::dict out;
  out["tc"] = tc;
  out["generic"] = py::make_tuple(g.fwd_tq, g.fwd_tk, g.bwd_tq, g.bwd_tk);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_attn kernels; the ops are under torch.ops.fused_attn";
  m.def("build_info", &build_info, "What this build holds: backends, dtypes, head dims, CUDA archs");
  m.def("tile_table", &tile_table, "Tile shapes of the CUDA kernels");
}
