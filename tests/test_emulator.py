"""The CUDA kernels under the host emulator (tests/emu), a subset of the full matrix that CI runs on every
change: each kernel family (mma.sync, Hopper wgmma/TMA, fp32/fp64, split-KV decode, linear attention),
forward and both backward modes, one head dim each, a few cases that between them cover ragged tiles, GQA,
strided K/V, rows that see nothing, NaN inputs, block-sparse full / partial / empty tiles, softcap /
ALiBi, packed batches, paged caches and (Hopper) rings that wrap several times; plus five injected bugs the
emulator must report. No GPU needed; each test builds its binary (tens of seconds) and runs it. The whole matrix:
python3 tests/emu/run_all.py (tests/emu/README.md)."""
from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

EMU = pathlib.Path(__file__).resolve().parent / "emu"


def _gxx_ok() -> bool:
    gxx = shutil.which("g++")
    if gxx is None:
        return False
    out = subprocess.run([gxx, "-dumpversion"], capture_output=True, text=True).stdout.strip()
    return out.split(".")[0].isdigit() and int(out.split(".")[0]) >= 12


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _gxx_ok(), reason="the emulator needs g++ >= 12 (C++20, _Float16)")]

SUBSETS = {
    # family, dtype, head dim, cases (substrings of emu_main.cpp's case names)
    "mma": ("mma", "fp16", 64, "dense,causal_sq_gt_sk,sparse_partial,mods_varlen_causal,nan_inputs,"
            "decode_paged16_split3_softcap,decode_nan_split3"),
    "sm90": ("sm90", "bf16", 128, "dense,causal_sq_gt_sk,sparse_partial,many_tiles,sparse_mods,mods_varlen_causal,"
             "nan_inputs"),
    "generic": ("generic", "fp32", 64, "dense,sparse_causal,nan_inputs,decode_mqa_window_split4"),
    # linear attention (emu_linear.cpp's case names; one binary, the head dim is the case's): tensor cores
    # with the two-level scan both ways, non-causal Sq != Sk, S = 1; fp32 with odd dims and an initial state.
    "linear": ("linear", "bf16", 64, "state_segments,noncausal_relu_sq_ne_sk,single"),
    "linear_fp32": ("linear", "fp32", 64, "odd_d_relu"),
}


@pytest.mark.parametrize("subset", list(SUBSETS))
def test_kernels_under_emulator(subset):
    family, dtype, hd, cases = SUBSETS[subset]
    cmd = [sys.executable, str(EMU / "run_all.py"), "--family", family, "--dtype", dtype, "--hd", str(hd),
           "--case", cases]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    tail = "\n".join((r.stdout + r.stderr).splitlines()[-30:])
    m = re.search(r"^(\d+) passed, (\d+) failed$", r.stdout, re.M)
    assert m is not None, f"no summary from run_all.py (exit {r.returncode}):\n{tail}"
    passed, failed = int(m.group(1)), int(m.group(2))
    assert failed == 0 and r.returncode == 0, f"{failed} emulator runs failed:\n{tail}"
    # Every case runs forward + backward (two modes for the tensor-core families), a decode case its one
    # forward pass (split kernel + combine): nothing skipped.
    per_case = 2 if family in ("generic", "linear") else 3
    names = cases.split(",")
    want = sum(1 if n.startswith("decode") else per_case for n in names)
    assert passed == want, f"expected every case to run ({want} units):\n{tail}"


@pytest.mark.parametrize("bug", ["wrong swizzle", "missing fence.proxy.async before the TMA store",
                                 "linear tc fwd: no barrier between",
                                 # ld.shared / st.shared tracking: write-after-read (the race racecheck found
                                 # on an H100) and read-after-write on the sm90 backward's lse / delta vector
                                 "lse/delta loads of the other warps unordered",
                                 "lse/delta stores unordered"])
def test_emulator_reports_injected_bug(bug):
    """A test that must fail is part of the check: the emulator reports a known bug (Hopper, linear attention)."""
    r = subprocess.run([sys.executable, str(EMU / "selftest.py"), bug], capture_output=True, text=True, timeout=900)
    assert "1 of 1 injected bugs caught" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
