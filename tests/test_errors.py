"""Bad input: a ValueError or TypeError naming the argument and what was expected, before any kernel runs."""
from __future__ import annotations

import re

import pytest
import torch

import fused_attn
from fused_attn import reference


def qkv(b=1, hq=2, hk=2, sq=8, sk=8, d=4, dtype=torch.float32):
    return (torch.randn(b, hq, sq, d, dtype=dtype), torch.randn(b, hk, sk, d, dtype=dtype),
            torch.randn(b, hk, sk, d, dtype=dtype))


def bad(exc, pattern, **over):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    kw = {key: val for key, val in over.items() if key not in ("q", "k", "v")}
    args.update({key: val for key, val in over.items() if key in ("q", "k", "v")})
    for fn in (fused_attn.flash, reference.attention):
        with pytest.raises(exc, match=pattern):
            fn(args["q"], args["k"], args["v"], **kw)


def test_non_tensor():
    bad(TypeError, r"^q: expected a torch.Tensor, got list", q=[[1.0]])
    bad(TypeError, r"^v: expected a torch.Tensor, got NoneType", v=None)


def test_wrong_rank():
    bad(ValueError, re.escape("k: expected 4-D (B, H, S, D), got shape (2, 8, 4)"), k=torch.randn(2, 8, 4))


def test_integer_tensors():
    bad(TypeError, r"q: expected dtype float16, bfloat16, float32 or float64, got torch.int64",
        q=torch.ones(1, 2, 8, 4, dtype=torch.long))


