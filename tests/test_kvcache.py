"""flash_kvcache on the CPU: contiguous and paged caches (page sizes 16, 64, 256, shuffled page tables),
appending then attending equals attending over the concatenated keys, Sq = 1 and Sq > 1, int and tensor
cache_seqlens, GQA, every pattern, softcap and ALiBi, split counts; against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference
from conftest import assert_rule


def make_cache(b, hk, d, lens, s_max, *, page_size=None, dtype=torch.float64, seed=0, extra_pages=3):
    """A cache holding sequences of the given lengths, contiguous (B, Hk, S_max, D) or paged with a
    shuffled page table in which no page is shared; returns (k_cache, v_cache, block_table, k_full, v_full)
    with k_full / v_full (B, Hk, S_max, D) the logical contents."""
    g = torch.Generator().manual_seed(seed)
    k_full = torch.randn(b, hk, s_max, d, generator=g, dtype=torch.float64).to(dtype)
    v_full = torch.randn(b, hk, s_max, d, generator=g, dtype=torch.float64).to(dtype)
    if page_size is None:
        return k_full.clone(), v_full.clone(), None, k_full, v_full
    per_seq = -(-s_max // page_size)
    num_pages = b * per_seq + extra_pages
    perm = torch.randperm(num_pages, generator=g)[: b * per_seq].view(b, per_seq).to(torch.int32)
    kc = torch.randn(num_pages, page_size, hk, d, generator=g, dtype=torch.float64).to(dtype)
    vc = torch.randn(num_pages, page_size, hk, d, generator=g, dtype=torch.float64).to(dtype)
    for bi in range(b):
        for pos in range(s_max):
            pg, sl = int(perm[bi, pos // page_size]), pos % page_size
            kc[pg, sl] = k_full[bi, :, pos]
            vc[pg, sl] = v_full[bi, :, pos]
    return kc, vc, perm, k_full, v_full


def reference_over(q, k_full, v_full, lens, **kw):
    """attention over each sequence's first lens[b] keys, float64."""
    outs, lses = [], []
    for b, n in enumerate(lens):
        o, l = reference.attention(q[b:b + 1].double(), k_full[b:b + 1, :, :n].double(),
                                   v_full[b:b + 1, :, :n].double(), return_lse=True, **{
                                       key: (val[b:b + 1] if key == "alibi_slopes" and val.dim() == 2 else val)
                                       for key, val in kw.items()})
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("page_size", [None, 16, 64, 256])
@pytest.mark.parametrize("sq", [1, 5])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(causal=True, window=(20, 0)),
                                dict(softcap=2.0), dict(alibi=True)])
def test_kvcache_matches_reference(page_size, sq, kw):
    b, hq, hk, d, s_max = 3, 8, 2, 40, 300
    lens = [0, 77, 290]  # tokens in the cache; sequence 0 empty
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=page_size, seed=sq)
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(b, hq, generator=torch.Generator().manual_seed(2))
    q = torch.randn(b, hq, sq, d, dtype=torch.float64)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = fused_attn.flash_kvcache(q, kc, vc, seqlens, block_table=bt, return_lse=True, **kw)
    ref_out, ref_lse = reference_over(q, k_full, v_full, lens, **kw)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-10)
    ref2 = reference.flash_kvcache(q, kc.clone(), vc.clone(), seqlens, block_table=bt, return_lse=True, **kw)
    torch.testing.assert_close(out, ref2[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("cache_seqlens", ["tensor", "int"])
def test_append_then_attend(page_size, cache_seqlens):
    """Writing k_new / v_new and attending equals attending over the concatenated keys; the cache holds the
    new keys afterwards, at the right positions, and nothing else changed."""
    b, hq, hk, d, s_max, s_new = 2, 4, 2, 32, 128, 3
    lens = [50, 50] if cache_seqlens == "int" else [10, 100]
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=page_size, seed=4)
    kc0, vc0 = kc.clone(), vc.clone()
    q = torch.randn(b, hq, 4, d, dtype=torch.float64)
    kn = torch.randn(b, hk, s_new, d, dtype=torch.float64)
    vn = torch.randn(b, hk, s_new, d, dtype=torch.float64)
    sl = 50 if cache_seqlens == "int" else torch.tensor(lens, dtype=torch.int32)
    out = fused_attn.flash_kvcache(q, kc, vc, sl, k_new=kn, v_new=vn, block_table=bt, causal=True)
    for bi, n in enumerate(lens):
        k_full[bi, :, n:n + s_new] = kn[bi]
        v_full[bi, :, n:n + s_new] = vn[bi]
    ref_out, _ = reference_over(q, k_full, v_full, [n + s_new for n in lens], causal=True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    # The same call through the reference leaves the cache in the same state.
    reference.flash_kvcache(q, kc0, vc0, sl, k_new=kn, v_new=vn, block_table=bt, causal=True)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [None, 64])
def test_kvcache_low_precision(dtype, page_size):
    b, hq, hk, d, s_max = 2, 8, 2, 64, 700
    lens = [650, 123]
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=page_size, dtype=dtype, seed=5)
    q = torch.randn(b, hq, 1, d, dtype=torch.float64).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    out, lse = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, return_lse=True)
    ref_out, ref_lse = reference_over(q.double(), k_full.double(), v_full.double(), lens)
    assert_rule("out", out, ref_out, _same_dtype_ref(q, k_full, v_full, lens), dtype)
    assert_rule("lse", lse, ref_lse, _same_dtype_ref(q, k_full, v_full, lens, lse=True), dtype)


