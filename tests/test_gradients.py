"""torch.autograd.gradcheck in float64 on fused_attn.flash itself (the C++ kernels), for each pattern."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from conftest import cuda, make_qkv

CASES = {
    "dense": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(3, 2)),
    "causal_window": dict(causal=True, window=(4, -1)),
    "block_sparse": "sparse",
    "block_sparse_causal": "sparse_causal",
}


def kwargs_for(case, sq, sk, hq, device):
    kw = CASES[case]
    if isinstance(kw, dict):
        return kw
    g = torch.Generator().manual_seed(4)
    lay = (torch.rand(hq, -(-sq // 4), -(-sk // 4), generator=g) < 0.6).to(device)
    out = dict(block_mask=fused_attn.block_mask(lay, 4))
    if kw == "sparse_causal":
        out["causal"] = True
    return out


def run_gradcheck(case, device):
    b, hq, hk, sq, sk, d = 1, 2, 1, 9, 11, 6
    q, k, v = make_qkv(b, hq, hk, sq, sk, d, device=device, seed=2, requires_grad=True)
    kw = kwargs_for(case, sq, sk, hq, device)

    def fn(q, k, v):
        out, lse = fused_attn.flash(q, k, v, return_lse=True, **kw)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_cpu(case):
    run_gradcheck(case, "cpu")


@cuda
@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_cuda(case):
    run_gradcheck(case, "cuda")


def test_gradcheck_detects_a_wrong_gradient():
    # The check above can fail: a function whose backward is off by a factor must be rejected.
    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return fused_attn.flash(q, k, v)

        @staticmethod
        def backward(ctx, g):
            q, k, v = ctx.saved_tensors
            with torch.enable_grad():
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                out = fused_attn.flash(qq, kk, vv)
                gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), g)
            return 1.01 * gq, gk, gv

    q, k, v = make_qkv(1, 1, 1, 5, 5, 4, requires_grad=True)
    assert not torch.autograd.gradcheck(Wrong.apply, (q, k, v), raise_exception=False)
