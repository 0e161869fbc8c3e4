#!/usr/bin/env python
"""On paper, from measured numbers: the shard length above which one ring step's transfer hides under its
compute, per interconnect, for dense and causal-zigzag ring attention, and what a sliding window changes.

    python bench/ring_scale.py [--results bench/results] [--notes notes/ring.md]

Inputs (all measured, nothing assumed but the link bandwidths, which are the parts' specifications):
  bench/results/<machine>/results.json   kernel speeds from bench/bench.py (fused_attn rows): forward
                                         TFLOP/s, and the backward's from fwd+bwd minus fwd
  bench/results/<machine>/ring.json      bench/ring_bench.py: one ring step's compute and transfer alone

Per rank and ring step, with shard length n = S/W, Hq query and Hk key/value heads, head dim D, b bytes
per element of K/V and a = 4 bytes per element of the fp32 dK/dV accumulators:
  forward   compute 4*D*n^2*Hq*f / F       transfer 2*n*Hk*D*b / BW           (f: fraction of the block seen)
  backward  compute 2.5x that at F_bwd     transfer 2*n*Hk*D*(b + a) / BW    (K/V in, accumulators on)
so the transfer hides when n >= n* = c * F * Hk / (Hq * BW) with c = b / (2 f) forward and (b + a) / (5 f)
backward. Dense steps see the whole block (f = 1); a causal zigzag step sees half of it (f = 1/2) and
every rank does the same work. B and D cancel. With a window of w keys to the left (w < n) only the w
keys a neighbour sees travel, once per layer whatever W and S, while the rank's own block (about n*w pairs)
is computed: that hides when n >= n*_window + w/2, n*_window being the dense forward formula at the window
kernel's measured speed.

Writes bench/results/<machine>/ring_scale.json and .csv; with --notes, replaces the block between
"<!-- ring_scale:begin -->" and "<!-- ring_scale:end -->" in that file with the markdown tables.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
LINKS = [  # specification bandwidth per direction, bytes/s
    ("NVLink 4 (450 GB/s)", 450e9),
    ("InfiniBand NDR (50 GB/s)", 50e9),
    ("PCIe 5 x16 (64 GB/s)", 64e9),
]
ACC_BYTES = 4
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def kernel_speeds(doc: dict) -> dict:
    """{pattern: {"fwd": TFLOP/s, "bwd": TFLOP/s, "case": str}} from fused_attn's rows at the longest
    sequence measured for each pattern."""
    rows = [r for r in doc["results"] if r["impl"] == "fused_attn" and r["status"] == "ok"]
    out = {}
    for pattern in ("dense", "causal", "window"):
        mine = [r for r in rows if r["pattern"] == pattern and r["batch"] * r["heads"] > 0]
        if not mine:
            continue
        s = max(r["seqlen_q"] for r in mine if r["mode"] == "fwd")
        fwd = next(r for r in mine if r["seqlen_q"] == s and r["mode"] == "fwd")
        both = next((r for r in mine if r["seqlen_q"] == s and r["mode"] == "fwd+bwd"), None)
        entry = dict(fwd=fwd["tflops"], dtype=fwd["dtype"],
                     case=f"{pattern} B{fwd['batch']} H{fwd['heads']} S{s} D{fwd['head_dim']} {fwd['dtype']}"
                          + (f" window={tuple(fwd['window'])}" if fwd.get("window") else ""))
        if both is not None and both["ms"] > fwd["ms"]:
            entry["bwd"] = 2.5 * fwd["flops"] / ((both["ms"] - fwd["ms"]) * 1e-3) / 1e12
        out[pattern] = entry
    return out


def threshold(tflops: float, bw: float, b: int, seen: float, backward: bool, hq_per_hk: float = 1.0) -> int:
    c = (b + ACC_BYTES) / (5.0 * seen) if backward else b / (2.0 * seen)
    return math.ceil(c * tflops * 1e12 / (hq_per_hk * bw))


def table_rows(speeds: dict) -> list[dict]:
    rows = []
    b = DTYPE_BYTES[speeds["dense"]["dtype"]]
    for pattern, seen, speed_of in (("dense", 1.0, "dense"), ("causal, zigzag", 0.5, "causal"),
                                    ("causal window w < n (+ w/2)", 1.0, "window")):
        if speed_of not in speeds:
            continue
        for pass_ in ("fwd", "bwd"):
            f = speeds[speed_of].get(pass_)
            if f is None or (speed_of == "window" and pass_ == "bwd" and "bwd" not in speeds[speed_of]):
                continue
            row = dict(pattern=pattern, pass_=pass_, tflops=f, kernel_case=speeds[speed_of]["case"],
                       dtype_bytes=b)
            for name, bw in LINKS:
                row[name] = threshold(f, bw, b, seen, pass_ == "bwd")
            # per 100 TFLOP/s of a bf16 kernel: arithmetic, for any kernel speed a reader measures
            for name, bw in LINKS:
                row[name + " per 100 TFLOP/s bf16"] = threshold(100.0, bw, 2, seen, pass_ == "bwd")
            rows.append(row)
    return rows


def measured_ring(doc: dict) -> dict:
    """The threshold on the machine the ring benchmark ran on, from its own step times: compute grows as
    n^2 and a transfer as n, so n* = n * transfer / compute."""
    n = doc["seqlen"] // doc["ranks"]
    alone = statistics.median(doc["transfer_alone_ms"])
    out = dict(n=n, transfer_ms=alone, kv_bytes=doc["kv_bytes_per_step"],
               loopback_gb_s=doc["kv_bytes_per_step"] / (alone * 1e-3) / 1e9, steps={})
    for mode, per_rank in doc["per_step"].items():
        for steps in per_rank:
            for e in steps:
                if e["step"] >= 1:
                    key = e["pass_"]
                    out["steps"].setdefault(key, []).append(e["compute_ms"])
    for key, comp in out["steps"].items():
        c = statistics.median(comp)
        out["steps"][key] = dict(compute_ms=c, n_star=math.ceil(n * alone / c))
    out["efficiency"] = {r["mode"]: r["efficiency"] for r in doc["rows"]}
    return out


def markdown(machine: str, speeds: dict, rows: list[dict], ring: dict | None) -> str:
    lines = [f"Kernel speeds measured on `{machine}` (bench/results/{machine}/results.json, fused_attn, longest S "
             "of each pattern):", ""]
    for p, e in speeds.items():
        bwd = f", backward {e['bwd']:.3f}" if "bwd" in e else ""
        lines.append(f"- {p}: forward {e['fwd']:.3f} TFLOP/s{bwd} ({e['case']})")
    lines += ["", f"Shard length n = S/W (tokens) above which one ring step's transfer hides under its compute, "
              f"at those speeds ({rows[0]['dtype_bytes']}-byte K/V, fp32 dK/dV accumulators, Hq = Hk; with GQA "
              "divide by Hq/Hk):", ""]
    names = [n for n, _ in LINKS]
    lines.append("| pattern | pass | kernel TFLOP/s | " + " | ".join(names) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(names))
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['pass_']} | {r['tflops']:.3f} | "
                     + " | ".join(str(r[n]) for n in names) + " |")
    lines += ["", "The same thresholds for a bf16 kernel (2-byte K/V) per 100 TFLOP/s it sustains (they scale "
              "linearly with the kernel's speed; no GPU speed of fused_attn is measured yet):", ""]
    lines.append("| pattern | pass | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---:|" * len(names))
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['pass_']} | "
                     + " | ".join(str(r[n + ' per 100 TFLOP/s bf16']) for n in names) + " |")
    if ring:
        lines += ["", f"Measured on `{machine}` by bench/ring_bench.py (2 ranks, loopback TCP through gloo): one "
                  f"step's K/V ({ring['kv_bytes'] / 2**20:.0f} MiB) takes {ring['transfer_ms']:.1f} ms alone "
                  f"({ring['loopback_gb_s']:.2f} GB/s); at n = {ring['n']}:"]
        for key, e in ring["steps"].items():
            lines.append(f"- {key} step compute {e['compute_ms']:.0f} ms per rank: the transfer hides for n >= "
                         f"{e['n_star']}")
        lines.append("- ring efficiency (single process / ring): "
                     + ", ".join(f"{m} {v:.3f}" for m, v in ring["efficiency"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--notes", default=None, help="a markdown file with ring_scale begin/end markers to update")
    args = ap.parse_args()
    blocks = []
    for res in sorted(Path(args.results).glob("*/results.json")):
        machine = res.parent.name
        speeds = kernel_speeds(json.loads(res.read_text()))
        if "dense" not in speeds:
            continue
        rows = table_rows(speeds)
        ring_path = res.parent / "ring.json"
        ring = measured_ring(json.loads(ring_path.read_text())) if ring_path.exists() else None
        (res.parent / "ring_scale.json").write_text(json.dumps(dict(machine=machine, links=dict(LINKS),
                                                                    speeds=speeds, rows=rows, ring=ring), indent=1))
        with open(res.parent / "ring_scale.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        blocks.append(markdown(machine, speeds, rows, ring))
    text = "\n".join(blocks)
    print(text)
    if args.notes:
        path = Path(args.notes)
        doc = path.read_text()
        begin, end = "<!-- ring_scale:begin -->", "<!-- ring_scale:end -->"
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        path.write_text(head + begin + "\n" + text + end + tail)


if __name__ == "__main__":
    main()
