"""Tests of StaticRouter (the learned-pruning ablation) and of the shared decision offset."""

import pytest
import torch
from scipy.stats import binomtest

import dynroute
from dynroute import Router, StaticRouter

pytestmark = pytest.mark.usefixtures("one_thread")


def _converted(router_layer=Router) -> torch.nn.Module:
    torch.manual_seed(0)
    return dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32), router_layer=router_layer)


class TestStaticRouter:
    """One learned logit pair per block: the same decision for every image, trained like a Router."""

    def test_logits_do_not_depend_on_the_input(self) -> None:
        router = StaticRouter(16, init_open_prob=0.8)
        logits = router(torch.randn(5, 16, 8, 8))
        assert logits.shape == (5, 2) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, router(10 * torch.randn(5, 16, 8, 8)))
        assert torch.softmax(logits[0], 0)[1].item() == pytest.approx(0.8)

    def test_converted_model_takes_one_path_for_every_image(self) -> None:
        model = _converted(StaticRouter).eval()
        with torch.no_grad():
            for _, block in dynroute.gated_blocks(model):  # close some blocks, as training would
                block.router.logits.copy_(torch.randn(2))
            model(torch.randn(16, 3, 32, 32))
        assert dynroute.count_distinct_paths(dynroute.routing_paths(model)) == 1
        assert dynroute.macs_table(model).router_macs == (0,) * 9  # a static router costs nothing

    def test_training_samples_each_image_and_trains_the_pair(self) -> None:
        model = _converted(StaticRouter).train()
        router = model.layer1[0].router
        with torch.no_grad():
            router.logits.copy_(torch.tensor([0.0, 0.0]))  # run probability 0.5
        model(torch.randn(400, 3, 32, 32))
        gates = model.layer1[0].last_gate
        assert 0 < gates.min() < gates.max() < 1  # each image draws its own relaxed gate
        assert binomtest(int((gates > 0.5).sum()), 400, 0.5).pvalue > 1e-3
        gates.sum().backward()
        assert router.logits.grad is not None and router.logits.grad.abs().sum() > 0

    def test_state_dict_round_trip(self) -> None:
        model = _converted(StaticRouter)
        with torch.no_grad():
            for _, block in dynroute.gated_blocks(model):
                block.router.logits.normal_()
        dynroute.set_decision_offset(model, 0.7)
        restored = _converted(StaticRouter)
        restored.load_state_dict(model.state_dict())
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(restored.eval()(x), model.eval()(x), rtol=0, atol=0)
        assert restored.layer1[0].router.decision_offset.item() == pytest.approx(0.7)

    @pytest.mark.parametrize("bad", [{"init_open_prob": 1.0}, {"temperature": 0.0}, {"relaxation": "soft"}])
    def test_bad_settings_are_refused_as_for_router(self, bad) -> None:
        with pytest.raises(ValueError, match="must"):
            StaticRouter(16, **bad)


class TestDecisionOffset:
    """set_decision_offset: one shared threshold on the run logit, folded into the bias, kept in a buffer."""

    def test_offset_moves_the_decision_threshold(self) -> None:
        model = _converted().eval()
        with torch.no_grad():
            for _, block in dynroute.gated_blocks(model):
                block.router.fc2.weight.normal_(0.0, 2.0)
        x = torch.randn(64, 3, 32, 32)
        with torch.no_grad():
            model(x)
            trained = dynroute.routing_logits(model)
            dynroute.set_decision_offset(model, 0.5)
            model(x)
        margin = trained[..., 1] - trained[..., 0]
        # Layer by layer the inputs change with the decisions before them, so compare the first block alone.
        expected_first = (margin[:, 0] + 0.5 > 0).float()
        torch.testing.assert_close(dynroute.routing_paths(model)[:, 0], expected_first)
        for _, block in dynroute.gated_blocks(model):
            assert block.router.decision_offset.item() == 0.5

    def test_setting_twice_moves_by_the_difference(self) -> None:
        router = Router(16)
        bias = router.fc2.bias.detach().clone()
        router.set_decision_offset(1.5)
        router.set_decision_offset(-0.5)
        assert router.fc2.bias[1].item() == pytest.approx(bias[1].item() - 0.5)
        assert router.fc2.bias[0].item() == bias[0].item()
        router.set_decision_offset(0.0)
        torch.testing.assert_close(router.fc2.bias.detach(), bias)

    def test_checkpoint_without_the_buffer_loads_with_offset_zero(self) -> None:
        state = Router(16).state_dict()
        del state["decision_offset"]
        router = Router(16)
        router.set_decision_offset(2.0)
        router.load_state_dict(state)  # strict: a checkpoint from before the buffer still loads
        assert router.decision_offset.item() == 0.0

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_offset_is_refused(self, bad) -> None:
        with pytest.raises(ValueError, match="finite"):
            dynroute.set_decision_offset(_converted(), bad)


def test_routing_decisions_are_the_argmax_of_the_last_forward() -> None:
    model = _converted().train()
    model(torch.randn(6, 3, 32, 32))
    logits = dynroute.routing_logits(model)
    expected = (logits[..., 1] > logits[..., 0]).float()
    torch.testing.assert_close(dynroute.routing_decisions(model), expected)
    with torch.no_grad():
        model.eval()(torch.randn(6, 3, 32, 32))
    torch.testing.assert_close(dynroute.routing_decisions(model), dynroute.routing_paths(model))
