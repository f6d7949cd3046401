"""White-box suite (issue 4): RefinedClassifier gradients, PGD/APGD wrappers, the sweep, plots, CLI."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from conftest import assert_usage_error, trained_tiny_classifier
from attacks.benchmark import Examples, run_sweep
from attacks.target import Target
from attacks.plots import plot_rows
from infra.interrupt import Interrupted
from infra.records import Parts, read_rows
from attacks.autoattack import APGD, WorstOf, autoattack_factory
from attacks.white import PGD, delta_norm, pgd_factory
from robust_jem import EnergyModel, RefinedClassifier, load_dataset
from robust_jem.model import to_internal
from robust_jem.sgld import sgld, sgld_checkpointed


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(fashion_available):
    ds = load_dataset("fashion-mnist", "test")
    return ds


@pytest.fixture(scope="module")
def net(fashion_available) -> EnergyModel:
    """A tiny CE-trained classifier (seeded; about a second)."""
    return trained_tiny_classifier(100, lr=3e-3)


@pytest.fixture(scope="module")
def batch(data):
    x, y = data.batch(slice(0, 32))
    return x, y


def bare(net):
    return RefinedClassifier(net, 0, n_chains=1, init_noise=0.0)


def jem1(net, mode="full"):
    return RefinedClassifier(net, 1, n_chains=2, init_noise=0.03, grad_mode=mode)


# --- RefinedClassifier ------------------------------------------------------------------------------
def test_full_gradient_matches_finite_differences(net):
    """Noise fixed by reseeding an explicit generator identically; float64 central differences."""
    model = copy.deepcopy(net).double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1
    w = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def f(rc, xx):
        return (rc(xx, generator=torch.Generator().manual_seed(7)) * w).sum()

    coords = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(5))[:6].tolist()
    h = 1e-6
    fd = []
    rc_full = RefinedClassifier(model, 2, n_chains=2, grad_mode="full")
    for i in coords:
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[i] = h
        e = e.view_as(x)
        with torch.no_grad():
            fd.append(float(f(rc_full, x + e) - f(rc_full, x - e)) / (2 * h))
    fd_t = torch.tensor(fd, dtype=torch.float64)
    grads = {}
    for mode in ("full", "bpda"):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(RefinedClassifier(model, 2, n_chains=2, grad_mode=mode), xr), xr)
        grads[mode] = g.view(-1)[coords]
    err_full = float((grads["full"] - fd_t).abs().max())
    err_bpda = float((grads["bpda"] - fd_t).abs().max())
    scale = float(fd_t.abs().max())
    assert err_full <= 1e-6 * scale + 1e-10, (err_full, scale)
    assert err_bpda > 20 * err_full  # the chain's Jacobian matters here, so the check has teeth


def test_checkpointed_chain_has_the_plain_chains_states_and_gradient(net):
    """Gradient checkpointing (issue 28): the same chain end, the same input gradient, the same generator state after,
    for uneven segments and the default ⌈√k⌉; and RefinedClassifier's checkpointed JEM-k equals its plain one."""
    model = copy.deepcopy(net).double().requires_grad_(False)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for steps, segment in ((7, 3), (12, None), (5, 5)):
        out = {}
        for way in ("plain", "checkpointed"):
            gen = torch.Generator().manual_seed(9)
            z = to_internal(x).clone().requires_grad_(True)
            if way == "plain":
                end = sgld(model.energy_z, z, steps, 1.0, 0.01, generator=gen, differentiable=True)
            else:
                end = sgld_checkpointed(model.energy_z, z, steps, 1.0, 0.01, generator=gen, segment=segment)
            (g,) = torch.autograd.grad((end * w).sum(), z)
            out[way] = (end.detach(), g, gen.get_state())
        torch.testing.assert_close(out["checkpointed"][0], out["plain"][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out["checkpointed"][1], out["plain"][1], rtol=1e-10, atol=1e-12)
        assert torch.equal(out["checkpointed"][2], out["plain"][2])
        assert out["plain"][1].abs().max() > 0
    grads = {}
    for way in ("never", "always"):
        rc = RefinedClassifier(model, 6, n_chains=2, grad_mode="full", checkpoint=way)
        assert rc.checkpointed == (way == "always")
        xr = x.clone().requires_grad_(True)
        logits = rc(xr, generator=torch.Generator().manual_seed(4))
        grads[way] = (logits.detach(), torch.autograd.grad(logits[:, 0].sum(), xr)[0])
    torch.testing.assert_close(grads["always"][0], grads["never"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads["always"][1], grads["never"][1], rtol=1e-10, atol=1e-12)


def test_checkpointing_keeps_a_square_root_of_the_chains_graph_and_only_where_it_is_exact(net):
    """What the forward leaves saved for the backward: the plain 64-step chain holds every step's graph, the
    checkpointed one 8 segment starts (measured as the live bytes of saved tensors, not as time). ``auto``
    checkpoints beyond 20 steps, never when the weights want gradients (they would get none)."""
    import gc
    import weakref

    model = copy.deepcopy(net).requires_grad_(False)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))

    def saved_bytes(checkpoint: str) -> int:
        refs = []

        def pack(t):
            refs.append(weakref.ref(t))
            return t

        rc = RefinedClassifier(model, 64, n_chains=1, init_noise=0.0, grad_mode="full", checkpoint=checkpoint)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = rc(x.clone().requires_grad_(True), generator=torch.Generator().manual_seed(0))
        gc.collect()
        alive = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for r in refs if (t := r()) is not None}
        del logits
        return sum(alive.values())

    plain, checkpointed = saved_bytes("never"), saved_bytes("always")
    assert checkpointed > 0 and plain > 16 * checkpointed, (plain, checkpointed)
    assert not RefinedClassifier(model, 10).checkpointed and RefinedClassifier(model, 21).checkpointed
    assert not RefinedClassifier(copy.deepcopy(net).requires_grad_(True), 21).checkpointed
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        RefinedClassifier(model, 21, checkpoint="sometimes")


