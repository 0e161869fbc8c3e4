"""Checks of user input shared by flash() and reference.attention(): every bad argument is reported here,
by name, with what was expected, before any kernel runs."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected 4-D (B, H, S, D), got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")


def check_window(causal, window) -> tuple[int, int]:
    """Returns (left, right) with causal folded in as right = 0; -1 is unbounded."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if window is None:
        left, right = -1, -1
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window: expected None or a pair (left, right), got {window!r}")
        for side, w in zip(("left", "right"), window):
            if isinstance(w, bool) or not isinstance(w, numbers.Integral):
                raise TypeError(f"window: expected ints for (left, right), got {side} = {w!r}")
            if w < -1:
                raise ValueError(f"window: expected entries >= -1 (-1 is unbounded), got {side} = {w}")
        left, right = int(window[0]), int(window[1])
    if causal:
        right = 0
    return left, right


def check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return float(scale)


def _check_like_q(name, t, q, d_dim):
    """t (k or v) has q's dtype, device and head dim (dimension d_dim)."""
    if t.dtype != q.dtype:
        raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
    if t.shape[d_dim] != q.shape[d_dim]:
        raise ValueError(f"{name}: expected head dim {q.shape[d_dim]} (q.shape[{d_dim}]), got shape {_shape(t)}")


def check_inputs(q, k, v, causal, window, block_mask, scale, return_lse):
    """Validates flash()'s arguments; returns (q, k, v, left, right, scale) with any head-dim stride that
    is not 1 copied away (the kernels need unit stride in D; every other stride is taken as it is)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    for name, t in (("k", k), ("v", v)):
        _check_like_q(name, t, q, 3)
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name}: expected batch {q.shape[0]} (q.shape[0]), got shape {_shape(t)}")
    if q.shape[3] == 0:
        raise ValueError(f"q: expected a head dim D >= 1, got shape {_shape(q)}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected k's heads and length {tuple(k.shape[1:3])}, got shape {_shape(v)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"k: expected a head count that divides q's {q.shape[1]} (GQA/MQA), got {k.shape[1]} heads")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    left, right = check_window(causal, window)
    sc = check_scale(scale, q.shape[3])
    if block_mask is not None:
        from ._sparse import BlockMask

        if not isinstance(block_mask, BlockMask):
            raise TypeError(
                f"block_mask: expected a mask from fused_attn.block_mask(layout, block_size), "
                f"got {type(block_mask).__name__}")
        block_mask.check_against(q, k)
    q, k, v = (t if t.shape[3] <= 1 or t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
    return q, k, v, left, right, sc


def check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap: expected a float >= 0 (0 is off), got {type(softcap).__name__}")
    if not math.isfinite(float(softcap)) or softcap < 0:
        raise ValueError(f"softcap: expected a finite float >= 0 (0 is off), got {softcap}")
    return float(softcap)


def check_alibi(alibi_slopes, batch: int, hq: int, device) -> torch.Tensor | None:
    """None, or the slopes as the op takes them: float32 (1 or B, Hq), contiguous, on q's device."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes: expected None or a float32 tensor, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes: expected dtype torch.float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != torch.device(device):
        raise ValueError(f"alibi_slopes: expected q's device {device}, got {alibi_slopes.device}")
    shape = tuple(alibi_slopes.shape)
    if shape == (hq,):
        return alibi_slopes.reshape(1, hq).contiguous()
    if shape == (batch, hq):
        return alibi_slopes.contiguous()
    raise ValueError(f"alibi_slopes: expected shape (Hq,) = ({hq},) or (B, Hq) = ({batch}, {hq}), "
                     f"got {_shape(alibi_slopes)}")


def check_mods(softcap, alibi_slopes, batch: int, hq: int, device):
    return check_softcap(softcap), check_alibi(alibi_slopes, batch, hq, device)


