"""Retrofit CoDiNet routers onto a ResNet: replace each residual block by a :class:`GatedBlock`."""

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from dynroute._validation import check_image_batch, check_input_size
from dynroute.conversion.flops import attach_macs_table, build_macs_table, first_conv_channels
from dynroute.conversion.registry import get_adapter, registered_block_types
from dynroute.layers.gated_block import GatedBlock
from dynroute.layers.router import Router
from dynroute.layers.routing import unwrap_model
from dynroute.layers.stage import adopt_stage

__all__ = ["convert_resnet"]

BlockSelector = str | Iterable[str] | Callable[[str, nn.Module], bool]

_ROUTER_SETTINGS_ATTRIBUTE = "_dynroute_router_settings"


@dataclass(frozen=True)
class RouterSettings:
    """How :func:`convert_resnet` built a model's routers: ``router_layer(in_channels, **kwargs)`` per block."""

    router_layer: type[nn.Module]
    kwargs: dict[str, Any]


def router_settings(model: nn.Module) -> RouterSettings | None:
    """The router settings ``model`` (or its DDP / compile wrapper) was converted with, or None if not converted."""
    return getattr(unwrap_model(model), _ROUTER_SETTINGS_ATTRIBUTE, None)


def _default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """timm's input size for a timm model; for any other, a ValueError suggesting one that fits the model."""
    config = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in config:  # timm models know theirs
        return tuple(config["input_size"])
    channels = first_conv_channels(model) or 3
    raise ValueError(
        f"input_size is needed to measure the MACs of {type(model).__name__} (only timm models carry a default); "
        f"pass convert_resnet(model, input_size=({channels}, H, W)), the size of the images it will see, e.g. "
        f"({channels}, 32, 32) for CIFAR or ({channels}, 224, 224) for ImageNet"
    )


def _supported_names() -> list[str]:
    """Module-qualified names of the registered block types (timm's and torchvision's share class names)."""
    return [f"{block_type.__module__}.{block_type.__qualname__}" for block_type in registered_block_types()]


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Registered residual blocks by dotted name; a subclass of a registered type is an error."""
    registered = registered_block_types()
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, GatedBlock):
            raise ValueError(
                f"{type(model).__name__} is already converted (found a GatedBlock at {name!r}); "
                "convert the original model only once"
            )
        if get_adapter(module) is not None:
            if not name:
                raise TypeError(
                    f"convert_resnet() takes a whole network, but got a bare {type(module).__qualname__}; "
                    "wrap a single block with dynroute.GatedBlock(block)"
                )
            blocks.append((name, module))
        elif isinstance(module, registered):
            raise TypeError(
                f"block {name!r} is a {type(module).__qualname__}, a subclass of a supported block that may "
                f"compute differently; supported exactly: {_supported_names()}. Teach the converter with "
                "dynroute.register_block(type(block), dynroute.BlockAdapter(...))"
            )
    return blocks


# Words in the class names of residual blocks across libraries (BasicBlock, Bottleneck, Bottle2neck, ConvNeXtBlock...).
_BLOCK_NAME_HINTS = ("Block", "Bottle", "Basic")


def _count_layers(module: nn.Module) -> int:
    """Convolutions and linear layers in ``module`` and below: a residual block has at least two."""
    return sum(isinstance(child, (nn.modules.conv._ConvNd, nn.Linear)) for child in module.modules())


def _unregistered_blocks(model: nn.Module) -> dict[type[nn.Module], list[str]]:
    """Modules that look like residual blocks but have no adapter, by type, with their dotted names.

    A candidate is a module with at least two convolution or linear layers, of a class not defined
    in ``torch.nn``, not inside a registered block, that is a child of an ``nn.Sequential`` (a stage)
    or of a class whose name says block (``Block``, ``Bottle``, ``Basic``). A candidate most of
    whose layers sit in candidates held by ``nn.Sequential`` containers inside it is a stage and gives
    way to them; of the rest nested in one another (a block and its squeeze-excitation) the
    outermost is the block.
    """
    candidates: dict[str, int] = {}  # dotted name -> layers
    in_sequence: set[str] = set()  # candidates that are children of an nn.Sequential
    modules: dict[str, nn.Module] = {}
    skipped: list[str] = []  # registered blocks: what is inside them is theirs
    for parent_name, parent in model.named_modules():
        if any(parent_name == name or parent_name.startswith(name + ".") for name in skipped):
            continue
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if get_adapter(child) is not None:
                skipped.append(name)
                continue
            kind = type(child)
            if kind.__module__.startswith("torch.nn") or name in candidates:
                continue
            sequence = isinstance(parent, nn.Sequential)
            layers = _count_layers(child)
            if layers >= 2 and (sequence or any(hint in kind.__name__ for hint in _BLOCK_NAME_HINTS)):
                candidates[name], modules[name] = layers, child
                if sequence:
                    in_sequence.add(name)

    def inside(name: str, outer: str) -> bool:
        return name.startswith(outer + ".")

    def outermost(names: list[str]) -> list[str]:
        return [name for name in names if not any(inside(name, outer) for outer in names)]

    def held_by_sequences(outer: str) -> int:
        return sum(
            candidates[name] for name in outermost([n for n in candidates if inside(n, outer)]) if name in in_sequence
        )

    stages = {outer for outer in candidates if 2 * held_by_sequences(outer) > candidates[outer]}
    found: dict[type[nn.Module], list[str]] = {}
    for name in outermost([name for name in candidates if name not in stages]):
        found.setdefault(type(modules[name]), []).append(name)
    return found


def _describe_unregistered(found: dict[type[nn.Module], list[str]]) -> str:
    """``timm.models.res2net.Bottle2neck (16 blocks: 'layer1.0', 'layer1.1', ...)`` for each type found."""
    parts = []
    for kind, names in found.items():
        shown = ", ".join(repr(name) for name in names[:2]) + (", ..." if len(names) > 2 else "")
        count = f"{len(names)} block{'s' if len(names) > 1 else ''}"
        parts.append(f"{kind.__module__}.{kind.__qualname__} ({count}: {shown})")
    return "; ".join(parts)


def _check_input(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a converted model: unbatched or empty input fails before the stem, naming the fix."""
    if args and isinstance(args[0], Tensor):
        check_image_batch(args[0], f"converted {type(model).__name__}")


