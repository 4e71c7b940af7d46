#!/usr/bin/env bash
# Issue #25's GPU check in one run (benchmarks/gpu_check.py; docs/gpu.md says what it reports).
#
#   benchmarks/gpu_check.sh --prepare        here, with network: .gpu/ gets the wheels a bare GPU machine lacks
#                                            (open_clip_torch, segment-anything, ftfy, wcwidth) and a copy of
#                                            ../shared's golden fixtures; carry .gpu to the GPU machine
#   benchmarks/gpu_check.sh --out DIR [gpu_check.py's options]    on the GPU machine (no network needed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CARRY=.gpu
WHEELS=(open_clip_torch==3.3.0 segment-anything==1.0 ftfy==6.3.1 wcwidth==0.9.4)

if [[ ${1:-} == --prepare ]]; then
  SHARED=${TRIDENT_SHARED:-../shared}
  mkdir -p "$CARRY/wheels" "$CARRY/shared"
  "$PY" -m pip download --no-deps --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" "${WHEELS[@]}"
  cp -r "$SHARED/reference-golden" "$SHARED/reference-harness" "$CARRY/shared/"
  du -sh "$CARRY"
  echo "prepared $CARRY: carry it (run's carry: [\"$CARRY\"]) and run benchmarks/gpu_check.sh --out \$OUT"
  exit 0
fi

if ! "$PY" -c "import open_clip, segment_anything" 2>/dev/null; then
  [[ -d $CARRY/wheels ]] || { echo "open_clip or segment_anything is missing and $CARRY/wheels is absent:" \
    "run benchmarks/gpu_check.sh --prepare where there is network, and carry $CARRY" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --find-links "$CARRY/wheels" "${WHEELS[@]}"
fi
if [[ -z ${TRIDENT_SHARED:-} && ! -d ../shared/reference-golden && -d $CARRY/shared/reference-golden ]]; then
  export TRIDENT_SHARED=$PWD/$CARRY/shared
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
