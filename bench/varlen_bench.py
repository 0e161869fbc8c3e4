#!/usr/bin/env python
"""Packed variable-length batches and score modifiers, peers in one process, interleaved.

    python bench/varlen_bench.py [--quick] [--out bench/results/<machine>]            (CPU, fp32)
    python bench/varlen_bench.py --device cuda [--quick] [--out bench/results/<gpu>]  (GPU, bf16)

varlen: one packed batch of ~32k tokens whose lengths spread from 64 to 4096 (fixed seed), causal, through
flash_varlen, against (a) flash() on one sequence of the batch's mean length, compared in TFLOP/s on
visible pairs, and (b) the same batch right-padded to its longest sequence through flash(causal=True), what
a user without varlen runs (with Sq = Sk the padded keys come after every real row's diagonal, so the real
rows are exact; checked), compared in time.
mods: flash() with softcap, ALiBi, and both, against the plain call on the same shape.
GPU (--device cuda): bf16, ~16k tokens, H 16, D 128, causal, forward and forward+backward; the packed batch
also against flash() on an equal-length batch of the same token count (flash-equal; varlen-equal is the same
batch through flash_varlen, so their ratio is the packed path's own cost), through the mma.sync kernels
(varlen-sm80, FUSED_ATTN_FORCE_SM80=1 for that call) and through torch.nn.attention.varlen where this torch
has it (torch-varlen).
Timings: median of interleaved repeats after a warm-up (GPU: synchronised around each call). Nothing here
asserts a timing.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import fused_attn  # noqa: E402
from decode_bench import cpu_model  # noqa: E402  (same folder)


def causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fns: dict, reps: int, samples: bool = False) -> dict:
    """Median ms of each function, the functions run in turn within each repeat; with samples=True the lists of
    per-repeat times instead."""
    for f in fns.values():  # warm-up
        f()
    sync()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times if samples else {k: statistics.median(v) for k, v in times.items()}


def spread_lengths(total: int, lo: int, hi: int, g: torch.Generator) -> list[int]:
    """Sequence lengths drawn uniformly from [lo, hi] until they add up to total (the last one cut)."""
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lens[-1] -= sum(lens) - total
    if lens[-1] < 1:
        lens.pop()
    return lens


def cu_seqlens(lens: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def padded(cu: torch.Tensor, longest: int, *packed: torch.Tensor) -> list[torch.Tensor]:
    """Each packed (total, H, D) tensor as the (B, H, longest, D) batch right-padded with zeros."""
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    out = []
    for src in packed:
        dst = src.new_zeros(len(bounds), src.shape[1], longest, src.shape[2])
        for b, (a, e) in enumerate(bounds):
            dst[b, :, : e - a] = src[a:e].transpose(0, 1)
        out.append(dst)
    return out


@contextlib.contextmanager
def forced_sm80():
    """FUSED_ATTN_FORCE_SM80=1 for the calls inside (the library reads it at each call)."""
    old = os.environ.get("FUSED_ATTN_FORCE_SM80")
    os.environ["FUSED_ATTN_FORCE_SM80"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["FUSED_ATTN_FORCE_SM80"]
        else:
            os.environ["FUSED_ATTN_FORCE_SM80"] = old


def torch_varlen():
    """torch.nn.attention.varlen.varlen_attn as f(q, k, v, cu, max_len) (causal), or None where this torch
    lacks it. Its signature changed between releases: is_causal=True, or window_size=(-1, 0)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    kw = dict(is_causal=True) if "is_causal" in params else dict(window_size=(-1, 0))
    return lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m, **kw)


