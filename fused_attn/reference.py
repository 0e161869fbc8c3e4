"""The pure-PyTorch reference: same signatures and semantics as fused_attn.flash() and
fused_attn.linear_attention(), materialising the (Sq, Sk) scores (or weights). Ground truth for the tests
(run it on float64 inputs) and the baseline a kernel's low-precision error is judged against (run it on
the kernel's own dtype).

The visibility rule here mirrors csrc/mask.h: query i sees key j iff
    i + (Sk - Sq) - left <= j <= i + (Sk - Sq) + right   (-1: unbounded; causal sets right = 0)
and, with a block mask, layout[b, h, i // bq, j // bk].
"""
from __future__ import annotations

import torch

from ._args import check_inputs, check_kvcache, check_mods, check_varlen


def visible_mask(sq: int, sk: int, *, left: int = -1, right: int = -1, block_mask=None,
                 device=None) -> torch.Tensor:
    """The element-level visibility as a bool tensor (Bm, Hm, Sq, Sk) (Bm = Hm = 1 without block mask)."""
    if block_mask is not None:
        device = block_mask.device
    i = torch.arange(sq, device=device).view(sq, 1)
    j = torch.arange(sk, device=device).view(1, sk)
    d = j - i - (sk - sq)
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= d >= -left
    if right >= 0:
        vis &= d <= right
    vis = vis.view(1, 1, sq, sk)
    if block_mask is not None:
        bq, bk = block_mask.block_size
        lay = block_mask.layout
        vis = vis & lay[:, :, (i // bq).view(-1)][:, :, :, (j // bk).view(-1)]
    return vis


def attention(q, k, v, *, causal=False, window=None, block_mask=None, scale=None, softcap=0.0,
              alibi_slopes=None, return_lse=False):
    """softmax(q k^T * scale) v over the visible keys, computed in q's dtype. Rows that see no key give 0
    (and lse = -inf). softcap > 0: s = softcap * tanh(s / softcap); ALiBi: s -= slope[b, h] * |i + Sk - Sq - j|.
    Differentiable; GQA/MQA by repeating k and v heads."""
    q, k, v, left, right, scale = check_inputs(q, k, v, causal, window, block_mask, scale, return_lse)
    softcap, alibi = check_mods(softcap, alibi_slopes, q.shape[0], q.shape[1], q.device)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    vis = visible_mask(sq, sk, left=left, right=right, block_mask=block_mask, device=q.device)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        dist = (torch.arange(sq, device=q.device).view(sq, 1) + (sk - sq)
                - torch.arange(sk, device=q.device).view(1, sk)).abs().to(s.dtype)
        s = s - alibi.to(s.dtype).view(alibi.shape[0], alibi.shape[1], 1, 1) * dist
    s = s.masked_fill(~vis, float("-inf"))
    empty = ~vis.any(-1)  # rows that see nothing: keep their arithmetic finite, then zero them
    s_safe = s.masked_fill(empty.unsqueeze(-1), 0.0)
    lse = torch.logsumexp(s_safe, dim=-1)
    p = torch.exp(s_safe - lse.unsqueeze(-1)).masked_fill(~vis, 0.0)
    out = torch.matmul(p, v)
    if not return_lse:
        return out
    lse = lse.masked_fill(empty, float("-inf"))
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """The built-in feature maps of linear_attention: elu(x) + 1, relu(x), or x itself."""
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if feature_map == "relu":
        return torch.relu(x)
    return x


def linear_attention(q, k, v, *, causal=True, feature_map="elu1", normalize=True, scale=None, eps=1e-6,
                     initial_state=None, return_state=False):
    """Kernelized attention in its quadratic masked form, in q's dtype (the state in float32, float64 for
    float64 inputs): with a = phi(scale * q), b = phi(k), w_ij = a_i . b_j over j <= i (causal) or all j,

        out_i = (a_i S0 + sum_j w_ij v_j) / (a_i . z0 + sum_j w_ij + eps)     (normalize=True)
        out_i =  a_i S0 + sum_j w_ij v_j                                       (normalize=False)

    (S0, z0) = initial_state (zero when None; causal only). The state returned with return_state=True is
    (S0 + sum_j b_j v_j^T, z0 + sum_j b_j) over all keys: (B, H, Dk, Dv) and (B, H, Dk)."""
    from ._linear_args import check_linear_inputs, state_dtype

    q, k, v, scale, eps, s0, z0 = check_linear_inputs(q, k, v, causal, feature_map, normalize, scale, eps,
                                                      initial_state, return_state)
    a = feature(q * scale, feature_map)
    b = feature(k, feature_map)
    w = torch.matmul(a, b.transpose(-1, -2))
    if causal:
        w = w.masked_fill(~visible_mask(q.shape[2], k.shape[2], right=0, device=q.device), 0.0)
    num = torch.matmul(w, v)
    den = w.sum(-1)
    if s0 is not None:
        num = num + torch.matmul(a, s0.to(q.dtype))
        den = den + torch.matmul(a, z0.to(q.dtype).unsqueeze(-1)).squeeze(-1)
    out = num / (den + eps).unsqueeze(-1) if normalize else num
    if not return_state:
        return out
    sd = state_dtype(q.dtype)
    s = torch.matmul(b.transpose(-1, -2).to(sd), v.to(sd))
    z = b.to(sd).sum(-2)
    if s0 is not None:
        s, z = s + s0, z + z0
    return out, (s, z)


def flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                 window=None, scale=None, softcap=0.0, alibi_slopes=None, return_lse=False):
    """fused_attn.flash_varlen's twin: attention() on each sequence of the packed batch."""
    (q, k, v, cu_q, cu_k, _, _, left, right, scale, softcap, alibi) = check_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale, softcap,
        alibi_slopes, return_lse)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        slopes = None if alibi is None else alibi[0 if alibi.shape[0] == 1 else b]
        o, lse = _rows(qb, kb, vb, left, right, scale, softcap, slopes)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 1).to(lse_dt) if lses else q.new_zeros((q.shape[1], 0), dtype=lse_dt)
    return (out, lse) if return_lse else out


