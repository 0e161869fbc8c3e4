"""Ring attention (context parallelism) on torch.distributed, forward and backward.

    out = ring_flash(q, k, v, *, group=None, causal=False, window=None, scale=None, softcap=0.0,
                     return_lse=False, layout="zigzag")
    part = shard(x, *, group=None, layout="zigzag", dim=2)        # full sequence -> this rank's part
    full = unshard(part, *, group=None, layout="zigzag", dim=2)   # this rank's part -> full (all-gather)

A sequence of length S is split across the W ranks of a process group; each rank holds S/W positions of
q, k and v. Layout "contiguous": rank r holds [r*S/W, (r+1)*S/W). Layout "zigzag": the sequence is cut into
2W chunks and rank r holds chunks r and 2W-1-r, in that order, so that every rank does the same causal work.

How it works (one code path for gloo on CPU tensors and NCCL on CUDA tensors):

- The plan. From (W, S/W, layout, causal, window) every rank computes the same plan: for each pair (rank
  r, key block of rank s) the kernel calls that cover the (query, key) pairs r sees in s's block (none
  when no local query sees the block: above the causal diagonal, outside the window). Each call is a
  rectangle of local rows and keys with a band (left, right) for the op, cut to the rows and keys that
  take part, so the kernels' own trip counts skip the invisible tiles. Zigzag's two chunks per rank are
  covered by as few calls as possible (one causal call for the rank's own block).
- The rings. Key/value blocks travel around a ring with torch.distributed.batch_isend_irecv: at step t
  rank r holds the block of rank r - t, and the block of step t + 1 is in flight while step t is
  computed. A forward ring runs only as far as the farthest rank whose keys someone sees; with a window
  that needs keys on both sides (non-causal windows, zigzag) a second ring runs the other way; and a
  block is forwarded only while a later rank still needs it, cut to the key range those ranks see. So
  with a window narrower than the sequence, computation and communication follow the window, not S.
- Merging. Each call returns a partial output and its log-sum-exp; partials are merged in fp32 (fp64 for
  fp64 inputs) as out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i.
- Backward. The fused backward op, called on one block with the *global* merged out and lse, returns
  exactly that block's share of dq, dk and dv (its probabilities exp(s - lse) are the global ones). K/V
  travel the same rings again; dq accumulates locally; each block's dK/dV accumulator travels with it
  from the first rank that contributes to the last, then goes home in one message.
- Checks. Every rank validates its own arguments, then the ranks exchange (once per call, one small
  all_gather_object) either their error or a signature of shapes and options: a bad or mismatched input
  raises the same kind of error on every rank before any point-to-point transfer. Every blocking wait on
  a CPU (gloo) transfer has the process group's timeout; NCCL's own watchdog bounds the CUDA ones.

Every rank of the group must make the same calls, in the same order (forward and backward).
"""
from __future__ import annotations

import datetime
import functools
import math
import numbers
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _ops  # noqa: F401  (registers torch.ops.fused_attn)
from ._args import _shape, check_inputs, check_softcap

__all__ = ["ring_flash", "shard", "unshard"]

LAYOUTS = ("zigzag", "contiguous")
_UNB = 1 << 60  # an unbounded side of a band of (key - query) position differences

# Set to a list to record, per ring step, the seconds spent computing and waiting for transfers
# (bench/ring_bench.py reads it); None records nothing. CUDA work is synchronised when it is a list.
_PROFILE = None


# ------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Call:
    """One kernel call: local query rows [q0, q1) against key rows [k0, k1) of a block, with the op's
    window (left, right) relative to that rectangle."""
    q0: int
    q1: int
    k0: int
    k1: int
    left: int
    right: int


def _segments(rank: int, world: int, n: int, layout: str):
    """(local start, global start, length) of each contiguous run of positions rank holds, in order."""
    if layout == "contiguous":
        return ((0, rank * n, n),)
    c = n // 2
    return ((0, rank * c, c), (c, (2 * world - 1 - rank) * c, c))


def _pair_geometry(qseg, kseg, dmin: int, dmax: int):
    """For a (query run, key run) pair: the band on *local* differences (key index - query index) that
    the global band [dmin, dmax] becomes, and the range of local differences the pair spans."""
    lq, gq, nq = qseg
    lk, gk, nk = kseg
    shift = (gk - lk) - (gq - lq)
    lo = dmin - shift if dmin > -_UNB else -_UNB
    hi = dmax - shift if dmax < _UNB else _UNB
    return (lo, hi), (lk - (lq + nq - 1), lk + nk - 1 - lq)


