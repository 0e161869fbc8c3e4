#!/usr/bin/env python
"""Linear attention against softmax attention: time vs sequence length, and Linformer against full attention.

    python bench/linear_bench.py [--quick] [--out bench/results/<machine>] [--groups linear,linformer]

Group `linear`: fused_attn.linear_attention (causal, elu1 features, normalised; and non-causal) beside
fused_attn.flash(causal=True), B1 H8 D64, S from 64 to 64k, forward and forward + backward. Linear
attention costs O(S D^2), flash O(S^2 D): the summary gives the speed-up at each S and the crossing point
(the smallest measured S from which linear attention is faster at every larger measured S).
Group `linformer`: examples/linformer.py's attention (flash over keys and values projected to k_proj rows)
beside flash over the full sequence, non-causal, B1 H8 D64.

--device cuda (a GPU session): the `linear` group on the GPU in bf16 (--dtype), B1 H8 D64, S from 1k to 64k:
fused_attn.linear_attention (tensor-core forward; fp32 kernels for the backward) beside fused_attn.flash(causal)
and, when the package is importable, flash-linear-attention's chunk_linear_attn (Triton; `fla_chunk`, with the
elu1 + 1 map applied by PyTorch inside the timed call, as fla's own layer does, and (B, S, H, D) copies made
outside it). Times are CUDA-event medians.

Peers run in the same process, interleaved rep by rep (rotating who goes first), median after warm-up, as
in bench/bench.py. flash is skipped (and says so) where one call would take too long for the sweep.
Outputs: linear_results<tag>.json / .csv and linear_time<tag>.png, linformer_time<tag>.png in --out,
rewritten after every case. --threads 1 --cpu-time --tag _1thread times one thread by its CPU time, which
a machine shared with other jobs does not inflate (wall-clock times there measure the queue as well).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench as core  # noqa: E402  (bench/bench.py: timing, machine name, fused_attn import)

fused_attn = core.fused_attn
sys.path.insert(0, str(HERE.parent / "examples"))
import linformer  # noqa: E402


def linear_cases(quick, cuda=False):
    if cuda:
        seqs = [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
        return [dict(group="linear", mode=m, seqlen=s) for m in ("fwd", "fwd+bwd") for s in seqs]
    seqs = [256, 512, 1024, 2048, 4096] if quick else [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    return [dict(group="linear", mode=m, seqlen=s) for m in ("fwd", "fwd+bwd") for s in seqs]


def linformer_cases(quick):
    seqs = {"fwd": [1024, 2048, 4096] if quick else [1024, 2048, 4096, 8192],
            "fwd+bwd": [1024, 2048] if quick else [1024, 2048, 4096]}
    return [dict(group="linformer", mode=m, seqlen=s) for m in ("fwd", "fwd+bwd") for s in seqs[m]]


# Largest S each flash mode is run at in the sweep: beyond it one call takes minutes on a busy 2-core machine.
FLASH_LIMIT = {"fwd": 16384, "fwd+bwd": 8192}


def fla_chunk():
    """flash-linear-attention's chunk_linear_attn, or None when the package is not importable."""
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception:  # noqa: BLE001  (not installed, or no Triton for this GPU)
        return None
    import inspect

    kw = {"head_first": False} if "head_first" in inspect.signature(chunk_linear_attn).parameters else {}

    def run(q, k, v):  # q, k, v: (B, S, H, D)
        phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
        return chunk_linear_attn(phi(q), phi(k), v, scale=1.0, normalize=True, **kw)[0]
    return run


def impls_for(case, q, k, v, proj, opts=None):
    s = case["seqlen"]
    if case["group"] == "linear" and opts is not None and opts.device == "cuda":
        out = {
            "linear_causal": lambda: fused_attn.linear_attention(q, k, v, causal=True),
            "linear_noncausal": lambda: fused_attn.linear_attention(q, k, v, causal=False),
            "flash_causal": lambda: fused_attn.flash(q, k, v, causal=True),
        }
        fla = fla_chunk()
        if fla is not None:
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in (q, k, v))
            out["fla_chunk"] = (lambda: fla(qt, kt, vt), (qt, kt, vt))
        return out
    if case["group"] == "linear":
        out = {
            "linear_causal": lambda: fused_attn.linear_attention(q, k, v, causal=True),
            "linear_noncausal": lambda: fused_attn.linear_attention(q, k, v, causal=False),
        }
        if s <= FLASH_LIMIT[case["mode"]]:
            out["flash_causal"] = lambda: fused_attn.flash(q, k, v, causal=True)
        return out
    return {
        "linformer": lambda: linformer.linformer_attention(q, k, v, proj, proj),
        "flash_full": lambda: fused_attn.flash(q, k, v),
    }


