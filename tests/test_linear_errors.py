"""Bad input to linear attention: a ValueError or TypeError naming the argument and what was expected,
before any kernel runs, from fused_attn.linear_attention and reference.linear_attention alike."""
from __future__ import annotations

import re

import pytest
import torch

import fused_attn
from fused_attn import reference

FNS = [fused_attn.linear_attention, reference.linear_attention]


def qkv(b=1, h=2, s=8, dk=4, dv=3, dtype=torch.float32):
    return torch.randn(b, h, s, dk, dtype=dtype), torch.randn(b, h, s, dk, dtype=dtype), torch.randn(b, h, s, dv, dtype=dtype)


def bad(exc, pattern, **over):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update({key: val for key, val in over.items() if key in ("q", "k", "v")})
    kw = {key: val for key, val in over.items() if key not in ("q", "k", "v")}
    for fn in FNS:
        with pytest.raises(exc, match=pattern):
            fn(args["q"], args["k"], args["v"], **kw)


def state(b=1, h=2, dk=4, dv=3, dtype=torch.float32):
    return torch.zeros(b, h, dk, dv, dtype=dtype), torch.zeros(b, h, dk, dtype=dtype)


def test_tensors():
    bad(TypeError, r"^q: expected a torch.Tensor, got list", q=[[1.0]])
    bad(ValueError, re.escape("k: expected 4-D (B, H, Sk, Dk), got shape (2, 8, 4)"), k=torch.randn(2, 8, 4))
    bad(TypeError, r"^v: expected dtype float16, bfloat16, float32 or float64, got torch.int64",
        v=torch.ones(1, 2, 8, 3, dtype=torch.long))
    bad(TypeError, r"^k: expected q's dtype torch.float32, got torch.float64", k=torch.randn(1, 2, 8, 4).double())
    bad(ValueError, r"^v: expected q's device cpu, got meta", v=torch.randn(1, 2, 8, 3, device="meta"))


def test_shapes():
    bad(ValueError, re.escape("k: expected q's batch, heads and head dim (B, H, *, Dk) = (1, 2, *, 4), got shape "
                              "(1, 2, 8, 5)"), k=torch.randn(1, 2, 8, 5))
    bad(ValueError, r"^k: expected q's batch, heads and head dim", k=torch.randn(1, 3, 8, 4))
    bad(ValueError, re.escape("v: expected k's batch, heads and length (1, 2, 8), got shape (1, 2, 9, 3)"),
        v=torch.randn(1, 2, 9, 3))
    bad(ValueError, r"^q: expected a head dim Dk >= 1", q=torch.randn(1, 2, 8, 0), k=torch.randn(1, 2, 8, 0))
    bad(ValueError, r"^v: expected a head dim Dv >= 1", v=torch.randn(1, 2, 8, 0))
    bad(ValueError, r"^k: causal linear attention expects the length of q \(8\), got shape \(1, 2, 9, 4\)",
        k=torch.randn(1, 2, 9, 4), v=torch.randn(1, 2, 9, 3))


def test_flags_and_numbers():
    bad(TypeError, r"^causal: expected a bool, got int", causal=1)
    bad(TypeError, r"^normalize: expected a bool, got str", normalize="yes")
    bad(TypeError, r"^return_state: expected a bool, got NoneType", return_state=None)
    bad(ValueError, r"^feature_map: expected one of \('elu1', 'relu', 'identity'\), got 'softmax'",
        feature_map="softmax")
    bad(TypeError, r"^feature_map: expected one of .* \(a str\), got int", feature_map=3)
    bad(TypeError, r"^scale: expected a float, got str", scale="2")
    bad(ValueError, r"^scale: expected a finite float, got inf", scale=float("inf"))
    bad(ValueError, r"^eps: expected a float >= 0.0, got -1.0", eps=-1.0)
    bad(TypeError, r"^eps: expected a float, got NoneType", eps=None)


def test_initial_state():
    bad(ValueError, r"^initial_state: only causal linear attention continues a sequence", causal=False,
        initial_state=state())
    bad(TypeError, r"^initial_state: expected None or a pair \(S, z\), got Tensor", initial_state=torch.zeros(3))
    bad(TypeError, r"^initial_state: expected None or a pair \(S, z\), got tuple of length 3",
        initial_state=state() + (torch.zeros(1),))
    s, z = state()
    bad(ValueError, re.escape("initial_state[0] (S): expected shape (1, 2, 4, 3) (B, H, Dk, Dv), got (1, 2, 3, 4)"),
        initial_state=(s.transpose(2, 3), z))
    bad(ValueError, re.escape("initial_state[1] (z): expected shape (1, 2, 4) (B, H, Dk), got (1, 2, 3)"),
        initial_state=(s, torch.zeros(1, 2, 3)))
    bad(TypeError, r"^initial_state\[1\] \(z\): expected a floating dtype", initial_state=(s, z.long()))
    bad(TypeError, r"^initial_state\[0\] \(S\): expected a torch.Tensor, got NoneType", initial_state=(None, z))
    bad(ValueError, r"^initial_state\[0\] \(S\): expected q's device cpu, got meta", initial_state=(s.to("meta"), z))


def test_errors_come_before_any_kernel(monkeypatch):
    def sentinel(*a, **k):
        raise AssertionError("kernel ran")

    monkeypatch.setattr(torch.ops.fused_attn, "linear_fwd", sentinel)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="eps"):
        fused_attn.linear_attention(q, k, v, eps=-1.0)


def test_direct_op_calls_are_checked_too():
    q, k, v = qkv()
    op = torch.ops.fused_attn.linear_fwd
    with pytest.raises(ValueError, match=r"k: expected 4-D"):
        op(q, k[0], v, None, None, True, "elu1", True, 1.0, 1e-6)
    with pytest.raises(ValueError, match=r"feature_map: expected 'elu1', 'relu' or 'identity', got 'tanh'"):
        op(q, k, v, None, None, True, "tanh", True, 1.0, 1e-6)
    with pytest.raises(ValueError, match=r"initial state: expected both tensors \(S, z\) or neither"):
        op(q, k, v, torch.zeros(1, 2, 4, 3), None, True, "elu1", True, 1.0, 1e-6)
    with pytest.raises(TypeError, match=r"initial state S: expected dtype Float, got Double"):
        op(q, k, v, torch.zeros(1, 2, 4, 3).double(), torch.zeros(1, 2, 4).double(), True, "elu1", True, 1.0, 1e-6)
    with pytest.raises(ValueError, match=r"initial_state: only causal"):
        op(q, k, v, *state(), False, "elu1", True, 1.0, 1e-6)
    with pytest.raises(ValueError, match=r"eps: expected a float >= 0"):
        op(q, k, v, None, None, True, "elu1", True, 1.0, -1.0)


def test_cuda_tensors_without_a_cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to pass a CUDA tensor")
    if torch._C._dispatch_has_kernel_for_dispatch_key("fused_attn::linear_fwd", "CUDA"):
        pytest.skip("this build has the CUDA kernels (tests/test_linear_cuda.py)")
    q, k, v = (t.cuda() for t in qkv())
    with pytest.raises(ValueError, match=r"^q: linear_attention has no kernels for device cuda"):
        fused_attn.linear_attention(q, k, v)
