"""Attacks aimed at a refined, randomized defense (issue 26 item 3): the margin and energy-aimed PGD, the attack on
the fixed-noise deployment, Square on averaged queries, and APGD-T on a randomized model."""

from __future__ import annotations

import pytest
import torch

from conftest import trained_tiny_classifier
from attacks.adaptive import AveragedLogits, FixedNoise, MarginPGD, SquareEOT, adaptive_factory
from attacks.autoattack import APGD
from attacks.common import AttackInputError
from attacks.white import PGD, delta_norm, margin
from robust_jem import RefinedClassifier, load_dataset


@pytest.fixture(scope="module")
def net(fashion_available):
    return trained_tiny_classifier(100, lr=3e-3)


@pytest.fixture(scope="module")
def batch(fashion_available):
    return load_dataset("fashion-mnist", "test").batch(slice(0, 24))


def jem(net, k=1, **kw):
    return RefinedClassifier(net, k, n_chains=2, init_noise=0.03, **kw)


@pytest.mark.parametrize("name", ["margin-pgd", "energy-pgd", "fixed-noise-pgd", "square-eot"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 1.0)])
def test_adaptive_attacks_stay_in_the_threat_model_and_break_the_bare_net(net, batch, name, norm, eps):
    x, y = batch
    bare = RefinedClassifier(net, 0, n_chains=1, init_noise=0.0)
    atk = adaptive_factory(name, steps=10, n_queries=100, eval_draws=1)(bare, norm, eps)
    res = atk(x, y)
    assert float(res.delta_norm.max()) <= eps + 1e-5 and res.in_bounds
    assert int(res.robust.sum()) < int(res.clean_correct.sum())  # a 100-step CE net at these ε always loses examples


def test_margin_pgd_is_at_least_as_strong_as_ce_pgd_on_the_bare_net(net, batch):
    """Keeping the best iterate of a margin loss can only help against a deterministic model (same steps)."""
    x, y = batch
    bare = RefinedClassifier(net, 0, n_chains=1, init_noise=0.0)
    ce = PGD(bare, norm="linf", eps=0.03, steps=20, eval_draws=1, seed=3)(x, y)
    mg = MarginPGD(bare, norm="linf", eps=0.03, steps=20, eval_draws=1, seed=3)(x, y)
    assert int(mg.robust.sum()) <= int(ce.robust.sum()) + 1


def test_energy_pgd_lowers_the_energy_of_its_candidates(net, batch):
    """With a large weight on -E the candidates sit at lower energy than the plain margin attack's: the term
    reaches the gradient (it is not silently dropped)."""
    x, y = batch
    model = jem(net, 0)
    plain = MarginPGD(model, norm="linf", eps=0.1, steps=10, eot=1, eval_draws=1, seed=0)
    aimed = MarginPGD(model, norm="linf", eps=0.1, steps=10, eot=1, energy_weight=10.0, eval_draws=1, seed=0)
    assert aimed.name == "EnergyPGD" and aimed.params()["loss"].startswith("margin+10")
    (a,), (b,) = list(plain.candidates(x, y)), list(aimed.candidates(x, y))
    with torch.no_grad():
        assert float(model.energy(b).mean()) < float(model.energy(a).mean())


def test_fixed_noise_view_is_deterministic_and_differentiable(net, batch):
    x, _ = batch
    view = FixedNoise(jem(net, 1), seeds=list(range(x.shape[0])))
    x = x.clone().requires_grad_(True)
    a, b = view(x), view(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, jem(net, 1)(x))  # the view's noise is its own
    g = torch.autograd.grad(a.sum(), x)[0]
    assert float(g.abs().sum()) > 0
    atk = MarginPGD(jem(net, 1), norm="linf", eps=0.05, steps=3, eot=5, fixed_noise=True, eval_draws=2)
    assert atk.eot_used == 1 and atk.name == "FixedNoisePGD"  # one draw is exact on a deterministic view


def test_averaged_logits_reduce_the_noise_of_a_query(net, batch):
    x, _ = batch
    model = RefinedClassifier(net, 0, n_chains=1, init_noise=0.3)
    with torch.no_grad():
        single = torch.stack([model(x) for _ in range(8)]).std(0).mean()
        avg = torch.stack([AveragedLogits(model, 16)(x) for _ in range(8)]).std(0).mean()
    assert float(avg) < 0.5 * float(single)


