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
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.3, 10.0))
    if draw(st.booleans()):
        kw["alibi_slopes"] = torch.rand(*draw(st.sampled_from([(hq,), (2, hq)]))) * draw(st.floats(0.0, 1.0))
    return (2, hq, hk, sq, sk, d), kw, draw(st.integers(0, 1000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fuzz_against_reference(case):
    shape, kw, seed = case
    q, k, v = make_qkv(*shape, seed=seed)
    check_all(q, k, v, **kw)


@st.composite
def varlen_cases(draw):
    hk = draw(st.integers(1, 3))
    hq = hk * draw(st.integers(1, 3))
    nseq = draw(st.integers(1, 5))
    lens_q = [draw(st.integers(0, 70)) for _ in range(nseq)]
    lens_k = [draw(st.integers(0, 70)) for _ in range(nseq)]
    kw = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 30)), draw(st.integers(-1, 30)))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.3, 10.0))
    if draw(st.booleans()):
        kw["alibi_slopes"] = torch.rand(hq) * draw(st.floats(0.0, 1.0))
    return lens_q, lens_k, hq, hk, draw(st.integers(1, 40)), kw, draw(st.integers(0, 1000))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(varlen_cases())
def test_fuzz_varlen_against_reference(case):
    from test_varlen import check_varlen, packed

    lens_q, lens_k, hq, hk, d, kw, seed = case
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, hq, hk, d, seed=seed)
    check_varlen(q, k, v, cu_q, cu_k, **kw)
