"""The SDPA backend provider (fused_attn.integrations.sdpa) on the CPU: activated, unmodified
scaled_dot_product_attention calls run fused_attn's kernels (counted with the profiler) and match a float64
reference forward and backward; restored, PyTorch's kernels run again; unserved arguments go to PyTorch."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from conftest import assert_rule
from fused_attn.integrations import sdpa

pytestmark = pytest.mark.skipif(not sdpa.registry_available(),
                                reason=f"torch {torch.__version__} has no flash-attention provider registry")


@pytest.fixture
def active():
    torch.nn.attention.activate_flash_attention_impl("fused_attn")
    try:
        yield
    finally:
        torch.nn.attention.restore_flash_attention_impl()


def kernel_calls(fn) -> dict:
    """Runs fn and counts the fused_attn ops the dispatcher ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts = {"fwd": 0, "bwd": 0}
    for e in prof.events():
        if e.name.startswith("fused_attn::"):
            name = e.name.split("::")[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def sdpa_reference(q, k, v, *, is_causal=False, scale=None, enable_gqa=False):
    """SDPA's documented semantics written out: top-left causal mask (query i sees keys j <= i)."""
    sq, sk = q.shape[-2], k.shape[-2]
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        keep = torch.ones(sq, sk, dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def make(b, hq, hk, sq, sk, d, dtype, seed=0, layout="bhsd"):
    g = torch.Generator().manual_seed(seed)

    def one(h, s):
        if layout == "bshd":
            return torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        return torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype)

    return one(hq, sq), one(hk, sk), one(hk, sk)


def fwd_bwd(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(dout.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


CASES = [
    # (b, hq, hk, sq, sk, d, kwargs)
    (2, 4, 4, 97, 97, 40, dict(is_causal=True)),
    (1, 3, 3, 33, 70, 16, dict(is_causal=True)),          # Sq < Sk: top-left, keys past Sq unseen
    (1, 3, 3, 70, 33, 16, dict(is_causal=True)),          # Sq > Sk: top-left, every row sees key 0
    (2, 8, 2, 45, 61, 59, dict(enable_gqa=True)),
    (2, 6, 3, 50, 50, 32, dict(enable_gqa=True, is_causal=True, scale=0.3)),
    (1, 2, 2, 1, 129, 64, dict()),
    (1, 2, 2, 64, 64, 24, dict(scale=0.7)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}/{c[2]}x{c[3]}x{c[4]}x{c[5]}-{c[6]}")
def test_activated_matches_reference_and_runs_fused_attn(active, case, dtype):
    b, hq, hk, sq, sk, d, kw = case
    q, k, v = make(b, hq, hk, sq, sk, d, dtype, layout="bshd" if d == 40 else "bhsd")
    dout = torch.randn(b, hq, sq, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = {}
    calls = kernel_calls(lambda: got.setdefault("r", fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout, **kw)))
    assert calls == {"fwd": 1, "bwd": 1}, f"fused_attn kernels not run as expected: {calls}"
    ref = fwd_bwd(sdpa_reference, q.double(), k.double(), v.double(), dout, **kw)
    base = fwd_bwd(sdpa_reference, q, k, v, dout, **kw)
    for name, a, r, bse in zip(("out", "dq", "dk", "dv"), got["r"], ref, base):
        assert a.shape == r.shape and a.dtype == dtype, f"{name}: {a.shape} {a.dtype}"
        assert_rule(name, a, r, bse, dtype)


def test_registered_at_import_but_not_active():
    assert "fused_attn" in torch.nn.attention.list_flash_attention_impls()
    assert torch.nn.attention.current_flash_attention_impl() != "fused_attn"
    q, k, v = make(1, 2, 2, 16, 16, 8, torch.float32)
    assert kernel_calls(lambda: F.scaled_dot_product_attention(q, k, v)) == {"fwd": 0, "bwd": 0}


def test_restore_brings_back_pytorch_kernels():
    q, k, v = make(1, 2, 2, 37, 37, 16, torch.float32)
    dout = torch.randn(1, 2, 37, 16, dtype=torch.float64)
    before = fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout, is_causal=True)
    sdpa.activate()
    assert sdpa.is_active()
    during = fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout, is_causal=True)
    sdpa.restore()
    assert not sdpa.is_active()
    calls = kernel_calls(lambda: fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout, is_causal=True))
    assert calls == {"fwd": 0, "bwd": 0}
    after = fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout, is_causal=True)
    for a, c in zip(before, after):
        assert torch.equal(a, c)  # PyTorch's own kernel again, bit for bit
    assert any(not torch.equal(a, c) for a, c in zip(before, during)), "activation changed nothing"
    # the FlashAttention-2 ops registered for the CPU are gone again (PyTorch has no CPU kernel for them)
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    with pytest.raises(NotImplementedError):
        torch.ops.aten._flash_attention_forward(qs, ks, vs, None, None, 37, 37, 0.0, False, False)


