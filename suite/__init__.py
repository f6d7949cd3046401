"""robust-jem, the face: the only place where the model side (``robust_jem``) meets the attack side
(``attacks``). ``targets`` turns checkpoints into labelled defenses, ``evaluate`` holds one library call per
command, ``study`` runs the whole study through those calls, ``cli`` parses options and makes one call."""

from .api import benchmark

__all__ = ["benchmark"]
