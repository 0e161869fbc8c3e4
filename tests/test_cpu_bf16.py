"""bf16 forwards on the CPU through bf16 GEMMs where the CPU has them (build_info()["cpu_bf16_gemm"]: oneDNN's
AMX / AVX512-BF16 brgemm; Q K^T and P V in bf16 with fp32 accumulation, P rounded to bf16 as on the GPU), and
computed in fp32 elsewhere or with FUSED_ATTN_CPU_BF16_GEMM=0. Both against the float64 reference under the
STYLE.md rule (out, lse and the gradients, whose backward runs in fp32), on awkward sizes, every mask pattern
and both modifiers; the two paths on the same inputs, the switch read once per process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_attn
from conftest import check_all, make_qkv

HERE = Path(__file__).resolve().parent
SHAPES = [(2, 4, 2, 77, 300, 128), (1, 2, 1, 130, 200, 64), (1, 1, 1, 257, 1025, 96), (1, 2, 1, 1, 1, 64),
          (1, 2, 2, 300, 300, 256), (2, 2, 2, 64, 64, 32), (1, 2, 1, 65, 129, 40)]
MODS = [dict(), dict(causal=True), dict(window=(40, 10)), dict(softcap=5.0), dict(causal=True, softcap=30.0),
        dict(alibi_slopes=torch.tensor([0.3, 0.05, 0.7, 0.2]))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kw", MODS, ids=lambda kw: "-".join(kw) or "plain")
def test_bf16_against_reference(shape, kw):
    b, hq, hk, sq, sk, d = shape
    if "alibi_slopes" in kw:
        kw = dict(alibi_slopes=kw["alibi_slopes"][:hq])
    q, k, v = make_qkv(b, hq, hk, sq, sk, d, dtype=torch.bfloat16, seed=sq + d)
    check_all(q, k, v, **kw)


def test_bf16_strided_views():
    q, k, v = make_qkv(2, 4, 2, 90, 150, 64, dtype=torch.bfloat16, seed=5, layout="bshd")
    check_all(q, k, v, causal=True)


SCRIPT = r"""
import sys, torch, fused_attn
sys.path.insert(0, sys.argv[1])
from conftest import make_qkv
outs = []
for seed, kw in ((1, dict()), (2, dict(causal=True)), (3, dict(softcap=5.0))):
    q, k, v = make_qkv(2, 4, 2, 150, 333, 64, dtype=torch.bfloat16, seed=seed)
    outs.append(fused_attn.flash(q, k, v, **kw).float())
torch.save((fused_attn.build_info()["cpu_bf16_gemm"], outs), sys.argv[2])
"""


def test_the_two_paths_agree(tmp_path):
    """The bf16-GEMM forward and the fp32-computed one agree to bf16 rounding (a few units in the last place of
    the output), and FUSED_ATTN_CPU_BF16_GEMM=0 turns the GEMMs off."""
    res = {}
    for flag in ("1", "0"):
        path = tmp_path / f"out{flag}.pt"
        env = dict(os.environ, FUSED_ATTN_CPU_BF16_GEMM=flag, OMP_NUM_THREADS="2")
        r = subprocess.run([sys.executable, "-c", SCRIPT, str(HERE), str(path)], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        res[flag] = torch.load(path)
    assert res["0"][0] is False
    if not res["1"][0]:
        pytest.skip("this CPU has no bf16 GEMMs (build_info()['cpu_bf16_gemm'] is False): only the fp32 path runs")
    for a, b in zip(res["1"][1], res["0"][1]):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()


def test_build_info_says_which():
    assert isinstance(fused_attn.build_info()["cpu_bf16_gemm"], bool)
