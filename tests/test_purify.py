"""Long-run EBM purification (issue 28 item 3): an energy model trained without labels, whose chain moves the input
before another classifier labels it; exact gradients through the whole chain, its own label and identity."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_usage_error, tiny_cfg, trained_tiny_classifier
from robust_jem.refined import RefinedClassifier, Refinement
from test_activity import toy


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, fashion_available):
    """A tiny CE classifier and a tiny EBM (the purifier) trained on the same data."""
    from robust_jem.train import train

    root = tmp_path_factory.mktemp("purify")
    return train(tiny_cfg("ce"), root / "ce", progress=False), train(tiny_cfg("ebm"), root / "ebm", progress=False)


def test_an_ebm_trains_on_log_px_alone(tiny_pair):
    from robust_jem.checkpoint import read_checkpoint

    _, ebm = tiny_pair
    rows = [json.loads(line) for line in (ebm.parent / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert logged and all("ce" not in r and "acc" not in r for r in logged)  # no labels used
    assert all(r["loss"] == pytest.approx(r["px"]) for r in logged)  # px_weight 1, nothing else
    assert read_checkpoint(ebm)["buffer"] is not None


def test_the_chain_descends_the_purifiers_energy_and_the_classifier_only_labels():
    """A classifier with a flat energy (its own chain would not move) behind a tilted purifier: the chain pulls the
    inputs up the mean pixel, across the classifier's boundary; the classifier's own JEM-k does not move them."""
    x = torch.full((8, 1, 28, 28), 0.49)
    classifier, purifier = toy(10.0), toy(10.0)
    classifier.net.a = 10.0  # classifies by the sign of the mean pixel
    flat = toy(0.0)
    own = RefinedClassifier(flat, 10, n_chains=1, init_noise=0.0, noise=0.0)
    behind = RefinedClassifier(flat, 10, n_chains=1, init_noise=0.0, noise=0.0, purifier=purifier,
                               purifier_id="0123456789abcdef")
    z = 2 * x - 1
    assert torch.equal(own.refine(z), z)  # a flat energy: no step
    moved = behind.refine(z)
    assert (moved.flatten(1).mean(1) > z.flatten(1).mean(1) + 0.05).all()
    assert behind.refinement.purifier == "0123456789abcdef"
    with pytest.raises(ValueError):
        RefinedClassifier(flat, 1, purifier=purifier)  # a purifier without its id: no identity for the rows


def test_exact_gradients_through_a_long_purifying_chain_at_bounded_memory(fashion_available):
    """The checkpointed and the plain backward through a purifier's chain give the same input gradient."""
    classifier = trained_tiny_classifier(100, lr=3e-3).double().requires_grad_(False)
    purifier = trained_tiny_classifier(30, lr=3e-3).double().requires_grad_(False)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = {}
    for way in ("never", "always"):
        rc = RefinedClassifier(classifier, 25, n_chains=2, grad_mode="full", checkpoint=way, purifier=purifier,
                               purifier_id="f" * 16)
        assert rc.checkpointed == (way == "always")
        xr = x.clone().requires_grad_(True)
        logits = rc(xr, generator=torch.Generator().manual_seed(3))
        (grads[way],) = torch.autograd.grad(logits[:, 0].sum(), xr)
    torch.testing.assert_close(grads["always"], grads["never"], rtol=1e-9, atol=1e-12)
    assert grads["never"].abs().max() > 0


def test_a_purified_defense_has_its_own_label_and_identity():
    r = Refinement(100, purifier="0123456789abcdef")
    assert r.label("ce") == "CE+EBM-100[ebm=01234567]"
    assert Refinement(100, step_size=0.1, purifier="0123456789abcdef").label("ce") == \
        "CE+EBM-100[step=0.1, ebm=01234567]"
    assert r.fields()["purifier"] == "0123456789abcdef" and "purifier" not in Refinement(10).fields()
    assert Refinement(10).label("jem") == "JEM-10"  # JEM-k's labels and rows are untouched


