"""The reference against torch's scaled_dot_product_attention wherever SDPA can express the pattern."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import reference
from conftest import make_qkv


def sdpa(q, k, v, mask=None, scale=None):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("sq,sk", [(64, 64), (33, 70), (1, 9)])
def test_dense_and_gqa(sq, sk):
    q, k, v = make_qkv(2, 4, 2, sq, sk, 24)
    torch.testing.assert_close(reference.attention(q, k, v), sdpa(q, k, v))
    torch.testing.assert_close(reference.attention(q, k, v, scale=0.2), sdpa(q, k, v, scale=0.2))


def test_causal_square_matches_is_causal():
    q, k, v = make_qkv(1, 2, 2, 50, 50, 16)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference.attention(q, k, v, causal=True), ref)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(5, 2)), dict(causal=True, window=(9, -1))])
def test_masked_patterns_with_bool_mask(kw):
    # Sq < Sk so that every row sees at least one key under bottom-right alignment (SDPA gives NaN rows
    # for fully masked rows, which the reference defines as 0).
    q, k, v = make_qkv(1, 2, 2, 40, 64, 16)
    left, right = kw.get("window", (-1, -1))
    if kw.get("causal"):
        right = 0
    mask = reference.visible_mask(40, 64, left=left, right=right)
    torch.testing.assert_close(reference.attention(q, k, v, **kw), sdpa(q, k, v, mask=mask))


def test_bottom_right_alignment_by_hand():
    # Sq=2, Sk=4, causal: offset 2, row 0 sees keys 0..2, row 1 sees 0..3.
    vis = reference.visible_mask(2, 4, right=0)[0, 0]
    assert vis.tolist() == [[True, True, True, False], [True, True, True, True]]
    vis = reference.visible_mask(3, 3, left=1, right=0)[0, 0]
    assert vis.tolist() == [[True, False, False], [True, True, False], [False, True, True]]


def test_block_sparse_matches_element_mask():
    q, k, v = make_qkv(1, 2, 2, 48, 48, 16)
    lay = torch.tensor([[[1, 0, 1], [0, 1, 0], [1, 1, 1]], [[1, 1, 0], [0, 1, 1], [0, 0, 1]]], dtype=torch.bool)
    bm = fused_attn.block_mask(lay, 16)
    mask = lay.repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(0)
    torch.testing.assert_close(reference.attention(q, k, v, block_mask=bm), sdpa(q, k, v, mask=mask))
