#!/usr/bin/env python
"""Plots of a bench/bench.py results.json (matplotlib, Agg backend).

    python bench/plot.py bench/results/<machine>      # rewrites the PNGs beside results.json

tflops_<group>.png      TFLOP/s (visible pairs only) vs sequence length, one panel per pattern and pass
window_time.png         sliding-window time vs sequence length (log-log, with a linear reference)
sparse_speedup.png      block-sparse speedup over the same call dense vs layout density (ideal 1/density)
peers_speedup.png       fused_attn's speed-up over each peer (peer ms / fused_attn ms), case by case
A run written with --tag T prefixes every name with T_.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("fwd", "fwd+bwd")
STYLE = {"fused_attn": dict(color="C3", linewidth=2.4, marker="o", zorder=5),
         "fused_attn-dense": dict(color="C3", linestyle="--", marker="x"),
         "fused_attn-sm80": dict(color="C3", linestyle=":", marker="^"),  # the mma.sync family on Hopper
         "sdpa+fused_attn": dict(color="C2", linestyle="-.", marker="s"),
         "sdpa": dict(color="C0", marker="."), "sdpa-flash": dict(color="C1", marker="."),
         "sdpa-cudnn": dict(color="C8", marker="."), "sdpa-efficient": dict(color="C7", marker="."),
         "flex": dict(color="C4", marker="."), "fa4": dict(color="C5", marker=".")}


def _ok(rows):
    return [r for r in rows if r.get("ms") is not None]


def _subtitle(doc, rows):
    r = rows[0]
    dtypes = ",".join(sorted({x["dtype"] for x in rows}))
    return f"{doc['machine']} | torch {doc['torch']} | {dtypes} | H{r['heads']} D{r['head_dim']}"


def _series(rows, x_key):
    by_impl = defaultdict(list)
    for r in rows:
        by_impl[r["impl"]].append((r[x_key], r))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in by_impl.items()}


def _batches(rows):
    """'B=..' note for the x axis: the dense CUDA sweep keeps B*S fixed."""
    bs = sorted({(r["seqlen_q"], r["batch"]) for r in rows})
    if len({b for _, b in bs}) == 1:
        return f"B={bs[0][1]}"
    return f"B*S={bs[0][0] * bs[0][1]}" if len({s * b for s, b in bs}) == 1 else "B varies"


def plot_tflops(doc, rows, group, out_dir, prefix=""):
    rows = [r for r in _ok(rows) if r["group"] == group]
    if not rows or len({r["seqlen_q"] for r in rows}) < 2:
        return None
    patterns = sorted({r["pattern"] for r in rows}, key=["dense", "causal", "window", "sparse"].index)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(patterns), len(modes), figsize=(6.2 * len(modes), 4.2 * len(patterns)),
                             squeeze=False)
    for pi, pattern in enumerate(patterns):
        for mi, mode in enumerate(modes):
            ax = axes[pi][mi]
            sel = [r for r in rows if r["pattern"] == pattern and r["mode"] == mode]
            for impl, pts in _series(sel, "seqlen_q").items():
                ax.plot([x for x, _ in pts], [r["tflops"] for _, r in pts], label=impl,
                        **STYLE.get(impl, dict(marker=".")))
            ax.set_xscale("log", base=2)
            extra = ""
            if sel and sel[0]["window"]:
                extra = f" left={sel[0]['window'][0]}"
            if sel and sel[0]["layout_density"] is not None:
                extra = f" block={sel[0]['block'][0]} density~{sel[0]['layout_density']:.2f}"
            ax.set_title(f"{pattern}{extra}, {mode}")
            ax.set_xlabel(f"sequence length S ({_batches(sel) if sel else ''})")
            ax.set_ylabel("TFLOP/s (visible pairs)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"{group}: TFLOP/s vs S\n{_subtitle(doc, rows)}")
    fig.tight_layout()
    path = Path(out_dir) / f"{prefix}tflops_{group}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_window_time(doc, rows, out_dir, prefix=""):
    rows = [r for r in _ok(rows) if r["group"] == "window"]
    if not rows:
        return None
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.4), squeeze=False)
    for mi, mode in enumerate(modes):
        ax = axes[0][mi]
        sel = [r for r in rows if r["mode"] == mode]
        series = _series(sel, "seqlen_q")
        for impl, pts in series.items():
            ax.plot([x for x, _ in pts], [r["ms"] for _, r in pts], label=impl,
                    **STYLE.get(impl, dict(marker=".")))
        ref = series.get("fused_attn")
        if ref:
            s0, r0 = ref[0]
            xs = [x for x, _ in ref]
            ax.plot(xs, [r0["ms"] * x / s0 for x in xs], color="gray", linestyle=":", label="linear in S")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"sliding window left={sel[0]['window'][0]}, causal, {mode}")
        ax.set_xlabel(f"sequence length S ({_batches(sel)})")
        ax.set_ylabel("time (ms, median)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"window: time vs S\n{_subtitle(doc, rows)}")
    fig.tight_layout()
    path = Path(out_dir) / f"{prefix}window_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sparse_speedup(doc, rows, out_dir, prefix=""):
    rows = [r for r in _ok(rows) if r["group"] == "sparse"]
    cases = defaultdict(dict)  # (mode, S, B, density) -> impl -> row
    for r in rows:
        cases[(r["mode"], r["seqlen_q"], r["batch"], r["layout_density"])][r["impl"]] = r
    pts = defaultdict(list)
    for (mode, s, b, d), impls in cases.items():
        if "fused_attn" in impls and "fused_attn-dense" in impls:
            pts[(mode, s, b)].append((d, impls["fused_attn-dense"]["ms"] / impls["fused_attn"]["ms"]))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for (mode, s, b), p in sorted(pts.items()):
        p.sort()
        ax.plot([d for d, _ in p], [x for _, x in p], marker="o", label=f"{mode}, B{b} S{s}")
    ds = sorted({d for p in pts.values() for d, _ in p})
    lo, hi = min(ds) * 0.8, min(1.0, max(ds) * 1.25)
    grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    ax.plot(grid, [1 / d for d in grid], color="gray", linestyle=":", label="ideal 1/density")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    blk = rows[0]["block"]
    ax.set_xlabel(f"layout density (block {blk[0]}x{blk[1]})")
    ax.set_ylabel("speedup: dense ms / block-sparse ms")
    ax.set_title(f"block-sparse vs the same call dense\n{_subtitle(doc, rows)}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / f"{prefix}sparse_speedup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _case_label(r):
    label = f"{r['pattern']} {r['mode']}\nS{r['seqlen_q']}"
    if r.get("window"):
        label += f" w{r['window'][0]}"
    if r.get("layout_density") is not None:
        label += f" d{r['layout_density']:.2f}"
    return label


def plot_peers_speedup(doc, rows, out_dir, prefix=""):
    """Bars: fused_attn's speed-up over each peer (peer ms / fused_attn ms) in every case that has peers."""
    cases = defaultdict(dict)
    for r in _ok(rows):
        cases[(r["group"], r["pattern"], r["mode"], r["seqlen_q"], r["layout_density"])][r["impl"]] = r
    peers = sorted({i for c in cases.values() for i in c if i not in ("fused_attn", "fused_attn-dense")})
    cases = {k: v for k, v in cases.items() if "fused_attn" in v and any(p in v for p in peers)}
    if not cases or not peers:
        return None
    keys = sorted(cases, key=lambda k: (["dense", "window", "sparse", "memory"].index(k[0]), k[1], k[2], k[3],
                                        k[4] or 0))
    width = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.75 * len(keys) + 2), 4.8))
    for pi, peer in enumerate(peers):
        xs, ys = [], []
        for ci, k in enumerate(keys):
            r = cases[k].get(peer)
            if r is not None:
                xs.append(ci + (pi - (len(peers) - 1) / 2) * width)
                ys.append(r["ms"] / cases[k]["fused_attn"]["ms"])
        ax.bar(xs, ys, width, label=peer, color=STYLE.get(peer, {}).get("color", f"C{pi}"))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([_case_label(next(iter(cases[k].values()))) for k in keys], fontsize=7, rotation=60,
                       ha="right")
    ax.set_ylabel("speed-up of fused_attn: peer ms / fused_attn ms")
    ax.set_title(f"fused_attn vs peers (above 1: fused_attn faster)\n{_subtitle(doc, _ok(rows))}", fontsize=10)
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / f"{prefix}peers_speedup.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(doc, out_dir, prefix=""):
    """Write every plot the results allow; returns the paths written."""
    rows = doc["results"]
    paths = [plot_tflops(doc, rows, g, out_dir, prefix) for g in ("dense", "window", "sparse")]
    paths += [plot_window_time(doc, rows, out_dir, prefix), plot_sparse_speedup(doc, rows, out_dir, prefix),
              plot_peers_speedup(doc, rows, out_dir, prefix)]
    return [p for p in paths if p is not None]


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python bench/plot.py <results folder or results[-<tag>].json>")
    path = Path(args[0])
    if path.is_dir():
        path = path / "results.json"
    doc = json.loads(path.read_text())
    tag = path.stem[len("results-"):] if path.stem.startswith("results-") else ""
    for p in make_plots(doc, path.parent, prefix=f"{tag}_" if tag else ""):
        print(p)


if __name__ == "__main__":
    main()
