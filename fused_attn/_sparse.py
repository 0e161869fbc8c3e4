"""The block mask object: a block layout turned, once, into the compact lists the kernels read.

For each (batch, head, query block) the list of visible key blocks (CSR: counts + indices), and the
transposed list for each key block (used by the backward pass). Kernels whose tiles differ from the
layout's blocks get lists at their own tile granularity, built here from the layout: an entry e >= 0 is
a tile the layout allows entirely, e < 0 names tile -e - 1 that it allows in part (the kernel then checks
the layout per element there). On a CUDA device the lists for every CUDA kernel's tiles are built at
construction, so a call does no mask work and torch.compile sees only stored tensors.
"""
from __future__ import annotations

import math
import numbers

import torch


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _lists(vis: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vis (Bm, Hm, R, C) bool, code (Bm, Hm, R, C) entry codes -> counts (Bm, Hm, R) int32 and
    indices (Bm, Hm, R, C) int32 with each row's visible entries first, in ascending order."""
    counts = vis.sum(-1, dtype=torch.int32)
    order = torch.argsort((~vis).to(torch.int8), dim=-1, stable=True)
    return counts.contiguous(), torch.gather(code, -1, order).to(torch.int32).contiguous()


def tile_lists(layout: torch.Tensor, bq: int, bk: int, tq: int, tk: int):
    """The forward lists (per query tile: key tiles) and transposed lists (per key tile: query tiles)
    of a (Bm, Hm, nqb, nkb) layout with blocks (bq, bk), at tile granularity (tq, tk)."""
    bm, hm, nqb, nkb = layout.shape
    gq, gk = math.gcd(bq, tq), math.gcd(bk, tk)
    fine = layout
    if bq // gq > 1:
        fine = fine.repeat_interleave(bq // gq, dim=2)
    if bk // gk > 1:
        fine = fine.repeat_interleave(bk // gk, dim=3)
    rq, rk = tq // gq, tk // gk
    ntq, ntk = _cdiv(nqb * bq, tq), _cdiv(nkb * bk, tk)
    # Cells past the layout lie past the sequence, where the kernels mask anyway: pad so that they
    # neither make a tile visible (any) nor make one partial (all).
    grid_any = torch.zeros(bm, hm, ntq * rq, ntk * rk, dtype=torch.bool, device=layout.device)
    grid_all = torch.ones_like(grid_any)
    grid_any[:, :, : fine.shape[2], : fine.shape[3]] = fine
    grid_all[:, :, : fine.shape[2], : fine.shape[3]] = fine
    anyv = grid_any.view(bm, hm, ntq, rq, ntk, rk).any(dim=5).any(dim=3)
    allv = grid_all.view(bm, hm, ntq, rq, ntk, rk).all(dim=5).all(dim=3)
    dev = layout.device
    kcol = torch.arange(ntk, device=dev, dtype=torch.int32).expand(bm, hm, ntq, ntk)
    qcol = torch.arange(ntq, device=dev, dtype=torch.int32).expand(bm, hm, ntk, ntq)
    kv = _lists(anyv, torch.where(allv, kcol, -kcol - 1))
    qv = _lists(anyv.transpose(-1, -2), torch.where(allv.transpose(-1, -2), qcol, -qcol - 1))
    return kv + qv


class BlockMask:
    """A block layout and its kernel lists. Build with fused_attn.block_mask(layout, block_size); reuse it
    across calls and layers of the same shape.

    Attributes: layout (Bm, Hm, nqb, nkb) bool; block_size (bq, bk); kv_counts / kv_indices (the key
    blocks of each query block) and q_counts / q_indices (the query blocks of each key block)."""

    def __init__(self, layout: torch.Tensor, block_size):
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"layout: expected a torch.Tensor of dtype bool, got {type(layout).__name__}")
        if layout.dtype != torch.bool:
            raise TypeError(f"layout: expected dtype torch.bool, got {layout.dtype}")
        if layout.dim() == 3:
            layout = layout.unsqueeze(0)
        if layout.dim() != 4:
            raise ValueError(
                f"layout: expected shape (H, nqb, nkb) or (B, H, nqb, nkb), got {tuple(layout.shape)}")
        if min(layout.shape) <= 0:
            raise ValueError(f"layout: expected every dimension >= 1, got shape {tuple(layout.shape)}")
        if isinstance(block_size, (tuple, list)):
            if len(block_size) != 2:
                raise ValueError(f"block_size: expected an int or a pair (bq, bk), got {block_size!r}")
            bq, bk = block_size
        else:
            bq = bk = block_size
        for name, b in (("bq", bq), ("bk", bk)):
            if isinstance(b, bool) or not isinstance(b, numbers.Integral):
                raise TypeError(f"block_size: expected ints, got {name} = {b!r}")
            if b <= 0:
                raise ValueError(f"block_size: expected positive sizes, got {name} = {b}")
        self.layout = layout.contiguous()
        self.block_size = (int(bq), int(bk))
        self._u8 = self.layout.to(torch.uint8)
        self.kv_counts, self.kv_indices, self.q_counts, self.q_indices = tile_lists(
            self.layout, self.block_size[0], self.block_size[1], self.block_size[0], self.block_size[1])
        self._tiles = {self.block_size: (self.kv_counts, self.kv_indices, self.q_counts, self.q_indices)}
        if self.layout.device.type == "cuda":
            from ._ops import cuda_tile_shapes

            for tq, tk in cuda_tile_shapes():
                self._lists_for(tq, tk)

    # -- shape --------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.layout.shape)

    @property
    def device(self) -> torch.device:
        return self.layout.device

    def density(self) -> float:
        """Fraction of visible blocks in the layout."""
        return float(self.layout.float().mean())

    def to(self, device) -> "BlockMask":
        """The same mask on another device (lists rebuilt there)."""
        device = torch.device(device)
        return self if device == self.device else BlockMask(self.layout.to(device), self.block_size)

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, block_size={self.block_size}, "
                f"density={self.density():.3f}, device={self.device})")

    # -- use by flash() ----------------------------------------------------------------------------
    def check_against(self, q: torch.Tensor, k: torch.Tensor) -> None:
        bm, hm, nqb, nkb = self.shape
        bq, bk = self.block_size
        if self.device != q.device:
            raise ValueError(
                f"block_mask: built on {self.device} but q is on {q.device}; use block_mask.to(q.device)")
        if bm not in (1, q.shape[0]):
            raise ValueError(f"block_mask: layout batch {bm} must be 1 or q's batch {q.shape[0]}")
        if hm not in (1, q.shape[1]):
            raise ValueError(f"block_mask: layout heads {hm} must be 1 or q's heads {q.shape[1]}")
        want = (_cdiv(q.shape[2], bq), _cdiv(k.shape[2], bk))
        if (nqb, nkb) != want:
            raise ValueError(
                f"block_mask: layout has (nqb, nkb) = {(nqb, nkb)} but Sq = {q.shape[2]}, Sk = {k.shape[2]} "
                f"with block size {self.block_size} need {want}")

    def _lists_for(self, tq: int, tk: int):
        if (tq, tk) not in self._tiles:
            self._tiles[(tq, tk)] = tile_lists(self.layout, *self.block_size, tq, tk)
        return self._tiles[(tq, tk)]

    def op_args(self, fwd_tiles, bwd_tiles) -> tuple[list[torch.Tensor], list[int]]:
        """The `sparse` and `sparse_shape` arguments of the ops for kernels with these tiles."""
        f = self._lists_for(*fwd_tiles)
        b = self._lists_for(*bwd_tiles)
        return ([self._u8, f[0], f[1], b[0], b[1], b[2], b[3]],
                [*self.block_size, *fwd_tiles, *bwd_tiles])
