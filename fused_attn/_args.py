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


def check_inputs(q, k, v, causal, window, block_mask, scale, return_lse):
    """Validates flash()'s arguments; returns (q, k, v, left, right, scale) with any head-dim stride that
    is not 1 copied away (the kernels need unit stride in D; every other stride is taken as it is)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name}: expected head dim {q.shape[3]} (q.shape[3]), got shape {_shape(t)}")
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
