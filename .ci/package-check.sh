#!/usr/bin/env bash
# Packaging check: build the sdist and the wheel, install the wheel into a fresh virtual
# environment with the tested versions as constraints, and run `embedpipe --version` and a
# 4-image embed with it. Proves that a user's `pip install embedpipe` works without this
# checkout: nothing read from the source tree at install or run time, no missing package data.
# Usage: bash .ci/package-check.sh   (PYTHON=... to choose the interpreter; needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "=== package-check: build sdist and wheel"
"$PYTHON" -m build --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls -l "$work/dist"
sdist=$(ls "$work"/dist/embedpipe-*.tar.gz)
wheel=$(ls "$work"/dist/embedpipe-*.whl)
tar -tzf "$sdist" >"$work/sdist.txt"
for f in requirements.txt README.md pipeline/serve/page.html; do
  grep -q "/$f\$" "$work/sdist.txt" || { echo "the sdist lacks $f" >&2; exit 1; }
done
"$PYTHON" -m zipfile -l "$wheel" >"$work/wheel.txt"
grep -q "pipeline/serve/page.html" "$work/wheel.txt" || { echo "the wheel lacks pipeline/serve/page.html" >&2; exit 1; }

echo "=== package-check: install the wheel into a fresh venv (requirements.txt as constraints)"
# pip refuses extras in a constraints file: the same pins without them.
sed -E 's/\[[^]]*\]//' requirements.txt >"$work/constraints.txt"
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check -c "$work/constraints.txt" "$wheel"
"$work/venv/bin/python" -m pip check

echo "=== package-check: embedpipe --version and a 4-image embed, outside the checkout"
cd "$work"
"$work/venv/bin/embedpipe" --version
"$work/venv/bin/python" - <<'PY'
import os
from PIL import Image
os.makedirs("images", exist_ok=True)
for i in range(4):
    Image.new("RGB", (80 + 8 * i, 60), (40 * i, 120, 200 - 30 * i)).save(f"images/{i}.jpg", quality=90)
PY
"$work/venv/bin/embedpipe" embed --input images --output out --weights random --image-size 64 --batch-size 4
"$work/venv/bin/python" - <<'PY'
import json
counts = json.load(open("out/manifest.json"))["counts"]
assert counts["seen"] == 4 and counts["embedded"] == 4 and counts["failed"] == 0, counts
print("package-check: the installed wheel embedded", counts)
PY

echo "=== package-check: without the [serve] extra, serve says how to get it; with it, the app imports"
set +e
"$work/venv/bin/embedpipe" serve --index "$work/out" 2>"$work/serve.err"
rc=$?
set -e
cat "$work/serve.err"
[ "$rc" = 2 ] && grep -q "pip install 'embedpipe\[serve\]'" "$work/serve.err" || { echo "serve without the extra: rc=$rc" >&2; exit 1; }
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check -c "$work/constraints.txt" "$wheel[serve]"
"$work/venv/bin/python" -c "import pipeline.serve.app, pipeline.serve.connections; print('package-check: [serve] imports')"
