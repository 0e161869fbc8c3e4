#!/usr/bin/env bash
# GPU validation in one call, for a GPU machine without network (python3 there already holds torch):
# build, CUDA tests, compute-sanitizer (memcheck, racecheck) on small cases, the GPU benchmark.
# Everything lands in one folder ($OUT, or bench/results/gpu_run), with a summary at the end.
#   bash bench/gpu_check.sh [build|prebuilt|diag|probe|test|test-sm80|sanitize|ncu|fa4-a|fa4-b|bench|bench-dense|bench-rest|bench-serve ...]
#   (default: build probe test sanitize bench). On a Hopper GPU (compute capability 9.0) the fp16/bf16 calls
#   run the wgmma/TMA kernels; probe checks the ISA readings they rely on first (notes/hopper.md), test-sm80
#   runs the CUDA tests again with the mma.sync kernels forced (FUSED_ATTN_FORCE_SM80=1).
# Each stage fits one 10-minute device call; `bench` is bench-dense then bench-rest (FlexAttention
# compiles once per shape, which is most of the benchmark's time). bench-serve: packed batches
# (bench/varlen_bench.py: Hopper against mma.sync kernels, equal-length flash(), padding, torch's varlen_attn)
# and KV-cache decoding (bench/decode_bench.py: HBM bandwidth, paged, split-KV) on the GPU.
# Device time is scarce: DEADLINE (epoch seconds) makes each long stage stop in time for the call to return
# its files; SO_OUT (a folder) receives the built extension, gzipped, so that a later call on a fresh
# machine can carry it back (copy the pieces into .gpu_so/ and carry it; stage `prebuilt` joins them) instead of building again.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${*:-build probe test sanitize bench}
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
touch "$summary"
note() { echo "$*" | tee -a "$summary"; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # a carried, prebuilt extension works without pip
# left S: seconds until DEADLINE minus a margin (a large number without DEADLINE)
left() { if [ -n "${DEADLINE:-}" ]; then echo $(( DEADLINE - $(date +%s) - ${1:-15} )); else echo 100000; fi; }
# (+ test_cpu_isa.py: where the GPU host has AVX-512, the CPU kernels' 16-lane entry points run there; the dev
# machines and CI have AVX2 only)
GPU_TESTS="tests/test_cuda.py tests/test_sm90.py tests/test_linear_cuda.py tests/test_compile.py tests/test_errors.py
  tests/test_gradients.py tests/test_linear_errors.py tests/test_cpu_isa.py"
XDIST=
$PY -c 'import xdist' 2>/dev/null && XDIST="-n ${TEST_WORKERS:-8}"

for stage in $STAGES; do
  t0=$(date +%s)
  case $stage in
    build)
      nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
      $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' | tee -a "$summary"
      nvcc --version | tail -1 | tee -a "$summary"
      # The GPU here is sm_90: build only that arch to save device time (CI compiles 8.0 and 9.0).
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} timeout $(left 30) \
        $PY -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
      rc=$?
      grep -iE "spill|warning" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 > "$OUT/build_warnings.txt"
      note "build: rc=$rc in $(( $(date +%s) - t0 )) s; spill/warning lines: $(wc -l < "$OUT/build_warnings.txt")"
      [ $rc -eq 0 ] || { tail -50 "$OUT/build.log"; exit 1; }
      $PY -c 'import fused_attn; print(fused_attn.build_info())' | tee -a "$summary"
      note "host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cores, AVX-512: $(grep -q avx512f /proc/cpuinfo && echo yes || echo no)"
      so=$(ls fused_attn/_C.cpython-*.so | head -1)
      note "extension needs: $(readelf -d "$so" 2>/dev/null | grep -o 'NEEDED.*' | grep -o '\[.*\]' | tr '\n' ' ')"
      # in 15 MiB pieces (the device tool returns files of at most 16 MiB)
      [ -n "${SO_OUT:-}" ] && gzip -1 -c "$so" | split -b 15M - "$SO_OUT/_C.so.gz.part-" &&
        note "extension saved: $so -> $SO_OUT/_C.so.gz.part-*"
      ;;
    prebuilt)
      nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
      so=fused_attn/_C.cpython-$($PY -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')-x86_64-linux-gnu.so
      cat .gpu_so/_C.so.gz.part-* | gunzip -c > "$so" || exit 1
      $PY -c 'import fused_attn; print(fused_attn.build_info())' | tee -a "$summary" || exit 1
      ;;
    diag)  # a C++ error raised by an op of this build: the backtrace if it crashes (cuda-gdb debugs host code)
      { g++ --version | head -1; $PY -c 'import pybind11, torch; print("pybind11", pybind11.__version__, "torch cxx11 abi", torch.compiled_with_cxx11_abi())'; } 2>&1 | tee -a "$summary"
      cat > "$OUT/raise.py" <<'PYEOF'
