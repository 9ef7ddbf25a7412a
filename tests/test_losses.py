import math

import pytest
import torch

import dynroute
from dynroute import ConsistencyLoss, CostLoss, DiversityLoss


def _consistency_by_loop(paths, num_views, margin):
    total, samples = 0.0, paths.shape[0] // num_views
    for i in range(samples):
        views = [paths[i * num_views + j].tolist() for j in range(num_views)]
        centre = [sum(column) / num_views for column in zip(*views)]
        for view in views:
            distance = math.sqrt(sum((a - b) ** 2 for a, b in zip(view, centre)))
            total += max(distance - margin, 0.0) ** 2
    return total / (samples * num_views)


def _diversity_by_loop(paths, num_views, margin):
    samples = paths.shape[0] // num_views
    centres = []
    for i in range(samples):
        views = [paths[i * num_views + j].tolist() for j in range(num_views)]
        centres.append([sum(column) / num_views for column in zip(*views)])
    total = 0.0
    for i in range(samples):
        for j in range(samples):
            if i != j:
                distance = math.sqrt(sum((a - b) ** 2 for a, b in zip(centres[i], centres[j])))
                total += max(margin - distance, 0.0) ** 2
    return total / (samples * (samples - 1))


class TestConsistency:
    """Eq. 8 against a loop written from the formula."""

    @pytest.mark.parametrize("num_views", [2, 3, 4])
    @pytest.mark.parametrize("margin", [0.0, 0.2, 0.6])
    def test_matches_the_formula(self, num_views, margin):
        paths = torch.rand(5 * num_views, 7, dtype=torch.float64)
        expected = _consistency_by_loop(paths, num_views, margin)
        assert dynroute.consistency_loss(paths, num_views, margin).item() == pytest.approx(expected, rel=1e-9)
        assert ConsistencyLoss(num_views, margin)(paths).item() == pytest.approx(expected, rel=1e-9)

    def test_reductions(self):
        paths = torch.rand(8, 5)
        per_view = dynroute.consistency_loss(paths, 2, reduction="none")
        assert per_view.shape == (8,)
        torch.testing.assert_close(dynroute.consistency_loss(paths, 2, reduction="sum"), per_view.sum())

    def test_identical_views_give_zero_loss_and_finite_gradients(self):
        paths = torch.rand(3, 6).repeat_interleave(2, dim=0).requires_grad_()
        loss = dynroute.consistency_loss(paths, 2)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(paths.grad).all()

    def test_one_view_is_refused(self):
        with pytest.raises(ValueError, match="at least 2 views"):
            dynroute.consistency_loss(torch.rand(4, 3), 1)

    def test_batch_not_divisible_by_views_is_refused(self):
        with pytest.raises(ValueError, match="7 paths does not split into views of 2"):
            dynroute.consistency_loss(torch.rand(7, 3), 2)


class TestDiversity:
    """Eq. 9 against a loop written from the formula."""

    @pytest.mark.parametrize("num_views", [1, 2, 3])
    @pytest.mark.parametrize("margin", [0.5, 1.5])
    def test_matches_the_formula(self, num_views, margin):
        paths = torch.rand(6 * num_views, 5, dtype=torch.float64)
        expected = _diversity_by_loop(paths, num_views, margin)
        assert dynroute.diversity_loss(paths, num_views, margin).item() == pytest.approx(expected, rel=1e-9)
        assert DiversityLoss(num_views, margin)(paths).item() == pytest.approx(expected, rel=1e-9)

    def test_identical_samples_have_finite_gradients(self):
        paths = torch.full((4, 3), 0.5, requires_grad=True)
        loss = dynroute.diversity_loss(paths, num_views=1)
        loss.backward()
        assert loss.item() == pytest.approx(0.25) and torch.isfinite(paths.grad).all()

    def test_one_sample_is_refused(self):
        with pytest.raises(ValueError, match="at least 2 samples"):
            dynroute.diversity_loss(torch.rand(2, 3), num_views=2)

    def test_none_reduction_is_the_pair_matrix(self):
        matrix = dynroute.diversity_loss(torch.rand(4, 3), 1, reduction="none")
        assert matrix.shape == (4, 4) and matrix.diagonal().eq(0).all()


