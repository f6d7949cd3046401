"""Randomized smoothing (Cohen et al. 2019): a smoothed classifier, its abstaining prediction and its
certified L2 radius; plus an empirical L2 attack on it (Salman et al. 2019).

The smoothed classifier is ``g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)`` for a base classifier ``f``
that maps [0,1] images to logits. Noise is added in the [0,1] pixel space and **not** clipped (as in
Cohen et al.), so sigma and every radius are in [0,1]-pixel L2 units.

* :meth:`SmoothedClassifier.predict` is Cohen et al.'s PREDICT: ``n`` draws, majority vote, abstain unless a
  two-sided binomial test of the top two counts rejects equality at level ``alpha``.
* :meth:`SmoothedClassifier.certify` is CERTIFY: ``n0`` draws choose the class, ``n`` fresh draws estimate
  its probability; ``pA_lower`` is the one-sided (1 - alpha) Clopper-Pearson lower bound and the certified
  radius is ``sigma * Phi^-1(pA_lower)``; abstain when ``pA_lower < 0.5``.
* ``forward`` is what attacks see: the **log of the average softmax** over ``forward_draws`` noise draws
  (the "soft" smoothed classifier of Salman et al. 2019). Hard vote frequencies have zero gradient almost
  everywhere, so attacking them directly would be gradient masking; the average softmax is differentiable
  through the reparametrised noise, and each call draws fresh noise, so repeating calls (or raising
  ``forward_draws``) is expectation over transformation. Its output is a log-probability vector, so
  cross-entropy on it is the NLL of the soft smoothed classifier (SmoothAdv's objective).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from infra.randomness import derive_seed, generator, generator_on, seeded

from .common import AttackInputError, check_images, wilson

log = logging.getLogger(__name__)

ABSTAIN = -1


@dataclass(frozen=True)
class Certificate:
    """Per-example output of :meth:`SmoothedClassifier.certify` (CPU tensors / arrays, shape (N,)).

    ``prediction`` is ``ABSTAIN`` (-1) where ``pA_lower < 0.5``; ``radius`` is 0 there.
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    pa_lower: np.ndarray
    count_a: np.ndarray
    n: int
    n0: int
    alpha: float
    sigma: float


