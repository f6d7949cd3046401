"""Calibration, OOD detection, samples and randomized smoothing: fast property tests on CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

from attacks.calibration import calibration_from_logits, calibration_stats, reliability_diagram
from attacks.common import AttackInputError
from attacks.ood import auroc, fpr_at_tpr, match_shape, ood_scores, synthetic_ood, SYNTHETIC
from infra.records import read_rows
from attacks.smoothing import ABSTAIN, SmoothedClassifier, certify_summary
from conftest import assert_usage_error


# --- calibration ---------------------------------------------------------------------------------
def _synthetic_predictor(n: int, k: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 confidence c ~ U(1/k, 1); correct with probability c - shift (shift 0: calibrated)."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(1.0 / k + 1e-3, 1.0, n)
    pred = rng.integers(0, k, n)
    probs = np.repeat(((1 - conf) / (k - 1))[:, None], k, axis=1)
    probs[np.arange(n), pred] = conf
    correct = rng.uniform(size=n) < np.clip(conf - shift, 0, 1)
    other = (pred + rng.integers(1, k, n)) % k
    return probs, np.where(correct, pred, other)


def test_ece_of_calibrated_predictor_is_near_zero():
    probs, labels = _synthetic_predictor(40000, 10, 0.0, seed=0)
    s = calibration_stats(probs, labels, n_bins=15)
    assert s.ece < 0.015 and s.n == 40000 and sum(s.bin_count) == 40000


def test_ece_of_overconfident_predictor_is_large():
    probs, labels = _synthetic_predictor(40000, 10, 0.3, seed=1)
    s = calibration_stats(probs, labels, n_bins=15)
    assert s.ece > 0.2
    assert s.mean_confidence - s.accuracy > 0.2
    assert calibration_stats(probs, labels, n_bins=5).n_bins == 5


def test_calibration_exact_values():
    logits = torch.tensor([[10.0, 0.0], [0.0, 10.0], [0.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    s = calibration_from_logits(logits, labels, n_bins=10)
    p1 = 1 / (1 + math.exp(-10))
    assert math.isclose(s.nll, (math.log1p(math.exp(-10)) + (10 + math.log1p(math.exp(-10))) + math.log(2)) / 3,
                        rel_tol=1e-9)
    assert math.isclose(s.brier, (2 * (1 - p1) ** 2 + 2 * p1 ** 2 + 0.5) / 3, rel_tol=1e-9)
    # bins: one correct at p1, one wrong at p1 (same top bin), one wrong at 0.5 (bin (0.4, 0.5])
    assert math.isclose(s.ece, (2 / 3) * abs(0.5 - p1) + (1 / 3) * 0.5, rel_tol=1e-9)


def test_calibration_rejects_bad_input(tmp_path):
    with pytest.raises(AttackInputError):
        calibration_stats(np.ones((3, 2)), [0, 1, 0])  # rows do not sum to 1
    with pytest.raises(AttackInputError):
        calibration_stats(np.full((3, 2), 0.5), [0, 2, 0])
    s = calibration_stats(np.full((4, 2), 0.5), [0, 1, 0, 1])
    assert reliability_diagram([("a", s), ("b", s)], tmp_path / "r.png").stat().st_size > 1000


# --- OOD metrics ---------------------------------------------------------------------------------
def test_auroc_separable_and_identical():
    rng = np.random.default_rng(0)
    a, b = rng.normal(10, 1, 500), rng.normal(0, 1, 700)
    assert auroc(a, b) == 1.0 and auroc(b, a) == 0.0
    assert fpr_at_tpr(a, b) == 0.0
    assert auroc(a, a) == 0.5
    c = rng.normal(0, 1, 4000)
    assert abs(auroc(c[:2000], c[2000:]) - 0.5) < 0.04
    assert abs(fpr_at_tpr(c[:2000], c[2000:]) - 0.95) < 0.03


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 60).astype(float), rng.integers(0, 5, 50).astype(float)
    pairwise = ((a[:, None] > b[None]) + 0.5 * (a[:, None] == b[None])).mean()
    assert math.isclose(auroc(a, b), pairwise, rel_tol=1e-12)


def test_ood_sets_and_conversion():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    for name in SYNTHETIC:
        o = synthetic_ood(name, x, g)
        assert o.shape == x.shape and o.min() >= 0 and o.max() <= 1, name
    flipped = synthetic_ood("flipped", x, g)
    assert torch.equal(flipped[:, :, 0], x[:, :, -1])
    perm = synthetic_ood("permuted", x, g)
    assert torch.allclose(perm.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    rgb = torch.rand(3, 3, 32, 32)
    gray, how = match_shape(rgb, (1, 28, 28))
    assert gray.shape == (3, 1, 28, 28) and "luminance" in how and "32x32->28x28" in how
    back, how = match_shape(gray, (3, 32, 32))
    assert back.shape == (3, 3, 32, 32) and "repeated" in how


def test_ood_scores_orientation():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x = torch.rand(5, 1, 2, 2)
    raw = ood_scores(lin, x, batch_size=2)
    logits = lin(x)
    assert np.allclose(raw["logp"], torch.logsumexp(logits, 1).detach().numpy(), atol=1e-5)
    assert np.allclose(raw["max_softmax"], logits.softmax(1).max(1).values.detach().numpy(), atol=1e-5)
    assert raw["grad_norm"].shape == (5,) and (raw["grad_norm"] > 0).all()


# --- randomized smoothing ----------------------------------------------------------------------------
class NoiseArgmax(nn.Module):
    """Predicts the index of the largest of the first k pixels: on a flat image under noise, ~uniform."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return 100 * x.flatten(1)[:, : self.k] + self.dummy


