"""Checks of user input shared by linear_attention() and reference.linear_attention(): every bad argument
is reported here, by name, with what was expected, before any kernel runs."""
from __future__ import annotations

import math
import numbers

import torch

from ._args import FLOAT_DTYPES, _shape

FEATURE_MAPS = ("elu1", "relu", "identity")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The recurrent state's dtype for inputs of `dtype`: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_4d(name: str, t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected 4-D {what}, got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_bool(name: str, x) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")


def _check_real(name: str, x, *, min_value=None) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite float, got {x}")
    if min_value is not None and x < min_value:
        raise ValueError(f"{name}: expected a float >= {min_value}, got {x}")
    return x


def check_state(initial_state, q: torch.Tensor, v: torch.Tensor):
    """Returns (S, z) in the state dtype, or (None, None)."""
    if initial_state is None:
        return None, None
    if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
        raise TypeError(f"initial_state: expected None or a pair (S, z), got {type(initial_state).__name__}"
                        + (f" of length {len(initial_state)}" if isinstance(initial_state, (tuple, list)) else ""))
    b, h, dk, dv = q.shape[0], q.shape[1], q.shape[3], v.shape[3]
    out = []
    for name, t, shape in (("initial_state[0] (S)", initial_state[0], (b, h, dk, dv)),
                           ("initial_state[1] (z)", initial_state[1], (b, h, dk))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (B, H, Dk{', Dv' if len(shape) == 4 else ''}), "
                             f"got {_shape(t)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype ({state_dtype(q.dtype)}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
        out.append(t.to(state_dtype(q.dtype)))
    return out[0], out[1]


def check_linear_inputs(q, k, v, causal, feature_map, normalize, scale, eps, initial_state, return_state):
    """Validates linear_attention()'s arguments; returns (q, k, v, scale, eps, S0, z0) with S0 = z0 = None
    without an initial state and any head-dim stride that is not 1 copied away."""
    _check_4d("q", q, "(B, H, Sq, Dk)")
    _check_4d("k", k, "(B, H, Sk, Dk)")
    _check_4d("v", v, "(B, H, Sk, Dv)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected q's device {q.device}, got {t.device}")
    if q.shape[3] == 0:
        raise ValueError(f"q: expected a head dim Dk >= 1, got shape {_shape(q)}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected q's batch, heads and head dim (B, H, *, Dk) = "
                         f"({q.shape[0]}, {q.shape[1]}, *, {q.shape[3]}), got shape {_shape(k)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected k's batch, heads and length {tuple(k.shape[:3])}, got shape {_shape(v)}")
    if v.shape[3] == 0:
        raise ValueError(f"v: expected a head dim Dv >= 1, got shape {_shape(v)}")
    _check_bool("causal", causal)
    _check_bool("normalize", normalize)
    _check_bool("return_state", return_state)
    if not isinstance(feature_map, str):
        raise TypeError(f"feature_map: expected one of {FEATURE_MAPS} (a str), got {type(feature_map).__name__}")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map: expected one of {FEATURE_MAPS}, got {feature_map!r}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"k: causal linear attention expects the length of q ({q.shape[2]}), got shape "
                         f"{_shape(k)} (query i sees keys 0..i of the same sequence)")
    sc = 1.0 if scale is None else _check_real("scale", scale)
    ep = _check_real("eps", eps, min_value=0.0)
    if initial_state is not None and not causal:
        raise ValueError("initial_state: only causal linear attention continues a sequence; got causal=False "
                         "with an initial_state")
    s0, z0 = check_state(initial_state, q, v)
    q, k, v = (t if t.shape[3] <= 1 or t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
    return q, k, v, sc, ep, s0, z0
