"""Seeds: the one way robust-jem derives seeds and runs third-party code under them.

Library code never seeds globally. Where a third-party library draws from a global RNG (torchattacks'
random starts, foolbox's proposals and numpy pixel orders), :func:`seeded` forks those RNGs, seeds them,
and restores them afterwards. The model's own noise stream (a module with ``reseed(seed)``, such as the
SGLD-refined classifier) gets a *different* derived seed than the global RNG, so the attack's random
start and the model's chain noise are never the same stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Iterator

import numpy as np
import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any JSON-able parts (stable across runs, processes and platforms)."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: the one way library code makes its own stream."""
    return torch.Generator(device=device).manual_seed(int(seed))


def generator_on(current: torch.Generator | None, seed: int, device: torch.device) -> torch.Generator:
    """``current`` when it already lives on ``device``, else a fresh stream from ``seed`` there: a module's lazily
    created noise source, made where its inputs are."""
    if current is None or current.device != torch.device(device):
        return generator(seed, device)
    return current


@contextlib.contextmanager
def seeded(seed: int, model: Any = None) -> Iterator[None]:
    """Run a block with torch's global RNGs (CPU and every CUDA device) and numpy's forked and seeded from
    ``derive_seed(seed, "global")``, and ``model.reseed(derive_seed(seed, "model"))`` when the model has
    ``reseed``. The caller's global RNG states are restored afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    g_seed = derive_seed(seed, "global")
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(g_seed)
        np.random.seed(g_seed % 2**32)
        reseed = getattr(model, "reseed", None)
        if callable(reseed):
            reseed(derive_seed(seed, "model"))
        try:
            yield
        finally:
            np.random.set_state(np_state)
