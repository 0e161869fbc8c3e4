"""The linear-attention CUDA kernels on the host emulator (tests/emu/emu_linear.cpp): tensor-core forward in
fp16 / bf16, fp32 / fp64 forward and backward, against a float64 reference (about 1.5 minutes on 2 cores,
mostly thread start-up of the emulated blocks). Skipped with a reason when g++ >= 12 is missing."""
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


@pytest.mark.slow
@pytest.mark.skipif(not _gxx_ok(), reason="the emulator needs g++ >= 12")
def test_linear_kernels_on_the_emulator():
    r = subprocess.run([sys.executable, str(EMU / "run_all.py"), "--family", "linear"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    m = re.fullmatch(r"(\d+) passed, (\d+) failed", last)
    assert m is not None, r.stdout[-3000:]
    assert r.returncode == 0 and int(m.group(2)) == 0, r.stdout[-3000:]
    assert int(m.group(1)) >= 40, f"fewer emulator cases ran than written: {last}"
