"""Which network a model is, written as a builder call, and that call made again.

An architecture is ``{"library": ..., "name": ..., "kwargs": {...}}``: a CIFAR ResNet of
:mod:`dynroute.models` (``"dynroute"``, a builder such as ``"resnet56"``), a timm model
(``timm.create_model(name, **kwargs)``) or a torchvision model (``torchvision.models.get_model``).
It is found from the model, then checked by building it on the meta device (no memory, no weights)
and comparing every ``state_dict`` key and shape with the model's.
"""

from typing import Any

import torch
from torch import nn

from dynroute.conversion.flops import first_conv_channels
from dynroute.layers.routing import gated_blocks
from dynroute.models import cifar_resnet

Architecture = dict[str, Any]

LIBRARIES = ("dynroute", "timm", "torchvision")
# The CIFAR builders by name: the class itself (any depth) and each depth's function.
_CIFAR_BUILDERS = {
    "CifarResNet": cifar_resnet.CifarResNet,
    **{name: getattr(cifar_resnet, name) for name in cifar_resnet.__all__ if name.startswith("resnet")},
}


def _describe_cifar(model: cifar_resnet.CifarResNet) -> Architecture:
    blocks_per_stage = len(model.layer1)
    shortcut = "A" if any(isinstance(module, cifar_resnet.PadShortcut) for module in model.modules()) else "B"
    kwargs = {"num_classes": model.num_classes, "shortcut": shortcut, "in_chans": model.conv1.in_channels}
    name = f"resnet{6 * blocks_per_stage + 2}"
    if name not in _CIFAR_BUILDERS:
        name, kwargs = "CifarResNet", {"blocks_per_stage": blocks_per_stage, **kwargs}
    return {"library": "dynroute", "name": name, "kwargs": kwargs}


def _torchvision_resnet_builders() -> list[str]:
    """torchvision's ResNet builders, smallest name first (resnet18 before resnet101)."""
    import torchvision

    names = [name for name in torchvision.models.list_models(module=torchvision.models) if "res" in name]
    return sorted(names, key=lambda name: (len(name), name))


def _describe_torchvision_resnet(model: nn.Module) -> Architecture | None:
    """The torchvision builder whose network has ``model``'s keys and shapes, or None."""
    kwargs = {"num_classes": model.fc.out_features}
    for name in _torchvision_resnet_builders():
        architecture = {"library": "torchvision", "name": name, "kwargs": kwargs}
        if layout_mismatch(architecture, model) is None:
            return architecture
    return None


def describe_architecture(model: nn.Module) -> Architecture | None:
    """The builder call that makes ``model``'s network (unconverted), or None if it is not one dynroute knows."""
    if type(model) is cifar_resnet.CifarResNet:
        return _describe_cifar(model)
    config = getattr(model, "pretrained_cfg", None) or {}
    if type(model).__module__.startswith("timm.") and "architecture" in config:
        kwargs = {"num_classes": model.num_classes, "in_chans": first_conv_channels(model)}
        return {"library": "timm", "name": config["architecture"], "kwargs": kwargs}
    if f"{type(model).__module__}.{type(model).__qualname__}" == "torchvision.models.resnet.ResNet":
        return _describe_torchvision_resnet(model)
    return None


def check_architecture(architecture: object) -> Architecture:
    """``architecture`` if it has the three entries, from a known library; else a ValueError naming the fix."""
    if (
        not isinstance(architecture, dict)
        or set(architecture) != {"library", "name", "kwargs"}
        or architecture["library"] not in LIBRARIES
        or not isinstance(architecture["name"], str)
        or not isinstance(architecture["kwargs"], dict)
    ):
        raise ValueError(
            f"architecture must be a dict {{'library': one of {LIBRARIES}, 'name': the builder's name, 'kwargs': "
            f"{{...}}}}, e.g. {{'library': 'timm', 'name': 'resnet50', 'kwargs': {{'num_classes': 10}}}}, but got "
            f"{architecture!r}"
        )
    return architecture


def build_architecture(architecture: Architecture) -> nn.Module:
    """The unconverted network ``architecture`` describes, freshly initialised (no pretrained weights)."""
    library, name, kwargs = check_architecture(architecture).values()
    if library == "dynroute":
        if name not in _CIFAR_BUILDERS:
            raise ValueError(f"unknown CIFAR ResNet {name!r}; dynroute.models builds {sorted(_CIFAR_BUILDERS)}")
        return _CIFAR_BUILDERS[name](**kwargs)
    if library == "timm":
        import timm

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; list timm's models with timm.list_models('resnet*')")
        return timm.create_model(name, pretrained=False, **kwargs)
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"unknown torchvision model {name!r}; list them with torchvision.models.list_models()")
    return torchvision.models.get_model(name, weights=None, **kwargs)


def dense_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shape of each ``state_dict`` entry of ``model`` without its routers: the unconverted network's."""
    routers = tuple(f"{name}.router." for name, _ in gated_blocks(model))
    return {key: tuple(value.shape) for key, value in model.state_dict().items() if not key.startswith(routers)}


def layout_mismatch(architecture: Architecture, model: nn.Module) -> str | None:
    """How ``architecture``, built on the meta device, differs from ``model``'s network; None if it does not."""
    with torch.device("meta"):
        expected = dense_layout(build_architecture(architecture))
    found = dense_layout(model)
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = [f"{key}: {found[key]} for {shape}" for key, shape in expected.items() if found.get(key, shape) != shape]
    if not (missing or unexpected or shapes):
        return None
    return f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}, shape mismatches {shapes[:3]}"
