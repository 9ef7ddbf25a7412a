"""Router of CoDiNet (Wang et al., TPAMI 2021, Eq. 3-6).

A router looks at the input of one residual block and decides whether the block runs:
global average pooling, a fully connected layer, an activation, and a second fully connected
layer that gives two logits, ``(skip, run)``. In training the decision is relaxed with the
reparameterized Gumbel-softmax (Eq. 7); in eval it is the deterministic argmax (Eq. 13).
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Router", "relaxed_gate", "hard_gate"]

Relaxation = Literal["gumbel", "straight_through"]
_RELAXATIONS = ("gumbel", "straight_through")


def relaxed_gate(
    logits: Tensor,
    temperature: float = 1.0,
    relaxation: Relaxation = "gumbel",
) -> Tensor:
    """Sample the relaxed "run" probability v_k of Eq. 7 from router logits.

    Args:
        logits: router logits, shape (N, 2), column 1 meaning "run".
        temperature: Gumbel-softmax temperature T.
        relaxation: ``"gumbel"`` for the soft sample, ``"straight_through"`` for a hard 0/1
            sample in the forward pass with the soft sample's gradient.

    Returns:
        Gate values, shape (N,), in float32 whatever the logits' dtype.
    """
    if relaxation not in _RELAXATIONS:
        raise ValueError(f"relaxation must be one of {_RELAXATIONS}, but got {relaxation!r}")
    sample = F.gumbel_softmax(logits.float(), tau=temperature, hard=relaxation == "straight_through")
    return sample[:, 1]


def hard_decision(logits: Tensor) -> Tensor:
    """Deterministic decision u_k = argmax(U_k) of Eq. 13 as int64 0/1, shape (N, 2) -> (N,).

    A tie skips (argmax takes the first column); a NaN logit wins (argmax counts NaN as the maximum).
    """
    return logits.argmax(1)


def hard_gate(logits: Tensor) -> Tensor:
    """Deterministic decision u_k = argmax(U_k) of Eq. 13, shape (N, 2) -> (N,) float32 of 0/1."""
    return hard_decision(logits).float()


def check_gate_settings(temperature: float, relaxation: str, init_open_prob: float) -> None:
    """Raise a ValueError naming the bad value unless the settings every router shares are valid."""
    if not 0.0 < init_open_prob < 1.0:
        raise ValueError(f"init_open_prob must lie strictly between 0 and 1, but got {init_open_prob}")
    if not temperature > 0:  # NaN too
        raise ValueError(f"temperature must be positive, but got {temperature}")
    if relaxation not in _RELAXATIONS:
        raise ValueError(f"relaxation must be one of {_RELAXATIONS}, but got {relaxation!r}")


def open_logit(open_prob: float) -> float:
    """The "run" logit, over a "skip" logit of 0, that opens a gate with probability ``open_prob``."""
    return math.log(open_prob / (1 - open_prob))


@torch.no_grad()
def set_decision_offset(router: nn.Module, offset: float) -> None:
    """Set ``router``'s decision offset: its "run" logit is ``offset`` above what training left.

    The offset is folded into the run bias (``router.run_bias``), so a forward costs nothing more, and kept
    in the ``decision_offset`` buffer, so the next call moves the bias by the difference only and the
    ``state_dict`` records it. A gate runs a block when ``run + offset > skip``: a run probability above
    ``sigmoid(-offset)`` rather than above 0.5. Positive offsets open more gates, negative ones fewer.
    """
    offset = float(offset)
    if offset != offset or abs(offset) == math.inf:  # NaN or inf
        raise ValueError(f"the decision offset must be a finite number of logits, but got {offset}")
    router.run_bias.add_(offset - router.decision_offset.item())
    router.decision_offset.fill_(offset)


def load_with_offset(router: nn.Module, state_dict: dict, prefix: str, *args, **kwargs) -> None:
    """``nn.Module._load_from_state_dict`` that reads a checkpoint saved before routers had ``decision_offset``.

    Such a checkpoint's run bias already holds any shift that trimming or calibration applied, so its offset
    counts as 0.
    """
    state_dict.setdefault(f"{prefix}decision_offset", torch.zeros(()))
    nn.Module._load_from_state_dict(router, state_dict, prefix, *args, **kwargs)


class Router(nn.Module):
    """Gate of one residual block: GAP -> fc1 -> act -> fc2 -> logits (N, 2) of (skip, run).

    The second layer starts with zero weights and a bias that opens the gate with probability
    ``init_open_prob``, so a retrofitted pretrained network starts close to its dense self.

    Args:
        in_channels: channels of the block input.
        hidden_channels: width of the hidden layer; default ``max(rd_min, in_channels * rd_ratio)``.
        rd_ratio: hidden width as a fraction of ``in_channels`` when ``hidden_channels`` is unset.
        rd_min: smallest hidden width when ``hidden_channels`` is unset.
        act_layer: activation between the two layers.
        temperature: Gumbel-softmax temperature T of Eq. 7.
        relaxation: ``"gumbel"`` (default) or ``"straight_through"``.
        init_open_prob: probability that the gate opens at initialisation, in (0, 1).

    Attributes:
        decision_offset: a buffer, the logits by which :meth:`set_decision_offset` raised the "run" logit
            over what training left (0 after conversion). :func:`dynroute.calibrate_budget` and
            :func:`dynroute.set_decision_offset` set it for every router of a model at once.

    Example:
        >>> router = Router(64)
        >>> router(torch.randn(8, 64, 32, 32)).shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int | None = None,
        rd_ratio: float = 1 / 8,
        rd_min: int = 16,
        act_layer: type[nn.Module] = nn.ReLU,
        temperature: float = 1.0,
        relaxation: Relaxation = "gumbel",
        init_open_prob: float = 0.9,
    ) -> None:
        super().__init__()
        check_gate_settings(temperature, relaxation, init_open_prob)
        if hidden_channels is None:
            hidden_channels = max(rd_min, round(in_channels * rd_ratio))
        self.temperature = temperature
        self.relaxation: Relaxation = relaxation
        self.init_open_prob = init_open_prob
        self.fc1 = nn.Linear(in_channels, hidden_channels)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_channels, 2)
        self.register_buffer("decision_offset", torch.zeros(()))
        self.reset_gate()

    @property
    def run_bias(self) -> Tensor:
        """The bias of the "run" logit, the entry that :meth:`set_decision_offset` shifts."""
        return self.fc2.bias[1:]

    def reset_gate(self) -> None:
        """Zero the last layer's weights and set its bias to open with ``init_open_prob`` (offset 0)."""
        nn.init.zeros_(self.fc2.weight)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.tensor([0.0, open_logit(self.init_open_prob)]))
            self.decision_offset.zero_()

    set_decision_offset = set_decision_offset
    _load_from_state_dict = load_with_offset

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, 2) of (skip, run) for block input x of shape (N, C, H, W), in the router's dtype.

        Under autocast the router still runs in its own (float32) precision: a decision is the sign of
        a logit difference, which bfloat16 would round, and the router costs next to nothing.
        """
        weight = self.fc1.weight  # a method, not a tensor, once torch.ao.quantization swapped the layer
        x = x.to(weight.dtype if isinstance(weight, Tensor) else torch.float32)
        if not torch.is_autocast_enabled(x.device.type):
            return self._layers(x)
        with torch.autocast(x.device.type, enabled=False):
            return self._layers(x)

    def _layers(self, x: Tensor) -> Tensor:
        """fc2(act(fc1(GAP(x)))) for x (N, C, H, W): logits (N, 2)."""
        # One `mean`, no pool-then-flatten: as fast as adaptive_avg_pool2d or faster at every size measured.
        return self.fc2(self.act(self.fc1(x.mean((2, 3)))))

    def gate(self, logits: Tensor, hard: bool) -> Tensor:
        """Gate values (N,): relaxed per Eq. 7 unless ``hard``, else the argmax decision."""
        if hard:
            return hard_gate(logits)
        return relaxed_gate(logits, self.temperature, self.relaxation)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, relaxation={self.relaxation!r}, init_open_prob={self.init_open_prob}, "
            f"decision_offset={self.decision_offset.item():g}"
        )
