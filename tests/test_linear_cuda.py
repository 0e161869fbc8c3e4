"""fused_attn.linear_attention on CUDA (csrc/cuda/linear.cu) against the float64 reference under the STYLE.md
rule: out, the returned state and every gradient; the tensor-core kernels (fp16 / bf16, Dk and Dv multiples of 8
up to 128, one block per (batch, head) or the two-level scan over segments) and the fp32 / fp64 kernels (every
other shape); state continuation; fp64 gradcheck on the CUDA kernels; CPU and CUDA agree. Skipped with a reason
where no GPU is present."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference
from conftest import HAS_CUDA, assert_rule
from test_linear import NAMES, inputs

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fused_attn")

DEV = "cuda"


def run(fn, q, k, v, dtype, dout, dstate, state=None, **kw):
    leaves = [t.detach().to(DEV, dtype).requires_grad_(True) for t in (q, k, v)]
    st = None
    if state is not None:
        sd = fused_attn._linear_args.state_dtype(dtype)
        st = [t.detach().to(DEV, sd).requires_grad_(True) for t in state]
    out, (s, z) = fn(*leaves, initial_state=st, return_state=True, **kw)
    loss = (out.double() * dout).sum() + (s.double() * dstate[0]).sum() + (z.double() * dstate[1]).sum()
    grads = torch.autograd.grad(loss, leaves + (st or []))
    return [out.detach(), s.detach(), z.detach()] + list(grads)


def check(q, k, v, *, state=None, seed=1, **kw):
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed)
    b, h, sq, dk = q.shape
    dv = v.shape[3]
    dout = torch.randn(b, h, sq, dv, generator=g, dtype=torch.float64).to(DEV)
    dstate = (torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64).to(DEV),
              torch.randn(b, h, dk, generator=g, dtype=torch.float64).to(DEV))
    mine = run(fused_attn.linear_attention, q, k, v, dtype, dout, dstate, state, **kw)
    ref = run(reference.linear_attention, q, k, v, torch.float64, dout, dstate, state, **kw)
    base = run(reference.linear_attention, q, k, v, dtype, dout, dstate, state, **kw)
    for name, a, r, bse in zip(NAMES, mine, ref, base):
        assert a.device.type == "cuda", f"{name}: on {a.device}"
        assert a.shape == r.shape and a.dtype == bse.dtype, f"{name}: {a.shape} {a.dtype}"
        assert_rule(name, a.cpu(), r.cpu(), bse.cpu(), dtype)


# Tensor cores: both tile widths (HD 64 and 128), Dk != Dv, lengths around the 64-row chunk; segments as the
# kernels pick them (B2 H3: many per sequence on a big GPU), one block per sequence, and a forced 3.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("dk,dv", [(64, 64), (32, 64), (128, 96), (64, 128), (8, 8)])
@pytest.mark.parametrize("s", [1, 97, 1025])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [None, "1", "3"], ids=["seg_auto", "seg1", "seg3"])
def test_tensor_core(dtype, dk, dv, s, causal, segments, monkeypatch):
    if segments is not None:
        monkeypatch.setenv("FUSED_ATTN_LINEAR_SEGMENTS", segments)
    q, k, v = inputs(2, 3, s, dk, dv, dtype=dtype, feature_map="elu1", normalize=True, seed=dk + s)
    check(q, k, v, causal=causal, scale=0.5)


@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_maps_and_modes(feature_map, causal, normalize, dtype):
    q, k, v = inputs(2, 2, 300, 64, 32, dtype=dtype, feature_map=feature_map, normalize=normalize)
    check(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, scale=0.8)


# Shapes the tensor cores do not take (odd, > 128): the fp32 kernels, fp16 / bf16 upcast around them.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32", "fp64", "fp16"])
@pytest.mark.parametrize("dk,dv", [(1, 1), (59, 40), (13, 7), (160, 256)])
def test_generic_dims(dtype, dk, dv):
    q, k, v = inputs(1, 2, 97, dk, dv, dtype=dtype, feature_map="elu1", normalize=True, seed=dk)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("sq,sk", [(5, 200), (200, 3), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_noncausal_cross_lengths(sq, sk, dtype):
    q, _, _ = inputs(1, 2, sq, 64, 64, dtype=dtype, feature_map="elu1", normalize=True)
    _, k, v = inputs(1, 2, sk, 64, 64, dtype=dtype, feature_map="elu1", normalize=True, seed=3)
    check(q, k, v, causal=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("segments", ["1", "2"], ids=["seg1", "seg2"])
def test_initial_state(dtype, normalize, segments, monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_LINEAR_SEGMENTS", segments)
    q, k, v = inputs(2, 2, 150, 64, 32, dtype=dtype, feature_map="elu1", normalize=normalize)
    g = torch.Generator().manual_seed(9)
    state = (torch.rand(2, 2, 64, 32, generator=g, dtype=torch.float64) * 20,
             torch.rand(2, 2, 64, generator=g, dtype=torch.float64) * 20 + 5)
    check(q, k, v, state=state, causal=True, normalize=normalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs(dtype):
    q, k, v = inputs(2, 3, 100, 64, 64, dtype=dtype, feature_map="relu", normalize=True, layout="bshd")
    assert not q.is_contiguous()
    check(q, k, v, causal=True, feature_map="relu")


def test_pieces_with_state_equal_whole():
    q, k, v = (t.to(DEV) for t in inputs(1, 2, 300, 64, 64, dtype=torch.bfloat16, feature_map="elu1", normalize=True))
    whole, (s, z) = fused_attn.linear_attention(q, k, v, return_state=True)
    state, outs = None, []
    for a, b in [(0, 70), (70, 71), (71, 300)]:
        o, state = fused_attn.linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], initial_state=state,
                                               return_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 2).float(), whole.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state[0], s, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(state[1], z, atol=1e-3, rtol=1e-4)


def test_cpu_and_cuda_agree_fp64():
    q, k, v = inputs(2, 2, 130, 24, 40, dtype=torch.float64, feature_map="elu1", normalize=True)
    a, (sa, za) = fused_attn.linear_attention(q, k, v, return_state=True)
    b, (sb, zb) = fused_attn.linear_attention(q.to(DEV), k.to(DEV), v.to(DEV), return_state=True)
    torch.testing.assert_close(b.cpu(), a, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(sb.cpu(), sa, atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(zb.cpu(), za, atol=1e-10, rtol=1e-12)


@pytest.mark.parametrize("kw", [dict(causal=True, feature_map="elu1", normalize=True),
                                dict(causal=True, feature_map="relu", normalize=False),
                                dict(causal=False, feature_map="elu1", normalize=True),
                                dict(causal=False, feature_map="identity", normalize=False)],
                         ids=lambda kw: "-".join(str(x) for x in kw.values()))
def test_gradcheck(kw):
    q, k, v = (t.to(DEV) for t in inputs(1, 1, 70, 3, 2, dtype=torch.float64, feature_map=kw["feature_map"],
                                         normalize=kw["normalize"]))
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    if kw["causal"]:
        g = torch.Generator().manual_seed(5)
        leaves += [torch.rand(1, 1, 3, 2, generator=g, dtype=torch.float64).to(DEV).requires_grad_(),
                   (torch.rand(1, 1, 3, generator=g, dtype=torch.float64) + 1).to(DEV).requires_grad_()]

    def fn(q, k, v, *state):
        out, (s, z) = fused_attn.linear_attention(q, k, v, scale=0.9, eps=1e-3, initial_state=state or None,
                                                  return_state=True, **kw)
        return out, s, z

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_too_large_head_dim():
    q = torch.randn(1, 1, 4, 1025, device=DEV)
    with pytest.raises(ValueError, match=r"q, v: the CUDA linear-attention kernels take head dims <= 1024"):
        fused_attn.linear_attention(q, q, q)
