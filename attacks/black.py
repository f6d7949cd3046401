"""Decision-based (black-box) attacks with foolbox 3: Boundary (L2) and Pointwise (L0, L2).

Both are minimization attacks (Brendel et al. 2018; Schott et al. 2019): one run gives each example's
smallest adversarial distance, so accuracy at every ε is a threshold on those distances
(:func:`accuracy_curve`). Examples where no adversarial is found keep an infinite distance and count as
robust; examples the model already gets wrong have distance 0.

Stochastic models (the SGLD-refined classifier) break foolbox's assumption that the same query gets the
same answer. :class:`FixedNoiseView` therefore hands foolbox a deterministic view in which the noise of
every example is a fixed function of (its pixel values, seed): each example's noise comes from its own
``torch.Generator`` seeded with a hash of its bytes, so the answer does not depend on the rest of the batch,
and repeated queries are served from an exact cache. Every adversarial found this way is then re-scored
with FRESH noise (``eval_draws`` independent forward passes of the real stochastic model), and rows
report both verdicts: ``acc_curve`` / ``distance_summary`` use the fresh-noise verdict with the white-box
suite's rule (robust at ε only if the clean image and the adversarial within ε are classified correctly in
every fresh pass), so black-box and white-box curves compare like with like; ``*_fixed_noise`` fields keep
what foolbox itself saw.

Runs are cut into chunks of ``batch_size`` examples, and a chunk's whole outcome (distances, both verdicts,
queries) comes from that chunk alone (:func:`attack_chunk`: foolbox's proposals and the fresh-noise draws
are seeded by (seed, chunk position)). :func:`run_blackbox` stores each finished chunk as a part
(``RUN/parts/KEY-bsB/``) and merges the parts into the rows, so:

* a killed run loses at most the chunk in progress (a re-run attacks only the missing chunks);
* under ``torchrun`` (any ``torch.distributed`` group) rank r attacks the chunks c with c % world == r and
  rank 0 writes the rows, which are the rows of a single process whatever the world size.

Model contract (no robust_jem import): ``model(x)`` maps [0,1] images (N, C, H, W) to logits (N, K);
``model(x, noise_fn=fn)`` draws every Gaussian it needs from ``fn(like)``, which returns standard normal
noise shaped like ``like``, whose leading dimension is ``copies * N`` in copy-major order (row ``r`` is a
copy of example ``r % N``, the layout of ``x.repeat(copies, ...)``). A deterministic model may ignore
``noise_fn``; a plain ``nn.Module`` without the keyword is adapted by :func:`as_noise_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .common import AttackInputError, barrier, check_images, wilson, world_position
from .records import ROWS, Parts, append_row, done_keys, read_rows, row_key, write_atomic

log = logging.getLogger(__name__)

ATTACKS = ("boundary", "pointwise")
ATTACK_NORMS: dict[str, tuple[str, ...]] = {"boundary": ("l2",), "pointwise": ("l0", "l2")}
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
NoiseModel = Callable[..., torch.Tensor]

#: default ε grids (L2 in [0,1] pixel units; L0 in changed pixel values)
DEFAULT_L2_GRID: tuple[float, ...] = tuple(round(0.1 * i, 2) for i in range(61))
DEFAULT_L0_GRID: tuple[float, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200,
                                      300, 400, 600, 800)


# ------------------------------------------------------------------------------------------------
# the fixed-noise view
# ------------------------------------------------------------------------------------------------
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


class BudgetExhausted(Exception):
    """Raised by the oracle when its call budget is spent (caught inside this module)."""


class _Oracle(nn.Module):
    """What foolbox queries: the view, counted, with an optional budget of calls.

    With ``originals`` given, it keeps for every example the closest image it has answered "adversarial"
    (lexicographic in (L0, L2), the pointwise attack's objective): every such image is a genuine
    adversarial of the view. Once ``max_calls`` calls have been answered, the next query raises
    :class:`BudgetExhausted`, and the caller takes those best images: a budget can only weaken the
    attack, never fake a success (foolbox's PointwiseAttack has no step limit of its own).
    """

    def __init__(self, view: FixedNoiseView, labels: torch.Tensor, max_calls: int | None = None,
                 on_call: Callable[[], None] | None = None, originals: torch.Tensor | None = None) -> None:
        super().__init__()
        self.view = view
        self.labels = labels
        self.max_calls = max_calls
        self.calls = 0
        self.on_call = on_call
        self.originals = originals
        self.best: torch.Tensor | None = None if originals is None else originals.clone()
        self._best_key = None if originals is None else torch.full((originals.shape[0], 2), math.inf,
                                                                      dtype=torch.float64, device=originals.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise BudgetExhausted
        self.calls += 1
        if self.on_call is not None:
            self.on_call()
        out = self.view(x)
        if self.originals is not None and x.shape == self.originals.shape:
            self._track(x.detach(), out.argmax(1) != self.labels)
        return out

    def _track(self, x: torch.Tensor, adv: torch.Tensor) -> None:
        diff = (x - self.originals).flatten(1).double()
        key = torch.stack([(diff != 0).sum(1).double(), diff.norm(dim=1)], 1)
        best = self._best_key
        better = adv & ((key[:, 0] < best[:, 0]) | ((key[:, 0] == best[:, 0]) & (key[:, 1] < best[:, 1])))
        if bool(better.any()):
            self._best_key = torch.where(better[:, None], key, best)
            self.best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x, self.best)


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's and numpy's global RNGs for a third-party call and restore them afterwards.

    Foolbox draws its proposals from the global torch RNG and its pixel orders from ``np.random``.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    state = np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


# ------------------------------------------------------------------------------------------------
# the attacks
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlackboxConfig:
    """Everything a black-box run depends on (all of it goes into the row).

    Args:
        attack: ``"boundary"`` or ``"pointwise"``.
        steps: boundary: BoundaryAttack steps; pointwise: the most oracle calls after initialisation
            (foolbox's PointwiseAttack has no step limit of its own; when the budget is spent it is stopped
            and each example keeps the closest adversarial, in (L0, L2) order, that it had reached).
        init_steps: boundary: blending steps of LinearSearchBlendedUniformNoiseAttack; pointwise: steps of
            SaltAndPepperNoiseAttack.
        init_directions: boundary: uniform-noise directions tried by the blended-noise initialisation.
        batch_size: examples attacked together (foolbox batches natively): one chunk, one part on disk.
            Chunks are seeded by their position, so results depend on it, not on the number of ranks.
        eval_draws: fresh-noise forward passes used to re-score each adversarial (M).
        seed: selects the fixed noise, foolbox's random proposals and the fresh-noise draws.
        spherical_step, source_step, step_adaptation, update_stats_every_k: BoundaryAttack settings. The
            initial steps are larger than foolbox's (0.01, 0.01), which are made for 5k-25k steps: its step
            adaptation needs ~1000 steps of statistics, so at CPU budgets the initial values rule (measured
            on the quick CE model, 30 images, 20 steps: median L2 6.55 with 0.01/0.01, 4.50 with 0.1/0.3).
        l2_binary_search: PointwiseAttack's L2 refinement phase.
        cache_size: fixed-noise answers cached (LRU), so that a repeated query gets the identical answer.
    """

    attack: str
    steps: int
    init_steps: int
    init_directions: int = 10
    batch_size: int = 100
    eval_draws: int = 5
    seed: int = 0
    spherical_step: float = 0.3
    source_step: float = 0.1
    step_adaptation: float = 1.5
    update_stats_every_k: int = 10
    l2_binary_search: bool = True
    cache_size: int = 100_000

    def validate(self) -> "BlackboxConfig":
        """Raise :class:`AttackInputError` for values no run can use; returns self."""
        if self.attack not in ATTACKS:
            raise AttackInputError(f"unknown black-box attack {self.attack!r}; choose from {', '.join(ATTACKS)}")
        for name in ("steps", "init_steps", "init_directions", "batch_size", "eval_draws", "update_stats_every_k"):
            if int(getattr(self, name)) < 1:
                raise AttackInputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.spherical_step > 0 and self.source_step > 0 and self.step_adaptation > 1):
            raise AttackInputError("boundary step sizes must be positive and step adaptation above 1")
        if self.cache_size < 1:
            raise AttackInputError(f"cache size must be >= 1 (foolbox needs repeatable answers), got {self.cache_size}")
        return self

    @property
    def norms(self) -> tuple[str, ...]:
        return ATTACK_NORMS[self.attack]

    def params(self) -> dict[str, Any]:
        """The attack's parameters for rows (only those that apply to this attack)."""
        d = asdict(self)
        if self.attack == "pointwise":
            for k in ("init_directions", "spherical_step", "source_step", "step_adaptation", "update_stats_every_k"):
                d.pop(k)
        else:
            d.pop("l2_binary_search")
        return d

    def foolbox_attacks(self) -> tuple[Any, Any]:
        """(initialisation attack, main attack) as configured foolbox objects."""
        import foolbox as fb

        if self.attack == "boundary":
            init = fb.attacks.LinearSearchBlendedUniformNoiseAttack(directions=self.init_directions,
                                                                    steps=self.init_steps)
            main = fb.attacks.BoundaryAttack(steps=self.steps, spherical_step=self.spherical_step,
                                             source_step=self.source_step, step_adaptation=self.step_adaptation,
                                             update_stats_every_k=self.update_stats_every_k)
        else:
            init = fb.attacks.SaltAndPepperNoiseAttack(steps=self.init_steps)
            main = fb.attacks.PointwiseAttack(l2_binary_search=self.l2_binary_search)
        return init, main


@dataclass
class BlackboxResult:
    """Per-example outcome of a black-box run or of one chunk of it (N examples).

    Attributes:
        adversarials: (N, C, H, W) best adversarial per example (the clean image where none was found);
            None when rebuilt from parts (:meth:`from_part`), which keep only what rows are made of.
        found: (N,) bool, fixed-noise verdict: the fixed-noise view misclassifies ``adversarials``
            (True with distance 0 for examples it already misclassifies clean).
        distances: norm -> (N,) distance of ``adversarials`` to the clean image, ``inf`` where not found.
        fresh_misclassified: (N,) fraction of ``eval_draws`` fresh-noise forward passes that misclassify
            ``adversarials`` (NaN where none was found; one pass for a deterministic model).
        clean_correct_fixed: (N,) bool, clean image classified correctly by the fixed-noise view.
        clean_correct_fresh: (N,) fraction of fresh-noise passes classifying the clean image correctly.
        queries: (N,) oracle queries spent on each example (cache hits included).
        model_evals: examples actually run through the model (cache misses), in total.
        wall_s: seconds spent (summed over chunks).
        init_failed: examples whose initialisation found no adversarial.
    """

    adversarials: torch.Tensor | None
    found: torch.Tensor
    distances: dict[str, torch.Tensor]
    fresh_misclassified: torch.Tensor
    clean_correct_fixed: torch.Tensor
    clean_correct_fresh: torch.Tensor
    queries: torch.Tensor
    model_evals: int
    wall_s: float
    init_failed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def fresh_verdict(self) -> torch.Tensor:
        """(N,) bool: the adversarial is misclassified in at least one fresh-noise pass."""
        return self.found & (torch.nan_to_num(self.fresh_misclassified, nan=0.0) > 0)

    def distances_fresh(self, norm: str) -> torch.Tensor:
        """Distances under the fresh-noise verdict, the white-box suite's rule: an example is robust at ε
        only if its clean image and its adversarial (when within ε) are classified correctly in every
        fresh-noise pass. So: 0 where the clean image fails a pass, the adversarial's distance where it
        fails a pass, ``inf`` otherwise."""
        d = self.distances[norm]
        d = torch.where(self.fresh_verdict, d, torch.full_like(d, math.inf))
        return torch.where(self.clean_correct_fresh < 1, torch.zeros_like(d), d)

    def to_part(self) -> dict[str, Any]:
        """The outcome as JSON (``inf`` and NaN as null), without the adversarial images; exact for floats."""
        return {"found": self.found.tolist(), "distances": {k: _json_dist(d) for k, d in self.distances.items()},
                "fresh_misclassified": [None if math.isnan(v) else v for v in self.fresh_misclassified.tolist()],
                "clean_correct_fixed": self.clean_correct_fixed.tolist(),
                "clean_correct_fresh": self.clean_correct_fresh.tolist(), "queries": self.queries.tolist(),
                "model_evals": self.model_evals, "wall_s": self.wall_s, "init_failed": self.init_failed}

    @classmethod
    def from_part(cls, piece: dict[str, Any]) -> "BlackboxResult":
        """Inverse of :meth:`to_part` (``adversarials`` is None)."""
        def f64(values: list[float | None], missing: float) -> torch.Tensor:
            return torch.tensor([missing if v is None else v for v in values], dtype=torch.float64)

        return cls(adversarials=None, found=torch.tensor(piece["found"], dtype=torch.bool),
                   distances={k: f64(v, math.inf) for k, v in piece["distances"].items()},
                   fresh_misclassified=f64(piece["fresh_misclassified"], math.nan),
                   clean_correct_fixed=torch.tensor(piece["clean_correct_fixed"], dtype=torch.bool),
                   clean_correct_fresh=f64(piece["clean_correct_fresh"], math.nan),
                   queries=torch.tensor(piece["queries"], dtype=torch.long), model_evals=int(piece["model_evals"]),
                   wall_s=float(piece["wall_s"]), init_failed=int(piece["init_failed"]))

    @classmethod
    def merge(cls, chunks: Sequence["BlackboxResult"]) -> "BlackboxResult":
        """The outcome of a run from those of its chunks, in order (counts and times summed)."""
        if not chunks:
            raise ValueError("no chunks to merge")
        advs = [c.adversarials for c in chunks]
        init_failed = sum(c.init_failed for c in chunks)
        notes = ([f"initialisation found no adversarial for {init_failed} examples (counted robust)"]
                 if init_failed else [])
        return cls(adversarials=None if any(a is None for a in advs) else torch.cat(advs),  # type: ignore[arg-type]
                   found=torch.cat([c.found for c in chunks]),
                   distances={k: torch.cat([c.distances[k] for c in chunks]) for k in chunks[0].distances},
                   fresh_misclassified=torch.cat([c.fresh_misclassified for c in chunks]),
                   clean_correct_fixed=torch.cat([c.clean_correct_fixed for c in chunks]),
                   clean_correct_fresh=torch.cat([c.clean_correct_fresh for c in chunks]),
                   queries=torch.cat([c.queries for c in chunks]), model_evals=sum(c.model_evals for c in chunks),
                   wall_s=sum(c.wall_s for c in chunks), init_failed=init_failed, notes=notes)


def distances(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example L0 (changed values) or L2 distance; shape (N,)."""
    diff = (x_adv - x).reshape(x.shape[0], -1).double()
    if norm == "l0":
        return (diff != 0).sum(1).double()
    if norm == "l2":
        return diff.norm(dim=1)
    raise AttackInputError(f"unknown norm {norm!r} for distances; use l0 or l2")


@torch.no_grad()
def fresh_misclassification(model: NoiseModel, x: torch.Tensor, y: torch.Tensor, draws: int,
                            generator: torch.Generator, batch_size: int = 100) -> torch.Tensor:
    """Fraction of ``draws`` fresh-noise forward passes that misclassify each example; shape (N,)."""
    if getattr(model, "deterministic", False):
        draws = 1
    wrong = torch.zeros(x.shape[0], dtype=torch.float64)
    fn = fresh_noise(generator)
    for _ in range(draws):
        for i in range(0, x.shape[0], batch_size):
            pred = model(x[i:i + batch_size], noise_fn=fn).argmax(1)
            wrong[i:i + batch_size] += (pred != y[i:i + batch_size]).double().cpu()
    return wrong / draws


def _foolbox_chunk(view: FixedNoiseView, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, seed: int,
                   on_call: Callable[[], None] | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run init + main attack on one batch. Returns (candidate adversarials, queries per example, init fails).

    Clean-misclassified examples are not attacked (their adversarial is the clean image); examples whose
    initialisation fails keep the clean image (the caller's check marks them not found).
    """
    import foolbox as fb

    init_attack, main_attack = cfg.foolbox_attacks()
    queries = torch.zeros(x.shape[0], dtype=torch.long)
    oracle = _Oracle(view, y, on_call=on_call).eval()
    clean_wrong = (oracle(x).argmax(1) != y).cpu()
    todo = (~clean_wrong).nonzero().flatten()
    adv = x.clone()
    if todo.numel() == 0:
        queries += oracle.calls
        return adv, queries, 0
    idx = todo.to(x.device)
    xs, ys = x[idx], y[idx]
    oracle_t = _Oracle(view, ys, on_call=on_call).eval()
    fmodel = fb.PyTorchModel(oracle_t, bounds=(0, 1), device=x.device)
    criterion = fb.criteria.Misclassification(ys)
    with seeded_global_rngs(seed), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        starts = init_attack.run(fmodel, xs, criterion).clamp(0, 1)
        ok = (oracle_t(starts).argmax(1) != ys)
        for w in caught:
            log.debug("foolbox: %s", w.message)
        init_calls = oracle_t.calls
        ok_idx = ok.nonzero().flatten()
        main_calls = 0
        if ok_idx.numel():
            budget = cfg.steps if cfg.attack == "pointwise" else None
            oracle_m = _Oracle(view, ys[ok_idx], max_calls=budget, on_call=on_call,
                               originals=xs[ok_idx] if budget is not None else None).eval()
            fmodel_m = fb.PyTorchModel(oracle_m, bounds=(0, 1), device=x.device)
            try:
                found = main_attack.run(fmodel_m, xs[ok_idx], fb.criteria.Misclassification(ys[ok_idx]),
                                        starting_points=starts[ok_idx])
            except BudgetExhausted:
                # the closest adversarial each example has reached (the starting point if none closer)
                found = torch.where(torch.isinf(oracle_m._best_key[:, 0]).view(-1, *([1] * (xs.dim() - 1))),
                                    starts[ok_idx], oracle_m.best)
            main_calls = oracle_m.calls
            starts = starts.clone()
            starts[ok_idx] = found.clamp(0, 1)
    adv[idx[ok_idx]] = starts[ok_idx]
    queries += oracle.calls
    queries[todo] += init_calls
    queries[todo[ok_idx.cpu()]] += main_calls
    return adv, queries, int(todo.numel() - ok_idx.numel())


def _fresh_seed(seed: int, chunk: int, offset: int) -> int:
    """Seed of chunk ``chunk``'s fresh-noise stream ``offset``. Chunks are 2**32 apart, and chunk 0 keeps the
    seed of the former whole-set stream (``seed + offset``), so a run in one chunk draws what it always did."""
    return seed + offset + chunk * 2**32


def attack_chunk(model: NoiseModel, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, chunk: int, *,
                 on_call: Callable[[], None] | None = None) -> BlackboxResult:
    """Attack one chunk of a run and score it: the chunk's whole outcome, from the chunk alone.

    Chunk ``c`` holds examples ``c * cfg.batch_size`` onwards. It is seeded by (``cfg.seed``, ``c``) only:
    foolbox's proposals by ``cfg.seed * 100_003 + c``, the fresh-noise re-scoring by ``cfg.seed + 1_000_003``
    (adversarials) and ``cfg.seed + 2_000_003`` (clean images), each plus ``c * 2**32``. It has its own
    fixed-noise view (an example's noise is a function of its bytes anyway), so its numbers do not depend
    on which process computes it or on what ran before.

    Args:
        model: ``model(x, noise_fn=None)`` -> logits (adapted by :func:`as_noise_model`).
        x, y: the chunk's images in [0,1] (n, C, H, W) and labels (n,), on the model's device.
        cfg: the attack and its budgets.
        chunk: the chunk's position in the run.
        on_call: called at every oracle query (progress).

    Returns:
        The chunk's :class:`BlackboxResult` (``notes`` are left to :meth:`BlackboxResult.merge`).
    """
    model = as_noise_model(model)
    t0 = time.perf_counter()
    view = FixedNoiseView(model, seed=cfg.seed, cache_size=cfg.cache_size).eval()
    adv, queries, init_failed = _foolbox_chunk(view, x, y, cfg, seed=cfg.seed * 100_003 + chunk, on_call=on_call)
    # the fixed-noise verdict, re-checked on the final images (cached answers: identical to foolbox's)
    with torch.no_grad():
        clean_fixed = (view(x).argmax(1) == y).cpu()
        found = (view(adv).argmax(1) != y).cpu()
    dists = {}
    for norm in cfg.norms:
        d = distances(x, adv, norm).cpu()
        dists[norm] = torch.where(found, d, torch.full_like(d, math.inf))
    # fresh noise: seeds that differ from the view's; the clean draws do not depend on the attack, so the
    # clean verdict is the same in every row of a model
    g_adv = torch.Generator(device=x.device).manual_seed(_fresh_seed(cfg.seed, chunk, 1_000_003))
    fresh_adv = fresh_misclassification(model, adv, y, cfg.eval_draws, g_adv, cfg.batch_size)
    fresh_adv = torch.where(found, fresh_adv, torch.full_like(fresh_adv, math.nan))
    g_clean = torch.Generator(device=x.device).manual_seed(_fresh_seed(cfg.seed, chunk, 2_000_003))
    fresh_clean = 1.0 - fresh_misclassification(model, x, y, cfg.eval_draws, g_clean, cfg.batch_size)
    return BlackboxResult(adversarials=adv.detach(), found=found, distances=dists, fresh_misclassified=fresh_adv,
                          clean_correct_fixed=clean_fixed, clean_correct_fresh=fresh_clean, queries=queries,
                          model_evals=view.evaluated, wall_s=time.perf_counter() - t0, init_failed=init_failed)


def _checked(model: NoiseModel, x: torch.Tensor, y: torch.Tensor,
             cfg: BlackboxConfig) -> tuple[NoiseModel, torch.Tensor]:
    """Validate a run's inputs; the adapted model and the labels on the images' device."""
    cfg.validate()
    check_images(x)
    if x.shape[0] < 1:
        raise AttackInputError("no examples to attack")
    if y.shape != (x.shape[0],):
        raise AttackInputError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    return as_noise_model(model), y.to(x.device)


def _run_chunks(model: NoiseModel, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, chunks: Sequence[int], *,
                progress: bool) -> Iterator[tuple[int, BlackboxResult]]:
    """Attack ``chunks`` of the run on (x, y) in order, yielding (chunk, outcome) as each finishes."""
    from tqdm.auto import tqdm

    per_chunk = (cfg.init_directions + cfg.init_steps + cfg.steps + cfg.steps // cfg.update_stats_every_k + 3
                 if cfg.attack == "boundary" else cfg.init_steps + cfg.steps + 3)
    bar = tqdm(total=per_chunk * len(chunks), desc=f"{cfg.attack} queries", unit="q", disable=not progress,
               leave=False)
    bs = cfg.batch_size
    try:
        for c in chunks:
            yield c, attack_chunk(model, x[c * bs:(c + 1) * bs], y[c * bs:(c + 1) * bs], cfg, c,
                                  on_call=lambda: bar.update(1))
    finally:
        bar.close()


def blackbox_attack(model: NoiseModel, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, *,
                    progress: bool = True) -> BlackboxResult:
    """Run a foolbox minimization attack on the fixed-noise view of ``model``; re-score with fresh noise.

    The examples are attacked in chunks of ``cfg.batch_size`` (:func:`attack_chunk`), each seeded by its
    own position, and the chunks' outcomes merged.

    Args:
        model: ``model(x, noise_fn=None)`` -> logits (a plain deterministic module works too).
        x: clean images in [0,1], (N, C, H, W), on the model's device.
        y: labels, (N,).
        cfg: the attack and its budgets.
        progress: tqdm bar of oracle calls.

    Returns:
        A :class:`BlackboxResult`; every adversarial in it has been re-checked on the fixed-noise view
        (``found``) and re-scored with ``cfg.eval_draws`` fresh-noise passes.
    """
    model, y = _checked(model, x, y, cfg)
    chunks = range(math.ceil(x.shape[0] / cfg.batch_size))
    return BlackboxResult.merge([res for _, res in _run_chunks(model, x, y, cfg, chunks, progress=progress)])


# ------------------------------------------------------------------------------------------------
# from distances to curves and rows
# ------------------------------------------------------------------------------------------------
def accuracy_curve(dist: torch.Tensor | Sequence[float], eps_grid: Sequence[float]) -> list[dict[str, float]]:
    """Robust accuracy at each ε: the fraction of examples whose smallest adversarial distance exceeds ε.

    An example with distance ``d`` is broken at every ε >= d (``inf``: never), so the curve is
    non-increasing in ε. Each point carries a 95 % Wilson interval.
    """
    d = torch.as_tensor(dist, dtype=torch.float64).flatten()
    n = int(d.numel())
    out = []
    for eps in eps_grid:
        robust = int((d > float(eps)).sum())
        lo, hi = wilson(robust, n)
        out.append({"eps": float(eps), "acc": robust / n if n else 0.0, "ci_low": lo, "ci_high": hi})
    return out


def distance_summary(dist: torch.Tensor | Sequence[float]) -> dict[str, Any]:
    """Median and quantiles over all examples (``inf`` = none found; an infinite quantile is None)."""
    d = torch.as_tensor(dist, dtype=torch.float64).flatten().numpy()
    finite = d[np.isfinite(d)]
    n = int(d.size)
    big = 1e300  # stands for inf, so that interpolating towards a missing adversarial gives "infinite"

    def q(p: float) -> float | None:
        if n == 0:
            return None
        v = float(np.quantile(np.where(np.isfinite(d), d, big), p))
        return v if v < big / 10 else None

    return {"n": n, "n_found": int(finite.size), "n_not_found": n - int(finite.size),
            "median": q(0.5), "q10": q(0.1), "q25": q(0.25), "q75": q(0.75), "q90": q(0.9),
            "mean_found": float(finite.mean()) if finite.size else None,
            "min": float(finite.min()) if finite.size else None}


def _json_dist(d: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in d.tolist()]


def blackbox_keys(cfg: BlackboxConfig, identity: dict[str, Any], n_examples: int) -> dict[str, str]:
    """norm -> row key of each row a run of ``cfg`` writes (for resuming)."""
    return {norm: row_key({"kind": "blackbox", "attack": cfg.attack, "norm": norm, "n_examples": n_examples,
                           **cfg.params(), **identity}) for norm in cfg.norms}


def run_blackbox(model: NoiseModel, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, *,
                 out_dir: str | os.PathLike, identity: dict[str, Any], extra: dict[str, Any] | None = None,
                 eps_grids: dict[str, Sequence[float]] | None = None, indices: Sequence[int] | None = None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """Attack one model, write one row per norm to ``out_dir/rows.jsonl`` and its distances side file.

    Each chunk's outcome is stored as a part (``out_dir/parts/KEY-bsB/``) as soon as it is done, so a
    re-run attacks only the missing chunks. Under ``torch.distributed`` (every rank calls this with the
    same arguments) rank r attacks the chunks c with c % world == r, and rank 0 merges the parts into the
    rows; the rows are those of a single process whatever the world size (each chunk is seeded by its
    position, see :func:`attack_chunk`).

    Args:
        model, x, y, cfg: as for :func:`blackbox_attack`.
        out_dir: the run directory (``rows.jsonl``, ``distances-<key>.json``, ``parts/``).
        identity: fields that define the model under attack (label ``model``, checkpoint sha256, SGLD
            settings ...); they enter the row key, so a re-run skips finished rows.
        extra: provenance fields for the row (git sha, device, timestamp, checkpoint path ...).
        eps_grids: norm -> ε grid of the accuracy curves (defaults: :data:`DEFAULT_L2_GRID`, L0 grid).
        indices: data-set indices of ``x`` (for the side file).
        progress: tqdm bar of oracle calls (rank 0 only).

    Returns:
        The rows written, read back on every rank ([] when every row of this run already exists).
    """
    model, y = _checked(model, x, y, cfg)
    out = Path(out_dir)
    n = int(x.shape[0])
    keys = blackbox_keys(cfg, identity, n)
    n_chunks = math.ceil(n / cfg.batch_size)
    parts = Parts(out, f"{row_key({'blackbox_rows': sorted(keys.values())})}-bs{cfg.batch_size}", n_chunks)
    rank, world = world_position()
    done = done_keys(out / ROWS)
    pending = [k for k in keys.values() if k not in done]
    if not pending:
        log.info("%s %s: rows already present, skipping", identity.get("model"), cfg.attack)
        if rank == 0:
            parts.remove()  # left by a kill between the last append and the clean-up
        return []
    on_disk = {c for c in range(n_chunks) if parts.has(c)}
    mine = [c for c in range(rank, n_chunks, world) if c not in on_disk]
    if rank == 0:
        log.info("%s %s: %d chunks of %d, %d on disk already%s", identity.get("model"), cfg.attack, n_chunks,
                 cfg.batch_size, len(on_disk), f"; shared over {world} ranks" if world > 1 else "")
    for c, res in _run_chunks(model, x, y, cfg, mine, progress=progress and rank == 0):
        parts.write(c, {**res.to_part(), "shard": f"{rank}/{world}", "device": str(x.device)})
    barrier()
    if rank == 0:
        pieces = parts.read_all()
        if pieces is None:  # a rank failed to write its part (it raised, so torchrun stops the job)
            raise RuntimeError(f"parts of the {cfg.attack} rows of {identity.get('model')} are missing in {parts.dir}")
        res = BlackboxResult.merge([BlackboxResult.from_part(p) for p in pieces])
        _write_rows(model, res, y, cfg, out, keys, identity=identity, extra=extra, eps_grids=eps_grids,
                    indices=indices, shards=sorted({p["shard"] for p in pieces}))
        parts.remove()
    barrier()  # every row is in the file before anyone reads it back
    wanted = set(pending)
    return [r for r in read_rows(out / ROWS) if r.get("key") in wanted]


def _write_rows(model: NoiseModel, res: BlackboxResult, y: torch.Tensor, cfg: BlackboxConfig, out: Path,
                keys: dict[str, str], *, identity: dict[str, Any], extra: dict[str, Any] | None,
                eps_grids: dict[str, Sequence[float]] | None, indices: Sequence[int] | None,
                shards: list[str]) -> None:
    """Append the rows of ``keys`` not yet in ``out/rows.jsonl``, each after its distances side file."""
    n = int(y.shape[0])
    out.mkdir(parents=True, exist_ok=True)
    grids = {"l2": DEFAULT_L2_GRID, "l0": DEFAULT_L0_GRID, **(eps_grids or {})}
    done = done_keys(out / ROWS)
    fresh_conf = res.fresh_verdict
    draws = 1 if getattr(model, "deterministic", False) else cfg.eval_draws
    for norm, key in keys.items():
        if key in done:
            continue
        d, d_fresh = res.distances[norm], res.distances_fresh(norm)
        side = out / f"distances-{key}.json"
        write_atomic(side, json.dumps({
            "key": key, "model": identity.get("model"), "attack": cfg.attack, "norm": norm,
            "indices": list(map(int, indices)) if indices is not None else list(range(n)),
            "labels": y.cpu().tolist(),
            "distance_fixed_noise": _json_dist(d),
            "distance_fresh_noise": _json_dist(d_fresh),
            "verdicts": "fixed_noise: what foolbox saw (noise a fixed function of the input); fresh_noise: "
                        "robust only if clean and adversarial are correct in every fresh-noise pass",
            "fresh_misclassified_frac": [None if math.isnan(v) else v for v in res.fresh_misclassified.tolist()],
            "clean_correct_fixed_noise": res.clean_correct_fixed.tolist(),
            "clean_correct_fresh_frac": res.clean_correct_fresh.tolist(),
            "queries": res.queries.tolist(),
            "note": "null distance = no adversarial found (counted robust at every ε)",
        }, allow_nan=False))
        grid = [float(e) for e in grids[norm]]
        curve = accuracy_curve(d_fresh, grid)
        row = {
            "key": key, "kind": "blackbox", "attack": cfg.attack, "norm": norm, **identity,
            "n": n, "n_examples": n, "attack_params": cfg.params(),
            "attack_repr": [repr(a) for a in cfg.foolbox_attacks()],
            "seed": cfg.seed, "eps_grid": grid,
            # the verdict of the curve used by plots: fresh noise, same rule as the white-box rows
            "verdict": "fresh_noise",
            "verdict_rule": (f"robust at ε only if the clean image and the adversarial found within ε are "
                             f"classified correctly in all {draws} fresh-noise forward passes"),
            "acc_curve": curve,
            "distance_summary": distance_summary(d_fresh),
            "clean_acc": float((res.clean_correct_fresh == 1).double().mean()),
            "clean_acc_fresh_noise_mean": float(res.clean_correct_fresh.mean()),
            "n_adversarial_fresh_noise": int(fresh_conf.sum()),
            "fresh_misclassified_frac_mean": (float(np.nanmean(res.fresh_misclassified.numpy()))
                                              if bool(res.found.any()) else None),
            # what foolbox saw: the fixed-noise view (noise a fixed function of the input)
            "acc_curve_fixed_noise": accuracy_curve(d, grid),
            "distance_summary_fixed_noise": distance_summary(d),
            "clean_acc_fixed_noise": float(res.clean_correct_fixed.double().mean()),
            "n_adversarial_fixed_noise": int(res.found.sum()),
            "eval_draws": cfg.eval_draws, "eval_draws_used": draws,
            "init_failed": res.init_failed,
            "queries_per_example": float(res.queries.double().mean()),
            "queries_per_example_max": int(res.queries.max()),
            "model_evals_per_example": res.model_evals / n,
            "wall_s": res.wall_s, "wall_s_per_example": res.wall_s / n,
            "distances_file": side.name, "shards": shards, "notes": res.notes, **(extra or {}),
        }
        append_row(out / ROWS, row)
