"""torch.library glue for the ops defined in csrc/ops.cpp: fake (meta) kernels for tracing, autograd,
and the choice of kernel tiles that a block mask must list its tiles for."""
from __future__ import annotations

import functools

import torch

from . import _C  # noqa: F401  (loading the extension registers torch.ops.fused_attn)

_TILES = _C.tile_table()
_INFO = _C.build_info()


def build_info() -> dict:
    """What this build holds: backends, dtypes and head dims per backend, CUDA archs, the CPU kernels' vector
    width ("cpu_isa": x86-64-v4, x86-64-v3 or baseline; FUSED_ATTN_CPU_ISA=v1 or v3 lowers it), whether bf16
    forwards on the CPU run bf16 GEMMs ("cpu_bf16_gemm": oneDNN's AMX / AVX512-BF16 brgemm where the CPU has it,
    unless FUSED_ATTN_CPU_BF16_GEMM=0; otherwise bf16 is computed in fp32); with CUDA, also which
    kernel family runs float16/bfloat16 on each visible device ("cuda_paths": the Hopper wgmma/TMA kernels
    on compute capability 9.0 unless FUSED_ATTN_FORCE_SM80 is set, the mma.sync kernels elsewhere)."""
    info = dict(_INFO)
    if "cuda" in info["backends"]:
        info["cuda_paths"] = _C.cuda_paths()
    return info


@functools.lru_cache(maxsize=None)
def cuda_tile_shapes() -> tuple[tuple[int, int], ...]:
    """Every distinct (tq, tk) a CUDA kernel of this build runs with."""
    shapes = set()
    for t in list(_TILES["tc"].values()) + list(_TILES["sm90"].values()) + [_TILES["generic"]]:
        shapes.add((t[0], t[1]))
        shapes.add((t[2], t[3]))
    return tuple(sorted(shapes))


def tc_head_dim(dtype: torch.dtype, d: int) -> int:
    """The compiled tensor-core head dim that runs head dim d on CUDA, or 0 when none does."""
    name = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    dims = _INFO.get("cuda_tensor_core_head_dims", {}).get(name, [])
    if d % 8:
        return 0
    return min((h for h in dims if h >= d), default=0)


def kernel_tiles(q: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """(forward tiles, backward tiles) of the kernels that will run on q, raising ValueError where no
    kernel of this build can."""
    if q.device.type == "cpu":
        return None, None  # the CPU kernels take the layout's own blocks as tiles
    if q.device.type != "cuda":
        raise ValueError(f"q: expected a CPU or CUDA tensor, got device {q.device}")
    if "cuda" not in _INFO["backends"]:
        raise ValueError(f"q: is on {q.device} but this build of fused_attn has no CUDA kernels "
                         "(rebuild where nvcc is found; see fused_attn.build_info())")
    if q.dtype in (torch.float16, torch.bfloat16):
        # The Hopper kernels where ops.cpp will choose them (same C++ function), else the mma.sync ones.
        hd90 = _C.cuda_sm90_head_dim(q.device.index if q.device.index is not None else torch.cuda.current_device(),
                                     str(q.dtype).replace("torch.", ""), q.shape[3])
        if hd90:
            t = _TILES["sm90"][hd90]
            return (t[0], t[1]), (t[2], t[3])
        hd = tc_head_dim(q.dtype, q.shape[3])
        if not hd:
            raise ValueError(f"q: head dim {q.shape[3]} is not supported by the CUDA {q.dtype} kernels of this "
                             "build: expected D <= 256 with D % 8 == 0 (see fused_attn.build_info())")
        t = _TILES["tc"][hd]
    else:
        t = _TILES["generic"]
    return (t[0], t[1]), (t[2], t[3])


def sparse_args(block_mask, q: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    if block_mask is None:
        return [], []
    fwd, bwd = kernel_tiles(q)
    if fwd is None:
        fwd = bwd = block_mask.block_size
    return block_mask.op_args(fwd, bwd)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fused_attn::fwd")
def _fwd_fake(q, k, v, scale, window_left, window_right, sparse, sparse_shape, softcap=0.0, alibi_slopes=None):
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("fused_attn::bwd")
def _bwd_fake(dout, q, k, v, out, lse, dlse, scale, window_left, window_right, sparse, sparse_shape,
              deterministic, softcap=0.0, alibi_slopes=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


@torch.library.register_fake("fused_attn::varlen_fwd")
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
                     window_right, softcap, alibi_slopes):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_lse_dtype(q))


@torch.library.register_fake("fused_attn::varlen_bwd")
def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     scale, window_left, window_right, softcap, alibi_slopes, deterministic):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


@torch.library.register_fake("fused_attn::kvcache_fwd")
def _kvcache_fwd_fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, window_left,
                      window_right, softcap, alibi_slopes, num_splits):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3],
                                                                                     dtype=_lse_dtype(q))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, left, right, sparse, sparse_shape, *mods = inputs
    softcap = mods[0] if mods else 0.0
    alibi = mods[1] if len(mods) > 1 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi, *sparse)
    ctx.args = (scale, left, right, list(sparse_shape), softcap)
    ctx.set_materialize_grads(False)


def _mirror_inputs(ctx, grads: tuple) -> tuple:
    """grads, then None for every other input, in the inputs' structure: one None per tensor of a tensor
    list, an empty list for an empty list. The structure is read off ctx.needs_input_grad, which holds the
    arguments the op was called with: the dispatcher drops trailing arguments equal to their defaults
    (softcap=0.0, alibi_slopes=None), and torch 2.11 wants exactly those back (later versions also accept
    one gradient per schema argument)."""
    rest = [[None] * len(n) if isinstance(n, list) else None for n in ctx.needs_input_grad[len(grads):]]
    return (*grads, *rest)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi, *sparse = ctx.saved_tensors
    scale, left, right, sparse_shape, softcap = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fused_attn.bwd(dout, q, k, v, out, lse, dlse, scale, left, right, sparse,
                                          sparse_shape, False, softcap, alibi)
    return _mirror_inputs(ctx, (dq, dk, dv))


torch.library.register_autograd("fused_attn::fwd", _backward, setup_context=_setup_context)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, softcap, alibi = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
    ctx.args = (max_q, max_k, scale, left, right, softcap)
    ctx.set_materialize_grads(False)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    max_q, max_k, scale, left, right, softcap = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fused_attn.varlen_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale,
                                                 left, right, softcap, alibi, False)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fused_attn::varlen_fwd", _varlen_backward, setup_context=_varlen_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("fused_attn.flash: gradients of gradients (double backward) are not supported")


torch.library.register_autograd("fused_attn::bwd", _no_double_backward)
torch.library.register_autograd("fused_attn::varlen_bwd", _no_double_backward)
