#!/usr/bin/env bash
# The baseline ablation of the README: each experiments/baseline/*.toml trained on STORE (seed 42), then
# evaluated together; comparison.csv pairs each with the first, demo-constant (the preset before the cosine
# schedule). demo-last is the demo-10ep run read at its last checkpoint instead of its best validation one;
# demo-10ep is the preset before round 4 (10 epochs), demo the preset (16 epochs; experiments/epochs_ablation.sh
# compares the two over three seeds).
#
#   OMP_NUM_THREADS=1 experiments/baseline_ablation.sh STORE OUT
set -euo pipefail
store=$1; out=$2
pelmark=${PELMARK:-.venv/bin/pelmark}
here=$(dirname "$0")/baseline
runs=()
for name in demo-constant demo-constant-cosine demo-constant-augment demo-10ep previous-demo gaussian-cosine-narrow demo-gaussian demo-posweight50 demo-radius2 demo-resnet34 demo; do
  $pelmark train baseline "$store" --out "$out/$name" --config "$here/$name.toml" --seed 42 --auto-resume --no-progress
  runs+=("$out/$name")
done
# Best versus last checkpoint: the same run without its best.pt (eval falls back to last.pt).
rm -rf "$out/demo-last" && cp -r "$out/demo-10ep" "$out/demo-last" && rm "$out/demo-last/checkpoints/best.pt"
runs+=("$out/demo-last")
$pelmark eval "${runs[@]}" --store "$store" --out "$out/eval" --overwrite --no-progress
