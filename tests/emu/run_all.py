#!/usr/bin/env python3
"""Build and run the whole host-emulator matrix (tests/emu/README.md): the mma.sync kernels for every head
dim in tiles.h's kTcHeadDims, the Hopper (wgmma/TMA) kernels for sm90/tiles.h's kSm90HeadDims, both fp16
and bf16, and the fp32 / fp64 generic kernels. Not part of the default test suite (CI runs a subset,
tests/test_emulator.py); a pre-GPU check run by hand:

    python3 tests/emu/run_all.py                 # everything
    python3 tests/emu/run_all.py --hd 64 --dtype bf16 --case sparse
    python3 tests/emu/run_all.py --order rev --eager   # another warp order / copy timing
    python3 tests/emu/run_all.py --family sm90 --hd 128 --dtype bf16
    python3 tests/emu/run_all.py --family linear          # linear attention (tests/emu/emu_linear.cpp)

Builds run one at a time (a shared machine) and only when a source changed. Ends with the line
"N passed, N failed" (one unit = one case and pass of one binary); exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = HERE / "build"
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)  # mma.sync family (csrc/cuda/tiles.h kTcHeadDims)
SM90_HEAD_DIMS = (64, 128, 256)                # Hopper family (csrc/cuda/sm90/tiles.h kSm90HeadDims)
TC = {"fp16": "__half", "bf16": "__nv_bfloat16"}
GENERIC = {"fp32": "float", "fp64": "double"}
FAMILIES = ("mma", "sm90", "generic", "linear")


def targets(hds, dtypes, families=FAMILIES):
    """(binary name, compiler defines) of every emulator binary of the selection."""
    for dt in dtypes:
        if dt in TC:
            if "mma" in families:
                for hd in hds:
                    yield f"emu_{dt}_hd{hd}", [f"-DEMU_ELEM={TC[dt]}", f"-DEMU_HD={hd}"]
            if "sm90" in families:
                for hd in hds:
                    if hd in SM90_HEAD_DIMS:
                        yield f"emu90_{dt}_hd{hd}", ["-DEMU_SM90", f"-DEMU_ELEM={TC[dt]}", f"-DEMU_HD={hd}"]
        elif "generic" in families:
            yield f"emu_{dt}", ["-DEMU_GENERIC", f"-DEMU_T={GENERIC[dt]}"]
    if "linear" in families:  # one binary for every dtype of linear attention (emu_linear.cpp)
        yield "emu_linear", ["-DEMU_LINEAR"]


def build(name, defs, cxx, sanitize):
    exe = BUILD / (name + ("_asan" if sanitize else ""))
    main_src = HERE / ("emu_linear.cpp" if "-DEMU_LINEAR" in defs else "emu_main.cpp")
    deps = [main_src, HERE / "emu_runtime.h", HERE / "emu_sm90.h", HERE / "emu_decode.h",
            *(HERE / "shim").glob("*.h"),
            *(BUILD / "gen").rglob("*")]
    if exe.exists() and exe.stat().st_mtime > max(p.stat().st_mtime for p in deps if p.is_file()):
        return exe
    cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-Wno-psabi", "-I", str(HERE / "shim"), "-I", str(BUILD / "gen"),
           *defs, str(main_src), "-o", str(exe)]
    if sanitize:
        cmd[3:3] = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    print("build:", " ".join(cmd[-3:-2] + defs), flush=True)
    subprocess.run(cmd, check=True)
    return exe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hd", type=int, nargs="*", default=list(HEAD_DIMS), help="tensor-core head dims")
    ap.add_argument("--dtype", nargs="*", default=[*TC, *GENERIC], choices=[*TC, *GENERIC])
    ap.add_argument("--family", nargs="*", default=list(FAMILIES), choices=FAMILIES,
                    help="kernel families: mma (mma.sync), sm90 (wgmma/TMA), generic (fp32/fp64), "
                         "linear (linear attention, every dtype)")
    ap.add_argument("--case", default="", help="only cases whose name contains this (comma-separated: any of these)")
    ap.add_argument("--order", default="random", choices=["random", "fwd", "rev", "free"],
                    help="warp order between barriers (free: all warps at once)")
    ap.add_argument("--eager", action="store_true", help="cp.async lands at issue instead of at the wait")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--asan", action="store_true", help="build with AddressSanitizer (plain global accesses)")
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    ap.add_argument("--probe", action="store_true",
                    help="only the probe of the Hopper readings (tests/emu/sm90_probe.cu) under the emulator")
    args = ap.parse_args()
    if args.probe:
        BUILD.mkdir(exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "gen_kernels.py")], check=True)
        exe = BUILD / "sm90_probe"
        subprocess.run([args.cxx, "-std=c++20", "-O2", "-pthread", "-Wno-psabi", "-DEMU_SM90_PROGRAM", "-I",
                        str(HERE / "shim"), "-I", str(BUILD / "gen"), str(BUILD / "gen" / "sm90_probe.cpp"), "-o",
                        str(exe)], check=True)
        r = subprocess.run([str(exe)])
        return r.returncode
    bad = [h for h in args.hd if h not in HEAD_DIMS]
    if bad:
        ap.error(f"--hd: {bad} not in {HEAD_DIMS}")

    t0 = time.time()
    BUILD.mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(HERE / "gen_kernels.py")], check=True)
    passed = failed = 0
    for name, defs in targets(args.hd, args.dtype, args.family):
        exe = build(name, defs, args.cxx, args.asan)
        t = time.time()
        for case in (args.case.split(",") if args.case else [""]):
            cmd = [str(exe), "--order", args.order, "--seed", str(args.seed)] + (["--eager"] if args.eager else [])
            if name == "emu_linear":  # one binary for every dtype: pass the selection on
                cmd += ["--dtype", ",".join(args.dtype)]
            if case:
                cmd.append(case)
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines = r.stdout.splitlines()
            for line in lines:
                if not re.fullmatch(r"\d+ passed, \d+ failed", line):
                    print(line)
            m = next((re.fullmatch(r"(\d+) passed, (\d+) failed", l) for l in reversed(lines)
                      if re.fullmatch(r"(\d+) passed, (\d+) failed", l)), None)
            if m is None:  # crashed or hung: count the run as one failure
                print(f"FAIL {name} {case}: exited with status {r.returncode} before its summary")
                failed += 1
            else:
                passed += int(m.group(1))
                failed += int(m.group(2))
        print(f"-- {name}: {time.time() - t:.0f} s", flush=True)
    print(f"total time {time.time() - t0:.0f} s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
