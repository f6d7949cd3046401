"""Decision-based (black-box) attacks with foolbox 3: Boundary (L2) and Pointwise (L0, L2).

Both are minimization attacks (Brendel et al. 2018; Schott et al. 2019): one run gives each example's
smallest adversarial distance, so accuracy at every ε is a threshold on those distances
(:mod:`attacks.curves`). Examples where no adversarial is found keep an infinite distance and count as
robust; examples the model already gets wrong have distance 0.

foolbox queries the deterministic fixed-noise view of the model (:mod:`attacks.fixed_noise`) through an
oracle that counts queries. Every adversarial found this way is then re-scored with the suite's one
:class:`attacks.verdict.Verdict` (fresh noise, the same rule as the white-box rows); rows report both
verdicts: ``acc_curve`` / ``distance_summary`` use the fresh-noise verdict, ``*_fixed_noise`` fields keep
what foolbox itself saw.

A run is cut into chunks of ``batch_size`` examples, and a chunk's whole outcome (distances, both verdicts,
queries) comes from that chunk alone (:func:`attack_chunk`: foolbox's proposals and the verdict's draws
are seeded by (seed, chunk position)); the resumable, sharded sweep over chunks is
:func:`attacks.benchmark.run_blackbox`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from infra.randomness import derive_seed, seeded

from .common import AttackInputError, check_images
from .curves import json_distances
from .fixed_noise import FixedNoiseView, NoiseModel, as_noise_model
from .verdict import EVAL_DRAWS, Verdict

log = logging.getLogger(__name__)

ATTACKS = ("boundary", "pointwise")
ATTACK_NORMS: dict[str, tuple[str, ...]] = {"boundary": ("l2",), "pointwise": ("l0", "l2")}


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

    def __init__(self, view: FixedNoiseView, labels: torch.Tensor, slots: Sequence[int], max_calls: int | None = None,
                 on_call: Callable[[], None] | None = None, originals: torch.Tensor | None = None) -> None:
        super().__init__()
        self.view = view
        self.labels = labels
        self.slots = [int(v) for v in slots]
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
        out = self.view(x, self.slots)
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
        view_seeds: fixed-noise views tried in turn for the examples the previous views could not attack.
    """

    attack: str
    steps: int
    init_steps: int
    init_directions: int = 10
    batch_size: int = 100
    eval_draws: int = EVAL_DRAWS
    seed: int = 0
    spherical_step: float = 0.3
    source_step: float = 0.1
    step_adaptation: float = 1.5
    update_stats_every_k: int = 10
    l2_binary_search: bool = True
    cache_size: int = 100_000
    view_seeds: int = 2

    def validate(self) -> "BlackboxConfig":
        """Raise :class:`AttackInputError` for values no run can use; returns self."""
        if self.attack not in ATTACKS:
            raise AttackInputError(f"unknown black-box attack {self.attack!r}; choose from {', '.join(ATTACKS)}")
        for name in ("steps", "init_steps", "init_directions", "batch_size", "eval_draws", "update_stats_every_k",
                     "view_seeds"):
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
        status: per example, whether a view attacked it (:data:`ATTACKED`) or why none could.
        view_seeds: per example, the seed of the fixed-noise view whose adversarial it keeps (None where no
            view attacked it): ``FixedNoiseView(model, seed)`` reproduces what foolbox saw.
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
    status: list[str] = field(default_factory=list)
    view_seeds: list[int | None] = field(default_factory=list)

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
        return {"found": self.found.tolist(), "distances": {k: json_distances(d) for k, d in self.distances.items()},
                "fresh_misclassified": [None if math.isnan(v) else v for v in self.fresh_misclassified.tolist()],
                "clean_correct_fixed": self.clean_correct_fixed.tolist(),
                "clean_correct_fresh": self.clean_correct_fresh.tolist(), "queries": self.queries.tolist(),
                "model_evals": self.model_evals, "wall_s": self.wall_s, "init_failed": self.init_failed,
                "status": self.status, "view_seeds": self.view_seeds}

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
                   wall_s=float(piece["wall_s"]), init_failed=int(piece["init_failed"]),
                   status=list(piece.get("status", [])), view_seeds=list(piece.get("view_seeds", [])))

    @classmethod
    def merge(cls, chunks: Sequence["BlackboxResult"]) -> "BlackboxResult":
        """The outcome of a run from those of its chunks, in order (counts and times summed)."""
        if not chunks:
            raise ValueError("no chunks to merge")
        advs = [c.adversarials for c in chunks]
        init_failed = sum(c.init_failed for c in chunks)
        status = [v for c in chunks for v in c.status]
        not_attacked = sum(v != ATTACKED for v in status)
        notes = ([f"{not_attacked} examples could not be attacked under any view ({init_failed} initialisation "
                  f"failures): no information about them (the headline ignores them)"] if not_attacked else [])
        return cls(adversarials=None if any(a is None for a in advs) else torch.cat(advs),  # type: ignore[arg-type]
                   found=torch.cat([c.found for c in chunks]),
                   distances={k: torch.cat([c.distances[k] for c in chunks]) for k in chunks[0].distances},
                   fresh_misclassified=torch.cat([c.fresh_misclassified for c in chunks]),
                   clean_correct_fixed=torch.cat([c.clean_correct_fixed for c in chunks]),
                   clean_correct_fresh=torch.cat([c.clean_correct_fresh for c in chunks]),
                   queries=torch.cat([c.queries for c in chunks]), model_evals=sum(c.model_evals for c in chunks),
                   wall_s=sum(c.wall_s for c in chunks), init_failed=init_failed, notes=notes, status=status,
                   view_seeds=[v for c in chunks for v in c.view_seeds])