def _clip(band, span):
    lo, hi = max(band[0], span[0]), min(band[1], span[1])
    return (lo, hi) if lo <= hi else None


def _box_call(q0: int, q1: int, k0: int, k1: int, lo: int, hi: int):
    """The op call for local rows [q0, q1) x keys [k0, k1) where key j is visible to query i iff
    lo <= j - i <= hi, cut to the rows and keys that see / are seen by something; None when nothing is."""
    lo, hi = lo - (k0 - q0), hi - (k0 - q0)  # relative to the rectangle's corner
    nq, nk = q1 - q0, k1 - k0
    i0, i1 = max(0, -hi), min(nq, nk - lo)
    j0, j1 = max(0, lo), min(nk, nq + hi)
    if i0 >= i1 or j0 >= j1:
        return None
    lo, hi = lo - (j0 - i0), hi - (j0 - i0)
    sq, sk = i1 - i0, j1 - j0
    off = sk - sq  # the op aligns the band bottom-right: query i sees i + off - left ..= i + off + right
    left, right = off - lo, hi - off
    # The cut rectangle's bottom-right corner is always visible for a band, so both are >= 0.
    if left < 0 or right < 0:
        raise RuntimeError(f"fused_attn.distributed: internal plan error (left={left}, right={right})")
    left = -1 if left >= sk - 1 else left
    right = -1 if right >= sq - 1 else right
    return _Call(q0 + i0, q0 + i1, k0 + j0, k0 + j1, left, right)


def _seen(qsegs, ksegs, dmin: int, dmax: int):
    """For each pair of runs (query runs outer), the interval of local differences at which keys are
    visible, or None: with the runs' local positions, all a plan needs to know about the pair."""
    return tuple(_clip(*_pair_geometry(a, b, dmin, dmax)) for a in qsegs for b in ksegs)


@functools.lru_cache(maxsize=4096)
def _calls_for(qloc, kloc, seen):
    """Fewest calls covering the local query runs qloc x key runs kloc ((start, length) each, consecutive in
    memory) that see what `seen` says: everything in one call, row by row or column by column, falling
    back to one call per pair of runs. Cached: ranks and pairs that look alike share their calls."""
    nk = len(kloc)
    span = {(i, j): (lk - (lq + n - 1), lk + m - 1 - lq)
            for i, (lq, n) in enumerate(qloc) for j, (lk, m) in enumerate(kloc)}

    def rect(rows, cols):
        """[call] or [] when one band in local coordinates describes the rectangle, else None."""
        pairs = [(span[(i, j)], seen[i * nk + j]) for i in rows for j in cols]
        if all(c is None for _, c in pairs):
            return []
        # A band's left edge is forced by a pair whose visible part starts inside its span, or must stay
        # past an empty pair's span; likewise the right edge.
        los = {-_UNB} | {c[0] for sp, c in pairs if c and c[0] > sp[0]} | {sp[1] + 1 for sp, c in pairs if not c}
        his = {_UNB} | {c[1] for sp, c in pairs if c and c[1] < sp[1]} | {sp[0] - 1 for sp, c in pairs if not c}
        for lo in sorted(los):
            for hi in sorted(his):
                if lo <= hi and all(_clip((lo, hi), sp) == c for sp, c in pairs):
                    q0, q1 = qloc[rows[0]][0], qloc[rows[-1]][0] + qloc[rows[-1]][1]
                    k0, k1 = kloc[cols[0]][0], kloc[cols[-1]][0] + kloc[cols[-1]][1]
                    call = _box_call(q0, q1, k0, k1, lo, hi)
                    return [call] if call is not None else []
        return None

    def split(rects):
        calls = []
        for rows, cols in rects:
            got = rect(rows, cols)
            if got is None:
                got = [c for i in rows for j in cols for c in rect((i,), (j,))]
            calls += got
        return calls

    rows, cols = tuple(range(len(qloc))), tuple(range(nk))
    whole = rect(rows, cols)
    if whole is not None:
        return tuple(whole)
    options = [split([((i,), cols) for i in rows]), split([(rows, (j,)) for j in cols])]
    return tuple(min(options, key=len))


def _pair_calls(qsegs, ksegs, dmin: int, dmax: int):
    """The calls covering the query runs qsegs against the key runs ksegs ((local start, global start,
    length) each)."""
    return _calls_for(tuple((l, n) for l, _, n in qsegs), tuple((l, n) for l, _, n in ksegs),
                      _seen(qsegs, ksegs, dmin, dmax))


