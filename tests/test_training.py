"""Tests of two-stage training (dynroute.training), the adaptive budget (BudgetLoss) and CoDiNetLoss."""

import copy
import warnings

import pytest
import torch

import dynroute
from dynroute.models.cifar_resnet import CifarResNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _routed(blocks_per_stage: int = 1, size: int = 16) -> torch.nn.Module:
    torch.manual_seed(0)
    return dynroute.convert_resnet(CifarResNet(blocks_per_stage, num_classes=3), input_size=(3, size, size))


class TestSetStage:
    """Stage 2 = hard decisions in train mode and frozen routers; stage 1 undoes it."""

    def test_stage_two_freezes_routers_and_hardens_gates(self) -> None:
        model = dynroute.set_stage(_routed(), 2).train()
        assert dynroute.get_stage(model) == 2
        assert all(block.hard_decisions for _, block in dynroute.gated_blocks(model))
        assert not any(p.requires_grad for p in dynroute.router_parameters(model))
        assert all(p.requires_grad for p in dynroute.block_parameters(model))
        model(torch.randn(8, 3, 16, 16))
        paths = dynroute.routing_paths(model)
        assert set(paths.unique().tolist()) <= {0.0, 1.0} and not paths.requires_grad

    def test_stage_one_restores(self) -> None:
        model = dynroute.set_stage(dynroute.set_stage(_routed(), 2), 1).train()
        assert dynroute.get_stage(model) == 1
        assert all(p.requires_grad for p in model.parameters())
        model(torch.randn(8, 3, 16, 16))
        assert dynroute.routing_paths(model).requires_grad

    def test_stage_two_step_leaves_routers_unchanged(self) -> None:
        model = dynroute.set_stage(_routed(), 2).train()
        routers = [p.detach().clone() for p in dynroute.router_parameters(model)]
        blocks = [p.detach().clone() for p in dynroute.block_parameters(model)]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.nn.functional.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(routers, dynroute.router_parameters(model)))
        assert any(not torch.equal(a, b) for a, b in zip(blocks, dynroute.block_parameters(model)))

    @pytest.mark.parametrize("bad", [0, 3, "2", None])
    def test_bad_stage(self, bad) -> None:
        with pytest.raises(ValueError, match="stage must be 1"):
            dynroute.set_stage(_routed(), bad)

    def test_unconverted_model_is_refused(self) -> None:
        with pytest.raises(TypeError, match="convert"):
            dynroute.set_stage(CifarResNet(1), 2)


class TestParameterGroups:
    """Router and block parameters partition the model's parameters."""

    def test_partition(self) -> None:
        model = _routed()
        routers, blocks = dynroute.router_parameters(model), dynroute.block_parameters(model)
        expected = {id(p) for name, p in model.named_parameters() if ".router." in name}
        assert {id(p) for p in routers} == expected
        assert {id(p) for p in routers} | {id(p) for p in blocks} == {id(p) for p in model.parameters()}
        assert not {id(p) for p in routers} & {id(p) for p in blocks}


class TestCheckpoint:
    """save_checkpoint / load_checkpoint round-trip weights, stage and extras."""

    def test_round_trip(self, tmp_path) -> None:
        model = dynroute.set_stage(_routed(), 2)
        with torch.no_grad():
            for param in dynroute.router_parameters(model):
                param.normal_()
        dynroute.save_checkpoint(tmp_path / "ckpt.pt", model, epoch=3)
        restored = _routed()
        extra = dynroute.load_checkpoint(tmp_path / "ckpt.pt", restored)
        assert extra == {"epoch": 3}
        assert dynroute.get_stage(restored) == 2
        images = torch.randn(6, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(model.eval()(images), restored.eval()(images))
        assert torch.equal(dynroute.routing_paths(model), dynroute.routing_paths(restored))

    def test_compiled_model_is_saved_and_loaded_with_its_own_keys(self, tmp_path) -> None:
        model = _routed()
        dynroute.save_checkpoint(tmp_path / "ckpt.pt", torch.compile(model))  # wraps; compiles at the first call
        saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
        assert set(saved) == set(model.state_dict())
        restored = _routed()
        dynroute.load_checkpoint(tmp_path / "ckpt.pt", torch.compile(restored))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
        assert dynroute.macs_table(torch.compile(restored)) is dynroute.macs_table(restored)

    def test_dense_model(self, tmp_path) -> None:
        model = CifarResNet(1)
        dynroute.save_checkpoint(tmp_path / "dense.pt", model)
        other = CifarResNet(1)
        dynroute.load_checkpoint(tmp_path / "dense.pt", other)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))

    def test_foreign_file_is_refused(self, tmp_path) -> None:
        torch.save(CifarResNet(1).state_dict(), tmp_path / "plain.pt")
        with pytest.raises(ValueError, match="not a dynroute checkpoint"):
            dynroute.load_checkpoint(tmp_path / "plain.pt", CifarResNet(1))


