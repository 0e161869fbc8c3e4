#!/usr/bin/env python
"""Train examples/train_tiny.py's model three times, identical but for the attention (causal softmax,
causal sliding window, causal linear), for the same steps, seed and batches, and plot the loss curves.

    python examples/train_compare.py [--steps 150] [--batch-size 16] [--out bench/results/<machine>]

Writes linear_train_loss.json (per-step training losses, held-out loss at the end, wall time per run) and
linear_train_loss.png into --out.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load_train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", HERE / "train_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tt = _load_train_tiny()


@torch.no_grad()
def heldout_loss(model, seq_len: int, batches: int = 8, batch_size: int = 16) -> float:
    """Mean cross-entropy on fixed windows of the last 5% of the corpus (the split main() does not train on)."""
    text = tt.load_text()
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    tokens = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    val = tokens[int(0.95 * len(tokens)):]
    g = torch.Generator().manual_seed(1234)
    model.eval()
    total = 0.0
    for _ in range(batches):
        starts = torch.randint(0, len(val) - seq_len - 1, (batch_size,), generator=g).tolist()
        x = torch.stack([val[s:s + seq_len] for s in starts])
        y = torch.stack([val[s + 1:s + seq_len + 1] for s in starts])
        logits = model(x)
        total += float(F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1)))
    model.train()
    return total / batches


def smooth(xs, k=15):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 150 steps of 16 x 128 characters: a few minutes of CPU for the three runs on 2 cores.
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out_dir = a.out or REPO / "bench" / "results" / f"cpu-{cores}cores"
    vocab = len(set(tt.load_text()))
    runs = {}
    for attention in tt.ATTENTIONS:
        torch.manual_seed(a.seed)
        model = tt.TinyLM(vocab, window=a.window, max_len=a.seq_len, attention=attention)
        t0 = time.time()
        losses = tt.main(a.steps, batch_size=a.batch_size, seq_len=a.seq_len, window=a.window, seed=a.seed,
                         device="cpu", log_every=0, model=model)
        wall = time.time() - t0
        held = heldout_loss(model, a.seq_len)
        k = max(1, min(20, len(losses) // 10))
        runs[attention] = dict(losses=losses, heldout_loss=held, wall_s=wall, final_train_loss=sum(losses[-k:]) / k)
        print(f"{attention:8s} train loss (mean of last {k}) {runs[attention]['final_train_loss']:.4f}  "
              f"held-out {held:.4f}  {wall:.1f} s", flush=True)
    doc = dict(machine=out_dir.name, torch=torch.__version__, date=datetime.date.today().isoformat(),
               config=dict(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, window=a.window, seed=a.seed,
                           d_model=128, n_heads=4, n_layers=2, optimizer="AdamW lr 3e-3, cosine, warmup"),
               uniform_loss=math.log(vocab), runs=runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "linear_train_loss.json").write_text(json.dumps(doc, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    labels = {"softmax": "softmax (causal)", "window": f"sliding window ({a.window})",
              "linear": "linear (elu+1, causal)"}
    for name, r in runs.items():
        ax.plot(smooth(r["losses"]), label=f"{labels[name]}: held-out {r['heldout_loss']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of 15 steps)")
    ax.set_title(f"examples/train_tiny.py, {a.steps} steps, batch {a.batch_size} x {a.seq_len} chars, "
                 f"{out_dir.name}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "linear_train_loss.png", dpi=110)


if __name__ == "__main__":
    main()
