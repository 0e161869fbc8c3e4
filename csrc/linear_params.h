// LinearParams: everything a linear-attention kernel needs, as raw pointers, int64 strides and sizes.
// Built on the host by linear_ops.cpp, passed by value to the kernels (CPU now, CUDA later); no torch
// types. The math (a = phi(scale * q), b = phi(k), causal over j <= i):
//   out_i = (a_i S_i) / (a_i . z_i + eps)   or   a_i S_i  (normalize = false)
//   S_i = S0 + sum_j b_j v_j^T,  z_i = z0 + sum_j b_j
#pragma once
#include <cstdint>

#include "params.h"

namespace fused_attn {

enum class FeatureMap : int { elu1 = 0, relu = 1, identity = 2 };

struct LinearParams {
  // Inputs (element type T = the kernel's template argument): q, k (B, H, S, Dk); v (B, H, Sk, Dv),
  // unit stride in the last dim, any other strides.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Initial state (T, contiguous (B, H, Dk, Dv) and (B, H, Dk)) or null (zero). Causal only.
  const void* s0 = nullptr;
  const void* z0 = nullptr;
  // Outputs: out (B, H, Sq, Dv); den (T, contiguous (B, H, Sq)): a_i . z_i + eps, or 1 when not
  // normalised, kept for the backward; the final state (contiguous, like s0 / z0).
  void* o = nullptr;
  void* den = nullptr;
  void* s_out = nullptr;
  void* z_out = nullptr;

  // Backward: dout (like out); the gradients of the final state (contiguous, or null for zero); out and
  // den of the forward; the gradients, dq / dk / dv contiguous, ds0 / dz0 like s0 / z0 (always written).
  const void* dout = nullptr;
  const void* ds_out = nullptr;
  const void* dz_out = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* ds0 = nullptr;
  void* dz0 = nullptr;
  // CUDA fp32 / fp64 kernels only: float64 scratch of (B, H, Dk, Dv) for the running state.
  void* work = nullptr;
  // CUDA fp16 / bf16 kernels: the sequence cut into `segments` runs of chunks scanned in two levels (1: one
  // block per (batch, head) walks it all); seg_state fp32 scratch of B * H * (segments + 1) * (Dk Dv + 2 Dk).
  int64_t segments = 1;
  void* seg_state = nullptr;

  int64_t batch = 0, heads = 0, sq = 0, sk = 0, dk_dim = 0, dv_dim = 0;
  Strides q_st, k_st, v_st, o_st, do_st, dq_st, dk_st, dv_st;

  bool causal = true;
  bool normalize = true;
  FeatureMap feature = FeatureMap::elu1;
  double scale = 1.0;
  double eps = 1e-6;
};

}  // namespace fused_attn
