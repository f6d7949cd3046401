"""The one norm step and projection (infra/norms.py) that every gradient loop of the suite uses."""

from __future__ import annotations

import pytest
import torch

from infra.norms import ascent_step, delta_norm, project


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.7)])
def test_step_and_projection_are_the_threat_models(norm, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=g)
    grad = torch.randn(16, 1, 8, 8, generator=g)
    stepped = ascent_step(x, grad, norm, 0.3)
    moved = delta_norm(stepped - x, norm)
    assert torch.allclose(moved, torch.full_like(moved, 0.3), atol=1e-5)  # a step of exactly alpha in the norm
    assert (((stepped - x) * grad).flatten(1).sum(1) > 0).all()  # uphill
    p = project(x, stepped, norm, eps)
    assert (delta_norm(p - x, norm) <= eps + 1e-6).all() and p.min() >= 0 and p.max() <= 1
    assert torch.allclose(project(x, p, norm, eps), p, atol=1e-6)  # idempotent
    inside = x + 0.5 * (project(x, stepped, norm, eps) - x)
    assert torch.allclose(project(x, inside, norm, eps), inside.clamp(0, 1), atol=1e-6)  # the ball's inside stays
    with pytest.raises(ValueError):
        project(x, stepped, "l7", eps)