import torch, fused_attn
for dev in ("cpu", "cuda", "cuda"):  # the second time with CUDA initialised, then on CUDA tensors
    q = torch.randn(1, 2, 8, 4, device=dev if torch.cuda.is_initialized() else "cpu")
    torch.zeros(1, device="cuda")
    try:
        torch.ops.fused_attn.fwd(q, q[0], q, 0.5, -1, -1, [], [])
    except ValueError as e:
        print(q.device, "raised:", str(e).splitlines()[0], flush=True)
q = torch.randn(1, 1, 8, 59, device="cuda", dtype=torch.float16)
try:
    fused_attn.flash(q, q, q)
except ValueError as e:
    print("head dim 59 raised:", str(e).splitlines()[0], flush=True)
PYEOF
      timeout $(left) $PY "$OUT/raise.py" > "$OUT/diag.log" 2>&1
      rc=$?
      note "C++ error -> Python: rc=$rc: $(tail -1 "$OUT/diag.log")"
      timeout $(left) $PY -m pytest -p no:xdist -q -p no:cacheprovider tests/test_errors.py::test_direct_op_call_is_checked_too \
        tests/test_cuda.py::test_unsupported_head_dims_raise > "$OUT/diag_pytest.log" 2>&1
      note "the same in pytest without xdist: rc=$?: $(tail -1 "$OUT/diag_pytest.log")"
      if [ $rc -ne 0 ]; then
        timeout $(left) cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args $PY "$OUT/raise.py" > "$OUT/diag_gdb.log" 2>&1
        grep -E "^#[0-9]+" "$OUT/diag_gdb.log" | head -25 | tee -a "$summary"
      fi
      ;;
    probe)
      nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -I csrc tests/emu/sm90_probe.cu \
        -o "$OUT/sm90_probe" > "$OUT/probe_build.log" 2>&1 && timeout 120 "$OUT/sm90_probe" > "$OUT/probe.log" 2>&1
      rc=$?
      note "sm90 probe: rc=$rc: $(tail -1 "$OUT/probe.log" 2>/dev/null)"
      grep -E "^FAIL" "$OUT/probe.log" | tee -a "$summary"
      ;;
    test|test-sm80)
      log="$OUT/pytest.log"; force=
      [ "$stage" = test-sm80 ] && { log="$OUT/pytest_sm80.log"; force=1; }
      # the GPU-facing tests (the CPU suite is CI's); -n: xdist workers share the GPU
      FUSED_ATTN_FORCE_SM80=$force timeout $(left) $PY -m pytest $GPU_TESTS ${TEST_K:+-k "$TEST_K"} $XDIST -q -rfE \
        --maxfail=60 --timeout=300 -p no:cacheprovider --junitxml="${log%.log}.xml" > "$log" 2>&1
      rc=$?
      note "pytest ($stage): rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$log")"
      grep -E "^(FAILED|ERROR)" "$log" | head -30 | tee -a "$summary"
      ;;
    sanitize)
      # one process per tool runs every kernel family, the Hopper and the mma.sync paths both
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
        log="$OUT/sanitize_$tool.log"
        timeout $(left) compute-sanitizer --tool $tool --error-exitcode 3 --print-limit 200 $PY bench/sanitize_cases.py > "$log" 2>&1
        rc=$?
        note "compute-sanitizer $tool: rc=$rc in $(( $(date +%s) - t0 )) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitize cases done' "$log" | tail -2 | tr '\n' ' ')"
      done
      ;;
    fa4-a|fa4-b)  # FlashAttention-4 as a peer: its wheels travel in two calls (carry .fa4a, then .fa4b within
      # the machine's 30 s warm window); fa4-b joins the CuTe-DSL library archive, installs into /tmp/site.
      mkdir -p /root/fa4
      if [ "$stage" = fa4-a ]; then
        cp .fa4a/* /root/fa4/ && note "fa4-a: $(ls /root/fa4 | wc -l) files stashed in /root/fa4"
      else
        # the wheels first (pip --target skips folders that exist), then the library archive merged over them
        cp .fa4b/* /root/fa4/ && $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
          /root/fa4/*.whl > "$OUT/fa4.log" 2>&1 && cat /root/fa4/cut13.part-* | xz -dc -T0 | tar xf - -C /tmp/site
        # PYTHONPATH does not run .pth files: the CuTe-DSL's own packages folder goes on the path by hand
        export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
        $PY -c 'import flash_attn.cute as f; print("flash-attn-4", f.__version__)' >> "$OUT/fa4.log" 2>&1
        note "fa4-b: rc=$?: $(tail -1 "$OUT/fa4.log")"
      fi
      ;;
    ncu)  # Nsight Compute on the main kernels of both families (one launch each after warm-up)
      sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section SchedulerStats --section LaunchStats"
      for spec in ${NCU_CASES:-"fwd:sm90" "fwd:sm80" "fwd_sparse:sm90" "bwd:sm90" "bwd:sm80"}; do
        case_=${spec%%:*}; fam=${spec##*:}; force=; [ "$fam" = sm80 ] && force=1
        log="$OUT/ncu_${case_}_$fam.txt"
        FUSED_ATTN_FORCE_SM80=$force timeout $(left) ncu --clock-control none --launch-skip 3 --launch-count 3 \
          --kernel-name regex:'fwd_kernel|dkdv_kernel|dq_kernel' $sections $PY bench/ncu_cases.py $case_ > "$log" 2>&1
        note "ncu $case_ ($fam): rc=$? in $(( $(date +%s) - t0 )) s: $(grep -E 'Duration|Compute \(SM\) Throughput' "$log" | head -2 | tr -s ' ' | tr '\n' ';')"
      done
      ;;
    bench|bench-dense|bench-rest)
      groups=dense,window,sparse,memory
      merge=
      [ "$stage" = bench-dense ] && groups=dense
      [ "$stage" = bench-rest ] && { groups=window,sparse,memory; merge=--merge; }
      timeout $(left) $PY bench/bench.py --groups $groups $merge ${BENCH_ARGS:-} --out "$OUT/bench" > "$OUT/$stage.log" 2>&1
      rc=$?
      note "$stage: rc=$rc in $(( $(date +%s) - t0 )) s"
      tail -60 "$OUT/$stage.log"
      ;;
    bench-serve)
      timeout $(left) $PY bench/varlen_bench.py --device cuda --out "$OUT/bench" > "$OUT/bench-varlen.log" 2>&1
      note "bench-serve varlen: rc=$? in $(( $(date +%s) - t0 )) s"
      grep -E "^(varlen|mods) " "$OUT/bench-varlen.log" | tee -a "$summary"
      t1=$(date +%s)
      timeout $(left) $PY bench/decode_bench.py --device cuda --out "$OUT/bench" > "$OUT/bench-decode.log" 2>&1
      note "bench-serve decode: rc=$? in $(( $(date +%s) - t1 )) s"
      sed -n '/^cache /,$p' "$OUT/bench-decode.log" | head -40 | tee -a "$summary"
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
cat "$summary"