@dataclass(frozen=True)
class _Plan:
    world: int
    calls: dict        # (r, s) -> tuple of _Call: rank r's queries against rank s's keys
    cover: dict        # (r, s) -> +1 / -1: which ring brings s's block to r (absent: not needed)
    steps: int         # ring steps (the longer of the two rings)
    chains: dict       # (s, dir) -> (u0, u1): first and last step at which a rank uses s's block
    kv_range: dict     # (s, dir, t) -> (lo, hi): key rows of s's block still needed at steps >= t
    acc_range: dict    # (s, dir) -> (lo, hi): key rows the dK/dV accumulator of the chain covers


def _band(left: int, right: int):
    """Global band of (key position - query position) for a window (left, right), -1 unbounded."""
    return (-left if left >= 0 else -_UNB), (right if right >= 0 else _UNB)


@functools.lru_cache(maxsize=256)
def _plan(world: int, n: int, layout: str, left: int, right: int) -> _Plan:
    dmin, dmax = _band(left, right)
    segs = [_segments(r, world, n, layout) for r in range(world)]
    calls = {}
    for r in range(world):
        for s in range(world):
            c = _pair_calls(segs[r], segs[s], dmin, dmax)
            if c:
                calls[(r, s)] = c
    needed = [(r, s) for (r, s) in calls if r != s]
    # Forward ring of f steps (block of r - t at step t), backward ring of b steps (r + t): the fewest
    # transfers that bring every needed block; ties go to the plain forward ring.
    by_f = [0] * world  # by_f[x]: the farthest backward distance among needed pairs at forward distance x
    for r, s in needed:
        by_f[(r - s) % world] = max(by_f[(r - s) % world], (s - r) % world)
    best, b = None, 0
    for f in reversed(range(world)):  # b: what a backward ring must reach when the forward one stops at f
        if best is None or (f + b, b) <= best[0]:
            best = ((f + b, b), f, b)
        b = max(b, by_f[f])
    _, f, b = best
    cover = {(r, s): (1 if (r - s) % world <= f else -1) for (r, s) in needed}
    chains, kv_range, acc_range = {}, {}, {}
    for s in range(world):
        for d, length in ((1, f), (-1, b)):
            users = [(u, (s + d * u) % world) for u in range(1, length + 1)]
            users = [(u, x) for u, x in users if cover.get((x, s)) == d]
            if not users:
                continue
            chains[(s, d)] = (users[0][0], users[-1][0])
            hull = None  # key rows still needed from step t on: the hull over the users at steps >= t
            for i in reversed(range(len(users))):
                u, x = users[i]
                lo, hi = min(c.k0 for c in calls[(x, s)]), max(c.k1 for c in calls[(x, s)])
                hull = (lo, hi) if hull is None else (min(hull[0], lo), max(hull[1], hi))
                for t in range(users[i - 1][0] + 1 if i else 1, u + 1):
                    kv_range[(s, d, t)] = hull
            acc_range[(s, d)] = kv_range[(s, d, 1)]
    steps = max((u1 for (_, u1) in chains.values()), default=0)
    return _Plan(world, calls, cover, steps, chains, kv_range, acc_range)


# ------------------------------------------------------------------------------- process groups


def _group_info(group, fn: str):
    """(group, rank in group, world size), raising ValueError for a missing or foreign group."""
    if not dist.is_available():
        raise ValueError(f"group: {fn} needs torch.distributed, which this build of torch lacks")
    if group is None:
        if not dist.is_initialized():
            raise ValueError(f"group: no default process group: call torch.distributed.init_process_group() "
                             f"before {fn}, or pass group=")
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group "
                         f"passed to {fn}")
    return group, rank, dist.get_world_size(group)


# Which device types a backend moves point to point.
_BACKEND_DEVICES = {"gloo": ("cpu",), "nccl": ("cuda",), "mpi": ("cpu",), "ucc": ("cpu", "cuda"),
                    "xccl": ("xpu",)}


def _check_device(group, t: torch.Tensor, name: str) -> None:
    spec = str(dist.get_backend(group)).lower()
    if ":" in spec:  # "cpu:gloo,cuda:nccl"
        per_device = dict(item.split(":", 1) for item in spec.split(","))
        backend = per_device.get(t.device.type)
    else:
        backend = spec
    if backend is None or t.device.type not in _BACKEND_DEVICES.get(backend, (t.device.type,)):
        raise ValueError(f"{name}: is on device {t.device}, which the process group's backend {spec!r} cannot "
                         "carry (gloo carries CPU tensors, nccl CUDA tensors)")


