#!/usr/bin/env bash
# Round 4 of the README's ablation: the demo preset at 10 epochs (experiments/baseline/demo-10ep.toml, the preset
# before) against 16 (experiments/baseline/demo.toml, the preset), each with its default fine-tune, per seed,
# evaluated together with --refine so that comparison.csv pairs every run with the seed's 10-epoch baseline.
#
#   OMP_NUM_THREADS=1 experiments/epochs_ablation.sh STORE OUT [SEED...]
#
# Then seg-informed at 16 epochs (experiments/seg/demo-16ep-kl1-viswarmup.toml; its 10-epoch runs are the README's
# warm-up rows), evaluated against the 16-epoch baseline in OUT/seedN/eval-seg.
# Seeds default to 42 43 44 (fixed before any run; the demo trains seed 42). One thread: ~9 and ~12 minutes per
# baseline on the 2-core CPU, ~13 for seg-informed. Summaries: experiments/summarise_seeds.py OUT.
set -euo pipefail
store=$1; out=$2; shift 2
seeds=${*:-42 43 44}
pelmark=${PELMARK:-.venv/bin/pelmark}
here=$(dirname "$0")/baseline
for seed in $seeds; do
  runs=$out/seed$seed
  names=()
  for entry in "10ep|demo-10ep" "16ep|demo"; do
    tag=${entry%%|*}; config=$here/${entry#*|}.toml
    $pelmark train baseline "$store" --out "$runs/baseline-$tag" --config "$config" --seed "$seed" --auto-resume --no-progress
    $pelmark train finetune "$store" --out "$runs/finetune-$tag" --config "$config" --seed "$seed" \
      --init "$runs/baseline-$tag" --auto-resume --no-progress
    names+=("$runs/baseline-$tag" "$runs/finetune-$tag")
  done
  $pelmark eval "${names[@]}" --store "$store" --out "$runs/eval" --overwrite --no-progress --refine
  $pelmark train seg-informed "$store" --out "$runs/seg-16ep" --config "$(dirname "$0")/seg/demo-16ep-kl1-viswarmup.toml" \
    --seed "$seed" --auto-resume --no-progress
  $pelmark eval "$runs/baseline-16ep" "$runs/seg-16ep" --store "$store" --out "$runs/eval-seg" --overwrite --no-progress --refine
done
