"""flash_varlen and the score modifiers (softcap, ALiBi) on the CPU kernels, against the float64
reference: mixed lengths including 0 and 1, Sq_b != Sk_b, every pattern, GQA, odd head dims; fp64
gradcheck on the kernels themselves."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference
from conftest import assert_rule, make_qkv

PATTERNS = {
    "dense": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(7, 3)),
    "causal_window": dict(causal=True, window=(5, -1)),
}


def packed(lens_q, lens_k, hq, hk, d, *, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(tk, hk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(tk, hk, d, generator=g, dtype=torch.float64).to(dtype)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32)
    return q, k, v, cu(lens_q), cu(lens_k)


def run(fn, q, k, v, cu_q, cu_k, dout, dtype, **kw):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out, lse = fn(qq, kk, vv, cu_q, cu_k, return_lse=True, **kw)
    if out.requires_grad:
        out.backward(dout.to(dtype))
    # An empty batch (no rows at all) leaves the reference's output unconnected: its gradients are zero.
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (qq, kk, vv)]
    return (out.detach(), lse.detach(), *grads)


def check_varlen(q, k, v, cu_q, cu_k, **kw):
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64)
    mine = run(fused_attn.flash_varlen, q, k, v, cu_q, cu_k, dout, q.dtype, **kw)
    ref = run(reference.flash_varlen, q, k, v, cu_q, cu_k, dout, torch.float64, **kw)
    base = run(reference.flash_varlen, q, k, v, cu_q, cu_k, dout, q.dtype, **kw)
    for name, a, r, bse in zip(("out", "lse", "dq", "dk", "dv"), mine, ref, base):
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert_rule(name, a, r, bse, q.dtype)


MIXED = ([5, 0, 1, 97, 33, 130], [9, 3, 0, 97, 150, 64])  # lengths of q and k per sequence: 0, 1, Sq != Sk


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 40), (3, 3, 59), (4, 1, 16)])
def test_varlen_fp64(pattern, hq, hk, d):
    q, k, v, cu_q, cu_k = packed(*MIXED, hq, hk, d, seed=hq * d)
    check_varlen(q, k, v, cu_q, cu_k, **PATTERNS[pattern])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_varlen_low_precision(dtype):
    q, k, v, cu_q, cu_k = packed(*MIXED, 4, 2, 64, dtype=dtype, seed=3)
    check_varlen(q, k, v, cu_q, cu_k, causal=True)


def test_varlen_equals_flash_per_sequence():
    """A packed batch gives exactly what flash() gives on each sequence alone (same kernels, same tiles)."""
    lens = [70, 1, 200]
    q, k, v, cu_q, cu_k = packed(lens, lens, 4, 2, 32, dtype=torch.float32, seed=11)
    out = fused_attn.flash_varlen(q, k, v, cu_q, cu_k, causal=True)
    for b in range(len(lens)):
        sl = slice(int(cu_q[b]), int(cu_q[b + 1]))
        one = fused_attn.flash(*(t[sl].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), causal=True)
        torch.testing.assert_close(out[sl], one[0].transpose(0, 1), rtol=0, atol=1e-6)


def test_varlen_strided_views_and_max_given():
    """(total, H, D) views with non-contiguous heads, max_seqlen given, mods on."""
    q, k, v, cu_q, cu_k = packed([40, 17], [33, 60], 4, 2, 24, seed=5)
    big = torch.randn(q.shape[0], 4, 48, dtype=torch.float64)
    big[..., :24] = q
    qv = big[..., :24]  # head stride 48, row stride 192
    slopes = torch.rand(4, dtype=torch.float32)
    check_varlen(qv, k, v, cu_q, cu_k, max_seqlen_q=40, max_seqlen_k=60, causal=True, softcap=3.0,
                 alibi_slopes=slopes)


@pytest.mark.parametrize("kw", [dict(softcap=2.5), dict(alibi=True), dict(softcap=1.5, alibi=True),
                                dict(softcap=4.0, causal=True, window=(20, 0))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_softcap_alibi_flash(kw, dtype):
    from conftest import check_all

    kw = dict(kw)
    q, k, v = make_qkv(2, 4, 2, 77, 130, 40, seed=9)
    q = q * 3  # scores large enough that the cap bites
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(2, 4, generator=torch.Generator().manual_seed(1)) * 0.5
    check_all(q.to(dtype), k.to(dtype), v.to(dtype), **kw)


@pytest.mark.parametrize("cap", [30.0, 50.0])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_large_cap_fp32(cap, causal):
    """Caps of the size models use (30, 50) with scores far below them: the capped score is nearly the score,
    so tanh must be accurate relative to itself near 0 (1 - 2 / (1 + e^2u) was not: its absolute error times a
    cap of 50 broke the rule on dK). 30 takes the forward's fixed-max path (cap <= 43.3), 50 the running max."""
    from conftest import check_all

    for seed, mult in ((9, 1.0), (10, 1.0), (9, 8.0)):
        q, k, v = make_qkv(2, 4, 2, 77, 130, 64, seed=seed)
        check_all((q * mult).float(), k.float(), v.float(), softcap=cap, causal=causal)