def gpu_varlen_case(total: int, lo: int, hi: int, h: int, d: int, reps: int, dtype, dev: str = "cuda") -> list[dict]:
    """The GPU comparison (module docstring), forward and forward+backward (dev: cpu for a smoke test)."""
    g = torch.Generator().manual_seed(0)
    lens = spread_lengths(total, lo, hi, g)
    n, longest = sum(lens), max(lens)
    mean = round(n / len(lens))
    nb = max(1, n // mean)  # equal-length batch of (about) the same token count
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)  # noqa: E731
    q, k, v = mk(n, h, d), mk(n, h, d), mk(n, h, d)
    cu = cu_seqlens(lens, dev)
    qe, ke, ve = mk(nb, h, mean, d), mk(nb, h, mean, d), mk(nb, h, mean, d)
    que, kue, vue = (t.transpose(1, 2).reshape(nb * mean, h, d) for t in (qe, ke, ve))
    cue = torch.arange(0, nb * mean + 1, mean, dtype=torch.int32, device=dev)
    qp, kp, vp = padded(cu, longest, q, k, v)
    tv = torch_varlen()

    fv = lambda q_, k_, v_: fused_attn.flash_varlen(q_, k_, v_, cu, cu, max_seqlen_q=longest,  # noqa: E731
                                                    max_seqlen_k=longest, causal=True)
    fve = lambda q_, k_, v_: fused_attn.flash_varlen(q_, k_, v_, cue, cue, max_seqlen_q=mean,  # noqa: E731
                                                     max_seqlen_k=mean, causal=True)
    fc = lambda q_, k_, v_: fused_attn.flash(q_, k_, v_, causal=True)  # noqa: E731
    pairs, pairs_equal = sum(causal_pairs(x) for x in lens), nb * causal_pairs(mean)
    impls = {  # name: (function, its inputs, causal pairs per head)
        "varlen": (fv, (q, k, v), pairs),
        "varlen-sm80": (fv, (q, k, v), pairs),  # forward and backward forced
        "flash-equal": (fc, (qe, ke, ve), pairs_equal),
        "varlen-equal": (fve, (que, kue, vue), pairs_equal),
        "flash-padded": (fc, (qp, kp, vp), pairs),
    }
    if tv is not None:
        impls["torch-varlen"] = (lambda q_, k_, v_: tv(q_, k_, v_, cu, longest), (q, k, v), pairs)
    got = fv(q, k, v).float()
    with forced_sm80():
        err = (fv(q, k, v).float() - got).abs().max().item()
    assert err < 5e-2, f"the mma.sync kernels disagree with the Hopper ones on flash_varlen: {err}"
    if tv is not None:
        try:
            err = (impls["torch-varlen"][0](q, k, v).float() - got).abs().max().item()
        except (RuntimeError, ValueError, TypeError) as e:  # this torch's varlen_attn cannot run the case
            print(f"torch-varlen left out: {type(e).__name__}: {str(e)[:200]}")
            del impls["torch-varlen"]
        else:
            assert err < 5e-2, f"torch varlen_attn disagrees with flash_varlen: {err}"

    def call(name, f, args, backward):
        with forced_sm80() if name == "varlen-sm80" else contextlib.nullcontext():
            if backward:
                f(*args).sum().backward()
            else:
                f(*args)

    rows = []
    for passname in ("fwd", "fwd+bwd"):
        fns = {}
        for name, (f, args, _) in impls.items():
            if passname == "fwd+bwd":
                args = [t.detach().requires_grad_(True) for t in args]
            fns[name] = (lambda name=name, f=f, args=args, bw=passname == "fwd+bwd": call(name, f, args, bw))
        ms = timed(fns, reps)
        for name, t in ms.items():
            fl = 4 * d * h * impls[name][2] * (3.5 if passname == "fwd+bwd" else 1)  # backward = 2.5 forwards
            rows.append(dict(group="varlen", impl=name, pass_=passname, ms=t, tflops=fl / t / 1e9, tokens=n,
                             sequences=len(lens), mean_len=mean, max_len=longest, heads=h, d=d,
                             dtype=str(dtype).replace("torch.", ""), pattern="causal"))
    return rows


