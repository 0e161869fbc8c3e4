#!/usr/bin/env python
"""Benchmark driver: fused_attn.flash against its peers, measured in one process, interleaved.

    python bench/bench.py [--quick] [--out bench/results/<machine>] [--groups dense,window,sparse,memory]

For every case (shape, dtype, pattern, pass) each implementation is warmed up, checked against fused_attn's
output, then timed rep by rep in rotating order (so drift and thermal effects hit every implementation
alike); the median is reported. Nothing here asserts a timing.

FLOPs count visible (query, key) pairs only: forward 4 * D * pairs (two matmuls of 2 * D each), backward
2.5x the forward, forward + backward 3.5x. Pairs are counted exactly from the visibility rule of
csrc/mask.h (window band in closed form, block layouts block by block with partial tail blocks), never by
materialising S^2. Peers are credited with the same pattern FLOPs even when they compute a dense masked
product, so TFLOP/s compare useful work. ratio = this implementation's time / fused_attn's time for the
same case (above 1: fused_attn is faster).

Peers: torch SDPA (dense / causal natively; window and block-sparse as the equivalent dense boolean
element mask), fused_attn's own dense call (block-sparse sweep), SDPA with fused_attn's SDPA provider
activated (sdpa+fused_attn: the same unmodified SDPA call served by fused_attn's kernels; dense and causal,
the provider being switched on outside the timed region), and FlexAttention compiled with torch.compile
(same pattern via mask_mod + create_block_mask with the matching BLOCK_SIZE; on the CPU with --flex-cpu).
On CUDA additionally SDPA with each backend forced. A peer that raises for a case is recorded as skipped
with the reason. setup_ms records, apart from the timed reps, the wall time of building a case for an
implementation: its first call plus the warm-up steps, i.e. torch.compile's compile time for flex (and
create_block_mask).

Outputs in --out: results.json (machine, torch, dtypes, every row), results.csv, and PNG plots
(bench/plot.py); with --tag T: results-T.json, results-T.csv and T_*.png, so runs with other peers sit
beside the default ones.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _import_fused_attn():
    try:
        import fused_attn  # an installed build first
    except ImportError:
        sys.path.insert(0, str(REPO))  # then the in-place build of this checkout
        import fused_attn
    return fused_attn


fused_attn = _import_fused_attn()
from fused_attn import masks  # noqa: E402

PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


class Skip(Exception):
    """An implementation that does not support a case; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Exact visible-pair counts (the rule of csrc/mask.h), without materialising S^2.


def _pairs_diff_le(nq, nk, x):
    """Number of (i, j), 0 <= i < nq, 0 <= j < nk, with j - i <= x. Works on ints or int64 tensors (nk >= 1).

    For a fixed row i the count is clamp(i + x + 1, 0, nk): zero while i < 1 - a (a = x + 1), linear
    i + a up to i < nk - a, then nk. Summing the three pieces gives a closed form.
    """
    a = x + 1
    if isinstance(a, torch.Tensor):
        clamp = lambda t: torch.minimum(torch.clamp(t, min=0), torch.as_tensor(nq))  # noqa: E731
    else:
        clamp = lambda t: min(max(t, 0), nq)  # noqa: E731
    lo = clamp(1 - a)
    hi = clamp(nk - a)
    n = hi - lo
    linear = n * a + (lo + hi - 1) * n // 2  # (lo + hi - 1) * n is always even
    return linear + (nq - hi) * nk


def band_pairs(nq, nk, dmin, dmax):
    """Pairs of an nq x nk grid with dmin <= j - i <= dmax (ints or int64 tensors)."""
    return _pairs_diff_le(nq, nk, dmax) - _pairs_diff_le(nq, nk, dmin - 1)


def _band_limits(sq: int, sk: int, window) -> tuple[int, int]:
    """(dmin, dmax) on j - i for a window (left, right) with -1 unbounded; None is dense."""
    left, right = window if window is not None else (-1, -1)
    off = sk - sq
    dmin = off - left if left >= 0 else -sq
    dmax = off + right if right >= 0 else sk
    return dmin, dmax


