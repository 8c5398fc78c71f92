#!/usr/bin/env bash
# The baseline ablation of the README: each experiments/baseline/*.toml trained on STORE (seed 42), then
# evaluated together; comparison.csv pairs each with the first, demo-constant (the preset before the cosine
# schedule). demo-last is the demo run read at its last checkpoint instead of its best validation one.
#
#   OMP_NUM_THREADS=1 experiments/baseline_ablation.sh STORE OUT
set -euo pipefail
store=$1; out=$2
pelmark=${PELMARK:-.venv/bin/pelmark}
here=$(dirname "$0")/baseline
runs=()
for name in demo-constant demo-constant-cosine demo-constant-augment demo previous-demo gaussian-cosine-narrow demo-gaussian demo-posweight50 demo-radius2 demo-resnet34; do
  $pelmark train baseline "$store" --out "$out/$name" --config "$here/$name.toml" --seed 42 --auto-resume --no-progress
  runs+=("$out/$name")
done
# Best versus last checkpoint: the same run without its best.pt (eval falls back to last.pt).
rm -rf "$out/demo-last" && cp -r "$out/demo" "$out/demo-last" && rm "$out/demo-last/checkpoints/best.pt"
runs+=("$out/demo-last")
$pelmark eval "${runs[@]}" --store "$store" --out "$out/eval" --overwrite --no-progress
