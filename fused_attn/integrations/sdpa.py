"""fused_attn as a backend of torch.nn.functional.scaled_dot_product_attention (SDPA).

    import fused_attn                                     # registers the provider "fused_attn", inactive
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
    activate_flash_attention_impl("fused_attn")           # unmodified SDPA calls now run fused_attn's kernels
    ...
    restore_flash_attention_impl()                        # PyTorch's own kernels again

Mechanism: torch (2.9 and newer) keeps a registry of flash-attention providers in torch.nn.attention
(register_flash_attention_impl / activate_flash_attention_impl / restore_flash_attention_impl); its own
FA3/FA4 providers (torch/nn/attention/_fa4.py) override the aten ops behind SDPA's flash backend with a
torch.library.Library("aten", "IMPL"). fused_attn does the same. Importing fused_attn only registers the
provider; activation installs the overrides and restoring removes them (PyTorch's kernels come back).

Ops replaced on activation:
  CPU   _scaled_dot_product_flash_attention_for_cpu (+ _backward): what SDPA runs on the CPU whenever its
        flash backend is chosen (no dropout, q/k/v of one head dim: every dtype, GQA with enable_gqa).
  CUDA  _scaled_dot_product_flash_attention (+ _backward): SDPA's flash backend;
        _flash_attention_forward, _flash_attention_forward_no_dropout_inplace, _flash_attention_backward:
        the FlashAttention-2 entry points, also used by torch.nn.attention.varlen.varlen_attn.
  The five CUDA ops are registered for the CPU too, where PyTorch has no kernel for them (so varlen_attn
  runs on the CPU while the provider is active).

Semantics kept: SDPA's is_causal is aligned top-left (query i sees keys j <= i, also when Sq != Sk),
fused_attn.flash's causal bottom-right, so SDPA-level calls are mapped (keys beyond Sq are dropped when
Sq < Sk, window (-1, Sq - Sk) otherwise); the FlashAttention-2 ops (_flash_attention_*) keep their own
bottom-right causal and (left, right) windows, which are fused_attn's. lse is the natural-log
log-sum-exp of the scaled scores, as PyTorch's kernels return it, in the layouts PyTorch's meta
functions declare (so torch.compile sees the strides it expects).

What the kernels do not serve, and what happens instead (documented in notes/README):
  attn_mask tensor (CPU op), dropout_p > 0, return_debug_mask=True, seqused_k, block_table, alibi_slopes,
  head dims q/k != v, shapes the build has no kernel for (CUDA: no CUDA kernels in this build, or an
  fp16/bf16 head dim without a tensor-core instantiation):
  -> the call runs PyTorch's own kernel for that op (the one the provider replaced), unchanged; where
     PyTorch has none (the FlashAttention-2 ops on the CPU) a ValueError names the argument.
  SDPA itself sends dropout_p > 0 on the CPU, and q/k/v of different head dims, to its math path, so
  those never reach the provider there.
"""
from __future__ import annotations

import logging
import math
import re
import warnings
from dataclasses import dataclass

import torch

PROVIDER = "fused_attn"
MIN_TORCH = "2.9"

log = logging.getLogger("fused_attn.sdpa")

_CPU_SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_flash_attention_for_cpu_backward")
_FLASH_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
              "_flash_attention_forward", "_flash_attention_forward_no_dropout_inplace",
              "_flash_attention_backward")


class ProviderUnavailable(RuntimeError):
    """This torch has no flash-attention provider registry (torch.nn.attention)."""


def registry_available() -> bool:
    """Whether this torch lets a library replace SDPA's flash kernels (torch >= 2.9)."""
    att = torch.nn.attention
    return all(hasattr(att, n) for n in ("register_flash_attention_impl", "activate_flash_attention_impl",
                                         "restore_flash_attention_impl"))


def _unavailable_message() -> str:
    return (f"fused_attn's SDPA provider needs torch >= {MIN_TORCH} (torch.nn.attention."
            f"register_flash_attention_impl / activate_flash_attention_impl); this torch {torch.__version__} "
            "has no such registry. Upgrade torch, or call fused_attn.flash() (or fused_attn.compat) directly.")


