"""flash-attn 2.x compatible functions over fused_attn's kernels: code written for flash-attn runs with

    from fused_attn.compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

Same signatures, (batch, seqlen, nheads, headdim) layouts and semantics as flash-attn 2.x: softmax_scale
(default 1 / sqrt(headdim)); causal aligned bottom-right (query i sees keys j <= i + seqlen_k - seqlen_q);
window_size=(left, right), -1 unbounded, query i sees keys in [i + seqlen_k - seqlen_q - left,
i + seqlen_k - seqlen_q + right]; softcap > 0 caps the scaled scores to softcap * tanh(s / softcap);
alibi_slopes (nheads,) or (batch, nheads) float32 adds -slope * |i + seqlen_k - seqlen_q - j|; GQA/MQA
when k/v have fewer heads. These are layout adapters over fused_attn.flash / flash_varlen / flash_kvcache:
the (B, S, H, D) tensors are viewed as (B, H, S, D) without a copy; the output is returned contiguous in
(B, S, H, D), as flash-attn returns it (one copy of the output).

Differences, all explicit:
  - dropout_p > 0 raises ValueError (fused_attn has no dropout); the rotary arguments, cache_batch_idx and
    cache_leftpad of flash_attn_with_kvcache, and block_table of flash_attn_varlen_func raise ValueError.
  - return_attn_probs=True returns (out, softmax_lse, S_dmask) like flash-attn with dropout_p = 0, where
    S_dmask is an empty tensor; softmax_lse is (batch, nheads, seqlen_q) float32 ((nheads, total_q) for
    varlen). A row that sees no key has lse = -inf (log of an empty sum; flash-attn's kernel writes +inf).
  - deterministic=True: the CPU backward is always deterministic; on CUDA the call's backward runs the
    deterministic dQ kernel (torch's deterministic flag is switched on around that backward node only).
"""
from __future__ import annotations

import numbers

import torch

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]


def _fa():
    import fused_attn  # late: fused_attn imports nothing from here

    return fused_attn


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_dims(name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims}-D {layout}, got shape {_shape(t)}")


def _check_dropout(dropout_p) -> None:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise ValueError(f"dropout_p: fused_attn has no dropout, got {dropout_p}; expected 0.0 "
                         "(apply dropout outside attention, or use torch SDPA's math path)")


def _window(window_size):
    """flash-attn's window_size (left, right) -> fused_attn's window (None when unbounded on both sides)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size: expected a pair (left, right), got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size: expected ints, got {side} = {w!r}")
        if w < -1:
            raise ValueError(f"window_size: expected entries >= -1 (-1 is unbounded), got {side} = {w}")
    left, right = int(window_size[0]), int(window_size[1])
    return None if (left, right) == (-1, -1) else (left, right)


def _options(softmax_scale, causal, window_size, softcap, alibi_slopes):
    """Keyword arguments for fused_attn's functions; softcap / alibi only when used."""
    if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                      or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    kw = dict(causal=causal, window=_window(window_size), scale=softmax_scale)
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a float, got {type(softcap).__name__}")
    if softcap != 0:
        kw["softcap"] = float(softcap)
    if alibi_slopes is not None:
        kw["alibi_slopes"] = alibi_slopes
    return kw


def _bhsd(t):
    """A (B, S, H, D) tensor viewed as (B, H, S, D), no copy."""
    return t.transpose(1, 2)


def _bshd(t):
    """fused_attn's (B, H, S, D) output as flash-attn returns it: contiguous (B, S, H, D)."""
    return t.transpose(1, 2).contiguous()


def _deterministic_backward(out, tensors, deterministic: bool):
    """deterministic=True on CUDA: switch torch's deterministic flag on for this output's backward node only
    (fused_attn's CUDA backward then runs its deterministic dQ kernel). The CPU backward always is."""
    if not deterministic or out.grad_fn is None or not any(t.is_cuda for t in tensors):
        return out
    if torch.are_deterministic_algorithms_enabled():
        return out
    node = out.grad_fn

    def pre(grad_outputs):  # warn_only: nothing else changes behaviour while the node runs
        torch.use_deterministic_algorithms(True, warn_only=True)

    def post(grad_inputs, grad_outputs):
        torch.use_deterministic_algorithms(False)  # it was off (checked above)

    node.register_prehook(pre)
    node.register_hook(post)
    return out


def _with_probs(out, lse, q, return_attn_probs):
    if not return_attn_probs:
        return out
    return out, lse, torch.empty(0, dtype=q.dtype, device=q.device)