class TestCost:
    """Eq. 11 as a fraction of dense MACs, with and without a target."""

    def _model(self):
        return dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))

    def test_matches_the_formula(self):
        table = dynroute.macs_table(self._model())
        paths = torch.rand(6, table.num_blocks, dtype=torch.float64)
        expected = sum(
            (table.fixed_macs + sum(m * v for m, v in zip(table.block_macs, row.tolist()))) / table.dense_macs
            for row in paths
        ) / len(paths)
        assert CostLoss(table)(paths).item() == pytest.approx(expected, rel=1e-6)

    def test_all_open_costs_about_one(self):
        table = dynroute.macs_table(self._model())
        cost = CostLoss(table)(torch.ones(2, table.num_blocks)).item()
        assert cost == pytest.approx(1 + sum(table.router_macs) / table.dense_macs, rel=1e-6)

    def test_target_is_the_squared_gap_of_the_mean(self):
        table = dynroute.macs_table(self._model())
        paths = torch.rand(4, table.num_blocks)
        mean = CostLoss(table)(paths).item()
        assert CostLoss(table, target=0.6)(paths).item() == pytest.approx((mean - 0.6) ** 2, rel=1e-5)

    def test_gradients_reach_the_paths(self):
        table = dynroute.macs_table(self._model())
        paths = torch.rand(3, table.num_blocks, requires_grad=True)
        CostLoss(table)(paths).backward()
        torch.testing.assert_close(paths.grad, table.block_costs().expand(3, -1) / 3)

    def test_wrong_width_is_refused(self):
        table = dynroute.macs_table(self._model())
        with pytest.raises(ValueError, match="paths have 4 blocks but the cost table has 9"):
            CostLoss(table)(torch.rand(2, 4))

    def test_bad_target_is_refused(self):
        table = dynroute.macs_table(self._model())
        with pytest.raises(ValueError, match="target"):
            CostLoss(table, target=1.5)(torch.rand(2, table.num_blocks))

    def test_target_below_the_fixed_cost_is_refused_as_by_the_budget(self):
        table = dynroute.macs_table(self._model())
        target, message = table.fixed_cost() / 2, f"skips every block still costs {table.fixed_cost():.3f} of dense"
        for build in (lambda: CostLoss(table, target=target), lambda: dynroute.BudgetLoss(table, target=target)):
            with pytest.raises(ValueError, match=message):
                build()
        with pytest.raises(ValueError, match="still costs"):
            dynroute.cost_loss(torch.rand(2, table.num_blocks), table.block_costs(), table.fixed_cost(), target)

    def test_the_model_instead_of_its_table_is_refused(self):
        model = self._model()
        for build in (lambda: CostLoss(model), lambda: dynroute.BudgetLoss(model, target=0.6)):
            with pytest.raises(TypeError, match=r"pass dynroute.macs_table\(model\)"):
                build()


