"""Properties of the CoDiNet losses for any paths (hypothesis), and their gradients (gradcheck, float64)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import dynroute

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def batches(draw, min_views: int = 1):
    """(paths (L * M, n) float64 in [0, 1], L, M): L samples of M adjacent views."""
    samples = draw(st.integers(2, 5))
    views = draw(st.integers(min_views, 3))
    blocks = draw(st.integers(1, 6))
    values = draw(arrays(np.float64, (samples * views, blocks), elements=st.floats(0.0, 1.0)))
    return torch.from_numpy(values), samples, views


def _permute(paths: torch.Tensor, samples: int, views: int, seed: int) -> torch.Tensor:
    """Shuffle the samples, and the views within each sample, keeping the sample-major layout."""
    generator = torch.Generator().manual_seed(seed)
    grouped = paths.unflatten(0, (samples, views))[torch.randperm(samples, generator=generator)]
    within = torch.stack([torch.randperm(views, generator=generator) for _ in range(samples)])
    return grouped.gather(1, within.unsqueeze(-1).expand_as(grouped)).flatten(0, 1)


def _distances_to_centres(paths: torch.Tensor, views: int) -> torch.Tensor:
    grouped = paths.unflatten(0, (-1, views))
    return (grouped - grouped.mean(1, keepdim=True)).norm(dim=-1)


def _centre_distances(paths: torch.Tensor, views: int) -> torch.Tensor:
    centres = paths.unflatten(0, (-1, views)).mean(1)
    distances = torch.cdist(centres, centres)
    return distances[~torch.eye(len(centres), dtype=torch.bool)]


# loss, fewest views it takes, margin range
PATH_LOSSES = {
    "consistency": (dynroute.consistency_loss, 2, 1.0),
    "diversity": (dynroute.diversity_loss, 1, 2.0),
}


class TestPathLossProperties:
    """Eq. 8 and Eq. 9 are >= 0 and do not depend on the order of the samples or of their views."""

    @pytest.mark.parametrize("name", PATH_LOSSES)
    @SETTINGS
    @given(data=st.data())
    def test_non_negative(self, name, data):
        loss, min_views, max_margin = PATH_LOSSES[name]
        paths, _, views = data.draw(batches(min_views))
        assert loss(paths, views, data.draw(st.floats(0.0, max_margin))) >= 0

    @pytest.mark.parametrize("name", PATH_LOSSES)
    @SETTINGS
    @given(data=st.data(), seed=st.integers(0, 2**16))
    def test_invariant_to_permutations(self, name, data, seed):
        loss, min_views, _ = PATH_LOSSES[name]
        paths, samples, views = data.draw(batches(min_views))
        torch.testing.assert_close(loss(_permute(paths, samples, views, seed), views), loss(paths, views))


class TestMargins:
    """Eq. 8 is zero exactly when every view lies within m_c of its centre; Eq. 9 when centres are m_d apart."""

    @SETTINGS
    @given(batches(min_views=2))
    def test_consistency_zero_iff_views_within_margin(self, batch):
        paths, _, views = batch
        farthest = _distances_to_centres(paths, views).max().item()
        assert dynroute.consistency_loss(paths, views, margin=farthest * (1 + 1e-9) + 1e-12) == 0
        if farthest > 1e-6:
            assert dynroute.consistency_loss(paths, views, margin=farthest / 2) > 0

    @SETTINGS
    @given(batches())
    def test_diversity_zero_iff_centres_apart(self, batch):
        paths, _, views = batch
        nearest = _centre_distances(paths, views).min().item()
        assert dynroute.diversity_loss(paths, views, margin=nearest * (1 - 1e-9)) == 0
        assert dynroute.diversity_loss(paths, views, margin=nearest + 0.1) > 0


class TestCostProperties:
    """Eq. 11 is >= 0 for non-negative costs and does not depend on the order of the samples."""

    @SETTINGS
    @given(batches(), st.integers(0, 2**16))
    def test_non_negative_and_order_free(self, batch, seed):
        paths, samples, views = batch
        costs = torch.rand(paths.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        loss = dynroute.cost_loss(paths, costs, fixed_cost=0.1)
        assert loss >= 0
        permuted = _permute(paths, samples, views, seed)
        torch.testing.assert_close(dynroute.cost_loss(permuted, costs, fixed_cost=0.1), loss)
        assert dynroute.cost_loss(paths, costs, 0.1, target=0.5) >= 0


class TestGradients:
    """Analytic gradients equal finite differences in float64 (margins chosen so that penalties are active)."""

    @pytest.mark.parametrize("seed", range(3))
    def test_gradcheck(self, seed):
        generator = torch.Generator().manual_seed(seed)
        paths = torch.rand(12, 5, generator=generator, dtype=torch.float64).mul(0.9).add(0.05).requires_grad_()
        costs = torch.rand(5, generator=generator, dtype=torch.float64)
        losses = {
            "consistency": lambda p: dynroute.consistency_loss(p, num_views=3, margin=0.05),
            "consistency-none": lambda p: dynroute.consistency_loss(p, num_views=2, margin=0.05, reduction="none"),
            "diversity": lambda p: dynroute.diversity_loss(p, num_views=2, margin=1.5),
            "diversity-none": lambda p: dynroute.diversity_loss(p, num_views=1, margin=1.5, reduction="none"),
            "cost": lambda p: dynroute.cost_loss(p, costs, fixed_cost=0.2, target=0.4),
        }
        for name, loss in losses.items():
            assert loss(paths).dtype == torch.float64, name
            assert torch.autograd.gradcheck(loss, (paths,), eps=1e-6, atol=1e-5), name

    def test_gradient_is_zero_not_nan_for_identical_views(self):
        paths = torch.full((4, 3), 0.5, dtype=torch.float64, requires_grad=True)
        (dynroute.consistency_loss(paths, 2) + dynroute.diversity_loss(paths, 2)).backward()
        assert torch.isfinite(paths.grad).all()
