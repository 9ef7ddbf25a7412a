"""A residual block whose residual branch a router turns on or off per sample (CoDiNet, Eq. 7 and 13).

:func:`gated_residual` is the gate op and :class:`GatedBlock` its module, as torchvision pairs
``stochastic_depth`` with ``StochasticDepth``. In training the relaxed gate v scales the branch,
``act(shortcut(x) + v * F(x))`` (Eq. 7); in eval (and in stage 2, ``hard_decisions=True``) the
hard decisions choose which samples run ``F`` at all (Eq. 13): their rows are gathered, run and
added back, so a skipped block costs nothing but its router and shortcut.
"""

from collections.abc import Callable, Iterable
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from dynroute._validation import check_image_batch
from dynroute.conversion.registry import BlockAdapter, get_adapter
from dynroute.layers.router import Router, hard_decision

__all__ = ["GatedBlock", "gated_residual", "ForcedGate", "Execution"]

ForcedGate = Literal["open", "closed"] | Tensor
Execution = Literal["sparse", "masked"]
_EXECUTIONS = ("sparse", "masked")


def gated_residual(
    shortcut: Tensor,
    residual: Callable[[Tensor], Tensor],
    x: Tensor,
    gate: Tensor | bool,
    execution: Execution = "sparse",
    training: bool = False,
    parameters: Iterable[Tensor] = (),
) -> Tensor:
    """``shortcut + gate * residual(x)`` per sample: the residual branch under its gate, merged with the shortcut.

    Args:
        shortcut: the block's shortcut of x, (N, C_out, H', W').
        residual: the residual branch F, any callable (n, C_in, H, W) -> (n, C_out, H', W').
        x: the block input (N, C_in, H, W).
        gate: (N,) gate values, or a bool, the same decision for every sample (True runs F).
        execution: ``"masked"`` runs F on every sample and scales it by the gate: relaxed gates in
            [0, 1] (Eq. 7) or 0/1 decisions. ``"sparse"`` takes 0/1 decisions and runs F only on the
            samples whose decision is 1: their rows are gathered, run and added back (Eq. 13).
        training: sparse execution in training: batch norm normalises by the statistics of the rows it
            sees, and a single row has none to speak of, so one routed sample of a batch runs masked.
        parameters: the branch's parameters, read only when needed. In training with autograd, when a
            sparse gate routes no sample, the output is joined to them by an exact zero: each gets a
            (zero) gradient, as DistributedDataParallel expects from every rank.

    Returns:
        A new tensor (N, C_out, H', W'), never x or shortcut, so an in-place activation leaves both alone.
    """
    if execution not in _EXECUTIONS:
        raise ValueError(f"execution must be one of {_EXECUTIONS}, but got {execution!r}")
    if isinstance(gate, bool):
        return shortcut + residual(x) if gate else shortcut.clone()
    if gate.shape != x.shape[:1]:
        raise ValueError(f"gate must hold one value per sample, shape ({x.shape[0]},), but got {tuple(gate.shape)}")
    if execution == "masked":
        return _masked(shortcut, residual, x, gate)
    return _sparse(shortcut, residual, x, gate, training, parameters)


def _masked(shortcut: Tensor, residual: Callable[[Tensor], Tensor], x: Tensor, gate: Tensor) -> Tensor:
    """``shortcut + gate * F(x)`` with F run on every row."""
    branch = residual(x)
    return shortcut + gate.to(branch.dtype).view(-1, 1, 1, 1) * branch


def _sparse(
    shortcut: Tensor,
    residual: Callable[[Tensor], Tensor],
    x: Tensor,
    decisions: Tensor,
    training: bool,
    parameters: Iterable[Tensor],
) -> Tensor:
    """``shortcut + F(x)`` on the rows whose decision is 1 and ``shortcut`` elsewhere, F run on those rows only.

    index_select and index_add are the cheapest gather and scatter measured on CPU (boolean-mask
    indexing, index_put_ and index_copy_ of the sum all cost more).
    """
    routed = decisions.nonzero().squeeze(1)
    count = routed.numel()
    if count == x.shape[0]:
        return shortcut + residual(x)
    if count == 0:
        return _unrouted(shortcut, parameters if training else ())
    if count == 1 and training:
        return _masked(shortcut, residual, x, decisions)
    return merge_routed_rows(shortcut, residual, x, routed)


def merge_routed_rows(shortcut: Tensor, residual: Callable[[Tensor], Tensor], x: Tensor, routed: Tensor) -> Tensor:
    """A new tensor: ``shortcut + F(x)`` on the rows ``routed`` (n,), ``shortcut`` elsewhere, F run on those rows
    only (package helper; an export that decides in its graph whether any row is routed calls it)."""
    rows = residual(_gather_rows(x, routed)).to(shortcut.dtype)
    return _index_add_rows_(shortcut.clone(), routed, rows)


