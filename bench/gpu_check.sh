#!/usr/bin/env bash
# GPU validation in one call, for a GPU machine without network (python3 there already holds torch):
# build, CUDA tests, compute-sanitizer (memcheck, racecheck) on small cases, the GPU benchmark.
# Everything lands in one folder ($OUT, or bench/results/gpu_run), with a summary at the end.
#   bash bench/gpu_check.sh [build|test|sanitize|bench|bench-dense|bench-rest ...]   (default: all stages)
# Each stage fits one 10-minute device call; `bench` is bench-dense then bench-rest (FlexAttention
# compiles once per shape, which is most of the benchmark's time).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${*:-build test sanitize bench}
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
    test)
      $PY -m pytest tests -q --maxfail=40 --timeout=300 -p no:cacheprovider \
        --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
      rc=$?
      note "pytest: rc=$rc in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/pytest.log")"
      grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30 | tee -a "$summary"
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 3 $PY bench/sanitize_cases.py > "$OUT/sanitize_$tool.log" 2>&1
        rc=$?
        note "compute-sanitizer $tool: rc=$rc in $(( $(date +%s) - t0 )) s: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)"
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
