// Tile shapes of the CUDA kernels, shared by the host (ops.cpp, which exports them to Python so that a
// block mask can list its tiles at each kernel's granularity) and the kernels themselves.
#pragma once

namespace fused_attn {

struct TileShape {
  int fwd_tq, fwd_tk;  // forward: query rows x keys per tile
  int bwd_tq, bwd_tk;  // backward: query rows x keys per tile (dK/dV kernel and dQ kernel alike)
};

// Head dims with a tensor-core (fp16/bf16) instantiation; any D <= 256 with D % 8 == 0 runs on the
// smallest compiled size >= D.
constexpr int kTcHeadDims[] = {32, 64, 96, 128, 160, 192, 256};
constexpr int kNumTcHeadDims = sizeof(kTcHeadDims) / sizeof(kTcHeadDims[0]);

constexpr TileShape tc_tiles(int hd) {
  return hd <= 128 ? TileShape{128, 64, 64, 128} : TileShape{64, 64, 64, 64};
}

// The fp32/fp64 kernels (no tensor cores).
constexpr TileShape kGenericTiles{32, 32, 32, 32};

}  // namespace fused_attn
