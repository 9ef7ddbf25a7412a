"""CIFAR ResNets of He et al., *Deep Residual Learning for Image Recognition* (CVPR 2016), Sec. 4.2.

Three stages of ``n`` basic blocks with 16, 32 and 64 channels on 32x32 inputs; depth 6n + 2.
Shortcuts that change shape are option A (strided subsampling and zero-padded channels, no
parameters) or option B (1x1 convolution and batch norm). The module names match the widely used
pretrained checkpoints (``conv1``, ``bn1``, ``layer1..3``, ``linear``), which
:func:`load_cifar_checkpoint` reads.
"""

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PadShortcut",
    "CifarBasicBlock",
    "CifarResNet",
    "load_cifar_checkpoint",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet74",
    "resnet110",
]

ShortcutOption = Literal["A", "B"]


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the channels to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"out_channels must be >= in_channels, but got {out_channels} < {in_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))."""
        extra = self.out_channels - self.in_channels
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarBasicBlock(nn.Module):
    """3x3-3x3 basic block: ``act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: ShortcutOption = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', but got {shortcut!r}")

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: stem, three stages of ``blocks_per_stage`` blocks, linear head.

    Args:
        blocks_per_stage: n, giving depth 6n + 2.
        num_classes: classifier outputs.
        shortcut: ``"A"`` (zero padding, as in the paper's CIFAR experiments) or ``"B"``.
        in_chans: input channels.

    Example:
        >>> model = resnet20()
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        shortcut: ShortcutOption = "A",
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, but got {blocks_per_stage}")
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        widths = (16, 32, 64)
        in_channels = 16
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [CifarBasicBlock(in_channels, width, stride, shortcut)]
            blocks += [CifarBasicBlock(width, width, 1, shortcut) for _ in range(blocks_per_stage - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        self.num_classes = num_classes
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, 64, H / 4, W / 4)."""
        x = self.act(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> logits (N, num_classes)."""
        return self.linear(self.pool(self.forward_features(x)).flatten(1))


def _cifar_resnet(depth: int, num_classes: int, shortcut: ShortcutOption, in_chans: int) -> CifarResNet:
    """The CIFAR ResNet of ``depth`` = 6n + 2 layers."""
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, shortcut=shortcut, in_chans=in_chans)


def resnet20(*, num_classes: int = 10, shortcut: ShortcutOption = "A", in_chans: int = 3) -> CifarResNet:
    """ResNet-20: 3 blocks per stage. Arguments as for :class:`CifarResNet`."""
    return _cifar_resnet(20, num_classes, shortcut, in_chans)


def resnet32(*, num_classes: int = 10, shortcut: ShortcutOption = "A", in_chans: int = 3) -> CifarResNet:
    """ResNet-32: 5 blocks per stage. Arguments as for :class:`CifarResNet`."""
    return _cifar_resnet(32, num_classes, shortcut, in_chans)


def resnet44(*, num_classes: int = 10, shortcut: ShortcutOption = "A", in_chans: int = 3) -> CifarResNet:
    """ResNet-44: 7 blocks per stage. Arguments as for :class:`CifarResNet`."""
    return _cifar_resnet(44, num_classes, shortcut, in_chans)


def resnet56(*, num_classes: int = 10, shortcut: ShortcutOption = "A", in_chans: int = 3) -> CifarResNet:
    """ResNet-56: 9 blocks per stage. Arguments as for :class:`CifarResNet`."""
    return _cifar_resnet(56, num_classes, shortcut, in_chans)


def resnet74(*, num_classes: int = 10, shortcut: ShortcutOption = "A", in_chans: int = 3) -> CifarResNet:
    """ResNet-74: 12 blocks per stage. Arguments as for :class:`CifarResNet`."""
    return _cifar_resnet(74, num_classes, shortcut, in_chans)


def resnet110(*, num_classes: int = 10, shortcut: ShortcutOption = "A", in_chans: int = 3) -> CifarResNet:
    """ResNet-110: 18 blocks per stage. Arguments as for :class:`CifarResNet`."""
    return _cifar_resnet(110, num_classes, shortcut, in_chans)


def load_cifar_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a pretrained CIFAR ResNet checkpoint into ``model`` (dense or converted).

    Accepts a bare ``state_dict`` or a dict holding one under ``"state_dict"``, with or without
    the ``module.`` prefix DataParallel leaves. Router parameters of a converted model and BN's
    ``num_batches_tracked`` counters may be absent; any other missing or unexpected key is an error.

    Returns:
        The same model, for chaining.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint)
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    result = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked") and ".router." not in key]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not fit {type(model).__name__}: missing keys {missing[:5]}, "
            f"unexpected keys {result.unexpected_keys[:5]}; build the model of the depth the checkpoint was "
            "trained with (resnet20 for cifar_resnet20.th, ...)"
        )
    return model
