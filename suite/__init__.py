"""robust-jem, the face: the only place where the model side (``robust_jem``) meets the attack side
(``attacks``). ``targets`` turns checkpoints into labelled defenses, ``evaluate`` holds one library call per
command, ``study`` runs the whole study through those calls, ``cli`` parses options and makes one call.

``benchmark`` is imported on first use, so the CLI answers ``--help`` without loading torch."""

from __future__ import annotations

from typing import Any

__all__ = ["benchmark"]


def __getattr__(name: str) -> Any:
    if name == "benchmark":
        from .api import benchmark

        return benchmark
    raise AttributeError(f"module 'suite' has no attribute {name!r}")