def test_square_eot_returns_an_attack_point_for_every_survivor(net, batch):
    x, y = batch
    atk = SquareEOT(jem(net, 0), norm="linf", eps=0.02, n_queries=20, eot=2, eval_draws=2)
    (cand,) = list(atk.candidates(x, y))
    assert bool((delta_norm(cand - x, "linf") > 0).all())  # never the clean image handed back
    assert atk.params()["forward_passes_per_query"] == 2


def test_apgd_t_on_a_randomized_model_returns_attack_points(net, batch):
    x, y = batch
    atk = APGD(jem(net, 0), norm="linf", eps=0.02, steps=5, targeted=True, eot=2, n_targets=2, eval_draws=2)
    assert atk.params()["n_targets"] == 2
    (cand,) = list(atk.candidates(x, y))
    assert bool((delta_norm(cand - x, "linf") > 0.5 * 0.02).all())
    with torch.no_grad():
        assert float(margin(jem(net, 0)(cand), y).mean()) < float(margin(jem(net, 0)(x), y).mean())


def test_unknown_adaptive_attack_and_bad_weight_are_input_errors(net):
    with pytest.raises(AttackInputError):
        adaptive_factory("nope")
    with pytest.raises(AttackInputError):
        MarginPGD(jem(net, 0), eps=0.1, energy_weight=-1)


# --- escalation on survivors (issue 26 item 1) ----------------------------------------------------------------
def test_escalation_attacks_exactly_the_survivors_counts_in_the_headline_and_resumes(net, tmp_path):
    from attacks.benchmark import Examples, run_sweep
    from attacks.checks import worst_case
    from attacks.rows import read_typed
    from attacks.target import Target
    from attacks.white import pgd_factory
    from suite.escalate import Round, escalate_targets, rounds_of
    from suite.settings import AdaptiveSettings, AutoAttackSettings

    ds = load_dataset("fashion-mnist", "test")
    defense = {"objective": "jem", "sgld_steps": 1, "n_chains": 2, "init_noise": 0.03}
    full, bpda = (Target("JEM-1", jem(net, 1, grad_mode=m), defense=defense,
                         attacker={"grad_mode": m, "precision": "fp32", "compiled": False}) for m in ("full", "bpda"))
    assert full.defense_id == bpda.defense_id
    # a deliberately weak headline: one PGD step leaves examples an escalation can still break
    run_sweep([full], pgd_factory(steps=1, step_size=1e-3, eot=1, eval_draws=2), ["linf"], [0.06], ds.images, ds.labels, tmp_path,
              dataset=ds.name, examples=Examples(24, "random", 0), progress=False)
    [before] = [c for c in worst_case(read_typed(tmp_path)) if c["eps"] > 0]
    standing = [i for i, c in zip(before["example_indices"], before["correct"]) if c]
    assert len(standing) >= 3, "the test needs survivors"
    rounds = (Round(AutoAttackSettings(version="rand", steps=10, eot=2, eval_draws=2), ("full", "bpda")),
              Round(AdaptiveSettings("energy-pgd", steps=10, eot=2, eval_draws=2)))
    made = escalate_targets([full, bpda], rounds, ["linf"], [0.06], ds, tmp_path, repeats=1, progress=False)
    first = [r for r in made if r.escalation["round"] == 0]
    assert {r.grad_mode for r in first} == {"full", "bpda"}
    assert all(r.example_indices == standing and r.examples["rule"] == "given" for r in first)
    assert first[0].attack_params["seed"] != first[1].attack_params["seed"]  # BPDA on its own seed
    table = rounds_of(read_typed(tmp_path))
    assert table[0]["attacked"] == len(standing) and table[0]["broken"] >= 1
    assert table[0]["name"].startswith("APGD-CE+APGD-DLR 10 it")  # not called AutoAttack below its budget
    [after] = [c for c in worst_case(read_typed(tmp_path)) if c["eps"] > 0]
    assert after["example_indices"] == before["example_indices"]
    assert sum(after["correct"]) == sum(before["correct"]) - table[0]["broken"] - sum(t["broken"] for t in table[1:])
    # a rerun finds the same survivors before every round and computes nothing
    n_rows = len(read_typed(tmp_path))
    escalate_targets([full, bpda], rounds, ["linf"], [0.06], ds, tmp_path, repeats=1, progress=False)
    assert len(read_typed(tmp_path)) == n_rows
