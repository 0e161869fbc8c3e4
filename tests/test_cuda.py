"""The CUDA kernels against the float64 reference (rule of STYLE.md): every pattern x dtype x head dim x
awkward lengths, GQA/MQA, fp32 path, determinism, rows that see nothing, strides, CUDA graphs, large
tensors. Skipped with a reason where no GPU is present."""
from __future__ import annotations

import os

import pytest
import torch

import fused_attn
from conftest import HAS_CUDA, check_all, make_qkv

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of fused_attn")

DEV = "cuda"
LENGTHS = [(1, 1), (97, 97), (1025, 1025), (97, 1025), (1025, 97)]
HEAD_DIMS = [32, 40, 64, 96, 128, 160, 192, 256]
GQA = [(4, 4), (4, 2), (4, 1)]


def pattern_kwargs(name, hq, sq, sk, seed=0):
    if name == "dense":
        return {}
    if name == "causal":
        return dict(causal=True)
    if name == "window":
        return dict(window=(100, 37))
    if name == "causal_window":
        return dict(causal=True, window=(200, -1))
    bq, bk = {"sparse16": (16, 16), "sparse64": (64, 64), "sparse128x64": (128, 64),
              "sparse_causal": (32, 64)}[name]
    g = torch.Generator().manual_seed(seed)
    lay = torch.rand(hq, -(-sq // bq), -(-sk // bk), generator=g) < 0.4
    kw = dict(block_mask=fused_attn.block_mask(lay.to(DEV), (bq, bk)))
    if name == "sparse_causal":
        kw["causal"] = True
    return kw


PATTERNS = ["dense", "causal", "window", "causal_window", "sparse16", "sparse64", "sparse128x64",
            "sparse_causal"]


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"sq{x[0]}_sk{x[1]}")
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_tensor_core(pattern, dtype, d, lengths):
    sq, sk = lengths
    hq, hk = GQA[(d + sq + len(pattern)) % len(GQA)]
    q, k, v = make_qkv(2, hq, hk, sq, sk, d, dtype=dtype, device=DEV, seed=d + sq)
    check_all(q, k, v, **pattern_kwargs(pattern, hq, sq, sk, seed=d))


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"sq{x[0]}_sk{x[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_generic(pattern, dtype, lengths):
    sq, sk = lengths
    q, k, v = make_qkv(1, 4, 2, sq, sk, 72, dtype=dtype, device=DEV, seed=sq)
    check_all(q, k, v, **pattern_kwargs(pattern, 4, sq, sk, seed=sq))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_that_see_nothing(dtype):
    q, k, v = make_qkv(1, 2, 1, 300, 100, 64, dtype=dtype, device=DEV, requires_grad=True)
    out, lse = fused_attn.flash(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :, :200] == 0) and torch.all(lse[:, :, :200] == float("-inf"))
    out.float().pow(2).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad.float()).all()
    assert torch.all(q.grad[:, :, :200] == 0)
    check_all(q.detach(), k.detach(), v.detach(), causal=True)


def grads(q, k, v, dout, **kw):
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    fused_attn.flash(qq, kk, vv, **kw).backward(dout)
    return qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("kw", [dict(), dict(causal=True, window=(256, -1))])
def test_deterministic_mode_is_bitwise_repeatable(kw, monkeypatch):
    q, k, v = make_qkv(2, 8, 2, 1500, 1500, 128, dtype=torch.bfloat16, device=DEV, seed=3)
    dout = torch.randn_like(q)
    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "1")
    first = grads(q, k, v, dout, **kw)
    for _ in range(3):
        again = grads(q, k, v, dout, **kw)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "0")
    atomic = grads(q, k, v, dout, **kw)
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_strided_layouts():
    q, k, v = make_qkv(2, 8, 4, 333, 333, 64, dtype=torch.bfloat16, device=DEV, layout="bshd")
    assert not q.is_contiguous()
    check_all(q, k, v, causal=True)


