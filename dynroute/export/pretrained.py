"""One artifact for a routed (or dense) model: its weights and what rebuilds it, on disk or on the Hugging Face Hub.

:func:`save_pretrained` writes the architecture, the conversion (gated blocks, router class and
settings, MAC table input size), the training stage, the evaluation preprocessing and free-form
metadata next to the ``state_dict``; :func:`from_pretrained` builds the network again, converts it
the same way and loads the weights strictly, with ``torch.load(..., weights_only=True)``. The
decision threshold travels in the ``state_dict`` (the routers' run biases).

Two layouts hold the same content:

- a single file (``model.pt``): ``{"format": "dynroute", "format_version": 1, "config": {...},
  "state_dict": {...}}``;
- a folder, as timm and the Hugging Face Hub lay out models: ``config.json`` (the config, plus
  ``format`` and ``format_version``), ``pytorch_model.bin`` (the ``state_dict``, a dict of tensors)
  and a ``README.md`` model card.

The config (a JSON object)::

    dynroute_version  the version that saved it
    architecture      {"library": "dynroute" | "timm" | "torchvision", "name": builder, "kwargs": {...}}
    converted         whether the model has routers
    routing           {"blocks": [gated block names], "router_layer": "Router", "router_kwargs": {...},
                      "stage": 1 | 2}, or null for a dense model
    input_size        [C, H, W] of the MAC table (converted) or of the images the model expects (dense)
    preprocessing     {"image_size": int, "mean": [...], "std": [...]}: dynroute.eval_transform(**preprocessing)
    metadata          anything JSON the saver added (budget controller's gamma, training command, figures)
"""

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynroute._validation import check_input_size
from dynroute._version import __version__
from dynroute.conversion.convert import _default_input_size, convert_resnet, router_settings
from dynroute.conversion.flops import macs_table
from dynroute.export.architectures import (
    Architecture,
    build_architecture,
    check_architecture,
    describe_architecture,
    layout_mismatch,
)
from dynroute.layers.router import Router
from dynroute.layers.routing import gated_blocks, unwrap_model
from dynroute.layers.static_router import StaticRouter
from dynroute.training.data import IMAGENET_MEAN, IMAGENET_STD
from dynroute.training.stages import get_stage, set_stage

__all__ = ["save_pretrained", "from_pretrained", "push_to_hub"]

FORMAT = "dynroute"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"
MODEL_CARD_NAME = "README.md"
HUB_PREFIX = "hf-hub:"
_SINGLE_FILE_SUFFIXES = (".pt", ".pth")
_CONFIG_ATTRIBUTE = "dynroute_config"

# Router classes a config may name; a new router class is one more entry.
ROUTER_LAYERS: dict[str, type[nn.Module]] = {"Router": Router, "StaticRouter": StaticRouter}


def _check_json(value: object, what: str) -> None:
    """A TypeError naming ``what`` unless ``value`` is plain JSON (dicts, lists, strings, finite numbers...)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must be plain JSON (dict, list, str, int, float, bool, None): {error}") from None


def _encode_router_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Router kwargs as JSON: a class given to a ``*_layer`` argument (``act_layer=nn.GELU``) as ``"torch.nn.GELU"``."""
    encoded = {}
    for key, value in kwargs.items():
        if isinstance(value, type):
            if not (key.endswith("_layer") and getattr(nn, value.__name__, None) is value):
                raise TypeError(
                    f"router argument {key}={value.__qualname__} cannot be saved: a saved model records classes "
                    "of torch.nn given to *_layer arguments only (act_layer=nn.GELU); convert with one of those"
                )
            value = f"torch.nn.{value.__name__}"
        encoded[key] = value
    _check_json(encoded, "the router arguments given to dynroute.convert_resnet")
    return encoded


