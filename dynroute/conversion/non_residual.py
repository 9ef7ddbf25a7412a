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

from dynroute.conversion.registry import is_gateable

__all__ = ["refuse_non_residual"]

_DENSE = "each layer concatenates its output to its input instead of adding it, so a layer has no residual add"
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
    timm_cspnet.CspNet: (
        "its cross-stage partial stages split the features and concatenate the halves, so a stage is no "
        "residual add, and the blocks inside a partial path have no adapter"
    ),
}


def refuse_non_residual(model: nn.Module) -> None:
    """Raise a TypeError naming the class and the reason if ``model`` is (or holds) a known non-residual network.

    A network with blocks the converter gates (a registered type) passes: a user who registered an
    adapter for blocks inside such a network gets them converted.
    """
    if any(is_gateable(module) for module in model.modules()):
        return
    for name, module in model.named_modules():
        reason = next((why for family, why in _WHY_NOT.items() if isinstance(module, family)), None)
        if reason is not None:
            where = "" if not name else f" (at {name!r} of {type(model).__name__})"
            raise TypeError(
                f"{type(module).__module__}.{type(module).__qualname__}{where} has no residual add to gate: "
                f"{reason}. dynroute gates blocks that compute act(shortcut(x) + F(x)), such as those of ResNet, "
                "ResNetV2, RegNet, SENet, Res2Net, ResNeSt, SKNet and timm's ByobNet ResNets"
            )
