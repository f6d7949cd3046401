"""Black-box (foolbox Boundary / Pointwise on a fixed-noise view) and distal adversarials (issue 5)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import attacks.benchmark as benchmark
import attacks.black as black
from attacks.benchmark import run_blackbox
from attacks.target import Target
from attacks.black import BlackboxConfig, blackbox_attack, distances
from attacks.curves import accuracy_curve, distance_summary
from attacks.fixed_noise import FixedNoiseView, PerExampleNoise
from attacks.common import AttackInputError
from attacks import pipeline
from attacks.distal import DistalConfig, DistalEvaluation, optimise
from infra.records import read_rows
from conftest import assert_usage_error, trained_tiny_classifier
from robust_jem.data import load_dataset
from robust_jem.model import EnergyModel
from robust_jem.refined import RefinedClassifier
from robust_jem.images import save_grid


@pytest.fixture(scope="module")
def data(fashion_available):
    ds = load_dataset("fashion-mnist", "test")
    return ds.batch(slice(0, 64))


@pytest.fixture(scope="module")
def tiny_model(fashion_available) -> EnergyModel:
    """A tiny seeded classifier trained for a few seconds (undefended)."""
    return trained_tiny_classifier(120, lr=1e-2)


def bare(model: EnergyModel) -> RefinedClassifier:
    return RefinedClassifier(model, 0, n_chains=1, init_noise=0.0)


def stochastic(model: EnergyModel) -> RefinedClassifier:
    return RefinedClassifier(model, 2, n_chains=3, init_noise=0.03, noise=0.05)


# --- the fixed-noise view -----------------------------------------------------------------------
def test_per_example_noise_does_not_depend_on_the_batch():
    like = torch.empty(3 * 4, 5)  # 3 copies of 4 examples, copy-major
    batch = PerExampleNoise([11, 12, 13, 14], torch.device("cpu"))(like)
    alone = PerExampleNoise([13], torch.device("cpu"))(torch.empty(3, 5))
    assert torch.equal(batch.view(3, 4, 5)[:, 2], alone)


class RecordingNoise(torch.nn.Module):
    """Wraps a noise model and keeps every noise tensor its chain drew (to compare the noise of two queries)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.draws = inner, []

    def forward(self, x, noise_fn=None):
        def record(like):
            eps = noise_fn(like)
            self.draws.append(eps.clone())
            return eps

        return self.inner(x, noise_fn=record)


def test_fixed_noise_view_same_input_same_answer(tiny_model, data):
    x = data[0][:12]
    model = stochastic(tiny_model)
    assert not torch.equal(model(x), model(x))  # the model itself is random
    view = FixedNoiseView(model, seed=0)
    a = view(x)
    assert torch.equal(a, view(x))  # cached
    uncached = FixedNoiseView(model, seed=0, cache_size=0)
    assert torch.equal(a, uncached(x))  # a fresh view, the same query: bit for bit (any CPU: same kernels)
    # whatever the rest of the batch: the same noise; the logits then differ by the kernels' rounding only,
    # which we measure against the bare classifier's own batch dependence
    bare_gap = (tiny_model(x)[3:5] - tiny_model(x[3:5])).abs().max()
    tol = 1e-4 + 100 * float(bare_gap)
    assert (a[3:5] - uncached(x[3:5], [3, 4])).abs().max() <= tol
    assert (a[[7, 2]] - uncached(x[[7, 2]], [7, 2])).abs().max() <= tol
    other = FixedNoiseView(model, seed=1)(x)
    assert (a - other).abs().max() > 1e-2  # another seed is another view
    bare_view = FixedNoiseView(bare(tiny_model), seed=0)
    assert torch.allclose(bare_view(x), tiny_model(x), atol=1e-5)


