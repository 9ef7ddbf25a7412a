"""Networks the converter refuses by name: their blocks do not add a residual branch to their own input.

CoDiNet gates the residual branch F of a block computing ``act(shortcut(x) + F(x))``: skipping it
leaves the shortcut. In these families there is no such add to gate, or only inside a structure
whose skipping would change the shape of what follows.
"""

import timm.models.cspnet as timm_cspnet
import timm.models.densenet as timm_densenet
import timm.models.dla as timm_dla
import timm.models.dpn as timm_dpn
import torchvision.models.densenet as tv_densenet
from torch import nn

__all__ = ["refuse_non_residual"]

_DENSE = "each layer concatenates its output to its input instead of adding it, so a layer has no residual add"
_CROSS_STAGE = (
    "its cross-stage partial stages split the features and concatenate the halves, so a stage is no residual add, "
    "and the blocks inside a partial path have no adapter"
)
# The module whose presence says the network has no residual add, and why. CSPNet by its stages: timm's
# DarkNets are CspNet models too, built of plain stages of residual DarkBlocks, which an adapter could gate.
_WHY_NOT: dict[type[nn.Module], str] = {
    timm_dla.DLA: (
        "its blocks take their shortcut from the tree aggregation (DlaTree passes it in, then merges children "
        "in DlaRoot), so no block adds a residual branch to its own input"
    ),
    timm_densenet.DenseNet: _DENSE,
    tv_densenet.DenseNet: _DENSE,
    timm_dpn.DPN: (
        "its dual-path blocks add one part of their output to the input and concatenate the other (the dense "
        "path), so skipping a block would change the width of what follows"
    ),
    timm_cspnet.CrossStage: _CROSS_STAGE,
    timm_cspnet.CrossStage3: _CROSS_STAGE,
}


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def refuse_non_residual(model: nn.Module) -> None:
    """Raise a TypeError naming the model class and the reason if ``model`` is (or holds) a known non-residual network.

    The converter asks only about a model in which it found no block to gate: one whose blocks a user
    taught it with :func:`dynroute.register_block` converts, whatever family it belongs to.
    """
    for name, module in model.named_modules():
        reason = next((why for family, why in _WHY_NOT.items() if isinstance(module, family)), None)
        if reason is not None:
            where = "" if not name else f" (its {_qualified(type(module))} at {name!r})"
            raise TypeError(
                f"{_qualified(type(model))}{where} has no residual add to gate: {reason}. dynroute gates blocks "
                "that compute act(shortcut(x) + F(x)), such as those of ResNet, ResNetV2, RegNet, SENet, Res2Net, "
                "ResNeSt, SKNet and timm's ByobNet ResNets (docs/families.md)"
            )
