#!/usr/bin/env bash
# The package users install, tested: build fused_attn's wheel (pip wheel --no-build-isolation --no-deps,
# against the torch in .venv), install it into a fresh virtual environment that reuses .venv's torch (a
# .pth line pointing at .venv's site-packages, so no second torch is downloaded and .venv's editable
# fused_attn is not seen), and run .ci/wheel_smoke.py from outside the source tree.
#   VPY=path/to/python  the interpreter whose torch builds and runs the wheel (default .venv/bin/python)
#   FUSED_ATTN_CUDA=0   passed through: a CPU-only wheel (see notes/eco.md for CI's choice)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
VPY=${VPY:-$repo/.venv/bin/python}
start=$(date +%s)
out=$(mktemp -d "${TMPDIR:-/tmp}/fused_attn_wheel.XXXXXX")
trap 'rm -rf "$out"' EXIT

"$VPY" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$out/dist" . >"$out/build.log" 2>&1 || {
  tail -n 40 "$out/build.log"; echo "wheel: build failed"; exit 1; }
wheel=$(ls "$out"/dist/fused_attn-*.whl)
built=$(date +%s)
echo "wheel: built $(basename "$wheel") ($(du -h "$wheel" | cut -f1)) in $((built - start)) s"

# A fresh venv from the base interpreter under .venv, seeing .venv's packages (torch, numpy) through
# plain path lines in a .pth: .venv's site-packages directories (which lie inside the clone, .venv being
# there), never the source tree itself; the .pth files inside them (.venv's editable fused_attn) are not
# processed from there, so only the wheel provides fused_attn (wheel_smoke.py checks where it came from).
base=$("$VPY" -c 'import sys; print(sys.base_prefix)')/bin/python3
"$base" -m venv --without-pip "$out/venv"
site_new=$("$out/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$VPY" - "$repo" >"$site_new/_fused_attn_ci_reuse_torch.pth" <<'PY'
import os, sys
repo = os.path.realpath(sys.argv[1])
for p in sys.path:
    real = os.path.realpath(p) if p else ""
    if ("site-packages" in p or "dist-packages" in p) and real != repo:
        print(p)
PY
"$VPY" -m pip --python "$out/venv/bin/python" install --no-deps --no-index --quiet "$wheel"

cd "$out"  # outside the source tree: only the installed package can be imported
"$out/venv/bin/python" "$repo/.ci/wheel_smoke.py" "$site_new"
echo "wheel: smoke test passed; total $(($(date +%s) - start)) s"