class Threshold(nn.Module):
    """Class 0 iff pixel 0 > 0.5 (a linear classifier: distance to the boundary = |x0 - 0.5|)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        s = 50 * (x.flatten(1)[:, :1] - 0.5) + self.dummy
        return torch.cat([s, -s], 1)


def test_smoothed_abstains_on_pure_noise():
    sm = SmoothedClassifier(NoiseArgmax(), sigma=0.5, n=30, alpha=0.001, seed=0, n0=10)
    x = torch.full((6, 1, 8, 8), 0.5)
    assert (sm.predict(x) == ABSTAIN).all()
    cert = sm.certify(x)
    assert (cert.prediction == ABSTAIN).all() and (cert.radius == 0).all() and (cert.pa_lower < 0.5).all()
    summary = certify_summary(cert, torch.zeros(6, dtype=torch.long), [0.0, 0.5])
    assert summary["abstain_rate"] == 1.0 and summary["certified_accuracy"][0]["certified_accuracy"] == 0.0


class Constant(nn.Module):
    """Always class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2) + self.dummy


def test_certificate_radius_matches_formula():
    sigma, n, alpha = 0.25, 500, 0.001
    # every draw votes for class 0: pA_lower = alpha ** (1 / n) (Clopper-Pearson with k = n)
    cert = SmoothedClassifier(Constant(), sigma, n=n, alpha=alpha, seed=1, n0=20).certify(torch.rand(3, 1, 4, 4))
    assert (cert.count_a == n).all() and (cert.prediction == 0).all()
    assert np.allclose(cert.pa_lower, alpha ** (1 / n), rtol=1e-9)
    assert np.allclose(cert.radius.numpy(), sigma * norm.ppf(alpha ** (1 / n)), rtol=1e-5)
    # a linear case with a known true radius: the certificate must not exceed it
    offset = 0.2
    x2 = torch.full((4, 1, 4, 4), 0.5)
    x2[:, :, 0, 0] = 0.5 + offset
    sm = SmoothedClassifier(Threshold(), sigma, n=2000, alpha=alpha, seed=2, n0=50)
    cert2 = sm.certify(x2)
    expected = sigma * norm.ppf(beta.ppf(alpha, cert2.count_a, 2000 - cert2.count_a + 1))
    assert np.allclose(cert2.radius.numpy(), expected, rtol=1e-5)
    assert (cert2.prediction == 0).all() and (cert2.radius.numpy() < offset).all()
    assert (cert2.radius.numpy() > 0.6 * offset).all()  # 2000 draws get within 40 % of the truth


def test_smoothed_forward_is_soft_seeded_and_differentiable():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    sm = SmoothedClassifier(base, 0.25, forward_draws=4, seed=3)
    x = torch.rand(5, 1, 4, 4, requires_grad=True)
    out = sm(x)
    assert out.shape == (5, 3) and torch.allclose(out.exp().sum(1), torch.ones(5), atol=1e-5)
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert g.abs().sum() > 0
    sm.reseed(3)
    a = sm(x)
    sm.reseed(3)
    assert torch.equal(a, sm(x))
    assert not torch.equal(sm(x), sm(x))  # fresh noise per call (EOT)
    assert torch.equal(sm.predict(x.detach()), sm.predict(x.detach()))  # predict restarts from the seed
    with pytest.raises(AttackInputError):
        SmoothedClassifier(base, 0.0)


