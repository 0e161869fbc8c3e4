#!/usr/bin/env python
"""Ring attention on the CPU: W ranks of T threads (fused_attn.distributed.ring_flash over gloo, loopback)
against one process of W*T threads running fused_attn.flash on the whole sequence.

    python bench/ring_bench.py [--seq 16384] [--heads 8] [--dim 64] [--reps 5] [--out bench/results/cpu-2cores]

Both peers run in the same processes, interleaved rep by rep in alternating order: rank 0 runs the
single-process peer with W*T threads while the other ranks wait in a barrier, then all ranks run the ring
with T threads each. Median after warm-up. Per ring step it prints each rank's compute time, the time it
waited for transfers that were not hidden, and the time the same transfer takes alone (measured with no
compute running). ring efficiency = single-process time / ring time (1.0: the ring is as fast as one
process using all cores; the transfers hidden and the work balanced).

Outputs in --out: ring.json, ring.csv, ring.png (nothing in the directory is overwritten but these).
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _import_fused_attn():
    try:
        import fused_attn  # an installed build first
    except ImportError:
        sys.path.insert(0, str(REPO))  # then the in-place build of this checkout
        import fused_attn
    return fused_attn


def _visible_pairs_causal(s: int) -> int:
    return s * (s + 1) // 2


def rank_main(rank: int, args, init_file: str, queue) -> None:
    import torch
    import torch.distributed as dist

    fused_attn = _import_fused_attn()
    from fused_attn import distributed as fd

    world, threads = args.ranks, args.threads
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3600))
    b, h, s, d = 1, args.heads, args.seq, args.dim
    dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, s, d, generator=g, dtype=dtype) for _ in range(4))
    part = lambda x: fd.shard(x, layout=args.layout).contiguous()  # noqa: E731
    ql, kl, vl, dl = (part(x) for x in (q, k, v, dout))
    kw = dict(causal=True)

    def ring(mode):
        qq, kk, vv = (x.detach().requires_grad_(mode != "fwd") for x in (ql, kl, vl))
        dist.barrier()
        t0 = time.perf_counter()
        out = fd.ring_flash(qq, kk, vv, layout=args.layout, **kw)
        if mode != "fwd":
            out.backward(dl)
        mine = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)  # the ring is as slow as its slowest rank
        return float(mine), out.detach()

    def single(mode):
        dist.barrier()
        out, sec = None, 0.0
        if rank == 0:
            torch.set_num_threads(world * threads)
            qq, kk, vv = (x.detach().requires_grad_(mode != "fwd") for x in (q, k, v))
            t0 = time.perf_counter()
            out = fused_attn.flash(qq, kk, vv, **kw)
            if mode != "fwd":
                out.backward(dout)
            sec = time.perf_counter() - t0
            torch.set_num_threads(threads)
        dist.barrier()  # the other ranks wait here, idle, while rank 0 runs the whole sequence
        return sec, out

    def transfer_alone(reps):
        """One ring step's K/V exchange (and the dK/dV accumulator's, fp32) with nothing else running."""
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        times = []
        for _ in range(reps):
            bufs = [torch.empty_like(kl), torch.empty_like(vl)]
            dist.barrier()
            t0 = time.perf_counter()
            ops = [dist.P2POp(dist.isend, kl, nxt), dist.P2POp(dist.isend, vl, nxt),
                   dist.P2POp(dist.irecv, bufs[0], prv), dist.P2POp(dist.irecv, bufs[1], prv)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    result = dict(modes={})
    for mode in args.modes:
        # correctness once: the gathered ring output against the single process's
        _, out_ring = ring(mode)
        _, out_single = single(mode)
        full = fd.unshard(out_ring, layout=args.layout)
        max_diff = float((full - out_single).detach().abs().max()) if rank == 0 else None
        ring_t, single_t, profiles = [], [], []
        for rep in range(args.warmup + args.reps):
            order = ("ring", "single") if rep % 2 == 0 else ("single", "ring")
            for peer in order:
                if peer == "ring":
                    fd._PROFILE = []
                    sec, _ = ring(mode)
                    prof, fd._PROFILE = fd._PROFILE, None
                    if rep >= args.warmup:
                        ring_t.append(sec)
                        profiles.append(prof)
                else:
                    sec, _ = single(mode)
                    if rep >= args.warmup:
                        single_t.append(sec)
        # per-step medians over reps, per rank
        steps = {}
        for prof in profiles:
            for e in prof:
                steps.setdefault((e["pass_"], e["step"]), []).append(e)
        per_step = [dict(pass_=p, step=t, compute_ms=1e3 * statistics.median(x["compute_s"] for x in es),
                         wait_ms=1e3 * statistics.median(x["wait_s"] for x in es))
                    for (p, t), es in sorted(steps.items(), key=lambda kv: (kv[0][0] != "fwd", kv[0][1]))]
        result["modes"][mode] = dict(ring_s=ring_t, single_s=single_t, per_step=per_step, max_abs_diff=max_diff)
    result["transfer_alone_ms"] = 1e3 * transfer_alone(args.reps + 2)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        queue.put(gathered)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank")
    ap.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "results" / "cpu-2cores"))
    args = ap.parse_args()
    args.modes = args.modes.split(",")

    load_start = os.getloadavg()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = os.path.join(tempfile.mkdtemp(), "rendezvous")
    os.environ.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS=str(args.threads))
    procs = [ctx.Process(target=rank_main, args=(r, args, init_file, queue)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    ranks = queue.get(timeout=7200)
    for p in procs:
        p.join(timeout=60)
    load_end = os.getloadavg()

    import torch

    b, h, s, d = 1, args.heads, args.seq, args.dim
    flops_fwd = 4.0 * d * b * h * _visible_pairs_causal(s)
    shape = f"B{b} H{h} S{s} D{d}"
    rows = []
    print(f"ring attention, {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, float32, "
          f"causal, {shape}, layout {args.layout}: {args.ranks} ranks x {args.threads} thread(s) vs 1 process x "
          f"{args.ranks * args.threads} threads; load average {load_start[0]:.1f} at the start, "
          f"{load_end[0]:.1f} at the end (other processes share the cores)")
    xfer = [r["transfer_alone_ms"] for r in ranks]
    for mode in args.modes:
        m0 = ranks[0]["modes"][mode]
        ring_ms = 1e3 * statistics.median(m0["ring_s"])
        single_ms = 1e3 * statistics.median(m0["single_s"])
        flops = flops_fwd * (3.5 if mode == "fwd+bwd" else 1.0)
        row = dict(mode=mode, ring_ms=ring_ms, single_ms=single_ms, efficiency=single_ms / ring_ms,
                   ring_tflops=flops / ring_ms / 1e9, single_tflops=flops / single_ms / 1e9,
                   max_abs_diff=m0["max_abs_diff"], reps=len(m0["ring_s"]))
        rows.append(row)
        print(f"\n{mode}: ring {ring_ms:.0f} ms ({row['ring_tflops']:.3f} TFLOP/s), single process "
              f"{single_ms:.0f} ms ({row['single_tflops']:.3f} TFLOP/s): ring efficiency {row['efficiency']:.3f}"
              f" (max |ring - single| = {row['max_abs_diff']:.2e})")
        print(f"  {'pass':>4} {'step':>4} " + " ".join(f"{'r' + str(r) + ' compute':>12} {'r' + str(r) + ' wait':>9}"
                                                      for r in range(args.ranks)) + f" {'transfer alone':>15}")
        for i, e in enumerate(m0["per_step"]):
            cells = []
            for r in range(args.ranks):
                er = ranks[r]["modes"][mode]["per_step"][i]
                cells.append(f"{er['compute_ms']:10.1f}ms {er['wait_ms']:7.1f}ms")
            alone = "-" if e["step"] == 0 else f"{statistics.median(xfer):.1f} ms"
            print(f"  {e['pass_']:>4} {e['step']:>4} " + " ".join(cells) + f" {alone:>15}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(machine=out.name, device=platform.machine(), cpu_count=os.cpu_count(), torch=torch.__version__,
               python=platform.python_version(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               command="bench/ring_bench.py " + " ".join(sys.argv[1:]), dtype="float32", pattern="causal",
               layout=args.layout, batch=b, heads=h, seqlen=s, head_dim=d, ranks=args.ranks,
               threads_per_rank=args.threads, single_threads=args.ranks * args.threads,
               kv_bytes_per_step=2 * b * h * (s // args.ranks) * d * 4,
               transfer_alone_ms=xfer, rows=rows, load_avg_start=load_start, load_avg_end=load_end,
               per_step={mode: [r["modes"][mode]["per_step"] for r in ranks] for mode in args.modes},
               raw={mode: dict(ring_s=ranks[0]["modes"][mode]["ring_s"], single_s=ranks[0]["modes"][mode]["single_s"])
                    for mode in args.modes},
               flop_convention="causal visible pairs: fwd 4*D*pairs, fwd+bwd 3.5x",
               efficiency="single-process ms / ring ms")
    (out / "ring.json").write_text(json.dumps(doc, indent=1))
    with open(out / "ring.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["mode", "ring_ms", "single_ms", "efficiency", "ring_tflops",
                                          "single_tflops", "max_abs_diff", "reps"])
        w.writeheader()
        w.writerows(rows)
    plot(doc, out / "ring.png")
    print(f"\nwrote {out / 'ring.json'}, {out / 'ring.csv'}, {out / 'ring.png'}")


def plot(doc, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r["mode"] for r in doc["rows"]]
    fig, axes = plt.subplots(1, 1 + len(modes), figsize=(5.2 * (1 + len(modes)), 4.2))
    ax = axes[0]
    x = range(len(modes))
    ax.bar([i - 0.2 for i in x], [r["single_ms"] for r in doc["rows"]], 0.4,
           label=f"1 process x {doc['single_threads']} threads", color="C0")
    ax.bar([i + 0.2 for i in x], [r["ring_ms"] for r in doc["rows"]], 0.4,
           label=f"ring: {doc['ranks']} ranks x {doc['threads_per_rank']} thread", color="C3")
    for i, r in enumerate(doc["rows"]):
        ax.text(i + 0.2, r["ring_ms"], f"{r['efficiency']:.2f}x", ha="center", va="bottom")
    ax.set_xticks(list(x), modes)
    ax.set_ylim(0, 1.3 * max(max(r["single_ms"], r["ring_ms"]) for r in doc["rows"]))
    ax.set_ylabel("ms (median)")
    ax.set_title("whole sequence: time (ring efficiency above)")
    ax.legend(fontsize=8)
    alone = statistics.median(doc["transfer_alone_ms"])
    for ax, mode in zip(axes[1:], modes):
        labels, comp, wait = [], [], []
        for r, steps in enumerate(doc["per_step"][mode]):
            for e in steps:
                labels.append(f"r{r} {e['pass_']}\nstep {e['step']}")
                comp.append(e["compute_ms"])
                wait.append(e["wait_ms"])
        idx = range(len(labels))
        ax.bar(idx, comp, label="compute", color="C2")
        ax.bar(idx, wait, bottom=comp, label="waiting for transfers (not hidden)", color="C1")
        ax.axhline(alone, color="k", linestyle="--", linewidth=1, label=f"one step's K/V transfer alone ({alone:.0f} ms)")
        ax.set_xticks(list(idx), labels, fontsize=7)
        ax.set_ylim(0, 1.45 * max(c + w for c, w in zip(comp, wait)))
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"{mode}: per ring step")
        ax.legend(fontsize=7)
    fig.suptitle(f"{doc['machine']} | torch {doc['torch']} | float32 causal B{doc['batch']} H{doc['heads']} "
                 f"S{doc['seqlen']} D{doc['head_dim']} | {doc['layout']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