def timer(opts):
    """Wall-clock ms (bench/bench.py's timer), or with --cpu-time this process's CPU ms, which a busy
    machine does not inflate (meant for --threads 1, where it is the one compute thread's time)."""
    if opts.device == "cuda":
        return lambda fn: core.time_ms(fn, torch.device("cuda"))
    if not opts.cpu_time:
        return lambda fn: core.time_ms(fn, torch.device("cpu"))

    def cpu_ms(fn):
        t0 = time.process_time()
        fn()
        return (time.process_time() - t0) * 1e3

    return cpu_ms


def run_case(case, opts):
    b, h, d = 1, 8, 64
    s = case["seqlen"]
    gen = torch.Generator().manual_seed(0)
    grad = case["mode"] != "fwd"
    dev, dt = opts.device, getattr(torch, opts.dtype)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(dev, dt).requires_grad_(grad) for _ in range(3))
    proj = (torch.randn(opts.k_proj, s, generator=gen) / s ** 0.5).to(dev, dt).requires_grad_(grad)
    dout = torch.randn(b, h, s, d, generator=gen).to(dev, dt)
    fns = impls_for(case, q, k, v, proj, opts)
    leaves = (q, k, v) + ((proj,) if case["group"] == "linformer" else ())
    own_leaves = {}  # impls that take their own copies of the inputs (another layout)
    for name, fn in list(fns.items()):
        if isinstance(fn, tuple):
            fns[name], own_leaves[name] = fn

    def step_of(fn, name):
        if case["mode"] == "fwd":
            def step():
                with torch.no_grad():
                    return fn()
            return step
        ins = leaves if name == "linformer" else own_leaves.get(name, (q, k, v))
        g_out = dout.transpose(1, 2).contiguous() if name in own_leaves else dout

        def step():
            return torch.autograd.grad(fn(), ins, g_out)
        return step

    steps = {name: step_of(fn, name) for name, fn in fns.items()}
    for st in steps.values():
        for _ in range(opts.warmup):
            st()
    clock = timer(opts)
    first = {name: clock(st) for name, st in steps.items()}
    times = {name: [t] for name, t in first.items()}
    reps = int(min(opts.max_reps, max(opts.min_reps, opts.case_seconds * 1e3 / max(sum(first.values()), 1e-3))))
    names = list(steps)
    for rep in range(1, reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(clock(steps[name]))
    rows = []
    for name in names:
        rows.append(dict(case, impl=name, batch=b, heads=h, head_dim=d, dtype=opts.dtype, device=dev,
                         k_proj=opts.k_proj if case["group"] == "linformer" else None,
                         ms=statistics.median(times[name]), ms_min=min(times[name]), reps=len(times[name])))
    skipped = {"flash_causal"} - set(names) if case["group"] == "linear" else set()
    if dev == "cuda" and case["group"] == "linear" and "fla_chunk" not in names:
        rows.append(dict(case, impl="fla_chunk", batch=b, heads=h, head_dim=d, dtype=opts.dtype, device=dev, ms=None,
                         reps=0, status="skipped", error="flash-linear-attention (fla) is not importable here"))
    for name in skipped:
        rows.append(dict(case, impl=name, batch=b, heads=h, head_dim=d, dtype=opts.dtype, ms=None, reps=0,
                         status="skipped", error=f"S > {FLASH_LIMIT[case['mode']]}: one call would take minutes on a "
                                                 "busy 2-core machine (quadratic)"))
    del q, k, v, dout, proj, steps
    gc.collect()
    return rows


def summary(rows):
    """Speed-up of linear_causal over flash_causal per (mode, S), and the crossing point per mode."""
    out = {}
    for mode in ("fwd", "fwd+bwd"):
        lin = {r["seqlen"]: r["ms"] for r in rows if r["impl"] == "linear_causal" and r["mode"] == mode}
        fl = {r["seqlen"]: r["ms"] for r in rows if r["impl"] == "flash_causal" and r["mode"] == mode and r["ms"]}
        common = sorted(set(lin) & set(fl))
        speed = {s: fl[s] / lin[s] for s in common}
        cross = None
        for s in reversed(common):
            if speed[s] > 1:
                cross = s
            else:
                break
        out[mode] = dict(speedup_vs_flash_causal={str(s): round(x, 2) for s, x in speed.items()},
                         crossing_seqlen=cross,
                         note="smallest measured S from which linear_causal is faster than flash_causal at "
                              "every larger measured S")
    lf = {}
    for mode in ("fwd", "fwd+bwd"):
        a = {r["seqlen"]: r["ms"] for r in rows if r["impl"] == "linformer" and r["mode"] == mode}
        f = {r["seqlen"]: r["ms"] for r in rows if r["impl"] == "flash_full" and r["mode"] == mode}
        lf[mode] = {str(s): round(f[s] / a[s], 2) for s in sorted(set(a) & set(f))}
    if any(lf.values()):
        out["linformer_speedup_vs_full"] = lf
    return out


def plot(rows, out_dir, opts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for group, fname, impls in (("linear", f"linear_time{opts.tag}.png",
                                 ("linear_causal", "linear_noncausal", "flash_causal", "fla_chunk")),
                                ("linformer", f"linformer_time{opts.tag}.png", ("linformer", "flash_full"))):
        sel = [r for r in rows if r["group"] == group and r.get("ms")]
        if not sel:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            for impl in impls:
                pts = sorted((r["seqlen"], r["ms"]) for r in sel if r["impl"] == impl and r["mode"] == mode)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length S")
            ax.set_ylabel(("CPU ms, 1 thread" if opts.cpu_time else "ms") + " (median)")
            ax.set_title(f"{mode}, B1 H8 D64 {opts.dtype}" + (", k_proj " + str(sel[0].get("k_proj")) if group == "linformer"
                                                      else ""))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.suptitle(f"{'linear attention vs flash (causal)' if group == 'linear' else 'Linformer vs full attention'}"
                     f" - {core.machine_name(torch.device(opts.device))}"
                     + (f", {torch.get_num_threads()} thread(s), {'CPU time' if opts.cpu_time else 'wall clock'}"
                        if opts.device == "cpu" else ", CUDA events"))
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)


def _loadavg():
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--groups", default="linear,linformer")
    ap.add_argument("--k-proj", type=int, default=256, help="Linformer's projected length")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=30)
    ap.add_argument("--case-seconds", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU time instead of wall-clock (use with --threads 1)")
    ap.add_argument("--tag", default="", help="suffix of the output files, e.g. _1thread")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the linear group on the GPU against flash and flash-linear-attention")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    opts = ap.parse_args(argv)
    if opts.dtype is None:
        opts.dtype = "bfloat16" if opts.device == "cuda" else "float32"
    if opts.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device")
        FLASH_LIMIT.update({"fwd": 1 << 30, "fwd+bwd": 1 << 30})
        opts.groups = "linear"
        if opts.tag == "":
            opts.tag = "_cuda"
    if opts.threads:
        torch.set_num_threads(opts.threads)
    groups = opts.groups.split(",")
    cases = (linear_cases(opts.quick, opts.device == "cuda") if "linear" in groups else []) + \
            (linformer_cases(opts.quick) if "linformer" in groups else [])
    machine = core.machine_name(torch.device(opts.device))
    out_dir = opts.out or HERE / "results" / machine
    load_before = _loadavg()
    rows = []
    for case in cases:
        print(f"{case['group']} {case['mode']} S={case['seqlen']}", flush=True)
        for r in run_case(case, opts):
            print(f"    {r['impl']:18s} {r['ms'] if r['ms'] is None else round(r['ms'], 2)} ms", flush=True)
            rows.append(r)
        write(rows, opts, machine, out_dir, load_before)  # after every case: a stopped sweep keeps its rows
    doc = write(rows, opts, machine, out_dir, load_before)
    print(json.dumps(doc["summary"], indent=1))
    if not opts.no_plot:
        plot(rows, out_dir, opts)


def write(rows, opts, machine, out_dir, load_before):
    meta = dict(machine=machine, device=opts.device, threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), processor=platform.processor() or platform.machine(),
                date=datetime.date.today().isoformat(),
                method="median of interleaved reps after warm-up, peers in one process (bench/linear_bench.py)",
                loadavg_before=load_before, loadavg_after=_loadavg(),
                load_note="1-minute load average of the machine (shared with other jobs) before and after the "
                          "sweep; above the core count, small-S times mostly measure thread wake-up latency")
    meta["timer"] = "process CPU time" if opts.cpu_time else "wall clock"
    doc = dict(meta, summary=summary(rows), results=rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"linear_results{opts.tag}.json").write_text(json.dumps(doc, indent=1) + "\n")
    fields = sorted({k for r in rows for k in r})
    with open(out_dir / f"linear_results{opts.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine"] + fields)
        w.writeheader()
        for r in rows:
            w.writerow({"machine": machine, **r})
    return doc


if __name__ == "__main__":
    main()