def _timeout(group, device: torch.device) -> datetime.timedelta:
    """The process group's own timeout (init_process_group(timeout=...)), else 10 minutes."""
    try:
        return group._get_backend(device).options._timeout
    except Exception:  # an older torch or a backend without options: a fixed bound
        return datetime.timedelta(minutes=10)


def _exchange(group, rank: int, world: int, fn: str, error, signature):
    """All ranks learn every rank's local error or signature; raises the same kind of error everywhere.

    error: None or the ValueError/TypeError this rank's checks raised. signature: tuple of (name, value)
    pairs that must agree across ranks."""
    mine = None if error is None else (type(error).__name__, str(error))  # plain data, safe to unpickle
    gathered = [None] * world
    try:
        dist.all_gather_object(gathered, (mine, signature), group=group)
    except RuntimeError as e:
        raise RuntimeError(f"{fn}: rank {rank} could not exchange its input description with the other ranks "
                           f"of the group (a rank raised, exited or did not call {fn}): {e}") from e
    if error is not None:
        raise error
    for other, (err, _) in enumerate(gathered):
        if err is not None:
            kind = TypeError if err[0] == "TypeError" else ValueError
            raise kind(f"{fn}: rank {other} of the group rejected its input: {err[1]}")
    for other, (_, sig) in enumerate(gathered):
        for (name, value), (_, theirs) in zip(signature, sig):
            if value != theirs:
                raise ValueError(f"{name}: expected the same value on every rank of the group, got {value} on "
                                 f"rank {rank} and {theirs} on rank {other}")


def _collect_error(fn):
    """Runs fn(); returns None or the ValueError/TypeError it raised."""
    try:
        fn()
    except (ValueError, TypeError) as e:
        return e
    return None


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'zigzag' or 'contiguous', got {layout!r}")


def _check_divisible(name: str, s_full: int, world: int, layout: str, per_rank: bool) -> None:
    parts = 2 * world if layout == "zigzag" else world
    if s_full % parts:
        what = f"S = {s_full} ({s_full // world} per rank)" if per_rank else f"S = {s_full}"
        raise ValueError(f"{name}: layout {layout!r} needs the sequence length S divisible by "
                         f"{'2W' if layout == 'zigzag' else 'W'} = {parts}, got {what} and W = {world}")


def _wait(work, cfg, what: str) -> None:
    """Waits for one transfer: bounded by the group's timeout on CPU; on CUDA the current stream waits
    (NCCL's watchdog aborts a transfer that outlives the group's timeout)."""
    try:
        done = work.wait(cfg.timeout) if cfg.device.type == "cpu" else work.wait()
    except RuntimeError as e:
        raise RuntimeError(f"{cfg.fn}: rank {cfg.rank}: {what} failed or did not complete within "
                           f"{cfg.timeout.total_seconds():g} s (a peer rank raised, exited, or did not make the "
                           f"same call): {e}") from e
    if done is False:
        raise RuntimeError(f"{cfg.fn}: rank {cfg.rank}: {what} did not complete within "
                           f"{cfg.timeout.total_seconds():g} s")


# ------------------------------------------------------------------------------------- ring_flash


