#!/usr/bin/env python
"""KV-cache decoding: K/V bytes read per second against the machine's read bandwidth, same run.

    python bench/decode_bench.py [--quick] [--out bench/results/<machine>] [--threads N]
    python bench/decode_bench.py --device cuda [--quick] [--out ...]   (GPU: bf16 and fp16, read-bw = HBM)
    python bench/bench.py --groups decode ...          (the same, through the main driver)

Shape of the issue: B 4, Hq 32, Hk 8, D 128, Sq 1, every sequence holding the whole cache (8k .. 64k keys), fp32
and bf16, contiguous (B, Hk, S, D) and paged (pages of 64 keys in a shuffled (num_pages, 64, Hk, D) pool), plus
B 1 (where the split of the key range has to feed every thread). Per case, interleaved rep by rep (median
after a warm-up):
  read-bw         a plain sum over a 1 GiB fp32 tensor: the machine's read bandwidth, measured in the same run
  kvcache         fused_attn.flash_kvcache on the contiguous cache
  kvcache-paged   fused_attn.flash_kvcache on the paged pool (block_table)
  flash           fused_attn.flash(q, k, v) on the contiguous cache (the path before flash_kvcache)
  sdpa            torch's scaled_dot_product_attention(q, k, v, enable_gqa=True)
Bandwidth = K and V bytes of the cache (2 * B * Hk * S * D * element size) / time, for every implementation
alike (bytes each must read at least once); frac = that / the same case's read-bw. Outputs are checked
against each other before timing. On a GPU (--device cuda) the same cases run in bf16 and fp16 (plus a
128k cache), every call is synchronised, read-bw is the sum over 1 GiB in the GPU's memory, and
flash_kvcache also runs with num_splits=1 (no split of the key range: what split-KV buys at small B).
Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
try:
    import fused_attn
except ImportError:
    sys.path.insert(0, str(REPO))
    import fused_attn

PAGE = 64


def cpu_model() -> str:
    """The CPU's model name (Linux) and the width the CPU kernels run at, e.g. "AMD EPYC 7B13, x86-64-v3"."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {fused_attn.build_info()['cpu_isa']}"


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median ms per implementation, calls interleaved rep by rep in rotating order (GPU: synchronised)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync()
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def paged_copy(c: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """(B, Hk, S, D) -> a (num_pages, PAGE, Hk, D) pool in which page p of sequence b sits at perm[b * S / PAGE + p]
    (the block table is perm.view(B, S / PAGE))."""
    b, hk, s, d = c.shape
    per = s // PAGE
    pool = c.view(b, hk, per, PAGE, d).permute(0, 2, 3, 1, 4).reshape(b * per, PAGE, hk, d)
    shuffled = torch.empty_like(pool)
    shuffled[perm] = pool
    return shuffled


def decode_case(b, hq, hk, d, s, dtype, reps, read_bw, peers, gen, dev="cpu") -> list[dict]:
    k = torch.randn(b, hk, s, d, generator=gen).to(device=dev, dtype=dtype)
    v = torch.randn(b, hk, s, d, generator=gen).to(device=dev, dtype=dtype)
    q = torch.randn(b, hq, 1, d, generator=gen).to(device=dev, dtype=dtype)
    perm = torch.randperm(b * s // PAGE, generator=gen).to(dev)
    kp, vp = paged_copy(k, perm), paged_copy(v, perm)
    bt = perm.view(b, s // PAGE).to(torch.int32)
    lens = torch.full((b,), s, dtype=torch.int32, device=dev)
    fns = {
        "read-bw": read_bw,
        "kvcache": lambda: fused_attn.flash_kvcache(q, k, v, lens),
        "kvcache-paged": lambda: fused_attn.flash_kvcache(q, kp, vp, lens, block_table=bt),
    }
    if dev != "cpu":
        fns["kvcache-nosplit"] = lambda: fused_attn.flash_kvcache(q, k, v, lens, num_splits=1)
    if peers:
        fns["flash"] = lambda: fused_attn.flash(q, k, v)
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    ref = fns["kvcache"]().float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name in fns:
        if name != "read-bw":
            err = (fns[name]().float() - ref).abs().max().item()
            assert err < tol, f"{name} disagrees with flash_kvcache by {err} ({dtype}, S {s})"
    ms = timed(fns, reps)
    kv_bytes = 2 * k.numel() * k.element_size()
    bw_read = (1 << 30) / (ms["read-bw"] / 1e3) / 1e9
    rows = []
    for name, t in ms.items():
        gbps = ((1 << 30) if name == "read-bw" else kv_bytes) / (t / 1e3) / 1e9
        rows.append(dict(group="decode", impl=name, dtype=str(dtype).replace("torch.", ""), batch=b, hq=hq, hk=hk,
                         d=d, sq=1, cache_len=s, layout={"kvcache-paged": "paged64", "kvcache-nosplit": "1split"}.get(name, "contiguous"),
                         ms=t, kv_bytes=kv_bytes, gbps=gbps, read_bw_gbps=bw_read, frac_of_read_bw=gbps / bw_read))
    del k, v, kp, vp
    gc.collect()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small caches, few repeats (a smoke run, nothing written)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/cpu-<cores>cores)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores available)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--lens", default=None, help="comma-separated cache lengths (default 8192,16384,32768,65536)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--peers-up-to", type=int, default=65536,
                    help="longest cache on which flash() and SDPA run (memory: flash() copies K, and V for bf16)")
    opts = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(opts.threads or cores)
    gpu = opts.device == "cuda"
    reps = opts.reps or (2 if opts.quick else 20 if gpu else 7)
    lens = [int(x) for x in opts.lens.split(",")] if opts.lens else ([1024, 2048] if opts.quick else
                                                                      [8192, 16384, 32768, 65536] +
                                                                      ([131072] if gpu else []))
    gen = torch.Generator().manual_seed(0)
    big = torch.ones(1 << 28, device=opts.device)  # 1 GiB of fp32
    read_bw = lambda: big.sum()  # noqa: E731

    rows, t0 = [], time.time()
    dtypes = (torch.bfloat16, torch.float16) if gpu else (torch.float32, torch.bfloat16)
    cases = [(4, dt, s) for dt in dtypes for s in lens]
    cases += [(1, dt, lens[-1]) for dt in dtypes]
    for n, (b, dt, s) in enumerate(cases, 1):
        print(f"[{n}/{len(cases)} {time.time() - t0:5.0f}s] B{b} Hq32 Hk8 D128 Sq1 S{s} {dt}", flush=True)
        case_rows = decode_case(b, 32, 8, 128, s, dt, reps, read_bw, s <= opts.peers_up_to, gen, opts.device)
        for r in case_rows:
            print(f"    {r['impl']:<14} {r['ms']:9.2f} ms  {r['gbps']:6.1f} GB/s  {100 * r['frac_of_read_bw']:5.1f}% "
                  f"of read-bw", flush=True)
        rows += case_rows
    meta = dict(machine=torch.cuda.get_device_name() if gpu else f"cpu-{cores}cores",
                processor=cpu_model(),
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
                bandwidth="2 * B * Hk * S * D * element size / median time; read-bw: 1 GiB / time of big.sum()",
                reps=reps, page_size=PAGE)
    summary(rows)
    if opts.quick:
        return rows
    out = Path(opts.out) if opts.out else REPO / "bench" / "results" / ("gpu_run" if gpu else meta["machine"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    keys = list(rows[0])
    with open(out / "decode.csv", "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n")
    plot(rows, meta, out / "decode_bandwidth.png")
    print(f"results: {out / 'decode.json'}, {out / 'decode.csv'}, {out / 'decode_bandwidth.png'}")
    return rows


def summary(rows):
    print("\ncache   dtype     B  layout      kvcache GB/s  % of read-bw  (read-bw GB/s)  flash GB/s  sdpa GB/s")
    for r in rows:
        if not r["impl"].startswith("kvcache"):
            continue
        same = {x["impl"]: x for x in rows if (x["cache_len"], x["dtype"], x["batch"]) ==
                (r["cache_len"], r["dtype"], r["batch"])}
        fl = same.get("flash", {}).get("gbps")
        sd = same.get("sdpa", {}).get("gbps")
        print(f"{r['cache_len']:6d}  {r['dtype']:8s} {r['batch']:2d}  {r['layout']:10s}  {r['gbps']:12.1f}  "
              f"{100 * r['frac_of_read_bw']:11.1f}%  {r['read_bw_gbps']:13.1f}  "
              f"{'-' if fl is None else f'{fl:9.1f}'}  {'-' if sd is None else f'{sd:8.1f}'}")


def plot(rows, meta, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    gpu = "cpu" not in meta["machine"]
    target = 0.8 if gpu else 0.6  # the aims: 80% of HBM bandwidth on a GPU, 60% of read bandwidth on a CPU
    for ax, dt in zip(axes, ("bfloat16", "float16") if gpu else ("float32", "bfloat16")):
        sel = [r for r in rows if r["dtype"] == dt and r["batch"] == 4]
        lens = sorted({r["cache_len"] for r in sel})
        style = {"kvcache": ("C0", "o", "-"), "kvcache-paged": ("C0", "s", "--"),
                 "kvcache-nosplit": ("C3", "d", ":"), "flash": ("C1", "^", "-"),
                 "sdpa": ("C2", "v", "-"), "read-bw": ("k", ".", ":")}
        for impl, (col, mk, ls) in style.items():
            pts = [(r["cache_len"], r["gbps"]) for r in sel if r["impl"] == impl]
            if pts:
                ax.plot(*zip(*pts), color=col, marker=mk, ls=ls, label=impl if impl != "read-bw" else
                        "read bandwidth (sum of 1 GiB)")
        bw = [r["gbps"] for r in sel if r["impl"] == "read-bw"]
        if bw:
            ax.plot(lens, [target * x for x in bw], color="k", ls="--", lw=0.8,
                    label=f"{100 * target:.0f}% of read bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, [f"{x // 1024}k" for x in lens])
        ax.set_xlabel("cache length (keys per sequence)")
        ax.set_title(f"{dt}: B4 Hq32 Hk8 D128 Sq1", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("K/V GB/s read")
    axes[0].legend(fontsize=7)
    where = meta["machine"] if gpu else f"CPU {meta['threads']} threads ({meta['processor']})"
    fig.suptitle(f"flash_kvcache decode bandwidth, {where}, torch {meta['torch']}, {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