def distances(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example L0 (changed values) or L2 distance; shape (N,)."""
    diff = (x_adv - x).reshape(x.shape[0], -1).double()
    if norm == "l0":
        return (diff != 0).sum(1).double()
    if norm == "l2":
        return diff.norm(dim=1)
    raise AttackInputError(f"unknown norm {norm!r} for distances; use l0 or l2")


ATTACKED, CLEAN_WRONG, INIT_FAILED = "attacked", "view misclassifies clean", "initialisation failed"


def _foolbox_chunk(view: FixedNoiseView, x: torch.Tensor, y: torch.Tensor, slots: Sequence[int],
                   cfg: BlackboxConfig, seed: int,
                   on_call: Callable[[], None] | None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Run init + main attack on one batch under one view. Returns (candidate adversarials, queries per
    example, status per example).

    Examples the view misclassifies clean are not attacked (status :data:`CLEAN_WRONG`, candidate = the
    clean image); examples whose initialisation finds no adversarial keep the clean image
    (:data:`INIT_FAILED`). Neither says anything about robustness: the caller tries another view for them.
    """
    import foolbox as fb

    init_attack, main_attack = cfg.foolbox_attacks()
    queries = torch.zeros(x.shape[0], dtype=torch.long)
    status = [ATTACKED] * x.shape[0]
    oracle = _Oracle(view, y, slots, on_call=on_call).eval()
    clean_wrong = (oracle(x).argmax(1) != y).cpu()
    for i in clean_wrong.nonzero().flatten().tolist():
        status[i] = CLEAN_WRONG
    todo = (~clean_wrong).nonzero().flatten()
    adv = x.clone()
    if todo.numel() == 0:
        queries += oracle.calls
        return adv, queries, status
    idx = todo.to(x.device)
    xs, ys = x[idx], y[idx]
    slots_t = [int(slots[i]) for i in todo.tolist()]
    oracle_t = _Oracle(view, ys, slots_t, on_call=on_call).eval()
    fmodel = fb.PyTorchModel(oracle_t, bounds=(0, 1), device=x.device)
    criterion = fb.criteria.Misclassification(ys)
    with seeded(seed), warnings.catch_warnings(record=True) as caught:
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
            oracle_m = _Oracle(view, ys[ok_idx], [slots_t[i] for i in ok_idx.tolist()], max_calls=budget,
                               on_call=on_call, originals=xs[ok_idx] if budget is not None else None).eval()
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
    failed = set(todo.tolist()) - set(todo[ok_idx.cpu()].tolist())
    for i in failed:
        status[i] = INIT_FAILED
    queries += oracle.calls
    queries[todo] += init_calls
    queries[todo[ok_idx.cpu()]] += main_calls
    return adv, queries, status


def attack_chunk(model: NoiseModel, x: torch.Tensor, y: torch.Tensor, cfg: BlackboxConfig, chunk: int, *,
                 on_call: Callable[[], None] | None = None, scorer: nn.Module | None = None,
                 slots: Sequence[int] | None = None) -> BlackboxResult:
    """Attack one chunk of a run and score it: the chunk's whole outcome, from the chunk alone.

    Chunk ``c`` holds examples ``c * cfg.batch_size`` onwards. It is seeded by (``cfg.seed``, ``c``) only:
    foolbox's proposals by (seed, view, c), the verdict's fresh draws by stream ``c`` of
    ``Verdict(cfg.eval_draws, cfg.seed)`` (the clean images and the adversarials see the same draws). Each
    example's view noise is a function of its slot (its data-set index) and the view seed, so its numbers do
    not depend on which process computes the chunk or on what ran before.

    Examples a view could not attack (it misclassifies them clean, or the initialisation found nothing) are
    attacked again under the next of ``cfg.view_seeds`` views; those no view could attack keep the status
    that says why, and carry no information about robustness.

    Args:
        model: ``model(x, noise_fn=None)`` -> logits (adapted by :func:`as_noise_model`).
        x, y: the chunk's images in [0,1] (n, C, H, W) and labels (n,), on the model's device.
        cfg: the attack and its budgets.
        chunk: the chunk's position in the run.
        on_call: called at every oracle query (progress).
        scorer: what the verdict scores with (default: ``model``).
        slots: the examples' data-set indices (default: their positions in the run).

    Returns:
        The chunk's :class:`BlackboxResult` (``notes`` are left to :meth:`BlackboxResult.merge`).
    """
    model = as_noise_model(model)
    t0 = time.perf_counter()
    n = x.shape[0]
    slots = list(range(chunk * cfg.batch_size, chunk * cfg.batch_size + n)) if slots is None else list(slots)
    adv = x.clone()
    queries = torch.zeros(n, dtype=torch.long)
    status = [CLEAN_WRONG] * n
    found = torch.zeros(n, dtype=torch.bool)
    clean_fixed = torch.zeros(n, dtype=torch.bool)
    view_seeds: list[int | None] = [None] * n
    evaluated = 0
    todo = list(range(n))
    for v in range(cfg.view_seeds):
        if not todo:
            break
        view_seed = derive_seed(cfg.seed, "view", v)
        view = FixedNoiseView(model, seed=view_seed, cache_size=cfg.cache_size).eval()
        sub = torch.tensor(todo, device=x.device)
        sub_slots = [slots[i] for i in todo]
        a, q, st = _foolbox_chunk(view, x[sub], y[sub], sub_slots, cfg, seed=derive_seed(cfg.seed, "foolbox", v, chunk),
                                  on_call=on_call)
        with torch.no_grad():  # the view's verdict on the final images (cached: identical to what foolbox saw)
            cf = (view(x[sub], sub_slots).argmax(1) == y[sub]).cpu()
            fd = (view(a, sub_slots).argmax(1) != y[sub]).cpu()
        for j, i in enumerate(todo):
            queries[i] += q[j]
            status[i] = st[j]
            if st[j] == ATTACKED:
                adv[i], found[i], clean_fixed[i], view_seeds[i] = a[j], fd[j], cf[j], view_seed
        evaluated += view.evaluated
        todo = [i for i in todo if status[i] != ATTACKED]
    for i in todo:  # no view could attack them; one that misclassifies the clean image has its adversarial at 0
        if status[i] == CLEAN_WRONG:
            found[i] = True
    dists = {}
    for norm in cfg.norms:
        d = distances(x, adv, norm).cpu()
        dists[norm] = torch.where(found, d, torch.full_like(d, math.inf))
    # the suite's verdict (fresh noise); the clean draws do not depend on the attack, so the clean verdict is
    # the same in every row of a model
    verdict = Verdict(cfg.eval_draws, cfg.seed)
    judge = scorer if scorer is not None else model
    clean_ok, adv_ok = verdict.score(judge, x, y, stream=chunk), verdict.score(judge, adv, y, stream=chunk)
    fresh_adv = (1.0 - Verdict.draw_accuracy(adv_ok)).cpu()
    fresh_adv = torch.where(found, fresh_adv, torch.full_like(fresh_adv, math.nan))
    fresh_clean = Verdict.draw_accuracy(clean_ok).cpu()
    return BlackboxResult(adversarials=adv.detach(), found=found, distances=dists, fresh_misclassified=fresh_adv,
                          clean_correct_fixed=clean_fixed, clean_correct_fresh=fresh_clean, queries=queries,
                          model_evals=evaluated, wall_s=time.perf_counter() - t0,
                          init_failed=sum(s_ == INIT_FAILED for s_ in status), status=status,
                          view_seeds=view_seeds)


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
