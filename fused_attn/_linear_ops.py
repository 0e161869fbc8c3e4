"""torch.library glue for the linear-attention ops of csrc/linear_ops.cpp: fake (meta) kernels for tracing
and autograd (through q, k, v and the initial state), and the call linear_attention() makes."""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the extension registers torch.ops.fused_attn)
from ._linear_args import check_linear_inputs, state_dtype


@torch.library.register_fake("fused_attn::linear_fwd")
def _fwd_fake(q, k, v, s0, z0, causal, feature_map, normalize, scale, eps):
    b, h, sq, dk = q.shape
    dv = v.shape[3]
    sd = state_dtype(q.dtype)
    return (q.new_empty((b, h, sq, dv)), q.new_empty((b, h, sq), dtype=sd), q.new_empty((b, h, dk, dv), dtype=sd),
            q.new_empty((b, h, dk), dtype=sd))


@torch.library.register_fake("fused_attn::linear_bwd")
def _bwd_fake(dout, ds, dz, q, k, v, out, den, s0, z0, causal, feature_map, normalize, scale, eps):
    b, h, _, dk = q.shape
    dv = v.shape[3]
    sd = state_dtype(q.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty((b, h, dk, dv), dtype=sd), q.new_empty((b, h, dk), dtype=sd))


def _setup_context(ctx, inputs, output):
    q, k, v, s0, z0, causal, feature_map, normalize, scale, eps = inputs
    out, den, _, _ = output
    ctx.has_state = s0 is not None
    saved = (q, k, v, out, den) + ((s0, z0) if ctx.has_state else ())
    ctx.save_for_backward(*saved)
    ctx.args = (causal, feature_map, normalize, scale, eps)
    ctx.mark_non_differentiable(den)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dden, ds, dz):
    q, k, v, out, den, *state = ctx.saved_tensors
    s0, z0 = state if ctx.has_state else (None, None)
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, ds0, dz0 = torch.ops.fused_attn.linear_bwd(dout, ds, dz, q, k, v, out, den, s0, z0, *ctx.args)
    if not ctx.has_state:
        ds0 = dz0 = None
    return dq, dk, dv, ds0, dz0, None, None, None, None, None


torch.library.register_autograd("fused_attn::linear_fwd", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fused_attn.linear_attention: gradients of gradients (double backward) are not supported")


torch.library.register_autograd("fused_attn::linear_bwd", _no_double_backward)


def _has_kernel(device_type: str) -> bool:
    key = {"cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("fused_attn::linear_fwd", key)


def linear_attention(q, k, v, *, causal=True, feature_map="elu1", normalize=True, scale=None, eps=1e-6,
                     initial_state=None, return_state=False):
    q, k, v, scale, eps, s0, z0 = check_linear_inputs(q, k, v, causal, feature_map, normalize, scale, eps,
                                                      initial_state, return_state)
    if q.device.type != "cpu" and not _has_kernel(q.device.type):
        raise ValueError(f"q: linear_attention has no kernels for device {q.device} in this build (CPU always; "
                         "CUDA in a CUDA build); fused_attn.reference.linear_attention runs anywhere")
    out, _, s, z = torch.ops.fused_attn.linear_fwd(q, k, v, s0, z0, causal, feature_map, normalize, scale, eps)
    return (out, (s, z)) if return_state else out