@dataclass
class _Config:
    fn: str
    group: object
    rank: int
    world: int
    device: torch.device
    timeout: datetime.timedelta
    plan: _Plan
    scale: float
    softcap: float
    acc_dtype: torch.dtype
    compute_dtype: torch.dtype  # what the kernels are given (see _compute_dtype)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp16/bf16 on the CPU are handed to the kernels as fp32: the CPU kernels compute in fp32 anyway, and
    so the partial outputs and the dK/dV contributions come back unrounded and are rounded once, at the end,
    as flash() does. Blocks still travel in their own dtype. (CUDA's tensor-core kernels take and return
    fp16/bf16: there the partials are rounded, as in every ring attention built on such kernels.)"""
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


class _Transfers:
    """Point-to-point messages posted as one batch, remembered until waited on."""

    def __init__(self, cfg: _Config):
        self.cfg = cfg
        self.ops = []
        self.recvs = {}   # key -> (works, tensors)
        self.sends = []

    def send(self, tensors, peer: int) -> None:
        for t in tensors:
            self.ops.append(dist.P2POp(dist.isend, t, _global(self.cfg, peer), group=self.cfg.group))
            self.sends.append(len(self.ops) - 1)

    def recv(self, key, tensors, peer: int) -> None:
        first = len(self.ops)
        for t in tensors:
            self.ops.append(dist.P2POp(dist.irecv, t, _global(self.cfg, peer), group=self.cfg.group))
        self.recvs[key] = (list(range(first, len(self.ops))), tensors)

    def post(self) -> "_Transfers":
        works = dist.batch_isend_irecv(self.ops) if self.ops else []
        # gloo answers one request per message; a coalescing backend (NCCL) one for the whole batch.
        self.works = [[w] for w in works] if len(works) == len(self.ops) else [works] * len(self.ops)
        return self

    def get(self, key, what: str):
        idx, tensors = self.recvs.pop(key)
        for i in idx:
            for work in self.works[i]:
                _wait(work, self.cfg, what)
        return tensors

    def has(self, key) -> bool:
        return key in self.recvs

    def finish(self, what: str) -> None:
        for i in self.sends:
            for work in self.works[i]:
                _wait(work, self.cfg, what)
        self.sends = []


def _global(cfg: _Config, peer: int) -> int:
    return dist.get_global_rank(cfg.group, peer)


def _post_kv(cfg: _Config, t: int, held: dict) -> _Transfers:
    """Posts the key/value transfers that bring the blocks of step t (held: dir -> (k, v, first key row))."""
    plan, r, w = cfg.plan, cfg.rank, cfg.world
    tr = _Transfers(cfg)
    for d in (1, -1):
        s_out = (r - d * (t - 1)) % w  # the block this rank holds at step t - 1, wanted by r + d at step t
        rng = plan.kv_range.get((s_out, d, t))
        if rng is not None:
            k, v, off = held[d]
            tr.send([x[:, :, rng[0] - off:rng[1] - off].contiguous() for x in (k, v)], (r + d) % w)
        s_in = (r - d * t) % w
        rng = plan.kv_range.get((s_in, d, t))
        if rng is not None:
            k, v, _ = held[0]
            shape = (k.shape[0], k.shape[1], rng[1] - rng[0], k.shape[3])
            tr.recv(d, [k.new_empty(shape), v.new_empty(shape)], (r - d) % w)
    return tr.post()


def _take_kv(cfg: _Config, tr: _Transfers, t: int, held: dict) -> None:
    for d in (1, -1):
        if tr.has(d):
            k, v = tr.get(d, f"receiving the key/value block of ring step {t}")
            held[d] = (k, v, cfg.plan.kv_range[((cfg.rank - d * t) % cfg.world, d, t)][0])
    tr.finish(f"sending the key/value block of ring step {t}")


def _op_fwd(cfg, q, k, v, c: _Call):
    return torch.ops.fused_attn.fwd(q, k, v, cfg.scale, c.left, c.right, [], [], cfg.softcap)


def _merge(acc_o: torch.Tensor, acc_l: torch.Tensor, o: torch.Tensor, l: torch.Tensor) -> None:
    """acc <- the softmax-weighted union of acc and (o, l), in place; rows with nothing yet stay 0, -inf."""
    new = torch.logaddexp(acc_l, l)
    base = new.masked_fill(new == float("-inf"), 0.0)
    acc_o.mul_(torch.exp(acc_l - base).unsqueeze(-1)).add_(o.to(acc_o.dtype) * torch.exp(l - base).unsqueeze(-1))
    acc_l.copy_(new)


class _Clock:
    """Per-step compute and transfer-wait seconds for _PROFILE (CUDA work is synchronised first); does
    nothing when _PROFILE is None."""

    def __init__(self, cfg: _Config, pass_: str):
        self.cfg, self.pass_, self.on = cfg, pass_, _PROFILE is not None
        self.compute = self.wait = 0.0

    def _now(self) -> float:
        if self.cfg.device.type == "cuda":
            torch.cuda.synchronize(self.cfg.device)
        return time.perf_counter()

    def timed(self, kind: str, fn, *args):
        if not self.on:
            return fn(*args)
        t0 = self._now()
        result = fn(*args)
        setattr(self, kind, getattr(self, kind) + self._now() - t0)
        return result

    def step_done(self, step: int) -> None:
        if self.on:
            _PROFILE.append(dict(rank=self.cfg.rank, world=self.cfg.world, pass_=self.pass_, step=step,
                                 compute_s=self.compute, wait_s=self.wait))
            self.compute = self.wait = 0.0


def _ring_forward(cfg: _Config, q, k, v):
    plan, r, w = cfg.plan, cfg.rank, cfg.world
    b, hq, n, dh = q.shape
    acc_o = torch.zeros((b, hq, n, dh), dtype=cfg.acc_dtype, device=q.device)
    acc_l = torch.full((b, hq, n), float("-inf"), dtype=cfg.acc_dtype, device=q.device)
    held = {0: (k, v, 0), 1: (k, v, 0), -1: (k, v, 0)}
    clock = _Clock(cfg, "fwd")
    q = q.to(cfg.compute_dtype)

    def compute(s, kb, vb, off):
        kb, vb = kb.to(cfg.compute_dtype), vb.to(cfg.compute_dtype)
        for c in plan.calls.get((r, s), ()):
            o, lse = _op_fwd(cfg, q[:, :, c.q0:c.q1], kb[:, :, c.k0 - off:c.k1 - off],
                             vb[:, :, c.k0 - off:c.k1 - off], c)
            _merge(acc_o[:, :, c.q0:c.q1], acc_l[:, :, c.q0:c.q1], o, lse)

    tr = _post_kv(cfg, 1, held) if plan.steps else None
    clock.timed("compute", compute, r, k, v, 0)
    clock.step_done(0)
    for t in range(1, plan.steps + 1):
        clock.timed("wait", _take_kv, cfg, tr, t, held)
        tr = _post_kv(cfg, t + 1, held) if t < plan.steps else None
        for d in (1, -1):
            s = (r - d * t) % w
            if plan.cover.get((r, s)) == d:
                clock.timed("compute", compute, s, *held[d])
        clock.step_done(t)
    return acc_o, acc_l


def _ring_backward(cfg: _Config, dout, dlse, q, k, v, out, lse):
    plan, r, w = cfg.plan, cfg.rank, cfg.world
    dq = torch.zeros(q.shape, dtype=cfg.acc_dtype, device=q.device)
    dk_home = torch.zeros(k.shape, dtype=cfg.acc_dtype, device=k.device)
    dv_home = torch.zeros(k.shape, dtype=cfg.acc_dtype, device=k.device)
    held = {0: (k, v, 0), 1: (k, v, 0), -1: (k, v, 0)}
    cdt = cfg.compute_dtype
    q_dtype = q.dtype
    q, out, dout = q.to(cdt), out.to(cdt), dout.to(cdt).contiguous()
    clock = _Clock(cfg, "bwd")

    def compute(s, kb, vb, off, dk_acc, dv_acc, acc_off):
        kb, vb = kb.to(cdt), vb.to(cdt)
        for c in plan.calls.get((r, s), ()):
            rows = slice(c.q0, c.q1)
            keys = slice(c.k0 - off, c.k1 - off)
            gq, gk, gv = torch.ops.fused_attn.bwd(
                dout[:, :, rows], q[:, :, rows], kb[:, :, keys], vb[:, :, keys], out[:, :, rows],
                lse[:, :, rows], None if dlse is None else dlse[:, :, rows], cfg.scale, c.left, c.right, [], [],
                False, cfg.softcap)
            dq[:, :, rows] += gq
            dk_acc[:, :, c.k0 - acc_off:c.k1 - acc_off] += gk
            dv_acc[:, :, c.k0 - acc_off:c.k1 - acc_off] += gv

    def acc_buffers(rng):
        shape = (k.shape[0], k.shape[1], rng[1] - rng[0], k.shape[3])
        return [torch.zeros(shape, dtype=cfg.acc_dtype, device=k.device) for _ in range(2)]

    kv_tr = _post_kv(cfg, 1, held) if plan.steps else None
    clock.timed("compute", compute, r, k, v, 0, dk_home, dv_home, 0)
    clock.step_done(0)
    acc_tr = None     # the accumulator transfers posted at the previous step
    home = []         # transfers bringing this rank's own accumulators home
    for t in range(1, plan.steps + 1):
        clock.timed("wait", _take_kv, cfg, kv_tr, t, held)
        kv_tr = _post_kv(cfg, t + 1, held) if t < plan.steps else None
        accs = {}
        for d in (1, -1):
            s = (r - d * t) % w
            chain = plan.chains.get((s, d))
            if chain is None or not chain[0] <= t <= chain[1]:
                continue
            rng = plan.acc_range[(s, d)]
            if t > chain[0]:
                acc = clock.timed("wait", acc_tr.get, d, f"receiving the dK/dV accumulator of ring step {t}")
            else:
                acc = acc_buffers(rng)
            if plan.cover.get((r, s)) == d:
                clock.timed("compute", compute, s, *held[d], acc[0], acc[1], rng[0])
            accs[d] = acc
        if acc_tr is not None:
            acc_tr.finish(f"sending the dK/dV accumulator of ring step {t - 1}")
        # Accumulators move on to the next rank of their chain, or go home after their last user. The
        # order of posting (relays, then homecomings; forward ring first) is the same on every rank, so
        # the messages between any two ranks match in order (NCCL matches by order, not by tag).
        acc_tr = _Transfers(cfg)
        for d in (1, -1):
            s = (r - d * t) % w
            if d in accs and t < plan.chains[(s, d)][1]:
                acc_tr.send(accs[d], (r + d) % w)
            s_next = (r - d * (t + 1)) % w
            chain = plan.chains.get((s_next, d))
            if chain is not None and chain[0] < t + 1 <= chain[1]:
                acc_tr.recv(d, acc_buffers(plan.acc_range[(s_next, d)]), (r - d) % w)
        for d in (1, -1):
            s = (r - d * t) % w
            if d in accs and t == plan.chains[(s, d)][1]:
                acc_tr.send(accs[d], s)
            chain = plan.chains.get((r, d))
            if chain is not None and chain[1] == t:
                acc_tr.recv(("home", d), acc_buffers(plan.acc_range[(r, d)]), (r + d * t) % w)
        acc_tr.post()
        home += [(acc_tr, d) for d in (1, -1) if acc_tr.has(("home", d))]
        clock.step_done(t)
    for tr, d in home:
        lo, hi = plan.acc_range[(r, d)]
        dk_part, dv_part = tr.get(("home", d), "receiving this rank's dK/dV accumulator")
        dk_home[:, :, lo:hi] += dk_part
        dv_home[:, :, lo:hi] += dv_part
    if acc_tr is not None:
        acc_tr.finish("sending the last dK/dV accumulators")
    return dq.to(q_dtype), dk_home.to(k.dtype), dv_home.to(v.dtype)


class _RingFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg):
        acc_o, lse = _ring_forward(cfg, q, k, v)
        out = acc_o.to(q.dtype)
        # The backward's delta = rowsum(dout * out) uses the output as returned (rounded), as flash() does.
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(ctx.cfg, dout, dlse, q, k, v, out, lse)
        return dq, dk, dv, None


def ring_flash(q, k, v, *, group=None, causal=False, window=None, scale=None, softcap=0.0, return_lse=False,
               layout="zigzag"):
    """Self-attention over a sequence split across the ranks of `group` (ring attention).

    Args:
        q: (B, Hq, S/W, D); k, v: (B, Hk, S/W, D), this rank's part of the sequence (see shard()), Hq % Hk
            == 0. The same dtype, device type, shapes and options on every rank.
        group: a torch.distributed process group (default: the world): gloo for CPU tensors, NCCL for CUDA.
        causal, window, scale, softcap: as in fused_attn.flash() on the whole sequence.
        return_lse: also return lse (B, Hq, S/W), float32 (float64 for float64 inputs).
        layout: "zigzag" (rank r holds chunks r and 2W-1-r of 2W; S divisible by 2W) or "contiguous"
            (rank r holds [r*S/W, (r+1)*S/W)).

    Returns out (B, Hq, S/W, D) or (out, lse): the rows of flash(full q, full k, full v) this rank holds.
    Differentiable; every rank must run the backward too. Raises the same ValueError/TypeError on every
    rank for bad or mismatched input, and RuntimeError when a peer fails or a transfer times out.
    """
    fn = "ring_flash"
    group, rank, world = _group_info(group, fn)
    checked = {}

    def local():
        checked["qkv"] = check_inputs(q, k, v, causal, window, None, scale, return_lse)
        _check_layout(layout)
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"k: expected this rank's part of the same sequence as q (length {q.shape[2]}), "
                             f"got shape {_shape(k)}")
        _check_divisible("q", q.shape[2] * world, world, layout, per_rank=True)
        checked["softcap"] = check_softcap(softcap)
        for name, t in (("q", q), ("k", k), ("v", v)):
            _check_device(group, t, name)

    error = _collect_error(local)
    signature = None
    if error is None:
        qq, kk, vv, left, right, sc = checked["qkv"]
        signature = (("q", _shape(q)), ("k", _shape(k)), ("v", _shape(v)), ("dtype", str(q.dtype)),
                     ("device", q.device.type), ("causal/window", (left, right)), ("scale", sc),
                     ("softcap", checked["softcap"]), ("layout", layout), ("return_lse", return_lse))
    _exchange(group, rank, world, fn, error, signature)
    n = q.shape[2]
    cfg = _Config(fn=fn, group=group, rank=rank, world=world, device=q.device, timeout=_timeout(group, q.device),
                  plan=_plan(world, n, layout, left, right), scale=sc,
                  softcap=checked["softcap"],
                  acc_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                  compute_dtype=_compute_dtype(q))
    out, lse = _RingFlash.apply(qq, kk.contiguous(), vv.contiguous(), cfg)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------- shard/unshard


def _check_dim(x: torch.Tensor, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected a dim of a {x.dim()}-D tensor, got {dim}")
    return dim % x.dim()


def _pieces(world: int, rank: int, n: int, layout: str):
    """(start, length) of the positions of the full sequence that rank holds, in its local order."""
    return [(g, ln) for (_, g, ln) in _segments(rank, world, n, layout)]


def shard(x, *, group=None, layout="zigzag", dim=2):
    """This rank's part of a full sequence x (the same x on every rank) along dim, as ring_flash expects.

    No communication. "contiguous" returns a view, "zigzag" a new tensor (two chunks concatenated)."""
    group, rank, world = _group_info(group, "shard")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    _check_layout(layout)
    dim = _check_dim(x, dim)
    _check_divisible("x", x.shape[dim], world, layout, per_rank=False)
    parts = [x.narrow(dim, g, ln) for g, ln in _pieces(world, rank, x.shape[dim] // world, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cfg, layout, dim):
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(cfg.world)]
        work = dist.all_gather(parts, x.contiguous(), group=cfg.group, async_op=True)
        _wait(work, cfg, "gathering the parts of the sequence")
        n = x.shape[dim]
        s = n * cfg.world
        full = x.new_empty(x.shape[:dim] + (s,) + x.shape[dim + 1:])
        for r, part in enumerate(parts):
            lo = 0
            for g, ln in _pieces(cfg.world, r, n, layout):
                full.narrow(dim, g, ln).copy_(part.narrow(dim, lo, ln))
                lo += ln
        ctx.meta = (cfg, layout, dim)
        return full

    @staticmethod
    def backward(ctx, grad):
        # The gradient of an all-gather: every rank's gradient of the full tensor summed, cut to this
        # rank's part (torch.distributed.nn.functional.all_gather's rule).
        cfg, layout, dim = ctx.meta
        grad = grad.contiguous().clone()
        work = dist.all_reduce(grad, group=cfg.group, async_op=True)
        _wait(work, cfg, "summing the gradient of unshard")
        n = grad.shape[dim] // cfg.world
        parts = [grad.narrow(dim, g, ln) for g, ln in _pieces(cfg.world, cfg.rank, n, layout)]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)), None, None, None


def unshard(x_local, *, group=None, layout="zigzag", dim=2):
    """The full sequence from every rank's part (all-gather along dim): the inverse of shard().

    Every rank gets the full tensor. Differentiable: the gradient of a rank's part is the sum over ranks
    of the gradients of the full tensor, cut to that part."""
    fn = "unshard"
    group, rank, world = _group_info(group, fn)
    checked = {}

    def local():
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"x_local: expected a torch.Tensor, got {type(x_local).__name__}")
        _check_layout(layout)
        checked["dim"] = _check_dim(x_local, dim)
        if layout == "zigzag" and x_local.shape[checked["dim"]] % 2:
            raise ValueError(f"x_local: layout 'zigzag' holds two equal chunks per rank, got an odd length "
                             f"{x_local.shape[checked['dim']]} along dim {dim}")
        _check_device(group, x_local, "x_local")

    error = _collect_error(local)
    signature = None
    if error is None:
        signature = (("x_local", _shape(x_local)), ("dtype", str(x_local.dtype)),
                     ("device", x_local.device.type), ("layout", layout), ("dim", checked["dim"]))
    _exchange(group, rank, world, fn, error, signature)
    cfg = _Config(fn=fn, group=group, rank=rank, world=world, device=x_local.device,
                  timeout=_timeout(group, x_local.device), plan=None, scale=0.0, softcap=0.0,
                  acc_dtype=x_local.dtype, compute_dtype=x_local.dtype)
    return _Unshard.apply(x_local, cfg, layout, checked["dim"])
