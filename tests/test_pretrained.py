"""save_pretrained / from_pretrained round trips, the two layouts, Hub interop (offline) and clear errors."""

import json
import shutil

import huggingface_hub
import pytest
import timm
import torch
import torchvision
from routed_models import centre_routers, images
from torch import nn

import dynroute
from dynroute.export import pretrained
from dynroute.models import CifarResNet

LAYOUTS = ["model.pt", "model-folder"]


def _cifar_routed() -> nn.Module:
    """A CIFAR ResNet-20 (option B) with 3 of its blocks gated, non-default router settings, in stage 2."""
    model = dynroute.models.resnet20(num_classes=7, shortcut="B")
    blocks = ["layer1.0", "layer2.0", "layer3.2"]
    dynroute.convert_resnet(model, (3, 32, 32), blocks=blocks, hidden_channels=8, act_layer=nn.GELU, temperature=2.0)
    return dynroute.set_stage(centre_routers(model.eval(), images(64)), 2)


def _timm_routed() -> nn.Module:
    model = dynroute.convert_resnet(timm.create_model("resnet18", num_classes=3), input_size=(3, 32, 32))
    return centre_routers(model.eval(), images(64))


def _torchvision_routed() -> nn.Module:
    model = dynroute.convert_resnet(torchvision.models.resnet18(num_classes=5), input_size=(3, 32, 32))
    return centre_routers(model.eval(), images(64))


ROUTED = {"cifar": _cifar_routed, "timm": _timm_routed, "torchvision": _torchvision_routed}
DENSE = {
    "cifar": lambda: CifarResNet(1, num_classes=4, in_chans=1),
    "timm": lambda: timm.create_model("resnet18", num_classes=3),
    "torchvision": lambda: torchvision.models.resnext50_32x4d(num_classes=2),
}


def _outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        logits = model.eval()(x)
    routed = any(True for _ in dynroute.gated_blocks(model))
    return logits, dynroute.routing_paths(model) if routed else None