def clopper_pearson_lower(successes: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion: Beta(alpha; k, n - k + 1).

    Equals ``statsmodels.proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]`` as used by Cohen et al.
    """
    from scipy.stats import beta

    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        lower = beta.ppf(alpha, k, n - k + 1)
    return np.where(k <= 0, 0.0, lower)


def certified_radius(pa_lower: np.ndarray | float, sigma: float) -> np.ndarray:
    """``sigma * Phi^-1(pA_lower)`` where ``pA_lower >= 0.5``, else 0 (Cohen et al. 2019, Thm. 1)."""
    from scipy.stats import norm

    p = np.asarray(pa_lower, dtype=np.float64)
    return np.where(p >= 0.5, sigma * norm.ppf(np.clip(p, 0.5, 1.0)), 0.0)


class SmoothedClassifier(nn.Module):
    """Gaussian randomized smoothing of ``base`` ([0,1] images -> logits).

    Args:
        base: the base classifier.
        sigma: noise std in [0,1] pixel units (> 0).
        n: Monte-Carlo draws for ``predict`` and the estimation step of ``certify``.
        alpha: failure probability of the binomial test / confidence bound.
        seed: seed of this module's noise streams (``forward`` keeps one running stream; ``predict`` and
            ``certify`` restart from ``seed`` on each call so they are reproducible).
        n0: selection draws of ``certify``.
        forward_draws: noise draws averaged in ``forward`` (EOT samples per call).
        batch_size: base-model batch size used while counting votes.
        generator: an explicit generator for ``forward`` instead of the seeded one.

    Shape: ``forward`` (N, C, H, W) -> (N, K) log average softmax; ``predict`` -> (N,) classes or -1.
    """

    def __init__(self, base: nn.Module, sigma: float, n: int = 1000, alpha: float = 0.001, seed: int = 0, *,
                 n0: int = 100, forward_draws: int = 8, batch_size: int = 500,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not (sigma > 0 and math.isfinite(sigma)):
            raise AttackInputError(f"sigma must be a positive number, got {sigma}")
        if n < 1 or n0 < 1 or forward_draws < 1 or batch_size < 1:
            raise AttackInputError("n, n0, forward_draws and batch_size must be at least 1")
        if not 0 < alpha < 1:
            raise AttackInputError(f"alpha must be in (0, 1), got {alpha}")
        self.base = base
        self.sigma, self.n, self.alpha, self.seed = float(sigma), int(n), float(alpha), int(seed)
        self.n0, self.forward_draws, self.batch_size = int(n0), int(forward_draws), int(batch_size)
        self._generator = generator

    deterministic = False

    def generator(self, device: torch.device) -> torch.Generator:
        """The running noise stream of ``forward`` on ``device``."""
        self._generator = generator_on(self._generator, self.seed, device)
        return self._generator

    def reseed(self, seed: int) -> None:
        """Restart every noise stream from ``seed``."""
        self.seed = int(seed)
        self._generator = None

    def extra_repr(self) -> str:
        return (f"sigma={self.sigma}, n={self.n}, n0={self.n0}, alpha={self.alpha}, "
                f"forward_draws={self.forward_draws}, seed={self.seed}")

    def config(self) -> dict[str, Any]:
        """Settings for result rows."""
        return {"smoothing_sigma": self.sigma, "smoothing_n": self.n, "smoothing_n0": self.n0,
                "smoothing_alpha": self.alpha, "smoothing_forward_draws": self.forward_draws,
                "smoothing_forward": "log mean softmax", "smoothing_seed": self.seed}

    def _noise(self, shape: torch.Size, like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.sigma * torch.randn(shape, generator=g, device=like.device, dtype=like.dtype)

    # --- what attacks see -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator or self.generator(x.device)
        k = self.forward_draws
        xr = x.unsqueeze(0).expand(k, *x.shape).reshape(k * x.shape[0], *x.shape[1:])
        logp = torch.log_softmax(self.base(xr + self._noise(xr.shape, xr, g)).float(), dim=1)
        return torch.logsumexp(logp.view(k, x.shape[0], -1), dim=0) - math.log(k)

    # --- Monte-Carlo votes ------------------------------------------------------------------------
    @torch.no_grad()
    def counts(self, x: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
        """Votes of the base classifier under ``num`` noise draws per image: (N, K) int64 on the CPU.

        Images are processed in groups of ``batch_size // num`` (or in chunks of ``batch_size`` draws when
        ``num > batch_size``); the draws for image i come from ``generator`` in order.
        """
        check_images(x)
        rows: list[torch.Tensor] = []
        group = max(1, self.batch_size // num)
        for i in range(0, x.shape[0], group):
            xs = x[i:i + group]
            m = xs.shape[0]
            c: torch.Tensor | None = None
            left = num
            while left > 0:
                b = min(left, self.batch_size) if m == 1 else num
                xb = xs.unsqueeze(1).expand(m, b, *xs.shape[1:]).reshape(m * b, *xs.shape[1:])
                logits = self.base(xb + self._noise(xb.shape, xb, generator))
                if c is None:
                    c = torch.zeros(m, logits.shape[1], dtype=torch.long, device=x.device)
                pred = logits.argmax(1).view(m, b)
                c.scatter_add_(1, pred, torch.ones_like(pred))
                left -= b
            assert c is not None
            rows.append(c.cpu())
        return torch.cat(rows)

    def _fresh(self, device: torch.device) -> torch.Generator:
        return generator(self.seed, device)

    def predict(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Cohen et al.'s PREDICT: majority vote over ``n`` draws, ``ABSTAIN`` unless the binomial test passes.

        Returns: (N,) int64 on the CPU.
        """
        from scipy.stats import binomtest

        counts = self.counts(x, self.n, generator or self._fresh(x.device))
        top2 = counts.topk(2 if counts.shape[1] > 1 else 1, dim=1)
        out = torch.full((x.shape[0],), ABSTAIN, dtype=torch.long)
        for i in range(x.shape[0]):
            n_a = int(top2.values[i, 0])
            n_b = int(top2.values[i, 1]) if top2.values.shape[1] > 1 else 0
            if binomtest(n_a, n_a + n_b, 0.5).pvalue <= self.alpha:
                out[i] = int(top2.indices[i, 0])
        return out

    def certify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Certificate:
        """Cohen et al.'s CERTIFY: class from ``n0`` draws, ``pA_lower`` from ``n`` fresh draws, radius."""
        g = generator or self._fresh(x.device)
        c_a = self.counts(x, self.n0, g).argmax(1)
        counts = self.counts(x, self.n, g)
        n_a = counts.gather(1, c_a.view(-1, 1)).squeeze(1).numpy()
        pa = clopper_pearson_lower(n_a, self.n, self.alpha)
        radius = certified_radius(pa, self.sigma)
        pred = torch.where(torch.from_numpy(pa >= 0.5), c_a, torch.full_like(c_a, ABSTAIN))
        return Certificate(prediction=pred, radius=torch.from_numpy(radius).float(), pa_lower=pa, count_a=n_a,
                           n=self.n, n0=self.n0, alpha=self.alpha, sigma=self.sigma)


