"""The CPU decode kernel (csrc/cpu/decode.cpp) on the shapes its code paths split on: head dims that are not
a multiple of its 16-column pairs (fp16 / bf16 keep Q and the output in a permuted column order there),
query rows per task that are not a multiple of its 4-row blocks, several query blocks per (batch, kv head)
(chunked prefill), key ranges that end inside a 64-key block or a page, forced and automatic split counts,
thread counts, and fp16 special values converted in registers. Against the float64 reference (STYLE.md)."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference
from conftest import assert_rule
from test_kvcache import make_cache, reference_over


def _same_dtype(q, k_full, v_full, lens, **kw):
    outs, lses = [], []
    for b, n in enumerate(lens):
        o, l = reference.attention(q[b:b + 1], k_full[b:b + 1, :, :n], v_full[b:b + 1, :, :n], return_lse=True,
                                   **kw)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [16, 40, 59, 111, 128])
def test_head_dims_low_precision(dtype, d):
    """Columns in 16-column pairs, then the d % 16 (fp32: d % 16) tail; GQA group of 3 (rows not a multiple
    of 4); lengths ending inside a key block."""
    b, hq, hk, s_max = 2, 6, 2, 200
    lens = [131, 7]
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, dtype=dtype, seed=d)
    q = torch.randn(b, hq, 2, d, dtype=torch.float64).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    out, lse = fused_attn.flash_kvcache(q, kc, vc, sl, causal=True, return_lse=True)
    ref_out, ref_lse = reference_over(q.double(), k_full.double(), v_full.double(), lens, causal=True)
    base_out, base_lse = _same_dtype(q, k_full, v_full, lens, causal=True)
    assert_rule("out", out, ref_out, base_out, dtype)
    assert_rule("lse", lse, ref_lse, base_lse, dtype)


@pytest.mark.parametrize("hq,hk,sq", [(1, 1, 1), (2, 1, 3), (5, 1, 1), (8, 2, 1), (12, 4, 7), (4, 4, 40),
                                      (32, 2, 3)])
@pytest.mark.parametrize("page_size", [None, 16])
def test_group_and_query_shapes(hq, hk, sq, page_size):
    """Rows per task G * positions in every residue mod 4, several query blocks per (b, kv head) (sq = 40 with
    G = 1: 64 rows per task), MQA with 32 heads, against float64."""
    b, d, s_max = 2, 24, 300
    lens = [250, 61]
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=page_size, seed=hq * 7 + sq)
    q = torch.randn(b, hq, sq, d, dtype=torch.float64)
    sl = torch.tensor(lens, dtype=torch.int32)
    for kw in (dict(), dict(causal=True), dict(window=(30, 2))):
        out, lse = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, return_lse=True, **kw)
        ref_out, ref_lse = reference_over(q, k_full, v_full, lens, **kw)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [0, 1, 2, 5, 40])
@pytest.mark.parametrize("threads", [1, 3])
def test_splits_and_threads(dtype, num_splits, threads):
    """Split counts (0: the kernel's pick) and thread counts give the same answer; with more splits than
    64-key blocks some splits are empty; a sequence of length 0 and one of 1."""
    b, hq, hk, d, s_max = 4, 8, 2, 32, 700
    lens = [650, 0, 1, 333]
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=64, dtype=dtype, seed=num_splits)
    q = torch.randn(b, hq, 1, d, dtype=torch.float64).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, return_lse=True,
                                            num_splits=num_splits, softcap=3.0)
        again, _ = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, return_lse=True,
                                            num_splits=num_splits, softcap=3.0)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out, again), "not deterministic run to run"
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf")), "an empty cache gives 0 and -inf"
    ref_out, ref_lse = reference_over(q.double(), k_full.double(), v_full.double(), lens, softcap=3.0)
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
        torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-10)
    else:
        base_out, base_lse = _same_dtype(q, k_full, v_full, lens, softcap=3.0)
        assert_rule("out", out, ref_out, base_out, dtype)
        assert_rule("lse", lse, ref_lse, base_lse, dtype)



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size,hk,sq", [(16, 8, 1), (64, 8, 1), (64, 4, 3), (16, 6, 2)])
def test_paged_tasks_over_every_kv_head(dtype, page_size, hk, sq):
    """A slot-major paged pool (num_pages, page_size, Hk, D) is read by tasks that take several kv heads (Hk 8:
    all of them at G = 4; Hk 6: a divisor), in key blocks sized by bytes (16 to 64 keys) that straddle pages
    or end inside one, with automatic and forced splits and ALiBi (a per-head modifier, so the heads of a task
    must each get their own): against float64, and the same as the (num_pages, Hk, page_size, D) pool passed
    as .transpose(1, 2) (one head per task)."""
    b, d, s_max = 3, 40, 900
    hq = 4 * hk
    lens = [897, 130, 515]
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=page_size, dtype=dtype,
                                            seed=page_size + hk)
    q = torch.randn(b, hq, sq, d, dtype=torch.float64).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    slopes = torch.linspace(0.01, 0.3, hq, dtype=torch.float32)
    kt = kc.transpose(1, 2).contiguous().transpose(1, 2)
    vt = vc.transpose(1, 2).contiguous().transpose(1, 2)
    for kw in (dict(causal=True), dict(num_splits=3, alibi_slopes=slopes)):
        out, lse = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, return_lse=True, **kw)
        other, other_lse = fused_attn.flash_kvcache(q, kt, vt, sl, block_table=bt, return_lse=True, **kw)
        ref_kw = {key: val for key, val in kw.items() if key != "num_splits"}
        ref_out, ref_lse = reference_over(q.double(), k_full.double(), v_full.double(), lens, **ref_kw)
        if dtype == torch.float64:
            torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
            torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-10)
        else:
            base_out, base_lse = _same_dtype(q, k_full, v_full, lens, **ref_kw)
            assert_rule("out", out, ref_out, base_out, dtype)
            assert_rule("lse", lse, ref_lse, base_lse, dtype)
        torch.testing.assert_close(out, other, rtol=0, atol=1e-10 if dtype == torch.float64 else 1e-5)


def test_fp16_conversion_in_registers():
    """The cache's fp16 values are converted exactly by integer ops: subnormals, the largest finite value,
    signed zeros. A value that turns a score into inf shows as NaN / inf like in the reference."""
    b, hq, hk, d, n = 1, 2, 1, 32, 64
    special = torch.tensor([6e-8, -6e-8, 3e-5, -3e-5, 65504.0, -65504.0, 0.0, -0.0], dtype=torch.float16)
    k = torch.randn(b, hk, n, d, dtype=torch.float64).to(torch.float16)
    v = torch.randn(b, hk, n, d, dtype=torch.float64).to(torch.float16)
    v[0, 0, 5, :8] = special  # V values go straight into the output's weighted sum
    k[0, 0, 9, 8:16] = special[:6].repeat(2)[:8] * 0  # zeros and signed zeros in K
    q = torch.randn(b, hq, 1, d, dtype=torch.float64).to(torch.float16) * 0.1
    sl = torch.tensor([n], dtype=torch.int32)
    out, lse = fused_attn.flash_kvcache(q, k.clone(), v.clone(), sl, return_lse=True)
    ref_out, ref_lse = reference_over(q.double(), k.double(), v.double(), [n])
    base_out, base_lse = _same_dtype(q.float(), k.float(), v.float(), [n])
    # the 65504 entries dominate the output columns they sit in: compare relative to the reference's scale
    err = (out.double() - ref_out).abs().max() / ref_out.abs().max()
    assert err < 2e-3, f"relative error {err:.2e}"
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=2e-3)


def test_long_cache_many_blocks_matches_fp64():
    """A cache long enough for several splits at the automatic pick (B = 1, one kv head), every block full,
    fp64 exact to 1e-10."""
    b, hq, hk, d, n = 1, 4, 1, 64, 5000
    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, [n], n, seed=11)
    q = torch.randn(b, hq, 1, d, dtype=torch.float64)
    sl = torch.tensor([n], dtype=torch.int32)
    out, lse = fused_attn.flash_kvcache(q, kc, vc, sl, return_lse=True, alibi_slopes=torch.tensor([0.01, 0.1, 0.5, 1.0]))
    ref_out, ref_lse = reference_over(q, k_full, v_full, [n], alibi_slopes=torch.tensor([0.01, 0.1, 0.5, 1.0]))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-10)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256, 48, 96])
def test_four_row_tiles(generic, dtype, d, monkeypatch):
    """Blocks of 4 query rows take the vector tiles on x86 CPUs: on AVX-512 CPUs (build_info()["cpu_isa"] ==
    "x86-64-v4") fp32 / bf16 caches with G % 4 == 0 and d % 32 == 0 take the AVX-512 tiles (d = 96: a 32-column
    output pass after a 64-column one), and the other blocks of 4 rows with d % 16 == 0 the AVX2 tiles (fp16, d =
    48, G = 6's first 4 rows), as every such block does on AVX2 CPUs without AVX-512; head dims 64 / 128 / 256
    are compiled as constants, other multiples of 16 at run time. FUSED_ATTN_CPU_DECODE_GENERIC=1 forces the
    generic tiles. G = 4, 8 (two 4-row blocks) and 6, Sq 1 and 3 (rows 12 and 24), contiguous and paged,
    lengths ending inside a 64-key block (and inside a group of 4 keys), forced splits: both paths against
    float64 under the STYLE.md rule, and against each other."""
    if generic:
        monkeypatch.setenv("FUSED_ATTN_CPU_DECODE_GENERIC", "1")
    b, hk, s_max = 2, 2, 330
    lens = [317, 70]
    sl = torch.tensor(lens, dtype=torch.int32)
    for g, sq, page_size in ((4, 1, None), (8, 1, 16), (4, 3, 64), (6, 1, 16)):
        kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=page_size, dtype=dtype,
                                                seed=d + g + sq)
        q = torch.randn(b, hk * g, sq, d, dtype=torch.float64).to(dtype)
        for kw in (dict(), dict(causal=True, num_splits=3)):
            out, lse = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, return_lse=True, **kw)
            ref_kw = {key: val for key, val in kw.items() if key != "num_splits"}
            ref_out, ref_lse = reference_over(q.double(), k_full.double(), v_full.double(), lens, **ref_kw)
            base_out, base_lse = _same_dtype(q, k_full, v_full, lens, **ref_kw)
            assert_rule("out", out, ref_out, base_out, dtype)
            assert_rule("lse", lse, ref_lse, base_lse, dtype)
            monkeypatch.setenv("FUSED_ATTN_CPU_DECODE_GENERIC", "0" if generic else "1")
            other = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, **kw)
            monkeypatch.setenv("FUSED_ATTN_CPU_DECODE_GENERIC", "1" if generic else "0")
            torch.testing.assert_close(out.float(), other.float(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
