"""Builders of block layouts for the sparse-attention patterns of the literature.

Every builder returns a ``torch.bool`` tensor ``(heads, nqb, nkb)`` (or ``(batch, heads, nqb, nkb)`` where
per-batch randomness asks for it) that ``fused_attn.block_mask(layout, block_size)`` accepts.
``layout[..., qb, kb]`` is True when query block ``qb`` may attend to key block ``kb``.

Conventions shared by all builders:

* Block indices are aligned bottom-right, like the element-level rule of ``fused_attn.flash``: query block
  ``qb`` sits at position ``qa = qb + (nkb - nqb)`` on the key-block axis. For self-attention
  (``nqb == nkb``) that is simply ``qa = qb``. All distances below are ``delta = qa - kb`` (how far back
  the key block lies; negative means in the future).
* ``causal=True`` keeps only ``kb <= qa`` (``delta >= 0``); with ``nqb == nkb`` the layout is lower
  triangular at block level, diagonal included.
* ``width`` counts the diagonal: a band of ``width`` means ``|delta| < width`` (``2 * width - 1`` blocks per
  row, or ``width`` blocks when causal). ``width=1`` is the diagonal alone.
* ``heads`` copies a deterministic pattern to every head; ``bigbird`` draws its random blocks per head
  (and per batch element when ``batch`` is given).

The layouts are cheap to build (``O(heads * nqb * nkb)``) and are built on the CPU; move them with ``.to``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union

import torch

__all__ = ["local", "strided", "fixed", "global_local", "bigbird", "density"]

GlobalSpec = Union[int, Sequence[int]]


# ----------------------------------------------------------------------------------------------------------
# Argument checks: every message names the argument, its value and what was expected.


def _int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def _global_set(name: str, value: GlobalSpec, n: int) -> torch.Tensor:
    """Global block indices on the key-block axis -> bool vector of length n."""
    flags = torch.zeros(n, dtype=torch.bool)
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool:
        value = value.tolist()  # a 0-d tensor becomes an int, a 1-d one a list
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        count = int(value)
        if count < 0 or count > n:
            raise ValueError(f"{name}: expected a count in [0, {n}] (the number of key blocks), got {count}")
        flags[:count] = True
        return flags
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name}: expected an int (the first N blocks are global) or a sequence of block indices, "
            f"got {type(value).__name__} {value!r}"
        )
    for idx in value:
        if isinstance(idx, bool) or not isinstance(idx, numbers.Integral):
            raise TypeError(f"{name}: expected integer block indices, got {type(idx).__name__} {idx!r}")
        if not 0 <= int(idx) < n:
            raise ValueError(f"{name}: block index {int(idx)} is out of range, expected 0 <= index < {n}")
        flags[int(idx)] = True
    return flags


def _delta(nqb: int, nkb: int) -> torch.Tensor:
    """delta[qb, kb] = (qb + nkb - nqb) - kb: how many blocks back key block kb lies from query block qb."""
    qa = torch.arange(nqb).unsqueeze(1) + (nkb - nqb)
    return qa - torch.arange(nkb).unsqueeze(0)


def _heads(pattern: torch.Tensor, heads: int) -> torch.Tensor:
    return pattern.unsqueeze(0).expand(heads, *pattern.shape).contiguous()


# ----------------------------------------------------------------------------------------------------------
# Builders.


def local(nqb: int, nkb: int, width: int, *, causal: bool = False, heads: int = 1) -> torch.Tensor:
    """Banded (sliding-window) layout at block granularity.

    The local pattern of the Sparse Transformer (Child et al., 2019, "Generating Long Sequences with Sparse
    Transformers") and Longformer's sliding window (Beltagy et al., 2020), on blocks.

    Rule: query block ``qb`` sees key block ``kb`` iff ``|delta| < width`` where ``delta = qa - kb`` and
    ``qa = qb + nkb - nqb``; with ``causal`` also ``delta >= 0``. ``width=1`` is the (aligned) diagonal.

    Returns a bool tensor ``(heads, nqb, nkb)``.
    """
    nqb = _int("nqb", nqb, minimum=1)
    nkb = _int("nkb", nkb, minimum=1)
    width = _int("width", width, minimum=1)
    causal = _bool("causal", causal)
    heads = _int("heads", heads, minimum=1)
    delta = _delta(nqb, nkb)
    pattern = delta.abs() < width
    if causal:
        pattern &= delta >= 0
    return _heads(pattern, heads)


def strided(
    nqb: int,
    nkb: int,
    stride: int,
    *,
    local: Optional[int] = None,
    causal: bool = True,
    heads: int = 1,
) -> torch.Tensor:
    """Strided layout of the Sparse Transformer (Child et al., 2019, section 4.2), on blocks.

    The paper factorises attention into two heads, ``A1 = {j : i - j < l}`` (the previous ``l`` positions)
    and ``A2 = {j : (i - j) mod l == 0}`` (every ``l``-th position); this layout is their union (the paper's
    "merged" head), with ``l = stride`` blocks.

    Rule: query block ``qb`` sees key block ``kb`` iff ``|delta| < local`` or ``delta % stride == 0``, where
    ``delta = qa - kb``, ``qa = qb + nkb - nqb`` and ``local`` defaults to ``stride``; with ``causal`` (the
    default, as in the paper) also ``delta >= 0``.

    Returns a bool tensor ``(heads, nqb, nkb)``.
    """
    nqb = _int("nqb", nqb, minimum=1)
    nkb = _int("nkb", nkb, minimum=1)
    stride = _int("stride", stride, minimum=1)
    local_width = stride if local is None else _int("local", local, minimum=1)
    causal = _bool("causal", causal)
    heads = _int("heads", heads, minimum=1)
    delta = _delta(nqb, nkb)
    pattern = (delta.abs() < local_width) | (delta.remainder(stride) == 0)
    if causal:
        pattern &= delta >= 0
    return _heads(pattern, heads)


def fixed(
    nqb: int,
    nkb: int,
    block_stride: int,
    *,
    summary: int = 1,
    causal: bool = True,
    heads: int = 1,
) -> torch.Tensor:
    """Fixed layout of the Sparse Transformer (Child et al., 2019, section 4.2), on blocks.

    The paper's two heads are ``A1 = {j : floor(j / l) == floor(i / l)}`` (the same chunk of ``l``) and
    ``A2 = {j : j mod l in {l - c, ..., l - 1}}`` (the last ``c`` "summary" positions of every chunk, which
    carry information between chunks); this layout is their union with ``l = block_stride`` and
    ``c = summary`` blocks.

    Rule: query block ``qb`` sees key block ``kb`` iff ``qa // block_stride == kb // block_stride`` or
    ``kb % block_stride >= block_stride - summary``, with ``qa = qb + nkb - nqb``; with ``causal`` (the
    default) also ``kb <= qa``.

    Returns a bool tensor ``(heads, nqb, nkb)``.
    """
    nqb = _int("nqb", nqb, minimum=1)
    nkb = _int("nkb", nkb, minimum=1)
    block_stride = _int("block_stride", block_stride, minimum=1)
    summary = _int("summary", summary, minimum=1)
    if summary > block_stride:
        raise ValueError(f"summary: expected an int in [1, block_stride={block_stride}], got {summary}")
    causal = _bool("causal", causal)
    heads = _int("heads", heads, minimum=1)
    qa = torch.arange(nqb).unsqueeze(1) + (nkb - nqb)
    kb = torch.arange(nkb).unsqueeze(0)
    same_chunk = torch.div(qa, block_stride, rounding_mode="floor") == kb // block_stride
    is_summary = (kb % block_stride) >= block_stride - summary
    pattern = same_chunk | is_summary
    if causal:
        pattern &= kb <= qa
    return _heads(pattern, heads)


def _global_local(nqb, nkb, width, global_blocks, causal) -> torch.Tensor:
    delta = _delta(nqb, nkb)
    g = _global_set("global_blocks", global_blocks, nkb)
    qa = torch.arange(nqb) + (nkb - nqb)
    # A query block is global when its aligned position is a global key block.
    g_rows = torch.zeros(nqb, dtype=torch.bool)
    inside = (qa >= 0) & (qa < nkb)
    g_rows[inside] = g[qa[inside]]
    pattern = (delta.abs() < width) | g.unsqueeze(0) | g_rows.unsqueeze(1)
    if causal:
        pattern &= delta >= 0
    return pattern


def global_local(
    nqb: int,
    nkb: int,
    width: int,
    global_blocks: GlobalSpec,
    *,
    causal: bool = False,
    heads: int = 1,
) -> torch.Tensor:
    """Longformer layout (Beltagy et al., 2020, "Longformer: The Long-Document Transformer"), on blocks.

    A sliding window plus global attention: global blocks attend to every block and every block attends to
    them (the attention is symmetric for global positions).

    ``global_blocks`` is an int ``g`` (the first ``g`` blocks are global) or a sequence of block indices on
    the key-block axis; query block ``qb`` is global when ``qa = qb + nkb - nqb`` is a global index.

    Rule: query block ``qb`` sees key block ``kb`` iff ``|qa - kb| < width`` or ``kb`` is global or ``qa`` is
    global; with ``causal`` also ``kb <= qa``.

    Returns a bool tensor ``(heads, nqb, nkb)``.
    """
    nqb = _int("nqb", nqb, minimum=1)
    nkb = _int("nkb", nkb, minimum=1)
    width = _int("width", width, minimum=1)
    causal = _bool("causal", causal)
    heads = _int("heads", heads, minimum=1)
    return _heads(_global_local(nqb, nkb, width, global_blocks, causal), heads)


def bigbird(
    nqb: int,
    nkb: int,
    width: int,
    global_blocks: GlobalSpec,
    random_blocks: int,
    *,
    generator: Optional[torch.Generator] = None,
    heads: int = 1,
    batch: Optional[int] = None,
    causal: bool = False,
) -> torch.Tensor:
    """BigBird layout (Zaheer et al., 2020, "Big Bird: Transformers for Longer Sequences"), on blocks.

    Random + global + local: the pattern of ``global_local`` (window ``|qa - kb| < width``, global blocks
    seeing and seen by all) plus, for every (batch, head, query block), ``random_blocks`` further key blocks
    drawn uniformly without replacement among those the window and global parts leave hidden (and, with
    ``causal``, among ``kb <= qa``). When fewer than ``random_blocks`` candidates remain, all of them are
    taken. Global query rows already see everything.

    Randomness is drawn on the CPU from ``generator`` (the global RNG when None), independently per head
    and per batch element, so a seeded generator reproduces the layout exactly.

    Returns a bool tensor ``(heads, nqb, nkb)``, or ``(batch, heads, nqb, nkb)`` when ``batch`` is given.
    """
    nqb = _int("nqb", nqb, minimum=1)
    nkb = _int("nkb", nkb, minimum=1)
    width = _int("width", width, minimum=1)
    random_blocks = _int("random_blocks", random_blocks, minimum=0)
    heads = _int("heads", heads, minimum=1)
    if batch is not None:
        batch = _int("batch", batch, minimum=1)
    causal = _bool("causal", causal)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU generator (layouts are built on the CPU), "
                         f"got device {generator.device}")

    base = _global_local(nqb, nkb, width, global_blocks, causal)
    nb = 1 if batch is None else batch
    layout = base.expand(nb, heads, nqb, nkb).clone()
    take = min(random_blocks, nkb)
    if take > 0:
        candidates = ~base
        if causal:
            candidates &= _delta(nqb, nkb) >= 0
        # Top-k of i.i.d. uniform scores over the candidates is a uniform draw without replacement;
        # non-candidates score -1 and are dropped after the top-k.
        scores = torch.rand((nb, heads, nqb, nkb), generator=generator)
        scores = torch.where(candidates, scores, torch.full_like(scores, -1.0))
        top, idx = scores.topk(take, dim=-1)
        chosen = torch.zeros_like(layout)
        chosen.scatter_(-1, idx, top >= 0)
        layout |= chosen
    return layout[0] if batch is None else layout


def density(layout: torch.Tensor) -> float:
    """Fraction of True blocks in a block layout (any shape, batch and heads included).

    This is the fraction of (query block, key block) pairs visible; at element level it equals the fraction
    of visible (query, key) pairs when the sequence lengths are multiples of the block size and no window
    is applied on top.
    """
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"layout: expected a torch.bool tensor, got {type(layout).__name__}")
    if layout.dtype != torch.bool:
        raise TypeError(f"layout: expected dtype torch.bool, got {layout.dtype}")
    if layout.numel() == 0:
        raise ValueError(f"layout: expected a non-empty tensor, got shape {tuple(layout.shape)}")
    return layout.count_nonzero().item() / layout.numel()