def test_bpda_gradient_is_the_logit_gradient_at_the_chain_end(net):
    model = copy.deepcopy(net).double()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rc = RefinedClassifier(model, 3, n_chains=2, grad_mode="bpda")
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((rc(xr, generator=torch.Generator().manual_seed(9)) * w).sum(), xr)
    # by hand: same noise, chain end as a leaf, d logits / d z_end, chained through z = 2x - 1
    gen = torch.Generator().manual_seed(9)
    z = to_internal(x).repeat(2, 1, 1, 1)
    z = z + 0.03 * torch.randn(z.shape, generator=gen, dtype=z.dtype)
    z_end = sgld(model.energy_z, z, 3, 1.0, 0.01, generator=gen).requires_grad_(True)
    out = (model.logits_z(z_end).view(2, 3, -1).mean(0) * w).sum()
    (gz,) = torch.autograd.grad(out, z_end)
    expected = 2.0 * gz.view(2, 3, 1, 28, 28).sum(0)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


# --- attacks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_gives_clean_accuracy(net, batch, norm):
    x, y = batch
    for model in (bare(net), jem1(net)):
        res = PGD(model, norm=norm, eps=0.0, steps=3, restarts=2, eval_draws=3)(x, y)
        assert torch.equal(res.robust, res.clean_correct)
        assert torch.equal(res.robust_frac, res.clean_frac)
        assert torch.equal(res.x_adv, x)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_candidate_of_a_surviving_example_is_an_attack_point(net, batch, loss):
    """torchattacks' APGD returns the clean image for every example its own single noisy check did not flip;
    ours keeps the maximum-loss iterate there, so the verdict judges a real attack point."""
    x, y = batch
    atk = APGD(jem1(net), norm="linf", eps=0.02, steps=5, loss=loss, eot=1, eval_draws=2)
    (cand,) = list(atk.candidates(x, y))
    moved = delta_norm(cand - x, "linf") > 0.5 * 0.02
    res = atk(x, y)
    assert bool(res.robust.any()), "the test needs examples that survive"
    assert bool(moved[res.robust].all())  # no surviving example is judged on its clean image
    ta = atk.torchattack  # the library's own loop, for contrast: clean images where its check did not flip
    torch.manual_seed(0)
    _, lib = ta.perturb(x, y)
    assert bool((delta_norm(lib - x, "linf") == 0)[res.robust].any())


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.8)])
def test_perturbations_stay_in_the_ball_and_in_range(net, batch, norm, eps, caplog):
    x, y = batch
    attacks = [PGD(bare(net), norm=norm, eps=eps, steps=3),
               PGD(jem1(net), norm=norm, eps=eps, steps=2, eot=2, eval_draws=2),
               APGD(jem1(net), norm=norm, eps=eps, steps=3, loss="dlr", eot=2, eval_draws=2)]
    assert [a.name for a in attacks][:2] == (["PGD", "EOTPGD"] if norm == "linf" else ["PGDL2", "EOTPGDL2"])
    with caplog.at_level(logging.WARNING, logger="attacks.white"):
        for atk in attacks:
            res = atk(x, y)
            assert res.in_bounds and float(res.delta_norm.max()) <= eps + 1e-6
            assert float(delta_norm(res.x_adv - x, norm).max()) <= eps + 1e-6
            assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    # the library's raw outputs were already inside (otherwise they would have been projected, with a warning)
    assert "outside the threat model" not in caplog.text