class TestPathValidation:
    """Every loss refuses malformed paths with a message that names the fix."""

    @pytest.mark.parametrize(
        "paths, message",
        [
            (torch.rand(4), r"\(batch, n_blocks\)"),
            (torch.ones(4, 3, dtype=torch.long), "floating point"),
            (torch.rand(0, 3), "empty batch"),
            (torch.tensor([[0.5, float("nan")], [0.1, 0.2]]), "NaN"),
            (torch.tensor([[0.5, 2.0], [0.1, 0.2]]), "outside \\[0, 1\\].*not router logits"),
        ],
    )
    def test_bad_paths(self, paths, message):
        with pytest.raises(ValueError, match=message):
            dynroute.diversity_loss(paths, num_views=1)

    @pytest.mark.parametrize(
        "build, message",
        [
            (lambda: dynroute.ConsistencyLoss(num_views=True), "num_views must be a positive int"),
            (lambda: dynroute.DiversityLoss(num_views=0), "num_views must be a positive int"),
            (lambda: dynroute.DiversityLoss(), "num_views"),
            (lambda: dynroute.ConsistencyLoss(2, margin=-0.2), "margin must be a finite distance >= 0"),
            (lambda: dynroute.DiversityLoss(2, margin=float("nan")), "margin must be a finite distance >= 0"),
            (lambda: dynroute.DiversityLoss(2, reduction="max"), "reduction must be one of"),
            (lambda: dynroute.diversity_loss(torch.rand(4, 3), 1, margin=-1.0), "margin"),
            (lambda: dynroute.consistency_loss(torch.rand(4, 0), 2), "paths have no blocks"),
            (lambda: dynroute.ConsistencyLoss(num_views=1), "consistency needs at least 2 views"),
        ],
        ids=[
            "bool-views",
            "zero-views",
            "views-omitted",
            "negative-margin",
            "nan-margin",
            "bad-reduction",
            "functional-margin",
            "no-blocks",
            "one-view-consistency-module",
        ],
    )
    def test_bad_settings_fail_at_construction(self, build, message):
        with pytest.raises((ValueError, TypeError), match=message):
            build()

    def test_bad_reduction(self):
        with pytest.raises(ValueError, match="reduction"):
            dynroute.consistency_loss(torch.rand(4, 3), 2, reduction="max")


class TestExecutionRate:
    """ConvNet-AIG's per-block target rate against a loop over blocks."""

    @pytest.mark.parametrize("target", [0.3, torch.tensor([0.2, 0.5, 0.9, 1.0])])
    def test_matches_a_loop(self, target) -> None:
        paths = torch.rand(12, 4, requires_grad=True)
        rates = target if isinstance(target, torch.Tensor) else torch.full((4,), target)
        expected = sum((paths[:, k].mean() - rates[k]) ** 2 for k in range(4)) / 4
        torch.testing.assert_close(dynroute.execution_rate_loss(paths, target), expected)
        torch.testing.assert_close(dynroute.ExecutionRateLoss(target)(paths), expected)

    def test_a_static_half_path_and_a_per_image_half_path_both_meet_rate_one_half(self) -> None:
        per_image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # each block runs for half the images
        assert dynroute.execution_rate_loss(per_image, 0.5).item() == 0.0
        pruned = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # block 1 always, block 2 never
        assert dynroute.execution_rate_loss(pruned, 0.5).item() == pytest.approx(0.25)

    @pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), torch.tensor([[0.5]])])
    def test_bad_target(self, bad) -> None:
        with pytest.raises(ValueError, match="target rates"):
            dynroute.ExecutionRateLoss(bad)

    def test_wrong_number_of_rates(self) -> None:
        with pytest.raises(ValueError, match="3 target rates"):
            dynroute.execution_rate_loss(torch.rand(4, 2), torch.tensor([0.1, 0.2, 0.3]))


class TestBatchLayout:
    """The losses need sample-major batches; a view-major one is not detected, so every docstring says so."""

    DOCUMENTED = [
        dynroute.consistency_loss,
        dynroute.diversity_loss,
        dynroute.ConsistencyLoss,
        dynroute.DiversityLoss,
        dynroute.CoDiNetLoss,
    ]

    @pytest.mark.parametrize("loss", DOCUMENTED, ids=[loss.__name__ for loss in DOCUMENTED])
    def test_docstring_names_the_layout_and_the_one_way_to_build_it(self, loss):
        doc = " ".join(loss.__doc__.split())
        assert "sample-major" in doc
        assert "MultiViewTransform" in doc and "multiview_collate" in doc
        assert "view-major" in doc and "torch.cat([view1, view2])" in doc

    def test_a_view_major_batch_passes_silently_with_other_values(self):
        """Two images, each routed the same way in both views: consistency is 0 sample-major, not view-major."""
        first, second = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0])
        sample_major = torch.stack([first, first, second, second])
        view_major = torch.cat([torch.stack([first, second]), torch.stack([first, second])])  # cat([view1, view2])
        assert dynroute.consistency_loss(sample_major, num_views=2, margin=0.0).item() == 0.0
        assert dynroute.consistency_loss(view_major, num_views=2, margin=0.0).item() > 0.0