def _unrouted(shortcut: Tensor, parameters: Iterable[Tensor]) -> Tensor:
    """A copy of ``shortcut``; with autograd, joined to the trainable ``parameters`` by an exact zero.

    An empty slice's sum is exactly 0 and gives each parameter a zero gradient, so a rank on which every
    sample skips the block still takes part in DistributedDataParallel's all-reduce (no ``find_unused_parameters``).
    """
    trainable = [p for p in parameters if p.requires_grad] if torch.is_grad_enabled() else []
    if not trainable:
        return shortcut.clone()
    return shortcut + sum(torch.atleast_1d(p).narrow(0, 0, 0).sum() for p in trainable).to(shortcut.dtype)


def _is_channels_last(x: Tensor) -> bool:
    """Whether a 4D tensor is NHWC-strided (and not also NCHW-contiguous, as a tensor with C == 1 or H == W == 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


# Index ops along dim 0 of a channels_last tensor run on its (N, H, W, C) view, which is contiguous: on the
# tensor itself index_select returns an NCHW tensor (the branch would then run in NCHW) and index_add_ is slow.
_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def _gather_rows(x: Tensor, routed: Tensor) -> Tensor:
    """The rows ``routed`` (n,) of x (N, C, H, W), in x's memory format: (n, C, H, W)."""
    if _is_channels_last(x):
        return x.permute(_TO_NHWC).index_select(0, routed).permute(_TO_NCHW)
    return x.index_select(0, routed)


def _index_add_rows_(out: Tensor, routed: Tensor, rows: Tensor) -> Tensor:
    """``out[routed] += rows`` in place, for out (N, C, H, W) in either memory format; returns out."""
    if _is_channels_last(out):
        out.permute(_TO_NHWC).index_add_(0, routed, rows.permute(_TO_NHWC))
        return out
    return out.index_add_(0, routed, rows)


