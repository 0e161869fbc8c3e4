"""Smoke tests of the benchmark scripts' code paths that otherwise run only on a lent GPU (the GPU modes of
bench/varlen_bench.py and bench/decode_bench.py, gpu_check.sh's stages): tiny shapes on the CPU, so that a
GPU session does not lose its minutes to a Python error. No timing is asserted, only that every
implementation ran, agreed where the script checks agreement, and produced its rows."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.append(str(BENCH))

import decode_bench  # noqa: E402
import varlen_bench  # noqa: E402


def test_varlen_gpu_case_runs_on_cpu():
    rows = varlen_bench.gpu_varlen_case(600, 16, 160, 2, 32, 1, torch.float32, "cpu")
    impls = {"varlen", "varlen-sm80", "flash-equal", "varlen-equal", "flash-padded"}
    for p in ("fwd", "fwd+bwd"):
        got = {r["impl"] for r in rows if r["pass_"] == p}
        assert impls <= got, f"{p}: {sorted(got)}"
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["tokens"] == 600 for r in rows)


def test_varlen_cpu_case_runs():
    rows = varlen_bench.varlen_case(600, 16, 160, 2, 32, 1, torch.float32)  # checks the padded peer itself
    assert {r["impl"] for r in rows} == {"varlen", "flash-mean", "flash-padded"}


def test_varlen_lengths_add_up():
    g = torch.Generator().manual_seed(0)
    lens = varlen_bench.spread_lengths(5000, 64, 700, g)
    assert sum(lens) == 5000 and all(1 <= x <= 700 for x in lens)


def test_decode_case_with_device_argument():
    gen = torch.Generator().manual_seed(0)
    big = torch.ones(1 << 16)
    rows = decode_bench.decode_case(2, 4, 2, 32, 128, torch.float32, 1, lambda: big.sum(), True, gen, "cpu")
    assert {r["impl"] for r in rows} == {"read-bw", "kvcache", "kvcache-paged", "flash", "sdpa"}
    assert all(r["gbps"] > 0 for r in rows)


def test_gpu_check_script_parses_and_knows_its_stages():
    script = BENCH / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for stage in ("build", "prebuilt", "test", "sanitize", "bench-dense", "bench-rest", "bench-serve"):
        assert f"{stage})" in text or f"|{stage}" in text or f"{stage}|" in text, stage
