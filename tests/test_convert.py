import copy
import importlib
import warnings

import pytest
import timm
import torch
import torchvision
from routed_models import UnregisteredBlock
from torch import nn
from torchvision.models.quantization import resnet as quantizable_resnet

import dynroute
from dynroute.conversion import registry
from dynroute.models import CifarBasicBlock


def _assert_drop_in(original: nn.Module, input_size: tuple[int, int, int], batch: int = 2) -> nn.Module:
    """Convert a copy of ``original``; with gates open it must give the original's logits."""
    original.eval()
    converted = dynroute.convert_resnet(copy.deepcopy(original), input_size=input_size)
    dynroute.force_gates(converted, "open")
    x = torch.randn(batch, *input_size)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), original(x), atol=1e-5, rtol=0)
    return converted


TORCHVISION_BUILDERS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]


class TestTorchvision:
    """Every torchvision ResNet builder converts and stays a drop-in."""

    @pytest.mark.slow
    @pytest.mark.parametrize("name", TORCHVISION_BUILDERS)
    def test_equal_logits_with_gates_open(self, name):
        original = getattr(torchvision.models, name)(num_classes=10)
        converted = _assert_drop_in(original, (3, 64, 64))
        assert len(list(dynroute.gated_blocks(converted))) == sum(original_blocks(original))

    def test_quantizable_subclass_is_refused_with_its_path(self):
        model = quantizable_resnet.resnet18(weights=None, quantize=False)
        with pytest.raises(TypeError, match=r"'layer1\.0' is a QuantizableBasicBlock.*register_block"):
            dynroute.convert_resnet(model, input_size=(3, 32, 32))


def original_blocks(model: nn.Module):
    return [len(getattr(model, f"layer{i}")) for i in range(1, 5)]


class TestTimm:
    """timm ResNets convert, keep their weights and default to their own input size."""

    @pytest.mark.parametrize(
        "name", ["resnet18", "resnet50d", "seresnext26d_32x4d", "resnetblur18", "ecaresnet26t", "resnet10t"]
    )
    def test_equal_logits_with_gates_open(self, name):
        _assert_drop_in(timm.create_model(name, num_classes=5), (3, 64, 64))

    def test_drop_path_and_drop_block_variants_train(self):
        model = timm.create_model("resnet18", drop_path_rate=0.1, drop_block_rate=0.1, num_classes=3)
        dynroute.convert_resnet(model, input_size=(3, 64, 64)).train()
        model(torch.randn(4, 3, 64, 64)).sum().backward()
        assert dynroute.routing_paths(model).shape == (4, 8)

    def test_input_size_defaults_to_the_pretrained_config(self):
        model = dynroute.convert_resnet(timm.create_model("resnet18"))
        assert dynroute.macs_table(model).input_size == (3, 224, 224)

    def test_original_state_dict_loads_router_keys_aside(self):
        original = timm.create_model("resnet18", num_classes=4)
        converted = dynroute.convert_resnet(timm.create_model("resnet18", num_classes=4), input_size=(3, 32, 32))
        result = converted.load_state_dict(original.state_dict(), strict=False)
        assert result.unexpected_keys == []
        assert result.missing_keys and all(".router." in key for key in result.missing_keys)
        for key, value in original.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[key], value)


class TestCifar:
    """The CIFAR ResNets of dynroute.models convert, option A and option B alike."""

    @pytest.mark.parametrize("depth, shortcut", [(20, "A"), (32, "B"), (56, "A"), (110, "A")])
    def test_equal_logits_with_gates_open(self, depth, shortcut):
        original = getattr(dynroute.models, f"resnet{depth}")(shortcut=shortcut)
        converted = _assert_drop_in(original, (3, 32, 32), batch=4)
        assert len(list(dynroute.gated_blocks(converted))) == (depth - 2) // 2


