"""bfloat16 autocast on CPU: training steps work, losses stay float32, eval decisions match float32."""

import pytest
import torch
import torch.nn.functional as F
from routed_models import images, routed_model

import dynroute


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


class TestTrainingStep:
    """One step of each stage under autocast: finite float32 losses and gradients for every trainable part."""

    @pytest.mark.parametrize("hard", [False, True], ids=["stage1-relaxed", "stage2-hard"])
    def test_step(self, hard):
        model = routed_model().train()
        for _, block in dynroute.gated_blocks(model):
            block.hard_decisions = hard
            block.router.requires_grad_(not hard)
        cost = dynroute.CostLoss(dynroute.macs_table(model), target=0.6)
        x, y = images(8), torch.arange(8) % 10
        with _autocast():
            logits = model(x)
            paths = dynroute.routing_paths(model)
            losses = {
                "ce": F.cross_entropy(logits, y),
                "consistency": dynroute.consistency_loss(paths, num_views=2),
                "diversity": dynroute.diversity_loss(paths, num_views=2),
                "cost": cost(paths),
            }
        assert logits.dtype == torch.bfloat16  # autocast really ran the convolutions in bfloat16
        assert dynroute.routing_logits(model).dtype == torch.float32
        for name, loss in losses.items():
            assert loss.dtype == torch.float32, name
            assert torch.isfinite(loss), name
        sum(losses.values()).backward()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
        routers = [p for n, p in trainable if ".router.fc2." in n]
        if hard:
            assert not routers  # frozen in stage 2
        else:
            assert routers and all(p.grad.abs().sum() > 0 for p in routers)


class TestLossesInFloat32:
    """Under autocast each loss equals its float32 value outside it (a bfloat16 matmul would round it)."""

    def test_equal_to_float32(self):
        model = routed_model()
        table = dynroute.macs_table(model)
        paths = torch.rand(16, table.num_blocks)
        expected = {
            "consistency": dynroute.consistency_loss(paths, 2),
            "diversity": dynroute.diversity_loss(paths, 2),
            "cost": dynroute.cost_loss(paths, table.block_costs(), table.fixed_cost(), target=0.5),
        }
        with _autocast():
            got = {
                "consistency": dynroute.consistency_loss(paths.bfloat16(), 2),
                "diversity": dynroute.diversity_loss(paths, 2),
                "cost": dynroute.cost_loss(paths, table.block_costs(), table.fixed_cost(), target=0.5),
            }
        torch.testing.assert_close(got["diversity"], expected["diversity"], rtol=0, atol=0)
        torch.testing.assert_close(got["cost"], expected["cost"], rtol=0, atol=0)
        # bfloat16 input paths are rounded once, then the loss runs in float32
        reference = dynroute.consistency_loss(paths.bfloat16().float(), 2)
        torch.testing.assert_close(got["consistency"], reference, rtol=0, atol=0)
        assert all(value.dtype == torch.float32 for value in got.values())


class TestEvalDecisions:
    """Eval under autocast takes the float32 decisions, except where a float32 margin is within rounding."""

    def test_decisions_match_float32(self):
        model = routed_model()
        x = images(64, seed=7)
        with torch.no_grad():
            model(x)
            paths32, logits32 = dynroute.routing_paths(model), dynroute.routing_logits(model)
            with _autocast():
                model(x)
                paths16 = dynroute.routing_paths(model)
        assert 0.2 < paths32.mean() < 0.8  # the routers really route
        margin = (logits32[..., 1] - logits32[..., 0]).abs()
        flipped = paths16 != paths32
        # A flip needs a small float32 margin in its block or an earlier flip that changed the input.
        first_flip = flipped.float().cumsum(1) == 1
        assert (margin[first_flip & flipped] < 0.25).all()
        assert flipped.float().mean() <= 0.05, f"{flipped.float().mean():.3f} of the decisions differ"
