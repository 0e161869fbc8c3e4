"""Smoke test of an installed fused_attn wheel, run from outside the source tree by .ci/wheel_smoke.sh:
import, build_info, forward and backward on every pattern against the reference, the flash-attn compat
functions, the SDPA provider (activated: SDPA runs fused_attn's kernels; restored: it does not), and the
transformers backend module's import (transformers itself is optional)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_attn

site = Path(sys.argv[1]).resolve()
where = Path(fused_attn.__file__).resolve()
assert site in where.parents, f"fused_attn imported from {where}, not from the installed wheel in {site}"
info = fused_attn.build_info()
print(f"wheel smoke: fused_attn {fused_attn.__version__} from {where.parent}, build {info}")
assert "cpu" in info["backends"]

g = torch.Generator().manual_seed(0)
q = torch.randn(2, 4, 70, 24, generator=g, dtype=torch.float64)
k = torch.randn(2, 2, 90, 24, generator=g, dtype=torch.float64)
v = torch.randn(2, 2, 90, 24, generator=g, dtype=torch.float64)
layout = fused_attn.masks.bigbird(5, 6, 1, 1, 1, generator=torch.Generator().manual_seed(1), heads=4)
patterns = {
    "dense": {},
    "causal": dict(causal=True),
    "window": dict(window=(16, 4)),
    "causal+window": dict(causal=True, window=(16, 0)),
    "block-sparse": dict(block_mask=fused_attn.block_mask(layout, (16, 16))),
}
for name, kw in patterns.items():
    got, want = [], []
    for fn, dst in ((fused_attn.flash, got), (fused_attn.reference.attention, want)):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = fn(qq, kk, vv, **kw)
        out.backward(torch.ones_like(out))
        dst += [out.detach(), qq.grad, kk.grad, vv.grad]
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name} {label}: {m}")
    print(f"wheel smoke: {name}: forward and backward match the reference")

from fused_attn.compat import flash_attn_func  # noqa: E402

out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
torch.testing.assert_close(out.transpose(1, 2), fused_attn.reference.attention(q, k, v, causal=True))
print("wheel smoke: compat.flash_attn_func matches")

import fused_attn.integrations.transformers  # noqa: E402,F401  (imports without transformers installed)
from fused_attn.integrations import sdpa  # noqa: E402

if sdpa.registry_available():
    def calls(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return sum(e.name == "fused_attn::fwd" for e in prof.events())

    qf, kf, vf = (t.float() for t in (q, k, v))
    sdpa_call = lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, enable_gqa=True)  # noqa: E731
    assert "fused_attn" in torch.nn.attention.list_flash_attention_impls()
    torch.nn.attention.activate_flash_attention_impl("fused_attn")
    active = calls(sdpa_call)
    torch.nn.attention.restore_flash_attention_impl()
    restored = calls(sdpa_call)
    assert (active, restored) == (1, 0), f"SDPA provider: fused_attn::fwd calls active {active}, restored {restored}"
    print("wheel smoke: SDPA provider serves SDPA when activated, not after restore")
else:
    print(f"wheel smoke: torch {torch.__version__} has no SDPA provider registry; provider check skipped")
print("wheel smoke: ok")
