"""robust-jem, the model side: JEM / CE / PGD-AT training, checkpoints, the SGLD-refined classifier.

The names below are imported on first use (PEP 562), so ``import robust_jem.config`` (the CLI's option
parsing) does not load torch. The SGLD loop itself is ``robust_jem.sgld.sgld`` (the name ``robust_jem.sgld`` is
its module).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"load": "checkpoint", "ModelConfig": "config", "SGLDConfig": "config", "TrainConfig": "config",
         "preset_config": "config", "ImageDataset": "data", "load_dataset": "data", "UserError": "errors",
         "EnergyModel": "model", "RefinedClassifier": "refined", "ReplayBuffer": "sgld"}

__all__ = list(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'robust_jem' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
