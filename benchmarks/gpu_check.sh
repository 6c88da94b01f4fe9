#!/usr/bin/env bash
# GPU check: bare-model and end-to-end img/s of the embedding model (headless ResNet50, uint8 in,
# caffe preprocessing inside) at fp32, bf16 and fp16, with CPU decoding (Pillow, a process pool)
# and with GPU decoding (pipeline.gpu_decode: nvImageCodec, resize on the device), as a table.
# About 4 minutes on JAX.
#
# Usage:
#   benchmarks/gpu_check.sh --prepare
#       On a machine that reaches PyPI: puts the Keras wheels (keras, namex, optree), the CUDA 13
#       nvImageCodec and nvJPEG wheels and the scikit-image sample photos into .gpu-wheels/
#       (git-ignored, ~36 MB), so that a GPU machine without internet, TensorFlow or Beam can run it.
#   benchmarks/gpu_check.sh [--backends jax,torch,tensorflow] [--small] [-- ARGS for gpu_check.py]
#       Runs the check once per Keras backend listed and installed (default jax: the model under
#       jax.jit). --small: tiny sizes, to test the logic on a CPU (numbers meaningless; nvImageCodec
#       then runs on its CPU backend).
#
# Environment: PYTHON (default python3), GPU_CHECK_WHEELS (default .gpu-wheels),
#   GPU_CHECK_OUT (JSON and log; default $OUT if set, else /tmp/embedpipe-gpu-check),
#   GPU_CHECK_BUDGET_JAX / _TORCH / _TENSORFLOW (seconds per backend; default 240 / 100 / 240).
# The TensorFlow/Beam pipeline itself is not run here: this measures the same Keras model and the
# same decode function on whichever backend the machine has, and says which.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.gpu-wheels}
OUTDIR=${GPU_CHECK_OUT:-${OUT:-/tmp/embedpipe-gpu-check}}
KERAS_VERSION=3.15.1
NVIMGCODEC_VERSION=0.9.0.20
NVJPEG_VERSION=13.3.2.43  # CUDA 13: the GPU machine's driver is CUDA 13.0

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS/wheels" "$WHEELS/nvimgcodec" "$WHEELS/photos"
  # The GPU image's Python is 3.12 (x86-64); keras' other needs (absl-py, rich, h5py, ml-dtypes,
  # packaging, numpy, typing-extensions) are already there.
  download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_CHECK_PYVER:-3.12}" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
  }
  download -d "$WHEELS/wheels" "keras==$KERAS_VERSION" namex==0.1.0 optree==0.20.0
  # nvImageCodec finds nvJPEG through its RUNPATH ($ORIGIN/../../cu13/lib) when both share a target.
  download -d "$WHEELS/nvimgcodec" "nvidia-nvimgcodec-cu13==$NVIMGCODEC_VERSION" "nvidia-nvjpeg==$NVJPEG_VERSION"
  photos=$("$PY" -c 'from pipeline import sample; print(sample.photo_dir())')
  for f in astronaut.png chelsea.png coffee.png motorcycle_left.png rocket.jpg hubble_deep_field.jpg \
           retina.jpg ihc.png brick.png grass.png gravel.png camera.png; do
    [[ -f "$photos/$f" ]] && cp "$photos/$f" "$WHEELS/photos/"
  done
  du -sh "$WHEELS"
  exit 0
fi

BACKENDS=jax
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --backends) BACKENDS=$2; shift 2 ;;
    --small) ARGS+=(--small); shift ;;
    --) shift; ARGS+=("$@"); break ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUTDIR"

echo "== machine"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
else
  echo "no nvidia-smi: no NVIDIA GPU here; the figures below are CPU figures"
fi
echo "CPUs: $(nproc)  $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
"$PY" --version

# Keras and nvImageCodec from the carried wheels when the machine lacks them.
# (Keras' version is read from the metadata: importing keras would need a backend chosen first.)
site=/tmp/embedpipe-gpu-site
install_wheels() {
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('keras') != '$KERAS_VERSION')" >/dev/null 2>&1; then
  if ls "$WHEELS"/wheels/*.whl >/dev/null 2>&1; then
    install_wheels "$WHEELS"/wheels/*.whl
    echo "keras: installed from $WHEELS/wheels into $site"
  else
    echo "keras $KERAS_VERSION is missing and $WHEELS/wheels has no wheels: run '$0 --prepare' where PyPI is reachable" >&2
    exit 1
  fi
fi
if ! "$PY" -c "from nvidia import nvimgcodec" >/dev/null 2>&1; then
  if ls "$WHEELS"/nvimgcodec/*.whl >/dev/null 2>&1; then
    install_wheels "$WHEELS"/nvimgcodec/*.whl
    echo "nvImageCodec: installed from $WHEELS/nvimgcodec into $site"
  else
    echo "nvImageCodec is missing and $WHEELS/nvimgcodec has no wheels: the GPU decode rows will say so"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PHOTOS=()
[[ -d "$WHEELS/photos" ]] && PHOTOS=(--photos "$WHEELS/photos")

status=0
IFS=, read -ra backend_list <<<"$BACKENDS"
for backend in "${backend_list[@]}"; do
  if ! "$PY" -c "import $backend" >/dev/null 2>&1; then
    echo "== $backend: not installed here, skipped"
    continue
  fi
  budget_var="GPU_CHECK_BUDGET_${backend^^}"
  default_budget=240
  [[ "$backend" == torch ]] && default_budget=100
  budget=${!budget_var:-$default_budget}
  echo "== keras on $backend (budget ${budget}s)"
  # The script skips rows that would pass its budget; the timeout only catches a hang.
  KERAS_BACKEND=$backend XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 \
    timeout $((budget + 90)) "$PY" benchmarks/gpu_check.py --backend "$backend" --budget "$budget" \
    --json "$OUTDIR/gpu_check_$backend.json" "${PHOTOS[@]}" "${ARGS[@]}" 2>&1 |
    grep -v -e '^WARNING: All log messages before absl' -e '^I0000 ' | tee "$OUTDIR/gpu_check_$backend.log" ||
    status=1
done
exit $status