def _rows(q, k, v, left, right, scale, softcap, slopes):
    """attention() of one sequence (1, H, S, D), also when Sq or Sk is 0."""
    window = (left, right)
    if q.shape[2] == 0 or k.shape[2] == 0:
        lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (q.new_zeros(q.shape) + 0 * q.sum(),
                torch.full(q.shape[:3], float("-inf"), dtype=lse_dt, device=q.device))
    return attention(q, k, v, window=window, scale=scale, softcap=softcap, return_lse=True,
                     alibi_slopes=slopes)


def flash_kvcache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, block_table=None, causal=False,
                  window=None, scale=None, softcap=0.0, alibi_slopes=None, return_lse=False, num_splits=0):
    """fused_attn.flash_kvcache's twin: writes k_new / v_new into the cache in place the same way, then runs
    attention() over each sequence's keys gathered from the cache."""
    q, seqlens, left, right, scale, softcap, alibi = check_kvcache(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, window, scale, softcap,
        alibi_slopes, return_lse, num_splits)
    s_new = 0 if k_new is None else k_new.shape[2]
    lens = seqlens.tolist()

    def slots(b, n):  # (cache index tuple) of positions 0 .. n-1 of sequence b
        pos = torch.arange(n, device=q.device)
        if block_table is None:
            return pos
        ps = k_cache.shape[1]
        return block_table[b].long()[pos // ps], pos % ps

    with torch.no_grad():
        for b in range(q.shape[0]):
            if s_new:
                pos = torch.arange(lens[b], lens[b] + s_new, device=q.device)
                if block_table is None:
                    k_cache[b, :, pos] = k_new[b]
                    v_cache[b, :, pos] = v_new[b]
                else:
                    ps = k_cache.shape[1]
                    page, slot = block_table[b].long()[pos // ps], pos % ps
                    k_cache[page, slot] = k_new[b].transpose(0, 1)
                    v_cache[page, slot] = v_new[b].transpose(0, 1)
    outs, lses = [], []
    for b in range(q.shape[0]):
        n = lens[b] + s_new
        if block_table is None:
            kb, vb = k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n]
        else:
            page, slot = slots(b, n)
            kb = k_cache[page, slot].transpose(0, 1).unsqueeze(0)
            vb = v_cache[page, slot].transpose(0, 1).unsqueeze(0)
        slopes = None if alibi is None else alibi[0 if alibi.shape[0] == 1 else b]
        o, lse = _rows(q[b:b + 1], kb, vb, left, right, scale, softcap, slopes)
        outs.append(o)
        lses.append(lse)
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, 0).to(lse_dt) if lses else q.new_zeros(q.shape[:3], dtype=lse_dt)
    return (out, lse) if return_lse else out