def test_a_purifier_runs_its_sampler_as_trained_and_jem_k_the_papers_refinement():
    """The defense's definition: a purifier's chain clamps where its training chains did; JEM-k never clamps by
    default (the paper's refinement does not), even for a JEM whose training chains were clamped."""
    from robust_jem.config import SGLDConfig
    from suite.targets import Chain

    boxed = SGLDConfig(step_size=0.5, noise=0.02, clamp=True)
    purified = Chain((100,), purifier="ebm.pt")
    assert purified.refinements(boxed) == [Refinement(100, step_size=0.5, noise=0.02, clamp=True)]
    assert purified.refinements(SGLDConfig(clamp=False))[0].clamp is False
    assert Chain((100,), purifier="ebm.pt", clamp=False).refinements(boxed)[0].clamp is False  # asked for
    assert Chain((0, 10)).refinements(boxed) == [Refinement(0, step_size=0.5, noise=0.02),
                                                 Refinement(10, step_size=0.5, noise=0.02)]  # JEM-k: unclamped
    assert Chain((10,), clamp=True).refinements(boxed)[0].clamp  # JEM-k[clamp], asked for


def test_pgd_attacks_a_classifier_behind_a_purifier(run_cli, tiny_pair, tmp_path):
    from infra.provenance import file_sha256
    from infra.records import read_rows

    ce, ebm = tiny_pair
    res = run_cli("pgd", "--checkpoint", ce, "--purifier", ebm, "--sgld-steps", "2", "--grad-mode", "full,bpda",
                  "--eps", "0.1", "--steps", "2", "--eot", "1", "--eval-draws", "2", "--n-examples", "4",
                  "--no-check", "--out", tmp_path / "p", "--no-progress")
    assert res.code == 0, res.err
    rows = read_rows(tmp_path / "p")
    assert {r["grad_mode"] for r in rows} == {"full", "bpda"}
    assert all(r["defense_params"]["purifier"] == file_sha256(ebm)[:16] and r["model"].startswith("CE+EBM-2[")
               for r in rows)  # the identity names the purifier
    assert all(r["sgld_step_size"] == 1.0 for r in rows)  # the purifier's sampler (tiny: step 1), not the CE's
    # ... clamp included (every EBM preset clamps its chains): labelled, as every departure from the paper's chain
    assert all(r["defense_params"]["sgld_clamp"] and "[clamp, ebm=" in r["model"] for r in rows)
    res = run_cli("pgd", "--checkpoint", ce, "--purifier", ebm, "--sgld-steps", "2", "--no-sgld-clamp", "--eps", "0.1",
                  "--steps", "1", "--eot", "1", "--eval-draws", "1", "--n-examples", "2", "--no-check", "--out",
                  tmp_path / "free", "--no-progress")
    assert res.code == 0, res.err
    free = read_rows(tmp_path / "free")
    assert free and all("sgld_clamp" not in r["defense_params"] and "clamp" not in r["model"] for r in free)
    assert_usage_error(run_cli("pgd", "--checkpoint", ebm, "--eps", "0.1", "--out", tmp_path / "q"))
    assert_usage_error(run_cli("pgd", "--checkpoint", ce, "--purifier", ce, "--eps", "0.1", "--out", tmp_path / "r"))


def test_a_clamped_refinement_keeps_its_chains_in_the_box_with_exact_gradients(fashion_available):
    """``clamp`` (a labelled variant, JEM-k[clamp]): every chain state stays in [-1, 1]; the checkpointed backward
    replays the clamp (the same input gradient as the plain one); unclamped, the same chain leaves the box."""
    net = trained_tiny_classifier(100, lr=3e-3).double().requires_grad_(False)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z = 2 * x - 1
    free = RefinedClassifier(net, 25, n_chains=1, step_size=30.0)
    boxed = RefinedClassifier(net, 25, n_chains=1, step_size=30.0, clamp=True)
    assert free.refine(z, torch.Generator().manual_seed(0)).abs().max() > 1
    assert boxed.refine(z, torch.Generator().manual_seed(0)).abs().max() <= 1
    assert boxed.refinement.label("jem") == "JEM-25[chains=1, step=30, clamp]" and boxed.refinement.fields()["sgld_clamp"]
    assert "sgld_clamp" not in free.refinement.fields()  # unclamped rows keep their identity
    grads = {}
    for way in ("never", "always"):
        rc = RefinedClassifier(net, 25, n_chains=2, step_size=30.0, clamp=True, checkpoint=way)
        xr = x.clone().requires_grad_(True)
        (grads[way],) = torch.autograd.grad(rc(xr, generator=torch.Generator().manual_seed(3))[:, 0].sum(), xr)
    torch.testing.assert_close(grads["always"], grads["never"], rtol=1e-9, atol=1e-12)
