#!/usr/bin/env bash
# GPU validation in one call, for a GPU machine without network (python3 there already holds torch):
# build, CUDA tests, compute-sanitizer (memcheck, racecheck) on small cases, the GPU benchmark.
# Everything lands in one folder ($OUT, or bench/results/gpu_run), with a summary at the end.
#   bash bench/gpu_check.sh [build|probe|test|test-sm80|sanitize|bench|bench-dense|bench-rest ...]
#   (default: build probe test sanitize bench). On a Hopper GPU (compute capability 9.0) the fp16/bf16 calls
#   run the wgmma/TMA kernels; probe checks the ISA readings they rely on first (notes/hopper.md), test-sm80
#   runs the CUDA tests again with the mma.sync kernels forced (FUSED_ATTN_FORCE_SM80=1).
# Each stage fits one 10-minute device call; `bench` is bench-dense then bench-rest (FlexAttention
# compiles once per shape, which is most of the benchmark's time).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${*:-build probe test sanitize bench}
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

for stage in $STAGES; do
  t0=$(date +%s)
  case $stage in
    build)
      nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
      $PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' | tee -a "$summary"
      nvcc --version | tail -1 | tee -a "$summary"
      # The GPU here is sm_90: build only that arch to save device time (CI compiles 8.0 and 9.0).
      TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
        $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
      rc=$?
      grep -iE "spill|warning" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 > "$OUT/build_warnings.txt"
      note "build: rc=$rc in $(( $(date +%s) - t0 )) s; spill/warning lines: $(wc -l < "$OUT/build_warnings.txt")"
      [ $rc -eq 0 ] || { tail -50 "$OUT/build.log"; exit 1; }
      $PY -c 'import fused_attn; print(fused_attn.build_info())' | tee -a "$summary"
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
      FUSED_ATTN_FORCE_SM80=$force $PY -m pytest tests -q --maxfail=40 --timeout=300 -p no:cacheprovider \
        --deselect tests/test_emulator.py --junitxml="${log%.log}.xml" > "$log" 2>&1
      rc=$?
      note "pytest ($stage): rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$log")"
      grep -E "^(FAILED|ERROR)" "$log" | head -30 | tee -a "$summary"
      ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        for force in "" 1; do
          log="$OUT/sanitize_$tool${force:+_sm80}.log"
          FUSED_ATTN_FORCE_SM80=$force compute-sanitizer --tool $tool --error-exitcode 3 $PY bench/sanitize_cases.py > "$log" 2>&1
          rc=$?
          note "compute-sanitizer $tool${force:+ (mma.sync forced)}: rc=$rc in $(( $(date +%s) - t0 )) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)"
        done
      done
      ;;
    bench|bench-dense|bench-rest)
      groups=dense,window,sparse,memory
      merge=
      [ "$stage" = bench-dense ] && groups=dense
      [ "$stage" = bench-rest ] && { groups=window,sparse,memory; merge=--merge; }
      $PY bench/bench.py --groups $groups $merge --out "$OUT/bench" > "$OUT/$stage.log" 2>&1
      rc=$?
      note "$stage: rc=$rc in $(( $(date +%s) - t0 )) s"
      tail -60 "$OUT/$stage.log"
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
cat "$summary"