def _decode_router_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_encode_router_kwargs`."""
    decoded = dict(kwargs)
    for key, value in kwargs.items():
        if key.endswith("_layer") and isinstance(value, str) and value.startswith("torch.nn."):
            layer = getattr(nn, value.removeprefix("torch.nn."), None)
            if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
                raise ValueError(f"the config's router argument {key}={value!r} is not a torch.nn module class")
            decoded[key] = layer
    return decoded


def _routing_config(model: nn.Module) -> dict[str, Any]:
    settings = router_settings(model)
    if settings is None:
        raise TypeError(
            f"{type(model).__name__} has gated blocks but was not converted by dynroute.convert_resnet, so how to "
            "build its routers again is unknown; convert the original network with dynroute.convert_resnet"
        )
    names = [name for name, layer in ROUTER_LAYERS.items() if layer is settings.router_layer]
    if not names:
        raise TypeError(
            f"router_layer={settings.router_layer.__qualname__} cannot be saved; a saved model names its router "
            f"class, one of {sorted(ROUTER_LAYERS)}"
        )
    return {
        "blocks": [name for name, _ in gated_blocks(model)],
        "router_layer": names[0],
        "router_kwargs": _encode_router_kwargs(settings.kwargs),
        "stage": get_stage(model),
    }


def _preprocessing(
    model: nn.Module,
    input_size: tuple[int, int, int],
    image_size: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> dict[str, Any]:
    """What ``dynroute.eval_transform`` needs: timm's mean and std for a timm model, else ImageNet's."""
    config = getattr(model, "pretrained_cfg", None) or {}
    if image_size is None:
        if input_size[1] != input_size[2]:
            raise ValueError(
                f"input_size {input_size} is not square: pass image_size=, the side the evaluation transform resizes "
                "and crops images to"
            )
        image_size = input_size[1]
    mean = config.get("mean", IMAGENET_MEAN) if mean is None else mean
    std = config.get("std", IMAGENET_STD) if std is None else std
    return {"image_size": int(image_size), "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def model_config(
    model: nn.Module,
    *,
    architecture: Architecture | None = None,
    input_size: tuple[int, int, int] | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config :func:`save_pretrained` records for ``model`` (arguments as there)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    model = unwrap_model(model)
    loaded = getattr(model, _CONFIG_ATTRIBUTE, None) or {}  # a model from from_pretrained keeps what it was saved with
    if architecture is None:
        architecture = loaded.get("architecture") or describe_architecture(model)
    if architecture is None:
        raise TypeError(
            f"save_pretrained knows CIFAR ResNets of dynroute.models, timm models and torchvision ResNets, not "
            f"{type(model).__qualname__}; pass architecture={{'library': 'timm' | 'torchvision' | 'dynroute', "
            "'name': builder name, 'kwargs': {...}}"
        )
    check_architecture(architecture)
    _check_json(architecture, "architecture")
    mismatch = layout_mismatch(architecture, model)
    if mismatch is not None:
        raise ValueError(
            f"the architecture {architecture} does not build {type(model).__name__}'s network ({mismatch}); pass "
            "architecture= with the builder name and kwargs the model was made with"
        )
    converted = any(True for _ in gated_blocks(model))
    routing = _routing_config(model) if converted else None
    if converted:
        table_size = macs_table(model).input_size
        if input_size is not None and check_input_size(input_size) != table_size:
            raise ValueError(
                f"input_size {tuple(input_size)} differs from the MAC table's {table_size}; a converted model is "
                "saved at its table's input size: drop input_size"
            )
        input_size = table_size
    else:
        input_size = check_input_size(_default_input_size(model) if input_size is None else input_size)
    if image_size is None and mean is None and std is None and "preprocessing" in loaded:
        preprocessing = loaded["preprocessing"]
    else:
        preprocessing = _preprocessing(model, input_size, image_size, mean, std)
    metadata = dict(metadata or {})
    _check_json(metadata, "metadata")
    return {
        "dynroute_version": __version__,
        "architecture": architecture,
        "converted": converted,
        "routing": routing,
        "input_size": list(input_size),
        "preprocessing": preprocessing,
        "metadata": metadata,
    }


def _state_dict(model: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().cpu() for key, value in unwrap_model(model).state_dict().items()}


def _model_card(config: dict[str, Any], source: str) -> str:
    architecture = config["architecture"]
    what = "routed" if config["converted"] else "dense"
    routing = config["routing"]
    gates = (
        f" {len(routing['blocks'])} of its residual blocks are gated by a `{routing['router_layer']}` that decides "
        "per image whether the block runs (CoDiNet, Wang et al., TPAMI 2021)."
        if routing
        else ""
    )
    return f"""---
library_name: dynroute
tags:
- image-classification
- dynroute
- dynamic-routing
---

# {architecture["name"]} ({what})

A {what} `{architecture["name"]}` ({architecture["library"]}) saved with dynroute {config["dynroute_version"]}.{gates}

## Use

```python
import dynroute

