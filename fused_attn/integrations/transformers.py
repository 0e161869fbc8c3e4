"""fused_attn as a Hugging Face transformers attention backend.

    import fused_attn.integrations.transformers as fa_hf
    fa_hf.register()                                    # adds "fused_attn" to transformers.AttentionInterface
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fused_attn")

transformers is an optional dependency (pip install fused_attn[hf]); nothing here imports it before
register() is called.

What a model's attention call becomes (query (B, Hq, Sq, D), key/value (B, Hk, Sk, D), the KV cache already
appended by the model):
  - no padding: fused_attn.flash(q, k, v, causal=...), Sq != Sk aligned bottom-right, which is where the
    cached keys of generate() sit; GQA/MQA with Hk < Hq as they are (no repeat_kv). A static cache
    (cache_implementation="static") is longer than the tokens seen: the mask function then marks its
    unfilled slots and only the filled ones are attended.
  - a padding mask (a 2-D (B, Sk) bool mask: register() also adds a mask function under the same name, so
    the model hands over the key padding mask rather than a 4-D mask): the real tokens are gathered into a
    packed batch, run through fused_attn.flash_varlen, and scattered back (padded query rows get 0).
    Left and right padding, and the left-padded batches of generate(), are served.
  - packed sequences in one row (position_ids restarting, no mask, no cache: how HF trains on packed
    documents), or the FlashAttention kwargs cu_seq_lens_q/_k with max_length_q/_k: flash_varlen.
  - sliding_window=w (Mistral, Gemma 2, ...): HF's rule kv > q - w, i.e. window (w - 1, 0) causal,
    (w - 1, w - 1) bidirectional. softcap (Gemma 2): fused_attn's softcap. scaling: scale.
Not served, with a ValueError naming the argument: dropout > 0 (training with attention dropout), a 4-D
attention mask, attention sinks (s_aux), position_bias, the paged cache of continuous batching, mask
functions with extra terms (or/and masks, chunked attention). output_attentions returns no weights (a
warning), like transformers' flash backends.
"""
from __future__ import annotations

import warnings

import torch

NAME = "fused_attn"


