"""The fixed-noise view: a deterministic face of a randomized model, for decision-based attacks.

Stochastic models (the SGLD-refined classifier) break foolbox's assumption that the same query gets the
same answer. :class:`FixedNoiseView` hands foolbox a deterministic view in which the noise of every example
is a fixed function of (its slot in the data set, seed): each example's noise comes from its own
``torch.Generator``, so the answer does not depend on the rest of the batch nor on the example's pixels
(the view is as continuous as the model), and repeated queries are served from an exact cache.

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

from infra.randomness import derive_seed, generator

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
        self.generators = [generator(s, device) for s in seeds]

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        n = len(self.generators)
        if like.shape[0] % n:
            raise ValueError(f"noise requested for {like.shape[0]} rows, not a multiple of the batch size {n}")
        shape = (like.shape[0] // n, *like.shape[1:])
        draws = [torch.randn(shape, generator=g, device=like.device, dtype=like.dtype) for g in self.generators]
        return torch.stack(draws, 1).reshape(like.shape)


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
    """Deterministic, continuous view of a stochastic model: each example's noise is a function of its *slot*
    (its index in the data set) and the view's seed, never of its pixels.

    Example ``slot`` draws its noise from its own generator seeded by ``derive_seed(seed, "slot", slot)``
    (:class:`PerExampleNoise`), so as a decision-based attack walks the image, the noise stays put and the
    decision function it explores is the model's own, with one fixed noise draw — continuous wherever the
    model is. (Keying the noise on the pixel values instead would redraw it at every query and make the
    boundary a random scatter.) Answers are cached by (slot, pixel bytes) (LRU, ``cache_size`` entries), so
    a repeated query returns the identical logits and costs nothing; foolbox's own success checks hold
    exactly.

    Args:
        model: ``model(x, noise_fn=...) -> logits`` (see the module docstring).
        seed: selects the fixed noise (another seed is another deterministic view).
        cache_size: answers kept (0 disables the cache; attacks need it on).

    Attributes:
        calls: forward calls (each is one query per example of the batch).
        evaluated: examples actually run through the model (cache misses).

    Shape: (N, C, H, W) in [0,1] and N slots -> (N, K) logits.
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

    def example_keys(self, x: torch.Tensor, slots: Sequence[int]) -> list[bytes]:
        """One 16-byte digest of (slot, pixel bytes) per example (``-0.0`` and ``0.0`` hash alike)."""
        flat = (x.detach() + 0.0).reshape(x.shape[0], -1).cpu().contiguous().numpy()
        return [hashlib.blake2b(int(s).to_bytes(8, "little", signed=True) + row.tobytes(), digest_size=16,
                                key=self._key).digest() for s, row in zip(slots, flat)]

    def slot_seed(self, slot: int) -> int:
        """The noise seed of example ``slot`` under this view."""
        return derive_seed(self.seed, "slot", int(slot))

    def clear_cache(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, slots: Sequence[int] | None = None) -> torch.Tensor:
        """Logits of ``x`` whose rows sit in ``slots`` (default: the positions 0..N-1)."""
        slots = list(range(x.shape[0])) if slots is None else [int(s) for s in slots]
        if len(slots) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(slots)} slots")
        self.calls += 1
        keys = self.example_keys(x, slots)
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in first and k not in self._cache:
                first[k] = i
        fresh: dict[bytes, torch.Tensor] = {}
        if first:
            idx = list(first.values())
            seeds = [self.slot_seed(slots[i]) for i in idx]
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
