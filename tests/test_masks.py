"""Block-layout builders (fused_attn/masks.py): shapes, hand-written patterns, invariants, argument errors."""

import pytest
import torch

from fused_attn import masks


def rows(*lines):
    """A (nqb, nkb) bool tensor from strings like "1100" (one string per query block)."""
    return torch.tensor([[c == "1" for c in line] for line in lines], dtype=torch.bool)


def is_block_lower_triangular(layout):
    nqb, nkb = layout.shape[-2:]
    upper = torch.ones(nqb, nkb, dtype=torch.bool).triu(1 + nkb - nqb)
    return not (layout & upper).any()


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "build",
    [
        lambda: masks.local(5, 7, 2, heads=3),
        lambda: masks.strided(5, 7, 2, heads=3),
        lambda: masks.fixed(5, 7, 2, heads=3),
        lambda: masks.global_local(5, 7, 2, 1, heads=3),
        lambda: masks.bigbird(5, 7, 2, 1, 1, heads=3),
    ],
)
def test_shape_and_dtype(build):
    layout = build()
    assert layout.dtype == torch.bool
    assert layout.shape == (3, 5, 7)
    assert layout.device.type == "cpu"


def test_bigbird_batch_shape():
    layout = masks.bigbird(6, 6, 1, 0, 2, heads=2, batch=3)
    assert layout.shape == (3, 2, 6, 6)
    assert layout.dtype == torch.bool


def test_heads_are_copies_for_deterministic_patterns():
    layout = masks.strided(9, 9, 3, heads=4)
    for h in range(1, 4):
        assert torch.equal(layout[h], layout[0])


# ------------------------------------------------------------------------------- hand-written patterns


def test_local_exact():
    expected = rows(
        "11000",
        "11100",
        "01110",
        "00111",
        "00011",
    )
    assert torch.equal(masks.local(5, 5, 2)[0], expected)


def test_local_width_one_is_diagonal():
    assert torch.equal(masks.local(4, 4, 1)[0], torch.eye(4, dtype=torch.bool))


def test_local_causal_exact():
    expected = rows(
        "10000",
        "11000",
        "11100",
        "01110",
        "00111",
    )
    assert torch.equal(masks.local(5, 5, 3, causal=True)[0], expected)


def test_local_bottom_right_alignment_when_fewer_query_blocks():
    # 2 query blocks against 4 key blocks: the query blocks sit at key positions 2 and 3.
    expected = rows(
        "0110",
        "0011",
    )
    assert torch.equal(masks.local(2, 4, 1 + 1, causal=True)[0], expected)


def test_strided_exact():
    # stride 3, local 3 (default), causal: |delta| < 3 or delta % 3 == 0, delta = qb - kb >= 0.
    expected = rows(
        "1000000",
        "1100000",
        "1110000",
        "1111000",
        "0111100",
        "0011110",
        "1001111",
    )
    assert torch.equal(masks.strided(7, 7, 3)[0], expected)


def test_strided_custom_local_exact():
    # stride 4, local 1: the diagonal plus every 4th block back.
    expected = rows(
        "100000",
        "010000",
        "001000",
        "000100",
        "100010",
        "010001",
    )
    assert torch.equal(masks.strided(6, 6, 4, local=1)[0], expected)


def test_strided_non_causal_exact():
    expected = rows(
        "1101",
        "1110",
        "0111",
        "1011",
    )
    assert torch.equal(masks.strided(4, 4, 3, local=2, causal=False)[0], expected)


def test_fixed_exact():
    # chunks of 3 blocks, last 1 block of each chunk is a summary block, causal.
    expected = rows(
        "1000000",
        "1100000",
        "1110000",
        "0011000",
        "0011100",
        "0011110",
        "0010011",
    )
    assert torch.equal(masks.fixed(7, 7, 3)[0], expected)


def test_fixed_non_causal_two_summaries_exact():
    expected = rows(
        "111011",
        "111011",
        "111011",
        "011111",
        "011111",
        "011111",
    )
    assert torch.equal(masks.fixed(6, 6, 3, summary=2, causal=False)[0], expected)


def test_global_local_exact():
    # width 1 (diagonal), global blocks 0 and 4: rows 0 and 4 see everything, columns 0 and 4 are seen by all.
    expected = rows(
        "11111",
        "11001",
        "10101",
        "10011",
        "11111",
    )
    assert torch.equal(masks.global_local(5, 5, 1, [0, 4])[0], expected)


def test_global_local_int_and_causal_exact():
    expected = rows(
        "10000",
        "11000",
        "11100",
        "10110",
        "10011",
    )
    assert torch.equal(masks.global_local(5, 5, 2, 1, causal=True)[0], expected)