def test_softcap_rows_that_see_nothing():
    """Sq > Sk causal: the first rows see no key; with the fixed max (cap 30) they still give 0 and -inf."""
    from conftest import check_all

    q, k, v = make_qkv(1, 2, 1, 150, 100, 32, seed=4)
    out, lse = fused_attn.flash(q.float(), k.float(), v.float(), causal=True, softcap=30.0, return_lse=True)
    assert (out[:, :, :50] == 0).all() and torch.isneginf(lse[:, :, :50]).all()
    check_all(q.float(), k.float(), v.float(), causal=True, softcap=30.0)


def test_softcap_changes_the_result():
    """The cap is not silently ignored: a small cap changes the output."""
    q, k, v = make_qkv(1, 2, 2, 33, 33, 16, seed=2)
    q = q * 4
    a = fused_attn.flash(q, k, v)
    b = fused_attn.flash(q, k, v, softcap=1.0)
    assert (a - b).abs().max() > 1e-2
    torch.testing.assert_close(b, reference.attention(q, k, v, softcap=1.0), rtol=0, atol=1e-10)


def test_block_sparse_with_mods():
    from conftest import check_all

    lay = torch.rand(4, 5, 7, generator=torch.Generator().manual_seed(4)) < 0.5
    q, k, v = make_qkv(1, 4, 2, 70, 100, 24, seed=6)
    check_all(q, k, v, block_mask=fused_attn.block_mask(lay, (16, 16)), softcap=2.0,
              alibi_slopes=torch.rand(4) * 0.3, causal=True)


def finite_lse(res):
    """(out, lse) with lse's -inf (rows that see nothing) replaced by 0: a finite difference of -inf is NaN."""
    out, lse = res
    return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def test_gradcheck_varlen_fp64():
    q, k, v, cu_q, cu_k = packed([3, 0, 6, 1], [5, 2, 4, 0], 2, 1, 8, seed=1)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    slopes = torch.tensor([0.3, 0.7])
    for kw in (dict(), dict(causal=True, softcap=2.0), dict(window=(2, 1), alibi_slopes=slopes)):
        fn = lambda a, b, c: finite_lse(fused_attn.flash_varlen(a, b, c, cu_q, cu_k, return_lse=True, **kw))
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


def test_gradcheck_flash_softcap_alibi_fp64():
    q, k, v = make_qkv(1, 2, 1, 9, 12, 8, seed=3, requires_grad=True)
    slopes = torch.tensor([[0.25, 0.5]])
    for kw in (dict(softcap=1.5), dict(alibi_slopes=slopes, causal=True),
               dict(softcap=0.8, alibi_slopes=slopes, window=(3, 2))):
        fn = lambda a, b, c: finite_lse(fused_attn.flash(a, b, c, return_lse=True, **kw))
        q2 = (q * 2).detach().requires_grad_(True)
        assert torch.autograd.gradcheck(fn, (q2, k, v), eps=1e-6, atol=1e-8)


def test_varlen_compile_and_opcheck():
    q, k, v, cu_q, cu_k = packed([10, 20], [15, 5], 2, 1, 16, dtype=torch.float32)
    args = (q, k, v, cu_q, cu_k, 20, 15, 0.25, -1, 0, 0.0, None)
    torch.library.opcheck(torch.ops.fused_attn.varlen_fwd, args)
    fn = torch.compile(lambda a, b, c: fused_attn.flash_varlen(a, b, c, cu_q, cu_k, max_seqlen_q=20,
                                                                max_seqlen_k=15, causal=True), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), fused_attn.flash_varlen(q, k, v, cu_q, cu_k, causal=True))


def test_flush_to_zero_stays_inside_the_kernels():
    """The CPU kernels run their tasks with MXCSR's flush-to-zero bit set (subnormal results become 0: ALiBi's far
    keys made the backward's dS subnormal, and Intel cores take a microcode assist for each) and restore each
    thread's mode afterwards. Subnormal results inside a call flush; after the call, on the same threads,
    PyTorch's own arithmetic keeps subnormals."""
    tiny = torch.full((1 << 16,), 1e-30)  # large enough that torch's mul runs on every thread
    assert (tiny * 1e-10).ne(0).all()  # 1e-40: subnormal, kept
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=g, requires_grad=True) for _ in range(3))
    slopes = torch.tensor([0.5, 1.0, 2.0, 4.0])  # far keys' P reach exp2's cut at 2^-125
    out = fused_attn.flash(q, k, v, causal=True, alibi_slopes=slopes)
    out.sum().backward()
    out_dec = fused_attn.flash_kvcache(q.detach()[:, :, -1:], k.detach(), v.detach(), 300, alibi_slopes=slopes)
    assert torch.isfinite(q.grad).all() and torch.isfinite(out_dec).all()
    assert (tiny * 1e-10).ne(0).all(), "a thread kept flush-to-zero after a fused_attn call"
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True, alibi_slopes=slopes)
    assert (out.double() - ref).abs().max() < 1e-5