def varlen_case(total: int, lo: int, hi: int, h: int, d: int, reps: int, dtype) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    lens = spread_lengths(total, lo, hi, g)
    n, longest = sum(lens), max(lens)
    mean = round(n / len(lens))
    q, k, v = (torch.randn(n, h, d, generator=g).to(dtype) for _ in range(3))
    cu = cu_seqlens(lens)
    qm, km, vm = (torch.randn(1, h, mean, d, generator=g).to(dtype) for _ in range(3))
    qp, kp, vp = padded(cu, longest, q, k, v)
    fns = {
        "varlen": lambda: fused_attn.flash_varlen(q, k, v, cu, cu, max_seqlen_q=longest, max_seqlen_k=longest,
                                                  causal=True),
        "flash-mean": lambda: fused_attn.flash(qm, km, vm, causal=True),
        "flash-padded": lambda: fused_attn.flash(qp, kp, vp, causal=True),
    }
    got, got_padded = fns["varlen"](), fns["flash-padded"]()
    for b, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        err = (got[a:e].transpose(0, 1) - got_padded[b, :, : e - a]).abs().max().item()
        assert err < 1e-4, f"padded peer disagrees with flash_varlen on sequence {b}: {err}"
    ms = timed(fns, reps)
    flops_varlen = 4 * d * h * sum(causal_pairs(x) for x in lens)
    flops_mean = 4 * d * h * causal_pairs(mean)
    rows = []
    for name, t in ms.items():
        fl = flops_varlen if name != "flash-mean" else flops_mean
        rows.append(dict(group="varlen", impl=name, ms=t, tflops=fl / t / 1e9, tokens=n, sequences=len(lens),
                         mean_len=mean, max_len=longest, heads=h, d=d, dtype=str(dtype).replace("torch.", ""),
                         pattern="causal"))
    return rows