def test_robust_never_exceeds_clean_and_undefended_net_falls(net, batch):
    x, y = batch
    clean = bare(net)(x).argmax(1) == y
    assert clean.float().mean() > 0.5  # the fixture learned something
    for model in (bare(net), jem1(net)):
        res = PGD(model, norm="linf", eps=0.03, steps=5, eval_draws=3)(x, y)
        assert bool((res.robust <= res.clean_correct).all())
        assert bool((res.robust_frac <= res.clean_frac).all())
    big = PGD(bare(net), norm="linf", eps=0.5, steps=10)(x, y)
    assert float(big.robust.float().mean()) <= 0.05


def test_more_restarts_never_raise_robust_accuracy(net, batch):
    x, y = batch
    model = jem1(net)
    one = PGD(model, norm="linf", eps=0.02, steps=3, restarts=1, eval_draws=3)(x, y)
    three = PGD(model, norm="linf", eps=0.02, steps=3, restarts=3, eval_draws=3)(x, y)
    assert bool((three.robust <= one.robust).all())
    assert bool((three.robust_frac <= one.robust_frac).all())
    assert torch.equal(three.adv[0], one.adv[0])  # restart 0 is the same run in both


def test_later_restarts_attack_only_the_examples_still_standing(net, batch):
    """AutoAttack's rule: a restart sees only the examples not yet wrong in every verdict draw; the verdict is the
    one all restarts on all examples would give for those that fell (they stay fallen)."""
    x, y = batch
    model = jem1(net)
    atk = PGD(model, norm="linf", eps=0.03, steps=3, restarts=3, eval_draws=3)
    sizes = []
    real = atk._perturb

    def counting(xs, ys, seed, probe):
        sizes.append(len(xs))
        return real(xs, ys, seed, probe)

    atk._perturb = counting
    res = atk(x, y)
    assert len(sizes) == res.adv.shape[0] == 3
    for r in range(len(sizes)):  # restart r sees what is right in some draw of the clean input and earlier candidates
        frac = res.clean.float().mean(0)
        if r:
            frac = torch.minimum(frac, res.adv[:r].float().mean(1).amin(0))
        assert sizes[r] == int((frac > 0).sum()) < len(x)
    gone = PGD(bare(net), norm="linf", eps=1.0, steps=3, restarts=3)
    res = gone(x, y)
    assert res.adv.shape[0] == 1 and not bool(res.robust.any())  # nothing left standing after restart 0


def test_worst_of_and_autoattack_rand(net, batch):
    x, y = batch
    model = jem1(net)
    make = autoattack_factory(steps=3, eot=2, eval_draws=2)
    atk = make(model, "linf", 0.03)
    assert isinstance(atk, WorstOf) and atk.name == "APGD-CE+APGD-DLR"
    res = atk(x, y)
    assert res.adv.shape[0] == 2 and bool((res.robust <= res.clean_correct).all())
    assert autoattack_factory(version="auto")(bare(net), "linf", 0.03).name == "APGD-CE+APGD-T+FAB-T+Square"


def test_deterministic_model_uses_one_draw_and_no_eot(net):
    atk = PGD(bare(net), norm="linf", eps=0.1, eot=4, eval_draws=5)
    assert atk.name == "PGD" and atk.eot_used == 1 and atk.eval_draws_used == 1
    p = atk.params()
    assert p["eot"] == 4 and p["eval_draws"] == 5 and p["step_size"] == pytest.approx(2.5 * 0.1 / 10)
    assert "step_size=0.025" in repr(atk)


