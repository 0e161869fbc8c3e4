#!/usr/bin/env python3
"""Turn the CUDA kernel sources into C++ the host emulator can compile.

Reads the kernel sources of csrc/cuda/ (SOURCES below: the mma.sync family with its score modifiers and
sequence views, generic.cu, the decode kernels, the Hopper family of csrc/cuda/sm90/, and linear attention's
linear.cu) and writes copies under OUT (default
tests/emu/build/gen) in which, and only in which:
  - each device function made of inline PTX (cp.async, ldmatrix, mma.sync, ex2.approx, rcp.approx, %laneid,
    %tid, the empty asm of generic.cu's opaque(); mbarrier, bulk tensor copies, fences, named barriers,
    setmaxnreg, wgmma and its fence/commit/wait, ordinary st.shared / ld.shared in sm90/) is replaced by a
    one-line call into tests/emu/emu_runtime.h / emu_sm90.h;
  - the sm90-only branch of red_add_f32x2 becomes a run-time switch, so one binary runs both atomics;
  - `extern __shared__ ... smem[]` and `__shared__ T a[N], ...;` become pointers into the emulated
    block's shared memory;
  - each launch `kernel<<<grid, block, smem, stream>>>(args);` becomes ::emu::launch(...), which runs
    the grid block by block on host threads (so the host launchers, tc_fwd_run, tc_bwd_run, generic_fwd
    and generic_bwd, with their grid sizes and shared-memory attributes, run as written too).
Everything else, every line of kernel arithmetic and indexing, is compiled as written. The script fails
loudly when a pattern it expects is missing, so a kernel change that it cannot follow is not skipped.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"

# name -> replacement definition (inside the same namespace as the original).
REPLACE = {
    "tc_common.cuh": {
        "cp_async16": "inline void cp_async16(uint32_t sdst, const void* gsrc, bool pred) "
                      "{ ::emu::cp_async(sdst, gsrc, 16, pred); }",
        "cp_async_commit": "inline void cp_async_commit() { ::emu::cp_async_commit(); }",
        "cp_async_wait": "template <int N>\ninline void cp_async_wait() { ::emu::cp_async_wait(N); }",
        "ldsm_x4": "inline void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) { ::emu::ldmatrix_x4(addr, r, false); }",
        "ldsm_x4_trans": "inline void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) "
                         "{ ::emu::ldmatrix_x4(addr, r, true); }",
        "mma16816": "template <typename Elem>\ninline void mma16816(float (&c)[4], const uint32_t (&a)[4], "
                    "uint32_t b0, uint32_t b1) {\n  ::emu::mma_m16n8k16(c, a, b0, b1, "
                    "std::is_same<Elem, __nv_bfloat16>::value);\n}",
        "fast_exp2": "inline float fast_exp2(float x) { return ::emu::ex2_approx_ftz(x); }",
        "fast_rcp": "inline float fast_rcp(float x) { return ::emu::rcp_approx_ftz(x); }",
    },
    "bwd_common.cuh": {
        "cp_async4": "inline void cp_async4(uint32_t sdst, const void* gsrc, bool pred) "
                     "{ ::emu::cp_async(sdst, gsrc, 4, pred); }",
    },
    "bwd_kernel.cuh": {
        "lane_id_opaque": "inline int lane_id_opaque() { return ::emu::lane_id(); }",
        "tid_opaque": "inline int tid_opaque() { return static_cast<int>(threadIdx.x); }",
    },
    "generic.cu": {
        "opaque": "inline const AttnParams& opaque(const AttnParams& p) { return p; }",
    },
    "sm90/ptx.cuh": {
        "mbar_init": "inline void mbar_init(uint32_t bar, uint32_t count) { ::emu::mbar_init(bar, count); }",
        "fence_mbar_init": "inline void fence_mbar_init() { ::emu::fence_mbar_init(); }",
        "mbar_arrive": "inline void mbar_arrive(uint32_t bar) { ::emu::mbar_arrive(bar); }",
        "mbar_arrive_expect_tx": "inline void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) "
                                 "{ ::emu::mbar_arrive_expect_tx(bar, bytes); }",
        "mbar_wait": "inline void mbar_wait(uint32_t bar, uint32_t parity) { ::emu::mbar_wait(bar, parity); }",
        "prefetch_tmap": "inline void prefetch_tmap(const void*) {}",
        "tma_load_4d": "inline void tma_load_4d(uint32_t dst, const void* tmap, uint32_t bar, int c0, int c1, int c2, "
                       "int c3) {\n  const int c[4] = {c0, c1, c2, c3};\n  ::emu::tma_load(dst, tmap, bar, c, 4);\n}",
        "tma_store_4d": "inline void tma_store_4d(const void* tmap, uint32_t src, int c0, int c1, int c2, int c3) {\n"
                        "  const int c[4] = {c0, c1, c2, c3};\n  ::emu::tma_store(tmap, src, c, 4);\n}",
        "bulk_commit": "inline void bulk_commit() { ::emu::bulk_commit(); }",
        "bulk_wait_read": "template <int N>\ninline void bulk_wait_read() { ::emu::bulk_wait_read(N); }",
        "fence_proxy_async": "inline void fence_proxy_async() { ::emu::fence_proxy_async(); }",
        "named_sync": "inline void named_sync(int id, int n) { ::emu::named_bar(id, n, true); }",
        "named_arrive": "inline void named_arrive(int id, int n) { ::emu::named_bar(id, n, false); }",
        "setmaxnreg_inc": "template <int R>\ninline void setmaxnreg_inc() { ::emu::setmaxnreg(R, true); }",
        "setmaxnreg_dec": "template <int R>\ninline void setmaxnreg_dec() { ::emu::setmaxnreg(R, false); }",
        "wgmma_fence": "inline void wgmma_fence() { ::emu::wgmma_fence(); }",
        "wgmma_commit": "inline void wgmma_commit() { ::emu::wgmma_commit(); }",
        "wgmma_wait": "template <int N>\ninline void wgmma_wait() { ::emu::wgmma_wait(N); }",
        "reg_fence": "inline void reg_fence(float&) {}\ninline void reg_fence(uint32_t&) {}",
        "opaque_u32": "inline uint32_t opaque_u32(uint32_t x) { return x; }",
        "st_shared_u32": "inline void st_shared_u32(uint32_t addr, uint32_t v) { ::emu::st_shared_u32(addr, v); }",
        "st_shared_f32": "inline void st_shared_f32(uint32_t addr, float v) { ::emu::st_shared_f32(addr, v); }",
        "ld_shared_f32x2": "inline float2 ld_shared_f32x2(uint32_t addr) { return ::emu::ld_shared_f32x2(addr); }",
    },
    "sm90/wgmma.cuh": {
        "wgmma_ss": "template <int N, typename Elem, int TA, int TB>\n"
                    "inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {\n"
                    "  ::emu::wgmma(d, N, desc_a, nullptr, desc_b, scale_d, TA, TB, "
                    "std::is_same<Elem, __nv_bfloat16>::value);\n}",
        "wgmma_rs": "template <int N, typename Elem, int TB>\n"
                    "inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {\n"
                    "  ::emu::wgmma(d, N, 0, a, desc_b, scale_d, 0, TB, std::is_same<Elem, __nv_bfloat16>::value);\n}",
    },
}

# Sources converted into OUT/cuda/ (paths relative to csrc/cuda/).
SOURCES = ("tc_common.cuh", "bwd_common.cuh", "score_mod.cuh", "sequence.cuh", "fwd_kernel.cuh", "bwd_kernel.cuh", "generic.cu",
           "decode_kernel.cuh", "decode.cu", "sm90/ptx.cuh", "sm90/wgmma.cuh", "sm90/common.cuh", "sm90/fwd.cuh", "sm90/bwd.cuh",
           "linear_kernel.cuh", "linear.cu")

# kernel<<<cfg>>>(args); with the kernel an identifier, possibly qualified and with template arguments.
LAUNCH = re.compile(r"(?P<k>[A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(?P<cfg>[^;]*?)>>>\((?P<args>[^;]*)\);")

ARCH_IF = "#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900"


def strip_comments(s: str) -> str:
    s = re.sub(r"/\*.*?\*/", " ", s, flags=re.S)
    s = re.sub(r"//[^\n]*", " ", s)
    return re.sub(r'"(\\.|[^"\\])*"', '""', s)


def matching_brace(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{":
            depth += 1
        elif s[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    raise SystemExit("gen_kernels: unbalanced braces")


def replace_function(src: str, name: str, new: str, fname: str) -> str:
    """Replaces every definition of device function `name` (all overloads) by `new`, put where the first was."""
    pat = re.compile(r"(template <[^\n>]*>\n)?__device__ __forceinline__ [^\n(]*\b" + re.escape(name) + r"\(")
    m = pat.search(src)
    if not m:
        raise SystemExit(f"gen_kernels: {fname}: device function {name}() not found; update gen_kernels.py")
    first = True
    while m:
        end = matching_brace(src, src.index("{", m.end()))
        text = ("// [emu] " + name + " replaced by gen_kernels.py\n" + new) if first else ""
        src = src[: m.start()] + text + src[end + 1:]
        first = False
        m = pat.search(src, m.start() + len(text))
    return src


def rewrite_shared(src: str, fname: str) -> str:
    src = re.sub(r"extern __shared__ (__align__\(\d+\) )?char (\w+)\[\];",
                 r"char* const \2 = ::emu::dynamic_smem();", src)

    def static_arrays(m: re.Match) -> str:
        ty = m.group(1)
        out = []
        for decl in m.group(2).split(","):
            dm = re.fullmatch(r"\s*(\w+)\[([^\]]+)\]\s*", decl)
            if not dm:
                raise SystemExit(f"gen_kernels: {fname}: cannot rewrite __shared__ declaration {m.group(0)!r}")
            out.append(f"{ty}* const {dm.group(1)} = ::emu::static_smem<{ty}>({dm.group(2)});")
        return " ".join(out)

    src = re.sub(r"__shared__ (\w+) ([^;]+);", static_arrays, src)
    return src


def rewrite_launches(src: str) -> str:
    def one(m: re.Match) -> str:
        k = m.group("k")
        name = k
        if re.fullmatch(r"\w+", k):  # a local variable: name it by what it was set to
            decl = list(re.finditer(r"auto " + k + r" = ([^;]+);", src[: m.start()]))
            if decl:
                name = decl[-1].group(1)
        return (f"::emu::launch(::emu::fn_key({k}), \"{name}\", [&] {{ {k}({m.group('args')}); }}, "
                f"{m.group('cfg')});  // [emu] was: <<<...>>>")

    return LAUNCH.sub(one, src)


def convert(fname: str, src: str) -> str:
    for name, new in REPLACE.get(fname, {}).items():
        src = replace_function(src, name, new, fname)
    if fname == "bwd_common.cuh":
        if ARCH_IF not in src:
            raise SystemExit("gen_kernels: bwd_common.cuh: sm90 branch of red_add_f32x2 not found")
        src = src.replace(ARCH_IF, "if (::emu::sm() >= 90) {  // [emu] was: " + ARCH_IF[4:])
        src = re.sub(r"\n#else\n", "\n} else {  // [emu] was: #else\n", src, count=1)
        src = re.sub(r"\n#endif\n", "\n}  // [emu] was: #endif\n", src, count=1)
    src = rewrite_launches(src)
    src = rewrite_shared(src, fname)
    code = strip_comments(src)
    for bad in ("asm", "__shared__", "<<<", "__CUDA_ARCH__"):
        if re.search(r"\b" + re.escape(bad) if bad[0].isalpha() or bad[0] == "_" else re.escape(bad), code):
            raise SystemExit(f"gen_kernels: {fname}: {bad!r} left after conversion; update gen_kernels.py")
    return f"// GENERATED by tests/emu/gen_kernels.py from csrc/cuda/{fname}; do not edit.\n" + src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "build" / "gen"))
    out = pathlib.Path(ap.parse_args().out)
    (out / "cuda").mkdir(parents=True, exist_ok=True)
    for f in ("params.h", "mask.h", "kernels.h", "linear_params.h", "linear_kernels.h"):
        shutil.copyfile(CSRC / f, out / f)
    (out / "cuda" / "sm90").mkdir(exist_ok=True)
    for f in ("tiles.h", "launch.h", "decode.h", "sm90/tiles.h", "sm90/tmap.h", "linear_launch.h"):
        shutil.copyfile(CSRC / "cuda" / f, out / "cuda" / f)
    for f in SOURCES:
        text = convert(f, (CSRC / "cuda" / f).read_text())
        dst = out / "cuda" / f
        if not dst.exists() or dst.read_text() != text:  # keep mtimes when nothing changed
            dst.write_text(text)
    # The probe of the Hopper readings (a stand-alone program: launches and shared memory rewritten).
    probe = pathlib.Path(__file__).resolve().parent / "sm90_probe.cu"
    text = convert("sm90_probe.cu", probe.read_text())
    dst = out / "sm90_probe.cpp"
    if not dst.exists() or dst.read_text() != text:
        dst.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
