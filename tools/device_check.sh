#!/usr/bin/env bash
# The GPU check, prepared for the device tool (README "Running the GPU check").
#
#   here, once (needs PyPI):   bash tools/device_check.sh prepare
#   on the GPU, one device call each, back to back (the machine keeps files only while it is
#   warm, 30 s after a call):
#     bash tools/device_check.sh call 1      carry [".devcheck/part1"]   + exports the full preset
#     bash tools/device_check.sh call 2      carry [".devcheck/part2"]   ...
#     bash tools/device_check.sh call N      carry [".devcheck/partN"]   last part: join, install,
#                                                                          probe, demo model
#     bash tools/device_check.sh full                                    the full preset
#   here, no GPU:              bash tools/device_check.sh --dry-run all
#
# Why parts: TensorRT-RTX's library wheel is ~91 MiB and a device call carries at most 64 MiB,
# the repository included, so the wheel is split and joined on the machine. Nothing is fetched
# there (it has no network) and nothing is installed at run time except these wheels, offline,
# into $STAGE/site. Outputs (JSON + Markdown + a log per call) go to $OUT.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
STEP="${1:-}"
ARG="${2:-}"
PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/device-out}"
STAGE="${DD_STAGE:-/var/tmp/ddcheck}"
DEV="${DD_DEVCHECK:-$REPO/.devcheck}"  # the prepared parts (git-ignored)
FULL_PRESET="${DD_FULL_PRESET:-deltadiff-latent}"
DEMO="$REPO/runtime/models/demo-pixel"
RTX_VERSION=1.7.1.116
DEVICE_PY=3.12        # the device image's python3 (KINDS.md: Python 3.12.3)
CALL_MIB=64           # what one device call may carry, repository included
if [[ $DRY == 1 ]]; then
  STAGE="$(mktemp -d)/ddcheck"
  trap 'rm -rf "$(dirname "$STAGE")"' EXIT
fi
mkdir -p "$OUT" "$STAGE"
LOG="$OUT/device-check-${STEP}${ARG}.log"
say() { echo "[device_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
would() { say "DRY-RUN would: $*"; }
# tools/gpu_check.py with the staged wheels on the path; "timeout S" may come first
gpu_check() {
  local pre=() dry=()
  if [[ "$1" == timeout ]]; then pre=(timeout "$2"); shift 2; fi
  [[ $DRY == 1 ]] && dry=(--dry-run)
  PYTHONPATH="$STAGE/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    "${pre[@]}" "$PY" tools/gpu_check.py "${dry[@]}" "$@" 2>&1 | tee -a "$LOG"
}

tree_mib() {  # what travels with every call: tracked + untracked-not-ignored files
  git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null \
    | tail -1 | awk '{printf "%d", $1 / 1048576 + 1}'
}

prepare() {
  local w="$DEV/wheels" plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do plat+=(--platform "$p"); done
  mkdir -p "$w"
  say "downloading the wheels the project names for Python $DEVICE_PY into $w"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PY" \
    --implementation cp "${plat[@]}" -d "$w" \
    "tensorrt_rtx_cu13_bindings==$RTX_VERSION" "tensorrt_rtx_cu13_libs==$RTX_VERSION" \
    onnxslim==0.1.98 pypng==0.20220715.0
  # the tensorrt_rtx_cu13 front package is an sdist on PyPI: build its (pure) wheel here
  "$PY" -m pip wheel -q --no-deps -w "$w" "tensorrt_rtx_cu13==$RTX_VERSION"
  local libs tree part n
  libs="$(ls "$w"/tensorrt_rtx_cu13_libs-*.whl)"
  tree="$(tree_mib)"
  part=$(( CALL_MIB - tree - 4 ))  # 4 MiB: the small wheels (< 2 MiB) and a margin
  (( part >= 8 )) || { say "the working tree is ${tree} MiB: too big to carry wheel parts"; exit 1; }
  rm -rf "$DEV"/part*
  split -b "${part}M" -d -a 1 "$libs" "$DEV/libs.whl.part"
  n=0
  for f in "$DEV"/libs.whl.part*; do
    n=$((n + 1)); mkdir -p "$DEV/part$n"; mv "$f" "$DEV/part$n/"
  done
  cp "$w"/onnxslim-*.whl "$w"/pypng-*.whl "$DEV/part1/"  # the exporter needs them in call 1
  cp "$w"/tensorrt_rtx_cu13-*.whl "$w"/tensorrt_rtx_cu13_bindings-*.whl "$DEV/part$n/"
  (cd "$w" && sha256sum "$(basename "$libs")") > "$DEV/part$n/libs.sha256"
  echo "$n" > "$DEV/part$n/LAST"
  say "tree ${tree} MiB; libs wheel split into $n parts of <= ${part} MiB:"
  du -sh "$DEV"/part* | tee -a "$LOG"
  say "device calls: $(for i in $(seq 1 "$n"); do printf 'call %s [carry .devcheck/part%s]; ' "$i" "$i"; done)full"
}

stage_part() {  # copy part K into $STAGE; parts 1..K-1 must be there already (warm machine)
  local k="$1" i
  for ((i = 1; i < k; i++)); do
    if [[ ! -e "$STAGE/part$i.ok" ]]; then
      say "FRESH MACHINE: part $i is not in $STAGE (more than 30 s passed between calls);"
      say "start again with 'call 1'"
      exit 4
    fi
  done
  if [[ ! -d "$DEV/part$k" ]]; then
    if [[ $DRY == 1 ]]; then would "copy .devcheck/part$k/* to $STAGE (not prepared here)"; return; fi
    say "no .devcheck/part$k here: run 'prepare' first and name .devcheck/part$k in carry"; exit 1
  fi
  cp "$DEV/part$k"/* "$STAGE/"
  touch "$STAGE/part$k.ok"
  say "staged part $k: $(ls "$DEV/part$k" | tr '\n' ' ')"
  local whl=("$DEV/part$k"/*.whl)
  if [[ -e "${whl[0]}" ]]; then
    if [[ $DRY == 1 ]]; then would "pip install --no-index --no-deps --target $STAGE/site ${whl[*]##*/}"
    else
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$STAGE/site" "${whl[@]}" 2>&1 | tee -a "$LOG"
    fi
  fi
}

