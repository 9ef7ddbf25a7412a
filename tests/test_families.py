"""The residual families beyond the plain ResNet: timm's resnetv2, regnet, senet, res2net, resnest, sknet and
ByobNet ResNets, torchvision's RegNets and quantizable ResNets; the refusals of networks without a residual
add; and every supported timm and torchvision architecture converted with equal logits."""

import copy
import time
import warnings
from functools import partial

import pytest
import timm
import timm.models.byobnet as timm_byobnet
import timm.models.regnet as timm_regnet
import timm.models.resnetv2 as timm_resnetv2
import torch
import torchvision
from routed_models import centre_routers, images
from timm.layers import BatchNormAct2d
from torch import nn

import dynroute

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis

TIMM_MODULES = ("resnetv2", "regnet", "senet", "res2net", "resnest", "sknet")


def timm_family_models() -> list[str]:
    """The 112 timm models of issue 21: six whole modules and the ByobNet models whose name contains ``res``."""
    names = [name for module in TIMM_MODULES for name in timm.list_models(module=module)]
    return names + [name for name in timm.list_models(module="byobnet") if "res" in name]


def torchvision_builders() -> list[str]:
    """torchvision's ResNet (10) and RegNet (15) builders and its quantizable ResNets (4), as ``quantized_<name>``."""
    families = ("resnet", "resnext", "wide_resnet", "regnet_")
    builders = [name for name in torchvision.models.list_models(module=torchvision.models) if name.startswith(families)]
    quantizable = torchvision.models.list_models(module=torchvision.models.quantization)
    return builders + [name for name in quantizable if name.startswith("quantized_resne")]


def build_torchvision(name: str, num_classes: int = 3) -> nn.Module:
    """A torchvision builder by name; a quantizable ResNet (``quantized_<name>``) in float mode."""
    if name.startswith("quantized_"):
        builder = getattr(torchvision.models.quantization, name.removeprefix("quantized_"))
        return builder(quantize=False, num_classes=num_classes)
    return getattr(torchvision.models, name)(num_classes=num_classes)


def wake_zero_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every all-zero parameter, in place.

    Fresh timm models zero the last normalisation (or convolution) of each residual branch, so every
    branch would add zero and a wrong branch would pass an equal-logits check.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and not parameter.any():
                fan_in = parameter[0].numel() if parameter.dim() > 1 else 25
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5 / fan_in**0.5)
    return model


def generic_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fixed pseudo-random values for every floating parameter and buffer, in place; integer buffers zeroed.

    Faster than a model's own initialisation (a tiled pool of uniform values instead of a draw per
    element), so a network of a billion parameters is ready in a second, and with no zero weight: no
    residual branch adds zero, which would let a wrong branch pass an equal-logits check. Convolution
    and linear weights get variance 1/fan_in, normalisation scales lie in [0.25, 0.75], running
    variances in [1, 1.5], everything else (biases, running means) in [-0.1, 0.1].
    """
    pool = torch.rand(65_537, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    offset = 0
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                tensor.zero_()
                continue
            rolled = torch.cat([pool[offset:], pool[:offset]])
            offset = (offset + 7_919) % len(pool)
            flat, repeats = tensor.view(-1), tensor.numel() // len(pool)
            flat[: repeats * len(pool)].view(repeats, len(pool)).copy_(rolled.expand(repeats, -1))
            flat[repeats * len(pool) :].copy_(rolled[: tensor.numel() - repeats * len(pool)])
            leaf = name.rsplit(".", 1)[-1]
            if tensor.dim() > 1:
                tensor.mul_((3 / tensor[0].numel()) ** 0.5)
            elif leaf == "weight":
                tensor.mul_(0.25).add_(0.5)
            elif leaf == "running_var":
                tensor.abs_().mul_(0.5).add_(1)
            else:
                tensor.mul_(0.1)
    return model


def build_timm_on_meta(name: str) -> nn.Module:
    """``timm.create_model(name, num_classes=3)`` built without initialising it, then :func:`generic_weights`."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=3)
    return generic_weights(model.to_empty(device="cpu"))


