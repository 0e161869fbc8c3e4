"""reference.linear_attention (the float64 ground truth of the linear-attention kernels) against an
independent token-by-token recurrence, and its state semantics."""
from __future__ import annotations

import pytest
import torch

from fused_attn import reference
from conftest import make_qkv


def recurrence(q, k, v, *, causal, feature_map, normalize, scale, eps, state=None):
    """Token by token, the RNN form of Katharopoulos et al.: S += phi(k_j) v_j^T, z += phi(k_j)."""
    a = reference.feature(q * scale, feature_map)
    b = reference.feature(k, feature_map)
    bsz, h, sq, dk = q.shape
    dv = v.shape[3]
    out = torch.zeros(bsz, h, sq, dv, dtype=q.dtype)
    s_fin = torch.zeros(bsz, h, dk, dv, dtype=q.dtype)
    z_fin = torch.zeros(bsz, h, dk, dtype=q.dtype)
    for bi in range(bsz):
        for hi in range(h):
            s = state[0][bi, hi].clone() if state else torch.zeros(dk, dv, dtype=q.dtype)
            z = state[1][bi, hi].clone() if state else torch.zeros(dk, dtype=q.dtype)
            if not causal:
                for j in range(k.shape[2]):
                    s += torch.outer(b[bi, hi, j], v[bi, hi, j])
                    z += b[bi, hi, j]
            for i in range(sq):
                if causal:
                    s += torch.outer(b[bi, hi, i], v[bi, hi, i])
                    z += b[bi, hi, i]
                num = a[bi, hi, i] @ s
                out[bi, hi, i] = num / (a[bi, hi, i] @ z + eps) if normalize else num
            s_fin[bi, hi], z_fin[bi, hi] = s, z
    return out, (s_fin, z_fin)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity"])
def test_reference_matches_recurrence(causal, normalize, feature_map):
    q, k, v = make_qkv(2, 2, 2, 13, 13, 5, seed=3)
    v = torch.randn(2, 2, 13, 7, dtype=torch.float64)  # Dv != Dk
    kw = dict(causal=causal, feature_map=feature_map, normalize=normalize, scale=0.7, eps=1e-3)
    out, (s, z) = reference.linear_attention(q, k, v, return_state=True, **kw)
    r_out, (rs, rz) = recurrence(q, k, v, **kw)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(s, rs)
    torch.testing.assert_close(z, rz)


def test_reference_noncausal_cross_lengths():
    q, _, _ = make_qkv(1, 2, 2, 4, 4, 6, seed=5)
    _, k, v = make_qkv(1, 2, 2, 9, 9, 6, seed=6)
    kw = dict(causal=False, feature_map="elu1", normalize=True, scale=1.0, eps=1e-6)
    torch.testing.assert_close(reference.linear_attention(q, k, v, **kw), recurrence(q, k, v, **kw)[0])


def test_reference_initial_state_continues_the_sequence():
    q, k, v = make_qkv(1, 3, 3, 20, 20, 4, seed=7)
    whole, st = reference.linear_attention(q, k, v, return_state=True)
    a, st1 = reference.linear_attention(q[:, :, :11], k[:, :, :11], v[:, :, :11], return_state=True)
    b, st2 = reference.linear_attention(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], initial_state=st1,
                                        return_state=True)
    torch.testing.assert_close(torch.cat([a, b], 2), whole)
    torch.testing.assert_close(st2[0], st[0])
    torch.testing.assert_close(st2[1], st[1])
    r_out, _ = recurrence(q[:, :, 11:], k[:, :, 11:], v[:, :, 11:], causal=True, feature_map="elu1",
                          normalize=True, scale=1.0, eps=1e-6, state=st1)
    torch.testing.assert_close(b, r_out)


def test_reference_state_dtype():
    q, k, v = make_qkv(1, 1, 1, 5, 5, 4, dtype=torch.float16)
    _, (s, z) = reference.linear_attention(q, k, v, return_state=True)
    assert s.dtype == torch.float32 and z.dtype == torch.float32
    q, k, v = make_qkv(1, 1, 1, 5, 5, 4)
    _, (s, z) = reference.linear_attention(q, k, v, return_state=True)
    assert s.dtype == torch.float64 and z.dtype == torch.float64
