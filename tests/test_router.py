import math

import pytest
import timm
import torch
from scipy.stats import binomtest

import dynroute
from dynroute import Router


class TestRouter:
    """Router (Eq. 3-6): shapes, initial opening probability, relaxation and eval determinism."""

    def test_logits_shape_and_hidden_width(self):
        router = Router(64, rd_ratio=0.25)
        assert router.fc1.out_features == 16
        assert router(torch.randn(5, 64, 7, 7)).shape == (5, 2)

    def test_initial_gate_opens_with_init_open_prob(self):
        router = Router(32, init_open_prob=0.8)
        probs = router(torch.randn(10, 32, 4, 4)).softmax(-1)[:, 1]
        torch.testing.assert_close(probs, torch.full((10,), 0.8))

    @pytest.mark.parametrize("relaxation", ["gumbel", "straight_through"])
    def test_relaxed_gate_opens_at_the_router_probability(self, relaxation):
        # For a binary Gumbel-softmax, P(v > 0.5) equals the softmax probability of "run".
        torch.manual_seed(1)
        logits = torch.tensor([[0.0, math.log(0.7 / 0.3)]]).repeat(4000, 1)
        gates = dynroute.relaxed_gate(logits, relaxation=relaxation)
        opened = int((gates > 0.5).sum())
        assert binomtest(opened, 4000, 0.7).pvalue > 1e-3
        if relaxation == "straight_through":
            assert set(gates.unique().tolist()) <= {0.0, 1.0}
        else:
            assert ((gates > 0) & (gates < 1)).all()

    def test_straight_through_passes_soft_gradients(self):
        logits = torch.zeros(8, 2, requires_grad=True)
        dynroute.relaxed_gate(logits, relaxation="straight_through").sum().backward()
        assert logits.grad.abs().sum() > 0

    def test_eval_decision_is_deterministic_argmax(self):
        logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -0.5]])
        torch.testing.assert_close(dynroute.hard_gate(logits), torch.tensor([0.0, 1.0, 1.0]))
        block = dynroute.GatedBlock(dynroute.models.CifarBasicBlock(8, 8)).eval()
        x = torch.randn(6, 8, 8, 8)
        block(x)
        first = block.last_gate.clone()
        block(x)
        torch.testing.assert_close(block.last_gate, first)

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"init_open_prob": 1.0}, "init_open_prob"),
            ({"temperature": 0.0}, "temperature"),
            ({"temperature": float("nan")}, "temperature"),
            ({"relaxation": "concrete"}, "relaxation"),
        ],
    )
    def test_bad_settings_are_refused(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            Router(16, **kwargs)

    def test_layers_run_as_modules(self):
        # Hooks on the layers fire and a swapped layer is the one that runs (as torch.ao quantization swaps them).
        router = Router(16).eval()
        seen = []
        router.fc1.register_forward_hook(lambda module, args, output: seen.append("fc1"))
        router.fc2.register_forward_hook(lambda module, args, output: seen.append("fc2"))
        torch.nn.init.normal_(router.fc2.weight, std=3.0)
        x = torch.randn(3, 16, 4, 4)
        logits = router(x)
        assert seen == ["fc1", "fc2"]
        router.fc2 = torch.nn.Sequential(router.fc2, torch.nn.Tanh())
        torch.testing.assert_close(router(x), torch.tanh(logits))

    @pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
    def test_layers_run_as_modules_in_inference_too(self, context):
        router = Router(16).eval()
        seen = []
        router.act.register_forward_pre_hook(lambda module, args: seen.append("act"))
        x = torch.randn(3, 16, 4, 4)
        with context():
            router(x)
            assert seen == ["act"]
            tanh_logits = torch.tanh(router(x))
            router.fc2 = torch.nn.Sequential(router.fc2, torch.nn.Tanh())
            torch.testing.assert_close(router(x), tanh_logits)

    def test_replaced_forwards_run_in_inference(self, monkeypatch):
        # accelerate's offloading sets forward on the object; a patch may replace it on the class.
        router = Router(16).eval()
        x = torch.randn(3, 16, 4, 4)
        stock_forward = router.fc1.forward
        router.fc1.forward = lambda input: stock_forward(input) * 0
        with torch.no_grad():
            torch.testing.assert_close(router(x), router.fc2(router.act(router.fc1.bias * 0)).expand(3, 2))
        del router.fc1.forward
        monkeypatch.setattr(torch.nn.ReLU, "forward", lambda self, input: input.abs())
        torch.nn.init.normal_(router.fc2.weight)
        with torch.no_grad():
            hidden = torch.nn.functional.linear(x.mean((2, 3)), router.fc1.weight, router.fc1.bias).abs()
            torch.testing.assert_close(router(x), router.fc2(hidden))

    def test_functional_call_tensors_are_the_ones_that_run_in_inference(self):
        # torch.func.functional_call swaps parameters for plain tensors; the router must use them.
        router = Router(16).eval()
        x = torch.randn(3, 16, 4, 4)
        weight, bias = torch.randn(16, 16), torch.randn(2)
        with torch.no_grad():
            logits = torch.func.functional_call(router, {"fc1.weight": weight, "fc2.bias": bias}, (x,))
            hidden = torch.nn.functional.linear(x.mean((2, 3)), weight, router.fc1.bias).relu()
            expected = torch.nn.functional.linear(hidden, router.fc2.weight, bias)
        assert torch.equal(logits, expected)

    def test_weight_set_as_a_plain_attribute_runs_in_inference(self):
        router = Router(16).eval()
        x = torch.randn(3, 16, 4, 4)
        weight = torch.randn(16, 16)
        del router.fc1.weight
        router.fc1.weight = weight  # a plain attribute now, outside _parameters
        torch.nn.init.normal_(router.fc2.weight)
        with torch.no_grad():
            hidden = torch.nn.functional.linear(x.mean((2, 3)), weight, router.fc1.bias).relu()
            assert torch.equal(router(x), router.fc2(hidden))

    def test_extra_repr_tells_the_settings(self):
        assert "relaxation='straight_through'" in repr(Router(16, relaxation="straight_through"))


@pytest.mark.parametrize(
    "build, input_size",
    [
        (lambda: timm.create_model("resnet18"), (3, 224, 224)),
        (lambda: timm.create_model("resnet50"), (3, 224, 224)),
        (dynroute.models.resnet20, (3, 32, 32)),
        (dynroute.models.resnet110, (3, 32, 32)),
    ],
    ids=["timm-resnet18", "timm-resnet50", "cifar-resnet20", "cifar-resnet110"],
)
def test_router_costs_under_one_percent_of_its_block(build, input_size):
    table = dynroute.macs_table(dynroute.convert_resnet(build(), input_size=input_size))
    ratios = [router / block for router, block in zip(table.router_macs, table.block_macs)]
    assert all(0 < ratio < 0.01 for ratio in ratios), max(ratios)
