"""GatedSequential: stages converted in place, with the outputs of ``nn.Sequential`` whatever path they take.

tests/test_fastpath.py compares the inference fast path with the reference forward in detail.
"""

import copy

import pytest
import timm
import torch
import torchvision
from routed_models import centre_routers, images, routed_model
from torch import nn

import dynroute
from dynroute import GatedSequential
from dynroute.models import CifarResNet


def _random_batchnorm(model: nn.Module) -> nn.Module:
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.25, 0.75)
            bn.bias.data.normal_(0, 0.1)
    return model


def _plain_stages(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose stages are plain ``nn.Sequential``: every gated block runs GatedBlock.forward."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if type(module) is GatedSequential:
            module.__class__ = nn.Sequential
    return plain


class TestConversion:
    @pytest.mark.parametrize(
        "make",
        [lambda: timm.create_model("resnet18"), lambda: torchvision.models.resnet18(), lambda: CifarResNet(2)],
        ids=["timm", "torchvision", "cifar"],
    )
    def test_stages_become_gated_sequential_in_place(self, make):
        model = make()
        stage, downsample = model.layer2, model.layer2[0].downsample if hasattr(model.layer2[0], "downsample") else None
        keys = list(model.state_dict())
        dynroute.convert_resnet(model, input_size=(3, 32, 32))
        assert model.layer2 is stage and type(stage) is GatedSequential
        if downsample is not None:  # a Sequential without gated blocks stays what it was
            assert type(downsample) is nn.Sequential
        assert [key for key in model.state_dict() if ".router." not in key] == keys


class TestOutputs:
    """A stage's outputs are those of per-sample forwards, and the tensors around it stay as they were."""

    def test_outputs_equal_plain_stages_and_per_sample_forwards(self):
        model, x = routed_model(blocks_per_stage=3), images(64)
        with torch.inference_mode():
            logits = model(x)
            rates = dynroute.routing_paths(model).mean(0)
            plain = _plain_stages(model)(x)
            per_sample = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        assert ((rates > 0) & (rates < 1)).sum() >= 6, "most blocks must route part of the batch"
        torch.testing.assert_close(logits, plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, per_sample, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad, torch.enable_grad])
    def test_the_stage_input_is_never_written(self, grad_mode):
        model, x = routed_model(blocks_per_stage=3), images(64)
        seen = []
        model.layer1.register_forward_pre_hook(lambda module, args: seen.append((args[0], args[0].clone())))
        with grad_mode():
            model(x)
        assert all(0 < block.last_gate.mean().item() < 1 for block in model.layer1), "every block must route some rows"
        ((stage_input, copied),) = seen
        assert torch.equal(stage_input, copied)

    def test_hooks_on_blocks_see_the_input_alone(self):
        model, x = routed_model(blocks_per_stage=3), images(8)
        seen = []
        for _, block in dynroute.gated_blocks(model):
            block.register_forward_pre_hook(lambda module, args: seen.append(len(args)))
        with torch.inference_mode():
            model(x)
        assert seen == [1] * 9


class TestFeatureExtraction:
    def test_timm_feature_maps_are_those_of_plain_stages(self):
        """features_only returns every stage's output: the next stage's first block must not write into it."""
        torch.manual_seed(0)
        model = timm.create_model("resnet26", features_only=True).eval()
        model = dynroute.convert_resnet(_random_batchnorm(model), input_size=(3, 64, 64)).eval()
        x = images(16, size=64)
        centre_routers(model, x)
        with torch.inference_mode():
            features = model(x)
            rates = dynroute.routing_paths(model).mean(0)
            plain = _plain_stages(model)(x)
            masked = dynroute.set_execution(copy.deepcopy(model), "masked")(x)
        assert ((rates > 0) & (rates < 1)).any(), "some block must route part of the batch"
        for got, expected, reference in zip(features, plain, masked, strict=True):
            assert torch.equal(got, expected)
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)

    def test_timm_forward_intermediates_are_those_of_plain_stages(self):
        """forward_intermediates keeps every stage's output too, and returns the final features."""
        torch.manual_seed(0)
        model = dynroute.convert_resnet(_random_batchnorm(timm.create_model("resnet26")), input_size=(3, 64, 64))
        model.eval()
        x = images(16, size=64)
        centre_routers(model, x)
        with torch.inference_mode():
            final, intermediates = model.forward_intermediates(x)
            rates = dynroute.routing_paths(model).mean(0)
            plain_final, plain_intermediates = _plain_stages(model).forward_intermediates(x)
            masked_final, _ = dynroute.set_execution(copy.deepcopy(model), "masked").forward_intermediates(x)
        assert ((rates > 0) & (rates < 1)).any(), "some block must route part of the batch"
        assert len(intermediates) == len(plain_intermediates) == 5  # the stem and four stages
        for got, expected in zip([final, *intermediates], [plain_final, *plain_intermediates], strict=True):
            assert torch.equal(got, expected)
        torch.testing.assert_close(final, masked_final, rtol=1e-5, atol=1e-5)
