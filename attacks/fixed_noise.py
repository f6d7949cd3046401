"""The fixed-noise view: a deterministic face of a randomized model, for decision-based attacks.

Stochastic models (the SGLD-refined classifier) break foolbox's assumption that the same query gets the
same answer. :class:`FixedNoiseView` hands foolbox a deterministic view in which the noise of every example
is a fixed function of (its pixel values, seed): each example's noise comes from its own
``torch.Generator`` seeded with a hash of its bytes, so the answer does not depend on the rest of the
batch, and repeated queries are served from an exact cache.

Model contract (no robust_jem import): ``model(x)`` maps [0,1] images (N, C, H, W) to logits (N, K);
``model(x, noise_fn=fn)`` draws every Gaussian it needs from ``fn(like)``, which returns standard normal
noise shaped like ``like``, whose leading dimension is ``copies * N`` in copy-major order (row ``r`` is a
copy of example ``r % N``, the layout of ``x.repeat(copies, ...)``). A deterministic model may ignore
``noise_fn``; a plain ``nn.Module`` without the keyword is adapted by :func:`as_noise_model`.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

NoiseFn = Callable[[torch.Tensor], torch.Tensor]
NoiseModel = Callable[..., torch.Tensor]


class PerExampleNoise:
    """A ``noise_fn`` drawing each example's noise from its own generator.

    Args:
        seeds: one seed per example of the batch (N of them).
        device: where the generators live.

    Shape: called with ``like`` of shape (copies * N, ...) (copy-major) -> noise of the same shape, where
    example ``j``'s rows depend only on ``seeds[j]`` and the sequence of shapes requested.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        n = len(self.generators)
        if like.shape[0] % n:
            raise ValueError(f"noise requested for {like.shape[0]} rows, not a multiple of the batch size {n}")
        shape = (like.shape[0] // n, *like.shape[1:])
        draws = [torch.randn(shape, generator=g, device=like.device, dtype=like.dtype) for g in self.generators]
        return torch.stack(draws, 1).reshape(like.shape)


def fresh_noise(generator: torch.Generator) -> NoiseFn:
    """A ``noise_fn`` drawing ordinary fresh noise from ``generator`` (the model's real randomness)."""
    return lambda like: torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def as_noise_model(model: Callable[[torch.Tensor], torch.Tensor]) -> NoiseModel:
    """Adapt a plain ``model(x)`` to the ``model(x, noise_fn=...)`` contract.

    A model whose forward takes ``noise_fn`` is returned unchanged. Any other model cannot have its noise
    fixed; it is wrapped as deterministic, with a warning unless it says ``deterministic = True``.
    """
    target = model.forward if isinstance(model, nn.Module) else model
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "noise_fn" in params:
        return model
    if not getattr(model, "deterministic", False):
        warnings.warn(f"{type(model).__name__} takes no noise_fn: treated as deterministic; if it is random, "
                      "decision-based attacks will see inconsistent answers", stacklevel=2)

    def call(x: torch.Tensor, noise_fn: NoiseFn | None = None) -> torch.Tensor:
        return model(x)

    call.deterministic = True  # type: ignore[attr-defined]
    return call


class FixedNoiseView(nn.Module):
    """Deterministic view of a stochastic model: the noise is a function of (example bytes, seed).

    Each example is hashed (BLAKE2b of its float bytes, keyed by ``seed``); the hash seeds that example's
    own generator (:class:`PerExampleNoise`), so the answer for an image never depends on the batch it
    came with. Answers are cached by hash (LRU, ``cache_size`` entries), so a repeated query returns the
    identical logits and costs nothing; foolbox's own success checks therefore hold exactly.

    Args:
        model: ``model(x, noise_fn=...) -> logits`` (see the module docstring).
        seed: selects the fixed noise (another seed is another deterministic view).
        cache_size: answers kept (0 disables the cache; attacks need it on).

    Attributes:
        calls: forward calls (each is one query per example of the batch).
        evaluated: examples actually run through the model (cache misses).

    Shape: (N, C, H, W) in [0,1] -> (N, K) logits.
    """

    def __init__(self, model: NoiseModel, seed: int = 0, cache_size: int = 100_000) -> None:
        super().__init__()
        self.model = model
        self.seed = int(seed)
        self.cache_size = int(cache_size)
        self._key = hashlib.sha256(f"fixed-noise-view:{self.seed}".encode()).digest()[:32]
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.calls = 0
        self.evaluated = 0

    def extra_repr(self) -> str:
        return f"seed={self.seed}, cache_size={self.cache_size}"

    def example_keys(self, x: torch.Tensor) -> list[bytes]:
        """One 16-byte digest per example (``-0.0`` and ``0.0`` hash alike)."""
        flat = (x.detach() + 0.0).reshape(x.shape[0], -1).cpu().contiguous().numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16, key=self._key).digest() for row in flat]

    @staticmethod
    def example_seed(key: bytes) -> int:
        """The generator seed of an example with digest ``key``."""
        return int.from_bytes(key[:8], "little") & (2**63 - 1)

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        keys = self.example_keys(x)
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in first and k not in self._cache:
                first[k] = i
        fresh: dict[bytes, torch.Tensor] = {}
        if first:
            idx = list(first.values())
            seeds = [self.example_seed(keys[i]) for i in idx]
            logits = self.model(x[idx], noise_fn=PerExampleNoise(seeds, x.device)).detach()
            self.evaluated += len(idx)
            for k, row in zip(first, logits):
                fresh[k] = row.clone()
        rows = []
        for k in keys:
            row = fresh.get(k)
            if row is None:
                row = self._cache[k]
                self._cache.move_to_end(k)
            rows.append(row)
        if self.cache_size > 0:
            for k, row in fresh.items():
                self._cache[k] = row
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return torch.stack(rows)