class TestBudgetLoss:
    """The augmented-Lagrangian cost term, and its multiplier moved by an explicit controller step."""

    def test_loss_follows_the_formula_and_leaves_gamma(self) -> None:
        table = dynroute.macs_table(_routed())
        budget = dynroute.BudgetLoss(table, target=0.5, penalty=3.0, step_size=0.2, initial_gamma=0.7)
        paths = torch.rand(10, table.num_blocks, requires_grad=True)
        costs = table.block_costs()
        mean = torch.stack([table.fixed_cost() + (paths[i] * costs).sum() for i in range(10)]).mean()
        expected = 0.7 * (mean - 0.5) + 1.5 * (mean - 0.5) ** 2
        assert torch.allclose(budget(paths), expected, atol=1e-6)
        assert budget.gamma.item() == pytest.approx(0.7)  # the loss has no side effects

    def test_update_gamma_integrates_the_measured_gap(self) -> None:
        table = dynroute.macs_table(_routed())
        budget = dynroute.BudgetLoss(table, target=0.5, step_size=0.2, initial_gamma=0.7)
        decisions = torch.randint(0, 2, (10, table.num_blocks)).float()
        costs = table.block_costs()
        measured = torch.stack([table.fixed_cost() + (decisions[i] * costs).sum() for i in range(10)]).mean()
        assert budget.update_gamma(decisions) == pytest.approx(measured.item(), abs=1e-6)
        assert budget.gamma.item() == pytest.approx(0.7 + 0.2 * (measured.item() - 0.5), abs=1e-6)
        assert budget.last_measured == pytest.approx(measured.item(), abs=1e-6)

    def test_gamma_is_saved(self) -> None:
        table = dynroute.macs_table(_routed())
        budget = dynroute.BudgetLoss(table, target=0.5, initial_gamma=0.3)
        restored = dynroute.BudgetLoss(table, target=0.5)
        restored.load_state_dict(budget.state_dict())
        assert restored.gamma.item() == pytest.approx(0.3)

    def test_gamma_stops_at_zero(self) -> None:
        """A batch cheaper than the target lowers gamma to 0, not below; then only the quadratic term pulls."""
        table = dynroute.macs_table(_routed())
        budget = dynroute.BudgetLoss(table, target=0.9, penalty=2.0, step_size=0.5, initial_gamma=0.01)
        skip_all = torch.zeros(4, table.num_blocks)
        paths = torch.zeros(4, table.num_blocks, requires_grad=True)
        budget.update_gamma(skip_all)
        assert 0.01 + 0.5 * (table.fixed_cost() - 0.9) < 0  # the unclamped update would go negative
        assert budget.gamma.item() == 0.0 and budget.last_measured == pytest.approx(table.fixed_cost())
        gap = table.fixed_cost() - 0.9
        assert budget(paths).item() == pytest.approx(0.5 * 2.0 * gap**2, rel=1e-6)
        assert budget.gamma.item() == 0.0

    @pytest.mark.parametrize("initial_gamma", [-0.1, float("nan")])
    def test_negative_initial_gamma_is_refused(self, initial_gamma: float) -> None:
        with pytest.raises(ValueError, match="initial_gamma must be >= 0"):
            dynroute.BudgetLoss(dynroute.macs_table(_routed()), target=0.5, initial_gamma=initial_gamma)

    @pytest.mark.parametrize("target", [0.0, 0.01, 1.5])
    def test_unreachable_target(self, target: float) -> None:
        with pytest.raises(ValueError, match="target must be"):
            dynroute.BudgetLoss(dynroute.macs_table(_routed()), target=target)

    def test_trim_moves_every_decision_offset(self) -> None:
        model = dynroute.set_stage(_routed(), 2).train()
        table = dynroute.macs_table(model)
        budget = dynroute.BudgetLoss(table, target=0.5, trim_step=0.3)
        biases = [block.router.fc2.bias.clone() for _, block in dynroute.gated_blocks(model)]
        model(torch.randn(8, 3, 16, 16))
        measured = dynroute.sample_macs(dynroute.routing_paths(model), table).mean().item() / table.dense_macs
        shift = budget.trim(model)
        assert shift == pytest.approx(-0.3 * (measured - 0.5), abs=1e-6)
        for before, (_, block) in zip(biases, dynroute.gated_blocks(model)):
            assert block.router.fc2.bias[0] == before[0]
            assert block.router.fc2.bias[1].item() == pytest.approx(before[1].item() + shift, abs=1e-6)
            assert block.router.decision_offset.item() == pytest.approx(shift, abs=1e-6)

    @pytest.mark.slow
    @pytest.mark.parametrize("target", [0.4, 0.65])
    def test_training_lands_on_the_budget(self, target: float) -> None:
        """Default settings, no tuning: stage 1 + trimmed stage 2 end within 2 points of the target at eval."""
        model = _routed(blocks_per_stage=2)
        table = dynroute.macs_table(model)
        criterion = dynroute.CoDiNetLoss(table, num_views=1, alpha=0.0, beta=0.0, target=target)
        optimizer = torch.optim.SGD(
            [
                {"params": dynroute.block_parameters(model), "lr": 0.05},
                {"params": dynroute.router_parameters(model), "lr": 0.1},
            ],
            momentum=0.9,
        )
        generator = torch.Generator().manual_seed(1)

        def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.randint(0, 2, (size,), generator=generator)
            signal = torch.empty(size, 1, 1, 1).uniform_(0.0, 1.0, generator=generator)
            images = torch.randn(size, 3, 16, 16, generator=generator) + (2 * labels - 1).view(-1, 1, 1, 1) * signal
            return images, labels

        model.train()
        for step in range(240):
            dynroute.set_stage(model, 1 if step < 160 else 2)
            images, labels = batch(32)
            logits = model(images)
            loss, _ = criterion(logits, labels, dynroute.routing_paths(model))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            criterion.step(model)
        with torch.no_grad():
            model.eval()(batch(512)[0])
        assert dynroute.macs_fraction(dynroute.routing_paths(model), table) == pytest.approx(target, abs=0.02)