def visible_pairs(batch: int, heads: int, sq: int, sk: int, window=None, layout=None, block=None) -> int:
    """Exact number of visible (query, key) pairs summed over batch and heads.

    layout: bool (H, nqb, nkb) or (Bl, H, nqb, nkb) with block = (bq, bk); the last block row/column may be
    partial (tail). A layout with Bl == 1 (or no batch dim) is shared by every batch element.
    """
    dmin, dmax = _band_limits(sq, sk, window)
    if layout is None:
        return batch * heads * int(band_pairs(sq, sk, dmin, dmax))
    bq, bk = block
    lay = layout if layout.dim() == 4 else layout.unsqueeze(0)
    nqb, nkb = lay.shape[-2:]
    if nqb != math.ceil(sq / bq) or nkb != math.ceil(sk / bk):
        raise ValueError(f"layout: expected (.., {math.ceil(sq / bq)}, {math.ceil(sk / bk)}) blocks for "
                         f"S=({sq}, {sk}) and block {block}, got shape {tuple(layout.shape)}")
    q0 = torch.arange(nqb, dtype=torch.int64).unsqueeze(1) * bq
    k0 = torch.arange(nkb, dtype=torch.int64).unsqueeze(0) * bk
    nq = torch.clamp(sq - q0, max=bq)  # tail rows of the last query block
    nk = torch.clamp(sk - k0, max=bk)
    shift = k0 - q0  # j - i = (j' - i') + (k0 - q0) inside the block
    per_block = band_pairs(nq, nk, dmin - shift, dmax - shift)  # (nqb, nkb)
    per_layout = (lay.to(torch.int64) * per_block).sum().item()
    return int(per_layout * (batch if lay.shape[0] == 1 else 1))


def element_mask(sq: int, sk: int, window, layout, block, device) -> torch.Tensor:
    """The dense boolean mask equivalent to the pattern (for SDPA): (1, 1, Sq, Sk) or (Bl, H, Sq, Sk)."""
    dmin, dmax = _band_limits(sq, sk, window)
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    mask = ((j - i) >= dmin) & ((j - i) <= dmax)
    mask = mask.view(1, 1, sq, sk)
    if layout is not None:
        bq, bk = block
        lay = (layout if layout.dim() == 4 else layout.unsqueeze(0)).to(device)
        el = lay.repeat_interleave(bq, dim=2)[:, :, :sq].repeat_interleave(bk, dim=3)[:, :, :, :sk]
        mask = mask & el
    return mask


# ---------------------------------------------------------------------------------------------------------
# Cases.


@dataclass
class Case:
    group: str  # dense | window | sparse | memory (which sweep it belongs to)
    pattern: str  # dense | causal | window | sparse
    mode: str  # fwd | fwd+bwd
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    dtype: torch.dtype
    window: Optional[tuple] = None  # (left, right), causal folded in
    layout: Optional[torch.Tensor] = None
    block: Optional[tuple] = None
    target_density: Optional[float] = None
    max_reps: Optional[int] = None

    @property
    def causal(self) -> bool:
        return self.pattern == "causal" or (self.window is not None and self.window[1] == 0)

    def shape(self) -> str:
        return f"B{self.batch} H{self.heads} S{self.seqlen} D{self.head_dim}"

    def describe(self) -> str:
        extra = ""
        if self.window is not None:
            extra = f" left={self.window[0]}"
        if self.layout is not None:
            extra += f" block={self.block[0]} density={masks.density(self.layout):.3f}"
        return f"{self.group}/{self.pattern} {self.mode} {self.shape()}{extra}"


def sparse_layout(seqlen: int, block: int, target: float, heads: int, seed: int) -> torch.Tensor:
    """A random block layout with round(target * nkb) key blocks per query block, the diagonal included
    (BigBird with only the diagonal as window, no globals: no query row is left empty)."""
    n = math.ceil(seqlen / block)
    per_row = max(1, round(target * n))
    gen = torch.Generator().manual_seed(seed)
    return masks.bigbird(n, n, 1, 0, per_row - 1, generator=gen, heads=heads)


def cpu_cases(quick: bool, dt: torch.dtype = torch.float32) -> list[Case]:
    b, h, d = 1, 8, 64
    cases = []
    for s in (1024,) if quick else (1024, 2048):
        for pattern in ("dense", "causal"):
            for mode in ("fwd", "fwd+bwd"):
                cases.append(Case("dense", pattern, mode, b, h, s, d, dt))
    for mode in ("fwd",) if quick else ("fwd", "fwd+bwd"):
        for s in (2048, 4096) if quick else (2048, 4096, 8192):
            cases.append(Case("window", "window", mode, b, h, s, d, dt, window=(256, 0)))
    s, blk = 4096, 64
    for mode in ("fwd",) if quick else ("fwd", "fwd+bwd"):
        for target in (0.1, 0.5) if quick else (0.05, 0.1, 0.2, 0.5):
            lay = sparse_layout(s, blk, target, h, seed=0)
            cases.append(Case("sparse", "sparse", mode, b, h, s, d, dt, layout=lay, block=(blk, blk),
                              target_density=target))
    return cases


