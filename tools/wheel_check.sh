#!/usr/bin/env bash
# Builds a regular (non-editable) wheel and checks that it ships the compiled extension and the Triton kernels
# as lowbit.kernels, then imports them from a clean install outside the source tree.
set -euo pipefail
PYTHON=${PYTHON:-python3}
# Absolute path (the import check runs from another directory); not resolved further, so a venv stays a venv.
if [[ "$PYTHON" == */* ]]; then PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/lowbit-*.whl)
"$PYTHON" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["lowbit/kernels/__init__.py", "lowbit/kernels/fake_quant.py", "lowbit/ops/fake_quant.py"]
missing = [n for n in need if n not in names]
if not any(n.startswith("lowbit/_C") and n.endswith(".so") for n in names):
    missing.append("lowbit/_C*.so")
if missing:
    sys.exit(f"wheel is missing: {missing}")
print(f"wheel ships {len(names)} files, including {', '.join(need)} and the extension")
PY
"$PYTHON" -m pip install -q --no-deps --target "$work/site" "$wheel"
(cd "$work" && PYTHONPATH="$work/site" "$PYTHON" -c "
import lowbit, lowbit.kernels.fake_quant, torch
assert lowbit.__file__.startswith('$work/site'), lowbit.__file__
print('installed wheel imports; backends:', lowbit.backends())
")
echo "wheel-check OK"
