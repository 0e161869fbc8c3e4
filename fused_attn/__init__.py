"""fused_attn: exact fused attention (dense, causal, sliding-window, block-sparse) for PyTorch, and
kernelized (linear) attention.

    out = fused_attn.flash(q, k, v, causal=False, window=None, block_mask=None, scale=None, return_lse=False)
    out = fused_attn.linear_attention(q, k, v, causal=True, feature_map="elu1", normalize=True, ...)

q: (B, Hq, Sq, D); k, v: (B, Hk, Sk, D) with Hq % Hk == 0. See README.md for the visibility rule.
"""
from __future__ import annotations

import torch

from . import features, masks, reference
from ._args import check_inputs
from ._linear_ops import linear_attention as _linear_attention
from ._ops import build_info, sparse_args
from ._sparse import BlockMask

__all__ = ["flash", "linear_attention", "block_mask", "build_info", "BlockMask", "features", "masks", "reference"]
__version__ = "0.1.0"


def flash(q, k, v, *, causal=False, window=None, block_mask=None, scale=None, return_lse=False):
    """softmax(q k^T * scale) v over the keys each query sees, without materialising the scores.

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hk, Sk, D), Hq % Hk == 0 (query head h reads key/value head
            h // (Hq // Hk)). One dtype (float16, bfloat16, float32, float64) and device for all three.
            Any strides with unit stride in D are used as they are; others are copied.
        causal: query i sees keys up to i + (Sk - Sq) (aligned bottom-right); combines with window.
        window: None or (left, right), ints >= -1, -1 unbounded: query i sees key j iff
            i + (Sk - Sq) - left <= j <= i + (Sk - Sq) + right.
        block_mask: a fused_attn.block_mask(layout, block_size); intersects with causal and window.
        scale: default 1 / sqrt(D).
        return_lse: also return lse (B, Hq, Sq), float32 (float64 for float64 inputs).

    Returns out (q's dtype, (B, Hq, Sq, D)) or (out, lse). A row that sees no key gives 0 and lse = -inf.
    Differentiable in q, k, v (and through lse).
    """
    q, k, v, left, right, scale = check_inputs(q, k, v, causal, window, block_mask, scale, return_lse)
    sparse, sparse_shape = sparse_args(block_mask, q)
    out, lse = torch.ops.fused_attn.fwd(q, k, v, scale, left, right, sparse, sparse_shape)
    return (out, lse) if return_lse else out


def linear_attention(q, k, v, *, causal=True, feature_map="elu1", normalize=True, scale=None, eps=1e-6,
                     initial_state=None, return_state=False):
    """Kernelized attention phi(q) (phi(k)^T v) in O(S Dk Dv) time (Katharopoulos et al. 2020), chunked.

    Args:
        q, k: (B, H, Sq, Dk), (B, H, Sk, Dk); v: (B, H, Sk, Dv). One dtype (float16, bfloat16, float32,
            float64; 16-bit computed in float32) and device (CPU). Sq == Sk when causal.
        causal: query i sees keys j <= i; otherwise every key.
        feature_map: "elu1" (elu(x) + 1), "relu", or "identity" (q and k are features already, e.g. from
            fused_attn.features.favor_plus), applied inside the kernel to scale * q and to k.
        normalize: divide by sum_j phi(q_i) . phi(k_j) + eps; otherwise the plain sum.
        scale: multiplies q before the feature map; default 1.
        eps: added to each denominator, >= 0.
        initial_state: None or (S, z), (B, H, Dk, Dv) and (B, H, Dk) (causal only): sums over keys seen
            before this call, e.g. the state returned by the previous call.
        return_state: also return the state (S, z) after the last key, float32 (float64 for float64).

    Returns out (q's dtype, (B, H, Sq, Dv)) or (out, (S, z)). Processing a sequence in pieces with the
    state equals processing it whole; Sq = 1 calls are O(Dk Dv) decode steps. Differentiable in q, k, v and
    initial_state. fused_attn.reference.linear_attention is the same function in its quadratic form.
    """
    return _linear_attention(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, scale=scale,
                             eps=eps, initial_state=initial_state, return_state=return_state)


def block_mask(layout, block_size) -> BlockMask:
    """A reusable block-sparse mask: query i sees key j only if layout[b, h, i // bq, j // bk].

    layout: bool tensor (H, nqb, nkb) or (B, H, nqb, nkb), a leading size of 1 broadcasting, with
    nqb = ceil(Sq / bq) and nkb = ceil(Sk / bk); build it on the device the attention runs on.
    block_size: an int or (bq, bk). fused_attn.masks builds common layouts."""
    return BlockMask(layout, block_size)

