"""Markdown tables of a benchmark run, for the README: python bench/report.py bench/results/<machine>/results.json

One row per case: fused_attn's median time and TFLOP/s (visible pairs only), and each peer's time with the
speed-up of fused_attn over it (peer ms / fused_attn ms: above 1, fused_attn is faster)."""
from __future__ import annotations

import json
import sys
from collections import OrderedDict


def case_label(r: dict) -> str:
    s = f"{r['pattern']} {r['mode']} B{r['batch']} H{r['heads']} S{r['seqlen_q']} D{r['head_dim']}"
    if r.get("window"):
        s += f" window={tuple(r['window'])}"
    if r.get("block"):
        s += f" block={r['block']} density={r['layout_density']:.3f}"
    return s


def main(path: str) -> None:
    data = json.load(open(path))
    cases: "OrderedDict[str, dict]" = OrderedDict()
    peers: list[str] = []
    for r in data["results"]:
        if r["status"] != "ok":
            continue
        cases.setdefault(case_label(r), {})[r["impl"]] = r
        if r["impl"] != "fused_attn" and r["impl"] not in peers:
            peers.append(r["impl"])
    print(f"Machine `{data['machine']}` ({data['device']}, {data.get('cpu_threads')} threads), "
          f"torch {data['torch']}, {', '.join(data['dtypes'])}, {data['date'][:10]}; "
          "median of interleaved repeats after warm-up.\n")
    print("| case | fused_attn ms | TFLOP/s | " + " | ".join(f"{p} ms (speed-up)" for p in peers) + " |")
    print("|---|---:|---:|" + "---:|" * len(peers))
    for label, impls in cases.items():
        mine = impls.get("fused_attn")
        if mine is None:
            continue
        cells = []
        for p in peers:
            r = impls.get(p)
            cells.append(f"{r['ms']:.1f} ({r['ms'] / mine['ms']:.2f}x)" if r else "-")
        print(f"| {label} | {mine['ms']:.1f} | {mine['tflops']:.3f} | " + " | ".join(cells) + " |")
    setup = [(label, impls) for label, impls in cases.items()
             if any(r.get("setup_ms") is not None and r["setup_ms"] > 10 * r["ms"] + 1000 for r in impls.values())]
    if setup:
        # Kept apart from the timed reps: first call + warm-up, i.e. torch.compile's compile time for flex.
        names = [n for n in ["fused_attn"] + peers if any(n in impls for _, impls in setup)]
        print("\nSet-up per case (first call + warm-up steps, s; compile time for compiled peers):\n")
        print("| case | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for label, impls in setup:
            cells = [f"{impls[n]['setup_ms'] / 1e3:.1f}" if n in impls and impls[n].get("setup_ms") else "-"
                     for n in names]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu-2cores/results.json")
