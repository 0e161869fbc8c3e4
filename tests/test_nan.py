"""A NaN in the inputs reaches the outputs, as in PyTorch: the rows whose scores see it come out NaN and the
other rows stay finite. (The CPU kernels used to give a NaN score P = 0 and normalise the row without it: a
finite, silently wrong answer.)"""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference
from test_kvcache import make_cache

NAN = float("nan")


def _qkv(dtype, sq=70, sk=150, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, sk, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


MODS = [dict(), dict(causal=True), dict(window=(30, 10)), dict(softcap=30.0), dict(softcap=30.0, causal=True),
        dict(softcap=60.0), dict(alibi_slopes=torch.tensor([0.1, 0.2, 0.05, 0.3]))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kw", MODS, ids=lambda kw: "-".join(kw) or "plain")
def test_flash_nan_rows_match_reference(dtype, kw):
    q, k, v = _qkv(dtype)
    q[0, 1, 5, 3] = NAN  # one query row of one head
    k[1, 0, 100, 7] = NAN  # one key of kv head 0 in batch 1: the rows of query heads 0, 1 that see key 100
    out, lse = fused_attn.flash(q, k, v, return_lse=True, **kw)
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
    assert ref.isnan().any()
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(lse.isnan(), ref_lse.isnan())
    fin = ~ref.isnan()
    assert (out[fin].double() - ref[fin]).abs().max() < (1e-9 if dtype == torch.float64 else 5e-2)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(softcap=30.0)], ids=lambda kw: "-".join(kw) or "plain")
def test_flash_backward_nan(kw):
    """The backward of a NaN output is NaN in the heads it touches; the other heads' gradients are unchanged."""
    q, k, v = _qkv(torch.float32)
    q[0, 1, 5, 3] = NAN
    grads = []
    for qq in (q, torch.nan_to_num(q, nan=0.5)):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (qq, k, v))
        fused_attn.flash(qq, kk, vv, **kw).sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    (dq, dk, dv), (dq0, dk0, dv0) = grads
    assert dq[0, 1].isnan().any() and dk[0, 0].isnan().any() and dv[0, 0].isnan().any()
    # batch 1 and kv head 1 of batch 0 never see the NaN
    for a, b in ((dq[1], dq0[1]), (dk[1], dk0[1]), (dv[1], dv0[1]), (dq[0, 2:], dq0[0, 2:]),
                 (dk[0, 1], dk0[0, 1]), (dv[0, 1], dv0[0, 1])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_varlen_nan_stays_in_its_sequence():
    g = torch.Generator().manual_seed(1)
    lens = [40, 0, 77, 13]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    n = int(cu[-1])
    q, k, v = (torch.randn(n, 4, 32, generator=g) for _ in range(3))
    k[40 + 10, 2, 5] = NAN  # sequence 2, key 10, head 2
    out = fused_attn.flash_varlen(q, k, v, cu, cu, causal=True)
    nan_rows = out.isnan().any(-1)  # (n, H)
    expect = torch.zeros_like(nan_rows)
    expect[40 + 10:40 + 77, 2] = True  # the rows of sequence 2 at or after key 10, head 2
    assert torch.equal(nan_rows, expect)


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kw", [dict(), dict(softcap=30.0)], ids=lambda kw: "-".join(kw) or "plain")
def test_kvcache_nan(page_size, num_splits, kw):
    b, hk, d, s_max = 3, 2, 64, 200
    lens = [200, 150, 90]
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=page_size, dtype=torch.float32)
    # batch 1, position 40 of kv head 1, wherever the layout keeps it
    if bt is None:
        kc[1, 1, 40, 3] = NAN
    else:
        kc[int(bt[1, 40 // page_size]), 40 % page_size, 1, 3] = NAN
    q = torch.randn(b, 4, 2, d, generator=torch.Generator().manual_seed(5))
    out = fused_attn.flash_kvcache(q, kc, vc, torch.tensor(lens, dtype=torch.int32), block_table=bt,
                                   num_splits=num_splits, **kw)
    nan_rows = out.isnan().any(-1)  # (B, Hq, Sq)
    expect = torch.zeros_like(nan_rows)
    expect[1, 2:4] = True  # query heads 2, 3 share kv head 1
    assert torch.equal(nan_rows, expect)
