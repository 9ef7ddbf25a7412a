import inspect
import os
from pathlib import Path

import pytest
import torch

import dynroute
from dynroute.models import PadShortcut, load_cifar_checkpoint

SHARED = Path(os.environ.get("DYNROUTE_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))


class TestCifarResNet:
    """He et al.'s CIFAR ResNets: depth, shapes, shortcuts and checkpoints."""

    @pytest.mark.parametrize("depth", [20, 32, 44, 56, 74, 110])
    def test_depth_and_output(self, depth):
        model = getattr(dynroute.models, f"resnet{depth}")(num_classes=7)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) + 1 == depth
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)

    @pytest.mark.parametrize("depth", [20, 32, 44, 56, 74, 110])
    def test_builders_are_documented_functions_of_keywords(self, depth):
        builder = getattr(dynroute.models, f"resnet{depth}")
        assert inspect.isfunction(builder) and builder.__doc__.startswith(f"ResNet-{depth}: ")  # the API docs list it
        parameters = inspect.signature(builder).parameters.values()
        assert [(p.name, p.kind, p.default) for p in parameters] == [
            ("num_classes", inspect.Parameter.KEYWORD_ONLY, 10),
            ("shortcut", inspect.Parameter.KEYWORD_ONLY, "A"),
            ("in_chans", inspect.Parameter.KEYWORD_ONLY, 3),
        ]
        model = builder(num_classes=5, shortcut="B", in_chans=1)
        assert len(model.layer1) == (depth - 2) // 6 and model.conv1.in_channels == 1 and model.num_classes == 5
        assert isinstance(model.layer2[0].shortcut, torch.nn.Sequential)  # option B: 1x1 conv and batch norm

    def test_pad_shortcut_subsamples_and_zero_pads(self):
        x = torch.randn(2, 16, 8, 8)
        out = PadShortcut(16, 32, 2)(x)
        assert out.shape == (2, 32, 4, 4)
        torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
        assert out[:, :8].eq(0).all() and out[:, 24:].eq(0).all()

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="shortcut must be 'A' or 'B'"):
            dynroute.models.resnet20(shortcut="C")
        with pytest.raises(ValueError, match="blocks_per_stage"):
            dynroute.models.CifarResNet(0)

    def test_checkpoint_round_trip_with_dataparallel_prefix(self, tmp_path):
        source = dynroute.models.resnet20()
        path = tmp_path / "ck.th"
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
        target = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        load_cifar_checkpoint(target, path).eval()
        dynroute.force_gates(target, "open")
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(target(x), source.eval()(x), atol=1e-5, rtol=0)

    def test_checkpoint_of_another_depth_is_refused(self, tmp_path):
        path = tmp_path / "ck.th"
        torch.save(dynroute.models.resnet32().state_dict(), path)
        with pytest.raises(ValueError, match="unexpected keys.*depth"):
            load_cifar_checkpoint(dynroute.models.resnet20(), path)

    @pytest.mark.skipif(not (SHARED / "weights").is_dir(), reason="needs ../shared/weights")
    @pytest.mark.parametrize("depth", [20, 56])
    def test_shared_pretrained_weights_load(self, depth):
        model = load_cifar_checkpoint(
            getattr(dynroute.models, f"resnet{depth}")(), SHARED / "weights" / f"cifar_resnet{depth}.th"
        )
        checkpoint = torch.load(SHARED / "weights" / f"cifar_resnet{depth}.th", map_location="cpu", weights_only=True)
        torch.testing.assert_close(model.linear.weight, checkpoint["state_dict"]["module.linear.weight"])
