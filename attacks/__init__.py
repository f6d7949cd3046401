"""robust-jem, the attack side: white-box (torchattacks), black-box (foolbox), distal adversarials, the
sweeps, typed rows, checks and the report. It needs only "a module mapping [0,1] images to logits" and never
imports the model side (``robust_jem``)."""

from __future__ import annotations

from pathlib import Path

from infra.provenance import code_hash as _code_hash

#: modules whose code computes attack rows (their hash enters every row key)
ATTACK_CODE = ("white.py", "autoattack.py", "adaptive.py", "verdict.py", "benchmark.py", "runner.py", "black.py", "fixed_noise.py", "curves.py",
               "distal.py", "target.py")


def code_hash() -> str:
    """Hash of the attack side's row-computing code and the seeding it relies on."""
    here = Path(__file__).parent
    return _code_hash(*(here / f for f in ATTACK_CODE), here.parent / "infra" / "randomness.py")