def test_fixed_noise_view_is_continuous_in_the_input(tiny_model, data):
    """The noise is keyed on the example's slot, not its pixels: a step of the input leaves every noise draw
    exactly as it was (a pixel-keyed noise would redraw the chain noise and jump), so the view is as continuous
    as the model with that noise, and decision attacks walk the model's boundary.

    The chain of a piecewise-linear net is itself discontinuous where an activation flips (its gradient
    jumps), so the logits are compared on the median example, shrinking with the step."""
    x = data[0][:8]
    model = RecordingNoise(stochastic(tiny_model))
    view = FixedNoiseView(model, seed=0, cache_size=0)
    base = view(x)
    noise_at_x, model.draws = model.draws, []
    jump = (model.inner(x) - model.inner(x)).abs().amax(1).median()  # what a fresh noise draw changes
    direction = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    moved = []
    for delta in (1e-4, 1e-6):
        step = (x + delta * direction).clamp(0, 1)
        out = view(step)
        assert len(model.draws) == len(noise_at_x) and all(map(torch.equal, model.draws, noise_at_x))
        model.draws = []
        moved.append(float((out - base).abs().amax(1).median()))
    assert moved[0] < 0.05 * jump, (moved, jump)
    assert moved[1] < 0.1 * moved[0] + 1e-5, moved  # shrinks with the step: continuous, not a redraw
    view(x, [8, 9, 10, 11, 12, 13, 14, 15])
    assert not any(map(torch.equal, model.draws, noise_at_x))  # other slots, other noise


# --- boundary and pointwise --------------------------------------------------------------------------
@pytest.mark.parametrize("attack,steps", [("boundary", 25), ("pointwise", 60)])
def test_adversarials_are_misclassified_and_distances_match(tiny_model, data, attack, steps):
    x, y = data[0][:10], data[1][:10]
    cfg = BlackboxConfig(attack, steps=steps, init_steps=15, batch_size=6, eval_draws=2)
    model = bare(tiny_model)
    res = blackbox_attack(model, x, y, cfg, progress=False)
    adv = res.adversarials
    assert adv.shape == x.shape and float(adv.min()) >= 0 and float(adv.max()) <= 1
    assert int(res.found.sum()) >= 5
    with torch.no_grad():
        wrong = tiny_model(adv).argmax(1) != y
    assert torch.equal(wrong, res.found)  # deterministic model: the verdict is the model's
    for norm, d in res.distances.items():
        assert norm in cfg.norms
        true = distances(x, adv, norm)
        assert torch.allclose(d[res.found], true[res.found], atol=1e-5)
        assert torch.isinf(d[~res.found]).all()
    assert (res.queries > 0).all() and res.wall_s > 0
    if attack == "pointwise":  # the budget holds: clean check + salt-and-pepper (steps + 1) + check + steps
        assert int(res.queries.max()) <= 1 + (cfg.init_steps + 1) + 1 + cfg.steps
    again = blackbox_attack(model, x, y, cfg, progress=False)  # seeded: reproducible
    assert all(torch.equal(again.distances[n], d) for n, d in res.distances.items())


def test_stochastic_model_fixed_and_fresh_verdicts(tiny_model, data):
    x, y = data[0][:6], data[1][:6]
    model = stochastic(tiny_model)
    cfg = BlackboxConfig("boundary", steps=10, init_steps=10, batch_size=6, eval_draws=3)
    res = blackbox_attack(model, x, y, cfg, progress=False)
    assert res.found.any()
    # the fixed-noise verdict holds on a fresh copy of the view that attacked each example (up to the float
    # rounding of another batch composition at the boundary)
    attacked = [i for i, s in enumerate(res.view_seeds) if s is not None]
    assert attacked and all(res.status[i] == "attacked" for i in attacked)
    for i in attacked:
        logits = FixedNoiseView(model, seed=res.view_seeds[i], cache_size=0)(res.adversarials[i:i + 1], [i])[0]
        other = torch.cat([logits[:y[i]], logits[y[i] + 1:]]).max()
        if res.found[i]:
            assert other - logits[y[i]] > -1e-3, (i, float(other - logits[y[i]]))
    frac = res.fresh_misclassified
    assert torch.isnan(frac[~res.found]).all() and ((frac[res.found] >= 0) & (frac[res.found] <= 1)).all()
    fresh = res.distances_fresh("l2")
    assert (fresh[torch.isfinite(fresh)] >= 0).all()
    assert ((fresh == res.distances["l2"]) | torch.isinf(fresh) | (fresh == 0)).all()
    again = blackbox_attack(model, x, y, cfg, progress=False)  # the noise is fixed: reproducible
    assert torch.equal(again.adversarials, res.adversarials)