def register(name: str = NAME) -> None:
    """Adds fused_attn to transformers' AttentionInterface and AttentionMaskInterface under `name`."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "fused_attn.integrations.transformers needs transformers with AttentionInterface and "
            f"masking_utils.AttentionMaskInterface (pip install 'fused_attn[hf]'): {e}") from None
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)


def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, use_vmap=False, config=None, **kwargs):
    """The mask function registered with transformers: the 2-D key padding mask (B, kv_length) as bool, or
    None when nothing is padded (the causal / window pattern comes from the attention call itself)."""
    if use_vmap:
        raise ValueError("mask_function: the model combines its causal mask with extra or/and mask functions, "
                         "which fused_attn's transformers backend does not serve; use attn_implementation="
                         "'sdpa' or 'eager' for this model")
    if config is not None and getattr(config, "attention_chunk_size", None):
        raise ValueError(f"attention_chunk_size: chunked attention ({config.attention_chunk_size}) is not served by "
                         "fused_attn's transformers backend; use attn_implementation='sdpa' or 'eager'")
    if attention_mask is None:
        seen = q_offset + q_length  # tokens in the cache after this step (q_offset may be a 0-d tensor)
        if isinstance(seen, torch.Tensor):
            seen = int(seen)
        if kv_length > seen:
            # a static cache: its slots past the tokens seen so far hold no keys yet; a mask over the filled
            # slots only makes the attention call drop the rest (the queries are the last filled slots)
            return torch.ones(batch_size, seen, dtype=torch.bool, device=kwargs.get("device"))
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


_WARNED = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, **kwargs):
    """The function transformers calls for attn_implementation="fused_attn". Returns (out (B, Sq, Hq, D)
    contiguous, None)."""
    import fused_attn

    if dropout:
        raise ValueError(f"dropout: fused_attn has no attention dropout, got {dropout}; expected 0.0 "
                         "(set the config's attention_dropout to 0)")
    for arg in ("s_aux", "position_bias"):
        if kwargs.get(arg) is not None:
            raise ValueError(f"{arg}: not served by fused_attn's transformers backend, got a tensor; use "
                             "attn_implementation='eager' or 'sdpa' for this model")
    if kwargs.get("cache") is not None:
        raise ValueError("cache: the paged cache of continuous batching is not served by fused_attn's "
                         "transformers backend")
    if kwargs.get("output_attentions", False):
        _warn_once("fused_attn does not return attention weights (output_attentions=True gives None)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: expected a 2-D (batch, kv_length) padding mask or None, got shape "
                         f"{tuple(attention_mask.shape)} (a custom 4-D mask is not served; use 'sdpa' or 'eager')")

    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    opts = dict(causal=causal, scale=scaling)
    if sliding_window:
        w = int(sliding_window)
        opts["window"] = (w - 1, w - 1)  # causal makes the right side 0
    if softcap:
        opts["softcap"] = float(softcap)

    b, hq, sq, d = query.shape
    sk = key.shape[2]
    if attention_mask is not None:
        if attention_mask.shape[0] != b or not sq <= attention_mask.shape[1] <= sk:
            raise ValueError(f"attention_mask: expected shape ({b}, L) with {sq} <= L <= {sk} (batch, keys), got "
                             f"{tuple(attention_mask.shape)}")
        if attention_mask.shape[1] < sk:
            # a static cache longer than the tokens seen: the mask covers the filled slots, which come first
            n = attention_mask.shape[1]
            key, value = key[:, :, :n], value[:, :, :n]
        mask = attention_mask.to(torch.bool)
        if not bool(mask.all()):
            return _padded(query, key, value, mask, opts), None
    cu = _packed_boundaries(kwargs, b, sq, sk, query.device)
    if cu is not None:
        return _packed(query, key, value, cu, opts), None
    out = fused_attn.flash(query, key, value, **opts)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------------------------------
# Padded batches: gather the real tokens into one packed batch, attend with flash_varlen, scatter back.


def _cu_seqlens(counts: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


def _padded(query, key, value, mask, opts):
    """mask (B, Sk) True for real keys; the queries are the last Sq positions, so mask[:, -Sq:] marks theirs.
    Each sequence's real queries and keys keep their order, so bottom-right alignment per sequence is the
    model's causal rule on absolute positions (see README: left and right padding)."""
    import fused_attn

    b, hq, sq, d = query.shape
    sk = key.shape[2]
    mask_q = mask[:, sk - sq:]
    idx_k = mask.reshape(-1).nonzero().squeeze(1)
    idx_q = mask_q.reshape(-1).nonzero().squeeze(1)
    len_k, len_q = mask.sum(1), mask_q.sum(1)
    # (B, H, S, D) -> (B * S, H, D): the model's tensors are (B, S, H, D) storage viewed as (B, H, S, D),
    # so this reshape is usually a view before the gather.
    q = query.transpose(1, 2).reshape(b * sq, hq, d).index_select(0, idx_q)
    k = key.transpose(1, 2).reshape(b * sk, key.shape[1], d).index_select(0, idx_k)
    v = value.transpose(1, 2).reshape(b * sk, value.shape[1], d).index_select(0, idx_k)
    out = fused_attn.flash_varlen(q, k, v, _cu_seqlens(len_q), _cu_seqlens(len_k),
                                  max_seqlen_q=int(len_q.max()), max_seqlen_k=int(len_k.max()), **opts)
    full = out.new_zeros(b * sq, hq, d).index_copy(0, idx_q, out)
    return full.view(b, sq, hq, d)


def _packed_boundaries(kwargs, b, sq, sk, device):
    """cu_seqlens (int32) of several sequences packed in one row, or None. From the FlashAttention kwargs
    (cu_seq_lens_q == cu_seq_lens_k required) or from position_ids restarting, with the rule transformers'
    own masks use (a new sequence wherever position_ids does not step by 1), only without a cache (Sq == Sk)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or b != 1 or not torch.equal(cu_q, cu_k):
            raise ValueError("cu_seq_lens_q: expected equal cu_seq_lens_q and cu_seq_lens_k with batch 1 (packed "
                             "self-attention); other packings are not served by fused_attn's transformers backend")
        return cu_q.to(device=device, dtype=torch.int32)
    pos = kwargs.get("position_ids")
    if pos is None or b != 1 or sq != sk or sq < 2:
        return None
    pos = pos.reshape(-1)
    if pos.numel() != sq:
        return None
    starts = (torch.diff(pos) != 1).nonzero().squeeze(1) + 1
    if starts.numel() == 0:
        return None
    bounds = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), sq)])
    return bounds.to(device=device, dtype=torch.int32)


def _packed(query, key, value, cu, opts):
    import fused_attn

    _, hq, s, d = query.shape
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (S, H, D) views
    longest = int((cu[1:] - cu[:-1]).max())
    out = fused_attn.flash_varlen(q, k, v, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest, **opts)
    return out.view(1, s, hq, d)