def test_global_blocks_accepts_int_tensors():
    assert torch.equal(masks.global_local(5, 5, 1, torch.tensor([0, 4])), masks.global_local(5, 5, 1, [0, 4]))
    assert torch.equal(masks.global_local(5, 5, 1, torch.tensor(2)), masks.global_local(5, 5, 1, 2))


def test_global_local_zero_globals_is_local():
    assert torch.equal(masks.global_local(6, 6, 2, 0), masks.local(6, 6, 2))


def test_bigbird_without_random_is_global_local():
    assert torch.equal(masks.bigbird(6, 6, 2, [1], 0, heads=2), masks.global_local(6, 6, 2, [1], heads=2))


def test_bigbird_random_count_and_containment():
    nqb = nkb = 16
    g = torch.Generator().manual_seed(3)
    layout = masks.bigbird(nqb, nkb, 2, 1, 4, generator=g, heads=3, batch=2)
    base = masks.global_local(nqb, nkb, 2, 1)[0]
    assert (layout >= base).all()  # window + global always present
    extra = (layout & ~base).sum(-1)  # random blocks per row
    # The global row sees everything already; every other row gets exactly 4 new blocks (13 candidates).
    assert (extra[..., 0] == 0).all()
    assert (extra[..., 1:] == 4).all()


def test_bigbird_takes_all_candidates_when_too_few():
    layout = masks.bigbird(4, 4, 1, 0, 10)
    assert layout.all()


def test_bigbird_causal_random_stays_causal():
    layout = masks.bigbird(12, 12, 1, 0, 3, generator=torch.Generator().manual_seed(0), heads=4, causal=True)
    assert is_block_lower_triangular(layout)
    # Row r has r candidates below the diagonal: it takes min(3, r) of them.
    counts = layout.sum(-1)[0]
    assert counts.tolist() == [1 + min(3, r) for r in range(12)]


def test_bigbird_random_differs_across_heads_and_batch():
    g = torch.Generator().manual_seed(1)
    layout = masks.bigbird(32, 32, 1, 0, 3, generator=g, heads=2, batch=2)
    assert not torch.equal(layout[0, 0], layout[0, 1])
    assert not torch.equal(layout[0, 0], layout[1, 0])


# ---------------------------------------------------------------------------------------------- invariants


def test_density_values():
    assert masks.density(torch.ones(2, 3, 4, dtype=torch.bool)) == 1.0
    assert masks.density(torch.zeros(1, 3, 3, dtype=torch.bool)) == 0.0
    assert masks.density(masks.local(4, 4, 1)) == pytest.approx(0.25)
    assert masks.density(masks.local(5, 5, 2)) == pytest.approx(13 / 25)


@pytest.mark.parametrize("causal", [False, True])
def test_density_monotonic_in_width(causal):
    values = [masks.density(masks.local(20, 20, w, causal=causal)) for w in range(1, 22)]
    assert all(a < b for a, b in zip(values[:19], values[1:20]))
    assert values[19] == values[20] == (1.0 if not causal else 210 / 400)


def test_density_monotonic_in_width_global_local():
    values = [masks.density(masks.global_local(24, 24, w, [0, 5])) for w in range(1, 10)]
    assert all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "build",
    [
        lambda: masks.local(9, 9, 3, causal=True),
        lambda: masks.strided(9, 9, 3, causal=True),
        lambda: masks.strided(9, 9, 2, local=4),
        lambda: masks.fixed(9, 9, 4, summary=2),
        lambda: masks.global_local(9, 9, 2, [0, 4], causal=True),
        lambda: masks.bigbird(9, 9, 2, [3], 2, causal=True, heads=2, batch=2),
    ],
)
def test_causal_variants_are_block_lower_triangular(build):
    layout = build()
    assert is_block_lower_triangular(layout)
    # Every row keeps its own diagonal block, so no query block is left without keys.
    assert layout.diagonal(dim1=-2, dim2=-1).all()


def test_causal_with_rectangular_layout_is_lower_triangular_bottom_right():
    layout = masks.strided(3, 8, 2, causal=True)
    assert is_block_lower_triangular(layout)
    assert layout[0, -1, -1]  # the last query block sees the last key block