# --- sweep --------------------------------------------------------------------------------------------
def _targets(net):
    return [Target("CE", bare(net)), Target("JEM-1", jem1(net), {"objective": "jem", **jem1(net).refinement.fields()})]


def test_sweep_rows_same_seed_same_numbers_and_resume(net, data, tmp_path):
    factory = pgd_factory(steps=2, eval_draws=2, seed=3)
    ex = Examples(n=24)
    common = dict(dataset="fashion-mnist", examples=ex, seed=3, batch_size=16, progress=False)
    rows_a = [r.to_dict() for r in run_sweep(_targets(net), factory, ["linf"], [0.0, 0.05], data.images, data.labels,
                                             tmp_path / "a", **common)]
    rows_b = [r.to_dict() for r in run_sweep(_targets(net), factory, ["linf"], [0.0, 0.05], data.images, data.labels,
                                             tmp_path / "b", **common)]
    assert len(rows_a) == 4
    for ra, rb in zip(rows_a, rows_b):
        for k in ("key", "clean_acc", "robust_acc", "robust_acc_mean", "correct", "example_indices"):
            assert ra[k] == rb[k]
    for r in rows_a:
        assert r["kind"] == "whitebox" and r["n"] == 24 and r["robust_acc"] <= r["clean_acc"]
        assert r["robust_ci_low"] <= r["robust_acc"] <= r["robust_ci_high"]
        assert len(r["correct"]) == 24 and r["example_indices"] == list(range(24))
        if r["eps"] == 0:
            assert r["robust_acc"] == r["clean_acc"]
    assert {r["eval_draws_used"] for r in rows_a} == {1, 2}
    assert (tmp_path / "a" / "rows.csv").is_file()

    # resume: finished rows are skipped (the attack is not even called), new ε are appended
    calls = []

    def counting(model, norm, eps):
        atk = factory(model, norm, eps)
        real = atk.candidates

        def candidates(*a, **k):
            calls.append(eps)
            yield from real(*a, **k)

        atk.candidates = candidates
        return atk

    rows = run_sweep(_targets(net), counting, ["linf"], [0.0, 0.05, 0.1], data.images, data.labels, tmp_path / "a",
                     **common)
    assert len(rows) == 6 and len(read_rows(tmp_path / "a")) == 6
    assert set(calls) == {0.1}
    # a torn last line (kill -9 mid-append) loses only that row
    path = tmp_path / "a" / "rows.jsonl"
    path.write_bytes(path.read_bytes()[:-40])
    assert len(read_rows(path)) == 5
    run_sweep(_targets(net), factory, ["linf"], [0.0, 0.05, 0.1], data.images, data.labels, tmp_path / "a",
              **common)
    assert len(read_rows(path)) == 6


def test_a_killed_row_keeps_its_finished_batches(net, data, tmp_path):
    """Each batch is a part on disk: a crash mid-row loses only the batch in progress; the resumed row equals
    an uninterrupted one, and the parts are gone once the row is written."""
    factory = pgd_factory(steps=2, eval_draws=2, seed=5)
    common = dict(dataset="fashion-mnist", examples=Examples(n=24, rule="random", seed=2), seed=5, batch_size=8,
                  progress=False)
    target = [Target("JEM-1", jem1(net), {"objective": "jem", **jem1(net).refinement.fields()})]
    ref = run_sweep(target, factory, ["linf"], [0.05], data.images, data.labels, tmp_path / "ref", **common)[0].to_dict()

    batches: list[int] = []

    def dying_after(n_ok):
        def make(model, norm, eps):
            atk = factory(model, norm, eps)
            real = atk.candidates

            def candidates(x, y, stream=0, standing=None):
                if len(batches) == n_ok:
                    raise KeyboardInterrupt  # killed while attacking this batch
                batches.append(stream)
                yield from real(x, y, stream, standing)

            atk.candidates = candidates
            return atk
        return make

    with pytest.raises(Interrupted) as stop:  # Ctrl-C: it says exactly what it kept
        run_sweep(target, dying_after(2), ["linf"], [0.05], data.images, data.labels, tmp_path / "a", **common)
    assert "0 of 1 whitebox rows" in stop.value.kept and "2 of 3 pieces of the row in progress" in stop.value.kept
    assert read_rows(tmp_path / "a") == [] and len(list((tmp_path / "a" / "parts").glob("*/*.json"))) == 2
    first_two = list(batches)
    row = run_sweep(target, dying_after(3), ["linf"], [0.05], data.images, data.labels, tmp_path / "a",
                    **common)[0].to_dict()
    assert len(batches) == 3 and batches[:2] == first_two  # only the third batch was attacked again
    assert not (tmp_path / "a" / "parts").exists()
    Parts(tmp_path / "a", f"{row['key']}-bs8", 3).write(0, {})  # as if killed between the append and the clean-up
    run_sweep(target, dying_after(3), ["linf"], [0.05], data.images, data.labels, tmp_path / "a", **common)
    assert not (tmp_path / "a" / "parts").exists() and len(read_rows(tmp_path / "a")) == 1
    volatile = {"timestamp", "wall_s", "images_per_s"}
    assert {k: v for k, v in row.items() if k not in volatile} == {k: v for k, v in ref.items() if k not in volatile}
    rnd = Examples(n=10, rule="random", seed=1)
    assert rnd.indices(100) == rnd.indices(100) != Examples(n=10).indices(100)


