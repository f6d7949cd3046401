"""EBM health: the Fréchet distance is the textbook one, and the command judges a JEM by another model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_usage_error, tiny_cfg
from robust_jem.health import frechet


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([3.0, 0.0, 4.0])  # same covariance: FD = |mean shift|^2 = 25
    assert frechet(a, shifted) == pytest.approx(25.0, rel=1e-3)
    wide = a * 2.0  # same mean, covariance 4I vs I: FD = trace(I + 4I - 2*2I) = 3
    assert frechet(a, wide) == pytest.approx(3.0, rel=2e-2)


@pytest.fixture(scope="module")
def tiny_ce(tmp_path_factory, fashion_available):
    from robust_jem.train import train

    out = tmp_path_factory.mktemp("tiny-ce")
    return train(tiny_cfg("ce"), out, progress=False)


def test_health_command_judges_the_buffer_by_another_model(run_cli, tiny_run, tiny_ce, tmp_path):
    out = tmp_path / "health"
    res = run_cli("health", "--checkpoint", tiny_run / "final.pt", "--judge", tiny_ce, "--n", "200", "--steps", "5",  # the tiny buffer holds 64
                  "--per-class", "3", "--out", out, "--device", "cpu")
    assert res.code == 0, res.err
    import json

    row = json.loads((out / "health.json").read_text())
    assert row["n_buffer"] == 64 and row["n_conditional"] == 30 and row["judge_sha256"] != row["checkpoint_sha256"]
    assert row["fd_real_real"] < row["fd_uniform_real"]  # the floor is below noise in any working judge
    assert 0 <= row["buffer_confident"] <= 1 and "Frechet distance" in res.out
    # the judge's own level on real images (the second half of the real set), the buffer's yardstick
    from robust_jem.checkpoint import load
    from robust_jem.data import load_dataset

    real = load_dataset("fashion-mnist", "test").x[200:400]
    with torch.no_grad():
        level = float((load(tiny_ce)(real).softmax(1).amax(1) >= 0.9).double().mean())
    assert row["real_confident"] == pytest.approx(level) and f"real test images: {100 * level:.1f} %" in res.out
    assert_usage_error(run_cli("health", "--checkpoint", tiny_run / "final.pt", "--judge", tiny_run / "final.pt",
                               "--out", tmp_path / "h2", "--device", "cpu"))  # a model cannot judge itself
    assert_usage_error(run_cli("health", "--checkpoint", tiny_ce, "--judge", tiny_run / "final.pt",
                               "--out", tmp_path / "h3", "--device", "cpu"))  # a CE checkpoint has no buffer


def test_gaussian_init_reproduces_the_class_statistics():
    import torch

    from robust_jem.sgld import GaussianInit

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4000) % 2
    centre = torch.tensor([[-0.5, 0.2, 0.0], [0.4, -0.3, 0.1]])
    z = (centre[labels] + 0.1 * torch.randn(4000, 3, generator=g)).view(4000, 1, 1, 3)
    init = GaussianInit.fit(z, labels, jitter=0.0)
    x = init.sample(20000, torch.Generator().manual_seed(1))
    assert x.shape == (20000, 1, 1, 3) and float(x.abs().max()) <= 1
    # the two classes come back as two clusters around their means (assign each sample to its nearest mean)
    flat = x.view(-1, 3)
    nearest = torch.cdist(flat, centre).argmin(1)
    for c in (0, 1):
        assert torch.allclose(flat[nearest == c].mean(0), centre[c], atol=0.01)
        assert float(flat[nearest == c].std(0).mean()) == pytest.approx(0.1, rel=0.05)


def test_sgld_gradient_clip_bounds_each_step():
    import torch

    from robust_jem.sgld import sgld

    z = torch.zeros(5, 4)
    steep = lambda v: (1000.0 * v).sum(1)  # noqa: E731  gradient norm 2000 per chain
    out = sgld(steep, z, steps=1, step_size=1.0, noise=0.0, grad_clip=0.5)
    assert torch.allclose(out.norm(dim=1), torch.full((5,), 0.5))
    assert torch.allclose(sgld(steep, z, 1, 1.0, 0.0).norm(dim=1), torch.full((5,), 2000.0))


def test_training_with_informative_init_stores_it(tmp_path, fashion_available):
    import torch

    from robust_jem.checkpoint import read_checkpoint
    from robust_jem.train import train

    final = train(tiny_cfg("jem", sgld_init="class-gaussian", sgld_grad_clip=1.0), tmp_path / "run", progress=False)
    ckpt = read_checkpoint(final)
    assert ckpt["config"].sgld.init == "class-gaussian" and ckpt["config"].sgld.grad_clip == 1.0
    stats = torch.load(tmp_path / "run" / "init.pt", weights_only=True)
    assert stats["mean"].shape == (10, 28 * 28) and stats["chol"].shape == (10, 28 * 28, 28 * 28)