def test_attn_mask_runs_pytorch_kernel(active):
    q, k, v = make(1, 2, 2, 20, 24, 16, torch.float32)
    mask = torch.rand(20, 24, generator=torch.Generator().manual_seed(1)) < 0.7
    mask[:, 0] = True
    dout = torch.randn(1, 2, 20, 16, dtype=torch.float64)
    res = {}
    calls = kernel_calls(lambda: res.setdefault("r", fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout,
                                                             attn_mask=mask)))
    assert calls == {"fwd": 0, "bwd": 0}
    sdpa.restore()
    plain = fwd_bwd(F.scaled_dot_product_attention, q, k, v, dout, attn_mask=mask)
    for a, c in zip(res["r"], plain):
        assert torch.equal(a, c)


def test_dropout_goes_to_pytorch_math(active):
    q, k, v = make(1, 2, 2, 16, 16, 8, torch.float32)
    assert kernel_calls(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)) == {"fwd": 0, "bwd": 0}


def test_no_grad_and_3d_inputs(active):
    q, k, v = make(1, 3, 3, 29, 31, 16, torch.float32)
    with torch.no_grad():
        calls = kernel_calls(lambda: F.scaled_dot_product_attention(q[0], k[0], v[0], is_causal=True))
        out = F.scaled_dot_product_attention(q[0], k[0], v[0], is_causal=True)
        # Served where SDPA itself would run its CPU flash kernel for this call (torch 2.11 runs its math
        # path for these 3-D inputs: then nothing is replaced, and the result must still be right).
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
            try:
                F.scaled_dot_product_attention(q[0], k[0], v[0], is_causal=True)
                flash_takes_it = True
            except RuntimeError:
                flash_takes_it = False
    if flash_takes_it:
        assert calls == {"fwd": 1, "bwd": 0}
    ref = sdpa_reference(q[0].double(), k[0].double(), v[0].double(), is_causal=True)
    assert_rule("out", out, ref, sdpa_reference(q[0], k[0], v[0], is_causal=True), torch.float32)


# The FlashAttention-2 ops behind SDPA's CUDA flash backend and varlen_attn: the provider registers them on
# the CPU too, so their adapters are tested here (bottom-right causal and (left, right) windows).


@pytest.mark.parametrize("window,causal", [((-1, -1), False), ((-1, -1), True), ((5, 0), False), ((3, 2), True)])
def test_flash_attention_forward_op(active, window, causal):
    b, hq, hk, sq, sk, d = 2, 4, 2, 19, 27, 16
    q, k, v = make(b, hq, hk, sq, sk, d, torch.float64)
    qs, ks, vs = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))  # (B, S, H, D)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        qs, ks, vs, None, None, sq, sk, 0.0, causal, False, scale=0.2,
        window_size_left=window[0], window_size_right=window[1])
    dout = torch.randn_like(out)
    out.backward(dout)
    win = None if window == (-1, -1) else window
    q2, k2, v2 = (t.detach().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = fused_attn.reference.attention(q2, k2, v2, causal=causal, window=win, scale=0.2,
                                                  return_lse=True)
    ref.backward(dout.transpose(1, 2))
    torch.testing.assert_close(out.transpose(1, 2), ref)
    torch.testing.assert_close(lse, ref_lse)
    for g, r in ((qs.grad, q2.grad), (ks.grad, k2.grad), (vs.grad, v2.grad)):
        torch.testing.assert_close(g.transpose(1, 2), r)


def test_sdpa_flash_op_top_left(active):
    q, k, v = make(1, 2, 2, 12, 30, 16, torch.float64)
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]
    torch.testing.assert_close(out, sdpa_reference(q, k, v, is_causal=True))


