"""The rank side of tests/test_distributed.py: runs in processes the test spawns, one gloo process group on
loopback per spawn, and reports (rank, check, status, detail) tuples through a queue. Not collected by
pytest (no test_ prefix); the parent asserts on what comes back.

Every check of a "main" run is collective (all ranks call it in the same order); only rank 0 compares the
gathered results with flash() on the whole sequence and with the float64 reference.
"""
from __future__ import annotations

import datetime
import functools
import os
import time
import traceback

import torch

# Per-rank length: zigzag holds two chunks of 5, contiguous an odd 11. Windows narrower than one chunk,
# and wider than a whole shard on one or both sides (which with 3 and 4 ranks still skips ranks).
PATTERNS = {
    "dense": dict(),
    "causal": dict(causal=True),
    "window_narrow": dict(window=(3, 2)),
    "causal_window_wide": dict(causal=True, window="wide_left"),
    "window_wide": dict(window="wide_both"),
}
LAYOUT_N = {"zigzag": 10, "contiguous": 11}
HEADS = [(4, 2), (2, 2), (3, 1)]  # GQA, MHA, MQA


def case_names():
    names = []
    for dt in ("float64", "float32"):
        for layout in LAYOUT_N:
            for pattern in PATTERNS:
                for d in (40, 64):
                    names.append(f"{dt}-{layout}-{pattern}-d{d}")
    # bf16 on the CPU: computed in fp32, the partials merged unrounded
    return names + ["bfloat16-zigzag-causal-d64", "bfloat16-contiguous-window_wide-d40"]


