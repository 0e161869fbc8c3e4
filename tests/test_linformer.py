"""examples/linformer.py: Linformer-style attention (flash over keys and values projected along the
sequence) against the float64 reference composition, its gradients, its errors, and the module."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fused_attn import reference
from conftest import make_qkv

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "linformer.py"


@pytest.fixture(scope="module")
def lf():
    spec = importlib.util.spec_from_file_location("linformer", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def projections(k_proj, s, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(k_proj, s, generator=g, dtype=torch.float64) / s ** 0.5).to(dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("s,k_proj,d", [(97, 16, 40), (300, 64, 16), (8, 8, 3)])
def test_matches_reference(lf, dtype, s, k_proj, d):
    q, k, v = make_qkv(2, 3, 3, s, s, d, dtype=dtype)
    e, f = projections(k_proj, s, dtype)
    got = lf.linformer_attention(q, k, v, e, f)
    q64, k64, v64, e64, f64 = (t.double() for t in (q, k, v, e, f))
    ref = reference.attention(q64, e64 @ k64, f64 @ v64)
    base = reference.attention(q, e @ k, f @ v)
    tol = 1e-12 if dtype == torch.float64 else 2 * float((base.double() - ref).abs().max()) + 2e-6
    assert float((got.double() - ref).abs().max()) <= tol


def test_identity_projection_is_full_attention(lf):
    q, k, v = make_qkv(1, 2, 2, 50, 50, 8)
    eye = torch.eye(50, dtype=torch.float64)
    torch.testing.assert_close(lf.linformer_attention(q, k, v, eye, eye), reference.attention(q, k, v))


def test_gradcheck(lf):
    q, k, v = make_qkv(1, 1, 1, 8, 8, 3, requires_grad=True)
    e, f = (p.requires_grad_() for p in projections(3, 8, torch.float64))
    assert torch.autograd.gradcheck(lf.linformer_attention, (q, k, v, e, f), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_errors(lf):
    q, k, v = make_qkv(1, 2, 2, 10, 10, 4)
    e, f = projections(4, 10, torch.float64)
    with pytest.raises(ValueError, match=r"^e: expected a \(k_proj, Sk\) projection with Sk = 10 \(k.shape\[2\]\), got shape \(4, 9\)"):
        lf.linformer_attention(q, k, v, e[:, :9], f)
    with pytest.raises(TypeError, match=r"^f: expected k's dtype and device"):
        lf.linformer_attention(q, k, v, e, f.float())
    with pytest.raises(TypeError, match=r"^f: expected a torch.Tensor, got NoneType"):
        lf.linformer_attention(q, k, v, e, None)


def test_module_trains_a_step(lf):
    torch.manual_seed(0)
    m = lf.LinformerSelfAttention(32, 4, seq_len=40, k_proj=8)
    x = torch.randn(2, 40, 32)
    y = m(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert m.e.grad is not None and m.e.grad.abs().sum() > 0 and m.f.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"^x: expected 40 tokens"):
        m(torch.randn(1, 39, 32))
