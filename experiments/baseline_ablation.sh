#!/usr/bin/env bash
# The baseline ablation of the README: each experiments/baseline/*.toml trained on STORE (seed 42), then
# evaluated together with --refine; comparison.csv pairs each with the first, the previous demo preset.
#
#   experiments/baseline_ablation.sh STORE OUT
set -euo pipefail
store=$1; out=$2
pelmark=${PELMARK:-.venv/bin/pelmark}
here=$(dirname "$0")/baseline
runs=()
for name in previous-demo gaussian-cosine-narrow demo; do
  $pelmark train baseline "$store" --out "$out/$name" --config "$here/$name.toml" --auto-resume --no-progress
  runs+=("$out/$name")
done
$pelmark eval "${runs[@]}" --store "$store" --out "$out/eval" --refine --overwrite --no-progress