def register() -> bool:
    """Registers the provider "fused_attn" with torch.nn.attention (done when fused_attn is imported; never
    activates it). Returns False, without error, on a torch without the registry."""
    if not registry_available():
        return False
    torch.nn.attention.register_flash_attention_impl(PROVIDER, register_fn=install)
    return True


def activate() -> None:
    """torch.nn.attention.activate_flash_attention_impl("fused_attn"), with a clear error on an older torch."""
    if not registry_available():
        raise ProviderUnavailable(_unavailable_message())
    if PROVIDER not in torch.nn.attention.list_flash_attention_impls():
        register()
    torch.nn.attention.activate_flash_attention_impl(PROVIDER)


def restore() -> None:
    """torch.nn.attention.restore_flash_attention_impl(): PyTorch's own kernels again."""
    if not registry_available():
        raise ProviderUnavailable(_unavailable_message())
    torch.nn.attention.restore_flash_attention_impl(_raise_warn=False)


def is_active() -> bool:
    return registry_available() and torch.nn.attention.current_flash_attention_impl() == PROVIDER


# ---------------------------------------------------------------------------------------------------------
# Installing and removing the overrides.


@dataclass
class _Handle:
    """What activation returns to torch's registry; remove() takes the overrides out again."""
    library: torch.library.Library | None

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()  # deregisters now; PyTorch's kernels are the computed ones again
        self.library = None
        _ORIGINALS.clear()


# (op name, dispatch key) -> PyTorch's kernel captured before the override, or None when there is none.
_ORIGINALS: dict = {}


def _original(op: str, key: str):
    get_kernel = getattr(torch.library, "get_kernel", None)
    if get_kernel is None or not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key):
        return None
    return get_kernel(f"aten::{op}", key)


def install() -> _Handle:
    """The register_fn given to torch's registry: overrides the ops listed above (CPU and CUDA keys)."""
    impls = {
        "_scaled_dot_product_flash_attention_for_cpu": _cpu_sdpa_fwd,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _cpu_sdpa_bwd,
        "_scaled_dot_product_flash_attention": _sdpa_flash_fwd,
        "_scaled_dot_product_flash_attention_backward": _sdpa_flash_bwd,
        "_flash_attention_forward": _fa_fwd,
        "_flash_attention_forward_no_dropout_inplace": _fa_fwd_inplace,
        "_flash_attention_backward": _fa_bwd,
    }
    plan = [(op, "CPU") for op in _CPU_SDPA_OPS] + [(op, k) for op in _FLASH_OPS for k in ("CPU", "CUDA")]
    # Only the ops this torch has (torch 2.11 has no _flash_attention_forward_no_dropout_inplace).
    plan = [(op, key) for op, key in plan if hasattr(torch.ops.aten, op)]
    originals = {(op, key): _original(op, key) for op, key in plan}
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        # Replacing PyTorch's kernel is the point; torch warns about every such override.
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*registered kernel.*")
        for op, key in plan:
            lib.impl(op, _bind(impls[op], op, key), key, with_keyset=True)
    _ORIGINALS.clear()
    _ORIGINALS.update(originals)
    return _Handle(lib)


def _bind(fn, op, key):
    def impl(keyset, *args, **kwargs):
        return fn(op, key, keyset, *args, **kwargs)

    impl.__name__ = f"fused_attn_{op}_{key.lower()}"
    return impl


class _Fallback(Exception):
    """Raised inside an override when fused_attn's kernels do not serve a call; carries the reason."""

    def __init__(self, argument: str, value, why: str = "not served by fused_attn's kernels"):
        super().__init__(argument)
        self.argument, self.value, self.why = argument, value, why