# ------------------------------------------------------------------------------------------------
# summaries and the empirical check
# ------------------------------------------------------------------------------------------------
def certify_summary(cert: Certificate, labels: torch.Tensor, radii: list[float]) -> dict[str, Any]:
    """Certified accuracy at each radius (with 95 % Wilson CIs), abstain rate, mean radius, ACR.

    * certified accuracy at r: fraction predicted correctly (not abstained) with radius >= r (r = 0: the
      smoothed classifier's clean accuracy, abstentions counted wrong);
    * ``mean_radius``: mean radius over the certified (non-abstained) examples;
    * ``acr``: average certified radius, counting wrong or abstained examples as 0 (Zhai et al. 2020).
    """
    y = labels.detach().cpu().long()
    n = int(y.numel())
    if n == 0 or cert.prediction.numel() != n:
        raise AttackInputError("labels and certificates differ in length or are empty")
    correct = cert.prediction == y
    abstain = cert.prediction == ABSTAIN
    rad = cert.radius
    acc = []
    for r in radii:
        k = int((correct & (rad >= r)).sum())
        lo, hi = wilson(k, n)
        acc.append({"radius": float(r), "certified_accuracy": k / n, "ci_low": lo, "ci_high": hi})
    certified = ~abstain
    return {
        "n_examples": n,
        "certified_accuracy": acc,
        "abstain_rate": float(abstain.double().mean()),
        "mean_radius": float(rad[certified].mean()) if bool(certified.any()) else 0.0,
        "acr": float((rad * correct.float()).mean()),
        "max_certifiable_radius": float(certified_radius(clopper_pearson_lower(cert.n, cert.n, cert.alpha),
                                                         cert.sigma)),
    }


def empirical_l2(smoothed: SmoothedClassifier, x: torch.Tensor, y: torch.Tensor, eps: list[float], *,
                 steps: int = 20, step_fraction: float = 0.25, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Empirical L2 robust accuracy of the abstaining smoothed classifier (SmoothAdv-style EOT attack).

    ``torchattacks.PGDL2`` (random start) maximises the cross-entropy of ``smoothed.forward`` (log average
    softmax over fresh noise draws each step = EOT); the adversarial images are then judged by
    :meth:`SmoothedClassifier.predict` with abstentions counted as errors. An upper bound on the true robust
    accuracy, to be read beside the certified accuracy (which must not exceed it).

    Returns: one dict per ε with ``eps``, ``robust_accuracy``, Wilson CI and the attack's settings.
    """
    try:
        import torchattacks
    except ImportError:
        raise AttackInputError("the empirical check needs torchattacks (pip install --no-deps torchattacks==3.5.1); "
                               "or skip it (0 attack steps)") from None

    check_images(x)
    out = []
    for e in eps:
        if e <= 0:
            x_adv = x
        else:
            attack = torchattacks.PGDL2(smoothed, eps=e, alpha=step_fraction * e, steps=steps, random_start=True)
            with seeded(derive_seed(seed, "empirical-l2", e)):  # torchattacks' random start: the global RNG
                x_adv = attack(x, y)
        pred = smoothed.predict(x_adv)
        k = int((pred == y.cpu()).sum())
        lo, hi = wilson(k, int(y.numel()))
        out.append({"eps": float(e), "robust_accuracy": k / int(y.numel()), "ci_low": lo, "ci_high": hi,
                    "attack": "PGDL2+EOT(soft smoothed)", "steps": steps if e > 0 else 0,
                    "step_size": step_fraction * e, "eot_draws_per_step": smoothed.forward_draws})
        if progress is not None:
            progress(f"eps {e:g}: robust accuracy {k / int(y.numel()):.3f}")
    return out