model = dynroute.from_pretrained("{source}")
transform = dynroute.eval_transform(**model.dynroute_config["preprocessing"])
```

```bash
python -m dynroute eval --checkpoint {source} --data-root DIR --json
```

## Metadata

```json
{json.dumps(config["metadata"], indent=2)}
```

## Config

```json
{json.dumps(config, indent=2)}
```
"""


def _write_folder(folder: Path, config: dict[str, Any], state_dict: dict[str, Tensor], source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    (folder / CONFIG_NAME).write_text(json.dumps(header, indent=2) + "\n")
    torch.save(state_dict, folder / WEIGHTS_NAME)
    (folder / MODEL_CARD_NAME).write_text(_model_card(config, source))


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    architecture: Architecture | None = None,
    input_size: tuple[int, int, int] | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` as one deployable artifact that :func:`from_pretrained` rebuilds exactly.

    The artifact holds the weights and everything that rebuilds the model (see the module's
    documentation for the config): the same logits, paths and MAC table come back. It is not a
    training checkpoint: :func:`dynroute.save_checkpoint` keeps what resuming needs (optimizer,
    the loss's state such as the budget controller's gamma, epoch) for a model you build yourself.

    Args:
        model: a CIFAR ResNet of :mod:`dynroute.models`, a timm model or a torchvision ResNet,
            converted by :func:`dynroute.convert_resnet` or dense; DDP and ``torch.compile``
            wrappers are unwrapped. Not changed.
        path: a file ending in ``.pt`` or ``.pth`` for the single-file layout; anything else is a
            folder (created if needed) with ``config.json``, ``pytorch_model.bin`` and a ``README.md``
            model card, the layout :func:`push_to_hub` uploads.
        architecture: the builder call, ``{"library": "dynroute" | "timm" | "torchvision", "name": ...,
            "kwargs": {...}}``; default found from the model (CIFAR: depth, classes, shortcut; timm:
            ``pretrained_cfg["architecture"]``, classes, input channels; torchvision: the ResNet builder
            with the model's keys and shapes). Checked against the model's keys and shapes.
        input_size: (C, H, W) of the images a dense model expects; default timm's own. A converted
            model records its MAC table's.
        image_size: side the evaluation transform resizes and crops to; default ``input_size``'s.
        mean: normalisation mean; default timm's for a timm model, else ImageNet's (dynroute's transforms' default).
        std: normalisation standard deviation, defaults as for ``mean``.
        metadata: free-form JSON, e.g. ``{"gamma": criterion.cost.gamma.item(), "command": ..., "top1": ...}``.

    Returns:
        The path written.

    Example:
        >>> dynroute.save_pretrained(model, "resnet56-routed")  # a folder
        >>> dynroute.save_pretrained(model, "resnet56-routed.pt", metadata={"top1": 93.1})  # one file
    """
    config = model_config(
        model, architecture=architecture, input_size=input_size, image_size=image_size, mean=mean, std=std,
        metadata=metadata,
    )  # fmt: skip
    path = Path(path)
    if path.suffix in _SINGLE_FILE_SUFFIXES:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": FORMAT, "format_version": FORMAT_VERSION}
        torch.save({**header, "config": config, "state_dict": _state_dict(model)}, path)
    else:
        _write_folder(path, config, _state_dict(model), str(path))
    return path


def _not_dynroute(source: str, found: str) -> ValueError:
    return ValueError(
        f"{source} is not a dynroute model ({found}); save one with dynroute.save_pretrained(model, path). A "
        "training checkpoint of dynroute.save_checkpoint loads with dynroute.load_checkpoint into a model you build"
    )


def _check_format(header: Mapping[str, Any], source: str) -> None:
    if header.get("format") != FORMAT:
        keys = sorted(str(key) for key in header)[:6]
        raise _not_dynroute(source, f"no 'format': 'dynroute' entry; its keys are {keys}")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version {version!r}, newer than this dynroute {__version__} reads "
            f"({FORMAT_VERSION}); upgrade dynroute (pip install -U dynroute)"
        )


def _load_tensors(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, or one that needs arbitrary code to unpickle
        raise _not_dynroute(str(path), f"torch.load(weights_only=True) fails: {str(error).splitlines()[0]}") from None


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise _not_dynroute(str(folder), f"a folder without {CONFIG_NAME}")
    try:
        header = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise _not_dynroute(str(config_path), f"not JSON: {error}") from None
    if not isinstance(header, dict):
        raise _not_dynroute(str(config_path), "not a JSON object")
    _check_format(header, str(config_path))
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} has a {CONFIG_NAME} but no {WEIGHTS_NAME}; save the model again")
    config = {key: value for key, value in header.items() if key not in ("format", "format_version")}
    return config, _load_tensors(weights_path)


def _read_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    artifact = _load_tensors(path)
    if not isinstance(artifact, dict):
        raise _not_dynroute(str(path), f"it holds a {type(artifact).__name__}")
    _check_format(artifact, str(path))
    return artifact["config"], artifact["state_dict"]


def _download(repo_id: str) -> Path:
    """The folder of the Hub repository ``repo_id`` in the local Hub cache, downloaded if needed."""
    from huggingface_hub import hf_hub_download

    config_path = hf_hub_download(repo_id, CONFIG_NAME, library_name="dynroute", library_version=__version__)
    hf_hub_download(repo_id, WEIGHTS_NAME, library_name="dynroute", library_version=__version__)
    return Path(config_path).parent


def read_pretrained(path_or_id: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config, state_dict) of a saved model: a ``.pt`` file, a folder, or ``"hf-hub:org/name"``."""
    if isinstance(path_or_id, str) and path_or_id.startswith(HUB_PREFIX):
        return _read_folder(_download(path_or_id.removeprefix(HUB_PREFIX)))
    path = Path(path_or_id)
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_file(path)
    raise FileNotFoundError(
        f"no file or folder {os.fspath(path_or_id)!r}; pass the path dynroute.save_pretrained wrote, or "
        f"'{HUB_PREFIX}org/name' for a model on the Hugging Face Hub"
    )


_CONFIG_KEYS = ("architecture", "converted", "routing", "input_size", "preprocessing", "metadata")
_ROUTING_KEYS = ("blocks", "router_layer", "router_kwargs", "stage")


def _check_config(config: object, source: str) -> None:
    """A ValueError naming the missing entries unless ``config`` has every entry :func:`build_pretrained` reads."""
    missing = [key for key in _CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if not missing and config["converted"]:
        routing = config["routing"]
        missing = [f"routing.{key}" for key in _ROUTING_KEYS if not isinstance(routing, dict) or key not in routing]
    if missing:
        raise ValueError(f"the config of {source} lacks {missing}; the files were changed after saving: save it again")


def build_pretrained(config: dict[str, Any], state_dict: Mapping[str, Tensor], source: str) -> nn.Module:
    """The model ``config`` describes, converted as it says, with ``state_dict`` loaded strictly; eval mode."""
    _check_config(config, source)
    model = build_architecture(config["architecture"])
    routing = config["routing"] if config["converted"] else None
    if routing is not None:
        if routing["router_layer"] not in ROUTER_LAYERS:
            raise ValueError(
                f"{source} uses router {routing['router_layer']!r}, which this dynroute {__version__} does not know "
                f"(it knows {sorted(ROUTER_LAYERS)}); upgrade dynroute (pip install -U dynroute)"
            )
        convert_resnet(
            model,
            input_size=tuple(config["input_size"]),
            blocks=routing["blocks"],
            router_layer=ROUTER_LAYERS[routing["router_layer"]],
            **_decode_router_kwargs(routing["router_kwargs"]),
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise ValueError(
            f"the weights of {source} do not fit the model its config describes ({detail[:400]}); the files were "
            "changed after dynroute.save_pretrained: save the model again"
        ) from None
    if routing is not None:
        set_stage(model, routing["stage"])
    object.__setattr__(model, _CONFIG_ATTRIBUTE, config)
    return model.eval()


def from_pretrained(path_or_id: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained` (or :func:`push_to_hub`), weights loaded, in eval mode.

    The network is built from its architecture without pretrained weights, converted as it was
    (gated blocks, router class and settings, MAC table input size), its ``state_dict`` loaded
    strictly with ``torch.load(..., weights_only=True)`` and its training stage set. Nothing is
    downloaded except for an ``"hf-hub:"`` id. The model returned keeps its config as
    ``model.dynroute_config`` (a dict): ``dynroute.eval_transform(**model.dynroute_config["preprocessing"])``
    is the transform it expects, and ``["metadata"]`` what its saver added.

    Args:
        path_or_id: a single file or a folder of :func:`save_pretrained`, or ``"hf-hub:org/name"``, a
            repository on the Hugging Face Hub (downloaded with ``huggingface_hub.hf_hub_download``
            into its cache).

    Returns:
        The model on the CPU, in eval mode.

    Example:
        >>> model = dynroute.from_pretrained("resnet56-routed")
        >>> model = dynroute.from_pretrained("hf-hub:org/resnet56-routed")
    """
    config, state_dict = read_pretrained(path_or_id)
    return build_pretrained(config, state_dict, os.fspath(path_or_id))


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Add dynroute model",
    **save_options: Any,
) -> Any:
    """Upload ``model`` to the Hugging Face Hub as the folder :func:`save_pretrained` writes.

    Creates the repository if it does not exist. Needs a network and a token with write access
    (``huggingface-cli login``, or ``token=``). Load it anywhere with
    ``dynroute.from_pretrained("hf-hub:" + repo_id)``.

    Args:
        model: as for :func:`save_pretrained`.
        repo_id: ``"org/name"`` of the repository.
        private: make a new repository private.
        token: a Hugging Face token; default the one logged in.
        commit_message: message of the upload's commit.
        **save_options: keyword arguments of :func:`save_pretrained` (``metadata``, ``architecture``, ...).

    Returns:
        What ``huggingface_hub.HfApi.upload_folder`` returns: the commit's information.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    config = model_config(model, **save_options)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        _write_folder(Path(folder), config, _state_dict(model), HUB_PREFIX + repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
