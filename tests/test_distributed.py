"""fused_attn.distributed: ring attention on gloo process groups of 2, 3 and 4 ranks, spawned here on
loopback, against flash() on the gathered sequence and the float64 reference (forward and backward, fp64
and fp32, dense / causal / windows narrower and wider than a shard, GQA and MQA, D 40 and 64, both
layouts); shard/unshard; errors raised on every rank; a failing rank does not hang the others. The plan
(which keys each call covers, which blocks travel) is checked here without processes.

Each group size is spawned once for all its checks (tests/_ring_worker.py runs on the ranks); every wait
is bounded: the group's timeout inside, a deadline on the whole spawn outside.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import time

import pytest
import torch

import fused_attn
from fused_attn import distributed as fd
from fused_attn import reference

import _ring_worker as worker

SPAWN_DEADLINE_S = 100   # a whole spawn (start-up, every check, shutdown) on a loaded 2-core machine
GROUP_TIMEOUT_S = 60     # each blocking wait inside the ranks (process group timeout)
FAULT_TIMEOUT_S = 3      # the group timeout of the fault scenarios


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _spawn(tmp_dir):
    """Runs tests/_ring_worker.py on worker.WORLD spawned ranks; returns {(rank, check): (status, detail)}.
    Ranks still alive at the deadline are killed (by their own pids) and reported as a failure."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_file = os.path.join(str(tmp_dir), "rendezvous")
    # Loopback only (gloo binds to lo, the store is a file); one thread per rank.
    with _env(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", RING_TEST_FAULT_TIMEOUT=str(FAULT_TIMEOUT_S)):
        procs = [ctx.Process(target=worker.run, args=(r, init_file, q, GROUP_TIMEOUT_S, SPAWN_DEADLINE_S),
                             daemon=True) for r in range(worker.WORLD)]
        for p in procs:
            p.start()
    results, done = {}, set()
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while len(done) < worker.WORLD:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, name, status, detail = q.get(timeout=min(left, 5.0))
            except queue_mod.Empty:
                if all(not p.is_alive() for p in procs) and q.empty():
                    break
                continue
            if name is None:
                done.add(rank)
            else:
                results[(rank, name)] = (status, detail)
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = sorted(set(range(worker.WORLD)) - done)
    if missing:
        results[("spawn", "deadline")] = ("fail", f"ranks {missing} did not finish within {SPAWN_DEADLINE_S} s")
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of 4 ranks for the whole module (start-up is most of the cost on 2 cores)."""
    return _spawn(tmp_path_factory.mktemp("ring"))


def _assert_ranks(results, ranks, name):
    """The check `name` passed on every rank in `ranks`; returns their details."""
    setup = [results[(r, "<setup>")][1] for r in ranks if (r, "<setup>") in results]
    assert not setup, "rank set-up failed:\n" + setup[0]
    details = []
    for r in ranks:
        assert (r, name) in results, f"rank {r} did not report {name} ({results.get(('spawn', 'deadline'))})"
        status, detail = results[(r, name)]
        assert status == "ok", f"rank {r}, {name}:\n{detail}"
        details.append(detail)
    return details


WORLDS = [2, 3, 4]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", worker.case_names())
def test_ring_matches_flash(spawned, world, case):
    _assert_ranks(spawned, range(world), f"{case}@{world}")


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("check", ("shard_unshard",) + worker.ERROR_CHECKS)
def test_collective_checks(spawned, world, check):
    _assert_ranks(spawned, range(world), f"{check}@{world}")


@pytest.mark.parametrize("world", WORLDS)
def test_softcap(spawned, world):
    _assert_ranks(spawned, range(world), f"softcap@{world}")


def test_one_rank_groups(spawned):
    _assert_ranks(spawned, range(worker.WORLD), "one_rank_group")


def test_subgroup_with_other_global_ranks(spawned):
    _assert_ranks(spawned, (1, 3), "subgroup")


@pytest.mark.parametrize("check", ["raising_inside", "never_called"])
def test_failing_rank_does_not_hang_the_others(spawned, check):
    details = _assert_ranks(spawned, (0, 1, 2), check)
    for r in (0, 2):
        secs = float(details[r].split()[2])
        assert secs < FAULT_TIMEOUT_S + 15, f"rank {r} took {secs} s to give up"


def test_missing_process_group():
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="group: no default process group"):
        fd.ring_flash(q, q, q)
    with pytest.raises(ValueError, match="group: no default process group"):
        fd.shard(q)
    with pytest.raises(ValueError, match="group: no default process group"):
        fd.unshard(q)


def test_public_surface():
    assert fused_attn.distributed is fd
    assert set(fd.__all__) == {"ring_flash", "shard", "unshard"}


# ----------------------------------------------------------------------------------------- the plan


def _covered(world, n, layout, left, right):
    """How many plan calls cover each (query, key) pair of the whole sequence, from the plan alone."""
    plan = fd._plan(world, n, layout, left, right)
    s = world * n
    count = torch.zeros(s, s, dtype=torch.int64)

    def positions(rank):
        pos = torch.empty(n, dtype=torch.int64)
        for lo, g, ln in fd._segments(rank, world, n, layout):
            pos[lo:lo + ln] = torch.arange(g, g + ln)
        return pos

    for (r, src), calls in plan.calls.items():
        qpos, kpos = positions(r), positions(src)
        for c in calls:
            vis = reference.visible_mask(c.q1 - c.q0, c.k1 - c.k0, left=c.left, right=c.right)[0, 0]
            i, j = vis.nonzero(as_tuple=True)
            count.index_put_((qpos[c.q0 + i], kpos[c.k0 + j]), torch.ones_like(i), accumulate=True)
    return plan, count


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (0, 0), (3, 0), (3, 2), (13, 0), (13, 5), (30, -1),
                                        (-1, 4), (2, 17)])
def test_plan_covers_each_visible_pair_once(layout, world, left, right):
    n = 8
    plan, count = _covered(world, n, layout, left, right)
    want = reference.visible_mask(world * n, world * n, left=left, right=right)[0, 0]
    assert torch.equal(count, want.long()), f"pairs covered {int((count != want.long()).sum())} times wrong"


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (3, 0), (3, 2), (13, 0), (13, 5), (2, 17)])
def test_plan_transfers_bring_every_key_used(layout, world, left, right):
    """Simulates the rings: at each step a rank holds exactly the key rows sent to it, and every call it
    makes on a block reads only rows it holds; each dK/dV accumulator goes home once."""
    n = 8
    plan = fd._plan(world, n, layout, left, right)
    for (r, s), calls in plan.calls.items():
        if r == s:
            continue
        d = plan.cover[(r, s)]
        t = ((r - s) if d == 1 else (s - r)) % world
        lo, hi = plan.kv_range[(s, d, t)]
        assert all(lo <= c.k0 and c.k1 <= hi for c in calls), (r, s, calls, (lo, hi))
        u0, u1 = plan.chains[(s, d)]
        assert u0 <= t <= u1
        a_lo, a_hi = plan.acc_range[(s, d)]
        assert all(a_lo <= c.k0 and c.k1 <= a_hi for c in calls)
    for (s, d, t), (lo, hi) in plan.kv_range.items():  # a block shrinks as it travels, never grows
        if t > 1:
            plo, phi = plan.kv_range[(s, d, t - 1)]
            assert plo <= lo and hi <= phi


def test_plan_follows_the_window():
    n = 64
    # Causal, window narrower than a shard, contiguous: only the left neighbour's last 16 keys travel.
    plan = fd._plan(8, n, "contiguous", 16, 0)
    assert plan.steps == 1
    assert {key[:2] for key in plan.kv_range} == {(s, 1) for s in range(7)}
    assert all(hi - lo == 16 for lo, hi in plan.kv_range.values())
    # Dense and causal: one forward ring around all ranks (causal contiguous skips blocks no one sees).
    assert fd._plan(8, n, "zigzag", -1, -1).steps == 7
    assert fd._plan(8, n, "zigzag", -1, 0).steps == 7
    causal = fd._plan(8, n, "contiguous", -1, 0)
    assert all(t <= 7 - s for (s, d, t) in causal.kv_range)  # rank 7's block never travels
    # Zigzag with a narrow causal window: both neighbours, one step each way.
    zz = fd._plan(8, n, "zigzag", 16, 0)
    assert zz.steps == 1 and {d for (_, d, _) in zz.kv_range} == {1, -1}
    # A window wider than one shard on the left only: as many steps as shards it reaches.
    assert fd._plan(8, n, "contiguous", 100, 0).steps == 2
    # Calls per step: the own block of a causal zigzag rank is one causal call, a remote one one call.
    assert len(fd._plan(4, n, "zigzag", -1, 0).calls[(1, 1)]) == 1
    assert all(len(c) == 1 for c in fd._plan(4, n, "zigzag", -1, 0).calls.values())