def smallest_input(model: nn.Module, default: int = 32) -> tuple[int, int, int]:
    """The model's ``min_input_size`` from its timm config, else ``(3, default, default)``."""
    config = getattr(model, "pretrained_cfg", None) or {}
    return tuple(config.get("min_input_size") or (3, default, default))


def gate_count(model: nn.Module) -> int:
    return len(list(dynroute.gated_blocks(model)))


def fvcore_total(module: nn.Module, *inputs: torch.Tensor) -> int:
    analysis = FlopCountAnalysis(module, inputs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return analysis.total()


class Branch(nn.Module):
    """The residual branch of one block, as its adapter computes it, as a module fvcore can trace."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynroute.get_adapter(self.block).residual(self.block, x)


def shares_preactivation(block: nn.Module) -> bool:
    """Whether the block's own forward feeds ``norm1(x)`` to its shortcut as well as to its branch."""
    if isinstance(block, timm_regnet.PreBottleneck):
        return True
    return (
        isinstance(block, (timm_resnetv2.PreActBasic, timm_resnetv2.PreActBottleneck)) and block.downsample is not None
    )


# One small model (or the smallest there is) for each block type the families register.
REPRESENTATIVES = {
    "resnetv2_18d": lambda: timm.create_model("resnetv2_18d", num_classes=3),  # PreActBasic, BatchNormAct
    "resnetv2_bit": lambda: timm_resnetv2.ResNetV2(  # PreActBottleneck with GroupNorm and StdConv, as in BiT
        (1, 1, 1, 1), channels=(128, 256, 256, 512), stem_chs=32, num_classes=3
    ),
    "resnetv2_v1": lambda: timm_resnetv2.ResNetV2(  # the non-pre-activation Bottleneck, as in timm's hybrid ViTs
        (1, 1, 1, 1), channels=(64, 128, 128, 256), stem_chs=32, preact=False, norm_layer=BatchNormAct2d, num_classes=3
    ),
    "regnety_002": lambda: timm.create_model("regnety_002", num_classes=3),  # Bottleneck with SE
    "regnetz_005": lambda: timm.create_model("regnetz_005", num_classes=3),  # Bottleneck, some without shortcut
    "regnetv": lambda: timm_regnet.RegNet(  # PreBottleneck, as in regnetv_040
        timm_regnet.RegNetCfg(depth=8, w0=16, wa=16.0, wm=2.0, group_size=8, se_ratio=0.25, stem_width=16, preact=True),
        num_classes=3,
    ),
    "legacy_seresnet18": lambda: timm.create_model("legacy_seresnet18", num_classes=3),
    "legacy_seresnext26_32x4d": lambda: timm.create_model("legacy_seresnext26_32x4d", num_classes=3),
    "res2net50_14w_8s": lambda: timm.create_model("res2net50_14w_8s", num_classes=3),
    "resnest14d": lambda: timm.create_model("resnest14d", num_classes=3),
    "skresnet18": lambda: timm.create_model("skresnet18", num_classes=3),
    "skresnet50": lambda: timm.create_model("skresnet50", num_classes=3),
    "resnet61q": lambda: timm.create_model("resnet61q", num_classes=3),  # EdgeBlock and BottleneckBlock
    "resnet50_clip": lambda: timm.create_model("resnet50_clip", num_classes=3),  # attention-pooling head
    "tv_regnet_y_400mf": lambda: build_torchvision("regnet_y_400mf"),
    "tv_quantizable_resnet18": lambda: build_torchvision("quantized_resnet18"),
    "tv_quantizable_resnet50": lambda: build_torchvision("quantized_resnet50"),
}
INPUT = (3, 64, 64)


@pytest.fixture(scope="module")
def pairs():
    """(original, converted) by representative name, each built once, both in eval mode with gates routing."""
    built: dict[str, tuple[nn.Module, nn.Module]] = {}

    def get(name: str) -> tuple[nn.Module, nn.Module]:
        if name not in built:
            torch.manual_seed(0)
            original = wake_zero_weights(REPRESENTATIVES[name]()).eval()
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # no block left dense as unknown, no stage taken for one
                converted = dynroute.convert_resnet(copy.deepcopy(original), input_size=INPUT).eval()
            built[name] = original, converted
        original, converted = built[name]
        return original, dynroute.force_gates(converted, None)

    return get


@pytest.mark.usefixtures("one_thread")
class TestEachBlockType:
    """Every registered block type of the families, on one model each."""

    @pytest.mark.parametrize("name", REPRESENTATIVES)
    def test_equal_logits_with_gates_open_and_the_branches_matter(self, name, pairs):
        original, converted = pairs(name)
        x = torch.randn(2, *INPUT)
        with torch.no_grad():
            expected = original(x)
            torch.testing.assert_close(dynroute.force_gates(converted, "open")(x), expected, atol=1e-5, rtol=0)
            closed = dynroute.force_gates(converted, "closed")(x)
        assert (closed - expected).abs().max() > 1e-3, "with every branch skipped the logits must change"

    @pytest.mark.parametrize("name", REPRESENTATIVES)
    def test_original_state_dict_loads_router_keys_aside(self, name, pairs):
        original, converted = pairs(name)
        result = copy.deepcopy(converted).load_state_dict(original.state_dict(), strict=False)
        assert result.unexpected_keys == []
        assert result.missing_keys and all(".router." in key for key in result.missing_keys)

    @pytest.mark.parametrize("name", REPRESENTATIVES)
    def test_routed_eval_equals_the_masked_formula(self, name, pairs):
        _, converted = pairs(name)
        x = images(8, size=INPUT[-1])
        model = centre_routers(copy.deepcopy(converted), x).eval()
        masked = dynroute.set_execution(copy.deepcopy(model), "masked")
        with torch.no_grad():
            sparse_logits = model(x)
            paths = dynroute.routing_paths(model)
            torch.testing.assert_close(sparse_logits, masked(x), atol=1e-5, rtol=0)
        assert 0 < paths.sum() < paths.numel(), "the routers must run some blocks and skip others"
        torch.testing.assert_close(dynroute.routing_paths(masked), paths)

    @pytest.mark.parametrize("name", REPRESENTATIVES)
    def test_saved_macs_are_fvcore_on_the_bare_branch(self, name, pairs):
        original, converted = pairs(name)
        table = dynroute.macs_table(converted)
        blocks = dict(dynroute.gated_blocks(converted))
        shared = 0
        for block_name, shape, macs in zip(table.block_names, table.block_input_shapes, table.block_macs):
            block = blocks[block_name].block
            x = torch.zeros(1, *shape)
            assert macs == fvcore_total(Branch(block).eval(), x), block_name
            if shares_preactivation(block):
                shared += fvcore_total(block.norm1, x)
        # The dense network is the original, plus the pre-activation that a shortcut and its branch both compute.
        assert table.dense_macs == fvcore_total(copy.deepcopy(original), torch.zeros(1, *INPUT)) + shared


class TestPreActivation:
    """Pre-activation blocks: a skip is an exact identity, and training updates each norm once."""

    def test_a_skipped_block_without_downsampling_is_the_identity(self, pairs):
        _, converted = pairs("resnetv2_18d")
        gated = converted.stages[0].blocks[1]
        gated.force_gate("closed")
        x = torch.randn(2, 64, 16, 16)
        torch.testing.assert_close(gated(x), x, atol=0, rtol=0)
        gated.force_gate(None)

    @pytest.mark.parametrize("name", ["resnetv2_18d", "regnetv"])
    def test_training_forward_and_running_statistics_are_the_originals(self, name, pairs):
        original, converted = pairs(name)
        original, converted = copy.deepcopy(original).train(), dynroute.force_gates(copy.deepcopy(converted), "open")
        converted.train()
        x = torch.randn(4, *INPUT)
        torch.testing.assert_close(converted(x), original(x), atol=1e-5, rtol=0)
        buffers = dict(converted.named_buffers())
        for key, value in original.named_buffers():
            torch.testing.assert_close(buffers[key], value, atol=1e-6, rtol=0, msg=key)

    def test_shortcut_downsamples_the_preactivated_input(self):
        block = timm_resnetv2.PreActBottleneck(
            16, 32, stride=2, proj_layer=timm_resnetv2.DownsampleConv, norm_layer=BatchNormAct2d
        ).eval()
        nn.init.normal_(block.norm1.running_mean)
        gated = dynroute.GatedBlock(block).eval()
        gated.force_gate("closed")
        x = torch.randn(2, 16, 8, 8)
        torch.testing.assert_close(gated(x), block.downsample(block.norm1(x)), atol=0, rtol=0)


class TestBlocksWithoutShortcut:
    """A registered block built without a shortcut adds nothing to gate: it stays a plain layer."""

    def test_regnetz_first_blocks_stay_ungated(self, pairs):
        original, converted = pairs("regnetz_005")
        plain = [name for name, m in original.named_modules() if isinstance(m, timm_regnet.Bottleneck)]
        without = [name for name, m in original.named_modules() if getattr(m, "downsample", 0) is None]
        assert len(without) == 4
        assert gate_count(converted) == len(plain) - len(without)
        assert all(isinstance(converted.get_submodule(name), timm_regnet.Bottleneck) for name in without)

    def test_byobnet_block_without_shortcut_stays_ungated(self):
        def build() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1),
                timm_byobnet.BottleneckBlock(16, 16),
                timm_byobnet.BottleneckBlock(16, 32, downsample=""),
            )

        model = dynroute.convert_resnet(build(), input_size=(3, 16, 16))
        assert [name for name, _ in dynroute.gated_blocks(model)] == ["1"]
        with pytest.raises(ValueError, match=r"\['2'\] are not residual blocks"):
            dynroute.convert_resnet(build(), (3, 16, 16), blocks=["2"])

    def test_wrapping_one_by_hand_fails_on_its_shortcut(self):
        block = timm_byobnet.BottleneckBlock(16, 32, downsample="")
        with pytest.raises(TypeError, match=r"BottleneckBlock has no shortcut \(shortcut is None\), so no"):
            dynroute.GatedBlock(block).eval()(torch.randn(1, 16, 8, 8))