class TestCoDiNetLoss:
    """CE plus the three path terms, with the documented fallbacks."""

    @staticmethod
    def _forward(model, views: int):
        model.train()
        images = torch.randn(4 * views, 3, 16, 16)
        labels = torch.arange(4).repeat_interleave(views) % 3
        return model(images), labels, dynroute.routing_paths(model)

    @pytest.mark.parametrize("gamma", [0.5, 0.0], ids=["fixed-gamma", "zero-gamma-leaves-the-cost-out"])
    def test_total_is_the_weighted_sum(self, gamma: float) -> None:
        model = _routed()
        table = dynroute.macs_table(model)
        criterion = dynroute.CoDiNetLoss(table, num_views=2, alpha=0.3, beta=0.4, gamma=gamma)
        logits, labels, paths = self._forward(model, 2)
        loss, terms = criterion(logits, labels, paths)
        expected = (
            torch.nn.functional.cross_entropy(logits, labels)
            + 0.3 * dynroute.consistency_loss(paths, 2)
            + 0.4 * dynroute.diversity_loss(paths, 2)
            + gamma * dynroute.cost_loss(paths, table.block_costs(), table.fixed_cost())
        )
        assert torch.allclose(loss, expected)
        assert set(terms) == {"ce", "consistency", "diversity"} | ({"cost"} if gamma else set())

    def test_path_terms_on_run_probabilities(self) -> None:
        model = _routed()
        table = dynroute.macs_table(model)
        criterion = dynroute.CoDiNetLoss(table, num_views=2, alpha=0.3, beta=0.4, gamma=0.5)
        logits, labels, paths = self._forward(model, 2)
        run_probs = dynroute.routing_logits(model).softmax(-1)[..., 1]
        loss, terms = criterion(logits, labels, paths, run_probs)
        expected = (
            torch.nn.functional.cross_entropy(logits, labels)
            + 0.3 * dynroute.consistency_loss(run_probs, 2)
            + 0.4 * dynroute.diversity_loss(run_probs, 2)
            + 0.5 * dynroute.cost_loss(paths, table.block_costs(), table.fixed_cost())  # the cost stays on the gates
        )
        torch.testing.assert_close(loss, expected)
        assert terms["diversity"] != pytest.approx(dynroute.diversity_loss(paths, 2).item())
        with pytest.raises(ValueError, match=r"run_probs have shape \(4, 3\) but paths \(8, 3\)"):
            criterion(logits, labels, paths, run_probs[::2])

    def test_one_view_leaves_consistency_out(self) -> None:
        model = _routed()
        criterion = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=1)
        loss, terms = criterion(*self._forward(model, 1))
        assert "consistency" not in terms and "diversity" in terms
        loss.backward()

    def test_negative_gamma_is_refused(self) -> None:
        with pytest.raises(ValueError, match="gamma must be >= 0, but got -1.0"):
            dynroute.CoDiNetLoss(dynroute.macs_table(_routed()), num_views=2, gamma=-1.0)

    def test_labels_not_repeated_per_view_name_the_layout(self) -> None:
        model = _routed()
        criterion = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=2)
        logits, labels, paths = self._forward(model, 2)
        with pytest.raises(ValueError, match=r"labels have 4 rows but logits 8; .*\(L \* M,\) = \(8,\).*2 adjacent "):
            criterion(logits, labels[0::2], paths)

    def test_target_uses_the_adaptive_budget(self) -> None:
        model = _routed()
        criterion = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=2, target=0.5, step_size=0.3)
        assert isinstance(criterion.cost, dynroute.BudgetLoss)
        criterion.cost.gamma.fill_(1.0)
        _, terms = criterion(*self._forward(model, 2))
        assert terms["gamma"] == 1.0 and criterion.cost.gamma.item() == 1.0  # the loss has no side effects
        decisions = dynroute.routing_decisions(model)
        criterion.step(model)  # the controller: gamma moves by the cost of the hard decisions of that forward
        measured = dynroute.macs_fraction(decisions, dynroute.macs_table(model))
        assert criterion.cost.gamma.item() == pytest.approx(1.0 + 0.3 * (measured - 0.5), abs=1e-6)

    def test_rate_term_adds_the_weighted_execution_rate_loss(self) -> None:
        model = _routed()
        table = dynroute.macs_table(model)
        criterion = dynroute.CoDiNetLoss(table, num_views=2, alpha=0.0, beta=0.0, target=0.6, rate_weight=2.0)
        logits, labels, paths = self._forward(model, 2)
        loss, terms = criterion(logits, labels, paths)
        rate = (0.6 - table.fixed_cost()) / (1 - table.fixed_cost())  # the one rate that spends the budget
        by_hand = sum((paths[:, k].mean() - rate) ** 2 for k in range(paths.shape[1])) / paths.shape[1]
        assert terms["rate"] == pytest.approx(by_hand.item(), abs=1e-6)
        expected = torch.nn.functional.cross_entropy(logits, labels) + 2.0 * by_hand + criterion.cost(paths)
        torch.testing.assert_close(loss, expected)
        with pytest.raises(ValueError, match="rate_target"):
            dynroute.CoDiNetLoss(table, num_views=2, rate_weight=1.0)

    def test_stage_two_is_cross_entropy_only(self) -> None:
        model = dynroute.set_stage(_routed(), 2)
        criterion = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=2, target=0.5)
        logits, labels, paths = self._forward(model, 2)
        loss, terms = criterion(logits, labels, paths)
        assert terms.keys() == {"ce"}
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, labels))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            criterion.step(model)  # stage 2 drops the path terms by design: no warning
        assert criterion.cost.gamma.item() == 0.0  # stage 2 trims the threshold, not gamma

    def test_stage_one_step_in_eval_mode_warns_at_step(self) -> None:
        model = _routed()
        criterion = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=2, target=0.5)
        model.eval()  # a stage-1 step that forgot model.train()
        logits, labels = model(torch.randn(8, 3, 16, 16)), torch.arange(4).repeat_interleave(2) % 3
        _, terms = criterion(logits, labels, dynroute.routing_paths(model))
        assert terms.keys() == {"ce"}
        with pytest.warns(UserWarning, match=r"paths of this stage-1 step carried no gradient.*model.train\(\)"):
            criterion.step(model)
        assert criterion.cost.gamma.item() == 0.0

    @pytest.mark.parametrize("batch", [8, 7], ids=["views", "single-view-odd-batch"])
    def test_validation_without_autograd_does_not_warn(self, batch) -> None:
        # A validation loop may reuse the training criterion on single-view batches of any size.
        model = _routed().eval()
        criterion = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=2, target=0.5)
        labels = torch.randint(0, 3, (batch,))
        with torch.no_grad():
            logits = model(torch.randn(batch, 3, 16, 16))
            loss, terms = criterion(logits, labels, dynroute.routing_paths(model))
        assert terms.keys() == {"ce"}
        torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            criterion.step(model)
        assert criterion.cost.gamma.item() == 0.0  # a validation forward does not move the controller


