"""A router whose decision does not depend on the input: one learned logit pair per block.

It is the ablation of dynamic routing. Trained with the same relaxation, losses and budget control as
:class:`~dynroute.Router`, it learns which blocks to drop for every image alike: learned pruning. A
routed model worth its routers beats the same model converted with ``router_layer=StaticRouter`` at
the same budget.
"""

import torch
from torch import Tensor, nn

from dynroute.layers.router import Relaxation, Router, check_gate_settings, open_logit

__all__ = ["StaticRouter"]


class StaticRouter(nn.Module):
    """Gate logits (N, 2) of (skip, run) that are one learned pair, the same for every sample.

    Takes the same arguments as :class:`~dynroute.Router` that make sense without an input, so
    ``dynroute.convert_resnet(model, router_layer=StaticRouter, ...)`` swaps it in. In training each
    sample still draws its own Gumbel-softmax gate from the shared logits; at inference every sample
    takes the same decision.

    Args:
        in_channels: channels of the block input; unused, accepted so both routers are built alike.
        temperature: Gumbel-softmax temperature T of Eq. 7.
        relaxation: ``"gumbel"`` (default) or ``"straight_through"``.
        init_open_prob: probability that the gate opens at initialisation, in (0, 1).

    Attributes:
        logits: the learned (skip, run) pair, shape (2,).
        decision_offset: as for :class:`~dynroute.Router`.

    Example:
        >>> router = StaticRouter(64)
        >>> router(torch.randn(8, 64, 32, 32)).shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        in_channels: int | None = None,
        temperature: float = 1.0,
        relaxation: Relaxation = "gumbel",
        init_open_prob: float = 0.9,
    ) -> None:
        super().__init__()
        check_gate_settings(temperature, relaxation, init_open_prob)
        self.temperature = temperature
        self.relaxation: Relaxation = relaxation
        self.init_open_prob = init_open_prob
        self.logits = nn.Parameter(torch.tensor([0.0, open_logit(init_open_prob)]))
        self.register_buffer("decision_offset", torch.zeros(()))

    @property
    def run_bias(self) -> Tensor:
        """The "run" logit, the entry that :meth:`set_decision_offset` shifts."""
        return self.logits[1:]

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 2) for block input x of shape (N, C, H, W): the learned pair for every sample, in float32."""
        return self.logits.float().expand(x.shape[0], 2)

    # The gate, the decision offset and the settings shown are the Router's own.
    gate = Router.gate
    set_decision_offset = Router.set_decision_offset
    _load_from_state_dict = Router._load_from_state_dict
    extra_repr = Router.extra_repr
