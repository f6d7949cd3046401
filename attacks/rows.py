"""Typed result rows: one dataclass per row kind, read and written as flat JSON objects (``rows.jsonl``).

Every producer builds its row as one of these classes and every consumer (checks, headline, report)
reads named attributes, so a renamed or missing field is an error at the producer, not a check that
silently compares nothing. Rows are built strictly (:meth:`Row.build`: a field the class does not know is an
error), and only :mod:`attacks.pipeline` builds and appends them. ``to_dict`` gives the flat JSON object;
``from_dict`` is its inverse (fields of an older version's rows travel in ``extra`` and come back out
unchanged). :func:`parse_row` picks the class from ``kind``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from infra.records import read_rows

R = TypeVar("R", bound="Row")


@dataclass(kw_only=True)
class Row:
    """Fields every row has: identity of the experiment, the defense, and provenance."""

    kind: ClassVar[str] = ""
    key: str = ""
    model: str = ""
    defense_id: str | None = None
    objective: str | None = None
    sgld_steps: int = 0
    n_chains: int = 1
    init_noise: float = 0.0
    sgld_step_size: float = 1.0
    sgld_noise: float = 0.0
    deterministic: bool = False
    grad_mode: str = "full"
    precision: str = "fp32"
    compiled: bool = False
    defense_code: str | None = None
    weights_sha256: str | None = None
    module: str | None = None
    defense_params: dict[str, Any] = field(default_factory=dict)  # a defense's own fields beyond the common ones
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    dataset: str | None = None
    data_sha256: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    code: str | None = None
    git_sha: str | None = None
    torch_version: str | None = None
    torchattacks_version: str | None = None
    foolbox_version: str | None = None
    numpy_version: str | None = None
    device: str | None = None
    python: str | None = None
    timestamp: str | None = None
    wall_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object of this row (``kind`` first, ``extra`` merged in)."""
        d = {"kind": self.kind}
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        """Inverse of :meth:`to_dict`; unknown keys go to ``extra``."""
        if d.get("kind") != cls.kind:
            raise ValueError(f"a {d.get('kind')!r} row is not a {cls.kind!r} row")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k != "kind"}
        return cls(**known, extra=extra)

    @classmethod
    def build(cls: type[R], **values: Any) -> R:
        """A row from keyword values, strictly: a value without a field of its own is an error (a renamed or
        misspelt field fails where the row is made, not in a check that then compares nothing)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def field_names(cls) -> set[str]:
        """The fields of this row class."""
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @property
    def subject(self) -> str:
        """The defense under test: its id (label + checkpoint + refinement), or the label for old rows."""
        return self.defense_id or f"{self.model}@{(self.checkpoint_sha256 or '')[:8]}"


@dataclass(kw_only=True)
class WhiteboxRow(Row):
    """One white-box attack at one (norm, ε) on one defense: per-example outcomes and summaries."""

    kind: ClassVar[str] = "whitebox"
    attack: str = ""
    attack_family: str = ""
    attack_repr: str = ""
    attack_code: str | None = None
    attack_params: dict[str, Any] = field(default_factory=dict)
    norm: str = "linf"
    eps: float = 0.0
    steps: int | None = None
    step_size: float | None = None
    step_rule: str | None = None
    restarts: int = 1
    eot: int = 1
    eot_used: int = 1
    eval_draws: int = 1
    eval_draws_used: int = 1
    verdict_seed: int = 0
    verdict_rule: str = ""
    n: int = 0
    clean_acc: float = 0.0
    clean_ci_low: float = 0.0
    clean_ci_high: float = 1.0
    clean_acc_mean: float = 0.0
    robust_acc: float = 0.0
    robust_ci_low: float = 0.0
    robust_ci_high: float = 1.0
    robust_acc_mean: float = 0.0
    robust_mean_ci_low: float = 0.0
    robust_mean_ci_high: float = 1.0
    max_delta_norm: float = 0.0
    in_bounds: bool = True
    split: str = "test"
    examples: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    images_per_s: float | None = None
    gradients_per_example: int | None = None  # attacker gradients (steps x restarts x EOT draws, summed)
    passes_per_example: int | None = None  # network forward-backward passes behind them (x chains x (1 + 2k));
    # the verdict's forward passes are not counted
    escalation: dict[str, Any] = field(default_factory=dict)  # a round of escalation on survivors: round, name
    shards: list[str] = field(default_factory=list)
    example_indices: list[int] = field(default_factory=list)
    correct: list[int] = field(default_factory=list)
    clean_correct: list[int] = field(default_factory=list)
    robust_frac: list[float] = field(default_factory=list)
    margin_trace: dict[str, list[float]] = field(default_factory=dict)


@dataclass(kw_only=True)
class BlackboxRow(Row):
    """One decision-based minimisation attack on one defense in one norm: the whole ε curve."""

    kind: ClassVar[str] = "blackbox"
    attack: str = ""
    attack_code: str | None = None
    norm: str = "l2"
    n: int = 0
    n_examples: int = 0
    examples: str = ""
    attack_params: dict[str, Any] = field(default_factory=dict)
    attack_repr: list[str] = field(default_factory=list)
    eps_grid: list[float] = field(default_factory=list)
    verdict: str = "fresh_noise"
    verdict_rule: str = ""
    acc_curve: list[dict[str, float]] = field(default_factory=list)
    distance_summary: dict[str, Any] = field(default_factory=dict)
    clean_acc: float = 0.0
    clean_acc_fresh_noise_mean: float = 0.0
    n_adversarial_fresh_noise: int = 0
    fresh_misclassified_frac_mean: float | None = None
    acc_curve_fixed_noise: list[dict[str, float]] = field(default_factory=list)
    distance_summary_fixed_noise: dict[str, Any] = field(default_factory=dict)
    clean_acc_fixed_noise: float = 0.0
    n_adversarial_fixed_noise: int = 0
    eval_draws: int = 1
    eval_draws_used: int = 1
    init_failed: int = 0
    n_not_attacked: int = 0
    queries_per_example: float = 0.0
    queries_per_example_max: int = 0
    model_evals_per_example: float = 0.0
    wall_s_per_example: float = 0.0
    distances_file: str = ""
    shards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checkpoint_step: int | None = None


@dataclass(kw_only=True)
class DistalRow(Row):
    """Distal adversarials of one defense from one start kind: confidences and log-densities."""

    kind: ClassVar[str] = "distal"
    start: str = "uniform"
    distal_params: dict[str, Any] = field(default_factory=dict)
    density_model: str | None = None
    n_images: int = 0
    threshold: float = 0.9
    conf_start: float = 0.0
    conf_result: float = 0.0
    target_prob_start: float = 0.0
    target_prob_result: float = 0.0
    frac_above_threshold_start: float = 0.0
    frac_above_threshold: float = 0.0
    frac_target_above_threshold: float = 0.0
    target_hit_result: float = 0.0
    target_prob_by_class: list[float] = field(default_factory=list)
    target_prob_trace: list[float] = field(default_factory=list)
    log_density_start: float = 0.0
    log_density_result: float = 0.0
    log_density_real: float = 0.0
    log_density_real_std: float = 0.0
    n_real: int = 0
    log_density_note: str = ""
    grid_file: str | None = None
    grid_layout: str = ""


@dataclass(kw_only=True)
class CalibrationRow(Row):
    """Calibration of one defense on the first n test images."""

    kind: ClassVar[str] = "calibration"
    n: int = 0
    n_examples: int = 0
    n_bins: int = 15
    accuracy: float = 0.0
    mean_confidence: float = 0.0
    ece: float = 0.0
    mce: float = 0.0
    nll: float = 0.0
    brier: float = 0.0
    bin_lower: list[float] = field(default_factory=list)
    bin_upper: list[float] = field(default_factory=list)
    bin_count: list[int] = field(default_factory=list)
    bin_accuracy: list[float] = field(default_factory=list)
    bin_confidence: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class OODRow(Row):
    """OOD detection of one model against one OOD set with one score."""

    kind: ClassVar[str] = "ood"
    in_set: str = ""
    out_set: str = ""
    conversion: str = "none"
    score: str = ""
    direction: str = ""
    auroc: float = 0.0
    fpr_at_tpr: float = 0.0
    tpr: float = 0.95
    in_mean: float = 0.0
    out_mean: float = 0.0
    n_in: int = 0
    n_out: int = 0


@dataclass(kw_only=True)
class CertificateRow(Row):
    """Certified (and empirical) L2 accuracy of a Gaussian-smoothed classifier at one radius."""

    kind: ClassVar[str] = "certify"
    smoothing_sigma: float = 0.0
    smoothing_n: int = 0
    smoothing_n0: int = 0
    smoothing_alpha: float = 0.0
    smoothing_forward_draws: int = 0
    smoothing_forward: str = ""
    smoothing_seed: int = 0
    radius: float = 0.0
    certified_accuracy: float = 0.0
    certified_ci_low: float = 0.0
    certified_ci_high: float = 1.0
    abstain_rate: float = 0.0
    mean_radius: float = 0.0
    acr: float = 0.0
    max_certifiable_radius: float = 0.0
    base_clean_accuracy: float = 0.0
    n_examples: int = 0
    empirical_robust_accuracy: float | None = None
    empirical_ci_low: float | None = None
    empirical_ci_high: float | None = None
    attack: str | None = None
    attack_steps: int | None = None
    attack_step_size: float | None = None
    eot_draws_per_step: int | None = None
    sanity: str | None = None
    wall_s_certify: float = 0.0
    wall_s_attack: float = 0.0


@dataclass(kw_only=True)
class SampleRow(Row):
    """Energy statistics of one set of SGLD chains (or of data) drawn from a JEM checkpoint."""

    kind: ClassVar[str] = "sample"
    chain: str = ""
    target_class: int | None = None
    steps: int = 0
    init: str = ""
    sgld_clamp: bool | None = None
    n: int = 0
    energy_mean: float = 0.0
    energy_std: float = 0.0
    energy_min: float = 0.0
    energy_max: float = 0.0
    class_energy_mean: float | None = None
    data_class_energy_mean: float | None = None
    target_hit_rate: float | None = None
    predicted_classes: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class HealthRow(Row):
    """EBM health of a JEM checkpoint judged by an independent classifier: confidences and Fréchet distances of
    its buffer, its conditional samples and uniform noise against real images (:func:`robust_jem.health.health`)."""

    kind: ClassVar[str] = "health"
    judge: str = ""
    judge_sha256: str = ""
    n_buffer: int = 0
    n_real: int = 0
    n_conditional: int = 0
    threshold: float = 0.0
    steps_conditional: int = 0
    buffer_confident: float = 0.0
    buffer_agrees_with_jem: float = 0.0
    conditional_confident: float = 0.0
    conditional_hits_target: float = 0.0
    uniform_confident: float = 0.0
    real_confident: float = 0.0
    fd_buffer_real: float = 0.0
    fd_conditional_real: float = 0.0
    fd_uniform_real: float = 0.0
    fd_real_real: float = 0.0
    sgld_init: str = ""
    fd_init_real: float | None = None
    energy_data: float = 0.0
    energy_buffer: float = 0.0


@dataclass(kw_only=True)
class ActivityRow(Row):
    """What a JEM-k refinement does to clean test images, or to an attack's candidates (``inputs``, at ``norm`` and
    ``eps``) (:mod:`robust_jem.activity`): displacement in [0,1] pixel units, energy along the chain, predictions
    changed against the bare classifier and JEM-0."""

    kind: ClassVar[str] = "activity"
    inputs: str = "clean"  # or the attack whose candidates were refined, e.g. "PGD linf ε=0.1"
    norm: str | None = None
    eps: float = 0.0
    n: int = 0
    displacement_l2: float = 0.0
    displacement_linf: float = 0.0
    energy_start: float = 0.0
    energy_end: float = 0.0
    energy_change: float = 0.0
    changed_vs_bare: float = 0.0
    changed_vs_jem0: float = 0.0
    accuracy_bare: float = 0.0
    accuracy_refined: float = 0.0
    inactive: bool = False


ROW_TYPES: dict[str, type[Row]] = {c.kind: c for c in (WhiteboxRow, BlackboxRow, DistalRow, CalibrationRow, OODRow,
                                                      CertificateRow, SampleRow, HealthRow, ActivityRow)}


def escalates(r: Row | dict[str, Any]) -> bool:
    """Whether a white-box row attacked another row's survivors (its examples were given, not selected): its
    robust accuracy is a fraction of those survivors, so it counts only inside a per-example worst case."""
    examples = r.get("examples") if isinstance(r, dict) else getattr(r, "examples", None)
    return isinstance(examples, dict) and examples.get("rule") == "given"


def parse_row(d: dict[str, Any]) -> Row | None:
    """The typed row of a JSON object (None for a kind without a class)."""
    cls = ROW_TYPES.get(str(d.get("kind")))
    return cls.from_dict(d) if cls is not None else None


def read_typed(path: str | Path) -> list[Row]:
    """Every typed row of a ``rows.jsonl`` (or of the run folder holding it)."""
    return [r for r in map(parse_row, read_rows(path)) if r is not None]


def of_kind(rows: list[Row], cls: type[R]) -> list[R]:
    """The rows of one class."""
    return [r for r in rows if isinstance(r, cls)]
