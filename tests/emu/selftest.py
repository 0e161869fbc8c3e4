#!/usr/bin/env python3
"""Shows that the emulator can fail: builds copies of the converted kernels with one known bug each
(a missing barrier, a missing column predicate, a wrong page slot, a wrong combine weight) and expects
every one of them to be reported. Run after run_all.py (or gen_kernels.py): python3 tests/emu/selftest.py
(about 3 minutes)."""
from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
GEN = HERE / "build" / "gen"
OUT = HERE / "build" / "selftest"

# name, file, original text, mutated text, build defines, case
MUTATIONS = [
    ("fwd: no barrier before the next prefetch", "fwd_kernel.cuh",
     "__syncthreads();  // every warp is done with this stage", "//", ["-DEMU_ELEM=__half", "-DEMU_HD=64"], "ragged"),
    ("dkdv: no barrier between dS^T stores and the dQ product", "bwd_kernel.cuh",
     "if (atomic_dq) {\n      __syncthreads();", "if (atomic_dq) {", ["-DEMU_ELEM=__half", "-DEMU_HD=64"], "ragged"),
    ("dq_kernel: no barrier in the split reduction", "bwd_kernel.cuh",
     "  __syncthreads();\n  if (ks == 0) {", "  if (ks == 0) {", ["-DEMU_ELEM=__nv_bfloat16", "-DEMU_HD=128"], "ragged"),
    ("load_tile_async: columns >= d not predicated", "tc_common.cuh",
     "const bool ok = row_ok && c * 8 < d;", "const bool ok = row_ok;", ["-DEMU_ELEM=__half", "-DEMU_HD=64"], "ragged"),
    ("generic fwd: no barrier before K is overwritten by V", "generic.cu",
     "__syncthreads();  // ks is refilled below (V) or by the next chunk", "//", ["-DEMU_GENERIC", "-DEMU_T=float"],
     "dense"),
    ("decode: no barrier before the next K / V prefetch", "decode_kernel.cuh",
     "__syncthreads();  // every warp is done with this stage", "//", ["-DEMU_ELEM=__half", "-DEMU_HD=64"], "decode"),
    ("decode: page slot taken modulo 16 instead of the page size", "decode.h",
     "(j % p.page_size) * st.s", "(j % 16) * st.s", ["-DEMU_ELEM=__nv_bfloat16", "-DEMU_HD=128"], "decode_paged64"),
    ("decode combine: parts weighted by exp(lse_t - max) instead of exp(lse_t - lse)", "decode.cu",
     "const P w = dexp(lp[r] - lse);", "const P w = dexp(lp[r] - mx);", ["-DEMU_GENERIC", "-DEMU_T=float"],
     "decode"),
]


def main() -> int:
    subprocess.run([sys.executable, str(HERE / "gen_kernels.py")], check=True)
    missed = 0
    for i, (name, f, old, new, defs, case) in enumerate(MUTATIONS):
        d = OUT / f"m{i}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(GEN, d)
        p = d / "cuda" / f
        text = p.read_text()
        if old not in text:
            print(f"SKIP {name}: pattern not found in {f} (kernel changed; update selftest.py)")
            missed += 1
            continue
        p.write_text(text.replace(old, new, 1))
        exe = d / "emu"
        subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", "-I", str(HERE / "shim"), "-I", str(d), *defs,
                        str(HERE / "emu_main.cpp"), "-o", str(exe)], check=True)
        r = subprocess.run([str(exe), case], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        caught = r.returncode != 0
        print(f"{'caught' if caught else 'MISSED'}: {name}")
        missed += not caught
    print(f"{len(MUTATIONS) - missed} of {len(MUTATIONS)} injected bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