class TestNonResidualNetworks:
    """Networks with no residual add to gate are refused naming the model class and why."""

    @pytest.mark.parametrize(
        "build, pattern",
        [
            (lambda: timm.create_model("dla34"), r"timm\.models\.dla\.DLA has no residual add to gate: .*tree"),
            (lambda: timm.create_model("densenet121"), r"timm\.models\.densenet\.DenseNet has no .*: each layer conc"),
            (torchvision.models.densenet121, r"torchvision\.models\.densenet\.DenseNet has no .*: each layer conc"),
            (lambda: timm.create_model("dpn68"), r"timm\.models\.dpn\.DPN has no residual add to gate: .*dual-path"),
            (lambda: timm.create_model("cspresnet50"), r"cspnet\.CspNet \(its .*\.CrossStage at 'stages\.0'\) has no"),
            (lambda: timm.create_model("cs3darknet_s"), r"cspnet\.CspNet \(its .*\.CrossStage3 at 'stages\.0'\) has"),
        ],
        ids=["dla", "timm-densenet", "torchvision-densenet", "dpn", "cspnet", "cspnet3"],
    )
    def test_refused_with_class_and_reason(self, build, pattern):
        model = build()
        with pytest.raises(TypeError, match=pattern):
            dynroute.convert_resnet(model, input_size=(3, 64, 64))
        assert not any(isinstance(module, dynroute.GatedBlock) for module in model.modules())

    def test_a_darknet_is_refused_for_its_unknown_blocks_not_for_partial_stages(self):
        """timm's DarkNets are CspNet models of plain residual stages: an adapter for DarkBlock could gate them."""
        with pytest.raises(TypeError, match=r"types dynroute does not know: timm\.models\.cspnet\.DarkBlock"):
            dynroute.convert_resnet(timm.create_model("darknet17"), input_size=(3, 64, 64))


