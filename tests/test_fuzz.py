"""Property-based fuzzing of the CPU kernels: random shapes, GQA groups, windows, causal flags and block
layouts, each checked against the float64 reference (out, lse, dq, dk, dv)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_attn
from conftest import check_all, make_qkv


@st.composite
def cases(draw):
    hk = draw(st.integers(1, 3))
    hq = hk * draw(st.integers(1, 3))
    sq, sk = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    d = draw(st.integers(1, 40))
    kw = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 40)), draw(st.integers(-1, 40)))
    if draw(st.booleans()):
        bq, bk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        batch = draw(st.sampled_from([None, 1, 2]))
        heads = draw(st.sampled_from([1, hq]))
        shape = ((batch,) if batch else ()) + (heads, -(-sq // bq), -(-sk // bk))
        seed = draw(st.integers(0, 2 ** 16))
        dens = draw(st.floats(0.0, 1.0))
        layout = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < dens
        kw["block_mask"] = fused_attn.block_mask(layout, (bq, bk))
    return (2, hq, hk, sq, sk, d), kw, draw(st.integers(0, 1000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fuzz_against_reference(case):
    shape, kw, seed = case
    q, k, v = make_qkv(*shape, seed=seed)
    check_all(q, k, v, **kw)