def test_bigbird_reproducible_with_generator():
    a = masks.bigbird(20, 20, 2, 1, 3, generator=torch.Generator().manual_seed(42), heads=4, batch=2)
    b = masks.bigbird(20, 20, 2, 1, 3, generator=torch.Generator().manual_seed(42), heads=4, batch=2)
    c = masks.bigbird(20, 20, 2, 1, 3, generator=torch.Generator().manual_seed(43), heads=4, batch=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bigbird_uses_global_rng_without_generator():
    torch.manual_seed(5)
    a = masks.bigbird(20, 20, 1, 0, 3, heads=2)
    torch.manual_seed(5)
    b = masks.bigbird(20, 20, 1, 0, 3, heads=2)
    assert torch.equal(a, b)


def test_layout_is_accepted_by_block_mask():
    import fused_attn

    layout = masks.bigbird(4, 4, 1, 1, 1, heads=2, generator=torch.Generator().manual_seed(0))
    fused_attn.block_mask(layout, 16)
    fused_attn.block_mask(masks.bigbird(4, 4, 1, 1, 1, heads=2, batch=3), (16, 32))


# ---------------------------------------------------------------------------------------------- bad arguments

BAD_CALLS = [
    # (callable, exception type, argument name expected in the message)
    (lambda: masks.local(0, 4, 1), ValueError, "nqb"),
    (lambda: masks.local(4, 0, 1), ValueError, "nkb"),
    (lambda: masks.local(4, 4, 0), ValueError, "width"),
    (lambda: masks.local(4.0, 4, 1), TypeError, "nqb"),
    (lambda: masks.local(4, "4", 1), TypeError, "nkb"),
    (lambda: masks.local(4, 4, True), TypeError, "width"),
    (lambda: masks.local(4, 4, 1, causal=1), TypeError, "causal"),
    (lambda: masks.local(4, 4, 1, heads=0), ValueError, "heads"),
    (lambda: masks.local(4, 4, 1, heads=2.5), TypeError, "heads"),
    (lambda: masks.strided(4, 4, 0), ValueError, "stride"),
    (lambda: masks.strided(4, 4, 2, local=0), ValueError, "local"),
    (lambda: masks.strided(4, 4, 2, local=1.5), TypeError, "local"),
    (lambda: masks.strided(4, 4, 2, causal=None), TypeError, "causal"),
    (lambda: masks.fixed(4, 4, 0), ValueError, "block_stride"),
    (lambda: masks.fixed(4, 4, 2, summary=0), ValueError, "summary"),
    (lambda: masks.fixed(4, 4, 2, summary=3), ValueError, "summary"),
    (lambda: masks.fixed(4, 4, 2, causal="yes"), TypeError, "causal"),
    (lambda: masks.global_local(4, 4, 0, 1), ValueError, "width"),
    (lambda: masks.global_local(4, 4, 1, -1), ValueError, "global_blocks"),
    (lambda: masks.global_local(4, 4, 1, 5), ValueError, "global_blocks"),
    (lambda: masks.global_local(4, 4, 1, [4]), ValueError, "global_blocks"),
    (lambda: masks.global_local(4, 4, 1, [-1]), ValueError, "global_blocks"),
    (lambda: masks.global_local(4, 4, 1, [0.5]), TypeError, "global_blocks"),
    (lambda: masks.global_local(4, 4, 1, "0"), TypeError, "global_blocks"),
    (lambda: masks.global_local(4, 4, 1, 1.0), TypeError, "global_blocks"),
    (lambda: masks.global_local(4, 4, 1, torch.tensor([0.5])), TypeError, "global_blocks"),
    (lambda: masks.bigbird(4, 4, 1, 1, -1), ValueError, "random_blocks"),
    (lambda: masks.bigbird(4, 4, 1, 1, 1.0), TypeError, "random_blocks"),
    (lambda: masks.bigbird(4, 4, 1, 1, 1, batch=0), ValueError, "batch"),
    (lambda: masks.bigbird(4, 4, 1, 1, 1, generator=0), TypeError, "generator"),
    (lambda: masks.bigbird(4, 4, 0, 1, 1), ValueError, "width"),
    (lambda: masks.bigbird(4, 4, 1, 9, 1), ValueError, "global_blocks"),
    (lambda: masks.bigbird(4, 4, 1, 1, 1, heads=0), ValueError, "heads"),
    (lambda: masks.bigbird(4, 4, 1, 1, 1, causal=0), TypeError, "causal"),
    (lambda: masks.density([[True]]), TypeError, "layout"),
    (lambda: masks.density(torch.ones(2, 2)), TypeError, "layout"),
    (lambda: masks.density(torch.ones(0, 2, dtype=torch.bool)), ValueError, "layout"),
]


@pytest.mark.parametrize("call, exc, name", BAD_CALLS)
def test_bad_arguments_raise_and_name_the_argument(call, exc, name):
    with pytest.raises(exc, match=name):
        call()
