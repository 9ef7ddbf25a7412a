"""A residual block whose residual branch a :class:`~dynroute.Router` turns on or off per sample.

Train mode computes Eq. 7 of CoDiNet, ``act(shortcut(x) + v * F(x))`` with the relaxed gate v.
Eval mode (and stage-2 training, ``hard_decisions=True``) computes Eq. 13 with hard decisions and
runs ``F`` only on the samples routed to it: their rows are gathered, run and added back, so a
skipped block costs nothing but its router and shortcut.
"""

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from dynroute._validation import check_image_batch
from dynroute.conversion.registry import BlockAdapter, get_adapter
from dynroute.layers.hooks import observed
from dynroute.layers.router import Router, decides_to_run, hard_decision, hard_gate, unobserved_logits

__all__ = ["GatedBlock", "ForcedGate", "Execution"]

ForcedGate = Literal["open", "closed"]
_FORCED_GATES = ("open", "closed")
Execution = Literal["sparse", "masked"]
_EXECUTIONS = ("sparse", "masked")


def _memory_format(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for an NHWC-strided 4D tensor, else ``torch.contiguous_format``."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are (views of) one storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _add(residual: Tensor, shortcut: Tensor, x: Tensor, inplace: bool) -> Tensor:
    """``shortcut + residual``, written into ``residual`` when ``inplace`` allows and it is a buffer of its own.

    A branch output that is a view of the input ``x`` or of the shortcut (an identity adapter, say),
    or a sum that would promote to another dtype, is added out of place.
    """
    if (
        inplace
        and residual.dtype == shortcut.dtype
        and not _shares_memory(residual, x)
        and (shortcut is x or not _shares_memory(residual, shortcut))
    ):
        return residual.add_(shortcut)
    return shortcut + residual


class _RoutedRows(NamedTuple):
    """The hard decisions of one forward: argmax's int64 0/1 (N,), how many rows run, and their indices.

    At batch 1 the decision is a plain ``if``: ``decisions`` and ``indices`` are None.
    """

    decisions: Tensor | None
    count: int
    indices: Tensor | None


def _routed_rows(logits: Tensor) -> _RoutedRows:
    """The hard decisions of router logits (N, 2).

    A batch of one compares its two logits in Python, by argmax's rule (a tie skips, a NaN wins): no
    tensor op, which at batch 1 would cost more than the comparison.
    """
    if logits.shape[0] == 1:
        return _RoutedRows(None, int(decides_to_run(*logits.tolist()[0])), None)
    decisions = hard_decision(logits)
    indices = decisions.nonzero().squeeze(1)
    return _RoutedRows(decisions, indices.numel(), indices)


# Index ops along dim 0 of a channels_last tensor run on its (N, H, W, C) view, which is contiguous: on
# the tensor itself index_select copies element by element into an NCHW result and index_add_ is slow
# (2.9 and 6.8 times slower for a ResNet-50 stage-1 activation at batch 32 on CPU).
_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def _gather(x: Tensor, routed: Tensor) -> Tensor:
    """The rows ``routed`` of x (N, C, H, W), in x's memory format."""
    if _memory_format(x) == torch.channels_last:
        return x.permute(_TO_NHWC).index_select(0, routed).permute(_TO_NCHW)
    return x.index_select(0, routed)


def _index_add_(out: Tensor, routed: Tensor, rows: Tensor) -> Tensor:
    """``out.index_add_(0, routed, rows)``, through (N, H, W, C) views if ``out`` is channels_last."""
    if _memory_format(out) == torch.channels_last:
        out.permute(_TO_NHWC).index_add_(0, routed, rows.permute(_TO_NHWC))
        return out
    return out.index_add_(0, routed, rows)


# On CPU, rows of at least this many bytes are merged into a ReLU input run by run (see _merge_by_runs). Per
# run of adjacent routed rows that costs two op dispatches (a few us); over index_add_ it saves passes over
# memory and reads each run while it is in cache. Measured with 2 threads at batch 32 and 256, half the rows
# routed: 1.5-3 times faster from 128 KiB a row (ResNet-50 at 224 px: 0.4-3.2 MB), 1.7 times slower at 64
# KiB (a CIFAR ResNet's first stage), where index_add_ stays.
_RUN_MERGE_MIN_ROW_BYTES = 128 * 1024


def _adjacent_runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive values in ascending ``indices``: (first value, its position in ``indices``, length)."""
    starts = [i for i, index in enumerate(indices) if i == 0 or index != indices[i - 1] + 1]
    return [(indices[start], start, end - start) for start, end in zip(starts, [*starts[1:], len(indices)])]


def _merges_by_runs(x: Tensor) -> bool:
    """Whether :func:`_merge_by_runs` beats ``index_add_`` for x (N, C, H, W): large rows on CPU, in eager mode."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return x.element_size() * x.numel() // x.shape[0] >= _RUN_MERGE_MIN_ROW_BYTES


def _merge_by_runs(x: Tensor, routed: Tensor, residual: Tensor) -> Tensor:
    """``relu(x + residual)`` written into the rows ``routed`` of x, one run of adjacent rows at a time."""
    for start, offset, length in _adjacent_runs(routed.tolist()):
        x.narrow(0, start, length).add_(residual.narrow(0, offset, length)).relu_()
    return x


class _Plan(NamedTuple):
    """What a forward that autograd and hooks cannot see needs of its block, worked out before it runs."""

    adapter: BlockAdapter
    router_logits: Callable[[Tensor], Tensor]  # x (N, C, H, W) -> logits (N, 2), as the router computes them
    relu_output: bool  # the block's final activation is an nn.ReLU


def _ends_with_relu(adapter: BlockAdapter, block: nn.Module) -> bool:
    """Whether ``block``'s final activation, as ``adapter`` names it, is an ``nn.ReLU``."""
    return adapter.final_activation is not None and type(adapter.final_activation(block)) is nn.ReLU


class GatedBlock(nn.Module):
    """Wrap ``block`` with a router gating its residual branch.

    The block's children, parameters and buffers are this module's own (the same dicts), so the
    ``state_dict`` keys of a converted network are those of the original plus ``router.*``, and a
    child replaced on either module (``SyncBatchNorm.convert_sync_batchnorm``, say) is the one that runs.

    Args:
        block: a residual block of a type registered with :func:`dynroute.register_block`.
        router: the router; default ``Router(in_channels)`` of the block.

    Attributes:
        forced_gate: ``None`` to route, ``"open"`` to run every sample through the block (the
            dense network), ``"closed"`` to skip it for every sample.
        hard_decisions: use hard argmax decisions in train mode too (stage 2 of CoDiNet).
        execution: how hard decisions run: ``"sparse"`` (default) computes the residual branch
            only for routed samples; ``"masked"`` computes it for all and multiplies by the 0/1
            gate, a static graph that saves nothing (what other implementations do). In training,
            a block that routes a single sample of a batch runs masked: batch norm needs more rows.
        last_gate: gate values (N,) of the last forward (relaxed in training, 0/1 otherwise).
        last_logits: router logits (N, 2) of the last forward.
        last_input_shape: input shape of the last forward, for MAC accounting.
        last_forward_unobserved: whether the last forward ran without autograd and without a hook
            (global, on this block or inside it) that could hold its tensors.

    Example:
        >>> block = dynroute.models.CifarBasicBlock(16, 16)
        >>> gated = GatedBlock(block).eval()
        >>> gated(torch.randn(4, 16, 32, 32)).shape
        torch.Size([4, 16, 32, 32])
    """

    def __init__(self, block: nn.Module, router: Router | None = None) -> None:
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
        self._last_gate: Tensor | None = None
        self.last_logits: Tensor | None = None
        self.last_input_shape: torch.Size | None = None
        self.last_forward_unobserved = False

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
        """Force the gate ``"open"`` or ``"closed"`` for every sample, or route again with None."""
        if state is not None and state not in _FORCED_GATES:
            raise ValueError(f"forced gate must be 'open', 'closed' or None, but got {state!r}")
        self.forced_gate = state

    def set_execution(self, execution: Execution) -> None:
        """Run hard decisions ``"sparse"`` (skip for real) or ``"masked"`` (compute, then multiply)."""
        if execution not in _EXECUTIONS:
            raise ValueError(f"execution must be one of {_EXECUTIONS}, but got {execution!r}")
        self.execution = execution

    @property
    def ends_with_relu(self) -> bool:
        """Whether the block's final activation is an ``nn.ReLU`` (known if its adapter names the module)."""
        return _ends_with_relu(self.adapter, self.block)

    def _unobserved_plan(self) -> _Plan | None:
        """What a forward run now needs when neither autograd nor a hook (global, or on this block or anything
        inside it) can see its tensors, or None. :class:`~dynroute.GatedSequential` works it out for all its
        blocks before the first runs, so that checks stay out of the time between one block's kernels and
        the next's."""
        if torch.is_grad_enabled() or observed(self):
            return None
        adapter = self.adapter
        return _Plan(adapter, unobserved_logits(self._modules["router"]), _ends_with_relu(adapter, self.block))

    def forward(self, x: Tensor, reuse_input: bool = False, relu_input: bool = False) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, H', W'), the block's output under this forward's gates.

        Args:
            x: the block input.
            reuse_input: the caller gives ``x`` up: without autograd, sparse execution may write the
                output into it instead of copying it (:class:`~dynroute.GatedSequential` passes True
                for a tensor that only the stage holds). Default False: ``x`` is never modified.
                Neither is any tensor a forward hook could hold: with a hook (global, or on this
                block or anything inside it) every sum is written out of place.
            relu_input: ``x`` is the output of an ``nn.ReLU``. With ``reuse_input``, an identity
                shortcut and a final ``nn.ReLU`` (:attr:`ends_with_relu`), the rows the block skips
                are left as they are, since the ReLU would not change them.
        """
        return self._planned_forward(x, self._unobserved_plan(), reuse_input, relu_input)

    def _planned_forward(self, x: Tensor, plan: _Plan | None, reuse_input: bool, relu_input: bool) -> Tensor:
        """:meth:`forward` under ``plan``, :meth:`_unobserved_plan` of this forward (or None)."""
        check_image_batch(x, "GatedBlock")
        router = self._modules["router"]  # a dict lookup, not nn.Module.__getattr__
        # Whether this forward's own buffers (branch output, downsampling shortcut) may be written in place.
        scratch = plan is not None
        adapter = plan.adapter if scratch else self.adapter
        reuse_input = reuse_input and scratch
        relu_output = scratch and plan.relu_output
        logits = plan.router_logits(x) if scratch else router(x)
        shortcut = adapter.shortcut(self.block, x)
        activated = False  # whether out already went through the final activation
        if self.forced_gate is not None:
            gate = logits.new_full((x.shape[0],), float(self.forced_gate == "open"), dtype=torch.float32)
            out = shortcut + adapter.residual(self.block, x) if self.forced_gate == "open" else shortcut
        elif self.training and not self.hard_decisions:
            gate = router.gate(logits, hard=False)
            out = self._add_gated_residual(adapter, x, shortcut, gate)
        elif self.execution == "masked":
            gate = hard_decision(logits)  # int64 0/1; last_gate converts it when read
            out = self._add_gated_residual(adapter, x, shortcut, gate)
        else:
            rows = _routed_rows(logits)
            gate = rows.decisions  # None at batch 1: last_gate derives it from the logits
            if reuse_input and relu_input and shortcut is x and relu_output:
                out, activated = self._route_into_relu_input(adapter, x, rows), True
            else:
                out = self._add_routed_residual(adapter, x, shortcut, rows, scratch, reuse_input)
        if out is shortcut and not (reuse_input if out is x else scratch):
            out = out.clone()  # a skipped block: an in-place activation must not touch the input or a held shortcut
        # Plain attributes, never parameters or modules: skip nn.Module.__setattr__'s registry checks,
        # which cost about as much as a small kernel launch on this per-block hot path.
        self.__dict__.update(
            _last_gate=gate, last_logits=logits, last_input_shape=x.shape, last_forward_unobserved=scratch
        )
        return out if activated else adapter.activation(self.block, out)

    @property
    def last_gate(self) -> Tensor | None:
        """Gate values (N,) of the last forward in float32: relaxed in training, 0/1 otherwise."""
        gate = self._last_gate
        if gate is None:  # a hard decision at batch 1, or no forward yet
            return None if self.last_logits is None else hard_gate(self.last_logits)
        return gate if gate.is_floating_point() else gate.float()

    def _add_gated_residual(self, adapter: BlockAdapter, x: Tensor, shortcut: Tensor, gate: Tensor) -> Tensor:
        """``shortcut + gate * F(x)`` with F run on every row: Eq. 7 (relaxed gate) or masked Eq. 13 (0/1)."""
        residual = adapter.residual(self.block, x)
        return shortcut + gate.to(residual.dtype).view(-1, 1, 1, 1) * residual

    def _add_routed_residual(
        self, adapter: BlockAdapter, x: Tensor, shortcut: Tensor, rows: _RoutedRows, scratch: bool, reuse_input: bool
    ) -> Tensor:
        """``shortcut + F(x)`` for rows with decision 1, ``shortcut`` elsewhere; F runs on routed rows only.

        index_select / index_add are the cheapest gather and scatter measured on CPU (boolean-mask
        indexing, index_put_ and index_copy_ of the sum all cost more). With ``scratch`` (no autograd,
        no hook) the sums are written in place into buffers this forward created (the branch output,
        a downsampling shortcut), and into an identity shortcut, the block input, only if
        ``reuse_input``; otherwise they are out of place.
        """
        count, routed = rows.count, rows.indices
        if count == x.shape[0]:
            return _add(adapter.residual(self.block, x), shortcut, x, scratch)
        if count == 0:
            return self._skipped(shortcut)
        if count == 1 and self.training:
            # Batch norm in training normalises by the statistics of the rows it sees, and a single row has
            # none to speak of (an error where the branch is 1x1): the branch runs masked, on every row.
            # N > 1 here (a batch of one that runs returned above), so the decisions are a tensor.
            return self._add_gated_residual(adapter, x, shortcut, rows.decisions)
        residual = adapter.residual(self.block, _gather(x, routed)).to(shortcut.dtype)
        writable = (shortcut is x and reuse_input) or not _shares_memory(shortcut, x)
        out = shortcut if scratch and writable else shortcut.clone()
        return _index_add_(out, routed, residual)

    def _route_into_relu_input(self, adapter: BlockAdapter, x: Tensor, rows: _RoutedRows) -> Tensor:
        """The block's output (activation included) written into ``x``, a ReLU output of an identity block.

        Routed rows become ``relu(x + F(x))``; skipped rows keep ``x``, which equals ``relu(x)``. Only
        without autograd, on a tensor the caller gave up. When most rows run, ``F(x)`` is added into
        them and one ReLU pass goes over every row: cheaper than two passes over the routed rows.
        Otherwise the skipped rows get no pass at all, and the routed rows are scattered with
        ``index_add_`` of ``max(F(x), -x)``: for ``x >= 0``, ``x + max(F(x), -x)`` is
        ``relu(x + F(x))`` bit for bit, and ``index_add_`` is 2-3 times faster than ``index_copy_``
        here (which torch.compile cannot trace into the block input either). Large rows on CPU
        take neither way: each run of adjacent routed rows gets ``add_`` and ``relu_`` in place.
        """
        count, routed = rows.count, rows.indices
        if count == x.shape[0]:
            return adapter.activation(self.block, _add(adapter.residual(self.block, x), x, x, True))
        if count == 0:
            return x
        gathered = _gather(x, routed)
        residual = adapter.residual(self.block, gathered).to(x.dtype)
        if _merges_by_runs(x):
            return _merge_by_runs(x, routed, residual)
        if 2 * count > x.shape[0]:
            return _index_add_(x, routed, residual).relu_()
        if _shares_memory(residual, gathered):  # a branch that returns a view of its input
            residual = residual.clone()
        return _index_add_(x, routed, torch.maximum(residual, gathered.neg_(), out=residual))

    def _skipped(self, shortcut: Tensor) -> Tensor:
        """``shortcut`` for a branch no sample runs; in training, joined to the block's parameters by a zero.

        DistributedDataParallel expects a gradient for every trainable parameter from every rank. An
        empty slice's sum is exactly 0 and gives each parameter a zero gradient, so a rank on which
        every sample skips the block still takes part in the all-reduce: no ``find_unused_parameters``.
        """
        if not (self.training and torch.is_grad_enabled()):
            return shortcut
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        if not trainable:
            return shortcut
        return shortcut + sum(torch.atleast_1d(p).narrow(0, 0, 0).sum() for p in trainable).to(shortcut.dtype)

    def extra_repr(self) -> str:
        block = type(self.block).__qualname__
        return (
            f"block={block}, forced_gate={self.forced_gate}, hard_decisions={self.hard_decisions}, "
            f"execution={self.execution!r}"
        )