def cuda_cases(quick: bool) -> list[Case]:
    dt, h, d, tokens = torch.bfloat16, 16, 128, 16384
    seqs = (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384)
    cases = []
    for s in seqs:
        for pattern in ("dense", "causal"):
            for mode in ("fwd", "fwd+bwd"):
                cases.append(Case("dense", pattern, mode, tokens // s, h, s, d, dt))
    for mode in ("fwd", "fwd+bwd"):
        for s in (4096, 16384) if quick else (2048, 4096, 8192, 16384, 32768):
            cases.append(Case("window", "window", mode, 1, h, s, d, dt, window=(1024, 0)))
    blk = 128
    for mode in ("fwd", "fwd+bwd"):
        for s in (8192,) if quick else (4096, 8192, 16384):
            lay = sparse_layout(s, blk, 0.1, h, seed=0)
            cases.append(Case("sparse", "sparse", mode, tokens // s, h, s, d, dt, layout=lay,
                              block=(blk, blk), target_density=0.1))
    cases.append(Case("memory", "causal", "fwd+bwd", 1, h, 131072, d, dt, max_reps=3))
    return cases


# ---------------------------------------------------------------------------------------------------------
# Implementations: each returns a zero-argument forward callable for the case, or raises Skip.


@dataclass
class Impl:
    name: str
    make: Callable  # (case, q, k, v, opts) -> callable returning the attention output
    pattern_of: Callable = lambda case: case.pattern  # the pattern this implementation computes
    groups: tuple = ("dense", "window", "sparse", "memory")
    ctx: Callable = contextlib.nullcontext  # entered around its calls, outside the timed region


def make_fused(case, q, k, v, opts):
    kw = {}
    if case.pattern == "causal":
        kw["causal"] = True
    if case.window is not None:
        kw["causal"] = case.causal
        kw["window"] = case.window
    if case.layout is not None:
        kw["block_mask"] = fused_attn.block_mask(case.layout.to(q.device), case.block)
    return lambda: fused_attn.flash(q, k, v, **kw)


def make_fused_dense(case, q, k, v, opts):
    return lambda: fused_attn.flash(q, k, v)


def make_fused_sm80(case, q, k, v, opts):
    """fused_attn with the mma.sync kernels forced (FUSED_ATTN_FORCE_SM80, read at every call): the Hopper
    path's own baseline on a GPU where the wgmma/TMA kernels run by default."""
    os.environ["FUSED_ATTN_FORCE_SM80"] = "1"
    try:
        fn = make_fused(case, q, k, v, opts)
    finally:
        os.environ.pop("FUSED_ATTN_FORCE_SM80", None)

    def run():
        os.environ["FUSED_ATTN_FORCE_SM80"] = "1"
        try:
            return fn()
        finally:
            os.environ.pop("FUSED_ATTN_FORCE_SM80", None)

    return run


def _sdpa_backend_ctx(backend):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([backend])


def make_sdpa(backend=None):
    def make(case, q, k, v, opts):
        kw = {}
        if case.pattern == "causal":
            kw["is_causal"] = True  # Sq == Sk in every case, so top-left == bottom-right alignment
        elif case.pattern in ("window", "sparse"):
            nbytes = case.seqlen * case.seqlen * (1 if case.layout is None else case.heads)
            if nbytes > opts.mask_limit_gib * 2**30:
                raise Skip(f"dense element mask needs {nbytes / 2**30:.1f} GiB > --mask-limit-gib")
            kw["attn_mask"] = element_mask(case.seqlen, case.seqlen, case.window, case.layout, case.block,
                                           q.device)

        def run():
            with _sdpa_backend_ctx(backend):
                return F.scaled_dot_product_attention(q, k, v, **kw)

        return run

    return make


@contextlib.contextmanager
def fused_attn_sdpa_provider():
    """SDPA served by fused_attn's kernels (torch.nn.attention's flash-attention provider registry)."""
    from fused_attn.integrations import sdpa

    sdpa.activate()
    try:
        yield
    finally:
        sdpa.restore()


_FLEX = {}


def _flex_compiled():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        import torch._dynamo

        # Every case is a new shape / mask: keep compiling instead of falling back to (slow) eager.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 4096)
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def make_flex(case, q, k, v, opts):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        raise Skip(f"flex_attention unavailable: {e}")
    flex = _flex_compiled()
    sq = sk = case.seqlen
    off = sk - sq
    block_size = case.block if case.block is not None else 128
    bm = None
    if case.pattern == "causal":
        def mask_mod(b, h, qi, kj):
            return kj <= qi + off
        bm = create_block_mask(mask_mod, None, None, sq, sk, device=q.device, BLOCK_SIZE=block_size)
    elif case.pattern in ("window", "sparse"):
        dmin, dmax = _band_limits(sq, sk, case.window)
        lay = None
        if case.layout is not None:
            lay = (case.layout if case.layout.dim() == 4 else case.layout.unsqueeze(0)).to(q.device)
        bq, bk = case.block if case.block is not None else (1, 1)

        def mask_mod(b, h, qi, kj):
            d = kj - qi
            ok = (d >= dmin) & (d <= dmax)
            if lay is not None:
                bi = b if lay.shape[0] > 1 else 0
                ok = ok & lay[bi, h, qi // bq, kj // bk]
            return ok

        bsz = None if lay is None or lay.shape[0] == 1 else lay.shape[0]
        hsz = None if lay is None else lay.shape[1]
        bm = create_block_mask(mask_mod, bsz, hsz, sq, sk, device=q.device, BLOCK_SIZE=block_size)
    return lambda: flex(q, k, v, block_mask=bm)


def make_fa4(case, q, k, v, opts):
    """FlashAttention-4 (pip flash-attn-4, CuTe-DSL; flash-attn's (B, S, H, D) layout, taken here as views of
    the same tensors). Dense, causal and sliding window; its block-sparse tensors are not wired up here."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as e:
        raise Skip(f"flash-attn-4 unavailable: {e}")
    if case.layout is not None:
        raise Skip("block-sparse layouts not wired for flash-attn-4")
    kw = {}
    if case.pattern == "causal":
        kw["causal"] = True
    elif case.window is not None:
        kw["window_size"] = tuple(case.window)

    def run():
        r = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
        return (r[0] if isinstance(r, tuple) else r).transpose(1, 2)

    return run


def implementations(device: torch.device, opts) -> list[Impl]:
    impls = [
        Impl("fused_attn", make_fused),
        Impl("fused_attn-dense", make_fused_dense, pattern_of=lambda c: "dense", groups=("sparse",)),
    ]
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        paths = fused_attn.build_info().get("cuda_paths", {})
        if paths.get(f"cuda:{device.index or 0}", "").startswith("sm90"):
            impls.append(Impl("fused_attn-sm80", make_fused_sm80))

        # The forced backends cover what the automatic choice would pick; "sdpa" (auto) is omitted.
        for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                              ("sdpa-efficient", "EFFICIENT_ATTENTION")):
            if hasattr(SDPBackend, backend):
                impls.append(Impl(name, make_sdpa(getattr(SDPBackend, backend))))
        if not opts.no_flex:
            impls.append(Impl("flex", make_flex))
        if importlib.util.find_spec("flash_attn") is not None:  # flash-attn-4 carried to the machine as wheels
            impls.append(Impl("fa4", make_fa4, groups=("dense", "window", "memory")))
    else:
        impls.append(Impl("sdpa", make_sdpa(None)))
        if opts.flex_cpu and not opts.no_flex:
            impls.append(Impl("flex", make_flex))
    from fused_attn.integrations import sdpa as provider

    if provider.registry_available():
        # the same SDPA call as "sdpa", served by fused_attn (only is_causal / no mask reach the provider)
        impls.append(Impl("sdpa+fused_attn", make_sdpa(None), groups=("dense",), ctx=fused_attn_sdpa_provider))
    if opts.impls:
        wanted = set(opts.impls.split(","))
        impls = [i for i in impls if i.name in wanted]
    return impls


# ---------------------------------------------------------------------------------------------------------
# Timing.


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def as_step(forward, case, q, k, v, dout):
    """The timed step: the forward alone, or forward + backward (gradients to q, k, v, not accumulated)."""
    if case.mode == "fwd":
        def step():
            with torch.no_grad():
                return forward()
        return step

    def step():
        out = forward()
        return torch.autograd.grad(out, (q, k, v), dout)

    return step


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def run_case(case: Case, impls: list[Impl], device, opts) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (case.batch, case.heads, case.seqlen, case.head_dim)
    needs_grad = case.mode != "fwd"
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=case.dtype).requires_grad_(needs_grad)
               for _ in range(3))
    dout = torch.randn(shape, generator=gen, device=device, dtype=case.dtype) if needs_grad else None

    rows, steps, ctxs, ref_out = [], {}, {}, None
    active = [i for i in impls if case.group in i.groups]
    for impl in active:
        row = {"impl": impl.name, "impl_pattern": impl.pattern_of(case), "status": "ok", "error": None}
        rows.append(row)
        try:
            t_setup = time.perf_counter()
            with impl.ctx():
                forward = impl.make(case, q, k, v, opts)
                with torch.no_grad():
                    out = forward()  # first call: compiles / checks support
                _sync(device)
            row["first_call_ms"] = (time.perf_counter() - t_setup) * 1e3
            if row["impl_pattern"] == case.pattern:
                if ref_out is None:
                    ref_out = out.float()  # fused_attn comes first
                    row["max_abs_diff"] = 0.0
                else:
                    row["max_abs_diff"] = (out.float() - ref_out).abs().max().item()
            del out
            step = as_step(forward, case, q, k, v, dout)
            with impl.ctx():
                for _ in range(opts.warmup):
                    step()  # the first fwd+bwd step also compiles a compiled peer's backward
                _sync(device)
            row["setup_ms"] = (time.perf_counter() - t_setup) * 1e3
            steps[impl.name] = step
            ctxs[impl.name] = impl.ctx
        except Skip as e:
            row.update(status="skipped", error=str(e))
        except torch.OutOfMemoryError as e:
            row.update(status="skipped", error=f"out of memory: {_first_line(e)}")
        except Exception as e:  # a peer (or fused_attn) that does not support the case
            row.update(status="skipped" if impl.name != "fused_attn" else "error", error=_first_line(e))
        if row["status"] != "ok":
            print(f"    {impl.name}: {row['status']}: {row['error']}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    times = {name: [] for name in steps}
    if steps:
        # Reps sized from one timed round so that a case takes about --case-seconds.
        def timed(name):
            with ctxs[name]():
                return time_ms(steps[name], device)

        first = {name: timed(name) for name in steps}
        for name, t in first.items():
            times[name].append(t)
        round_ms = max(sum(first.values()), 1e-3)
        reps = int(min(opts.max_reps if case.max_reps is None else case.max_reps,
                       max(opts.min_reps, opts.case_seconds * 1e3 / round_ms)))
        names = list(steps)
        for rep in range(1, reps):
            order = names[rep % len(names):] + names[:rep % len(names)]  # rotate who goes first
            for name in order:
                times[name].append(timed(name))

    peak = {}
    if device.type == "cuda":
        for name, step in steps.items():
            _sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            with ctxs[name]():
                step()
                _sync(device)
            peak[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20

    density = None if case.layout is None else masks.density(case.layout)
    for row in rows:
        pattern = row["impl_pattern"]
        window = case.window if pattern == case.pattern else None
        layout = case.layout if pattern == case.pattern else None
        if pattern == "causal":
            window = (-1, 0)
        pairs = visible_pairs(case.batch, case.heads, case.seqlen, case.seqlen, window, layout, case.block)
        flops = 4.0 * case.head_dim * pairs * PASS_FACTOR[case.mode]
        t = times.get(row["impl"])
        ms = statistics.median(t) if t else None
        row.update(
            group=case.group, pattern=case.pattern, mode=case.mode, dtype=str(case.dtype).replace("torch.", ""),
            batch=case.batch, heads=case.heads, seqlen_q=case.seqlen, seqlen_k=case.seqlen,
            head_dim=case.head_dim, window=list(case.window) if case.window else None,
            block=list(case.block) if case.block else None, layout_density=density,
            target_density=case.target_density,
            visible_fraction=pairs / (case.batch * case.heads * case.seqlen * case.seqlen),
            flops=flops, ms=ms, ms_min=min(t) if t else None, reps=len(t) if t else 0,
            tflops=flops / (ms * 1e-3) / 1e12 if ms else None,
            peak_mem_mib=peak.get(row["impl"]),
        )
    fused = next((r["ms"] for r in rows if r["impl"] == "fused_attn" and r["ms"]), None)
    for row in rows:
        row["ratio"] = row["ms"] / fused if fused and row["ms"] else None
    del q, k, v, dout, steps, ref_out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------
# Reporting.


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_name(device) -> str:
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return f"cpu-{core_count()}cores"


def wait_idle(limit: float, poll_s: float = 15.0) -> float:
    """Sleeps until the 1-minute load average is below limit; returns the seconds waited."""
    start = time.time()
    while os.getloadavg()[0] >= limit:
        time.sleep(poll_s)
    return time.time() - start


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows, machine):
    cols = ["machine", "dtype", "shape", "pattern", "pass", "impl", "ms", "TFLOP/s", "ratio", "mem MiB", "note"]
    table = []
    for r in rows:
        shape = f"B{r['batch']} H{r['heads']} S{r['seqlen_q']} D{r['head_dim']}"
        pattern = r["pattern"]
        if r["window"]:
            pattern += f"(left={r['window'][0]})"
        if r["layout_density"] is not None:
            pattern += f"(d={r['layout_density']:.3f})"
        note = r["error"] or ""
        if r.get("max_abs_diff") is not None and r["impl"] != "fused_attn":
            note = f"maxdiff {r['max_abs_diff']:.1e}"
        table.append([machine, r["dtype"], shape, pattern, r["mode"], r["impl"], _fmt(r["ms"], ".3f"),
                      _fmt(r["tflops"], ".3f"), _fmt(r["ratio"], ".2f"), _fmt(r["peak_mem_mib"], ".0f"),
                      note[:60]])
    widths = [max(len(str(c)), *(len(str(t[i])) for t in table)) if table else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line)
    print("-" * len(line))
    for t in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(t, widths)))
    print("ratio = impl ms / fused_attn ms for the same case (above 1: fused_attn faster). TFLOP/s count "
          "visible pairs only (fwd 4*D*pairs, bwd 2.5x, fwd+bwd 3.5x).")


def write_outputs(meta, rows, out_dir: Path, merge: bool, groups, tag: str = ""):
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"results-{tag}" if tag else "results"
    path = out_dir / f"{stem}.json"
    if merge and path.exists():
        old = json.loads(path.read_text())
        kept = [r for r in old.get("results", []) if r.get("group") not in groups]
        rows = kept + rows
    doc = dict(meta, results=rows)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    fields = ["machine", "device", "torch"] + sorted({k for r in rows for k in r})
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({"machine": meta["machine"], "device": meta["device"], "torch": meta["torch"],
                        **{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()}})
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller sweep (under a minute on 2 CPU cores)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<machine>)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--groups", default="dense,window,sparse,memory",
                    help="comma-separated case groups to run: dense, window, sparse, memory, decode, varlen "
                         "(decode: bench/decode_bench.py, varlen: bench/varlen_bench.py; CPU)")
    ap.add_argument("--impls", default=None, help="comma-separated implementations to keep (default all)")
    ap.add_argument("--merge", action="store_true",
                    help="keep rows of other groups already in <out>/results.json (run groups separately)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs after the first call")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=None)
    ap.add_argument("--case-seconds", type=float, default=None, help="time budget per case for the reps")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores available)")
    ap.add_argument("--mask-limit-gib", type=float, default=2.0,
                    help="largest dense element mask built for SDPA peers")
    ap.add_argument("--cpu-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the CPU cases (default float32)")
    ap.add_argument("--no-flex", action="store_true", help="leave FlexAttention out")
    ap.add_argument("--flex-cpu", action="store_true", help="also run FlexAttention on the CPU (slow compile)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="LOAD",
                    help="before each case, wait until the 1-minute load average is below LOAD (shared machines)")
    ap.add_argument("--tag", default="", help="write results-<tag>.json/.csv and <tag>_*.png (keeps other runs)")
    opts = ap.parse_args(argv)

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # torch 2.11's set_device wants an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False
    threads = opts.threads or core_count()
    torch.set_num_threads(threads)
    gpu = device.type == "cuda"
    if opts.warmup is None:
        opts.warmup = 3 if gpu else 1
    if opts.max_reps is None:
        opts.max_reps = 50 if gpu else 15
    if opts.case_seconds is None:
        opts.case_seconds = (1.0 if opts.quick else 2.0) if gpu else (0.6 if opts.quick else 3.0)

    machine = machine_name(device)
    out_dir = opts.out or (HERE / "results" / machine)
    groups = set(opts.groups.split(","))
    unknown = groups - {"dense", "window", "sparse", "memory", "decode", "varlen"}
    if unknown:
        ap.error(f"--groups: unknown group(s) {sorted(unknown)}, expected dense, window, sparse, memory, decode, "
                 "varlen")
    sys.path.insert(0, str(HERE))
    if "decode" in groups:  # KV-cache decoding: bandwidth, not FLOPs; its own driver and outputs
        import decode_bench

        decode_bench.main((["--quick"] if opts.quick else []) + (["--out", str(opts.out)] if opts.out else []) +
                          (["--threads", str(opts.threads)] if opts.threads else []))
        groups.discard("decode")
    if "varlen" in groups:  # packed batches vs one sequence and vs padding, softcap / ALiBi overhead (CPU)
        import varlen_bench

        varlen_bench.main((["--quick"] if opts.quick else []) + (["--out", str(opts.out)] if opts.out else []))
        groups.discard("varlen")
    if not groups:
        return None
    cpu_dt = getattr(torch, opts.cpu_dtype)
    cases = [c for c in (cuda_cases(opts.quick) if gpu else cpu_cases(opts.quick, cpu_dt)) if c.group in groups]
    impls = implementations(device, opts)

    try:
        build = fused_attn.build_info()
    except Exception as e:  # the benchmark still runs; the JSON says why the build info is missing
        build = {"error": _first_line(e)}
    meta = {
        "machine": machine,
        "device": torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine()),
        "device_type": device.type,
        "cpu_threads": threads if not gpu else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtypes": sorted({str(c.dtype).replace("torch.", "") for c in cases}),
        "fused_attn_build": build,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "flop_convention": "visible pairs only: fwd 4*D*pairs, bwd 2.5x fwd, fwd+bwd 3.5x fwd",
        "ratio": "impl ms / fused_attn ms for the same case",
        "impls": [i.name for i in impls],
    }
    print(f"machine {machine} ({meta['device']}), torch {torch.__version__}, "
          f"{'threads ' + str(threads) if not gpu else 'cuda ' + str(torch.version.cuda)}, "
          f"{len(cases)} cases, impls {', '.join(meta['impls'])}", flush=True)

    rows, t0 = [], time.time()
    for n, case in enumerate(cases, 1):
        print(f"[{n}/{len(cases)} {time.time() - t0:6.1f}s] {case.describe()}", flush=True)
        if opts.wait_idle is not None:
            waited = wait_idle(opts.wait_idle)
            if waited:
                print(f"    waited {waited:.0f} s for the load average to fall below {opts.wait_idle}", flush=True)
        load_before = os.getloadavg()[0]
        case_rows = run_case(case, impls, device, opts)
        for r in case_rows:  # the machine's 1-minute load average around the case, for the reader
            r["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        for r in case_rows:
            if r["ms"] is not None:
                print(f"    {r['impl']:<17} {r['ms']:9.3f} ms  {r['tflops']:8.3f} TFLOP/s  "
                      f"ratio {_fmt(r['ratio'], '.2f')}", flush=True)
        rows.extend(case_rows)
        write_outputs(meta, rows, out_dir, opts.merge, groups, opts.tag)  # partial results survive a kill
    print()
    print_table(rows, machine)
    doc = write_outputs(meta, rows, out_dir, opts.merge, groups, opts.tag)
    if not opts.no_plot:
        try:
            sys.path.insert(0, str(HERE))
            import plot

            for p in plot.make_plots(doc, out_dir, prefix=f"{opts.tag}_" if opts.tag else ""):
                print(f"plot: {p}")
        except ImportError as e:
            print(f"plots skipped: {e}")
    stem = f"results-{opts.tag}" if opts.tag else "results"
    print(f"results: {out_dir / (stem + '.json')}, {out_dir / (stem + '.csv')} ({time.time() - t0:.1f}s)")
    return doc


if __name__ == "__main__":
    main()