def test_plot_rows_with_blackbox_overlay(net, data, tmp_path):
    rows = run_sweep([Target("CE", bare(net))], pgd_factory(steps=1), ["linf", "l2"], [0.0, 0.1], data.images,
                     data.labels, tmp_path, dataset="fashion-mnist", examples=Examples(n=8), progress=False)
    rows.append({"kind": "blackbox", "model": "CE", "attack": "Boundary", "norm": "l2",
                 "acc_curve": [{"eps": 0.0, "acc": 0.9, "ci_low": 0.6, "ci_high": 0.98},
                               {"eps": 1.0, "acc": 0.4, "ci_low": 0.2, "ci_high": 0.6}]})
    png, md = plot_rows(rows, tmp_path / "plot.png")
    assert png.stat().st_size > 1000
    text = md.read_text()
    assert "CE PGD" in text and "CE Boundary" in text and "L2" in text and "L∞" in text


# --- CLI ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["--eps", "-0.1"], ["--eps", "abc"], ["--eps", "8/0"], ["--eps", "2"], ["--eps", "0.1", "--steps", "0"],
    ["--eps", "0.1", "--n-examples", "0"], ["--eps", "0.1", "--batch-size", "0"], ["--eps", "0.1", "--norm", "l7"],
    ["--eps", "0.1", "--n-examples", "20000"],
])
def test_cli_bad_input_is_one_line_exit_2(run_cli, tiny_run, tmp_path, args):
    out = tmp_path / "run"
    res = run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--out", out, "--no-progress", *args)
    assert_usage_error(res)
    assert not out.exists()


def test_cli_missing_checkpoint(run_cli, tmp_path):
    res = run_cli("pgd", "--checkpoint", tmp_path / "nope.pt", "--eps", "8/255", "--out", tmp_path / "r")
    assert_usage_error(res)
    assert not (tmp_path / "r").exists()


def test_cli_pgd_rows_resume_and_plot(run_cli, tiny_run, tmp_path):
    out = tmp_path / "run"
    args = ["pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "0,8/255", "--steps", "2", "--sgld-steps", "0,1",
            "--grad-mode", "full,bpda", "--n-chains", "2", "--eval-draws", "2", "--n-examples", "6", "--out", out,
            "--no-progress", "--eot", "1"]
    res = run_cli(*args)
    assert res.code == 0, res.err
    rows = read_rows(out)
    assert len(rows) == 6  # JEM-0 once + JEM-1 x {full, bpda}, times 2 ε
    assert {(r["model"], r["grad_mode"]) for r in rows} == {("JEM-0[chains=2]", "full"), ("JEM-1[chains=2]", "full"),
                                                        ("JEM-1[chains=2]", "bpda")}
    r = rows[1]
    assert r["eps"] == pytest.approx(8 / 255) and r["checkpoint_sha256"] and r["objective"] == "jem"
    assert r["attack"] == "PGD" and r["step_size"] == pytest.approx(2.5 * (8 / 255) / 2)
    assert (out / "rows.csv").is_file()
    res = run_cli(*args)
    assert res.code == 0 and len(read_rows(out)) == 6
    res = run_cli("plot", out, "--out", tmp_path / "p.png")
    assert res.code == 0, res.err
    assert (tmp_path / "p.png").is_file() and (tmp_path / "p.md").is_file()
    assert_usage_error(run_cli("plot", tmp_path / "nothing"))


