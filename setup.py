"""Build of fused_attn's C++/CUDA extension (fused_attn._C).

A CUDA build when a CUDA toolkit is found and torch is a CUDA build; otherwise a CPU-only build.
The toolkit is found from CUDA_HOME, else from nvcc's real location (torch's own guess can be wrong).

Environment variables:
  FUSED_ATTN_CUDA=0              force the CPU-only build
  FUSED_ATTN_HEAD_DIMS=64,128    narrow the tensor-core head dims compiled (default: all)
  FUSED_ATTN_DTYPES=bf16         narrow the tensor-core dtypes compiled (fp16, bf16; default: both)
  TORCH_CUDA_ARCH_LIST="8.0 9.0" CUDA archs of the mma.sync family (default 8.0 and 9.0); with 9.0 in it
                                 the Hopper family (csrc/cuda/sm90/, wgmma/TMA) is built too, for sm_90a
                                 only (its files get their own nvcc step)
  FUSED_ATTN_SM90=0              leave the Hopper family out
  MAX_JOBS=N                     parallel compile jobs (torch's ninja build honours it)
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 256)
SM90_HEAD_DIMS = (64, 128, 256)  # csrc/cuda/sm90/tiles.h
DTYPES = ("fp16", "bf16")


def log(msg: str) -> None:
    print(f"fused_attn setup: {msg}", file=sys.stderr)


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the toolkit around the nvcc on PATH (following links and wrapper scripts)."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if (pathlib.Path(env) / "bin" / "nvcc").exists() else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for guess in ("/usr/local/cuda/bin/nvcc", "/opt/cuda/bin/nvcc"):
            if os.path.exists(guess):
                nvcc = guess
                break
    if nvcc is None:
        return None
    real = pathlib.Path(nvcc).resolve()
    home = real.parent.parent
    if (home / "include" / "cuda_runtime.h").exists() or (home / "targets").exists():
        return str(home)
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one): ask nvcc itself.
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-v", "x.cu"], capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(\S+)", dry.stdout + dry.stderr, re.M)
        if m:
            return str(pathlib.Path(m.group(1)).resolve())  # TOP is <home>/bin/..
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def want_cuda() -> str | None:
    if os.environ.get("FUSED_ATTN_CUDA", "1") == "0":
        log("FUSED_ATTN_CUDA=0: CPU-only build")
        return None
    home = find_cuda_home()
    if home is None:
        log("no CUDA toolkit found (no CUDA_HOME, no nvcc): CPU-only build")
        return None
    os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
    import torch

    if torch.version.cuda is None:
        log(f"CUDA toolkit at {home}, but torch {torch.__version__} is a CPU build: CPU-only build")
        return None
    log(f"CUDA toolkit at {home}, torch {torch.__version__} (CUDA {torch.version.cuda}): CUDA build")
    return home


def selection(var: str, allowed: tuple, conv=str) -> list:
    raw = os.environ.get(var)
    if not raw:
        return list(allowed)
    picked = [conv(x.strip()) for x in raw.split(",") if x.strip()]
    bad = [x for x in picked if x not in allowed]
    if bad:
        raise SystemExit(f"{var}: unknown value(s) {bad}; expected a comma-separated subset of {list(allowed)}")
    return picked


def extensions():
    cuda_home = want_cuda()
    from torch.utils import cpp_extension

    # torch 2.14 headers need C++20; the .cu files include no torch header and stay C++17.
    # -fopenmp: at::parallel_for is a header template that runs on one thread without _OPENMP.
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    # -lstdc++ ahead of the driver's own libraries: references to the C++ runtime bind to the shared
    # libstdc++ that torch uses. On a GPU machine (g++ 13.3, torch 2.11) the extension once came out with
    # pieces of the static libstdc++ inside and no libstdc++.so.6 dependency; its std::ostream << long then
    # crashed every error message that formats a number. check_runtime() below refuses such a build.
    link = ["-fopenmp", "-lstdc++"]
    sources = ["csrc/ops.cpp", "csrc/bindings.cpp", "csrc/cpu/fwd.cpp", "csrc/cpu/bwd.cpp",
               "csrc/cpu/decode.cpp", "csrc/linear_ops.cpp", "csrc/cpu/linear.cpp"]
    if cuda_home is None:
        return [cpp_extension.CppExtension("fused_attn._C", sources, extra_compile_args={"cxx": cxx},
                                           extra_link_args=link, include_dirs=[str(ROOT / "csrc")])]
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0 9.0")
    hds = selection("FUSED_ATTN_HEAD_DIMS", HEAD_DIMS, int)
    dts = selection("FUSED_ATTN_DTYPES", DTYPES)
    gen = [f"csrc/cuda/generated/{p}_{d}_hd{h}.cu" for p in ("fwd", "bwd", "decode") for d in dts for h in hds]
    want90 = os.environ.get("FUSED_ATTN_SM90", "1") != "0" and any(
        a.startswith("9.0") for a in archs.replace(";", " ").split())
    gen90 = [f"csrc/cuda/generated/sm90_{p}_{d}_hd{h}.cu" for p in ("fwd", "bwd") for d in dts
             for h in hds if h in SM90_HEAD_DIMS] if want90 else []
    sources += ["csrc/cuda/launch.cu", "csrc/cuda/generic.cu", "csrc/cuda/decode.cu", "csrc/cuda/sm90/launch.cu",
                "csrc/cuda/linear.cu"] + gen
    log(f"archs {archs}; tensor-core head dims {hds}; dtypes {dts}; {len(gen)} generated files; "
        f"{len(gen90)} sm_90a files")
    archs_info = archs + (" (+ sm_90a: wgmma/TMA kernels)" if gen90 else "")
    defs = ["-DFA_WITH_CUDA", f'-DFA_CUDA_ARCHS="{archs_info}"']
    ext = cpp_extension.CUDAExtension("fused_attn._C", sources, include_dirs=[str(ROOT / "csrc")],
                                      extra_compile_args={"cxx": cxx + defs, "nvcc": NVCC_FLAGS + defs},
                                      extra_link_args=link)
    ext.sm90_sources = gen90  # compiled by Build.build_extensions below, for sm_90a only
    return [ext]


NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-Xptxas=--warn-on-spills", "--expt-relaxed-constexpr",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def compile_sm90(sources: list[str], outdir: pathlib.Path) -> list[str]:
    """The Hopper family's generated files, each compiled by nvcc for sm_90a alone (wgmma and setmaxnreg
    exist only there; the mma.sync files keep the arch list), in parallel (MAX_JOBS), skipping objects
    newer than their file and every header of csrc/. Returns the object files."""
    import concurrent.futures

    nvcc = str(pathlib.Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    outdir.mkdir(parents=True, exist_ok=True)
    headers = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh")]
    newest_header = max(p.stat().st_mtime for p in headers)
    jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)

    def one(src: str) -> str:
        obj = outdir / (pathlib.Path(src).stem + ".o")
        path = ROOT / src
        if obj.exists() and obj.stat().st_mtime > max(path.stat().st_mtime, newest_header):
            return str(obj)
        cmd = [nvcc, "-c", str(path), "-o", str(obj), *NVCC_FLAGS, "-gencode=arch=compute_90a,code=sm_90a",
               "-Xcompiler", "-fPIC", "-I", str(ROOT / "csrc")]
        log("nvcc (sm_90a) " + src)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.stdout or r.stderr:
            print(r.stdout + r.stderr, file=sys.stderr)
        if r.returncode != 0:
            raise SystemExit(f"nvcc failed on {src}")
        return str(obj)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, sources))


def check_runtime(so: pathlib.Path) -> None:
    """Stops the build when the extension does not load the shared C++ runtime (libstdc++.so.6): a private
    copy of parts of it inside the extension mixes two runtimes' locale state in one process and crashes."""
    if sys.platform.startswith("linux") and so.exists() and b"libstdc++.so.6" not in so.read_bytes():
        raise SystemExit(f"{so}: links no libstdc++.so.6 (the C++ runtime went in statically?); check LDFLAGS and "
                         "the linker command in the build log")


def build_ext():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def build_extensions(self):
            # A Python whose build flags link the C++ runtime statically would put a private copy of it in
            # the extension (see check_runtime): drop such flags from the link commands, and log them.
            for attr in ("linker_so", "linker_so_cxx"):
                cmd = getattr(self.compiler, attr, None)
                if isinstance(cmd, list):
                    kept = [a for a in cmd if a not in ("-static-libstdc++", "-static")]
                    if kept != cmd:
                        log(f"dropped {sorted(set(cmd) - set(kept))} from the {attr} command")
                    setattr(self.compiler, attr, kept)
                    log(f"{attr}: {' '.join(kept[:3])} ...")
            for ext in self.extensions:
                srcs = getattr(ext, "sm90_sources", [])
                if srcs:
                    objs = compile_sm90(srcs, pathlib.Path(self.build_temp) / "sm90")
                    ext.extra_objects = list(ext.extra_objects or []) + objs
            super().build_extensions()
            for ext in self.extensions:
                check_runtime(pathlib.Path(self.get_ext_fullpath(ext.name)))

    return Build.with_options(use_ninja=True)


# Name, version and packages are in pyproject.toml; this file adds the compiled part.
setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext()})