class TestConvertOptions:
    """Block selection, router settings, in-place conversion and mode."""

    def test_converts_in_place_and_keeps_the_mode(self):
        model = dynroute.models.resnet20().train()
        assert dynroute.convert_resnet(model, input_size=(3, 32, 32)) is model
        assert all(block.training for _, block in dynroute.gated_blocks(model))

    def test_selects_blocks_by_name_and_predicate(self):
        by_name = dynroute.convert_resnet(dynroute.models.resnet20(), (3, 32, 32), blocks=["layer1.1", "layer3.2"])
        assert [name for name, _ in dynroute.gated_blocks(by_name)] == ["layer1.1", "layer3.2"]
        by_predicate = dynroute.convert_resnet(
            dynroute.models.resnet20(), (3, 32, 32), blocks=lambda name, block: name.startswith("layer2")
        )
        assert [name for name, _ in dynroute.gated_blocks(by_predicate)] == ["layer2.0", "layer2.1", "layer2.2"]
        assert dynroute.macs_table(by_predicate).num_blocks == 3
        assert isinstance(by_predicate.layer1[0], CifarBasicBlock)

    def test_a_single_block_name_is_one_name(self):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), (3, 32, 32), blocks="layer1.0")
        assert [name for name, _ in dynroute.gated_blocks(model)] == ["layer1.0"]
        with pytest.raises(ValueError, match=r"\['layer9'\] are not residual blocks"):
            dynroute.convert_resnet(dynroute.models.resnet20(), (3, 32, 32), blocks="layer9")

    def test_unknown_block_names_are_refused(self):
        with pytest.raises(ValueError, match=r"\['layer9.0'\] are not residual blocks"):
            dynroute.convert_resnet(dynroute.models.resnet20(), (3, 32, 32), blocks=["layer9.0"])

    def test_router_settings_reach_every_router(self):
        model = dynroute.convert_resnet(
            dynroute.models.resnet20(), (3, 32, 32), temperature=0.5, relaxation="straight_through", hidden_channels=8
        )
        routers = [block.router for _, block in dynroute.gated_blocks(model)]
        assert all(r.temperature == 0.5 and r.relaxation == "straight_through" for r in routers)
        assert all(r.fc1.out_features == 8 for r in routers)

    def test_converting_twice_is_refused(self):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), (3, 32, 32))
        with pytest.raises(ValueError, match="already converted.*'layer1.0'"):
            dynroute.convert_resnet(model, (3, 32, 32))

    @pytest.mark.parametrize(
        "input_size, message",
        [
            ((32, 32), r"input_size must be \(C, H, W\) of positive ints, but got \(32, 32\)"),
            (32, r"input_size must be \(C, H, W\) of positive ints, but got 32"),
            ((1, 32, 32), r"input_size=\(1, 32, 32\) failed: .*first convolution takes 3, so pass \(3, H, W\)"),
            ((32, 32, 3), r"input_size=\(32, 32, 3\) failed: .*channels first"),
        ],
        ids=["not-chw", "int", "wrong-channels", "hwc"],
    )
    def test_a_failed_conversion_leaves_the_model_as_it_was(self, input_size, message):
        original = timm.create_model("resnet18").eval()
        model = copy.deepcopy(original)
        keys = set(model.state_dict())
        with pytest.raises(ValueError, match=message):
            dynroute.convert_resnet(model, input_size=input_size)
        assert not any(isinstance(module, dynroute.GatedBlock) for module in model.modules())
        assert type(model.layer1) is nn.Sequential and not model._forward_pre_hooks
        assert set(model.state_dict()) == keys
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), original(x), atol=0, rtol=0)
        _assert_drop_in(model, (3, 32, 32))  # and a corrected retry converts it

    def test_model_without_blocks_is_refused(self):
        with pytest.raises(TypeError, match="Sequential has no supported residual blocks.*register_block"):
            dynroute.convert_resnet(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), (3, 32, 32))

    def test_bare_block_is_refused(self):
        with pytest.raises(TypeError, match="whole network.*GatedBlock"):
            dynroute.convert_resnet(CifarBasicBlock(8, 8), (8, 8, 8))

    def test_torchvision_needs_an_input_size(self):
        with pytest.raises(ValueError, match=r"only timm models carry a default\); .*input_size=\(3, H, W\)"):
            dynroute.convert_resnet(torchvision.models.resnet18())

    def test_a_cifar_resnet_is_told_a_cifar_input_size_by_example(self):
        with pytest.raises(ValueError, match=r"input_size=\(3, H, W\)\), .*e\.g\. \(3, 32, 32\) for CIFAR"):
            dynroute.convert_resnet(dynroute.models.resnet20())

    def test_a_model_without_blocks_is_refused_before_its_input_size_is_asked(self):
        with pytest.raises(TypeError, match="MobileNetV3 has no supported residual blocks"):
            dynroute.convert_resnet(torchvision.models.mobilenet_v3_small())

    def test_a_wrong_input_size_error_chains_the_trace_error(self):
        model = dynroute.models.resnet20()
        with pytest.raises(ValueError, match="input_size") as caught:
            dynroute.convert_resnet(model, input_size=(32, 32, 3))
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert not any(isinstance(module, dynroute.GatedBlock) for module in model.modules())

    def test_not_a_module_is_refused(self):
        with pytest.raises(TypeError, match="torch.nn.Module"):
            dynroute.convert_resnet("resnet50", (3, 224, 224))