def case_spec(name: str):
    dt, layout, pattern, d = name.split("-")
    i = case_names().index(name)
    n = LAYOUT_N[layout]
    kw = dict(PATTERNS[pattern])
    if kw.get("window") == "wide_left":
        kw["window"] = (n + 4, 0)
    elif kw.get("window") == "wide_both":
        kw["window"] = (n + 2, n // 2 + 1)
    hq, hk = HEADS[i % len(HEADS)]
    return dict(dtype=getattr(torch, dt), layout=layout, n=n, d=int(d[1:]), hq=hq, hk=hk, b=1 + i % 2,
                use_lse=bool(i % 2), seed=i, kw=kw)


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def check_ring(spec, group=None):
    """ring_flash forward and backward against flash() on the whole sequence and the float64 reference.
    Returns a short summary on rank 0, None elsewhere."""
    import torch.distributed as dist

    import fused_attn
    from fused_attn import distributed as fd, reference
    from conftest import FLOOR, assert_rule, max_err

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dtype, layout, kw = spec["dtype"], spec["layout"], spec["kw"]
    s = spec["n"] * world
    g = torch.Generator().manual_seed(spec["seed"])
    q = _rand(g, spec["b"], spec["hq"], s, spec["d"])
    k = _rand(g, spec["b"], spec["hk"], s, spec["d"])
    v = _rand(g, spec["b"], spec["hk"], s, spec["d"])
    dout = _rand(g, spec["b"], spec["hq"], s, spec["d"])
    dlse = _rand(g, spec["b"], spec["hq"], s)

    part = lambda x: fd.shard(x, group=group, layout=layout)  # noqa: E731
    ql, kl, vl = (part(x.to(dtype)).detach().requires_grad_(True) for x in (q, k, v))
    out, lse = fd.ring_flash(ql, kl, vl, group=group, layout=layout, return_lse=True, **kw)
    loss = (out * part(dout.to(dtype))).sum()
    if spec["use_lse"]:
        loss = loss + (lse * part(dlse).to(lse.dtype)).sum()
    loss.backward()
    got = [fd.unshard(x, group=group, layout=layout) for x in (out.detach(), lse.detach(), ql.grad, kl.grad,
                                                               vl.grad)]
    if rank != 0:
        return None

    def run(fn, dt):
        qq, kk, vv = (x.to(dt).clone().requires_grad_(True) for x in (q, k, v))
        o, l = fn(qq, kk, vv, return_lse=True, **kw)
        total = (o * dout.to(dt)).sum()
        if spec["use_lse"]:
            total = total + (l * dlse.to(l.dtype)).sum()
        total.backward()
        return [o.detach(), l.detach(), qq.grad, kk.grad, vv.grad]

    flash = run(fused_attn.flash, dtype)
    ref = run(reference.attention, torch.float64)
    base = run(reference.attention, dtype)
    worst = 0.0
    for name, a, f, r, b in zip(("out", "lse", "dq", "dk", "dv"), got, flash, ref, base):
        assert a.shape == r.shape, f"{name}: shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert_rule(name, a, r, b, dtype)
        # As close to flash() on the gathered sequence as flash() itself is to the float64 reference.
        err, bound = max_err(a, f), 2.0 * max_err(f, r) + FLOOR[dtype]
        assert err <= bound, f"{name}: ring vs flash error {err:.3e} > bound {bound:.3e}"
        worst = max(worst, err)
    return f"max |ring - flash| = {worst:.2e}"


def expect_error(kind, words, fn):
    """fn() must raise `kind` with every one of `words` in its message; returns the message."""
    try:
        fn()
    except kind as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        assert not missing, f"message lacks {missing}: {msg}"
        return msg
    raise AssertionError(f"expected {kind.__name__}, nothing was raised")


def group_checks(group):
    """(name, callable) pairs every rank of `group` runs in order."""
    import torch.distributed as dist

    from fused_attn import distributed as fd

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    checks = [(name, lambda name=name: check_ring(case_spec(name), group=group)) for name in case_names()]

    def round_trip():
        g = torch.Generator().manual_seed(7)
        for layout in ("zigzag", "contiguous"):
            for dim in (2, 1, -1):
                x = torch.randn(2, 4 * world, 4 * world, 4 * world, generator=g)
                part = fd.shard(x, group=group, layout=layout, dim=dim)
                assert part.shape[dim] == 4, part.shape
                assert torch.equal(fd.unshard(part, group=group, layout=layout, dim=dim), x)
        # zigzag: rank r holds chunks r and 2W-1-r, in that order
        pos = torch.arange(2 * world * 3).view(1, 1, -1, 1)
        got = fd.shard(pos, group=group, layout="zigzag").flatten().tolist()
        want = list(range(3 * rank, 3 * rank + 3)) + list(range(3 * (2 * world - 1 - rank),
                                                               3 * (2 * world - rank)))
        assert got == want, (got, want)
        # the gradient of unshard: every rank's gradient of the full tensor, summed, cut to this part
        w = torch.arange(8.0 * world).view(1, 1, -1, 1)
        x = fd.shard(w, group=group).clone().requires_grad_(True)
        (fd.unshard(x, group=group) * w).sum().backward()
        assert torch.equal(x.grad, world * fd.shard(w, group=group))

    checks.append(("shard_unshard", round_trip))

    def make(n, dtype=torch.float64, device="cpu", b=1, hq=2, hk=1, d=8):
        g = torch.Generator().manual_seed(1)
        return [torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
                for h in (hq, hk, hk)]

    ring = functools.partial(fd.ring_flash, group=group)
    errors = [
        ("error_shape_mismatch", ValueError, ["q:", "same value on every rank", "(1, 2, 12, 8)", "(1, 2, 10, 8)"],
         lambda: ring(*make(12 if rank == 1 else 10))),
        ("error_options_mismatch", ValueError, ["causal/window", "every rank"],
         lambda: ring(*make(10), causal=rank == world - 1)),
        ("error_not_divisible", ValueError, ["S = ", "W = ", f"{2 * world}"],
         lambda: ring(*make(7))),
        ("error_one_rank_bad_dtype", TypeError, ["dtype"],
         lambda: ring(*[t.long() if rank == 1 else t for t in make(10)])),
        ("error_device", ValueError, ["meta", "gloo"],
         lambda: ring(*make(10, device="meta" if rank == 0 else "cpu"))),
        ("error_shard_not_divisible", ValueError, ["S = 9", f"W = {world}"],
         lambda: fd.shard(torch.zeros(1, 1, 9, 2), group=group, layout="contiguous" if world != 3 else "zigzag")),
        ("error_unshard_mismatch", ValueError, ["x_local", "every rank"],
         lambda: fd.unshard(torch.zeros(1, 1, 4 + 2 * rank, 2), group=group)),
        ("error_layout", ValueError, ["layout", "'ring'"],
         lambda: ring(*make(10), layout="ring")),
    ]
    assert tuple(e[0] for e in errors) == ERROR_CHECKS
    for name, kind, words, fn in errors:
        checks.append((name, lambda kind=kind, words=words, fn=fn: expect_error(kind, words, fn)))

    def softcap():
        # Capped scores are merged like any others: their lse is what the kernels return.
        spec = case_spec("float64-zigzag-window_wide-d40")
        spec["kw"] = dict(causal=True, softcap=5.0)
        got = check_ring(spec, group=group)
        spec = case_spec("float32-contiguous-window_narrow-d64")
        spec["kw"] = dict(window=(3, 2), softcap=2.0)
        check_ring(spec, group=group)
        expect_error(ValueError, ["softcap", "-1"], lambda: ring(*make(10), softcap=-1.0))
        return got

    checks.append(("softcap", softcap))
    return checks


def fault_checks(groups, meet):
    """A rank that raises inside the ring, and one that never calls: the others must raise, in bounded
    time, instead of hanging. Each scenario has its own 3-rank group (a failed one is left broken); rank 1
    stays alive until the others are done (meet(): a barrier on a healthy group), so they must time out
    rather than see its connections close."""
    import torch.distributed as dist

    from fused_attn import distributed as fd

    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))

    def raising_inside():
        group = groups[0]
        if dist.get_rank(group) == 1:
            real = fd._op_fwd

            def failing(*args):
                raise RuntimeError("injected failure on rank 1")

            fd._op_fwd = failing  # fails in its first kernel call, after posting its first transfers
            try:
                expect_error(RuntimeError, ["injected"], lambda: fd.ring_flash(q, k, v, group=group, causal=True))
            finally:
                fd._op_fwd = real
            meet()
            return "raised"
        t0 = time.perf_counter()
        qq = q.clone().requires_grad_(True)
        # A rank may finish the forward with what it already received; the backward needs rank 1 again.
        try:
            expect_error(RuntimeError, ["rank", "within"],
                         lambda: fd.ring_flash(qq, k, v, group=group, causal=True).sum().backward())
            elapsed = time.perf_counter() - t0
        finally:
            meet()
        return f"raised after {elapsed:.1f} s"

    def never_called():
        group = groups[1]
        if dist.get_rank(group) == 1:
            meet()
            return "did not call"
        t0 = time.perf_counter()
        try:
            expect_error(RuntimeError, ["exchange"], lambda: fd.ring_flash(q, k, v, group=group))
            elapsed = time.perf_counter() - t0
        finally:
            meet()
        return f"raised after {elapsed:.1f} s"

    return [("raising_inside", raising_inside), ("never_called", never_called)]