class TestRoundTrip:
    """The model comes back exactly: logits, paths, MAC table, stage and routers."""

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("family", ROUTED)
    def test_routed(self, family, layout, tmp_path, one_thread):
        model = ROUTED[family]()
        path = dynroute.save_pretrained(model, tmp_path / layout, metadata={"gamma": 0.25})
        loaded = dynroute.from_pretrained(path)
        x = images(32, seed=3)
        (logits, paths), (got_logits, got_paths) = _outputs(model, x), _outputs(loaded, x)
        assert 0 < paths.mean() < 1  # the routers take different paths for different images
        torch.testing.assert_close(got_logits, logits, rtol=0, atol=0)
        torch.testing.assert_close(got_paths, paths, rtol=0, atol=0)
        assert dynroute.macs_table(loaded) == dynroute.macs_table(model)
        assert dynroute.get_stage(loaded) == dynroute.get_stage(model) and not loaded.training
        for (name, block), (loaded_name, loaded_block) in zip(
            dynroute.gated_blocks(model), dynroute.gated_blocks(loaded)
        ):
            assert loaded_name == name and repr(loaded_block.router) == repr(block.router)
        assert loaded.dynroute_config["metadata"] == {"gamma": 0.25}

    @pytest.mark.parametrize("layout", LAYOUTS)
    @pytest.mark.parametrize("family", DENSE)
    def test_dense(self, family, layout, tmp_path, one_thread):
        model = DENSE[family]().eval()
        input_size = (1, 32, 32) if family == "cifar" else (3, 32, 32)
        loaded = dynroute.from_pretrained(dynroute.save_pretrained(model, tmp_path / layout, input_size=input_size))
        x = torch.randn(4, *input_size)
        torch.testing.assert_close(_outputs(loaded, x)[0], _outputs(model, x)[0], rtol=0, atol=0)
        assert not any(True for _ in dynroute.gated_blocks(loaded))
        config = loaded.dynroute_config
        assert config["converted"] is False and config["routing"] is None and config["input_size"] == list(input_size)

    def test_saved_again_after_loading(self, tmp_path, one_thread):
        model = _cifar_routed()
        loaded = dynroute.from_pretrained(dynroute.save_pretrained(model, tmp_path / "a.pt", mean=(0.5,) * 3))
        again = dynroute.from_pretrained(dynroute.save_pretrained(loaded, tmp_path / "b"))
        assert again.dynroute_config["preprocessing"]["mean"] == [0.5] * 3
        x = images(8)
        torch.testing.assert_close(_outputs(again, x)[0], _outputs(model, x)[0], rtol=0, atol=0)

    def test_loading_is_weights_only(self, tmp_path, monkeypatch, one_thread):
        model = _cifar_routed()
        dynroute.save_pretrained(model, tmp_path / "model.pt")
        dynroute.save_pretrained(model, tmp_path / "folder")
        calls, load = [], torch.load
        monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(kwargs) or load(*args, **kwargs))
        dynroute.from_pretrained(tmp_path / "model.pt")
        dynroute.from_pretrained(tmp_path / "folder")
        assert len(calls) == 2 and all(call.get("weights_only") is True for call in calls)

    def test_router_class_is_looked_up_by_name(self, tmp_path, monkeypatch, one_thread):
        class WideRouter(dynroute.Router):
            pass

        monkeypatch.setitem(pretrained.ROUTER_LAYERS, "WideRouter", WideRouter)
        model = dynroute.convert_resnet(CifarResNet(1), (3, 32, 32), router_layer=WideRouter, rd_min=24)
        loaded = dynroute.from_pretrained(dynroute.save_pretrained(model, tmp_path / "model.pt"))
        routers = [block.router for _, block in dynroute.gated_blocks(loaded)]
        assert all(type(router) is WideRouter and router.fc1.out_features == 24 for router in routers)
        assert loaded.dynroute_config["routing"]["router_layer"] == "WideRouter"

    def test_static_router_with_a_decision_offset_round_trips(self, tmp_path, one_thread):
        model = dynroute.convert_resnet(CifarResNet(1), (3, 32, 32), router_layer=dynroute.StaticRouter)
        with torch.no_grad():
            for _, block in dynroute.gated_blocks(model):
                block.router.logits.normal_()
        dynroute.set_decision_offset(model, 0.4)
        loaded = dynroute.from_pretrained(dynroute.save_pretrained(model, tmp_path / "model.pt"))
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
        routers = [block.router for _, block in dynroute.gated_blocks(loaded)]
        assert all(type(r) is dynroute.StaticRouter and r.decision_offset.item() == pytest.approx(0.4) for r in routers)