class _Stage(nn.Module):
    """A stage container of a type the converter does not know, holding blocks in an nn.Sequential."""

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(UnregisteredBlock(channels) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class TestUnregisteredBlocks:
    """A model whose blocks have no adapter is refused naming their types and how to register one."""

    # timm families whose blocks were unknown when this was written; unregistered here in case they are not any more
    TIMM_FAMILIES = [
        ("skresnet18", "timm.models.sknet", "SelectiveKernelBasic", 8),
        ("res2net50_26w_4s", "timm.models.res2net", "Bottle2neck", 16),
        ("resnest14d", "timm.models.resnest", "ResNestBottleneck", 4),
    ]

    @pytest.mark.parametrize("name, module, block, count", TIMM_FAMILIES, ids=[f[0] for f in TIMM_FAMILIES])
    def test_timm_families_name_their_block_type(self, name, module, block, count, monkeypatch):
        model = timm.create_model(name)
        block_type = getattr(importlib.import_module(module), block)
        monkeypatch.delitem(registry._REGISTRY, block_type, raising=False)
        blocks = [n for n, m in model.named_modules() if type(m) is block_type]
        assert len(blocks) == count
        pattern = (
            rf"ResNet has no supported residual blocks; it has blocks of types dynroute does not know: "
            rf"{module}\.{block} \({count} blocks: '{blocks[0]}', '{blocks[1]}', \.\.\.\)\..*"
            rf"dynroute\.register_block\({block}, dynroute\.BlockAdapter\(residual=\.\.\., "
        )
        with pytest.raises(TypeError, match=pattern):
            dynroute.convert_resnet(model)
        assert not any(isinstance(m, dynroute.GatedBlock) for m in model.modules())

    def test_blocks_inside_an_unknown_stage_are_named_not_the_stage(self):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), _Stage(8, 2), _Stage(8, 1), nn.Flatten())
        with pytest.raises(TypeError) as caught:
            dynroute.convert_resnet(model, input_size=(3, 16, 16))
        message = str(caught.value)
        assert "routed_models.UnregisteredBlock (3 blocks: '1.blocks.0', '1.blocks.1', ...)" in message
        assert "_Stage" not in message and "register_block(UnregisteredBlock, " in message

    def test_the_message_follows_the_registry(self, monkeypatch):
        """Once a type is registered it is converted, and only the still unknown ones are named."""
        model = nn.Sequential(nn.Conv2d(3, 8, 3), CifarBasicBlock(8, 8), UnregisteredBlock(8))
        with pytest.warns(
            UserWarning,
            match=r"supported blocks of Sequential but leaves these dense.*UnregisteredBlock \(1 block: '2'\)",
        ):
            dynroute.convert_resnet(model, input_size=(3, 16, 16))
        assert [name for name, _ in dynroute.gated_blocks(model)] == ["1"]
        adapter = registry.BlockAdapter(
            residual=lambda b, x: b.conv2(torch.relu(b.conv1(x))),
            shortcut=lambda b, x: x,
            activation=lambda b, x: torch.relu(x),
            in_channels=lambda b: b.conv1.in_channels,
        )
        monkeypatch.setitem(registry._REGISTRY, UnregisteredBlock, adapter)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), CifarBasicBlock(8, 8), UnregisteredBlock(8))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dynroute.convert_resnet(model, input_size=(3, 16, 16))
        assert [name for name, _ in dynroute.gated_blocks(model)] == ["1", "2"]

    @pytest.mark.parametrize("name", ["resnet18", "resnet26d", "seresnext26d_32x4d"])
    def test_supported_models_do_not_warn(self, name):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dynroute.convert_resnet(timm.create_model(name), input_size=(3, 32, 32))


@pytest.mark.slow
def test_every_timm_resnet_converts_with_equal_logits():
    """All architectures of timm.list_models(module="resnet"), at 64 px, gates open."""
    failures = []
    names = timm.list_models(module="resnet")
    for name in names:
        torch.manual_seed(0)
        original = timm.create_model(name, num_classes=3).eval()
        converted = dynroute.convert_resnet(copy.deepcopy(original), input_size=(3, 64, 64))
        dynroute.force_gates(converted, "open")
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            difference = (converted(x) - original(x)).abs().max().item()
        if difference > 1e-5:
            failures.append((name, difference))
    assert len(names) >= 80 and failures == []