class TestCalibrate:
    """calibrate_budget: one shared shift of the decision offsets puts the eval-mode cost of given images on target."""

    @staticmethod
    def _model_and_loader() -> tuple[torch.nn.Module, list[torch.Tensor]]:
        model = _routed(blocks_per_stage=3)
        with torch.no_grad():  # routers that look at their input, so decisions differ between images
            for _, block in dynroute.gated_blocks(model):
                block.router.fc2.weight.normal_(0.0, 3.0)
        generator = torch.Generator().manual_seed(2)
        return model, [torch.randn(32, 3, 16, 16, generator=generator) for _ in range(4)]

    @staticmethod
    def _eval_cost(model: torch.nn.Module, loader: list[torch.Tensor]) -> float:
        """The cost measured by hand: eval forward per batch, per-sample MACs summed block by block."""
        table = dynroute.macs_table(model)
        total, count = 0.0, 0
        with torch.no_grad():
            for images in loader:
                model.eval()(images)
                for row in dynroute.routing_paths(model):
                    total += table.fixed_macs + sum(m for m, gate in zip(table.block_macs, row) if gate >= 0.5)
                    count += 1
        return total / count / table.dense_macs

    @pytest.mark.parametrize("target", [0.45, 0.8])
    def test_lands_on_the_target_with_one_shared_shift(self, target: float) -> None:
        model, loader = self._model_and_loader()
        dynroute.set_decision_offset(model, 0.25)  # calibration shifts from where the offsets are
        before = {key: value.clone() for key, value in model.state_dict().items()}
        assert abs(self._eval_cost(model, loader) - target) > 0.05  # there is a gap to close
        model.train()
        returned = dynroute.calibrate_budget(model, loader, target, tolerance=0.01)
        assert model.training and all(module.training for module in model.modules())  # mode restored
        assert returned == pytest.approx(self._eval_cost(model, loader), abs=1e-9)
        assert returned == pytest.approx(target, abs=0.01)
        after = model.state_dict()
        shifts = {round((after[key][1] - before[key][1]).item(), 5) for key in before if key.endswith("fc2.bias")}
        assert len(shifts) == 1 and shifts != {0.0}
        offsets = {round(after[key].item() - 0.25, 5) for key in before if key.endswith("decision_offset")}
        assert offsets == shifts  # the buffers record the shift folded into the run biases
        for key, value in before.items():
            if key.endswith("fc2.bias"):
                assert after[key][0] == value[0]
            elif not key.endswith("decision_offset"):
                assert torch.equal(after[key], value), key

    def test_at_most_keeps_the_cost_under_a_cap(self) -> None:
        model, loader = self._model_and_loader()
        start = self._eval_cost(model, loader)
        cap = start - 0.004  # just under the trained cost: within a loose tolerance, but over the cap
        unchanged = dynroute.calibrate_budget(copy.deepcopy(model), loader, cap, tolerance=0.01)
        assert unchanged == pytest.approx(start)  # as an equality, already close enough
        returned = dynroute.calibrate_budget(model, loader, cap, tolerance=0.01, at_most=True)
        assert cap - 0.01 <= returned <= cap
        assert returned == pytest.approx(self._eval_cost(model, loader), abs=1e-9)

    def test_cost_already_on_target_changes_nothing(self) -> None:
        model, loader = self._model_and_loader()
        before = {key: value.clone() for key, value in model.state_dict().items()}
        dynroute.calibrate_budget(model, loader, self._eval_cost(model, loader))
        assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())

    def test_failing_loader_leaves_the_trained_thresholds(self) -> None:
        model, batches = self._model_and_loader()
        before = {key: value.clone() for key, value in model.state_dict().items()}

        class BreaksOnSecondPass:
            passes = 0

            def __iter__(self):
                self.passes += 1
                if self.passes > 1:
                    raise OSError("disk gone")
                return iter(batches)

        with pytest.raises(OSError, match="disk gone"):
            dynroute.calibrate_budget(model, BreaksOnSecondPass(), 0.45)
        assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())

    def test_bad_arguments(self) -> None:
        model, loader = self._model_and_loader()
        with pytest.raises(ValueError, match="target must be"):
            dynroute.calibrate_budget(model, loader, 1.5)
        with pytest.raises(ValueError, match="tolerance"):
            dynroute.calibrate_budget(model, loader, 0.5, tolerance=0)
        with pytest.raises(TypeError, match="convert"):
            dynroute.calibrate_budget(CifarResNet(1), loader, 0.5)
