"""Named ``[train]`` tables that ``pelmark phantom --synth-preset`` writes into a cohort's manifest.

``paper`` is the paper's protocol (the :class:`~pelmark.train.config.TrainConfig`
defaults: 512² input, ResNet34 U-Net of depth 5, Adam 1e-4, 28 epochs, one
fine-tune epoch). ``demo`` is sized for ``make demo`` on a 2-core CPU: the
demo store's 128² DRRs at full resolution, a ResNet18 U-Net of depth 4 with a
decoder of half smp's width (its full-resolution blocks cost most of a step),
a larger learning rate with a short warm-up and a cosine decay, a BCE weight
on the mask pixels, and the spatial-softmax cross-entropy beside BCE, so that
the few hundred steps a CPU affords are enough to learn the landmarks, over
16 epochs (10 until round 4 of the ablation: the six more leave the raw
argmax where it was and lower the registered rows by 14 %). The fine-tune
keeps a constant 1e-4 for its one epoch and trains on the flip test's logits,
as ``pelmark eval`` scores them; seg-informed raises the KL weight to
1, ramps its visibility loss in over the first half of the run, predicts on
a canvas 16 px wider than the image on every side, weighs an absent
landmark's visibility error 1 (seed 003: 2) and trains 24 epochs. The
README's ablation gives the figure of each choice (the cosine decay alone:
-25 % on novel subjects).
"""

from __future__ import annotations

from typing import Any

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "size": 128,
        "encoder": "resnet18",
        "encoder_depth": 4,
        "decoder_channels": [128, 64, 32, 16],
        "batch_size": 8,
        "lr": 1e-3,
        "schedule": "cosine",
        "warmup_steps": 50,
        "pos_weight": 10.0,
        "disk_radius_px": 3.0,
        "softmax_weight": 1.0,
        "epochs": 16,
        "workers": 1,
        # The fine-tune trains PEL on the flip test's logits, which eval scores (round 5): -21.2, -40.2, -18.8 % against
        # each seed's baseline on novel subjects, every interval below 0, where the one-pass fine-tune gave -4.1, -24.5, -9.0.
        "finetune": {"epochs": 1, "lr": 1e-4, "schedule": "constant", "warmup_steps": 0, "flip_test": True},
        # Seed 003's visibility weight (10), with the KL weight raised to 1 (seed 003 trains 1000 epochs, the demo
        # 10) and the visibility loss ramped in over the first half of the run: at 0.1 and 10 from step 0 both
        # ASIS collapsed (42.47 px); so (experiments/seg/demo-kl1-viswarmup.toml) 11.34 +- 1.14 px over three
        # seeds, with the best visibility of any model (README, "The segmentation-informed model").
        # At the preset's 16 epochs (experiments/seg/demo-16ep-kl1-viswarmup.toml: the ramp over the first 288 of
        # 576 steps) 10.83 +- 1.93 px over the same seeds, and visibility 93.2 % raw, 94.4 % registered.
        # A 16-px canvas margin at 16 epochs lifts novel-subject visibility by about 1.9 points but costs 23-31 % of
        # the Table-1 mean (round 7); at 24 epochs it localises as that preset (7.25 against 7.18 px) but reached
        # 95 % on two seeds of three (round 8). Its misses outnumbered its false "present" calls 3 to 1, the push of
        # seed 003's doubled false-present weight: with the weight 1 (round 10,
        # experiments/seg/demo-24ep-kl1-viswarmup-margin16-absent1.toml, by the rule committed before the runs)
        # novel-subject visibility is 95.44, 96.19 and 95.62 %, the Table-1 mean 6.78 px against the 16-epoch
        # plain preset's 7.18, and -26.8, -31.8, -34.2 % against each seed's baseline, every interval below 0.
        "seg-informed": {
            "kl_weight": 1.0,
            "epochs": 24,
            "visibility_warmup_steps": 432,
            "canvas_margin_px": 16,
            "visibility_absent_weight": 1.0,
        },
    },
    "paper": {},
}