def test_cuda_graph_capture():
    q, k, v = make_qkv(2, 4, 4, 512, 512, 64, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    dout = torch.randn_like(q)
    eager = fused_attn.flash(q, k, v, causal=True)
    static_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs requires
        fused_attn.flash(*static_in, causal=True).backward(dout)
    torch.cuda.current_stream().wait_stream(s)
    for t in static_in:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_attn.flash(*static_in, causal=True)
        out.backward(dout)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)
    ref = grads(q, k, v, dout, causal=True)
    for a, b in zip((t.grad for t in static_in), ref):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_unsupported_head_dims_raise():
    for d in (59, 264):
        q, k, v = make_qkv(1, 1, 1, 8, 8, d, dtype=torch.float16, device=DEV)
        with pytest.raises(ValueError, match=rf"q: head dim {d} is not supported by the CUDA torch.float16"):
            fused_attn.flash(q, k, v)


@pytest.mark.skipif(os.environ.get("FUSED_ATTN_SKIP_LARGE") == "1", reason="FUSED_ATTN_SKIP_LARGE=1")
def test_tensor_over_2_pow_31_elements():
    # q and out have 2^31 + 2^24 elements: offsets past int32 must be computed in int64.
    sq, d = (2 ** 31 + 2 ** 24) // 128, 128
    q = torch.randn(1, 1, sq, d, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 64, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    out = fused_attn.flash(q, k, v)
    tail = slice(sq - 4096, sq)
    ref = fused_attn.reference.attention(q[:, :, tail].double(), k.double(), v.double())
    base = fused_attn.reference.attention(q[:, :, tail], k, v)
    from conftest import assert_rule

    assert_rule("out tail", out[:, :, tail], ref, base, torch.bfloat16)
    del out
    q.requires_grad_(True)
    o = fused_attn.flash(q, k, v)
    o.backward(torch.ones_like(o))
    assert torch.isfinite(q.grad[:, :, tail].float()).all() and q.grad[:, :, tail].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Packed variable-length batches (flash_varlen), softcap and ALiBi on the CUDA kernels: tensor cores for
# fp16 / bf16, the fp32 / fp64 kernels otherwise. Same rule as above: float64 reference, STYLE.md bound.

VARLEN_PATTERNS = {"dense": dict(), "causal": dict(causal=True), "window": dict(window=(100, 37)),
                   "causal_window": dict(causal=True, window=(200, -1))}
# Lengths 0 and 1, Sq_b != Sk_b both ways, a sequence without keys, one without queries, tiles that end
# mid-sequence, one long sequence.
VARLEN_MIXED = ([70, 0, 1, 257, 33, 130, 9, 1025], [100, 12, 0, 257, 33, 64, 1, 700])


def packed_cuda(lens_q, lens_k, hq, hk, d, dtype, seed=0, qmul=1.0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q = (qmul * torch.randn(tq, hq, d, generator=g, dtype=torch.float64)).to(DEV, dtype)
    k = torch.randn(tk, hk, d, generator=g, dtype=torch.float64).to(DEV, dtype)
    v = torch.randn(tk, hk, d, generator=g, dtype=torch.float64).to(DEV, dtype)
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    return q, k, v, cu(lens_q), cu(lens_k)


def varlen_run(fn, q, k, v, cu_q, cu_k, dout, dtype, **kw):
    qq, kk, vv = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    out, lse = fn(qq, kk, vv, cu_q, cu_k, return_lse=True, **kw)
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad


def check_varlen_cuda(q, k, v, cu_q, cu_k, **kw):
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(DEV)
    mine = varlen_run(fused_attn.flash_varlen, q, k, v, cu_q, cu_k, dout, q.dtype, **kw)
    ref = varlen_run(fused_attn.reference.flash_varlen, q, k, v, cu_q, cu_k, dout, torch.float64, **kw)
    base = varlen_run(fused_attn.reference.flash_varlen, q, k, v, cu_q, cu_k, dout, q.dtype, **kw)
    from conftest import assert_rule

    for name, a, r, bse in zip(("out", "lse", "dq", "dk", "dv"), mine, ref, base):
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert a.device == r.device
        assert_rule(name, a, r, bse, q.dtype)


def slopes_for(b, hq, per_batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand((b, hq) if per_batch else (hq,), generator=g) * 0.2 + 0.01
    return s.to(DEV, torch.float32)


@pytest.mark.parametrize("pattern", list(VARLEN_PATTERNS))
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 64), (4, 1, 40), (2, 2, 128), (4, 4, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_varlen_tensor_core(pattern, hq, hk, d, dtype):
    q, k, v, cu_q, cu_k = packed_cuda(*VARLEN_MIXED, hq, hk, d, dtype, seed=d + hq)
    check_varlen_cuda(q, k, v, cu_q, cu_k, **VARLEN_PATTERNS[pattern])


@pytest.mark.parametrize("pattern", list(VARLEN_PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_varlen_generic(pattern, dtype):
    q, k, v, cu_q, cu_k = packed_cuda(*VARLEN_MIXED, 4, 2, 72, dtype, seed=3)
    check_varlen_cuda(q, k, v, cu_q, cu_k, **VARLEN_PATTERNS[pattern])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [dict(softcap=2.0), dict(alibi="h", causal=True), dict(alibi="bh", window=(64, 8)),
                                dict(softcap=1.5, alibi="h", causal=True)], ids=["cap", "alibi", "alibi_b", "both"])
def test_varlen_mods(kw, dtype):
    kw = dict(kw)
    lens = VARLEN_MIXED
    q, k, v, cu_q, cu_k = packed_cuda(*lens, 4, 2, 64, dtype, seed=5, qmul=2.0)
    a = kw.pop("alibi", None)
    if a:
        kw["alibi_slopes"] = slopes_for(len(lens[0]), 4, a == "bh")
    check_varlen_cuda(q, k, v, cu_q, cu_k, **kw)


@pytest.mark.parametrize("force", ["1", ""], ids=["sm80", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_varlen_equals_flash_per_sequence(dtype, force, monkeypatch):
    # Both sides run the same kernel family (the device's choice, or mma.sync forced): per sequence, the
    # packed kernels do the same arithmetic as flash() on that sequence alone.
    monkeypatch.setenv("FUSED_ATTN_FORCE_SM80", force)
    lens = [300, 1, 129]
    q, k, v, cu_q, cu_k = packed_cuda(lens, lens, 4, 2, 64, dtype, seed=11)
    out = fused_attn.flash_varlen(q, k, v, cu_q, cu_k, causal=True)
    for b in range(len(lens)):
        sl = slice(int(cu_q[b]), int(cu_q[b + 1]))
        one = fused_attn.flash(*(t[sl].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), causal=True)
        torch.testing.assert_close(out[sl], one[0].transpose(0, 1))


def test_varlen_max_seqlen_given_and_strided_views():
    """max_seqlen given (no host synchronisation, grids larger than needed) and (total, H, D) views with
    a head stride: the same result as computed lengths on contiguous copies."""
    q, k, v, cu_q, cu_k = packed_cuda([40, 17, 300], [33, 60, 1], 4, 2, 64, torch.bfloat16, seed=5)
    big = torch.zeros(q.shape[0], 4, 128, device=DEV, dtype=q.dtype)
    big[..., :64] = q
    qv = big[..., :64]
    assert not qv.is_contiguous()
    a = fused_attn.flash_varlen(qv, k, v, cu_q, cu_k, max_seqlen_q=512, max_seqlen_k=400, causal=True)
    b = fused_attn.flash_varlen(q, k, v, cu_q, cu_k, causal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    check_varlen_cuda(qv, k, v, cu_q, cu_k, max_seqlen_q=512, max_seqlen_k=400, window=(20, 3))


@pytest.mark.parametrize("mods", [dict(), dict(softcap=2.0)])
def test_varlen_deterministic_backward(mods, monkeypatch):
    q, k, v, cu_q, cu_k = packed_cuda(*VARLEN_MIXED, 8, 2, 128, torch.bfloat16, seed=3)
    dout = torch.randn_like(q)

    def grads():
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        fused_attn.flash_varlen(qq, kk, vv, cu_q, cu_k, causal=True, **mods).backward(dout)
        return qq.grad, kk.grad, vv.grad

    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "1")
    first = grads()
    for a, b in zip(first, grads()):
        assert torch.equal(a, b)
    monkeypatch.setenv("FUSED_ATTN_DETERMINISTIC", "0")
    for a, b in zip(first, grads()):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


MODS = {"cap": dict(softcap=2.0), "alibi": dict(alibi="h"), "alibi_b": dict(alibi="bh"),
        "both": dict(softcap=1.5, alibi="bh")}


@pytest.mark.parametrize("mods", list(MODS))
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=["bf16", "fp16", "fp32", "fp64"])
def test_softcap_alibi(mods, pattern, dtype):
    sq, sk, d = 257, 1025, (72 if dtype in (torch.float32, torch.float64) else 128)
    hq, hk = 4, 2
    q, k, v = make_qkv(2, hq, hk, sq, sk, d, dtype=dtype, device=DEV, seed=d + len(pattern))
    q = q * 2  # scores large enough that the cap bites
    kw = dict(MODS[mods])
    a = kw.pop("alibi", None)
    if a:
        kw["alibi_slopes"] = slopes_for(2, hq, a == "bh")
    check_all(q, k, v, **kw, **pattern_kwargs(pattern, hq, sq, sk, seed=d))


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_softcap_alibi_head_dims(d):
    q, k, v = make_qkv(1, 2, 1, 97, 300, d, dtype=torch.bfloat16, device=DEV, seed=d)
    check_all(q * 2, k, v, causal=True, softcap=3.0, alibi_slopes=slopes_for(1, 2, False))


def test_softcap_changes_the_result_on_cuda():
    q, k, v = make_qkv(1, 2, 2, 65, 65, 64, dtype=torch.float32, device=DEV, seed=2)
    a = fused_attn.flash(q * 4, k, v)
    b = fused_attn.flash(q * 4, k, v, softcap=1.0)
    assert (a - b).abs().max() > 1e-2


def _finite_lse(res):
    out, lse = res
    return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def test_gradcheck_fp64_mods():
    """torch.autograd.gradcheck on the fp64 CUDA kernels themselves, with softcap and ALiBi."""
    q, k, v = make_qkv(1, 2, 1, 9, 12, 8, device=DEV, seed=3)
    q = (q * 2).requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    slopes = torch.tensor([[0.25, 0.5]], device=DEV)
    for kw in (dict(softcap=1.5), dict(alibi_slopes=slopes, causal=True),
               dict(softcap=0.8, alibi_slopes=slopes, window=(3, 2))):
        fn = lambda a, b, c: _finite_lse(fused_attn.flash(a, b, c, return_lse=True, **kw))
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


def test_gradcheck_fp64_varlen():
    q, k, v, cu_q, cu_k = packed_cuda([3, 0, 6, 1], [5, 2, 4, 0], 2, 1, 8, torch.float64, seed=1)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    slopes = torch.tensor([0.3, 0.7], device=DEV)
    for kw in (dict(), dict(causal=True, softcap=2.0), dict(window=(2, 1), alibi_slopes=slopes),
               dict(max_seqlen_q=6, max_seqlen_k=5, causal=True)):
        fn = lambda a, b, c: _finite_lse(fused_attn.flash_varlen(a, b, c, cu_q, cu_k, return_lse=True, **kw))
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8)


def test_varlen_cuda_graph_and_no_sync():
    """With max_seqlen given the call reads nothing back: it captures into a CUDA graph."""
    q, k, v, cu_q, cu_k = packed_cuda([128, 64, 1], [128, 200, 7], 4, 2, 64, torch.bfloat16, seed=9)
    eager = fused_attn.flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=128, max_seqlen_k=200, causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fused_attn.flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=128, max_seqlen_k=200, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_attn.flash_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=128, max_seqlen_k=200, causal=True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- KV cache

def _kv_case(b, hq, hk, d, lens, s_max, page_size, dtype, seed, sq):
    from test_kvcache import make_cache

    kc, vc, bt, k_full, v_full = make_cache(b, hk, d, lens, s_max, page_size=page_size, dtype=dtype, seed=seed)
    q = torch.randn(b, hq, sq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    dev = [t.to(DEV) if t is not None else None for t in (q, kc, vc, bt, sl)]
    return dev, (q, k_full, v_full)


def _kv_reference(q, k_full, v_full, lens, **kw):
    """float64 reference and the same-dtype one (STYLE.md rule), per sequence over its first lens[b] keys."""
    from test_kvcache import reference_over

    ref = reference_over(q.double(), k_full.double(), v_full.double(), lens, **kw)
    kw32 = dict(kw)
    base = []
    for b, n in enumerate(lens):
        if "alibi_slopes" in kw32 and kw32["alibi_slopes"].dim() == 2:
            kw32b = dict(kw32, alibi_slopes=kw32["alibi_slopes"][b:b + 1])
        else:
            kw32b = kw32
        base.append(fused_attn.reference.attention(q[b:b + 1], k_full[b:b + 1, :, :n], v_full[b:b + 1, :, :n],
                                                   return_lse=True, **kw32b))
    return ref, (torch.cat([o for o, _ in base]), torch.cat([l for _, l in base]))


KV_PATTERNS = [dict(), dict(causal=True), dict(causal=True, window=(50, 0)), dict(softcap=3.0), dict(alibi=True)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=["bf16", "fp16", "fp32", "fp64"])
@pytest.mark.parametrize("page_size", [None, 16, 64, 256])
@pytest.mark.parametrize("sq", [1, 4])
@pytest.mark.parametrize("kw", KV_PATTERNS, ids=["dense", "causal", "window", "softcap", "alibi"])
@pytest.mark.parametrize("num_splits", [0, 1, 3])
def test_kvcache(dtype, page_size, sq, kw, num_splits):
    b, hq, hk, d, s_max = 3, 8, 2, 128 if dtype in (torch.bfloat16, torch.float16) else 72, 768
    lens = [0, 97, 700]
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = torch.rand(b, hq, generator=torch.Generator().manual_seed(1))
    (q, kc, vc, bt, sl), (qh, k_full, v_full) = _kv_case(b, hq, hk, d, lens, s_max, page_size, dtype, 7, sq)
    dev_kw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out, lse = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, return_lse=True, num_splits=num_splits,
                                        **dev_kw)
    (ref_o, ref_l), (base_o, base_l) = _kv_reference(qh, k_full, v_full, lens, **kw)
    from conftest import assert_rule

    assert_rule("out", out.cpu(), ref_o, base_o, dtype)
    assert_rule("lse", lse.cpu(), ref_l, base_l, dtype)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_kvcache_append_then_attend(page_size, dtype):
    """Appending k_new / v_new on the GPU then attending equals the reference twin on the CPU, cache
    included."""
    b, hq, hk, d, s_max, s_new = 2, 8, 2, 64, 256, 3
    lens = [10, 200]
    (q, kc, vc, bt, sl), _ = _kv_case(b, hq, hk, d, lens, s_max, page_size, dtype, 9, 4)
    g = torch.Generator().manual_seed(4)
    kn = torch.randn(b, hk, s_new, d, generator=g, dtype=torch.float64).to(dtype)
    vn = torch.randn(b, hk, s_new, d, generator=g, dtype=torch.float64).to(dtype)
    kc_cpu, vc_cpu = kc.cpu(), vc.cpu()
    out = fused_attn.flash_kvcache(q, kc, vc, sl, k_new=kn.to(DEV), v_new=vn.to(DEV), block_table=bt, causal=True)
    ref = fused_attn.reference.flash_kvcache(q.cpu(), kc_cpu, vc_cpu, sl.cpu(), k_new=kn, v_new=vn,
                                             block_table=None if bt is None else bt.cpu(), causal=True)
    assert torch.equal(kc.cpu(), kc_cpu) and torch.equal(vc.cpu(), vc_cpu)
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(out.cpu().double(), ref.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kvcache_splits_repeatable(dtype):
    """A fixed split count is bitwise repeatable (the combine sums parts in split order); split counts agree."""
    (q, kc, vc, bt, sl), _ = _kv_case(1, 32, 8, 128, [5000], 5120, 64, dtype, 5, 1)
    outs = {}
    for ns in (0, 1, 4, 64):
        first = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, num_splits=ns)
        for _ in range(2):
            assert torch.equal(first, fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt, num_splits=ns))
        outs[ns] = first.float()
    for ns in (0, 4, 64):
        torch.testing.assert_close(outs[ns], outs[1], atol=2e-2, rtol=2e-2)


def test_kvcache_op_captures_in_a_cuda_graph():
    """The op itself does no host synchronisation (the Python wrapper's value checks do, once): it can be
    captured and replayed with new lengths."""
    (q, kc, vc, bt, sl), _ = _kv_case(2, 8, 2, 64, [100, 300], 320, 16, torch.bfloat16, 3, 1)
    scale = 64 ** -0.5

    def step():
        return torch.ops.fused_attn.kvcache_fwd(q, kc, vc, sl, None, None, bt, scale, -1, -1, 0.0, None, 0)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    sl.copy_(torch.tensor([37, 301], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    eager = fused_attn.flash_kvcache(q, kc, vc, sl, block_table=bt)
    torch.testing.assert_close(out, eager)


def test_kvcache_misaligned_cache_rows_raise():
    (q, kc, vc, bt, sl), _ = _kv_case(1, 4, 2, 64, [40], 64, None, torch.float16, 2, 1)
    big = torch.zeros(1, 2, 64, 72, dtype=torch.float16, device=DEV)
    k_odd = big[..., 4:68]  # row start 8 bytes off a 16-byte boundary
    with pytest.raises(ValueError, match=r"k_cache: the CUDA kernels read its rows in 16-byte pieces"):
        fused_attn.flash_kvcache(q, k_odd, vc, sl)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("force", ["1", ""], ids=["sm80", "auto"])
def test_nan_inputs_reach_their_rows(dtype, force, monkeypatch):
    """A NaN in q or k makes exactly the rows that see it NaN (out and lse), as in PyTorch and on the CPU
    (tests/test_nan.py): flash() forward (mma.sync, Hopper where present, generic fp32), its backward (NaN in the
    heads the NaN reaches, the others equal to a run without it), and flash_kvcache split across 3 parts."""
    monkeypatch.setenv("FUSED_ATTN_FORCE_SM80", force)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, s, 64, generator=g, dtype=torch.float64) for h, s in ((4, 70), (2, 150), (2, 150)))
    q[0, 1, 5, 3] = float("nan")
    k[1, 0, 100, 7] = float("nan")
    for kw in (dict(), dict(causal=True), dict(softcap=30.0), dict(alibi_slopes=torch.tensor([0.1, 0.2, 0.05, 0.3]))):
        ref, ref_lse = fused_attn.reference.attention(q, k, v, return_lse=True, **kw)
        dev_kw = {a: (b.to(DEV) if torch.is_tensor(b) else b) for a, b in kw.items()}
        out, lse = fused_attn.flash(q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), return_lse=True, **dev_kw)
        assert torch.equal(out.isnan().cpu(), ref.isnan()), kw
        assert torch.equal(lse.isnan().cpu(), ref_lse.isnan()), kw
    grads = []
    for qq in (q, torch.nan_to_num(q, nan=0.5)):
        t = [x.to(DEV, dtype).requires_grad_(True) for x in (qq, k.nan_to_num(nan=0.5), v)]
        fused_attn.flash(*t, causal=True).float().sum().backward()
        grads.append([x.grad.cpu() for x in t])
    (dq, dk, dv), (dq0, dk0, dv0) = grads
    assert dq[0, 1].isnan().any() and dk[0, 0].isnan().any() and dv[0, 0].isnan().any()
    for a, b in ((dq[1], dq0[1]), (dk[1], dk0[1]), (dv[1], dv0[1]), (dq[0, 2:], dq0[0, 2:]), (dk[0, 1], dk0[0, 1]),
                 (dv[0, 1], dv0[0, 1])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)  # dQ by atomics: not bit for bit
    # decode: one query row per head against the cache, split in 3
    qd = q[:, :, -1:].clone()
    qd[0, 1, 0, 3] = float("nan")
    ref, ref_lse = fused_attn.reference.attention(qd, k, v, return_lse=True)
    out, lse = fused_attn.flash_kvcache(qd.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype), 150, return_lse=True,
                                        num_splits=3)
    assert torch.equal(out.isnan().cpu(), ref.isnan()) and torch.equal(lse.isnan().cpu(), ref_lse.isnan())
