"""fused_attn: exact fused attention (dense, causal, sliding-window, block-sparse) for PyTorch, and
kernelized (linear) attention.

    out = fused_attn.flash(q, k, v, causal=False, window=None, block_mask=None, scale=None, softcap=0.0,
                           alibi_slopes=None, return_lse=False)
    out = fused_attn.flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)       # packed batches
    out = fused_attn.flash_kvcache(q, k_cache, v_cache, cache_seqlens, ...)       # decoding
    out = fused_attn.linear_attention(q, k, v, causal=True, feature_map="elu1", normalize=True, ...)

q: (B, Hq, Sq, D); k, v: (B, Hk, Sk, D) with Hq % Hk == 0. See README.md for the visibility rule.
"""
from __future__ import annotations

import torch

from . import distributed, features, masks, reference
from ._args import check_inputs, check_kvcache, check_mods, check_varlen
from ._linear_ops import linear_attention as _linear_attention
from ._ops import build_info, sparse_args
from ._sparse import BlockMask
from .integrations import sdpa as _sdpa

__all__ = ["flash", "flash_varlen", "flash_kvcache", "linear_attention", "block_mask", "build_info", "BlockMask",
           "features", "masks", "reference", "distributed"]
__version__ = "0.1.0"

# SDPA backend provider "fused_attn": registered (never activated) where torch has the registry (>= 2.9);
# torch.nn.attention.activate_flash_attention_impl("fused_attn") switches it on.
_sdpa.register()


def flash(q, k, v, *, causal=False, window=None, block_mask=None, scale=None, softcap=0.0, alibi_slopes=None,
          return_lse=False):
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
        softcap: float >= 0, 0 is off: the score s = scale * q.k becomes softcap * tanh(s / softcap).
        alibi_slopes: None or float32 (Hq,) or (B, Hq): adds -slope * |i + Sk - Sq - j| to the (capped) score.
        return_lse: also return lse (B, Hq, Sq), float32 (float64 for float64 inputs).

    Returns out (q's dtype, (B, Hq, Sq, D)) or (out, lse). A row that sees no key gives 0 and lse = -inf.
    Differentiable in q, k, v (and through lse).
    """
    q, k, v, left, right, scale = check_inputs(q, k, v, causal, window, block_mask, scale, return_lse)
    softcap, alibi = check_mods(softcap, alibi_slopes, q.shape[0], q.shape[1], q.device)
    sparse, sparse_shape = sparse_args(block_mask, q)
    out, lse = torch.ops.fused_attn.fwd(q, k, v, scale, left, right, sparse, sparse_shape, softcap, alibi)
    return (out, lse) if return_lse else out


def flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                 window=None, scale=None, softcap=0.0, alibi_slopes=None, return_lse=False):
    """flash() over a packed batch of variable-length sequences, without padding.

    q: (total_q, Hq, D); k, v: (total_k, Hk, D) (any strides with unit stride in D). cu_seqlens_q and
    cu_seqlens_k: int32 (B + 1,) on q's device, non-decreasing from 0 to the packed totals: sequence b is
    q[cu_q[b]:cu_q[b+1]] against k/v[cu_k[b]:cu_k[b+1]], with flash()'s visibility rule applied per sequence
    (its own Sq, Sk, bottom-right aligned). Sequences of length 0 are allowed. max_seqlen_q / max_seqlen_k:
    the longest lengths; given, nothing is read back from a GPU; None, they are computed (one
    synchronisation). Returns out (total_q, Hq, D) and, with return_lse, lse (Hq, total_q). Differentiable.
    """
    (q, k, v, cu_q, cu_k, max_q, max_k, left, right, scale, softcap, alibi) = check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale, softcap,
        alibi_slopes, return_lse)
    out, lse = torch.ops.fused_attn.varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap,
                                               alibi)
    return (out, lse) if return_lse else out


def flash_kvcache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, block_table=None, causal=False,
                  window=None, scale=None, softcap=0.0, alibi_slopes=None, return_lse=False, num_splits=0):
    """Attention against a KV cache, for inference (forward only, no autograd).

    q: (B, Hq, Sq, D). Contiguous cache: k_cache, v_cache (B, Hk, S_max, D). Paged cache: k_cache,
    v_cache (num_pages, page_size, Hk, D) with block_table int32 (B, max_pages_per_seq): position p of
    sequence b is in page block_table[b, p // page_size], slot p % page_size. cache_seqlens: int32 (B,) on
    q's device, or an int: tokens already in the cache. k_new, v_new (B, Hk, S_new, D) are written into the
    cache in place at positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1 (the caller advances
    cache_seqlens), then q attends over those cache_seqlens[b] + S_new keys with flash()'s rule (bottom-right
    aligned). num_splits: 0 picks how the key range is split, n >= 1 forces n. Returns out (B, Hq, Sq, D)
    and, with return_lse, lse (B, Hq, Sq). Reads cache_seqlens (and the block_table entries in use) once to
    check that every write lands inside the cache: on a GPU, one synchronisation.
    """
    q, seqlens, left, right, scale, softcap, alibi = check_kvcache(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, window, scale, softcap,
        alibi_slopes, return_lse, num_splits)
    out, lse = torch.ops.fused_attn.kvcache_fwd(q, k_cache, v_cache, seqlens, k_new, v_new, block_table, scale,
                                                left, right, softcap, alibi, int(num_splits))
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