def _same_dtype_ref(q, k_full, v_full, lens, lse=False):
    outs = []
    for b, n in enumerate(lens):
        o, l = reference.attention(q[b:b + 1], k_full[b:b + 1, :, :n], v_full[b:b + 1, :, :n], return_lse=True)
        outs.append(l if lse else o)
    return torch.cat(outs)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_num_splits_same_result(num_splits):
    b, hq, hk, d, s_max = 1, 4, 1, 16, 1000
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, [999], s_max, page_size=16, seed=6)
    q = torch.randn(b, hq, 2, d, dtype=torch.float64)
    sl = torch.tensor([999], dtype=torch.int32)
    out = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, num_splits=num_splits, causal=True)
    ref_out, _ = reference_over(q, k_full, v_full, [999], causal=True)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)


def test_transposed_pool_layout():
    """An (num_pages, Hk, page_size, D) pool passed as .transpose(1, 2) is used without a copy."""
    b, hq, hk, d, s_max, ps = 2, 4, 2, 16, 64, 16
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, [40, 64], s_max, page_size=ps, seed=8)
    kt = kc.transpose(1, 2).contiguous().transpose(1, 2)
    vt = vc.transpose(1, 2).contiguous().transpose(1, 2)
    q = torch.randn(b, hq, 1, d, dtype=torch.float64)
    sl = torch.tensor([40, 64], dtype=torch.int32)
    kn = torch.randn(b, hk, 0, d, dtype=torch.float64)
    out = fused_attn.flash_kvcache(q, kt, vt, sl, block_table=bt, k_new=kn, v_new=kn.clone())
    ref_out, _ = reference_over(q, k_full, v_full, [40, 64])
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)


def test_kvcache_errors():
    q = torch.randn(2, 4, 1, 8)
    kc = torch.randn(2, 2, 16, 8)
    sl = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"cache_seqlens: expected dtype torch.int32"):
        fused_attn.flash_kvcache(q, kc, kc.clone(), sl.long())
    with pytest.raises(ValueError, match=r"cache_seqlens: sequence 1 holds 15 tokens; with 2 new ones"):
        kn = torch.randn(2, 2, 2, 8)
        fused_attn.flash_kvcache(q, kc, kc.clone(), torch.tensor([3, 15], dtype=torch.int32), k_new=kn,
                                 v_new=kn.clone())
    with pytest.raises(ValueError, match=r"k_new, v_new: expected both or neither"):
        fused_attn.flash_kvcache(q, kc, kc.clone(), sl, k_new=torch.randn(2, 2, 1, 8))
    pool = torch.randn(6, 4, 2, 8)
    with pytest.raises(TypeError, match=r"block_table: expected dtype torch.int32"):
        fused_attn.flash_kvcache(q, pool, pool.clone(), sl, block_table=torch.zeros(2, 2, dtype=torch.long))
    bt = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_table: entry \[1, 1\] = 9 is outside \[0, num_pages = 6\)"):
        fused_attn.flash_kvcache(q, pool, pool.clone(), torch.tensor([3, 7], dtype=torch.int32), block_table=bt)
    # Unused entries (past the sequence's pages) may hold anything, like -1 padding.
    bt = torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)
    fused_attn.flash_kvcache(q, pool, pool.clone(), torch.tensor([3, 7], dtype=torch.int32), block_table=bt)
    with pytest.raises(ValueError, match=r"softcap: expected a finite float >= 0"):
        fused_attn.flash_kvcache(q, kc, kc.clone(), sl, softcap=-1.0)
    with pytest.raises(ValueError, match=r"alibi_slopes: expected shape \(Hq,\) = \(4,\)"):
        fused_attn.flash_kvcache(q, kc, kc.clone(), sl, alibi_slopes=torch.ones(3))
    with pytest.raises(ValueError, match=r"num_splits: expected an int >= 0"):
        fused_attn.flash_kvcache(q, kc, kc.clone(), sl, num_splits=-2)
    with pytest.raises(ValueError, match=r"k_cache: expected 4-D \(B, Hk, S_max, D\)"):
        fused_attn.flash_kvcache(q, kc[0], kc[0].clone(), sl)