@pytest.mark.usefixtures("one_thread")
class TestConvertedModelApi:
    """What timm users call on the model besides forward works on the converted one."""

    @pytest.mark.parametrize("name", ["resnet50_clip", "resnetv2_18d", "regnety_002", "skresnet18"])
    def test_forward_intermediates_and_features(self, name, pairs):
        original, converted = pairs(name)
        dynroute.force_gates(converted, "open")
        x = torch.randn(2, *INPUT)
        with torch.no_grad():
            torch.testing.assert_close(converted.forward_features(x), original.forward_features(x))
            if hasattr(original, "forward_intermediates"):
                final, intermediates = converted.forward_intermediates(x)
                expected_final, expected_intermediates = original.forward_intermediates(x)
                torch.testing.assert_close(final, expected_final)
                for got, expected in zip(intermediates, expected_intermediates, strict=True):
                    torch.testing.assert_close(got, expected)
            torch.testing.assert_close(converted.forward_head(converted.forward_features(x)), original(x))

    def test_a_fused_quantizable_resnet_converts(self):
        fused = build_torchvision("quantized_resnet18").eval()
        fused.fuse_model()  # conv1 becomes a ConvReLU2d, bn1 and relu identities
        converted = dynroute.force_gates(dynroute.convert_resnet(copy.deepcopy(fused), input_size=INPUT), "open")
        x = torch.randn(2, *INPUT)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), fused(x), atol=1e-5, rtol=0)

    def test_drop_path_trains_and_backpropagates(self):
        model = timm.create_model("regnety_002", drop_path_rate=0.2, num_classes=3)
        dynroute.convert_resnet(model, input_size=INPUT).train()
        model(torch.randn(4, *INPUT)).sum().backward()
        routers = [block.router.fc2.weight.grad for _, block in dynroute.gated_blocks(model)]
        assert all(grad is not None for grad in routers)