# ---------------------------------------------------------------------------------------------------------
# Dense (batch, seqlen, nheads, headdim).


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_func: q (batch, seqlen_q, nheads, headdim), k and v (batch, seqlen_k, nheads_k,
    headdim). Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask) with
    return_attn_probs (see the module docstring)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_dims(name, t, 4, "(batch, seqlen, nheads, headdim)")
    _check_dropout(dropout_p)
    kw = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    out, lse = _fa().flash(_bhsd(q), _bhsd(k), _bhsd(v), return_lse=True, **kw)
    out = _deterministic_backward(out, (q, k, v), deterministic)
    return _with_probs(_bshd(out), lse, q, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_qkvpacked_func: qkv (batch, seqlen, 3, nheads, headdim)."""
    _check_dims("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected (batch, seqlen, 3, nheads, headdim), got shape {_shape(qkv)}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_kvpacked_func: q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2,
    nheads_k, headdim)."""
    _check_dims("kv", kv, 5, "(batch, seqlen, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise ValueError(f"kv: expected (batch, seqlen, 2, nheads_k, headdim), got shape {_shape(kv)}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


# ---------------------------------------------------------------------------------------------------------
# Packed variable-length batches (total, nheads, headdim) with cu_seqlens.


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn.flash_attn_varlen_func: q (total_q, nheads, headdim), k and v (total_k, nheads_k, headdim),
    cu_seqlens_* int32 (batch + 1,). Returns out (total_q, nheads, headdim), or (out, softmax_lse
    (nheads, total_q), S_dmask) with return_attn_probs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_dims(name, t, 3, "(total, nheads, headdim)")
    _check_dropout(dropout_p)
    if block_table is not None:
        raise ValueError("block_table: a paged K/V cache is not served by flash_attn_varlen_func here, got a "
                         "tensor; expected None (use flash_attn_with_kvcache for paged caches)")
    kw = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    out, lse = _fa().flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                  max_seqlen_k=max_seqlen_k, return_lse=True, **kw)
    out = _deterministic_backward(out, (q, k, v), deterministic)
    return _with_probs(out, lse, q, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn.flash_attn_varlen_qkvpacked_func: qkv (total, 3, nheads, headdim)."""
    _check_dims("qkv", qkv, 4, "(total, 3, nheads, headdim)")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv: expected (total, 3, nheads, headdim), got shape {_shape(qkv)}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn.flash_attn_varlen_kvpacked_func: kv (total_k, 2, nheads_k, headdim)."""
    _check_dims("kv", kv, 4, "(total, 2, nheads_k, headdim)")
    if kv.shape[1] != 2:
        raise ValueError(f"kv: expected (total, 2, nheads_k, headdim), got shape {_shape(kv)}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs)


# ---------------------------------------------------------------------------------------------------------
# KV cache (inference, no backward).


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash_attn.flash_attn_with_kvcache: q (batch, seqlen_q, nheads, headdim); k_cache, v_cache
    (batch_cache, seqlen_cache, nheads_k, headdim), or (num_blocks, page_block_size, nheads_k, headdim) with
    block_table (batch, max_num_blocks_per_seq) int32; k, v (batch, seqlen_new, nheads_k, headdim) are written
    into the cache in place at cache_seqlens (int or int32 (batch,); None: the whole cache is filled) before
    attending. Returns out (batch, seqlen_q, nheads, headdim), and softmax_lse (batch, nheads, seqlen_q) with
    return_softmax_lse."""
    for name, val in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_batch_idx", cache_batch_idx),
                      ("cache_leftpad", cache_leftpad)):
        if val is not None:
            raise ValueError(f"{name}: not served by fused_attn's flash_attn_with_kvcache, got a "
                             f"{type(val).__name__}; expected None"
                             + (" (apply rotary embeddings to q and k before the call)" if "rotary" in name else ""))
    _check_dims("q", q, 4, "(batch, seqlen, nheads, headdim)")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_dims(name, t, 4, "(batch_cache, seqlen_cache, nheads_k, headdim) or (num_blocks, "
                                "page_block_size, nheads_k, headdim)")
    if (k is None) != (v is None):
        raise ValueError(f"{'v' if k is not None else 'k'}: expected k and v both given or both None")
    for name, t in (("k", k), ("v", v)):
        if t is not None:
            _check_dims(name, t, 4, "(batch, seqlen_new, nheads_k, headdim)")
    kw = _options(softmax_scale, causal, window_size, softcap, alibi_slopes)
    b = q.shape[0]
    if block_table is None:
        if k_cache.shape[0] < b:
            raise ValueError(f"k_cache: expected at least batch {b} (q.shape[0]) cache rows, got shape "
                             f"{_shape(k_cache)}")
        kc, vc = _bhsd(k_cache[:b]), _bhsd(v_cache[:b])  # views: new keys land in the caller's cache
        capacity = k_cache.shape[1]
    else:
        kc, vc = k_cache, v_cache
        capacity = block_table.shape[1] * k_cache.shape[1] if isinstance(block_table, torch.Tensor) else 0
    if cache_seqlens is None:
        # flash-attn: without cache_seqlens the whole cache is attended; new keys need a position
        if k is not None:
            raise ValueError("cache_seqlens: expected an int or int32 (batch,) tensor when k and v are given "
                             "(where to write them), got None")
        cache_seqlens = capacity
    out, lse = _fa().flash_kvcache(_bhsd(q), kc, vc, cache_seqlens,
                                   k_new=None if k is None else _bhsd(k), v_new=None if v is None else _bhsd(v),
                                   block_table=block_table, num_splits=num_splits, return_lse=True, **kw)
    out = _bshd(out)
    return (out, lse) if return_softmax_lse else out