# --- CLI on a tiny JEM run ---------------------------------------------------------------------------
def test_sample_writes_grids(run_cli, tiny_run, tmp_path):
    out = tmp_path / "samples"
    res = run_cli("sample", "--checkpoint", tiny_run / "final.pt", "--steps", "3", "--n", "2", "--class", "0,3",
                  "--n-data", "50", "--out", out, "--device", "cpu")
    assert res.code == 0, res.err
    for name in ("unconditional.png", "conditional.png", "buffer.png", "samples.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "samples.json").read_text())
    assert set(summary["conditional"]) == {"0", "3"} and summary["conditional"]["0"]["n"] == 2
    chains = [r["chain"] for r in read_rows(out)]
    assert chains == ["data", "start", "unconditional", "conditional", "conditional", "buffer"]
    assert all(r["kind"] == "sample" and r["checkpoint_sha256"] for r in read_rows(out))
    res = run_cli("sample", "--checkpoint", tiny_run / "final.pt", "--steps", "2", "--n", "1", "--class", "1",
                  "--clamp", "--init", "buffer", "--n-data", "20", "--out", tmp_path / "s2", "--device", "cpu")
    assert res.code == 0, res.err
    s2 = json.loads((tmp_path / "s2" / "samples.json").read_text())
    assert s2["clamp"] is True and s2["init"] == "buffer" and s2["unconditional"]["n"] == 1


def test_calibrate_ood_certify_cli(run_cli, tiny_run, tmp_path):
    ck, out = tiny_run / "final.pt", tmp_path / "extras"
    res = run_cli("calibrate", "--checkpoint", ck, "--sgld-steps", "0,1", "--n-examples", "40", "--bins", "10",
                  "--out", out, "--device", "cpu")
    assert res.code == 0, res.err
    res = run_cli("ood", "--checkpoint", ck, "--in", "fashion-mnist", "--out-sets", "uniform,flipped,heldout,svhn",
                  "--n-examples", "40", "--out", out, "--device", "cpu")
    assert res.code == 0, res.err
    m = next(iter(json.loads((out / "ood.json").read_text())["models"].values()))
    assert "heldout" in m["skipped"] and set(m["table"]) | {"svhn"} == {"uniform", "flipped", "svhn"}
    assert ("svhn" in m["skipped"]) == ("svhn: skipped" in res.out)  # no torchvision here: skipped, no crash
    res = run_cli("certify", "--checkpoint", ck, "--sigma", "0.25", "--n", "40", "--n0", "10", "--n-examples", "4",
                  "--radii", "0,0.5", "--attack-radii", "0.5", "--attack-steps", "1", "--eot-draws", "2",
                  "--out", out, "--device", "cpu")
    assert res.code == 0, res.err
    rows = read_rows(out)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("calibration") == 2 and kinds.count("ood") == 2 * 3 and kinds.count("certify") == 2
    cal = [r for r in rows if r["kind"] == "calibration"]
    assert {r["sgld_steps"] for r in cal} == {0, 1} and all(r["n_bins"] == 10 for r in cal)
    cert = [r for r in rows if r["kind"] == "certify"]
    assert [r["empirical_robust_accuracy"] is not None for r in cert] == [False, True]  # attacked at 0.5 only
    assert all(r["certified_accuracy"] <= r["empirical_robust_accuracy"] or "sanity" in r for r in cert[1:])
    assert {r["model"] for r in cal} == {"JEM-0", "JEM-1"} and {r["model"] for r in rows if r["kind"] == "ood"} == \
        {"JEM-bare"}  # one label per defense: the chain for calibration, the bare network for OOD scores
    for name in ("reliability.png", "ood-JEM-bare.png", "certify.json"):
        assert (out / name).exists(), name
    # a re-run skips finished rows
    res = run_cli("calibrate", "--checkpoint", ck, "--sgld-steps", "0", "--n-examples", "40", "--bins", "10",
                  "--out", out, "--device", "cpu")
    assert res.code == 0 and len(read_rows(out)) == len(rows)


@pytest.mark.parametrize("args", [
    ["calibrate", "--checkpoint", "missing.pt"],
    ["calibrate", "--checkpoint", "{ck}", "--bins", "0"],
    ["calibrate", "--checkpoint", "{ck}", "--sgld-steps", "x"],
    ["ood", "--checkpoint", "{ck}", "--out-sets", "uniform,mnist"],
    ["ood", "--checkpoint", "{ck}", "--in", "cifar10"],
    ["sample", "--checkpoint", "{ck}", "--class", "12"],
    ["sample", "--checkpoint", "{ck}", "--steps", "-1"],
    ["certify", "--checkpoint", "{ck}"],  # a JEM checkpoint needs --sigma
    ["certify", "--checkpoint", "{ck}", "--sigma", "-0.25"],
    ["certify", "--checkpoint", "{ck}", "--sigma", "0.25", "--alpha", "1.5"],
])
def test_extras_bad_input_exit_2(run_cli, tiny_run, tmp_path, args):
    out = tmp_path / "out"
    res = run_cli(*[a.replace("{ck}", str(tiny_run / "final.pt")) for a in args], "--out", out, "--device", "cpu")
    assert_usage_error(res)
    assert not (out / "rows.jsonl").exists()
