"""Training checkpoints of routed models (weights and stage) and dense weights loaded into a converted model.

The deployable artifact, which rebuilds the model by itself, is :func:`dynroute.save_pretrained`'s.
"""

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dynroute.layers.routing import WRAPPER_ATTRIBUTES, gated_blocks, unwrap_model
from dynroute.training.stages import get_stage, set_stage

__all__ = ["save_checkpoint", "load_checkpoint", "load_dense_state_dict"]

# Prefixes that wrappers add to every key: DistributedDataParallel's "module.", torch.compile's "_orig_mod.".
_WRAPPER_PREFIXES = tuple(f"{name}." for name in WRAPPER_ATTRIBUTES)


def _strip_wrapper_prefixes(key: str) -> str:
    """``key`` without the prefixes of any nesting of wrappers (``module._orig_mod.``, ``_orig_mod.module.``...)."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]  # each prefix is one dotted name
    return key


def _refuse_routers_for_unconverted(model: nn.Module, keys: Iterable[str], what: str) -> None:
    """A TypeError naming the fix if ``keys`` hold router weights and ``model`` has no gated blocks to take them."""
    routed = sorted({key.split(".router.")[0] for key in map(_strip_wrapper_prefixes, keys) if ".router." in key})
    if not routed or any(True for _ in gated_blocks(model)):
        return
    shown = ", ".join(f"{block}.router.*" for block in routed[:3]) + (", ..." if len(routed) > 3 else "")
    raise TypeError(
        f"this {what} has routers (keys {shown}: {len(routed)} gated blocks) but {type(model).__name__} is not "
        "converted; convert the model first with dynroute.convert_resnet(model, input_size=...) (the same "
        "blocks= as when it was saved), then load"
    )


def load_dense_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load the ``state_dict`` of the dense (unconverted) network into converted ``model``.

    Conversion keeps every ``state_dict`` key and adds ``<block>.router.*``, so a dense
    checkpoint fits a converted model except for the routers, which keep their initialisation
    (open with ``init_open_prob``). Router keys, when present, load too. Anything else missing,
    unexpected or of another shape raises before any weight is copied. Keys prefixed by DDP
    (``module.``) or ``torch.compile`` (``_orig_mod.``), in any nesting, are accepted.

    Returns:
        The same model, for chaining.

    Example:
        >>> dense_state = torchvision.models.resnet18().state_dict()
        >>> model = dynroute.convert_resnet(torchvision.models.resnet18(), input_size=(3, 224, 224))
        >>> dynroute.load_dense_state_dict(model, dense_state)
    """
    _refuse_routers_for_unconverted(model, state_dict, "state_dict")
    router_prefixes = tuple(f"{name}.router." for name, _ in gated_blocks(model))
    if not router_prefixes:
        raise TypeError(
            f"{type(model).__name__} has no gated blocks; load a dense state_dict into a dense model with "
            "model.load_state_dict, or convert it first with dynroute.convert_resnet"
        )
    state_dict = {_strip_wrapper_prefixes(key): value for key, value in state_dict.items()}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict and not key.startswith(router_prefixes)]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the model"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"the state_dict does not fit {type(model).__name__}: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, shape mismatches {mismatched[:5]}; build the architecture the checkpoint was "
            "trained with (same depth and width) before converting it"
        )
    model.load_state_dict(state_dict, strict=False)
    return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Save a model's ``state_dict`` and stage, plus ``extra`` entries (optimizer state, epoch...).

    A training checkpoint, to resume from: it holds weights, not what builds the model, so it loads
    with :func:`load_checkpoint` into a model you build and convert as before. The loss's state is
    not in the model: pass ``criterion=criterion.state_dict()`` to keep the budget controller's gamma
    (``cost.gamma`` of :class:`dynroute.CoDiNetLoss`) and restore it with
    ``criterion.load_state_dict(extra["criterion"])``. For the deployable artifact that rebuilds the
    model by itself use :func:`dynroute.save_pretrained`.

    DDP and torch.compile wrappers are unwrapped, so the keys are the model's own. A model without gated blocks (a
    dense baseline) is saved with stage None.

    Example:
        >>> dynroute.save_checkpoint("last.pt", model, epoch=epoch, criterion=criterion.state_dict())
    """
    model = unwrap_model(model)
    stage = get_stage(model) if any(True for _ in gated_blocks(model)) else None
    torch.save({"model": model.state_dict(), "stage": stage, **extra}, path)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint of :func:`save_checkpoint` into ``model`` and restore its stage.

    A checkpoint of a routed model loads into a model converted the same way; into an unconverted
    one it is a TypeError saying to convert first (with ``strict=False`` the routers and the stage
    are left out, which takes the network's weights alone).

    Returns:
        The ``extra`` entries that were saved with it.
    """
    model = unwrap_model(model)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(
            f"{os.fspath(path)!r} is not a dynroute checkpoint (no 'model' entry); for a pretrained dense "
            "checkpoint use model.load_state_dict or dynroute.models.load_cifar_checkpoint"
        )
    state = checkpoint.pop("model")
    if strict:  # non-strict may mean to take the dense weights of a routed checkpoint
        _refuse_routers_for_unconverted(model, state, "checkpoint")
    model.load_state_dict(state, strict=strict)
    stage = checkpoint.pop("stage", None)
    if stage is not None and any(True for _ in gated_blocks(model)):
        set_stage(model, stage)
    return checkpoint
