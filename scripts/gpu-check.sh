#!/usr/bin/env bash
# Issue 12's GPU figures in one run: the gpu-marked tests, then every benchmark at the README's GPU sizes,
# each under its own time limit so that one slow part cannot take the others' time. It writes to $OUT
# (default gpu-check/): log.txt (the tail of each part, its exit code and seconds), <part>.txt (its whole
# output) and bench.jsonl (each benchmark's JSON line, tagged with its part), which the device tool brings back.
#
#   make bench-gpu                                    # on a GPU machine with .venv (make install)
#
# On a lent GPU machine without a package index: here, `../shared/gpu-kit/build.sh && scripts/gpu-kit-extra.sh`,
# then carry .whl and .gpu and run, from the project root there:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD/.gpu/site PY="python3 -P" scripts/gpu-check.sh
# The limits below add up to about 12 minutes, more than one device call allows (10): split the parts over two
# calls, e.g. PARTS="tests registration renderer nanodrr", then PARTS="trainer trainer-device synth compiled".
set -uo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-check}
PARTS=${PARTS:-"tests registration renderer nanodrr trainer trainer-device synth compiled"}
mkdir -p "$OUT"

wanted() { [[ " $PARTS " == *" $1 "* ]]; }

run() {  # part, seconds, command...
  local part=$1 limit=$2
  shift 2
  wanted "$part" || return 0
  echo "== $part (limit ${limit} s): $*" | tee -a "$OUT/log.txt"
  local start rc
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$part.txt" 2>&1
  rc=$?
  tail -n 6 "$OUT/$part.txt" | tee -a "$OUT/log.txt"
  grep -h '^{' "$OUT/$part.txt" | sed "s/^{/{\"part\": \"$part\", /" >> "$OUT/bench.jsonl"
  echo "   rc $rc, $(($(date +%s) - start)) s" | tee -a "$OUT/log.txt"
}

$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))" | tee -a "$OUT/log.txt" || {
  echo "gpu-check: no CUDA device for $PY" >&2
  exit 1
}

# A 1 mm phantom CT (389 x 310 x 334 voxels, as in the figures) unless BENCH_CT names one.
if [ -z "${BENCH_CT:-}" ] && { wanted renderer || wanted nanodrr; }; then
  $PY -m pelmark.cli phantom "$OUT/phantom" --subjects 1 --novel-subjects 0 --spacing 1.0 --no-preview > "$OUT/phantom.txt" 2>&1
  BENCH_CT=$(ls "$OUT"/phantom/ct/*.nii.gz | head -n 1)
fi
CT_ARGS=()
[ -n "${BENCH_CT:-}" ] && CT_ARGS=(--ct "$BENCH_CT")

TRAIN=(benchmarks/train_bench.py --device cuda --size 512 --encoder resnet34 --encoder-depth 5 --workers 12 --steps 20)
run tests 150 $PY -m pytest -m gpu -q -p no:cacheprovider
run registration 45 $PY benchmarks/registration_bench.py --device cuda --batch 32 --landmarks 8 --repeats 10
run renderer 60 $PY benchmarks/synth_bench.py --device cuda --size 768 --views 64 --naive-views 1 "${CT_ARGS[@]}"
run nanodrr 90 $PY benchmarks/synth_bench.py --device cuda --renderer nanodrr --batch 16 --size 768 --views 64 --naive-views 1 "${CT_ARGS[@]}"
# The baseline step (auto transforms: on the GPU), then basic augmentation on the GPU and, if asked for, on the workers.
run trainer 90 $PY "${TRAIN[@]}" --batch-size 32
run trainer-device 60 $PY "${TRAIN[@]}" --batch-size 32 --augment basic --transforms device
run trainer-worker 60 $PY "${TRAIN[@]}" --batch-size 32 --augment basic --transforms worker
run synth 120 $PY benchmarks/synth_pipeline_bench.py --device cuda --subjects 4 --views 100 --size 768 --spacing 1.0
run compiled 120 $PY "${TRAIN[@]}" --batch-size 64 --compile
