#!/usr/bin/env bash
# The fine-tune ablation of the README: for each seed, a baseline and the fine-tune variants started from it,
# evaluated together so that comparison.csv pairs every variant with its own seed's baseline, image by image.
#
#   experiments/finetune_ablation.sh STORE CONFIG OUT [SEED...]
#
# STORE: a synth store; CONFIG: a TOML file with the [train] table of the baseline (a manifest works);
# OUT: a new folder. Seeds default to 42 43 44 (fixed before any run; the demo trains seed 42).
# Then: .venv/bin/python experiments/summarise_seeds.py OUT  (means over seeds with their spread).
set -euo pipefail
store=$1; config=$2; out=$3; shift 3
seeds=${*:-42 43 44}
pelmark=${PELMARK:-.venv/bin/pelmark}
# name | extra arguments of `pelmark train finetune` (all start from the seed's baseline, lr and epochs from CONFIG)
variants=(
  "ft-paper|--soft-argmax global --pose-loss paper"
  "ft-local-reproj|--soft-argmax local --pose-loss reprojection"
  "ft-global-reproj|--soft-argmax global --pose-loss reprojection"
  "ft-combined|--soft-argmax local --pose-loss reprojection --bce-weight 1 --pel-weight 0.1"
  "ft-bce-control|--bce-weight 1 --pel-weight 0"
  "ft-global-reproj-3ep|--soft-argmax global --pose-loss reprojection --epochs 3"
  "ft-bce-control-3ep|--bce-weight 1 --pel-weight 0 --epochs 3"
  # Round 3: the combined loss with the global soft-argmax, and a learning rate decayed to 0 over the epoch
  # (the baseline's largest lever), with its control.
  "ft-global-combined|--soft-argmax global --pose-loss reprojection --bce-weight 1 --pel-weight 0.1"
  "ft-global-reproj-cosine|--soft-argmax global --pose-loss reprojection --schedule cosine"
  "ft-bce-control-cosine|--bce-weight 1 --pel-weight 0 --schedule cosine"
)
for seed in $seeds; do
  runs=$out/seed$seed
  $pelmark train baseline "$store" --out "$runs/baseline" --config "$config" --seed "$seed" --auto-resume --no-progress
  names=("$runs/baseline")
  for entry in "${variants[@]}"; do
    name=${entry%%|*}; args=${entry#*|}
    # shellcheck disable=SC2086  # args is a list of options
    $pelmark train finetune "$store" --out "$runs/$name" --config "$config" --seed "$seed" --init "$runs/baseline" \
      --auto-resume --no-progress $args
    names+=("$runs/$name")
  done
  $pelmark eval "${names[@]}" --store "$store" --out "$runs/eval" --overwrite --no-progress --refine
done
