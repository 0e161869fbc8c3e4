"""Feature maps and random features for linear attention (fused_attn.linear_attention).

linear_attention applies its built-in maps ("elu1", "relu") inside the kernel. Maps that need parameters,
such as the positive random features of the Performer (Choromanski et al. 2021, FAVOR+), are applied here
and passed to the kernel with feature_map="identity":

    w = fused_attn.features.random_projection(d, m, generator=g)          # (m, d)
    c = d ** -0.25                                                        # splits 1/sqrt(d) over q and k
    out = fused_attn.linear_attention(favor_plus(q * c, w), favor_plus(k * c, w), v,
                                      feature_map="identity")              # ~ softmax(q k^T / sqrt(d)) v

favor_plus(x, w) . favor_plus(y, w) is an unbiased estimate of exp(x . y) when the rows of w are standard
Gaussian (marginally), so the normalised linear attention above approximates softmax attention with an
error that shrinks like 1 / sqrt(m) (tests/test_linear_features.py measures the trend).
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["favor_plus", "random_projection"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def favor_plus(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Positive random features: exp(x w_r - |x|^2 / 2) / sqrt(m) for each row w_r of projection.

    Args:
        x: (..., D), a floating tensor.
        projection: (M, D), from random_projection(D, M); x's dtype and device.

    Returns (..., M) in x's dtype, every entry > 0 (so the normalised linear attention built on it never
    divides by a sum of mixed signs). The exponent is computed in float32 at least (float64 for float64).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(projection, torch.Tensor):
        raise TypeError(f"projection: expected a torch.Tensor, got {type(projection).__name__}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"x: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected shape (..., D) with D >= 1, got {_shape(x)}")
    if projection.dim() != 2 or projection.shape[0] == 0:
        raise ValueError(f"projection: expected 2-D (M, D) with M >= 1, got shape {_shape(projection)}")
    if projection.shape[1] != x.shape[-1]:
        raise ValueError(f"projection: expected D = {x.shape[-1]} columns (x.shape[-1]), got shape "
                         f"{_shape(projection)}")
    if projection.dtype != x.dtype:
        raise TypeError(f"projection: expected x's dtype {x.dtype}, got {projection.dtype}")
    if projection.device != x.device:
        raise ValueError(f"projection: expected x's device {x.device}, got {projection.device}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw = x.to(work)
    m = projection.shape[0]
    logits = torch.matmul(xw, projection.to(work).t()) - 0.5 * (xw * xw).sum(-1, keepdim=True)
    return (torch.exp(logits) * (1.0 / math.sqrt(m))).to(x.dtype)


def random_projection(d: int, m: int, *, generator: torch.Generator | None = None, orthogonal: bool = True,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An (m, d) matrix of random features for favor_plus.

    orthogonal=False: i.i.d. standard Gaussian rows. orthogonal=True (FAVOR+): rows drawn in blocks of d
    that are exactly orthogonal within a block (QR of a Gaussian matrix), each row then given the length of
    an independent Gaussian d-vector, so each row is still marginally standard Gaussian (the estimate stays
    unbiased) while rows of a block do not repeat each other's directions (lower variance).

    Drawn on the CPU with `generator` (torch's default generator when None); move the result with .to().
    """
    for name, val in (("d", d), ("m", m)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral):
            raise TypeError(f"{name}: expected an int, got {type(val).__name__}")
        if val < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {val}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if not isinstance(orthogonal, bool):
        raise TypeError(f"orthogonal: expected a bool, got {type(orthogonal).__name__}")
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    d, m = int(d), int(m)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU generator, got one on {generator.device}")
    if not orthogonal:
        return torch.randn(m, d, generator=generator, dtype=torch.float64).to(dtype)
    blocks = []
    for _ in range(-(-m // d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qm, r = torch.linalg.qr(g)
        # Sign fix (Q R with R's diagonal positive) so Q is Haar-distributed, not biased by the QR routine.
        qm = qm * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
        blocks.append(qm.t())  # rows orthonormal
    w = torch.cat(blocks, 0)[:m]
    lengths = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * lengths).to(dtype)
