"""The pure-PyTorch reference: same signature and semantics as fused_attn.flash(), materialising the
(Sq, Sk) scores. Ground truth for the tests (run it on float64 inputs) and the baseline a kernel's
low-precision error is judged against (run it on the kernel's own dtype).

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
