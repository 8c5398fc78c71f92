"""Named ``[train]`` tables that ``pelmark phantom --synth-preset`` writes into a cohort's manifest.

``paper`` is the paper's protocol (the :class:`~pelmark.train.config.TrainConfig`
defaults: 512² input, ResNet34 U-Net of depth 5, Adam 1e-4, 28 epochs, one
fine-tune epoch). ``demo`` is sized for ``make demo`` on a 2-core CPU: the
demo store's 128² DRRs at full resolution, a ResNet18 U-Net of depth 4, a
larger learning rate, and a BCE weight on the mask pixels so the few thousand
image presentations a CPU affords are enough to learn the landmarks.
"""

from __future__ import annotations

from typing import Any

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "size": 128,
        "encoder": "resnet18",
        "encoder_depth": 4,
        "batch_size": 8,
        "lr": 1e-3,
        "pos_weight": 10.0,
        "disk_radius_px": 3.0,
        "epochs": 8,
        "workers": 1,
        "finetune": {"epochs": 1, "lr": 1e-4},
    },
    "paper": {},
}