@pytest.mark.slow
def test_every_residual_model_converts_with_equal_logits(one_thread, record_property):
    """Every timm model of the resnet module and of the families (193), every torchvision ResNet and RegNet
    builder and the quantizable ResNets in float mode: gates open, fp32 eval, logits within 1e-5.

    Each is built once, with three classes and :func:`generic_weights` (timm's on the meta device, so
    its own initialisation is not paid), at its smallest input (32 px unless its config asks more),
    and converted in place after its reference logits are taken: no copy of a network of a billion
    parameters. With every gate closed the logits must change. The state_dict keeps every original
    key and adds only router keys, and no block is left dense as of an unknown type (a warning).
    """
    start = time.perf_counter()
    timm_names = timm.list_models(module="resnet") + timm_family_models()
    builds = [(name, partial(build_timm_on_meta, name)) for name in timm_names]
    builds += [
        (f"torchvision.{name}", lambda name=name: generic_weights(build_torchvision(name)))
        for name in torchvision_builders()
    ]
    failures, equal = [], 0
    for name, build in builds:
        model = build().eval()
        input_size = smallest_input(model)
        keys = set(model.state_dict())
        x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            expected = model(x)
            dynroute.convert_resnet(model, input_size=input_size)
            difference = (dynroute.force_gates(model, "open")(x) - expected).abs().max().item()
            closed = (dynroute.force_gates(model, "closed")(x) - expected).abs().max().item()
        added, kept = set(model.state_dict()) - keys, keys <= set(model.state_dict())
        left_dense = [str(w.message) for w in caught if "leaves these dense" in str(w.message)]
        if difference > 1e-5 or closed < 1e-4 or not kept or not all(".router." in k for k in added) or left_dense:
            failures.append((name, difference, closed, kept, left_dense))
        else:
            equal += 1
        del model
    seconds = time.perf_counter() - start
    record_property("summary", f"{equal} of {len(builds)} architectures converted with equal logits in {seconds:.0f} s")
    assert len(timm_names) == 81 + 112 and len(builds) == 193 + 10 + 15 + 4 and failures == []
