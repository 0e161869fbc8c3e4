"""The CPU kernels against the float64 reference: every pattern, GQA/MQA, Sq != Sk, awkward sizes,
rows that see no key; out, lse, dq, dk, dv."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import masks
from conftest import check_all, make_qkv

PATTERNS = {
    "dense": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(7, 3)),
    "window_left": dict(window=(16, -1)),
    "causal_window": dict(causal=True, window=(5, -1)),
}


def random_layout(hq, sq, sk, bq, bk, density, seed, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = ((batch,) if batch else ()) + (hq, -(-sq // bq), -(-sk // bk))
    return torch.rand(shape, generator=g) < density


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("b,hq,hk,sq,sk,d", [
    (2, 4, 4, 97, 97, 40),
    (1, 4, 2, 57, 130, 59),    # GQA, Sq < Sk
    (1, 6, 1, 130, 33, 16),    # MQA, Sq > Sk: some rows see nothing under causal
    (1, 2, 2, 1, 257, 111),    # one query row
    (1, 2, 1, 257, 1, 64),     # one key
])
def test_patterns_fp64(pattern, b, hq, hk, sq, sk, d):
    q, k, v = make_qkv(b, hq, hk, sq, sk, d)
    check_all(q, k, v, **PATTERNS[pattern])


@pytest.mark.parametrize("d", [16, 40, 59, 64, 111, 128, 256])
def test_head_dims(d):
    q, k, v = make_qkv(1, 2, 1, 70, 90, d, seed=d)
    check_all(q, k, v, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_long_1025(causal):
    q, k, v = make_qkv(1, 2, 2, 1025, 1025, 32, seed=3)
    check_all(q, k, v, causal=causal, window=(300, -1))


@pytest.mark.parametrize("block", [(16, 16), (32, 16), (7, 13), 64])
@pytest.mark.parametrize("extra", [dict(), dict(causal=True), dict(window=(40, 10))])
def test_block_sparse(block, extra):
    sq, sk, hq, hk = 150, 200, 4, 2
    bq, bk = (block, block) if isinstance(block, int) else block
    lay = random_layout(hq, sq, sk, bq, bk, 0.4, seed=bq * 31 + bk)
    q, k, v = make_qkv(2, hq, hk, sq, sk, 48, seed=5)
    check_all(q, k, v, block_mask=fused_attn.block_mask(lay, block), **extra)


def test_block_sparse_per_batch_and_broadcast_heads():
    sq = sk = 128
    lay_b = random_layout(3, sq, sk, 32, 32, 0.5, seed=11, batch=2)
    q, k, v = make_qkv(2, 3, 3, sq, sk, 32, seed=6)
    check_all(q, k, v, block_mask=fused_attn.block_mask(lay_b, 32))
    lay_h = random_layout(1, sq, sk, 32, 32, 0.5, seed=12)
    check_all(q, k, v, block_mask=fused_attn.block_mask(lay_h, 32), causal=True)


def test_block_sparse_literature_layouts():
    sq = sk = 256
    q, k, v = make_qkv(1, 2, 2, sq, sk, 32, seed=7)
    for lay in (masks.local(8, 8, 2, causal=True, heads=2), masks.bigbird(8, 8, 1, 1, 2, heads=2,
                                                                           generator=torch.Generator().manual_seed(0))):
        check_all(q, k, v, block_mask=fused_attn.block_mask(lay, 32))


def test_rows_that_see_nothing():
    # Causal with Sq > Sk: the first Sq - Sk rows see no key; an all-false layout row too.
    q, k, v = make_qkv(1, 2, 2, 40, 16, 32, seed=8, requires_grad=True)
    out, lse = fused_attn.flash(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :24] == 0) and torch.all(torch.isinf(lse[:, :, :24]))
    assert torch.all(lse[:, :, :24] < 0) and torch.isfinite(lse[:, :, 24:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :24] == 0)
    lay = torch.ones(2, 2, 1, dtype=torch.bool)
    lay[:, 0] = False
    out2, lse2 = fused_attn.flash(q, k, v, block_mask=fused_attn.block_mask(lay, (20, 16)), return_lse=True)
    assert torch.all(out2[:, :, :20] == 0) and torch.all(torch.isinf(lse2[:, :, :20]))
    check_all(q.detach(), k.detach(), v.detach(), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["dense", "causal_window"])
def test_low_precision_cpu(dtype, pattern):
    q, k, v = make_qkv(1, 4, 2, 97, 120, 64, dtype=dtype, seed=9)
    check_all(q, k, v, **PATTERNS[pattern])


def test_strided_inputs_taken_as_they_are():
    # (B, S, H, D) storage passed as .transpose(1, 2), and a head-dim slice with non-unit stride.
    q, k, v = make_qkv(2, 4, 2, 65, 80, 32, seed=10, layout="bshd")
    assert not q.is_contiguous()
    check_all(q, k, v, causal=True)
    big = torch.randn(1, 2, 50, 64, dtype=torch.float64)
    qs = big[..., ::2]  # stride 2 in D: copied by flash (documented)
    torch.testing.assert_close(fused_attn.flash(qs, qs, qs), fused_attn.reference.attention(qs, qs, qs))


def test_scale_argument():
    q, k, v = make_qkv(1, 2, 2, 33, 33, 16, seed=11)
    check_all(q, k, v, scale=0.3)


def test_lse_gradient():
    q, k, v = make_qkv(1, 2, 1, 20, 24, 8, seed=12)

    def grads(fn):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out, lse = fn(qq, kk, vv, causal=True, return_lse=True)
        ((out ** 2).sum() + (lse * torch.linspace(-1, 1, lse.shape[-1], dtype=lse.dtype)).sum()).backward()
        return qq.grad, kk.grad, vv.grad

    for a, r in zip(grads(fused_attn.flash), grads(fused_attn.reference.attention)):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


def test_empty_sizes():
    q, k, v = make_qkv(0, 2, 2, 5, 5, 8)
    assert fused_attn.flash(q, k, v).shape == (0, 2, 5, 8)
    q, k, v = make_qkv(1, 2, 2, 5, 0, 8)
    out, lse = fused_attn.flash(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(torch.isinf(lse))


def test_expanded_inputs():
    # Stride 0 along the sequence (a broadcast row) is read in place, forward and backward.
    g = torch.Generator().manual_seed(13)
    q = torch.randn(1, 2, 1, 16, generator=g, dtype=torch.float64).expand(1, 2, 50, 16)
    k = torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64).expand(1, 2, 40, 16)
    check_all(q, k, v, causal=True)