def test_mismatched_dtypes():
    bad(TypeError, r"k: expected q's dtype torch.float32, got torch.float64",
        k=torch.randn(1, 2, 8, 4, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type (a GPU) to mismatch")
def test_mismatched_devices():
    bad(ValueError, r"k: expected q's device cpu, got cuda", k=torch.randn(1, 2, 8, 4, device="cuda"))


def test_mismatched_devices_meta():
    # The meta device stands in for a second device on machines without a GPU.
    bad(ValueError, r"v: expected q's device cpu, got meta", v=torch.randn(1, 2, 8, 4, device="meta"))


def test_head_dim_mismatch():
    bad(ValueError, r"v: expected head dim 4 \(q.shape\[3\]\)", v=torch.randn(1, 2, 8, 5))


def test_heads_not_divisible():
    bad(ValueError, r"k: expected a head count that divides q's 2 \(GQA/MQA\), got 3 heads",
        k=torch.randn(1, 3, 8, 4), v=torch.randn(1, 3, 8, 4))


def test_kv_length_mismatch():
    bad(ValueError, r"v: expected k's heads and length \(2, 8\)", v=torch.randn(1, 2, 9, 4))


def test_batch_mismatch():
    bad(ValueError, r"k: expected batch 1 \(q.shape\[0\]\)", k=torch.randn(2, 2, 8, 4), v=torch.randn(2, 2, 8, 4))


@pytest.mark.parametrize("window,exc,pat", [
    ((-2, 0), ValueError, r"window: expected entries >= -1 \(-1 is unbounded\), got left = -2"),
    ((0, -5), ValueError, r"window: expected entries >= -1 \(-1 is unbounded\), got right = -5"),
    ((1.5, 0), TypeError, r"window: expected ints for \(left, right\), got left = 1.5"),
    ((True, 0), TypeError, r"window: expected ints"),
    ((3,), ValueError, r"window: expected None or a pair \(left, right\)"),
    (5, ValueError, r"window: expected None or a pair"),
])
def test_window(window, exc, pat):
    bad(exc, pat, window=window)


def test_causal_scale_return_lse_types():
    bad(TypeError, r"causal: expected a bool, got str", causal="yes")
    bad(TypeError, r"scale: expected a float or None, got str", scale="0.5")
    bad(ValueError, r"scale: expected a finite float, got nan", scale=float("nan"))
    bad(TypeError, r"return_lse: expected a bool, got int", return_lse=1)


def test_block_mask_arguments():
    with pytest.raises(TypeError, match=r"layout: expected dtype torch.bool, got torch.float32"):
        fused_attn.block_mask(torch.ones(2, 2, 2), 4)
    with pytest.raises(TypeError, match=r"layout: expected a torch.Tensor"):
        fused_attn.block_mask([[True]], 4)
    with pytest.raises(ValueError, match=r"layout: expected shape \(H, nqb, nkb\) or \(B, H, nqb, nkb\)"):
        fused_attn.block_mask(torch.ones(2, 2, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match=r"block_size: expected positive sizes, got bq = 0"):
        fused_attn.block_mask(torch.ones(2, 2, 2, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match=r"block_size: expected positive sizes, got bk = -4"):
        fused_attn.block_mask(torch.ones(2, 2, 2, dtype=torch.bool), (4, -4))
    with pytest.raises(TypeError, match=r"block_size: expected ints, got bq = 2.0"):
        fused_attn.block_mask(torch.ones(2, 2, 2, dtype=torch.bool), 2.0)
    bad(TypeError, r"block_mask: expected a mask from fused_attn.block_mask", block_mask=torch.ones(2, 2, 2))


def test_block_mask_against_shapes():
    good = torch.ones(2, 2, 2, dtype=torch.bool)
    bad(ValueError, r"block_mask: layout has \(nqb, nkb\) = \(2, 2\) but Sq = 8, Sk = 8 with block size \(2, 2\)",
        block_mask=fused_attn.block_mask(good, 2))
    bad(ValueError, r"block_mask: layout heads 3 must be 1 or q's heads 2",
        block_mask=fused_attn.block_mask(torch.ones(3, 2, 2, dtype=torch.bool), 4))
    bad(ValueError, r"block_mask: layout batch 2 must be 1 or q's batch 1",
        block_mask=fused_attn.block_mask(torch.ones(2, 2, 2, 2, dtype=torch.bool), 4))


def test_errors_come_before_any_kernel(monkeypatch):
    # If validation happened after the op ran, this would raise from the sentinel instead.
    def sentinel(*a, **k):
        raise AssertionError("kernel ran")

    monkeypatch.setattr(torch.ops.fused_attn, "fwd", sentinel)
    with pytest.raises(ValueError, match="window"):
        q, k, v = qkv()
        fused_attn.flash(q, k, v, window=(-3, 0))


def test_direct_op_call_is_checked_too():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k: expected 4-D"):
        torch.ops.fused_attn.fwd(q, k[0], v, 0.5, -1, -1, [], [])
    with pytest.raises(ValueError, match=r"window: expected entries >= -1"):
        torch.ops.fused_attn.fwd(q, k, v, 0.5, -4, -1, [], [])


def test_softcap_and_alibi_errors():
    bad(TypeError, r"^softcap: expected a float >= 0 \(0 is off\), got str", softcap="1")
    bad(ValueError, r"^softcap: expected a finite float >= 0 \(0 is off\), got -0.5", softcap=-0.5)
    bad(TypeError, r"^alibi_slopes: expected dtype torch.float32, got torch.float64",
        alibi_slopes=torch.ones(2, dtype=torch.float64))
    bad(ValueError, re.escape("alibi_slopes: expected shape (Hq,) = (2,) or (B, Hq) = (1, 2), got (3)"),
        alibi_slopes=torch.ones(3))


def varlen_args(**over):
    a = dict(q=torch.randn(10, 4, 8), k=torch.randn(12, 2, 8), v=torch.randn(12, 2, 8),
             cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
             cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32))
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,pattern", [
    (dict(q=torch.randn(2, 10, 4, 8)), ValueError, r"^q: expected 3-D \(total, H, D\), got shape \(2, 10, 4, 8\)"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 10])), TypeError, r"^cu_seqlens_q: expected dtype torch.int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32)), ValueError, r"^cu_seqlens_k: expected shape \(3,\)"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32)), ValueError,
     r"^cu_seqlens_q: expected to start at 0 and end at the packed total 10, got 0 \.\.\. 4"),
    (dict(cu_seqlens_k=torch.tensor([0, 13, 12], dtype=torch.int32)), ValueError,
     r"^cu_seqlens_k: expected non-decreasing entries, got 13 then 12 at index 1"),
    (dict(max_seqlen_q=3), ValueError, r"^max_seqlen_q: sequence 1 has 6 rows, more than max_seqlen_q = 3"),
    (dict(max_seqlen_k=-1), ValueError, r"^max_seqlen_k: expected None or an int >= 0, got -1"),
    (dict(k=torch.randn(12, 3, 8), v=torch.randn(12, 3, 8)), ValueError, r"^k: expected a head count that divides"),
    (dict(block_mask=object()), TypeError, r"unexpected keyword argument 'block_mask'"),
])
def test_varlen_errors(over, exc, pattern):
    for fn in (fused_attn.flash_varlen, reference.flash_varlen):
        a = varlen_args(**over)
        with pytest.raises(exc, match=pattern):
            fn(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens_q"), a.pop("cu_seqlens_k"), **a)
