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

from ._args import check_inputs


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


def attention(q, k, v, *, causal=False, window=None, block_mask=None, scale=None, return_lse=False):
    """softmax(q k^T * scale) v over the visible keys, computed in q's dtype. Rows that see no key give 0
    (and lse = -inf). Differentiable; GQA/MQA by repeating k and v heads."""
    q, k, v, left, right, scale = check_inputs(q, k, v, causal, window, block_mask, scale, return_lse)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    vis = visible_mask(q.shape[2], k.shape[2], left=left, right=right, block_mask=block_mask, device=q.device)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
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
