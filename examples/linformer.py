#!/usr/bin/env python
"""Linformer-style attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity") built
from fused_attn.flash: keys and values are projected along the sequence to k_proj << S rows, and exact
softmax attention runs over those,

    out = softmax(q (E k)^T * scale) (F v),    E, F: (k_proj, S)

which costs O(S * k_proj * D) instead of O(S^2 * D). Non-causal only (a projection along the sequence mixes
future keys into every projected row).

    python examples/linformer.py [--seq 4096] [--k-proj 256]

prints, for random inputs, the time of full attention and of Linformer attention, and how far the Linformer
output is from full attention. bench/linear_bench.py (group `linformer`) measures the cost properly;
tests/test_linformer.py checks the function.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent


def _import_fused_attn():
    try:
        import fused_attn  # an installed build first
    except ImportError:
        sys.path.insert(0, str(HERE.parent))  # then the in-place build of this checkout
        import fused_attn
    return fused_attn


fused_attn = _import_fused_attn()


def linformer_attention(q, k, v, e, f, *, scale=None):
    """softmax(q (e k)^T * scale) (f v) through fused_attn.flash.

    q: (B, H, S, D); k, v: (B, H, Sk, D); e, f: (k_proj, Sk) projections along the key sequence (shared by
    batch and heads), in q's dtype and device. Returns (B, H, S, D). Differentiable in all five.
    """
    for name, p in (("e", e), ("f", f)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(p).__name__}")
        if p.dim() != 2 or not isinstance(k, torch.Tensor) or k.dim() != 4 or p.shape[1] != k.shape[2]:
            got = tuple(p.shape)
            want = k.shape[2] if isinstance(k, torch.Tensor) and k.dim() == 4 else "Sk"
            raise ValueError(f"{name}: expected a (k_proj, Sk) projection with Sk = {want} (k.shape[2]), got shape {got}")
        if p.shape[0] == 0:
            raise ValueError(f"{name}: expected k_proj >= 1 rows, got shape {tuple(p.shape)}")
        if p.dtype != k.dtype or p.device != k.device:
            raise TypeError(f"{name}: expected k's dtype and device ({k.dtype}, {k.device}), got ({p.dtype}, {p.device})")
    kp = torch.matmul(e, k)  # (k_proj, Sk) @ (B, H, Sk, D) -> (B, H, k_proj, D)
    vp = torch.matmul(f, v)
    return fused_attn.flash(q, kp, vp, scale=scale)


class LinformerSelfAttention(nn.Module):
    """Multi-head self-attention over sequences of exactly `seq_len` tokens with learned projections E, F
    (shared by heads and batch, the paper's 'layerwise-shared' variant is E = F)."""

    def __init__(self, d_model: int, n_heads: int, seq_len: int, k_proj: int, *, share_ef: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        self.n_heads, self.seq_len = n_heads, seq_len
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.e = nn.Parameter(torch.randn(k_proj, seq_len) / seq_len ** 0.5)
        self.f = self.e if share_ef else nn.Parameter(torch.randn(k_proj, seq_len) / seq_len ** 0.5)

    def forward(self, x):
        b, t, c = x.shape
        if t != self.seq_len:
            raise ValueError(f"x: expected {self.seq_len} tokens (the projections' length), got {t}")
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        y = linformer_attention(q, k, v, self.e, self.f)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


def _cli():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--k-proj", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, a.heads, a.seq, a.head_dim, generator=g) for _ in range(3))
    e = torch.randn(a.k_proj, a.seq, generator=g) / a.seq ** 0.5  # a Johnson-Lindenstrauss projection
    for name, fn in (("full", lambda: fused_attn.flash(q, k, v)),
                     ("linformer", lambda: linformer_attention(q, k, v, e, e))):
        fn()
        t0 = time.perf_counter()
        out = fn()
        print(f"{name:10s} {1e3 * (time.perf_counter() - t0):8.1f} ms")
        if name == "full":
            full = out
    err = (out - full).norm() / full.norm()
    print(f"relative error of Linformer against full attention (random inputs, random projection): {err:.3f}")


if __name__ == "__main__":
    _cli()
