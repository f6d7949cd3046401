"""robust-jem, the model side: JEM / CE / PGD-AT training, checkpoints, the SGLD-refined classifier."""

from .checkpoint import load
from .config import ModelConfig, SGLDConfig, TrainConfig, preset_config
from .data import ImageDataset, load_dataset
from .errors import UserError
from .model import EnergyModel
from .refined import RefinedClassifier
from .sgld import ReplayBuffer, sgld

__all__ = ["load", "ModelConfig", "SGLDConfig", "TrainConfig", "preset_config", "ImageDataset", "load_dataset",
           "UserError", "EnergyModel", "RefinedClassifier", "ReplayBuffer", "sgld"]
__version__ = "0.1.0"