def test_unserved_argument_without_pytorch_kernel_names_it(active):
    q, k, v = make(1, 2, 2, 8, 8, 16, torch.float32)
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k, v))
    with pytest.raises(ValueError, match="dropout_p"):
        torch.ops.aten._flash_attention_forward(qs, ks, vs, None, None, 8, 8, 0.1, False, False)
    with pytest.raises(ValueError, match="alibi_slopes"):
        torch.ops.aten._flash_attention_forward(qs, ks, vs, None, None, 8, 8, 0.0, False, False,
                                                alibi_slopes=torch.ones(2))


def test_head_dim_without_cuda_kernel_falls_back():
    """The kernels' error for a head dim this build has no CUDA kernel for (ops.cpp checked_tc_head_dim, the
    dtype in the middle of the sentence) turns into a fallback to PyTorch's kernel; other errors stay."""

    def no_kernel(*args):
        raise ValueError("q: head dim 40 is not supported by the CUDA torch.bfloat16 kernels of this build: "
                         "expected D <= 256 with D % 8 == 0 (see fused_attn.build_info())")

    def bad_value(*args):
        raise ValueError("scale: expected a finite number")

    with pytest.raises(sdpa._Fallback):
        sdpa._kernel(no_kernel)
    with pytest.raises(ValueError, match="scale"):
        sdpa._kernel(bad_value)


def test_older_torch_gives_a_clear_message(monkeypatch):
    monkeypatch.delattr(torch.nn.attention, "register_flash_attention_impl")
    monkeypatch.delattr(torch.nn.attention, "activate_flash_attention_impl")
    assert sdpa.register() is False  # what `import fused_attn` does: no error
    with pytest.raises(sdpa.ProviderUnavailable, match=r"torch >= 2\.9.*register_flash_attention_impl"):
        sdpa.activate()


def varlen_reference(q, k, v, cu, window):
    """Per sequence: flash-attn's rule (bottom-right, (left, right) window) on float64."""
    outs = []
    c = cu.tolist()
    for a, b in zip(c[:-1], c[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        win = None if window == (-1, -1) else window
        outs.append(fused_attn.reference.attention(qs, ks, vs, window=win)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (3, 0)], ids=["dense", "causal", "window"])
def test_varlen_attn_served_on_cpu(active, window):
    """torch.nn.attention.varlen.varlen_attn (FlashAttention-2's packed op, no CPU kernel in PyTorch) runs on
    fused_attn's packed-batch kernels while the provider is active."""
    from torch.nn.attention.varlen import varlen_attn

    # GQA where this torch's varlen_attn takes enable_gqa (torch 2.11's does not: then Hk = Hq).
    gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters
    hk = 2 if gqa else 4
    lens = [5, 9, 1, 0, 13]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    t = sum(lens)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(t, h, 16, generator=g, dtype=torch.float64) for h in (4, hk, hk))
    dout = torch.randn(t, 4, 16, generator=g, dtype=torch.float64)
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
    res = {}

    def run():
        kw = dict(enable_gqa=True) if gqa else {}
        res["out"] = varlen_attn(qq, kk, vv, cu, cu, max(lens), max(lens), window_size=window, **kw)
        res["out"].backward(dout)

    calls = kernel_calls(run)
    assert calls.get("varlen_fwd") == 1 and calls.get("varlen_bwd") == 1, calls
    r = [x.clone().requires_grad_(True) for x in (q, k, v)]
    rep = [r[0], r[1].repeat_interleave(4 // hk, dim=1), r[2].repeat_interleave(4 // hk, dim=1)]
    ref = varlen_reference(*rep, cu, window)
    ref.backward(dout)
    torch.testing.assert_close(res["out"], ref)
    for got, want in zip((qq.grad, kk.grad, vv.grad), (r[0].grad, r[1].grad, r[2].grad)):
        torch.testing.assert_close(got, want)
