#!/usr/bin/env python3
"""Shows that the emulator can fail: builds copies of the converted kernels with one known bug each
(a missing barrier, a missing column predicate, a wrong softcap derivative or tanh, a packed batch's row
offset left out, a wrong page slot, a wrong combine weight; for the Hopper kernels a wrong swizzle, a wrong
mbarrier parity, missing mbarrier / wgmma waits, missing wgmma.fence and fence.proxy.async, a stage reused
before its release, ...; for linear attention missing barriers around the state, a wrong causal mask) and
expects every one of them to be reported (non-zero exit: an emulator error or a wrong result).
python3 tests/emu/selftest.py [name-substring]   (about 12 minutes for all on an idle machine)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
GEN = HERE / "build" / "gen"
OUT = HERE / "build" / "selftest"

SM90 = ["-DEMU_SM90", "-DEMU_ELEM=__nv_bfloat16", "-DEMU_HD=128"]
LINEAR = ["-DEMU_LINEAR"]  # marker: build tests/emu/emu_linear.cpp instead of emu_main.cpp

# name, file (under csrc/cuda/), original text, mutated text, build defines, case (original and mutated
# text may be tuples of the same length: several replacements in one file, all of them must be found)
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
    ("dkdv (softcap): dS without the tanh derivative", "bwd_kernel.cuh",
     "dp[nl][e] = pv * (dp[nl][e] - dd[e & 1]) * gm;", "dp[nl][e] = pv * (dp[nl][e] - dd[e & 1]);",
     ["-DEMU_ELEM=__half", "-DEMU_HD=64"], "softcap"),
    ("tanh on ex2 / rcp.approx: 1 - rcp instead of 1 - 2 rcp", "score_mod.cuh",
     "return 1.f - 2.f * fast_rcp(", "return 1.f - fast_rcp(", ["-DEMU_ELEM=__half", "-DEMU_HD=32"], "softcap"),
    ("fwd (packed batch): lse rows without the sequence's offset", "fwd_kernel.cuh",
     "+ h * p.lse_h + sv.q_off();", "+ h * p.lse_h;", ["-DEMU_ELEM=__nv_bfloat16", "-DEMU_HD=64"], "varlen_window"),
    ("generic dQ (packed batch): rows without the sequence's offset", "generic.cu",
     "p.dq_st.at(b, h, se.q_off + row)", "p.dq_st.at(b, h, row)", ["-DEMU_GENERIC", "-DEMU_T=double"],
     "varlen_window"),
    # The Hopper family (csrc/cuda/sm90/): one bug per instruction rule the emulator checks.
    ("sm90 wgmma: wrong swizzle mode in the descriptors (64B for a 128B layout)", "sm90/ptx.cuh",
     "(uint64_t(1) << 62)", "(uint64_t(2) << 62)", SM90, "many_tiles"),
    ("sm90 fwd: wrong mbarrier parity (consumer waits on the preceding phase of full K)", "sm90/fwd.cuh",
     "mbar_wait(full_k(s1), ph1);", "mbar_wait(full_k(s1), ph1 ^ 1);", SM90, "many_tiles"),
    ("sm90 fwd: missing mbarrier wait (V read before its TMA completed)", "sm90/fwd.cuh",
     "mbar_wait(full_v(s0), ph0);", "", SM90, "many_tiles"),
    ("sm90 fwd: missing wgmma wait (scores read while their wgmma is in flight)", "sm90/fwd.cuh",
     "wgmma_wait<1>();  // S of the new tile", "//", SM90, "many_tiles"),
    ("sm90 fwd: missing wgmma.fence before the GEMMs", "sm90/fwd.cuh",
     "      fence_regs(pa);\n      wgmma_fence();", "      fence_regs(pa);", SM90, "many_tiles"),
    ("sm90 fwd: missing fence.proxy.async before the TMA store of O", "sm90/fwd.cuh",
     "  fence_proxy_async();\n  named_sync(C::kBarEpi", "  named_sync(C::kBarEpi", SM90, "dense"),
    ("sm90 fwd: producer reuses a stage before the consumers released it", "sm90/fwd.cuh",
     "mbar_wait(empty_k(s), ph ^ 1);", "", SM90, "many_tiles"),
    # (Releasing K early is not enough to fail: the producer issues K_{j+2} only after V_{j+1}, whose slot is
    # released after the wait that retires S_j, so it knows S_j is done; the emulator rightly stays quiet.)
    ("sm90 fwd: consumer releases V before the P V wgmma reading it has retired", "sm90/fwd.cuh",
     "      wgmma_wait<0>();\n      fence_regs(o);\n      fence_regs(pa);\n      if (ti == 0) mbar_arrive(empty_v(s0));",
     "      if (ti == 0) mbar_arrive(empty_v(s0));\n      wgmma_wait<0>();\n      fence_regs(o);\n      fence_regs(pa);",
     SM90, "many_tiles"),
    ("sm90 fwd: unbalanced ping-pong named barriers", "sm90/fwd.cuh",
     "if (cw == 0) named_arrive(sched_other, 256);", "named_arrive(sched_other, 256);", SM90, "dense"),
    ("sm90 fwd: setmaxnreg asks for more registers than the block has", "sm90/fwd.cuh",
     "kConsumerRegs = 240;", "kConsumerRegs = 248;", SM90, "single"),
    ("sm90 bwd: missing fence.proxy.async after the dS^T stores read by the dQ wgmma", "sm90/bwd.cuh",
     "      }\n      fence_proxy_async();\n    }", "      }\n    }", SM90, "dense"),
    ("sm90 bwd: no named barrier between the dS^T stores and the dQ wgmma", "sm90/bwd.cuh",
     "named_sync(C::kBarDs + c, 128);  // the whole dS^T tile", "// the whole dS^T tile", SM90, "dense"),
    # The race compute-sanitizer found on an H100 (fixed in 3f12cc1): one arrival per consumer warpgroup on
    # empty(s) does not order the other warps' ld.shared of the stage's lse / delta vector before the
    # producer's next st.shared into it (the deterministic pass, with no named barrier in between, shows it).
    ("sm90 bwd: one empty(s) arrival per consumer warpgroup, lse/delta loads of the other warps unordered",
     "sm90/bwd.cuh", ("mbar_init(empty(s), 2 * 128);", "    mbar_arrive(empty(s));  // every consumer thread"),
     ("mbar_init(empty(s), 2);", "    if (ti == 0) mbar_arrive(empty(s));  // one thread per warpgroup"), SM90,
     "dense"),
    ("sm90 bwd: only lane 0 of the producer arrives on full(s), the other lanes' lse/delta stores unordered",
     "sm90/bwd.cuh", ("mbar_init(full(s), 1 + 32);", "        mbar_arrive(full(s));\n"),
     ("mbar_init(full(s), 1 + 1);", "        if (tid == 0) mbar_arrive(full(s));\n"), SM90, "dense"),
    # Packed batches on the Hopper kernels: offsets into the packed tensors, rows of the next sequence.
    ("sm90 fwd (packed batch): Q tile loaded without the sequence's row offset", "sm90/fwd.cuh",
     "const int qrow = static_cast<int>(si.q_off + q0)", "const int qrow = static_cast<int>(q0)", SM90,
     "varlen_causal"),
    ("sm90 fwd (packed batch): every row of the tile stored, past the sequence's last", "sm90/fwd.cuh",
     "si.sq - w0, p.d, ti);", "64, p.d, ti);", SM90, "varlen_causal"),
    ("sm90 fwd (packed batch): whole tiles of O stored by TMA without the sequence's row offset", "sm90/fwd.cuh",
     "cb * 64, static_cast<int>(si.q_off + w0),", "cb * 64, static_cast<int>(w0),", SM90, "varlen_causal"),
    ("sm90 dK/dV (packed batch): K and V tiles loaded without the sequence's key offset", "sm90/bwd.cuh",
     ("static_cast<int>(si.k_off + k0),", "static_cast<int>(si.k_off + k0),"),
     ("static_cast<int>(k0),", "static_cast<int>(k0),"), SM90, "varlen_window"),
    ("decode: no barrier before the next K / V prefetch", "decode_kernel.cuh",
     "__syncthreads();  // every warp is done with this stage", "//", ["-DEMU_ELEM=__half", "-DEMU_HD=64"], "decode"),
    ("decode: page slot taken modulo 16 instead of the page size", "decode.h",
     "(j % p.page_size) * st.s", "(j % 16) * st.s", ["-DEMU_ELEM=__nv_bfloat16", "-DEMU_HD=128"], "decode_paged64"),
    ("decode combine: parts weighted by exp(lse_t - max) instead of exp(lse_t - lse)", "decode.cu",
     "const P w = dexp(lp[r] - lse);", "const P w = dexp(lp[r] - mx);", ["-DEMU_GENERIC", "-DEMU_T=float"],
     "decode"),
    # Linear attention (csrc/cuda/linear_kernel.cuh; built from emu_linear.cpp).
    ("linear tc fwd: no barrier between the warps' reads of the state and the chunk's update of it",
     "linear_kernel.cuh", "__syncthreads();  // every warp has read the state before this chunk is added to it",
     "//", LINEAR, "state_elu1"),
    ("linear tc fwd: causal mask one key too wide (odd keys)", "linear_kernel.cuh", "key + 1 > row ? 0.f",
     "key + 1 > row + 1 ? 0.f", LINEAR, "causal_elu1"),
    ("linear tc dq: dd left out of the intra-chunk dA", "linear_kernel.cuh",
     "s[jn][e] = key > row ? 0.f : s[jn][e] + m.sDD[row];", "s[jn][e] = key > row ? 0.f : s[jn][e];", LINEAR,
     "causal_elu1"),
    ("linear generic dk/dv: no barrier between the state's column update and the row-wise dK read",
     "linear_kernel.cuh", "__syncthreads();  // G complete for row i (other threads' columns)", "//", LINEAR,
     "state_elu1"),
]


def main() -> int:
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    subprocess.run([sys.executable, str(HERE / "gen_kernels.py")], check=True)
    missed = 0
    chosen = [(i, m) for i, m in enumerate(MUTATIONS) if only in m[0]]
    for i, (name, f, old, new, defs, case) in chosen:
        d = OUT / f"m{i}"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(GEN, d)
        p = d / "cuda" / f
        text = p.read_text()
        olds, news = (old, new) if isinstance(old, tuple) else ((old,), (new,))
        if any(o not in text for o in olds):
            print(f"SKIP {name}: pattern not found in {f} (kernel changed; update selftest.py)")
            missed += 1
            continue
        for o, n in zip(olds, news):
            text = text.replace(o, n, 1)
        p.write_text(text)
        exe = d / "emu"
        main_src = "emu_linear.cpp" if defs == LINEAR else "emu_main.cpp"
        subprocess.run(["g++", "-std=c++20", "-O2", "-pthread", "-Wno-psabi", "-I", str(HERE / "shim"), "-I", str(d), *defs,
                        str(HERE / main_src), "-o", str(exe)], check=True)
        r = subprocess.run([str(exe), case], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "EMU_HANG_SECONDS": "60"})
        caught = r.returncode != 0
        why = next((l.strip() for l in r.stdout.splitlines() if "EMU ERROR" in l or "EMU FATAL" in l or "FAIL" in l), "")
        print(f"{'caught' if caught else 'MISSED'}: {name}" + (f"\n    {why[:240]}" if why else ""), flush=True)
        missed += not caught
    print(f"{len(chosen) - missed} of {len(chosen)} injected bugs caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