def mods_case(s: int, h: int, d: int, reps: int, dtype, causal: bool, device: str = "cpu") -> list[dict]:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, s, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    slopes = (torch.rand(h, generator=g) * 0.1).to(device)
    fns = {
        "plain": lambda: fused_attn.flash(q, k, v, causal=causal),
        "softcap": lambda: fused_attn.flash(q, k, v, causal=causal, softcap=30.0),
        "alibi": lambda: fused_attn.flash(q, k, v, causal=causal, alibi_slopes=slopes),
        "softcap+alibi": lambda: fused_attn.flash(q, k, v, causal=causal, softcap=30.0, alibi_slopes=slopes),
    }
    fwd = timed(fns, reps, samples=True)

    def fb(f):
        def run():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            f2 = {"plain": {}, "softcap": dict(softcap=30.0), "alibi": dict(alibi_slopes=slopes),
                  "softcap+alibi": dict(softcap=30.0, alibi_slopes=slopes)}[f]
            fused_attn.flash(qq, kk, vv, causal=causal, **f2).sum().backward()
        return run

    both = timed({name: fb(name) for name in fns}, reps, samples=True)
    rows = []
    for passname, res in (("fwd", fwd), ("fwd+bwd", both)):
        for name, ts in res.items():
            # overhead: the median of the per-repeat ratios to the plain call of the same repeat (paired, so a
            # slow spell of a shared machine moves both times of a pair, not the ratio)
            ratio = statistics.median(t / p for t, p in zip(ts, res["plain"]))
            rows.append(dict(group="mods", impl=name, pass_=passname, ms=statistics.median(ts), overhead=ratio - 1,
                             s=s, heads=h, d=d, dtype=str(dtype).replace("torch.", ""),
                             pattern="causal" if causal else "dense"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/cpu-2cores, or gpu_run on CUDA)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    opts = ap.parse_args(argv)
    reps = 2 if opts.quick else 7
    if opts.device == "cuda":
        return main_gpu(opts)
    opts.out = opts.out or str(REPO / "bench" / "results" / "cpu-2cores")
    rows = []
    if opts.quick:
        rows += varlen_case(2048, 16, 512, 2, 32, reps, torch.float32)
        rows += mods_case(256, 2, 32, reps, torch.float32, True)
    else:
        rows += varlen_case(32768, 64, 4096, 8, 64, reps, torch.float32)
        rows += mods_case(2048, 8, 64, 15, torch.float32, True)
        rows += mods_case(2048, 8, 64, 15, torch.float32, False)
    meta = dict(machine=f"cpu-{torch.get_num_threads()}threads", processor=cpu_model(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                date=datetime.date.today().isoformat())
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    v = {r["impl"]: r for r in rows if r["group"] == "varlen"}
    print(f"varlen: {v['varlen']['tflops']:.3f} TFLOP/s vs flash() on one mean-length sequence "
          f"{v['flash-mean']['tflops']:.3f} ({v['varlen']['tflops'] / v['flash-mean']['tflops']:.2f}x); "
          f"padded batch {v['flash-padded']['ms']:.1f} ms vs packed {v['varlen']['ms']:.1f} ms "
          f"({v['flash-padded']['ms'] / v['varlen']['ms']:.2f}x faster packed)")
    for r in rows:
        if r["group"] == "mods" and r["impl"] != "plain":
            print(f"mods {r['pattern']} {r['pass_']} {r['impl']}: {100 * r['overhead']:+.1f}% over plain")
    if not opts.quick:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "varlen_mods.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
        plot(rows, out / "varlen.png", meta)


def main_gpu(opts):
    reps = 3 if opts.quick else 20
    rows = []
    if opts.quick:
        rows += gpu_varlen_case(2048, 16, 512, 4, 64, reps, torch.bfloat16)
        rows += mods_case(512, 4, 64, reps, torch.bfloat16, True, "cuda")
    else:
        rows += gpu_varlen_case(16384, 64, 4096, 16, 128, reps, torch.bfloat16)
        rows += mods_case(4096, 16, 128, reps, torch.bfloat16, True, "cuda")
        rows += mods_case(4096, 16, 128, reps, torch.bfloat16, False, "cuda")
    meta = dict(machine=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                kernels=fused_attn.build_info(), date=datetime.date.today().isoformat())
    for r in rows:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    for p in ("fwd", "fwd+bwd"):
        v = {r["impl"]: r for r in rows if r["group"] == "varlen" and r["pass_"] == p}
        line = (f"varlen {p}: {v['varlen']['tflops']:.0f} TFLOP/s; flash-equal {v['flash-equal']['tflops']:.0f} "
                f"({v['varlen']['tflops'] / v['flash-equal']['tflops']:.2f}x); varlen-equal / flash-equal "
                f"{v['varlen-equal']['tflops'] / v['flash-equal']['tflops']:.2f}x; mma.sync "
                f"{v['varlen-sm80']['tflops']:.0f}; padded {v['flash-padded']['ms']:.2f} ms vs packed "
                f"{v['varlen']['ms']:.2f} ms")
        if "torch-varlen" in v:
            line += f"; torch varlen {v['torch-varlen']['tflops']:.0f}"
        print(line)
    for r in rows:
        if r["group"] == "mods" and r["impl"] != "plain":
            print(f"mods {r['pattern']} {r['pass_']} {r['impl']}: {100 * r['overhead']:+.1f}% over plain")
    if not opts.quick:
        out = Path(opts.out or REPO / "bench" / "results" / "gpu_run")
        out.mkdir(parents=True, exist_ok=True)
        (out / "varlen_gpu.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))


def plot(rows, path, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = [r for r in rows if r["group"] == "varlen"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["impl"] for r in v]
    ax[0].bar(names, [r["ms"] for r in v], color=["C0", "C1", "C2"])
    ax[0].set_ylabel("ms")
    r0 = v[0]
    ax[0].set_title(f"{r0['tokens']} tokens, {r0['sequences']} seqs (64..4096), causal\n"
                    f"B=packed H{r0['heads']} D{r0['d']} {r0['dtype']}", fontsize=9)
    m = [r for r in rows if r["group"] == "mods"]
    labels = [f"{r['pattern']}\n{r['pass_']}" for r in m if r["impl"] == "plain"]
    import numpy as np

    x = np.arange(len(labels))
    for i, name in enumerate(["softcap", "alibi", "softcap+alibi"]):
        ax[1].bar(x + (i - 1) * 0.27, [100 * r["overhead"] for r in m if r["impl"] == name], 0.27, label=name)
    ax[1].set_xticks(x, labels)
    ax[1].axhline(10, color="k", lw=0.8, ls="--")
    ax[1].set_ylabel("% time over the plain call")
    ax[1].legend(fontsize=8)
    ax[1].set_title("score modifiers, S2048 H8 D64 fp32", fontsize=9)
    fig.suptitle(f"fused_attn CPU: {meta['processor']} ({meta['threads']} threads, torch {meta['torch']}, {meta['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
