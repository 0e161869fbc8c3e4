"""fused_attn.features: random projections and FAVOR+ positive random features. The approximation test
measures the error against softmax attention as the feature count grows (averaged over seeds) and checks
its trend, and checks that the same trend test rejects a subtly wrong feature map."""
from __future__ import annotations

import math

import pytest
import torch

import fused_attn
from fused_attn import features, reference


def test_random_projection_shapes_and_generator():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    w1 = features.random_projection(16, 40, generator=g1)
    w2 = features.random_projection(16, 40, generator=g2)
    assert w1.shape == (40, 16) and w1.dtype == torch.float32
    assert torch.equal(w1, w2)
    assert features.random_projection(5, 3, orthogonal=False, dtype=torch.float64).dtype == torch.float64


def test_random_projection_rows_orthogonal_within_blocks():
    w = features.random_projection(8, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for blk in (w[:8], w[8:16], w[16:]):
        u = blk / blk.norm(dim=1, keepdim=True)
        torch.testing.assert_close(u @ u.t(), torch.eye(blk.shape[0], dtype=torch.float64))
    # iid rows are not orthogonal.
    wi = features.random_projection(8, 8, generator=torch.Generator().manual_seed(0), orthogonal=False,
                                    dtype=torch.float64)
    u = wi / wi.norm(dim=1, keepdim=True)
    assert (u @ u.t() - torch.eye(8, dtype=torch.float64)).abs().max() > 0.05


def test_random_projection_rows_are_marginally_gaussian():
    # Row lengths follow the chi distribution of a Gaussian d-vector: E|w|^2 = d.
    w = features.random_projection(16, 4096, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mean_sq = float((w * w).sum(1).mean())
    assert abs(mean_sq - 16) < 0.5, mean_sq


def test_favor_plus_values():
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    w = torch.randn(10, 6, dtype=torch.float64)
    ref = torch.exp(x @ w.t() - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(10)
    torch.testing.assert_close(features.favor_plus(x, w), ref)
    assert (features.favor_plus(x, w) > 0).all()
    assert features.favor_plus(x.half(), w.half()).dtype == torch.float16


def approximation_errors(feature_fn, ms, seeds=6, s=64, d=16, fn=None):
    """Mean abs error of FAVOR+-style linear attention against softmax attention, per feature count m,
    averaged over seeds (fresh inputs and projection per seed)."""
    fn = fn or reference.linear_attention
    errs = []
    for m in ms:
        total = 0.0
        for seed in range(seeds):
            g = torch.Generator().manual_seed(1000 * seed + m)
            q, k, v = (torch.randn(1, 2, s, d, generator=g, dtype=torch.float64) for _ in range(3))
            q, k = 0.5 * q, 0.5 * k  # |q k^T| / sqrt(d) of order 1/4: the regime FAVOR+ is meant for
            exact = reference.attention(q, k, v, scale=d ** -0.5)
            w = features.random_projection(d, m, generator=g, dtype=torch.float64)
            c = d ** -0.25
            approx = fn(feature_fn(q * c, w), feature_fn(k * c, w), v, causal=False, feature_map="identity",
                        eps=0.0)
            total += float((approx - exact).abs().mean())
        errs.append(total / seeds)
    return errs


def shrinks_with_m(errs) -> bool:
    # 64x the features cut a 1/sqrt(m) error 8x; measured here (6 seeds) the fall is ~5x, against ~2.3x for
    # the biased map below, whose error levels off. Ask for a monotone fall and at least 3.5x overall
    # (a log-log slope steeper than -0.3).
    return all(b < a for a, b in zip(errs, errs[1:])) and errs[-1] < errs[0] / 3.5


MS = (16, 64, 256, 1024)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_favor_plus_error_falls_as_features_grow(impl):
    fn = reference.linear_attention if impl == "reference" else fused_attn.linear_attention
    errs = approximation_errors(features.favor_plus, MS, fn=fn)
    assert shrinks_with_m(errs), f"errors per m={MS}: {errs}"


def test_trend_check_rejects_a_biased_feature_map():
    # Dropping the -|x|^2/2 term biases the estimate (per key, so normalisation cannot cancel it): the
    # error must then stop falling, and the trend check must say so.
    def biased(x, w):
        return torch.exp(x @ w.t()) / math.sqrt(w.shape[0])

    errs = approximation_errors(biased, MS)
    assert not shrinks_with_m(errs), f"a biased map passed the trend check: {errs}"


@pytest.mark.parametrize("call,exc,pat", [
    (lambda: features.favor_plus([1.0], torch.ones(2, 1)), TypeError, r"^x: expected a torch.Tensor, got list"),
    (lambda: features.favor_plus(torch.ones(2, 3), None), TypeError, r"^projection: expected a torch.Tensor"),
    (lambda: features.favor_plus(torch.ones(2, 3, dtype=torch.long), torch.ones(4, 3)), TypeError,
     r"^x: expected a floating dtype"),
    (lambda: features.favor_plus(torch.ones(2, 3), torch.ones(4, 5)), ValueError,
     r"^projection: expected D = 3 columns \(x.shape\[-1\]\), got shape \(4, 5\)"),
    (lambda: features.favor_plus(torch.ones(2, 3), torch.ones(4)), ValueError,
     r"^projection: expected 2-D \(M, D\)"),
    (lambda: features.favor_plus(torch.ones(2, 3), torch.ones(4, 3, dtype=torch.float64)), TypeError,
     r"^projection: expected x's dtype torch.float32, got torch.float64"),
    (lambda: features.random_projection(0, 4), ValueError, r"^d: expected an int >= 1, got 0"),
    (lambda: features.random_projection(4, 2.5), TypeError, r"^m: expected an int, got float"),
    (lambda: features.random_projection(4, 4, generator=3), TypeError, r"^generator: expected a torch.Generator"),
    (lambda: features.random_projection(4, 4, orthogonal=1), TypeError, r"^orthogonal: expected a bool"),
    (lambda: features.random_projection(4, 4, dtype=torch.int32), TypeError, r"^dtype: expected a floating"),
])
def test_feature_errors(call, exc, pat):
    with pytest.raises(exc, match=pat):
        call()
