"""Fine-tuning both stages: `train(config)` and its frozen configuration (docs/training.md).

    from sam3d_core.training import recipe, train
    result = train(recipe("sft-stage1", data=("samples/",), output="runs/sft").check())

Importing this package loads nothing heavy; each name is imported on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "sam3d_core.training.config",
    "LossWeights": "sam3d_core.training.config",
    "ConfigError": "sam3d_core.training.config",
    "RECIPES": "sam3d_core.training.config",
    "recipe": "sam3d_core.training.config",
    "load_config": "sam3d_core.training.config",
    "describe": "sam3d_core.training.config",
    "train": "sam3d_core.training.loop",
    "TrainResult": "sam3d_core.training.loop",
    "TrainingError": "sam3d_core.training.loop",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sam3d_core.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
