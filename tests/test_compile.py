"""torch.library.opcheck on the ops, torch.compile(fullgraph=True) through flash(), and a training loop."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from conftest import HAS_CUDA, make_qkv

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def op_cases(device):
    dt = torch.float32
    q, k, v = make_qkv(1, 4, 2, 37, 45, 16, dtype=dt, device=device, requires_grad=True)
    lay = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(0)) < 0.6
    bm = fused_attn.block_mask(lay.to(device), 16)
    sparse, shape = fused_attn._ops.sparse_args(bm, q)
    yield (q, k, v, 0.25, -1, -1, [], [])
    yield (q, k, v, 0.25, 8, 0, [], [])
    yield (q, k, v, 0.25, -1, -1, sparse, shape)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in op_cases(device):
        torch.library.opcheck(torch.ops.fused_attn.fwd, args)
        q, k, v = args[:3]
        out, lse = torch.ops.fused_attn.fwd(*args)
        dout = torch.randn_like(out)
        bargs = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, *args[3:], False)
        torch.library.opcheck(torch.ops.fused_attn.bwd, bargs)


class Block(torch.nn.Module):
    def __init__(self, dim=32, heads=4, window=None, bm=None):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.heads, self.window, self.bm = heads, window, bm

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = fused_attn.flash(q, k, v, causal=True, window=self.window, block_mask=self.bm)
        return self.proj(y.transpose(1, 2).reshape(b, s, c))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", ["window", "sparse"])
def test_compile_fullgraph(device, pattern):
    torch.manual_seed(0)
    s = 64
    bm = None
    if pattern == "sparse":
        bm = fused_attn.block_mask((torch.rand(4, 4, 4) < 0.7).to(device), 16)
    m = Block(window=(16, 0) if pattern == "window" else None, bm=bm).to(device)
    x = torch.randn(2, s, 32, device=device, requires_grad=True)
    eager = m(x)
    eager.sum().backward()
    g_eager = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(x.grad, g_eager)


def test_training_loop_learns():
    # A tiny model must fit a fixed batch through flash's gradients: the loss falls by half.
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(16, 32), Block(window=(8, 0)), torch.nn.Linear(32, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 16, (4, 48))
    y = torch.roll(x, 1, dims=1)  # predict the previous token: needs attention to work
    losses = []
    for _ in range(120):
        loss = torch.nn.functional.cross_entropy(m(x).reshape(-1, 16), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::20]
