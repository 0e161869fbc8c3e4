"""The CUDA kernels against the float64 reference (rule of STYLE.md): every pattern x dtype x head dim x
awkward lengths, GQA/MQA, fp32 path, determinism, rows that see nothing, strides, CUDA graphs, large
tensors. Skipped with a reason where no GPU is present."""
from __future__ import annotations

import os

import pytest
import torch

import fused_attn
from conftest import HAS_CUDA, check_all, make_qkv

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fused_attn")

DEV = "cuda"
LENGTHS = [(1, 1), (97, 97), (1025, 1025), (97, 1025), (1025, 97)]
HEAD_DIMS = [32, 40, 64, 96, 128, 160, 192, 256]
GQA = [(4, 4), (4, 2), (4, 1)]


def pattern_kwargs(name, hq, sq, sk, seed=0):
    if name == "dense":
        return {}
    if name == "causal":
        return dict(causal=True)
    if name == "window":
        return dict(window=(100, 37))
    if name == "causal_window":
        return dict(causal=True, window=(200, -1))
    bq, bk = {"sparse16": (16, 16), "sparse64": (64, 64), "sparse128x64": (128, 64),
              "sparse_causal": (32, 64)}[name]
    g = torch.Generator().manual_seed(seed)
    lay = torch.rand(hq, -(-sq // bq), -(-sk // bk), generator=g) < 0.4
    kw = dict(block_mask=fused_attn.block_mask(lay.to(DEV), (bq, bk)))
    if name == "sparse_causal":
        kw["causal"] = True
    return kw


PATTERNS = ["dense", "causal", "window", "causal_window", "sparse16", "sparse64", "sparse128x64",
            "sparse_causal"]


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"sq{x[0]}_sk{x[1]}")
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_tensor_core(pattern, dtype, d, lengths):
    sq, sk = lengths
    hq, hk = GQA[(d + sq + len(pattern)) % len(GQA)]
    q, k, v = make_qkv(2, hq, hk, sq, sk, d, dtype=dtype, device=DEV, seed=d + sq)
    check_all(q, k, v, **pattern_kwargs(pattern, hq, sq, sk, seed=d))


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"sq{x[0]}_sk{x[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_generic(pattern, dtype, lengths):
    sq, sk = lengths
    q, k, v = make_qkv(1, 4, 2, sq, sk, 72, dtype=dtype, device=DEV, seed=sq)
    check_all(q, k, v, **pattern_kwargs(pattern, 4, sq, sk, seed=sq))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_that_see_nothing(dtype):
    q, k, v = make_qkv(1, 2, 1, 300, 100, 64, dtype=dtype, device=DEV, requires_grad=True)
    out, lse = fused_attn.flash(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :200] == 0) and torch.all(lse[:, :, :200] == float("-inf"))
    out.float().pow(2).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad.float()).all()
    assert torch.all(q.grad[:, :, :200] == 0)
    check_all(q.detach(), k.detach(), v.detach(), causal=True)


def grads(q, k, v, dout, **kw):
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    fused_attn.flash(qq, kk, vv, **kw).backward(dout)
    return qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("kw", [dict(), dict(causal=True, window=(256, -1))])
def test_deterministic_mode_is_bitwise_repeatable(kw, monkeypatch):
    q, k, v = make_qkv(2, 8, 2, 1500, 1500, 128, dtype=torch.bfloat16, device=DEV, seed=3)
    dout = torch.randn_like(q)
    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "1")
    first = grads(q, k, v, dout, **kw)
    for _ in range(3):
        again = grads(q, k, v, dout, **kw)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "0")
    atomic = grads(q, k, v, dout, **kw)
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_strided_layouts():
    q, k, v = make_qkv(2, 8, 4, 333, 333, 64, dtype=torch.bfloat16, device=DEV, layout="bshd")
    assert not q.is_contiguous()
    check_all(q, k, v, causal=True)


def test_cuda_graph_capture():
    q, k, v = make_qkv(2, 4, 4, 512, 512, 64, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    dout = torch.randn_like(q)
    eager = fused_attn.flash(q, k, v, causal=True)
    static_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs requires
        fused_attn.flash(*static_in, causal=True).backward(dout)
    torch.cuda.current_stream().wait_stream(s)
    for t in static_in:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_attn.flash(*static_in, causal=True)
        out.backward(dout)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)
    ref = grads(q, k, v, dout, causal=True)
    for a, b in zip((t.grad for t in static_in), ref):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_unsupported_head_dims_raise():
    for d in (59, 264):
        q, k, v = make_qkv(1, 1, 1, 8, 8, d, dtype=torch.float16, device=DEV)
        with pytest.raises(ValueError, match=rf"q: head dim {d} is not supported by the CUDA torch.float16"):
            fused_attn.flash(q, k, v)


@pytest.mark.skipif(os.environ.get("FUSED_ATTN_SKIP_LARGE") == "1", reason="FUSED_ATTN_SKIP_LARGE=1")
def test_tensor_over_2_pow_31_elements():
    # q and out have 2^31 + 2^24 elements: offsets past int32 must be computed in int64.
    sq, d = (2 ** 31 + 2 ** 24) // 128, 128
    q = torch.randn(1, 1, sq, d, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 64, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    out = fused_attn.flash(q, k, v)
    tail = slice(sq - 4096, sq)
    ref = fused_attn.reference.attention(q[:, :, tail].double(), k.double(), v.double())
    base = fused_attn.reference.attention(q[:, :, tail], k, v)
    from conftest import assert_rule

    assert_rule("out tail", out[:, :, tail], ref, base, torch.bfloat16)
    del out
    q.requires_grad_(True)
    o = fused_attn.flash(q, k, v)
    o.backward(torch.ones_like(o))
    assert torch.isfinite(q.grad[:, :, tail].float()).all() and q.grad[:, :, tail].abs().sum() > 0