def test_killed_run_keeps_finished_chunks_and_resumes_to_the_same_rows(tiny_model, data, tmp_path, monkeypatch):
    x, y = data[0][:12], data[1][:12]
    model = stochastic(tiny_model)
    cfg = BlackboxConfig("pointwise", steps=10, init_steps=5, batch_size=4, eval_draws=2)  # 3 chunks, 2 rows

    def run(out):
        rows = run_blackbox(Target("tiny", model), x, y, cfg, out_dir=out, examples="test[0:12]", progress=False)
        return [r.to_dict() for r in rows]

    whole = run(tmp_path / "whole")
    assert len(whole) == 2 and all(r["shards"] == ["0/1"] for r in whole)
    real, attacked = black.attack_chunk, []

    def attack_chunk(model, x, y, cfg, chunk, **kwargs):
        attacked.append(chunk)
        if chunk == kill_at:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of chunk 2
        return real(model, x, y, cfg, chunk, **kwargs)

    monkeypatch.setattr(benchmark, "attack_chunk", attack_chunk)  # what the sweep calls
    out, kill_at = tmp_path / "killed", 2
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert not (out / "rows.jsonl").exists()
    assert sorted(p.name for p in (out / "parts").glob("*/*.json")) == ["00000.json", "00001.json"]
    attacked.clear()
    kill_at = None
    resumed = run(out)
    assert attacked == [2]  # only the missing chunk
    assert not (out / "parts").exists()
    volatile = {"wall_s", "wall_s_per_example", "timestamp"}
    assert [{k: v for k, v in r.items() if k not in volatile} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in volatile} for r in whole]
    for r in whole:
        side = r["distances_file"]
        assert json.loads((out / side).read_text()) == json.loads((tmp_path / "whole" / side).read_text())
    assert run(out) == resumed and attacked == [2]  # done: nothing attacked, the same rows read back


def test_accuracy_from_distances_is_non_increasing():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(200, generator=g, dtype=torch.float64) * 3
    d[::7] = math.inf
    d[::11] = 0.0
    grid = [0, 0.5, 1, 1.5, 2, 2.5, 3, 10]
    curve = accuracy_curve(d, grid)
    accs = [p["acc"] for p in curve]
    assert all(a >= b for a, b in zip(accs, accs[1:]))
    assert accs[0] == float((d > 0).double().mean()) and accs[-1] == float(torch.isinf(d).double().mean())
    assert all(p["ci_low"] <= p["acc"] <= p["ci_high"] for p in curve)
    s = distance_summary(d)
    assert s["n_not_found"] == int(torch.isinf(d).sum()) and s["median"] is not None
    assert distance_summary(torch.full((4,), math.inf))["median"] is None


def test_zero_budget_is_rejected():
    with pytest.raises(AttackInputError):
        BlackboxConfig("boundary", steps=0, init_steps=5).validate()
    with pytest.raises(AttackInputError):
        BlackboxConfig("hopskip", steps=5, init_steps=5).validate()