class GatedBlock(nn.Module):
    """Wrap ``block`` with a router gating its residual branch: :func:`gated_residual` as a module.

    The block's children, parameters and buffers are this module's own (the same dicts), so the
    ``state_dict`` keys of a converted network are those of the original plus ``router.*``, and a
    child replaced on either module (``SyncBatchNorm.convert_sync_batchnorm``, say) is the one that runs.

    Args:
        block: a residual block of a type registered with :func:`dynroute.register_block`.
        router: any module mapping the block input (N, C, H, W) to logits (N, 2) of (skip, run);
            default ``Router(in_channels)`` of the block. Training with relaxed gates calls its
            ``gate(logits, hard=False)``, as :class:`~dynroute.Router` defines it.

    Attributes:
        forced_gate: ``None`` to route, ``"open"`` to run every sample through the block (the
            dense network), ``"closed"`` to skip it for every sample, or a tensor of 0/1 decisions
            (N,), one per sample of the batches to come. The router still runs.
        hard_decisions: use hard argmax decisions in train mode too (stage 2 of CoDiNet).
        execution: how hard decisions run: ``"sparse"`` (default) computes the residual branch
            only for routed samples; ``"masked"`` computes it for all and multiplies by the 0/1
            gate, a static graph that saves nothing (what other implementations do). In training,
            a block that routes a single sample of a batch runs masked: batch norm needs more rows.
        last_gate: gate values (N,) of the last forward (relaxed in training, 0/1 otherwise).
        last_logits: router logits (N, 2) of the last forward.
        last_input_shape: input shape of the last forward, for MAC accounting.

    Example:
        >>> block = dynroute.models.CifarBasicBlock(16, 16)
        >>> gated = GatedBlock(block).eval()
        >>> gated(torch.randn(4, 16, 32, 32)).shape
        torch.Size([4, 16, 32, 32])
    """

    def __init__(self, block: nn.Module, router: nn.Module | None = None) -> None:
        super().__init__()
        adapter = get_adapter(block)
        if adapter is None:
            raise TypeError(
                f"no adapter is registered for {type(block).__qualname__}; "
                "register one with dynroute.register_block(block_type, dynroute.BlockAdapter(...))"
            )
        # The block stays unregistered, and its children, parameters and buffers are this module's
        # own: one dict each, shared. So the state_dict keys are the block's plus ``router.*``, and a
        # child replaced through either module (SyncBatchNorm.convert_sync_batchnorm, fuse_modules,
        # plain assignment) is the one the adapter runs.
        object.__setattr__(self, "block", block)
        for shared in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[shared] = block.__dict__[shared]
        self.router = router if router is not None else Router(adapter.in_channels(block))
        self.forced_gate: ForcedGate | None = None
        self.hard_decisions = False
        self.execution: Execution = "sparse"
        self._last_gate: Tensor | bool | None = None
        self.last_logits: Tensor | None = None
        self.last_input_shape: torch.Size | None = None

    def __getstate__(self) -> dict:
        # Copies and pickles leave out the last forward's gates: in training they hold an autograd
        # graph, which copy.deepcopy (EMA models, build_macs_table, export) cannot copy.
        return {**super().__getstate__(), "_last_gate": None, "last_logits": None}

    def _release_block(self) -> nn.Module:
        """The wrapped block as it was before wrapping: the router leaves the children both modules share."""
        del self.block._modules["router"]
        return self.block

    @property
    def adapter(self) -> BlockAdapter:
        """The adapter of the wrapped block's type."""
        adapter = get_adapter(self.block)
        if adapter is None:
            raise TypeError(f"no adapter is registered for {type(self.block).__qualname__}")
        return adapter

    def train(self, mode: bool = True) -> "GatedBlock":
        super().train(mode)
        self.block.training = mode
        return self

    def force_gate(self, state: ForcedGate | None) -> None:
        """Force the gate ``"open"`` or ``"closed"`` for every sample, or to 0/1 decisions (N,); route again with None.

        Decisions are a bool or integer tensor, one per sample of each batch to come (``paths[:, k].bool()``
        replays column k of :func:`dynroute.routing_paths`).
        """
        if isinstance(state, Tensor):
            if state.dim() != 1 or state.is_floating_point() or state.is_complex():
                raise ValueError(
                    "forced decisions must be a 1-D bool or integer tensor of 0/1, one per sample, but got a "
                    f"{state.dtype} tensor of shape {tuple(state.shape)}; pass e.g. paths[:, k].bool()"
                )
        elif state not in (None, "open", "closed"):
            raise ValueError(f"forced gate must be 'open', 'closed', a tensor of decisions or None, but got {state!r}")
        self.forced_gate = state

    def set_execution(self, execution: Execution) -> None:
        """Run hard decisions ``"sparse"`` (skip for real) or ``"masked"`` (compute, then multiply)."""
        if execution not in _EXECUTIONS:
            raise ValueError(f"execution must be one of {_EXECUTIONS}, but got {execution!r}")
        self.execution = execution

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'): router, gate, residual branch for the routed rows, shortcut, act."""
        check_image_batch(x, "GatedBlock")
        adapter = self.adapter
        logits = self.router(x)
        gate = self._gate(logits)
        out = gated_residual(
            adapter.shortcut(self.block, x),
            partial(adapter.residual, self.block),
            x,
            gate,
            execution="masked" if self._relaxed() else self.execution,
            training=self.training,
            parameters=self.parameters(),
        )
        self._record(gate, logits, x.shape)
        return adapter.activation(self.block, out)

    def _relaxed(self) -> bool:
        """Whether this forward's gate is the relaxed one of training (Eq. 7) rather than a hard decision."""
        return self.forced_gate is None and self.training and not self.hard_decisions

    def _gate(self, logits: Tensor) -> Tensor | bool:
        """This forward's gate from the router's logits (N, 2).

        Returns:
            A bool for a gate forced open or closed; the forced decisions (N,); the relaxed float32
            values (N,) of training (Eq. 7); else the argmax decisions (N,), int64 0/1 (Eq. 13).
        """
        forced = self.forced_gate
        if isinstance(forced, str):
            return forced == "open"
        if forced is not None:
            if forced.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"the forced decisions hold {forced.shape[0]} samples but the batch has {logits.shape[0]}; "
                    "force one decision per sample of the batch (dynroute.force_gates(model, decisions))"
                )
            return forced.to(logits.device)
        if self._relaxed():
            return self.router.gate(logits, hard=False)
        return hard_decision(logits)

    def _record(self, gate: Tensor | bool, logits: Tensor, input_shape: torch.Size) -> None:
        """Keep a forward's gate, logits (N, 2) and input shape for :attr:`last_gate` and the routing readers."""
        # Plain attributes, never parameters or modules: skip nn.Module.__setattr__'s registry checks.
        self.__dict__.update(_last_gate=gate, last_logits=logits, last_input_shape=input_shape)

    @property
    def last_gate(self) -> Tensor | None:
        """Gate values (N,) of the last forward in float32: relaxed in training, 0/1 otherwise."""
        gate = self._last_gate
        if isinstance(gate, bool):  # the same decision for every sample
            return torch.full((self.last_logits.shape[0],), float(gate), device=self.last_logits.device)
        return gate if gate is None or gate.is_floating_point() else gate.float()

    def extra_repr(self) -> str:
        block = type(self.block).__qualname__
        forced = self.forced_gate
        forced = f"<{forced.shape[0]} decisions>" if isinstance(forced, Tensor) else forced
        return (
            f"block={block}, forced_gate={forced}, hard_decisions={self.hard_decisions}, execution={self.execution!r}"
        )