def test_cli_autoattack_rand_rows(run_cli, tiny_run, tmp_path):
    out = tmp_path / "aa"
    res = run_cli("autoattack", "--checkpoint", tiny_run / "final.pt", "--eps", "0.1", "--version", "rand",
                  "--steps", "2", "--eot", "2", "--sgld-steps", "1", "--n-chains", "2", "--eval-draws", "2",
                  "--n-examples", "4", "--out", out, "--no-progress")
    assert res.code == 0, res.err
    (row,) = read_rows(out)
    assert row["attack"] == "APGD-CE+APGD-DLR" and row["eot_used"] == 2 and row["steps"] == 2
    assert [a["attack"] for a in row["attack_params"]["attacks"]] == ["APGD-CE", "APGD-DLR"]
    assert row["robust_acc"] <= row["clean_acc"]


# --- precision and compile options of the refined classifier ---------------------------------------------
def test_bf16_and_compiled_chains_compute_the_same_classifier(net, data):
    x = data.images[:16].float() / 255
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    eager = RefinedClassifier(net, 1, n_chains=2, grad_mode="bpda")
    ref = eager(x, generator=g())
    half = RefinedClassifier(net, 1, n_chains=2, grad_mode="bpda", bf16=True)
    out = half(x, generator=g())
    assert out.dtype == torch.float32 and half.config()["precision"] == "bf16" and eager.config()["precision"] == "fp32"
    rel = float((out - ref).norm() / ref.norm())  # bf16 keeps ~3 significant digits
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9 and rel < 0.03, rel
    compiled = RefinedClassifier(net, 1, n_chains=2, grad_mode="bpda", compile=True)
    assert torch.allclose(compiled(x, generator=g()), ref, atol=1e-4) and compiled.config()["compiled"]
    assert len(compiled.state_dict()) == len(eager.state_dict())  # the compiled net is not a second copy
    with pytest.raises(ValueError, match="double backward"):
        RefinedClassifier(net, 1, grad_mode="full", compile=True)


def test_cli_compile_with_full_gradients_is_a_usage_error(run_cli, tiny_run, tmp_path):
    res = run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "0.1", "--sgld-steps", "1", "--compile",
                  "--out", tmp_path / "run", "--no-progress")
    assert_usage_error(res)
    assert "bpda" in res.err and not (tmp_path / "run").exists()


def test_cli_pgd_default_eot_is_20_on_a_randomized_model_and_1_on_a_bare_one(run_cli, tiny_run, tmp_path):
    out = tmp_path / "run"
    # 30 examples: the tiny model (~17 % accurate) gets some right, so the attack runs (it skips wrong ones)
    res = run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "8/255", "--steps", "1", "--sgld-steps", "0",
                  "--n-chains", "2", "--eval-draws", "1", "--n-examples", "30", "--out", out, "--no-progress")
    assert res.code == 0, res.err
    res = run_cli("pgd", "--checkpoint", tiny_run / "final.pt", "--eps", "8/255", "--steps", "1", "--sgld-steps", "0",
                  "--n-chains", "1", "--init-noise", "0", "--n-examples", "2", "--out", out, "--no-progress")
    assert res.code == 0, res.err
    rows = {r["model"]: r for r in read_rows(out) if r["examples"]["rule"] == "first"}  # not the survivors' check
    assert rows["JEM-0[chains=2]"]["clean_acc"] > 0
    assert rows["JEM-0[chains=2]"]["eot_used"] == 20 and rows["JEM-0[chains=2]"]["attack"] == "EOTPGD"
    assert rows["JEM-bare"]["eot_used"] == 1 and rows["JEM-bare"]["attack"] == "PGD"
    assert len(rows["JEM-0[chains=2]"]["margin_trace"]["EOTPGD/r0"]) == 1  # one step, its 20 draws averaged


