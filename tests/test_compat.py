"""fused_attn.compat against a reference written from flash-attn 2.x's documented semantics (its docstrings):
(batch, seqlen, nheads, headdim) layouts, bottom-right causal, window_size [i + Sk - Sq - left,
i + Sk - Sq + right], softcap * tanh(s / softcap), ALiBi -slope * |i + Sk - Sq - j|, lse (batch, nheads, Sq),
packed varlen with cu_seqlens, and the in-place KV-cache append of flash_attn_with_kvcache."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_rule
from fused_attn import compat


def fa_reference(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """flash-attn's documented semantics on (B, S, H, D) tensors; returns (out (B, Sq, H, D), lse (B, H, Sq)).
    A row that sees no key gives out = 0 and lse = -inf."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    rep = h // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scale = 1 / math.sqrt(d) if softmax_scale is None else softmax_scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq).view(sq, 1)
    j = torch.arange(sk).view(1, sk)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype).expand(b, h) if alibi_slopes.dim() == 2 else \
            alibi_slopes.to(s.dtype).view(1, h).expand(b, h)
        s = s - slopes.view(b, h, 1, 1) * (i + sk - sq - j).abs()
    left, right = window_size
    if causal:
        right = 0
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        keep &= j >= i + sk - sq - left
    if right >= 0:
        keep &= j <= i + sk - sq + right
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(~keep.any(-1).view(1, 1, sq, 1), 0.0)).masked_fill(~keep, 0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def rand(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def grads(fn, tensors, dout):
    ts = [t.detach().requires_grad_(True) for t in tensors]
    out, lse = fn(*ts)
    out.backward(dout.to(out.dtype))
    return [out.detach(), lse.detach()] + [t.grad for t in ts]


DENSE = [
    # (b, sq, sk, hq, hk, d, kwargs)
    (2, 97, 97, 4, 4, 40, dict(causal=True)),
    (1, 17, 50, 4, 2, 16, dict(causal=True)),                   # Sq < Sk: bottom-right
    (1, 50, 17, 2, 2, 16, dict(causal=True)),                   # Sq > Sk: first rows see nothing
    (2, 33, 41, 6, 2, 59, dict(window_size=(5, 3))),
    (1, 64, 64, 2, 1, 32, dict(window_size=(8, 0), causal=True, softmax_scale=0.3)),
    (1, 1, 129, 8, 2, 64, dict()),                               # decode-like
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", DENSE, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}/{c[4]}x{c[5]}-{c[6]}")
def test_flash_attn_func(case, dtype):
    b, sq, sk, hq, hk, d, kw = case
    q, k, v = rand(b, sq, hq, d, seed=1), rand(b, sk, hk, d, seed=2), rand(b, sk, hk, d, seed=3)
    dout = rand(b, sq, hq, d, seed=4)

    def mine(q, k, v):
        out, lse, s_dmask = compat.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        assert s_dmask.numel() == 0
        assert out.is_contiguous() and out.shape == (b, sq, hq, d)
        return out, lse

    got = grads(mine, [t.to(dtype) for t in (q, k, v)], dout)
    ref = grads(lambda *t: fa_reference(*t, **kw), [q, k, v], dout)
    base = grads(lambda *t: fa_reference(*t, **kw), [t.to(dtype) for t in (q, k, v)], dout)
    for name, a, r, bse in zip(("out", "lse", "dq", "dk", "dv"), got, ref, base):
        assert a.shape == r.shape, f"{name}: {tuple(a.shape)} != {tuple(r.shape)}"
        assert_rule(name, a, r, bse, dtype)


@pytest.mark.parametrize("kw", [dict(softcap=5.0), dict(softcap=2.0, causal=True, window_size=(7, 0)),
                                dict(alibi_slopes="heads", causal=True), dict(alibi_slopes="batch", softcap=3.0)],
                         ids=["softcap", "softcap-window", "alibi", "alibi-batch-softcap"])
def test_flash_attn_func_softcap_alibi(kw):
    b, sq, sk, hq, hk, d = 2, 37, 45, 4, 2, 32
    kw = dict(kw)
    if kw.get("alibi_slopes") == "heads":
        kw["alibi_slopes"] = torch.rand(hq, generator=torch.Generator().manual_seed(5)) * 0.5
    elif kw.get("alibi_slopes") == "batch":
        kw["alibi_slopes"] = torch.rand(b, hq, generator=torch.Generator().manual_seed(5)) * 0.5
    q, k, v = rand(b, sq, hq, d, seed=1), rand(b, sk, hk, d, seed=2), rand(b, sk, hk, d, seed=3)
    dout = rand(b, sq, hq, d, seed=4)
    for dtype in (torch.float64, torch.float32):
        got = grads(lambda *t: compat.flash_attn_func(*t, return_attn_probs=True, **kw)[:2],
                    [t.to(dtype) for t in (q, k, v)], dout)
        ref = grads(lambda *t: fa_reference(*t, **kw), [q, k, v], dout)
        base = grads(lambda *t: fa_reference(*t, **kw), [t.to(dtype) for t in (q, k, v)], dout)
        for name, a, r, bse in zip(("out", "lse", "dq", "dk", "dv"), got, ref, base):
            assert_rule(f"{name} {dtype}", a, r, bse, dtype)


def test_packed_variants_match_unpacked():
    b, s, h, d = 2, 29, 4, 16
    qkv = rand(b, s, 3, h, d, seed=7).requires_grad_(True)
    out = compat.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(6, -1))
    (dqkv,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    q, k, v = (qkv.detach()[:, :, i].clone().requires_grad_(True) for i in range(3))
    ref = compat.flash_attn_func(q, k, v, causal=True, window_size=(6, -1))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dqkv, torch.stack(torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref)), dim=2))

    q = rand(b, s, h, d, seed=8)
    kv = rand(b, s + 5, 2, 2, d, seed=9)
    out, lse, _ = compat.flash_attn_kvpacked_func(q, kv, causal=True, return_attn_probs=True)
    ref, ref_lse = fa_reference(q, kv[:, :, 0], kv[:, :, 1], causal=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_deterministic_backward_is_bitwise_repeatable():
    q, k, v = (rand(1, 70, 4, 32, seed=s, dtype=torch.float32).requires_grad_(True) for s in (1, 2, 3))
    runs = []
    for _ in range(2):
        out = compat.flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_errors_name_the_argument():
    q = k = v = torch.zeros(1, 8, 2, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        compat.flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="window_size"):
        compat.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="window_size"):
        compat.flash_attn_func(q, k, v, window_size=5)
    with pytest.raises(ValueError, match=r"q: expected 4-D \(batch, seqlen, nheads, headdim\)"):
        compat.flash_attn_func(q[0], k, v)
    with pytest.raises(TypeError, match="softmax_scale"):
        compat.flash_attn_func(q, k, v, softmax_scale="big")
    with pytest.raises(ValueError, match="qkv"):
        compat.flash_attn_qkvpacked_func(torch.zeros(1, 8, 2, 2, 16))
    with pytest.raises(ValueError, match="dropout_p"):
        compat.flash_attn_varlen_func(q[0], k[0], v[0], None, None, 8, 8, dropout_p=0.5)
    for name in ("rotary_cos", "rotary_sin", "cache_batch_idx", "cache_leftpad"):
        with pytest.raises(ValueError, match=name):
            compat.flash_attn_with_kvcache(q, k, v, cache_seqlens=4, **{name: torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------
# Packed variable-length batches.


def varlen_reference(q, k, v, cu_q, cu_k, **kw):
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = (t[c[b]:c[b + 1]].unsqueeze(0) for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        o, lse = fa_reference(qs, ks, vs, **kw)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(4, 2)), dict()], ids=["causal", "window", "dense"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flash_attn_varlen_func(kw, dtype):
    lens_q, lens_k = [5, 0, 1, 40, 17], [9, 3, 1, 40, 12]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    h, hk, d = 4, 2, 24
    q, k, v = rand(sum(lens_q), h, d, seed=1), rand(sum(lens_k), hk, d, seed=2), rand(sum(lens_k), hk, d, seed=3)
    dout = rand(sum(lens_q), h, d, seed=4)

    def mine(q, k, v):
        out, lse, _ = compat.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                    return_attn_probs=True, **kw)
        return out, lse

    got = grads(mine, [t.to(dtype) for t in (q, k, v)], dout)
    ref = grads(lambda *t: varlen_reference(*t, cu_q.tolist(), cu_k.tolist(), **kw), [q, k, v], dout)
    base = grads(lambda *t: varlen_reference(*t, cu_q.tolist(), cu_k.tolist(), **kw),
                 [t.to(dtype) for t in (q, k, v)], dout)
    for name, a, r, bse in zip(("out", "lse", "dq", "dk", "dv"), got, ref, base):
        assert a.shape == r.shape, f"{name}: {tuple(a.shape)} != {tuple(r.shape)}"
        assert_rule(name, a, r, bse, dtype)


# ---------------------------------------------------------------------------------------------------------
# KV cache.


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("seqlens_as", ["tensor", "int"])
def test_flash_attn_with_kvcache_appends_then_attends(paged, seqlens_as):
    b, h, hk, d, s_max, s_new, sq = 3, 4, 2, 32, 64, 3, 3
    lens = [10, 0, 33] if seqlens_as == "tensor" else [20, 20, 20]
    k_full, v_full = rand(b, s_max, hk, d, seed=1), rand(b, s_max, hk, d, seed=2)
    k_new, v_new = rand(b, s_new, hk, d, seed=3), rand(b, s_new, hk, d, seed=4)
    q = rand(b, sq, h, d, seed=5)
    if paged:
        page = 16
        perm = torch.randperm(b * s_max // page, generator=torch.Generator().manual_seed(0))
        table = perm.view(b, s_max // page).to(torch.int32)
        k_cache = torch.zeros(b * s_max // page, page, hk, d, dtype=torch.float64)
        v_cache = torch.zeros_like(k_cache)
        for bi in range(b):
            for p in range(s_max // page):
                k_cache[table[bi, p]] = k_full[bi, p * page:(p + 1) * page]
                v_cache[table[bi, p]] = v_full[bi, p * page:(p + 1) * page]
    else:
        table, k_cache, v_cache = None, k_full.clone(), v_full.clone()
    seqlens = torch.tensor(lens, dtype=torch.int32) if seqlens_as == "tensor" else lens[0]
    out, lse = compat.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                              block_table=table, causal=True, return_softmax_lse=True)
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq)
    for bi in range(b):
        n = lens[bi]
        keys = torch.cat([k_full[bi, :n], k_new[bi]]).unsqueeze(0)
        vals = torch.cat([v_full[bi, :n], v_new[bi]]).unsqueeze(0)
        ref, ref_lse = fa_reference(q[bi:bi + 1], keys, vals, causal=True)
        torch.testing.assert_close(out[bi:bi + 1], ref)
        torch.testing.assert_close(lse[bi:bi + 1], ref_lse)
        # the new keys were written into the caller's cache
        if paged:
            pos = torch.arange(n, n + s_new)
            written = k_cache[table[bi, pos // 16].long(), pos % 16]
        else:
            written = k_cache[bi, n:n + s_new]
        torch.testing.assert_close(written, k_new[bi])
