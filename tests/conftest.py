"""Shared helpers: input makers, the accuracy rule of STYLE.md, and the CUDA marker."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference

HAS_CUDA = torch.cuda.is_available() and "cuda" in fused_attn.build_info()["backends"]
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fused_attn")

# Absolute floor added to the 2x-of-PyTorch bound, per dtype (values are O(1) by construction).
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def make_qkv(b, hq, hk, sq, sk, d, *, dtype=torch.float64, device="cpu", seed=0, layout="bhsd",
             requires_grad=False):
    """Random q, k, v; layout 'bshd' returns (B, S, H, D) storage viewed as (B, H, S, D)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def one(h, s):
        shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        if layout == "bshd":
            t = t.transpose(1, 2)
        return t.requires_grad_(requires_grad)

    return one(hq, sq), one(hk, sk), one(hk, sk)


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference, treating matching infinities (lse of empty rows) as equal; NaN is an error."""
    got, ref = got.double(), ref.double()
    assert not torch.isnan(got).any(), "NaN in the result"
    same_inf = torch.isinf(ref) & (got == ref)
    diff = (got - ref).abs().masked_fill(same_inf, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, base: torch.Tensor, dtype) -> None:
    """STYLE.md: error against the float64 reference at most twice PyTorch's error in the same precision,
    plus a small absolute floor."""
    err, base_err = max_err(got, ref64), max_err(base, ref64)
    bound = 2.0 * base_err + FLOOR[dtype]
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (PyTorch's error {base_err:.3e})"


def run_both(q, k, v, dout=None, **kw):
    """(fused out, lse, grads) and the same from the reference on float64 copies and on the inputs' dtype."""

    def one(fn, dtype):
        qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
        out, lse = fn(qq, kk, vv, return_lse=True, **kw)
        do = torch.ones_like(out) if dout is None else dout.to(dtype)
        out.backward(do)
        return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad

    return one(fused_attn.flash, q.dtype), one(reference.attention, torch.float64), one(reference.attention, q.dtype)


def check_all(q, k, v, seed=1, **kw):
    """Compares out, lse, dq, dk, dv of flash with the float64 reference under the STYLE.md rule."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dout = torch.randn(q.shape[0], q.shape[1], q.shape[2], q.shape[3], generator=g, dtype=torch.float64)
    mine, ref, base = run_both(q, k, v, dout.to(q.device), **kw)
    for name, a, r, bse in zip(("out", "lse", "dq", "dk", "dv"), mine, ref, base):
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert_rule(name, a, r, bse, q.dtype)
