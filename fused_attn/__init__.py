"""fused_attn: exact fused attention (dense, causal, sliding-window, block-sparse) for PyTorch.

    out = fused_attn.flash(q, k, v, causal=False, window=None, block_mask=None, scale=None, return_lse=False)

q: (B, Hq, Sq, D); k, v: (B, Hk, Sk, D) with Hq % Hk == 0. See README.md for the visibility rule.
"""
from __future__ import annotations

import torch

from . import masks, reference
from ._args import check_inputs
from ._ops import build_info, sparse_args
from ._sparse import BlockMask
from .integrations import sdpa as _sdpa

__all__ = ["flash", "block_mask", "build_info", "BlockMask", "masks", "reference"]
__version__ = "0.1.0"

# SDPA backend provider "fused_attn": registered (never activated) where torch has the registry (>= 2.9);
# torch.nn.attention.activate_flash_attention_impl("fused_attn") switches it on.
_sdpa.register()


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


def block_mask(layout, block_size) -> BlockMask:
    """A reusable block-sparse mask: query i sees key j only if layout[b, h, i // bq, j // bk].

    layout: bool tensor (H, nqb, nkb) or (B, H, nqb, nkb), a leading size of 1 broadcasting, with
    nqb = ceil(Sq / bq) and nkb = ceil(Sk / bk); build it on the device the attention runs on.
    block_size: an int or (bq, bk). fused_attn.masks builds common layouts."""
    return BlockMask(layout, block_size)

