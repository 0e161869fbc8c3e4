"""The block mask's lists, at the layout's own blocks and at kernel tile granularity, against brute force."""
from __future__ import annotations

import itertools

import pytest
import torch

import fused_attn
from fused_attn._sparse import tile_lists


def brute(layout, bq, bk, tq, tk):
    """Per (b, h, query tile): {key tile: full?} from the element-level layout."""
    bm, hm, nqb, nkb = layout.shape
    sq, sk = nqb * bq, nkb * bk
    el = layout.repeat_interleave(bq, 2).repeat_interleave(bk, 3)
    out = {}
    for b, h in itertools.product(range(bm), range(hm)):
        for qt in range(-(-sq // tq)):
            row = {}
            for kt in range(-(-sk // tk)):
                tile = el[b, h, qt * tq:(qt + 1) * tq, kt * tk:(kt + 1) * tk]
                if tile.any():
                    # Cells past the layout are past the sequence: they count as allowed.
                    full = bool(tile.all())
                    row[kt] = full
            out[(b, h, qt)] = row
    return out


def decode(counts, idx, b, h, r):
    n = int(counts[b, h, r])
    return {(e if e >= 0 else -e - 1): e >= 0 for e in idx[b, h, r, :n].tolist()}


@pytest.mark.parametrize("bq,bk,tq,tk", [(16, 16, 128, 64), (64, 64, 128, 64), (128, 128, 64, 128),
                                         (48, 80, 64, 64), (7, 5, 32, 32), (32, 32, 32, 32)])
def test_tile_lists_match_brute_force(bq, bk, tq, tk):
    g = torch.Generator().manual_seed(bq + bk)
    layout = torch.rand(2, 3, 9, 7, generator=g) < 0.35
    kvc, kvi, qc, qi = tile_lists(layout, bq, bk, tq, tk)
    want = brute(layout, bq, bk, tq, tk)
    for (b, h, qt), row in want.items():
        assert decode(kvc, kvi, b, h, qt) == row, (b, h, qt)
    # The transposed lists name the same tiles.
    for b, h in itertools.product(range(2), range(3)):
        for kt in range(qc.shape[2]):
            got = decode(qc, qi, b, h, kt)
            exp = {qt: want[(b, h, qt)][kt] for qt in range(kvc.shape[2]) if kt in want[(b, h, qt)]}
            assert got == exp


def test_native_lists_are_csr_of_the_layout():
    lay = torch.tensor([[[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]]], dtype=torch.bool)
    bm = fused_attn.block_mask(lay, 32)
    assert bm.kv_counts.tolist() == [[[3, 0, 1]]]
    assert bm.kv_indices[0, 0, 0, :3].tolist() == [0, 2, 3]
    assert bm.kv_indices[0, 0, 2, :1].tolist() == [1]
    assert bm.q_counts.tolist() == [[[1, 1, 1, 1]]]
    assert bm.q_indices[0, 0, :, 0].tolist() == [0, 2, 0, 0]
    assert bm.density() == pytest.approx(4 / 12)
