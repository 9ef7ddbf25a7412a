"""state_dict round trips of routed models, clear errors across architectures, dense checkpoints for retrofitting."""

import pytest
import torch
from routed_models import images, routed_model

import dynroute
from dynroute.models import CifarResNet


def _fresh(blocks_per_stage: int = 1, seed: int = 5, **router_kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return dynroute.convert_resnet(CifarResNet(blocks_per_stage), input_size=(3, 32, 32), **router_kwargs).eval()


class TestRoutedRoundTrip:
    """A routed model's state_dict, saved and reloaded into a fresh conversion, gives the same logits and paths."""

    def test_identical_logits_and_paths(self, tmp_path):
        trained = routed_model()
        torch.save(trained.state_dict(), tmp_path / "routed.pt")
        fresh = _fresh()
        fresh.load_state_dict(torch.load(tmp_path / "routed.pt", weights_only=True))
        x = images(16)
        with torch.no_grad():
            expected, expected_paths = trained(x), dynroute.routing_paths(trained)
            got, got_paths = fresh(x), dynroute.routing_paths(fresh)
        assert 0 < expected_paths.mean() < 1  # the routers differ from a fresh model's all-open init
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(got_paths, expected_paths, rtol=0, atol=0)

    def test_reload_after_a_training_forward(self):
        """A training forward leaves gates with a graph; state_dict and deepcopy must not trip over them."""
        import copy

        trained = routed_model().train()
        trained(images(4))
        clone = copy.deepcopy(trained).eval()
        fresh = _fresh()
        fresh.load_state_dict(trained.state_dict())
        x = images(8)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), clone(x), rtol=0, atol=0)


class TestArchitectureMismatch:
    """Loading into another architecture fails, naming the keys or shapes that differ."""

    def test_deeper_model(self):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*layer1\.1\.conv1\.weight"):
            _fresh(blocks_per_stage=2).load_state_dict(routed_model().state_dict())

    def test_other_router_width(self):
        with pytest.raises(RuntimeError, match=r"size mismatch for layer1\.0\.router\.fc1\.weight"):
            _fresh(hidden_channels=8).load_state_dict(routed_model().state_dict())

    def test_dense_model_rejects_router_keys(self):
        with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*layer1\.0\.router\.fc1\.weight"):
            CifarResNet(1).load_state_dict(routed_model().state_dict())

    def test_load_dense_state_dict_names_the_mismatch(self):
        model = _fresh()
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"missing keys \['layer1\.1\.conv1\.weight'.*same depth"):
            dynroute.load_dense_state_dict(_fresh(blocks_per_stage=2), CifarResNet(1).state_dict())
        with pytest.raises(ValueError, match=r"unexpected keys \['layer1\.1\.conv1\.weight'"):
            dynroute.load_dense_state_dict(model, CifarResNet(2).state_dict())
        wide = CifarResNet(1, num_classes=100).state_dict()
        with pytest.raises(ValueError, match=r"linear\.weight: \(100, 64\) in the checkpoint, \(10, 64\) in the model"):
            dynroute.load_dense_state_dict(model, wide)
        for key, value in model.state_dict().items():  # nothing was copied before the error
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)

    def test_load_dense_state_dict_needs_a_converted_model(self):
        with pytest.raises(TypeError, match="convert_resnet"):
            dynroute.load_dense_state_dict(CifarResNet(1), CifarResNet(1).state_dict())


class TestRoutedCheckpointIntoUnconvertedModel:
    """A routed checkpoint into a model that was not converted says to convert it first; nothing is loaded."""

    MESSAGE = (
        r"this {what} has routers \(keys layer1\.0\.router\.\*, layer2\.0\.router\.\*, layer3\.0\.router\.\*: "
        r"3 gated blocks\) but CifarResNet is not converted; convert the model first with "
        r"dynroute\.convert_resnet\(model, input_size=\.\.\.\) .*then load"
    )

    def test_load_checkpoint(self, tmp_path):
        dynroute.save_checkpoint(tmp_path / "routed.pt", routed_model(), epoch=3)
        dense = CifarResNet(1)
        before = {key: value.clone() for key, value in dense.state_dict().items()}
        with pytest.raises(TypeError, match=self.MESSAGE.format(what="checkpoint")):
            dynroute.load_checkpoint(tmp_path / "routed.pt", dense)
        assert all(torch.equal(value, before[key]) for key, value in dense.state_dict().items())
        converted = dynroute.convert_resnet(CifarResNet(1), input_size=(3, 32, 32))
        assert dynroute.load_checkpoint(tmp_path / "routed.pt", converted) == {"epoch": 3}  # the fix works

    def test_load_checkpoint_non_strict_takes_the_dense_weights(self, tmp_path):
        trained = routed_model()
        dynroute.save_checkpoint(tmp_path / "routed.pt", trained)
        dense = CifarResNet(1)
        dynroute.load_checkpoint(tmp_path / "routed.pt", dense, strict=False)
        for key, value in dense.state_dict().items():
            torch.testing.assert_close(value, trained.state_dict()[key], rtol=0, atol=0, msg=key)

    @pytest.mark.parametrize("prefix", ["", "module."])
    def test_load_dense_state_dict(self, prefix):
        state = {prefix + key: value for key, value in routed_model().state_dict().items()}
        with pytest.raises(TypeError, match=self.MESSAGE.format(what="state_dict")):
            dynroute.load_dense_state_dict(CifarResNet(1), state)


class TestDenseCheckpoint:
    """A dense checkpoint loads into a converted model: weights copied, routers keep their init."""

    @pytest.mark.parametrize(
        "prefix",
        ["", "module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."],
        ids=["plain", "ddp", "compiled", "compiled-ddp", "ddp-of-compiled"],
    )
    def test_retrofit(self, prefix):
        torch.manual_seed(11)
        dense = CifarResNet(1).eval()
        for bn in dense.modules():  # non-trivial BN statistics, so a forgotten buffer would show
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
        model = _fresh()
        routers = {key: value.clone() for key, value in model.state_dict().items() if ".router." in key}
        state = {prefix + key: value for key, value in dense.state_dict().items()}
        assert dynroute.load_dense_state_dict(model, state) is model
        for key, value in model.state_dict().items():
            expected = routers[key] if ".router." in key else dense.state_dict()[key]
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
        x = images(4)
        with torch.no_grad():
            torch.testing.assert_close(dynroute.force_gates(model, "open")(x), dense(x), rtol=1e-5, atol=1e-5)

    def test_routed_checkpoint_loads_routers_too(self):
        trained = routed_model()
        model = dynroute.load_dense_state_dict(_fresh(), trained.state_dict())
        for key, value in trained.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