install_wheels() {  # join the parts, check them, install offline into $STAGE/site
  if [[ ! -e "$STAGE/LAST" ]]; then
    if [[ $DRY == 1 ]]; then would "join libs.whl.part*, check sha256, pip install --no-index into $STAGE/site"; return; fi
    say "the last part is missing"; exit 1
  fi
  (cd "$STAGE" && cat libs.whl.part* > "$(awk '{print $2}' libs.sha256)" && sha256sum -c libs.sha256) | tee -a "$LOG"
  local libs
  libs="$(ls "$STAGE"/tensorrt_rtx_cu13_libs-*.whl)"
  if [[ $DRY == 1 ]]; then
    "$PY" -m zipfile -t "$libs" >/dev/null && say "joined wheel is intact"
    would "pip install --no-index --no-deps --target $STAGE/site ${libs##*/}"
    return
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$STAGE/site" "$libs" 2>&1 | tee -a "$LOG"
  say "installed: $(ls "$STAGE/site" | tr '\n' ' ')"
}

probe() {  # 30 s at most: does TensorRT(-RTX) run on this GPU at all?
  local rc=0
  if [[ $DRY == 1 ]]; then gpu_check --out "$OUT" --work "$STAGE/work" probe; return; fi
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG" || true
  gpu_check timeout 60 --out "$OUT" --work "$STAGE/work" probe || rc=$?
  if [[ $rc == 0 ]]; then touch "$STAGE/trt.ok"; say "TensorRT runs here: its numbers follow";
  else rm -f "$STAGE/trt.ok"; say "TensorRT does NOT run on this GPU (probe exit $rc): measuring torch / ONNX Runtime only"; fi
}

model() {  # engines -> verify -> bench (without TensorRT if the probe failed)
  local dir="$1" name="$2"; shift 2
  local trt=()
  [[ -e "$STAGE/trt.ok" || $DRY == 1 ]] || trt=(--no-trt)
  if [[ $DRY == 1 && ! -e "$dir/manifest.json" ]]; then would "run the model step on $dir ($name)"; return; fi
  gpu_check timeout "${DD_MODEL_TIMEOUT:-270}" --out "$OUT" --work "$STAGE/work" \
    model --model "$dir" --name "$name" "${trt[@]}" "$@" \
    || say "MODEL STEP FAILED or timed out for $name (summary-$name.json holds what was done)"
}

call() {
  local k="$1"
  stage_part "$k"
  if [[ "$k" == 1 ]]; then
    say "exporting the full preset $FULL_PRESET (+FP16) for the 'full' call"
    gpu_check timeout "${DD_EXPORT_TIMEOUT:-300}" --out "$OUT" --work "$STAGE/work" \
      export --preset "$FULL_PRESET" --tile 64 \
      || say "EXPORT FAILED or timed out: the 'full' call will have no model (go on with call 2 now)"
  fi
  if [[ -e "$STAGE/LAST" || ( $DRY == 1 && ! -d "$DEV/part$((k + 1))" ) ]]; then
    install_wheels
    probe
    # engines and their records go into a copy (the bundled model stays as committed); the
    # FP32 reference (reference.safetensors) travels inside the model folder
    local copy="$REPO/.devcheck/models/demo-pixel"
    rm -rf "$copy"; mkdir -p "$(dirname "$copy")"
    cp -r "$DEMO" "$copy"
    model "$copy" demo-pixel --modes staged,unrolled --batches 1,4
  fi
}

full() {
  local dir="$STAGE/work/$FULL_PRESET-tile64"
  if [[ $DRY == 0 && ( ! -e "$dir/manifest.json" || ! -e "$STAGE/LAST" ) ]]; then
    say "FRESH MACHINE: the exported model or the wheels are gone; start again with 'call 1'"; exit 4
  fi
  model "$dir" "$FULL_PRESET" --modes staged --batches 1,4 --min-runs 10 --min-seconds 1
}

case "$STEP" in
  prepare) prepare ;;
  call) [[ -n "$ARG" ]] || { echo "usage: $0 call K"; exit 2; }; call "$ARG" ;;
  full) full ;;
  all)
    [[ $DRY == 1 ]] || { echo "'all' is for --dry-run (on the GPU, one device call per step)"; exit 2; }
    n=1; while [[ -d "$DEV/part$((n + 1))" ]]; do n=$((n + 1)); done
    for ((k = 1; k <= n; k++)); do call "$k"; done
    full ;;
  *) echo "usage: $0 [--dry-run] prepare | call K | full | all"; exit 2 ;;
esac
say "done: $STEP $ARG (outputs in $OUT)"