def _select(blocks: list[tuple[str, nn.Module]], selector: BlockSelector | None) -> list[tuple[str, nn.Module]]:
    if selector is None:
        return blocks
    if callable(selector):
        return [(name, block) for name, block in blocks if selector(name, block)]
    wanted = {selector} if isinstance(selector, str) else set(selector)  # one name is one name, not its letters
    unknown = wanted - {name for name, _ in blocks}
    if unknown:
        raise ValueError(
            f"blocks {sorted(unknown)} are not residual blocks of this model; choose from {[n for n, _ in blocks]}"
        )
    return [(name, block) for name, block in blocks if name in wanted]


def convert_resnet(
    model: nn.Module,
    input_size: tuple[int, int, int] | None = None,
    blocks: BlockSelector | None = None,
    router_layer: Callable[..., nn.Module] = Router,
    **router_kwargs: Any,
) -> nn.Module:
    """Give each residual block of ``model`` a router, in place, and measure its MAC table.

    Works on timm and torchvision ResNets (and ResNeXts, wide and SE/ECA variants) and on
    :mod:`dynroute.models` CIFAR ResNets; other blocks can be taught with
    :func:`dynroute.register_block`. A model whose residual-looking blocks (children of its
    ``nn.Sequential`` stages, or classes named ``*Block*`` / ``*Bottle*`` / ``*Basic*``) are all of
    unknown types is a TypeError naming those types; blocks of unknown types next to supported
    ones are left dense, with a warning naming them.

    The forward signature and outputs are unchanged; with every
    gate forced open (:func:`dynroute.force_gates`) the logits are the original's. The ``state_dict``
    keeps the original's keys and adds ``<block>.router.*``: load the original's weights with
    :func:`dynroute.load_dense_state_dict` (a strict ``load_state_dict`` misses the router keys).

    Args:
        model: the network to convert; changed in place, and left as it was if conversion fails.
        input_size: (C, H, W) of one image, channels first, at which fvcore measures MACs; needed
            except for timm models, which default to their own.
        blocks: which residual blocks to gate: a dotted name (``"layer1.0"``), an iterable of
            them, or a predicate ``(name, block) -> bool``; default all.
        router_layer: the router class, called as ``router_layer(in_channels, **router_kwargs)`` for each
            block: :class:`Router` (per-image decisions, the default) or :class:`StaticRouter` (one
            learned decision for every image: the learned-pruning ablation).
        **router_kwargs: passed to every router (``rd_ratio``, ``temperature``,
            ``relaxation``, ``init_open_prob``, ...).

    Returns:
        The same model object, converted. Its MAC table is :func:`dynroute.macs_table` (model).

    Example:
        >>> model = dynroute.convert_resnet(timm.create_model("resnet18"), input_size=(3, 224, 224))
        >>> logits = model(torch.randn(2, 3, 224, 224))
        >>> dynroute.routing_paths(model).shape
        torch.Size([2, 8])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    found = _find_blocks(model)
    if not found:
        unregistered = _unregistered_blocks(model)
        if unregistered:
            example = next(iter(unregistered)).__name__
            raise TypeError(
                f"{type(model).__name__} has no supported residual blocks; it has blocks of types dynroute does not "
                f"know: {_describe_unregistered(unregistered)}. Supported: {_supported_names()}. Teach the converter "
                f"each type with dynroute.register_block({example}, dynroute.BlockAdapter(residual=..., "
                "shortcut=..., activation=..., in_channels=...)), which says how the block splits into residual "
                "branch, shortcut and final activation (docs/how-to/new-block.md)"
            )
        raise TypeError(
            f"{type(model).__name__} has no supported residual blocks, and no module that looks like one; "
            f"supported: {_supported_names()}. "
            "Teach the converter yours with dynroute.register_block(BlockType, dynroute.BlockAdapter(...))"
        )
    unregistered = _unregistered_blocks(model)
    if unregistered:
        warnings.warn(
            f"convert_resnet gates the supported blocks of {type(model).__name__} but leaves these dense, being of "
            f"types dynroute does not know: {_describe_unregistered(unregistered)}. To gate them too, "
            f"register each type first with dynroute.register_block({next(iter(unregistered)).__name__}, "
            "dynroute.BlockAdapter(...)) (docs/how-to/new-block.md)",
            stacklevel=2,
        )
    selected = _select(found, blocks)
    if not selected:
        raise ValueError(f"blocks={blocks!r} selects none of the residual blocks {[n for n, _ in found]}")
    input_size = check_input_size(_default_input_size(model) if input_size is None else input_size)
    replaced: list[tuple[nn.Module, str, GatedBlock, type[nn.Module]]] = []  # parent, name, gated, parent class
    hook = None
    try:
        for name, block in selected:
            adapter = get_adapter(block)
            router = router_layer(adapter.in_channels(block), **router_kwargs)
            parameter = next(block.parameters(), None)
            if parameter is not None:
                router.to(device=parameter.device, dtype=parameter.dtype)
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            gated = GatedBlock(block, router)
            gated.train(block.training)
            replaced.append((parent, child_name, gated, type(parent)))
            setattr(parent, child_name, gated)
            adopt_stage(parent)
        hook = model.register_forward_pre_hook(_check_input)
        attach_macs_table(model, build_macs_table(model, input_size))
        object.__setattr__(model, _ROUTER_SETTINGS_ATTRIBUTE, RouterSettings(router_layer, dict(router_kwargs)))
    except BaseException:
        _restore(replaced, hook)
        raise
    return model


def _restore(replaced: list[tuple[nn.Module, str, GatedBlock, type[nn.Module]]], hook: Any) -> None:
    """Undo a conversion that failed part way: the original blocks, stage classes and no input hook."""
    if hook is not None:
        hook.remove()
    for parent, child_name, gated, parent_class in reversed(replaced):
        setattr(parent, child_name, gated._release_block())
        parent.__class__ = parent_class