def test_transfer_from_the_model_itself_equals_the_direct_attack(net, batch):
    """Transfer replays the surrogate's candidates on the target; with the target as its own surrogate it
    must reproduce the direct attack exactly (same seeds, same verdict)."""
    from attacks.white import transfer_factory

    x, y = batch
    direct = pgd_factory(steps=5, restarts=2, eval_draws=1, seed=4)(bare(net), "linf", 0.05)(x, y)
    via = transfer_factory(bare(net), "CE", None, steps=5, restarts=2, eval_draws=1, seed=4)(bare(net), "linf", 0.05)
    res = via(x, y)
    assert via.name == "Transfer(PGD@CE)" and torch.equal(res.robust, direct.robust)
    assert bool((~res.robust).any())  # the attack breaks something, so the comparison has teeth
    # onto a different (randomized) target: judged by the target's own verdict, never better than clean
    onto = transfer_factory(bare(net), "CE", None, steps=5, restarts=1, eval_draws=2, seed=4)(jem1(net), "linf", 0.05)
    r = onto(x, y)
    assert r.clean.shape[0] == 2 and bool((r.robust <= r.clean_correct).all())


# --- the screened verdict -------------------------------------------------------------------------------
class _CoinModel(torch.nn.Module):
    """Input 0 is always right, input 1 always wrong, input 2 right with probability 0.4 (a borderline
    candidate); counts how many inputs it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        key = x.flatten(1)[:, 0].round().long()  # which kind of input
        right = torch.where(key == 0, True, torch.where(key == 1, False, torch.rand(x.shape[0]) < 0.4))
        return torch.stack([right.float(), (~right).float()], 1)  # label 0 is the right answer


def test_screened_verdict_needs_all_twenty_draws_and_spends_them_only_where_needed():
    from attacks.common import AttackInputError
    from attacks.verdict import SCREEN, Verdict
    kinds = torch.tensor([0.0, 1.0] + [2.0] * 400)
    x, y = kinds.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(), torch.zeros(len(kinds), dtype=torch.long)
    model = _CoinModel()
    ok = Verdict(20, seed=1).score(model, x, y)
    assert ok.shape == (20, len(kinds))
    assert bool(ok[:, 0].all()) and not bool(ok[:, 1].any())
    coin = ok[:, 2:]
    passed_screen = coin[:SCREEN].all(0)
    assert int(passed_screen.sum()) > 0  # 0.4^5 ≈ 1 %: about 4 of 400 pass the five screen draws ...
    assert not bool(coin.all(0).any())  # ... and none all twenty (0.4^20)
    # draws past the screen went only to the inputs correct in all screen draws
    assert model.seen == SCREEN * len(kinds) + (20 - SCREEN) * (1 + int(passed_screen.sum()))
    # the accuracy of one fresh draw is the screen mean (unbiased: ≈ 0.4), not biased by the stopping
    acc = Verdict.draw_accuracy(coin)
    assert abs(float(acc.mean()) - 0.4) < 0.06 and bool((acc == coin[:SCREEN].double().mean(0)).all())
    assert "draws 6-20 only for inputs correct in the first 5" in Verdict(20).rule(model)
    with pytest.raises(AttackInputError, match="multiple of 5"):
        Verdict(12)
    # the same question again (every row's clean verdict) costs nothing; a changed weight asks the model anew
    seen = model.seen
    assert torch.equal(Verdict(20, seed=1).score(model, x, y), ok) and model.seen == seen
    assert not torch.equal(Verdict(20, seed=2).score(model, x, y), ok) and model.seen > seen
    seen = model.seen
    with torch.no_grad():
        model.w.add_(1.0)
    Verdict(20, seed=1).score(model, x, y)
    assert model.seen > seen


def test_auto_pieces_are_small_enough_to_finish(net):
    """An interrupted row loses at most its piece in progress: automatic pieces cost at most PIECE_PASSES image
    passes on a CPU (the README's JEM-1 example, EOT 20, 2 restarts: 10 images a piece instead of all 50)."""
    from attacks.benchmark import PIECE_PASSES, auto_batch_size, gradient_evaluations, network_passes

    for k in (0, 1, 10):
        model = RefinedClassifier(net, k)
        fields = {**model.refinement.fields()}
        atk = pgd_factory(steps=10, restarts=2, eot=20, eval_draws=20)(model, "linf", 8 / 255)
        size = auto_batch_size(fields, atk, "cpu")
        per_image = gradient_evaluations(atk) * network_passes(fields)
        assert size >= 1 and (size == 1 or size * per_image <= PIECE_PASSES["cpu"]), (k, size, per_image)
        assert size <= auto_batch_size(fields)  # never above the memory cap
    assert auto_batch_size({"sgld_steps": 1, "n_chains": 5}, atk, "cpu") == 10
