"""Small converted models whose routers really disagree between samples, shared by the robustness tests."""

import logging

import torch
from torch import nn

import dynroute
from dynroute.models import CifarResNet


def images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    """Images whose channel means differ per sample, so routers see different inputs."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 3, 1, 1, generator=generator) * 3
    return torch.randn(n, 3, size, size, generator=generator) * scale


def eager_reference(model: nn.Module, n: int = 12, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images, and ``model``'s logits (N, classes) and paths (N, blocks) on them; every block runs for some."""
    x = images(n, seed=seed)
    with torch.no_grad():
        logits = model(x)
    paths = dynroute.routing_paths(model)
    assert ((paths.sum(0) > 0) & (paths.sum(0) < len(x))).all(), "every block should run for some images only"
    return x, logits, paths


def centre_routers(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Random routers, each biased to run its block for about half of ``x`` in the model's current mode."""
    blocks = [block for _, block in dynroute.gated_blocks(model)]
    with torch.no_grad():
        for block in blocks:
            nn.init.normal_(block.router.fc2.weight, std=3.0)
            block.router.fc2.bias.zero_()
        dynroute.force_gates(model, "open")(x)
        for block in blocks:
            difference = block.last_logits[:, 1] - block.last_logits[:, 0]
            block.router.fc2.bias[1] = -difference.median() + 1e-3
    return dynroute.force_gates(model, None)


def routed_model(blocks_per_stage: int = 1, seed: int = 0) -> nn.Module:
    """A converted CIFAR ResNet in eval mode; each router runs its block for about half of ``images(64)``."""
    torch.manual_seed(seed)
    model = dynroute.convert_resnet(CifarResNet(blocks_per_stage), input_size=(3, 32, 32)).eval()
    return centre_routers(model, images(64, seed=seed + 100))


class RecompileLimitHits(logging.Handler):
    """Collects dynamo's "hit config.recompile_limit" warnings: past the limit a code object runs uncompiled."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "hit config." in record.getMessage():
            self.messages.append(record.getMessage())


class UnregisteredBlock(nn.Module):
    """A residual block of a type no adapter is registered for: what convert_resnet must name."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class RowCountBlock(nn.Module):
    """A registered residual block whose branch decides something from its number of rows: a batched graph that
    skips cannot gather for it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.residual(x))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * 2 if x.shape[0] > 1 else self.conv(x)


dynroute.register_block(
    RowCountBlock,
    dynroute.BlockAdapter(
        residual=lambda block, x: block.residual(x),
        shortcut=lambda block, x: x,
        activation=lambda block, x: torch.relu(x),
        in_channels=lambda block: 4,
    ),
)