class TestLayouts:
    """What the files hold, so other tools (and the Hub) can read them."""

    def test_single_file(self, tmp_path):
        model = _cifar_routed()
        dynroute.save_pretrained(model, tmp_path / "model.pt")
        artifact = torch.load(tmp_path / "model.pt", weights_only=True)
        assert set(artifact) == {"format", "format_version", "config", "state_dict"}
        assert (artifact["format"], artifact["format_version"]) == ("dynroute", 1)
        config = artifact["config"]
        assert config["dynroute_version"] == dynroute.__version__
        assert config["architecture"] == {
            "library": "dynroute",
            "name": "resnet20",
            "kwargs": {"num_classes": 7, "shortcut": "B", "in_chans": 3},
        }
        assert config["routing"] == {
            "blocks": ["layer1.0", "layer2.0", "layer3.2"],
            "router_layer": "Router",
            "router_kwargs": {"hidden_channels": 8, "act_layer": "torch.nn.GELU", "temperature": 2.0},
            "stage": 2,
        }
        assert config["input_size"] == [3, 32, 32] and config["converted"] is True
        assert config["preprocessing"] == {
            "image_size": 32,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        }
        assert artifact["state_dict"].keys() == model.state_dict().keys()

    def test_folder(self, tmp_path):
        model = _timm_routed()
        dynroute.save_pretrained(model, tmp_path / "routed", metadata={"command": "train.py --budget 0.6"})
        assert {path.name for path in (tmp_path / "routed").iterdir()} == {
            "config.json",
            "pytorch_model.bin",
            "README.md",
        }
        config = json.loads((tmp_path / "routed" / "config.json").read_text())
        assert (config["format"], config["format_version"]) == ("dynroute", 1)
        assert config["architecture"] == {
            "library": "timm",
            "name": "resnet18",
            "kwargs": {"num_classes": 3, "in_chans": 3},
        }
        assert config["preprocessing"]["mean"] == list(model.pretrained_cfg["mean"])
        weights = torch.load(tmp_path / "routed" / "pytorch_model.bin", weights_only=True)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(weights[key], value, rtol=0, atol=0)
        card = (tmp_path / "routed" / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: dynroute\n") and "train.py --budget 0.6" in card
        assert f'dynroute.from_pretrained("{tmp_path / "routed"}")' in card

    def test_timm_dense_defaults_to_its_input_size(self, tmp_path):
        model = timm.create_model("resnet18", num_classes=3)
        dynroute.save_pretrained(model, tmp_path / "dense")
        config = json.loads((tmp_path / "dense" / "config.json").read_text())
        assert config["input_size"] == list(model.pretrained_cfg["input_size"]) and config["routing"] is None


class TestHub:
    """Hugging Face Hub interop, offline: huggingface_hub's calls are replaced by local copies."""

    def test_push_to_hub_uploads_the_folder(self, tmp_path, monkeypatch, one_thread):
        created, uploaded = [], tmp_path / "uploaded"

        def create_repo(self, repo_id, **kwargs):
            created.append((repo_id, kwargs))

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            shutil.copytree(folder_path, uploaded)
            return f"commit of {repo_id}"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        model = _cifar_routed()
        assert (
            dynroute.push_to_hub(model, "org/routed", private=True, metadata={"top1": 91.0}) == "commit of org/routed"
        )
        assert created == [("org/routed", {"private": True, "exist_ok": True})]
        assert {path.name for path in uploaded.iterdir()} == {"config.json", "pytorch_model.bin", "README.md"}
        assert 'dynroute.from_pretrained("hf-hub:org/routed")' in (uploaded / "README.md").read_text()
        loaded = dynroute.from_pretrained(uploaded)
        torch.testing.assert_close(_outputs(loaded, images(8))[0], _outputs(model, images(8))[0], rtol=0, atol=0)

    def test_from_pretrained_downloads_hf_hub_ids(self, tmp_path, monkeypatch, one_thread):
        model = _cifar_routed()
        dynroute.save_pretrained(model, tmp_path / "cache")
        requested = []

        def hf_hub_download(repo_id, filename, **kwargs):
            requested.append((repo_id, filename))
            return str(tmp_path / "cache" / filename)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
        loaded = dynroute.from_pretrained("hf-hub:org/routed")
        assert requested == [("org/routed", "config.json"), ("org/routed", "pytorch_model.bin")]
        torch.testing.assert_close(_outputs(loaded, images(8))[0], _outputs(model, images(8))[0], rtol=0, atol=0)


class TestErrors:
    """What cannot be saved or loaded says why and what to do."""

    def test_missing_path(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="no file or folder .*hf-hub:org/name"):
            dynroute.from_pretrained(tmp_path / "nothing.pt")

    def test_training_checkpoint_is_not_a_saved_model(self, tmp_path):
        dynroute.save_checkpoint(tmp_path / "last.pt", _cifar_routed())
        with pytest.raises(ValueError, match=r"not a dynroute model .*'model', 'stage'.*dynroute.load_checkpoint"):
            dynroute.from_pretrained(tmp_path / "last.pt")

    def test_other_files_and_folders(self, tmp_path):
        (tmp_path / "notes.pt").write_text("not a torch file")
        with pytest.raises(ValueError, match=r"not a dynroute model \(torch.load\(weights_only=True\) fails"):
            dynroute.from_pretrained(tmp_path / "notes.pt")
        with pytest.raises(ValueError, match="not a dynroute model .*without config.json"):
            dynroute.from_pretrained(tmp_path)

    def test_newer_format(self, tmp_path):
        dynroute.save_pretrained(CifarResNet(1), tmp_path / "folder", input_size=(3, 32, 32))
        config = json.loads((tmp_path / "folder" / "config.json").read_text())
        (tmp_path / "folder" / "config.json").write_text(json.dumps({**config, "format_version": 2}))
        with pytest.raises(ValueError, match="format_version 2, newer than .*upgrade dynroute"):
            dynroute.from_pretrained(tmp_path / "folder")

    def test_weights_that_do_not_fit(self, tmp_path):
        dynroute.save_pretrained(_cifar_routed(), tmp_path / "folder")
        weights = torch.load(tmp_path / "folder" / "pytorch_model.bin", weights_only=True)
        del weights["layer3.2.router.fc1.weight"]
        torch.save(weights, tmp_path / "folder" / "pytorch_model.bin")
        with pytest.raises(ValueError, match=r"do not fit .*layer3\.2\.router\.fc1\.weight.*save the model again"):
            dynroute.from_pretrained(tmp_path / "folder")

    def test_unknown_router_class(self, tmp_path):
        dynroute.save_pretrained(_cifar_routed(), tmp_path / "folder")
        config = json.loads((tmp_path / "folder" / "config.json").read_text())
        config["routing"]["router_layer"] = "FutureRouter"
        (tmp_path / "folder" / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="router 'FutureRouter', which this dynroute .* does not know"):
            dynroute.from_pretrained(tmp_path / "folder")

    def test_unknown_and_wrong_architectures(self, tmp_path):
        custom = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
        with pytest.raises(TypeError, match="pass architecture="):
            dynroute.save_pretrained(custom, tmp_path / "custom.pt", input_size=(3, 8, 8))
        wrong = {"library": "timm", "name": "resnet34", "kwargs": {"num_classes": 3}}
        with pytest.raises(ValueError, match=r"does not build ResNet's network \(missing keys \['layer1.2"):
            dynroute.save_pretrained(
                timm.create_model("resnet18", num_classes=3), tmp_path / "m.pt", architecture=wrong
            )
        with pytest.raises(ValueError, match="architecture must be a dict"):
            dynroute.save_pretrained(CifarResNet(1), tmp_path / "m.pt", architecture={"name": "resnet20"})

    def test_what_json_cannot_hold(self, tmp_path):
        with pytest.raises(TypeError, match="metadata must be plain JSON"):
            dynroute.save_pretrained(
                CifarResNet(1), tmp_path / "m.pt", input_size=(3, 32, 32), metadata={"x": object()}
            )

        class MyActivation(nn.ReLU):
            pass

        model = dynroute.convert_resnet(CifarResNet(1), (3, 32, 32), act_layer=MyActivation)
        with pytest.raises(TypeError, match=r"act_layer=.*MyActivation cannot be saved: .*classes of torch.nn"):
            dynroute.save_pretrained(model, tmp_path / "m.pt")

    def test_gated_blocks_not_made_by_convert_resnet(self, tmp_path):
        model = CifarResNet(1)
        model.layer1[0] = dynroute.GatedBlock(model.layer1[0])
        with pytest.raises(TypeError, match="not converted by dynroute.convert_resnet"):
            dynroute.save_pretrained(model, tmp_path / "m.pt", input_size=(3, 32, 32))

    def test_dense_model_without_a_default_input_size(self, tmp_path):
        with pytest.raises(ValueError, match=r"input_size is needed"):
            dynroute.save_pretrained(CifarResNet(1), tmp_path / "m.pt")


class TestTrainingCheckpoint:
    """save_checkpoint keeps the training state that a saved model leaves out, such as the budget's gamma."""

    def test_criterion_state_keeps_gamma(self, tmp_path):
        model = _cifar_routed()
        criterion = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=2, target=0.7)
        criterion.cost.gamma.fill_(0.375)
        dynroute.save_checkpoint(tmp_path / "last.pt", model, criterion=criterion.state_dict())
        restored = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=2, target=0.7)
        restored.load_state_dict(dynroute.load_checkpoint(tmp_path / "last.pt", _cifar_routed())["criterion"])
        assert restored.cost.gamma.item() == 0.375