WORLD = 4  # processes spawned; groups of 2, 3 and 4 of them run the checks
ERROR_CHECKS = ("error_shape_mismatch", "error_options_mismatch", "error_not_divisible", "error_one_rank_bad_dtype",
                "error_device", "error_shard_not_divisible", "error_unshard_mismatch", "error_layout")


def all_checks(rank, slow_wait_s):
    """(name, member ranks, callable) for every check; a rank runs those it is a member of, in order.
    Groups are made up front by all ranks (new_group is collective over the world)."""
    import torch.distributed as dist

    groups = {4: dist.group.WORLD, 3: dist.new_group([0, 1, 2]), 2: dist.new_group([0, 1])}
    singles = [dist.new_group([r]) for r in range(WORLD)]
    odd = dist.new_group([1, 3])
    fault_timeout = datetime.timedelta(seconds=float(os.environ["RING_TEST_FAULT_TIMEOUT"]))
    faulty = [dist.new_group([0, 1, 2], timeout=fault_timeout) for _ in range(2)]

    # One-rank groups (the ring without any transfer), and a group whose ranks are not the global ones.
    checks = [("one_rank_group", tuple(range(WORLD)),
               lambda: check_ring(case_spec("float64-zigzag-window_wide-d40"), group=singles[rank])),
              ("subgroup", (1, 3), lambda: check_ring(case_spec("float32-contiguous-window_wide-d64"), group=odd))]
    for w in (4, 3, 2):
        if rank < w:
            checks += [(f"{name}@{w}", tuple(range(w)), fn) for name, fn in group_checks(groups[w])]
    # Ranks 0-2 meet before the fault checks, whose groups have a short timeout: rank 2 waits here while
    # ranks 0 and 1 run the 2-rank checks.
    wait = datetime.timedelta(seconds=slow_wait_s)
    checks.append(("sync", (0, 1, 2), lambda: dist.monitored_barrier(groups[3], timeout=wait)))
    if rank < 3:
        checks += [(name, (0, 1, 2), fn) for name, fn in fault_checks(faulty, lambda: dist.monitored_barrier(
            groups[3], timeout=wait))]
    return checks


def run(rank, init_file, queue, timeout_s, slow_wait_s):
    """Process entry point: join the group, run this rank's checks, report each, then exit hard (the
    groups left broken by the fault checks must not block the interpreter's shutdown)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=timeout_s))
        for name, members, fn in all_checks(rank, slow_wait_s):
            if rank not in members:
                continue
            t0 = time.perf_counter()
            try:
                detail = fn()
                detail = ("" if detail is None else f"{detail} ") + f"[{time.perf_counter() - t0:.2f} s]"
                queue.put((rank, name, "ok", detail))
            except BaseException:  # noqa: BLE001  (reported to the parent, which fails the test)
                queue.put((rank, name, "fail", traceback.format_exc()))
    except BaseException:  # noqa: BLE001
        queue.put((rank, "<setup>", "fail", traceback.format_exc()))
    finally:
        queue.put((rank, None, "done", ""))
        queue.close()
        queue.join_thread()
        os._exit(0)