def _run(op, key, keyset, serve, args, kwargs):
    """serve(*args, **kwargs) or, when it raises _Fallback, PyTorch's own kernel for (op, key)."""
    try:
        return serve(*args, **kwargs)
    except _Fallback as fb:
        orig = _ORIGINALS.get((op, key))
        if orig is None:
            raise ValueError(
                f"{fb.argument}: {fb.value!r} is {fb.why}, and PyTorch has no {key} kernel for aten::{op} "
                f"to fall back to (fused_attn SDPA provider)") from None
        log.debug("aten::%s on %s: %s = %r %s; running PyTorch's kernel", op, key, fb.argument, fb.value, fb.why)
        return orig.call_boxed(keyset, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# What the kernels serve.


def _check_served(q, k, v, dropout_p=0.0, attn_mask=None, return_debug_mask=False):
    if attn_mask is not None:
        raise _Fallback("attn_mask", f"tensor of shape {tuple(attn_mask.shape)}")
    if dropout_p:
        raise _Fallback("dropout_p", dropout_p)
    if return_debug_mask:
        raise _Fallback("return_debug_mask", return_debug_mask)
    if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
        raise _Fallback("value", f"head dim {v.shape[-1]} (query {q.shape[-1]})",
                        "a head dim that differs from query's, which fused_attn does not serve")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise _Fallback("query", q.dtype, "a dtype fused_attn does not serve")
    if q.device.type == "cuda":
        from .._ops import build_info, tc_head_dim

        if "cuda" not in build_info()["backends"]:
            raise _Fallback("query", f"a {q.device} tensor", "not served: this build has no CUDA kernels")
        if q.dtype in (torch.float16, torch.bfloat16) and not tc_head_dim(q.dtype, q.shape[-1]):
            raise _Fallback("query", f"head dim {q.shape[-1]}", "not served by this build's CUDA kernels")
        if q.shape[-1] > 256:
            raise _Fallback("query", f"head dim {q.shape[-1]}", "over the CUDA kernels' 256")
    elif q.device.type != "cpu":
        raise _Fallback("query", f"a {q.device} tensor", "on a device fused_attn does not serve")


def _scale(scale, d):
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def _window(left, right):
    return (-1 if left is None else int(left)), (-1 if right is None else int(right))


def _deterministic():
    return torch.are_deterministic_algorithms_enabled()


def _top_left(q, k, v, is_causal):
    """SDPA's is_causal (top-left: query i sees keys j <= i) in fused_attn's terms: (k, v, left, right).
    With Sq < Sk the keys past Sq are seen by no query and are dropped; otherwise right = Sq - Sk >= 0."""
    if not is_causal:
        return k, v, -1, -1
    sq, sk = q.shape[2], k.shape[2]
    if sq < sk:
        k, v = k[:, :, :sq], v[:, :, :sq]
        sk = sq
    return k, v, -1, sq - sk


def _like(ref: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """src with ref's memory layout (a copy only when the strides differ)."""
    dst = torch.empty_like(ref, dtype=src.dtype) if ref.shape == src.shape else None
    if dst is None or dst.stride() == src.stride():
        return src
    return dst.copy_(src)


def _permuted(src: torch.Tensor, order) -> torch.Tensor:
    """src in the layout torch.empty_permuted(src.shape, order) has (a copy only when it differs)."""
    dst = torch.empty_permuted(src.shape, order, dtype=src.dtype, device=src.device)
    return src if dst.stride() == src.stride() else dst.copy_(src)


def _dense_fwd(q, k, v, scale, left, right):
    """fused_attn's dense forward on (B, H, S, D) tensors: (out, lse)."""
    return _kernel(torch.ops.fused_attn.fwd, q, k, v, scale, left, right, [], [])


def _dense_bwd(dout, q, k, v, out, lse, scale, left, right):
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    return _kernel(torch.ops.fused_attn.bwd, dout, q, k, v, out, lse, None, scale, left, right, [], [],
                   _deterministic())


def _lse32(lse):
    """lse as PyTorch's flash ops return it: float32 (kept float64 for float64 inputs, which PyTorch's
    flash kernels never see), contiguous."""
    return (lse if lse.dtype == torch.float64 else lse.float()).contiguous()


def _pad_keys(g, sk):
    """Gradient of keys dropped by _top_left: zeros past the kept ones."""
    if g.shape[2] == sk:
        return g
    full = g.new_zeros((*g.shape[:2], sk, g.shape[3]))
    full[:, :, :g.shape[2]] = g
    return full


# ---------------------------------------------------------------------------------------------------------
# CPU: _scaled_dot_product_flash_attention_for_cpu and its backward (q, k, v: (B, H, S, D)).


def _cpu_sdpa_fwd(op, key, keyset, *args, **kwargs):
    def serve(query, key_, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
        _check_served(query, key_, value, dropout_p, attn_mask)
        k, v, left, right = _top_left(query, key_, value, is_causal)
        out, lse = _dense_fwd(query, k, v, _scale(scale, query.shape[-1]), left, right)
        # PyTorch's layouts (meta function): out like query, lse stored (B, Sq, H).
        return _like(query, out), _permuted(lse, (0, 2, 1))

    return _run(op, key, keyset, serve, args, kwargs)


def _cpu_sdpa_bwd(op, key, keyset, *args, **kwargs):
    def serve(grad_out, query, key_, value, out, logsumexp, dropout_p, is_causal, *, attn_mask=None,
              scale=None):
        _check_served(query, key_, value, dropout_p, attn_mask)
        k, v, left, right = _top_left(query, key_, value, is_causal)
        dq, dk, dv = _dense_bwd(grad_out, query, k, v, out, logsumexp, _scale(scale, query.shape[-1]), left,
                                right)
        dk, dv = _pad_keys(dk, key_.shape[2]), _pad_keys(dv, key_.shape[2])
        # PyTorch's CPU gradients are stored (B, S, H, D) (meta function).
        return tuple(_permuted(g, (0, 2, 1, 3)) for g in (dq, dk, dv))

    return _run(op, key, keyset, serve, args, kwargs)


# ---------------------------------------------------------------------------------------------------------
# SDPA's flash backend (CUDA; q, k, v: (B, H, S, D)) and the FlashAttention-2 ops (dense (B, S, H, D) or
# packed (total, H, D) with cum_seq_*).


def _aux(query, return_debug_mask=False):
    """rng state, offset and debug mask as PyTorch's flash kernels return them without dropout."""
    dev = query.device
    return (torch.zeros((2,), dtype=torch.uint64, device=dev), torch.zeros((), dtype=torch.uint64, device=dev),
            torch.empty(0, dtype=query.dtype, device=dev))


def _sdpa_flash_fwd(op, key, keyset, *args, **kwargs):
    def serve(query, key_, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
        _check_served(query, key_, value, dropout_p, None, return_debug_mask)
        k, v, left, right = _top_left(query, key_, value, is_causal)
        out, lse = _dense_fwd(query, k, v, _scale(scale, query.shape[-1]), left, right)
        seed, offset, debug = _aux(query)
        return (_like(query, out), _lse32(lse), None, None, query.shape[2], key_.shape[2], seed,
                offset, debug)

    return _run(op, key, keyset, serve, args, kwargs)


def _sdpa_flash_bwd(op, key, keyset, *args, **kwargs):
    def serve(grad_out, query, key_, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
              is_causal, philox_seed, philox_offset, *, scale=None):
        _check_served(query, key_, value, dropout_p)
        k, v, left, right = _top_left(query, key_, value, is_causal)
        dq, dk, dv = _dense_bwd(grad_out, query, k, v, out, logsumexp, _scale(scale, query.shape[-1]), left,
                                right)
        return (_like(query, dq), _like(key_, _pad_keys(dk, key_.shape[2])),
                _like(value, _pad_keys(dv, key_.shape[2])))

    return _run(op, key, keyset, serve, args, kwargs)


def _check_fa_extras(seqused_k=None, alibi_slopes=None, block_table=None):
    if seqused_k is not None:
        raise _Fallback("seqused_k", "a tensor")
    if block_table is not None:
        raise _Fallback("block_table", "a tensor")
    if alibi_slopes is not None:
        # the aten backward has no alibi argument, so a served forward could not be differentiated
        raise _Fallback("alibi_slopes", "a tensor")


def _fa_forward(query, key_, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                return_debug_mask, scale=None, window_size_left=None, window_size_right=None, seqused_k=None,
                alibi_slopes=None, block_table=None, num_splits=None):
    """The FlashAttention-2 forward in fused_attn: (out in query's layout, lse)."""
    _check_served(query, key_, value, dropout_p, None, return_debug_mask)
    _check_fa_extras(seqused_k, alibi_slopes, block_table)
    left, right = _window(window_size_left, window_size_right)
    sc = _scale(scale, query.shape[-1])
    if is_causal:
        right = 0
    if cum_seq_q is None:
        # dense: (B, S, H, D), FlashAttention's layout, viewed as (B, H, S, D) without a copy
        q, k, v = (t.transpose(1, 2) for t in (query, key_, value))
        out, lse = _dense_fwd(q, k, v, sc, left, right)
        return _like(query, out.transpose(1, 2)), _lse32(lse)
    out, lse = _varlen_fwd(query, key_, value, cum_seq_q, cum_seq_k, max_q, max_k, sc, left, right)
    return _like(query, out), _lse32(lse)


def _fa_fwd(op, key, keyset, *args, **kwargs):
    def serve(*a, **kw):
        out, lse = _fa_forward(*a, **kw)
        seed, offset, debug = _aux(a[0])
        return out, lse, seed, offset, debug

    return _run(op, key, keyset, serve, args, kwargs)


def _fa_fwd_inplace(op, key, keyset, *args, **kwargs):
    def serve(out, *a, **kw):
        res, lse = _fa_forward(*a, **kw)
        out.copy_(res)
        return lse

    return _run(op, key, keyset, serve, args, kwargs)


def _fa_bwd(op, key, keyset, *args, **kwargs):
    def serve(grad_out, query, key_, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
              is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None):
        _check_served(query, key_, value, dropout_p)
        left, right = _window(window_size_left, window_size_right)
        if is_causal:
            right = 0
        sc = _scale(scale, query.shape[-1])
        if cum_seq_q is None:
            t = [x.transpose(1, 2) for x in (grad_out, query, key_, value, out)]
            dq, dk, dv = _dense_bwd(*t, logsumexp, sc, left, right)
            dq, dk, dv = (g.transpose(1, 2) for g in (dq, dk, dv))
        else:
            dq, dk, dv = _varlen_bwd(grad_out, query, key_, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                                     max_k, sc, left, right)
        return _like(query, dq), _like(key_, dk), _like(value, dv)

    return _run(op, key, keyset, serve, args, kwargs)


# Packed variable-length batches go through fused_attn.flash_varlen's kernels (ops varlen_fwd / varlen_bwd).

# The kernels' error for what this build has no CUDA kernel for (ops.cpp checked_tc_head_dim: "q: head dim 40
# is not supported by the CUDA torch.bfloat16 kernels of this build: ..."): such a call falls back.
_NO_CUDA_KERNEL = re.compile(r"is not supported by the CUDA (\S+ )?kernels of this build")


def _kernel(op, *args):
    """Runs a fused_attn op; a feature this build's CUDA kernels do not have yet becomes a fallback."""
    try:
        return op(*args)
    except ValueError as e:
        if _NO_CUDA_KERNEL.search(str(e)):
            raise _Fallback("query", "a CUDA tensor", f"not served yet ({str(e).splitlines()[0]})") from None
        raise


def _cu(cu, name):
    if cu is None:
        raise _Fallback(name, None, "required by fused_attn for a packed batch")
    return cu if cu.dtype == torch.int32 else cu.to(torch.int32)


def _varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right):
    return _kernel(torch.ops.fused_attn.varlen_fwd, q, k, v, _cu(cu_q, "cum_seq_q"), _cu(cu_k, "cum_seq_k"),
                   int(max_q), int(max_k), scale, left, right, 0.0, None)


def _varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right):
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    return _kernel(torch.ops.fused_attn.varlen_bwd, dout, q, k, v, out, lse, None, _cu(cu_q, "cum_seq_q"),
                   _cu(cu_k, "cum_seq_k"), int(max_q), int(max_k), scale, left, right, 0.0, None, _deterministic())