# --- distal ------------------------------------------------------------------------------------------
def test_distal_confidence_rises_with_steps(tiny_model, data, tmp_path):
    x0 = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(10)
    _, trace = optimise(tiny_model, x0, targets, steps=12, step_size=0.03)
    assert trace.shape == (12, 10)
    assert trace[-1].mean() > trace[0].mean() + 0.2
    cfg = DistalConfig(steps=12, step_size=0.03, seeds=1)
    evaluation = DistalEvaluation(n_classes=10, mean_image=data[0].mean(0), real_images=data[0], cfg=cfg,
                                  out_dir=tmp_path, save_grid=lambda imgs, path, nrow: save_grid(imgs, path, nrow=nrow))
    target = Target("tiny", tiny_model)
    rows = pipeline.run(evaluation, [target], tmp_path, progress=False)
    assert [r.start for r in rows] == ["uniform", "mean"]
    for r in rows:
        assert r.kind == "distal" and r.n_images == 10 and r.model == "tiny"
        assert r.target_prob_result > r.target_prob_start
        assert 0 <= r.frac_target_above_threshold <= r.frac_above_threshold <= 1
        assert (tmp_path / r.grid_file).is_file()
    lines = (tmp_path / "rows.jsonl").read_text()
    again = pipeline.run(evaluation, [target], tmp_path, progress=False)  # resumed: nothing recomputed
    assert again == rows and (tmp_path / "rows.jsonl").read_text() == lines


# --- command line ---------------------------------------------------------------------------------
def test_blackbox_and_distal_cli(tiny_run, run_cli, tmp_path):
    ckpt = tiny_run / "final.pt"
    out = tmp_path / "run"
    args = ["blackbox", "--attack", "boundary", "--checkpoint", ckpt, "--sgld-steps", "0,1", "--n-chains", "2",
            "--n-examples", "4", "--steps", "4", "--init-steps", "5", "--eval-draws", "2", "--out", out,
            "--device", "cpu", "--no-progress"]
    res = run_cli(*args)
    assert res.code == 0, res.err
    rows = read_rows(out)
    assert sorted(r["model"] for r in rows) == ["JEM-0[chains=2]", "JEM-1[chains=2]"]  # not the reference chain
    for r in rows:
        assert r["kind"] == "blackbox" and r["norm"] == "l2" and r["n"] == 4 and r["checkpoint_sha256"]
        accs = [p["acc"] for p in r["acc_curve"]]
        assert all(a >= b for a, b in zip(accs, accs[1:]))
        side = json.loads((out / r["distances_file"]).read_text())
        assert side["key"] == r["key"] and len(side["distance_fresh_noise"]) == 4
    before = (out / "rows.jsonl").read_bytes()
    res = run_cli(*args)  # resume: nothing new, the same rows printed
    assert res.code == 0 and res.out.count(" boundary l2: ") == 2 and (out / "rows.jsonl").read_bytes() == before

    res = run_cli("distal", "--checkpoint", ckpt, "--sgld-steps", "1", "--n-chains", "2", "--steps", "2",
                  "--seeds", "1", "--n-real", "20", "--out", out, "--device", "cpu", "--no-progress")
    assert res.code == 0, res.err
    distal = [r for r in read_rows(out) if r["kind"] == "distal"]
    assert len(distal) == 2 and all((out / r["grid_file"]).is_file() for r in distal)


@pytest.mark.parametrize("args", [
    ["blackbox", "--attack", "hopskip"],
    ["blackbox", "--attack", "boundary", "--steps", "0"],
    ["blackbox", "--attack", "pointwise", "--init-steps", "0"],
    ["blackbox", "--attack", "boundary", "--checkpoint", "no/such.pt"],
    ["distal", "--steps", "0"],
    ["distal", "--threshold", "1.5"],
    ["distal", "--checkpoint", "no/such.pt"],
])
def test_bad_input_is_one_line_and_exit_2(run_cli, tmp_path, tiny_run, args):
    if "--checkpoint" not in args:
        args = [*args, "--checkpoint", str(tiny_run / "final.pt")]
    out = tmp_path / "never"
    res = run_cli(*args, "--out", out, "--device", "cpu")
    assert_usage_error(res)
    assert not out.exists()
