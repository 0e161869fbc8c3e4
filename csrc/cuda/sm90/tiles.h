// Tile shapes and head dims of the Hopper (sm_90a) kernels, shared by the host (ops.cpp, bindings.cpp:
// block masks list their tiles at every kernel's granularity) and the kernels.
#pragma once

#include "../tiles.h"

namespace fused_attn {

// Head dims with a Hopper instantiation: multiples of 64, so every 64-column block of a tile is one
// 128-byte swizzle row. Any D <= 256 with D % 8 == 0 runs on the smallest compiled size >= D.
constexpr int kSm90HeadDims[] = {64, 128, 256};
constexpr int kNumSm90HeadDims = sizeof(kSm90HeadDims) / sizeof(kSm90HeadDims[0]);

// Forward: 128 query rows (two consumer warpgroups of 64) x 128 keys up to D = 128, x 64 keys above
// (shared memory: Q + two K/V stages = 160 KB at D = 128, 192 KB at D = 256).
// Backward: 64 query rows x 128 keys up to D = 128 (each consumer warpgroup owns 64 keys), x 64 keys above
// (both warpgroups see all 64 keys and each owns half of the head dim of dK / dV). The backward tiles
// equal the mma.sync kernels' (tiles.h), so both families read the same block-sparse lists there.
constexpr TileShape sm90_tiles(int hd) {
  return hd <= 128 ? TileShape{128, 128, 64, 128} : TileShape{128, 64, 64, 64};
}

}  // namespace fused_attn
