#!/usr/bin/env python
"""A tiny character-level transformer whose attention is one of fused_attn's: causal softmax attention,
causal sliding-window attention (the default), or causal linear attention.

    python examples/train_tiny.py [--steps 300] [--attention softmax|window|linear] [--window 32]
                                  [--device cpu|cuda]

Trains on examples/data/tiny_corpus.txt (generated procedurally by examples/data/make_corpus.py; regenerated
in memory when the file is missing) with AdamW and prints the training loss and, at the end, a short
sample. The attention of every layer is
  softmax: fused_attn.flash(q, k, v, causal=True)                       every earlier character
  window:  fused_attn.flash(q, k, v, causal=True, window=(window, 0))   itself and `window` before it
  linear:  fused_attn.linear_attention(q, k, v, causal=True)            elu(x) + 1 features, O(T) per layer
examples/train_compare.py trains the three for the same steps and plots their loss curves.

`main(steps=..., ...)` returns the list of per-step losses (tests/test_example.py smoke-tests it).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "tiny_corpus.txt"


def _import_fused_attn():
    try:
        import fused_attn  # an installed build first
    except ImportError:
        sys.path.insert(0, str(HERE.parent))  # then the in-place build of this checkout
        import fused_attn
    return fused_attn


fused_attn = _import_fused_attn()


def load_text(path: Optional[Path] = None) -> str:
    path = Path(path) if path is not None else DATA
    if path.exists():
        return path.read_text(encoding="utf-8")
    sys.path.insert(0, str(HERE / "data"))
    from make_corpus import generate

    return generate()


ATTENTIONS = ("softmax", "window", "linear")


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, window: int, attention: str = "window"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads: expected a divisor of d_model={d_model}, got {n_heads}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
        self.n_heads, self.window, self.attention = n_heads, window, attention
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, t, c = x.shape
        # (B, T, 3, H, Dh) -> three (B, H, T, Dh) views; flash takes any strides with unit stride in Dh.
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.attention == "linear":
            y = fused_attn.linear_attention(q, k, v, causal=True)
        elif self.attention == "softmax":
            y = fused_attn.flash(q, k, v, causal=True)
        else:
            y = fused_attn.flash(q, k, v, causal=True, window=(self.window, 0))
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


CausalWindowAttention = CausalSelfAttention  # the name before the attention choice


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, window: int, attention: str = "window"):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, window, attention)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Character-level decoder: token + learned position embeddings, pre-norm blocks, tied output head."""

    def __init__(self, vocab: int, *, d_model: int = 128, n_heads: int = 4, n_layers: int = 2,
                 window: int = 32, max_len: int = 256, attention: str = "window"):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, window, attention) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


@torch.no_grad()
def sample(model, itos, stoi, prompt="Story", n=200, device="cpu", generator=None):
    model.eval()
    idx = torch.tensor([[stoi[c] for c in prompt if c in stoi]], device=device)
    for _ in range(n):
        logits = model(idx[:, -model.max_len:])[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        idx = torch.cat([idx, nxt], 1)
    model.train()
    return "".join(itos[i] for i in idx[0].tolist())


def main(steps: int = 300, *, batch_size: int = 32, seq_len: int = 128, window: int = 32, n_layers: int = 2,
         d_model: int = 128, n_heads: int = 4, lr: float = 3e-3, seed: int = 0, device: Optional[str] = None,
         log_every: int = 25, data: Optional[Path] = None, model: Optional[TinyLM] = None,
         sample_chars: int = 0, attention: str = "window") -> list[float]:
    """Train for `steps` AdamW steps and return the per-step training losses.

    Pass `model` to train an existing TinyLM (its vocabulary must match the corpus); the gradients of the
    last step are left on its parameters.
    """
    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    text = load_text(data)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = {i: c for c, i in stoi.items()}
    tokens = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.95 * len(tokens))
    train = tokens[:split]

    if model is None:
        model = TinyLM(len(chars), d_model=d_model, n_heads=n_heads, n_layers=n_layers, window=window,
                       max_len=seq_len, attention=attention)
    elif model.head.weight.shape[0] != len(chars):
        raise ValueError(f"model: expected a vocabulary of {len(chars)}, got {model.head.weight.shape[0]}")
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    # bf16 autocast on CUDA; the CPU runs in fp32.
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    gen = torch.Generator().manual_seed(seed)

    losses, t0 = [], time.time()
    for step in range(steps):
        starts = torch.randint(0, len(train) - seq_len - 1, (batch_size,), generator=gen)
        x = torch.stack([train[s:s + seq_len] for s in starts.tolist()]).to(dev)
        y = torch.stack([train[s + 1:s + seq_len + 1] for s in starts.tolist()]).to(dev)
        opt.zero_grad(set_to_none=True)
        with amp:
            logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {losses[-1]:.4f}  ({time.time() - t0:.1f}s)", flush=True)
    if sample_chars:
        print("sample:", sample(model, itos, stoi, n=sample_chars, device=dev, generator=gen))
    return losses


def _cli():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--attention", choices=ATTENTIONS, default="window",
                    help="causal softmax, causal sliding window (--window), or causal linear attention")
    ap.add_argument("--window", type=int, default=32, help="keys before each query that it may attend to")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--data", type=Path, default=None, help=f"text file (default {DATA})")
    ap.add_argument("--sample", type=int, default=200, help="characters to sample at the end (0: none)")
    a = ap.parse_args()
    losses = main(a.steps, batch_size=a.batch_size, seq_len=a.seq_len, window=a.window, n_layers=a.layers,
                  lr=a.lr, seed=a.seed, device=a.device, data=a.data, sample_chars=a.sample, attention=a.attention)
    k = max(1, min(10, len(losses) // 10))
    vocab = len(set(load_text(a.data)))
    print(f"loss: first {sum(losses[:k]) / k:.4f} -> last {sum(losses[-k:]) / k:.4f} "
          f"(mean of {k} steps; a uniform guess over {vocab} characters is {math.log(vocab):.2f})")


if __name__ == "__main__":
    _cli()