def _check_int32_vector(name: str, t, n: int | None, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if t.dim() != 1 or (n is not None and t.shape[0] != n):
        want = f"({n},)" if n is not None else "1-D"
        raise ValueError(f"{name}: expected shape {want}, got {_shape(t)}")
    if t.device != torch.device(device):
        raise ValueError(f"{name}: expected q's device {device}, got {t.device}")


def _check_packed(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name}: expected 3-D (total, H, D), got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")


def _unit_d(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale,
                 softcap, alibi_slopes, return_lse):
    """Validates flash_varlen()'s arguments. Returns (q, k, v, cu_q, cu_k, max_q, max_k, left, right, scale,
    softcap, alibi). The values of cu_seqlens are checked unless they are on a GPU and both max_seqlen are
    given (then nothing is read back to the host: the kernels clamp every sequence to the packed tensors)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_packed(name, t)
    for name, t in (("k", k), ("v", v)):
        _check_like_q(name, t, q, 2)
    if q.shape[2] == 0:
        raise ValueError(f"q: expected a head dim D >= 1, got shape {_shape(q)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v: expected k's (total_k, Hk) = {tuple(k.shape[:2])}, got shape {_shape(v)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k: expected a head count that divides q's {q.shape[1]} (GQA/MQA), got {k.shape[1]}")
    _check_int32_vector("cu_seqlens_q", cu_seqlens_q, None, q.device)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q: expected B + 1 >= 1 entries, got 0")
    _check_int32_vector("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape[0], q.device)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    left, right = check_window(causal, window)
    sc = check_scale(scale, q.shape[2])
    cap, alibi = check_mods(softcap, alibi_slopes, cu_seqlens_q.shape[0] - 1, q.shape[1], q.device)
    maxes = []
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0):
            raise ValueError(f"{name}: expected None or an int >= 0, got {m!r}")
        maxes.append(m)
    if torch.compiler.is_compiling():
        # A traced graph cannot read tensor values on the host: the lengths must be given (the CPU op checks
        # the values again at run time; on a GPU the kernels clamp every sequence to the packed tensors).
        if None in maxes:
            raise ValueError("max_seqlen_q, max_seqlen_k: expected ints under torch.compile (the longest "
                             "lengths cannot be read from cu_seqlens while tracing)")
        read_values = False
    else:
        read_values = q.device.type == "cpu" or None in maxes
    if read_values:
        for side, (name, cu, total, mname) in enumerate((("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q"),
                                                         ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k"))):
            m = maxes[side]
            c = cu.cpu().tolist()  # one synchronisation on a GPU
            if c[0] != 0 or c[-1] != total:
                raise ValueError(f"{name}: expected to start at 0 and end at the packed total {total}, "
                                 f"got {c[0]} ... {c[-1]}")
            lens = [b - a for a, b in zip(c[:-1], c[1:])]
            if any(n < 0 for n in lens):
                i = next(i for i, n in enumerate(lens) if n < 0)
                raise ValueError(f"{name}: expected non-decreasing entries, got {c[i]} then {c[i + 1]} at index {i}")
            longest = max(lens, default=0)
            if m is None:
                m = longest
            elif longest > m:
                raise ValueError(f"{mname}: sequence {lens.index(longest)} has {longest} rows, more than "
                                 f"{mname} = {m}")
            maxes[side] = m
    q, k, v = (_unit_d(t) for t in (q, k, v))
    return (q, k, v, cu_seqlens_q, cu_seqlens_k, int(maxes[0]), int(maxes[1]), left, right, sc, cap, alibi)


def check_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, window, scale,
                  softcap, alibi_slopes, return_lse, num_splits):
    """Validates flash_kvcache()'s arguments, including the values that decide where new keys are written
    (cache_seqlens against the capacity, the block_table entries in use): on a GPU that reads them back to
    the host once. Returns (q, cache_seqlens as an int32 tensor, left, right, scale, softcap, alibi)."""
    check_tensor("q", q)
    paged = block_table is not None
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            want = "(num_pages, page_size, Hk, D)" if paged else "(B, Hk, S_max, D)"
            raise ValueError(f"{name}: expected 4-D {want}, got shape {_shape(t)}")
        _check_like_q(name, t, q, 3)
        if t.shape[3] > 1 and t.stride(3) != 1:
            raise ValueError(f"{name}: expected unit stride in the head dim (the cache is written in place, "
                             f"so it is not copied), got strides {tuple(t.stride())}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected k_cache's shape {_shape(k_cache)}, got {_shape(v_cache)}")
    b, hq = q.shape[0], q.shape[1]
    hk = k_cache.shape[2] if paged else k_cache.shape[1]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"k_cache: expected a head count that divides q's {hq} (GQA/MQA), got {hk}")
    if paged:
        _check_block_table(block_table, b, q.device)
        page_size = k_cache.shape[1]
        if page_size == 0:
            raise ValueError(f"k_cache: expected page_size >= 1, got shape {_shape(k_cache)}")
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache: expected batch {b} (q.shape[0]), got shape {_shape(k_cache)}")
        capacity = k_cache.shape[2]
    if isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens: expected an int or an int32 tensor (B,), got bool")
    if isinstance(cache_seqlens, numbers.Integral):
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens: expected >= 0, got {cache_seqlens}")
        cache_seqlens = torch.full((b,), int(cache_seqlens), dtype=torch.int32, device=q.device)
    else:
        _check_int32_vector("cache_seqlens", cache_seqlens, b, q.device)
        cache_seqlens = cache_seqlens.contiguous()
    s_new = 0
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new, v_new: expected both or neither")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_tensor(name, t)
            _check_like_q(name, t, q, 3)
            if t.shape[0] != b or t.shape[1] != hk:
                raise ValueError(f"{name}: expected (B, Hk, S_new, D) = ({b}, {hk}, S_new, {q.shape[3]}), "
                                 f"got shape {_shape(t)}")
        if v_new.shape != k_new.shape:
            raise ValueError(f"v_new: expected k_new's shape {_shape(k_new)}, got {_shape(v_new)}")
        s_new = k_new.shape[2]
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits: expected an int >= 0 (0 picks), got {num_splits!r}")
    left, right = check_window(causal, window)
    sc = check_scale(scale, q.shape[3])
    cap, alibi = check_mods(softcap, alibi_slopes, b, hq, q.device)
    # Values (one read-back on a GPU): every write must land inside the cache.
    vals = cache_seqlens.tolist()  # a Python list: two torch reductions here cost 4 us of a ~25 us decode call
    lo, hi = (min(vals), max(vals)) if b else (0, 0)
    if lo < 0:
        i = vals.index(lo)
        raise ValueError(f"cache_seqlens: expected entries >= 0, got {lo} for sequence {i}")
    if hi + s_new > capacity:
        i = vals.index(hi)
        raise ValueError(f"cache_seqlens: sequence {i} holds {hi} tokens; with {s_new} new ones that "
                         f"is past the cache's capacity of {capacity} "
                         f"({'max_pages * page_size' if paged else 'S_max'})")
    if paged and b:
        page_size = k_cache.shape[1]
        lens = torch.tensor(vals, dtype=torch.int64)
        used = (lens + s_new + page_size - 1) // page_size  # pages in use per sequence
        cols = torch.arange(block_table.shape[1])
        bt = block_table.cpu()
        in_use = cols.unsqueeze(0) < used.unsqueeze(1)
        bad = in_use & ((bt < 0) | (bt >= k_cache.shape[0]))
        if bad.any():
            i, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table: entry [{i}, {j}] = {int(bt[i, j])} is outside "
                             f"[0, num_pages = {k_cache.shape[0]})")
    q = q if q.shape[3] <= 1 or q.stride(3) == 1 else q.contiguous()
    return q, cache_seqlens, left, right, sc, cap, alibi


def _check_block_table(bt, b: int, device) -> None:
    if not isinstance(bt, torch.Tensor):
        raise TypeError(f"block_table: expected an int32 tensor, got {type(bt).__name__}")
    if bt.dtype != torch.int32:
        raise TypeError(f"block_table: expected dtype torch.int32, got {bt.dtype}")
    if bt.dim() != 2 or bt.shape[0] != b:
        raise ValueError(f"block_table: expected shape (B, max_pages_per_seq) with B = {b}, got {_shape(bt)}")
    if bt.device != torch.device(device):
        raise ValueError(f"block_table: expected q's device {device}, got {bt.device}")
