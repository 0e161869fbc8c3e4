"""fused_attn.linear_attention (the chunked C++ kernels) against the float64 reference under the STYLE.md
rule, for out, the returned state and every gradient; state continuation; fp64 gradcheck on the kernel;
opcheck and torch.compile."""
from __future__ import annotations

import contextlib

import pytest
import torch

import fused_attn
from fused_attn import reference
from conftest import assert_rule, make_qkv

CHUNK = 64  # csrc/cpu/linear.cpp's kChunk: lengths below straddle it


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def inputs(b, h, s, dk, dv, *, dtype, feature_map, normalize, seed=0, sk=None, layout="bhsd"):
    q, k, _ = make_qkv(b, h, h, s, sk if sk is not None else s, dk, dtype=torch.float64, seed=seed, layout=layout)
    v = make_qkv(b, h, h, 1, sk if sk is not None else s, dv, dtype=torch.float64, seed=seed + 1, layout=layout)[2]
    if feature_map == "identity" and normalize:
        # Identity features are meant for positive features (FAVOR+); mixed signs can cancel a denominator
        # to ~0, where no precision gives a meaningful answer.
        q, k = q.abs() + 0.1, k.abs() + 0.1
    return q.to(dtype), k.to(dtype), v.to(dtype)


def run(fn, q, k, v, dtype, dout, dstate, state=None, **kw):
    """(out, S, z, dq, dk, dv[, dS0, dz0]) of fn on copies of the inputs in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    st = None
    if state is not None:
        st = [t.detach().to(fused_attn._linear_args.state_dtype(dtype)).requires_grad_(True) for t in state]
    out, (s, z) = fn(*leaves, initial_state=st, return_state=True, **kw)
    loss = (out.double() * dout).sum() + (s.double() * dstate[0]).sum() + (z.double() * dstate[1]).sum()
    grads = torch.autograd.grad(loss, leaves + (st or []))
    return [out.detach(), s.detach(), z.detach()] + list(grads)


NAMES = ("out", "S", "z", "dq", "dk", "dv", "dS0", "dz0")


def check(q, k, v, *, state=None, seed=1, **kw):
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed)
    b, h, sq, _ = q.shape
    dk, dv = q.shape[3], v.shape[3]
    dout = torch.randn(b, h, sq, dv, generator=g, dtype=torch.float64)
    dstate = (torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64),
              torch.randn(b, h, dk, generator=g, dtype=torch.float64))
    mine = run(fused_attn.linear_attention, q, k, v, dtype, dout, dstate, state, **kw)
    ref = run(reference.linear_attention, q, k, v, torch.float64, dout, dstate, state, **kw)
    base = run(reference.linear_attention, q, k, v, dtype, dout, dstate, state, **kw)
    for name, a, r, bse in zip(NAMES, mine, ref, base):
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert a.dtype == bse.dtype, f"{name}: dtype {a.dtype}, expected {bse.dtype}"
        assert_rule(name, a, r, bse, dtype)


# Every feature map x causal x normalize, at a length that straddles chunks, Dk != Dv, odd dims.
@pytest.mark.parametrize("feature_map", ["elu1", "relu", "identity"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_maps_and_modes_fp32(feature_map, causal, normalize):
    q, k, v = inputs(2, 3, 97, 13, 7, dtype=torch.float32, feature_map=feature_map, normalize=normalize)
    check(q, k, v, causal=causal, feature_map=feature_map, normalize=normalize, scale=0.8)


@pytest.mark.parametrize("s", [1, 2, CHUNK, CHUNK + 1, 97, 1025])
@pytest.mark.parametrize("causal", [True, False])
def test_lengths(s, causal):
    q, k, v = inputs(1, 2, s, 16, 24, dtype=torch.float32, feature_map="elu1", normalize=True, seed=s)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dk,dv", [(1, 1), (5, 3), (59, 40), (64, 64), (111, 17)])
def test_head_dims(dk, dv):
    q, k, v = inputs(1, 2, 130, dk, dv, dtype=torch.float32, feature_map="elu1", normalize=True, seed=dk)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_dtypes(dtype, causal):
    q, k, v = inputs(2, 2, 150, 16, 12, dtype=dtype, feature_map="elu1", normalize=True)
    check(q, k, v, causal=causal, scale=0.5)


@pytest.mark.parametrize("sq,sk", [(5, 200), (200, 3), (1, 1)])
def test_noncausal_cross_lengths(sq, sk):
    q, _, _ = inputs(1, 2, sq, 8, 8, dtype=torch.float32, feature_map="elu1", normalize=True)
    _, k, v = inputs(1, 2, sk, 8, 6, dtype=torch.float32, feature_map="elu1", normalize=True, seed=3)
    check(q, k, v, causal=False)


@pytest.mark.parametrize("causal", [True, False])
def test_strided_inputs(causal):
    # (B, S, H, D) storage seen as (B, H, S, D): rows are read through their strides, not copied.
    q, k, v = inputs(2, 3, 100, 8, 8, dtype=torch.float32, feature_map="relu", normalize=True, layout="bshd")
    assert not q.is_contiguous()
    check(q, k, v, causal=causal, feature_map="relu")


@pytest.mark.parametrize("normalize", [True, False])
def test_initial_state(normalize):
    q, k, v = inputs(2, 2, 150, 12, 10, dtype=torch.float32, feature_map="elu1", normalize=normalize)
    g = torch.Generator().manual_seed(9)
    state = (torch.rand(2, 2, 12, 10, generator=g, dtype=torch.float64) * 20,
             torch.rand(2, 2, 12, generator=g, dtype=torch.float64) * 20 + 5)
    check(q, k, v, state=state, causal=True, normalize=normalize)


@pytest.mark.parametrize("nthreads", [1, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_two_level_scan(nthreads, causal):
    # B * H = 1 with 4 threads splits the sequence into segments scanned in two levels; 1 thread does not.
    q, k, v = inputs(1, 1, 1025, 16, 16, dtype=torch.float32, feature_map="elu1", normalize=True)
    g = torch.Generator().manual_seed(2)
    state = None
    if causal:
        state = (torch.rand(1, 1, 16, 16, generator=g, dtype=torch.float64),
                 torch.rand(1, 1, 16, generator=g, dtype=torch.float64) + 1)
    with threads(nthreads):
        check(q, k, v, state=state, causal=causal)


def test_empty_sequence():
    q, k, v = (torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 3))
    s0, z0 = torch.rand(1, 2, 4, 3), torch.rand(1, 2, 4)
    for fn in (fused_attn.linear_attention, reference.linear_attention):
        out, (s, z) = fn(q, k, v, initial_state=(s0, z0), return_state=True)
        assert out.shape == (1, 2, 0, 3)
        torch.testing.assert_close(s, s0)
        torch.testing.assert_close(z, z0)


# ---------------------------------------------------------------------------------------------------
# The state: pieces with the state equal the whole, also through the gradients; Sq = 1 decode steps.


@pytest.mark.parametrize("pieces", [[251], [50, 1, 1, 70, 129], [64, 64, 123], [1] * 20 + [231]])
def test_pieces_with_state_equal_whole(pieces):
    q, k, v = inputs(2, 2, sum(pieces), 8, 6, dtype=torch.float64, feature_map="elu1", normalize=True)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    whole, (s, z) = fused_attn.linear_attention(*leaves, return_state=True)
    outs, st, i = [], None, 0
    for n in pieces:
        o, st = fused_attn.linear_attention(*(t[:, :, i:i + n] for t in leaves), initial_state=st,
                                            return_state=True)
        outs.append(o)
        i += n
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(st[0], s, rtol=1e-13, atol=1e-11)
    torch.testing.assert_close(st[1], z, rtol=1e-13, atol=1e-11)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(whole.shape, generator=g, dtype=torch.float64)
    ws = torch.randn(s.shape, generator=g, dtype=torch.float64)
    g_whole = torch.autograd.grad((whole * w).sum() + (s * ws).sum(), leaves)
    g_piece = torch.autograd.grad((torch.cat(outs, 2) * w).sum() + (st[0] * ws).sum(), leaves)
    for a, b in zip(g_piece, g_whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_decode_steps_equal_prefill():
    # Prefill 40 tokens, then decode 30 one token at a time (Sq = 1): the same outputs as one call.
    q, k, v = inputs(1, 4, 70, 16, 16, dtype=torch.float32, feature_map="elu1", normalize=True)
    whole = fused_attn.linear_attention(q, k, v)
    out, st = fused_attn.linear_attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], return_state=True)
    steps = [out]
    for i in range(40, 70):
        o, st = fused_attn.linear_attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], initial_state=st,
                                            return_state=True)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 2), whole, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# fp64 gradcheck on the kernel itself.

GRAD_CASES = [
    dict(causal=True, feature_map="elu1", normalize=True),
    dict(causal=True, feature_map="relu", normalize=False),
    dict(causal=True, feature_map="identity", normalize=True),
    dict(causal=False, feature_map="elu1", normalize=True),
    dict(causal=False, feature_map="identity", normalize=False),
]


@pytest.mark.parametrize("kw", GRAD_CASES, ids=lambda kw: "-".join(str(x) for x in kw.values()))
def test_gradcheck(kw):
    # 130 rows: three chunks, so the state scans (forward and reverse) are part of what is checked.
    q, k, v = inputs(1, 1, 130, 3, 2, dtype=torch.float64, feature_map=kw["feature_map"], normalize=kw["normalize"])
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_()]
    if kw["causal"]:
        g = torch.Generator().manual_seed(5)
        leaves += [torch.rand(1, 1, 3, 2, generator=g, dtype=torch.float64).requires_grad_(),
                   (torch.rand(1, 1, 3, generator=g, dtype=torch.float64) + 1).requires_grad_()]

    def fn(q, k, v, *state):
        out, (s, z) = fused_attn.linear_attention(q, k, v, scale=0.9, eps=1e-3, initial_state=state or None,
                                                  return_state=True, **kw)
        return out, s, z

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_two_level_scan():
    # Five chunks, B * H = 1, 4 threads: two segments per scan.
    q, k, v = inputs(1, 1, 260, 2, 1, dtype=torch.float64, feature_map="elu1", normalize=True)
    g = torch.Generator().manual_seed(6)
    s0 = torch.rand(1, 1, 2, 1, generator=g, dtype=torch.float64)
    z0 = torch.rand(1, 1, 2, generator=g, dtype=torch.float64) + 1
    leaves = tuple(t.requires_grad_() for t in (q, k, v, s0, z0))

    def fn(q, k, v, s0, z0):
        out, (s, z) = fused_attn.linear_attention(q, k, v, initial_state=(s0, z0), return_state=True)
        return out, s, z

    with threads(4):
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_double_backward_raises():
    q, k, v = (t.requires_grad_() for t in inputs(1, 1, 5, 2, 2, dtype=torch.float64, feature_map="elu1",
                                                  normalize=True))
    out = fused_attn.linear_attention(q, k, v)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gq.sum().backward()


# ---------------------------------------------------------------------------------------------------
# torch.library: opcheck on the ops, torch.compile(fullgraph=True) through linear_attention.


def test_opcheck():
    q, k, v = inputs(1, 2, 20, 5, 3, dtype=torch.float32, feature_map="elu1", normalize=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    s0 = torch.rand(1, 2, 5, 3, requires_grad=True)
    z0 = torch.rand(1, 2, 5, requires_grad=True)
    for args in [(q, k, v, None, None, True, "elu1", True, 1.0, 1e-6),
                 (q, k, v, s0, z0, True, "relu", False, 0.5, 1e-6),
                 (q, k, v, None, None, False, "identity", False, 1.0, 0.0)]:
        torch.library.opcheck(torch.ops.fused_attn.linear_fwd, args)
        out, den, s, z = torch.ops.fused_attn.linear_fwd(*args)
        d = lambda t: t.detach()  # noqa: E731
        bargs = (torch.randn_like(out), torch.randn_like(s), None, d(q), d(k), d(v), d(out), d(den),
                 None if args[3] is None else d(s0), None if args[4] is None else d(z0), *args[5:])
        torch.library.opcheck(torch.ops.fused_attn.linear_bwd, bargs)


class LinearBlock(torch.nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.heads = heads

    def forward(self, x, state=None):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y, st = fused_attn.linear_attention(q, k, v, initial_state=state, return_state=True)
        return y.transpose(1, 2).reshape(b, s, c), st


def test_compile_fullgraph():
    torch.manual_seed(0)
    m = LinearBlock()
    x = torch.randn(2, 80, 32, requires_grad=True)
    st = (torch.rand(2, 4, 8, 8, requires_grad=True), torch.rand(2, 4, 8, requires_grad=True))

    def loss(f):
        y, (s, z) = f(x, st)
        return y.square().sum() + s.sum() + z.sum()

    eager = loss(m)
    g_eager = torch.autograd.grad(eager, [x, *st])
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = loss(compiled)
    g_comp = torch.autograd.grad(out, [x, *st])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)
