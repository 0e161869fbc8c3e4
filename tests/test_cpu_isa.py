"""The CPU kernels at every vector width this machine runs (tile_math.h compiles them at 16, 8 and 4 lanes for
x86-64-v4, x86-64-v3 and baseline x86-64 and picks one at load time; FUSED_ATTN_CPU_ISA lowers the pick).

Each width runs in its own process (the pick is read once) on awkward sizes, so that every width's partial-vector
tails are exercised: forward and backward with softcap, ALiBi, causal and window masks against the float64
reference (STYLE.md rule), the linear-attention feature maps, and flash_kvcache (whose AVX2 tiles run at
x86-64-v3 width only)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fused_attn

HERE = Path(__file__).resolve().parent
LEVELS = {"v1": "baseline", "v3": "x86-64-v3", "v4": "x86-64-v4"}
RANK = {"baseline": 1, "x86-64-v3": 3, "x86-64-v4": 4}

SCRIPT = r"""
import sys, torch, fused_attn
sys.path.insert(0, sys.argv[1])
from conftest import check_all, make_qkv
print(fused_attn.build_info()["cpu_isa"])
g = torch.Generator().manual_seed(3)
for sq, sk, d in ((77, 130, 40), (5, 19, 7), (130, 33, 64)):
    for kw in (dict(), dict(softcap=2.5), dict(alibi_slopes=torch.rand(3, generator=g) * 0.5),
               dict(softcap=1.5, causal=True, alibi_slopes=torch.rand(2, 3, generator=g) * 0.5),
               dict(window=(20, 3), softcap=4.0)):
        for dt in (torch.float32, torch.bfloat16):
            q, k, v = make_qkv(2, 3, 3, sq, sk, d, seed=sq + d)
            check_all((q * 3).to(dt), k.to(dt), v.to(dt), **kw)
# the decode tiles: the AVX2 ones at x86-64-v3 (GQA group of 4, d % 16 == 0), the generic ones otherwise
from test_kvcache import make_cache, reference_over
lens = [150, 33]
for dt in (torch.float32, torch.bfloat16):
    kc, vc, bt, kf, vf = make_cache(2, 2, 64, lens, 160, page_size=16, dtype=dt, seed=1)
    q = torch.randn(2, 8, 1, 64, dtype=torch.float64).to(dt)
    got = fused_attn.flash_kvcache(q, kc, vc, torch.tensor(lens, dtype=torch.int32), block_table=bt)
    ref, _ = reference_over(q.double(), kf.double(), vf.double(), lens)
    err = (got.double() - ref).abs().max().item()
    assert err < (1e-5 if dt == torch.float32 else 3e-2), (dt, err)
# linear attention's feature maps run through the same width dispatch
from fused_attn import reference
for fm in ("elu1", "relu"):
    q, k, v = make_qkv(1, 2, 2, 45, 45, 13, seed=7)
    got = fused_attn.linear_attention(q.float(), k.float(), v.float(), feature_map=fm, causal=True)
    ref = reference.linear_attention(q, k, v, feature_map=fm, causal=True)
    err = (got.double() - ref).abs().max().item()
    assert err < 1e-4, (fm, err)
print("ok")
"""


@pytest.mark.parametrize("level", list(LEVELS))
def test_every_cpu_width_matches_the_reference(level):
    native = fused_attn.build_info()["cpu_isa"]
    if RANK[LEVELS[level]] > RANK[native]:
        pytest.skip(f"this CPU runs {native}; {LEVELS[level]} cannot run here")
    env = dict(os.environ, FUSED_ATTN_CPU_ISA=level, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(HERE)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = r.stdout.split()
    assert lines[0] == LEVELS[level], f"asked for {level}, the kernels ran {lines[0]}"
    assert lines[-1] == "ok"
