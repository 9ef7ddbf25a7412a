"""The inference fast path of a :class:`~dynroute.GatedSequential`: the reference outputs with less overhead.

:meth:`GatedBlock.forward <dynroute.GatedBlock.forward>` is the reference. When nothing could tell the
difference, a stage runs its gated blocks here instead, with the same outputs and routing state:

- a stock :class:`~dynroute.Router` runs its four ops on its layers' tensors, without module calls;
- a shortcut that is a stock ``nn.Identity`` child is the block input itself, not a call;
- a batch of one decides by comparing its two logits in Python, not by a tensor op;
- sums go in place into tensors the forward made (the branch output, a downsampling shortcut) and,
  after the first gated block of the stage, into the block input: a gated block's output is seen
  by nobody but the next block;
- when that input came out of an ``nn.ReLU``, the shortcut is the identity and the block ends with
  an ``nn.ReLU`` too, the rows the block skips are left as they are (``relu(relu(y)) == relu(y)``).

:func:`why_not_fast_path` names the first condition that keeps a stage from it. What can be worked
out once (which blocks are gated, their adapters, routers and final activations, which modules carry
hooks) is a plan cached per stage until a hook is registered, a module is assigned anywhere, or the
stage's children or a block's adapter change; the rest (autograd, train/eval, patched forwards,
tracing) is checked at every forward. Deleting this module and its call in ``stage.py`` leaves every
output as it is, only slower.
"""

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as nn_module
from torch.utils.hooks import RemovableHandle

from dynroute.conversion.adapters._common import ChildModule
from dynroute.conversion.registry import BlockAdapter, get_adapter
from dynroute.layers.gated_block import GatedBlock, _gather_rows, _index_add_rows_, gated_residual
from dynroute.layers.router import Router


def _torch_forward(layer_type: type[nn.Module]) -> Callable[..., Tensor] | None:
    """``layer_type.forward`` if it is torch's own (defined in the class's module), None if it was patched."""
    forward = layer_type.forward
    defined_by_torch = (
        forward.__module__ == layer_type.__module__
        and forward.__qualname__ == f"{layer_type.__name__}.forward"
        and not hasattr(forward, "__wrapped__")  # functools.wraps copies the two names above
    )
    return forward if defined_by_torch else None


# The forwards the fast path runs without calling them, as they were at import (None: patched before it).
_OWN_FORWARDS = (
    (Router, Router.forward),
    (nn.Linear, _torch_forward(nn.Linear)),
    (nn.ReLU, _torch_forward(nn.ReLU)),
    (nn.Identity, _torch_forward(nn.Identity)),
)
_GATED_FORWARD = GatedBlock.forward

# Module assignments anywhere (setattr, add_module, register_module) since import: one of them may put a
# module that already carries a hook inside a stage, which no new hook registration would announce.
_assignments = 0


def _count_assignment(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    global _assignments
    _assignments += 1


nn_module.register_module_module_registration_hook(_count_assignment)


def _model_version() -> tuple[int, int]:
    """Changes whenever a hook of any kind is registered (every handle takes the next id) or a module is assigned."""
    return RemovableHandle.next_id, _assignments


class _GatedStep(NamedTuple):
    """How the fast path runs one gated block of a stage."""

    name: str
    gated: GatedBlock
    block: nn.Module  # the wrapped block, which the adapter's functions take
    adapter: BlockAdapter | None
    router: nn.Module
    router_layers: tuple[nn.Linear, nn.Linear] | None  # fc1, fc2 of a stock Router: run as ops; else call router
    identity_shortcut: bool  # the shortcut is a stock nn.Identity child: the input itself
    ends_with_relu: bool  # the final activation is a stock nn.ReLU child
    # The block and the children run without calling them: (dict it was found in, its key there, module, its
    # __dict__). Each must still be there and still run its class's forward.
    bypassed: tuple[tuple[dict[str, nn.Module], str, nn.Module, dict], ...]


class _Plan(NamedTuple):
    """What the fast path worked out for a stage, valid while :func:`_model_version` and the children stay."""

    version: tuple[int, int]
    modules: tuple[nn.Module, ...]
    steps: tuple[_GatedStep | None, ...]  # None: a module that is not a gated block, called as is
    gated_steps: tuple[_GatedStep, ...]
    hooked: tuple[tuple[str, nn.Module], ...]  # (name in the stage, module) of every module with a forward hook


_PLANS: "weakref.WeakKeyDictionary[nn.Module, _Plan]" = weakref.WeakKeyDictionary()


def run_stage(stage: nn.Sequential, x: Tensor) -> Tensor | None:
    """``stage(x)`` for x (N, C, H, W) by the fast path, or None when :func:`why_not_fast_path` names a reason."""
    if _why_not_now(x):
        return None
    plan = _current_plan(stage)
    if _why_not_plan(plan):
        return None
    return _run(plan, x)


def why_not_fast_path(stage: nn.Sequential, x: Tensor) -> str:
    """Why ``stage(x)`` would not take the fast path now, naming the first condition that fails; "" if it would."""
    return _why_not_now(x) or _why_not_plan(_current_plan(stage))


def _why_not_now(x: Tensor) -> str:
    """The conditions of this forward as a whole; first those that tracing sees as constants."""
    if torch.compiler.is_compiling():
        return "torch.compile or torch.export is tracing"
    if torch.jit.is_tracing():
        return "torch.jit.trace is tracing"
    if type(x) is not Tensor:
        return f"the input is a {type(x).__qualname__}, not a torch.Tensor"
    if x.dim() != 4 or x.shape[0] == 0:
        return f"the input of shape {tuple(x.shape)} is not a batch (N, C, H, W)"
    if torch.is_grad_enabled():
        return "autograd is enabled (run under torch.inference_mode() or torch.no_grad())"
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return "a global forward hook is set"
    for module_type, forward in _OWN_FORWARDS:
        if module_type.forward is not forward:
            return f"{module_type.__qualname__}.forward is patched"
    return ""


def _why_not_plan(plan: _Plan) -> str:
    """The conditions of the stage's modules now: hooks, train mode, adapters, forwards set on objects or compiled."""
    for name, module in plan.hooked:
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a forward hook is set on {name!r} in the stage"
    for step in plan.gated_steps:
        if step.gated.training:
            return f"gated block {step.name!r} is in training mode"
        if type(step.gated).forward is not _GATED_FORWARD:
            return f"gated block {step.name!r} is a {type(step.gated).__name__} with a forward of its own"
        if step.adapter is None:
            return f"gated block {step.name!r} wraps a {type(step.block).__qualname__}, which has no adapter"
        for _, _, module, attributes in step.bypassed:
            if "forward" in attributes or "_compiled_call_impl" in attributes:
                return f"a {type(module).__qualname__} of gated block {step.name!r} has a forward set on it or compiled"
    return ""


def _current_plan(stage: nn.Sequential) -> _Plan:
    """The stage's cached plan, worked out again if the model changed since."""
    plan = _PLANS.get(stage)
    if plan is None or not _plan_holds(plan, stage):
        plan = _PLANS[stage] = _build_plan(stage)
    return plan


def _plan_holds(plan: _Plan, stage: nn.Sequential) -> bool:
    """Whether no hook was registered and no module assigned since ``plan``, and the stage's children and adapters
    are still its own."""
    if plan.version != _model_version():
        return False
    if tuple(stage._modules.values()) != plan.modules:
        return False  # nn.Sequential.insert and del write _modules without an assignment
    for step in plan.gated_steps:
        if get_adapter(step.block) is not step.adapter:
            return False
        for parent, name, child, _ in step.bypassed:
            if parent.get(name) is not child:
                return False  # torch.ao.quantization's convert, for one, swaps children by writing _modules
    return True


def _build_plan(stage: nn.Sequential) -> _Plan:
    version = _model_version()
    hooked = [
        (name, module)
        for name, module in stage.named_modules(remove_duplicate=False)
        if name and (module._forward_hooks or module._forward_pre_hooks)  # the stage's own hooks see its input only
    ]
    steps = [
        _gated_step(stage, name, module) if isinstance(module, GatedBlock) else None
        for name, module in stage._modules.items()
    ]
    gated_steps = tuple(step for step in steps if step is not None)
    return _Plan(version, tuple(stage._modules.values()), tuple(steps), gated_steps, tuple(hooked))


def _gated_step(stage: nn.Sequential, name: str, gated: GatedBlock) -> _GatedStep:
    adapter = get_adapter(gated.block)
    router = gated._modules["router"]
    router_layers = _stock_router_layers(router)
    bypassed = [(stage._modules, name, gated)]
    if router_layers is not None:
        bypassed.append((gated._modules, "router", router))
        bypassed += [(router._modules, key, layer) for key, layer in router._modules.items()]
    identity = _stock_child(gated, adapter.shortcut, nn.Identity) if adapter is not None else None
    relu = _stock_child(gated, adapter.activation, nn.ReLU) if adapter is not None else None
    bypassed += [(gated._modules, *child) for child in (identity, relu) if child is not None]
    bypassed = [(parent, key, module, module.__dict__) for parent, key, module in bypassed]
    return _GatedStep(
        name,
        gated,
        gated.block,
        adapter,
        router,
        router_layers,
        identity is not None,
        relu is not None,
        tuple(bypassed),
    )


def _stock_router_layers(router: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """fc1 and fc2 of a :class:`~dynroute.Router` whose layers are stock ``nn.Linear``, ``nn.ReLU``, ``nn.Linear``."""
    if type(router) is not Router:
        return None
    fc1, act, fc2 = (router._modules.get(name) for name in ("fc1", "act", "fc2"))
    if (type(fc1), type(act), type(fc2)) != (nn.Linear, nn.ReLU, nn.Linear):
        return None
    return fc1, fc2


def _stock_child(gated: GatedBlock, part: Callable, stock_type: type[nn.Module]) -> tuple[str, nn.Module] | None:
    """(name, child) of the child an adapter ``part`` calls, if the part is only that call (:class:`ChildModule`)
    and the child is exactly ``stock_type``; else None."""
    if not isinstance(part, ChildModule):
        return None
    child = gated._modules.get(part.name)
    return (part.name, child) if type(child) is stock_type else None


def _run(plan: _Plan, x: Tensor) -> Tensor:
    """The stage's output: each module in turn, the gated blocks by :func:`_run_block` or a variant."""
    private = False  # x is a tensor of this forward that nothing else holds
    relu_output = False  # x came out of a stock nn.ReLU
    for module, step in zip(plan.modules, plan.steps):
        if step is None:
            x, private, relu_output = module(x), False, False
        elif private and relu_output and _keeps_skipped_rows(step):
            x = _run_block_on_relu_output(step, x)
        else:
            x, private, relu_output = _run_block(step, x, private), True, step.ends_with_relu
    return x


def _keeps_skipped_rows(step: _GatedStep) -> bool:
    """Whether the block's skipped rows equal its input's when that is a ReLU output: ``relu(x) == x``."""
    return step.identity_shortcut and step.ends_with_relu and step.gated.execution == "sparse"


def _run_block(step: _GatedStep, x: Tensor, private: bool) -> Tensor:
    """The block's output, its sums written into tensors of this forward, and into x if it is ``private``."""
    block, adapter = step.block, step.adapter
    logits = _logits(step, x)
    shortcut = x if step.identity_shortcut else adapter.shortcut(block, x)
    gate = _gate(step.gated, logits)
    step.gated._record(gate, logits, x.shape)
    if isinstance(gate, Tensor) and step.gated.execution == "masked":
        out = gated_residual(shortcut, lambda rows: adapter.residual(block, rows), x, gate, "masked")
    else:
        out = _merge(step, x, shortcut, gate, private)
    return adapter.activation(block, out)


def _run_block_on_relu_output(step: _GatedStep, x: Tensor) -> Tensor:
    """The block's output written into x, a private ReLU output; see :func:`_keeps_skipped_rows`."""
    block, adapter = step.block, step.adapter
    logits = _logits(step, x)
    gate = _gate(step.gated, logits)
    step.gated._record(gate, logits, x.shape)
    count, routed = _routed_rows(gate, x.shape[0])
    if count == x.shape[0]:
        return _add_branch_(adapter.residual(block, x), x, x).relu_()
    if count == 0:
        return x  # relu(x) is x
    gathered = _gather_rows(x, routed)
    rows = adapter.residual(block, gathered).to(x.dtype)
    if _merges_by_runs(x):
        return _relu_merge_by_runs_(x, routed, rows)
    if 2 * count > x.shape[0]:
        return _index_add_rows_(x, routed, rows).relu_()
    return _relu_merge_few_rows_(x, routed, rows, gathered)


def _logits(step: _GatedStep, x: Tensor) -> Tensor:
    """The router's logits (N, 2): a stock Router's ops, or any other router called as a module."""
    if step.router_layers is None:
        return step.router(x)
    try:
        return _stock_router_logits(*step.router_layers, x)
    except KeyError:  # a weight deleted from the layer's parameters (a plain attribute now): the module knows
        return step.router(x)


def _stock_router_logits(fc1: nn.Linear, fc2: nn.Linear, x: Tensor) -> Tensor:
    """``Router.forward`` with stock layers, bit for bit: x cast to the router's dtype, autocast off, four ops."""
    first, second = fc1._parameters, fc2._parameters  # read at every call: torch.func.functional_call swaps them
    weight = first["weight"]
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if not torch.is_autocast_enabled(x.device.type):
        return _router_ops(x, weight, first["bias"], second["weight"], second["bias"])
    with torch.autocast(x.device.type, enabled=False):
        return _router_ops(x, weight, first["bias"], second["weight"], second["bias"])


def _router_ops(x: Tensor, weight1: Tensor, bias1: Tensor | None, weight2: Tensor, bias2: Tensor | None) -> Tensor:
    return F.linear(F.linear(x.mean((2, 3)), weight1, bias1).relu_(), weight2, bias2)


def _gate(block: GatedBlock, logits: Tensor) -> Tensor | bool:
    """The block's gate as its forward takes it in eval; sparse execution decides a batch of one as a bool."""
    if logits.shape[0] != 1 or block.execution != "sparse":
        return block._gate(logits)
    if block.forced_gate is None:
        skip, run = logits.tolist()[0]
        return run > skip or (run != run and skip == skip)  # argmax's rule: a tie skips, a NaN (x != x) wins
    gate = block._gate(logits)
    return gate if isinstance(gate, bool) else bool(gate.tolist()[0])


def _routed_rows(gate: Tensor | bool, batch: int) -> tuple[int, Tensor | None]:
    """How many rows the 0/1 ``gate`` routes to the branch, and their indices (None if all or none)."""
    if isinstance(gate, bool):
        return (batch if gate else 0), None
    routed = gate.nonzero().squeeze(1)
    return routed.numel(), routed


def _merge(step: _GatedStep, x: Tensor, shortcut: Tensor, gate: Tensor | bool, private: bool) -> Tensor:
    """``shortcut + F(x)`` on the rows ``gate`` routes, ``shortcut`` elsewhere, written into tensors of this forward.

    The shortcut is written into when this forward made it: a downsampling one, or x if ``private``.
    """
    count, routed = _routed_rows(gate, x.shape[0])
    if count == x.shape[0]:
        return _add_branch_(step.adapter.residual(step.block, x), shortcut, x)
    out = shortcut if private or not _shares_memory(shortcut, x) else shortcut.clone()
    if count == 0:
        return out
    rows = step.adapter.residual(step.block, _gather_rows(x, routed))
    return _index_add_rows_(out, routed, rows.to(out.dtype))


def _add_branch_(branch: Tensor, shortcut: Tensor, x: Tensor) -> Tensor:
    """``shortcut + branch``, written into ``branch`` unless it is a view of x or of the shortcut (an identity
    adapter, say) or the sum would promote to another dtype."""
    if branch.dtype == shortcut.dtype and not _shares_memory(branch, x) and not _shares_memory(branch, shortcut):
        return branch.add_(shortcut)
    return shortcut + branch


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are (views of) one storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# On CPU, rows of at least this many bytes are merged into a ReLU input run by run (see _relu_merge_by_runs_). Per
# run of adjacent routed rows that costs two op dispatches (a few us); over index_add_ it saves passes over
# memory and reads each run while it is in cache. Measured with 2 threads at batch 32 and 256, half the rows
# routed: 1.5-3 times faster from 128 KiB a row (ResNet-50 at 224 px: 0.4-3.2 MB), 1.7 times slower at 64
# KiB (a CIFAR ResNet's first stage), where index_add_ stays.
_RUN_MERGE_MIN_ROW_BYTES = 128 * 1024


def _merges_by_runs(x: Tensor) -> bool:
    """Whether :func:`_relu_merge_by_runs_` beats ``index_add_`` for x (N, C, H, W): large rows on CPU."""
    return x.device.type == "cpu" and x.element_size() * x.numel() // x.shape[0] >= _RUN_MERGE_MIN_ROW_BYTES


def _adjacent_runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive values in ascending ``indices``: (first value, its position in ``indices``, length)."""
    starts = [i for i, index in enumerate(indices) if i == 0 or index != indices[i - 1] + 1]
    return [(indices[start], start, end - start) for start, end in zip(starts, [*starts[1:], len(indices)])]


def _relu_merge_by_runs_(x: Tensor, routed: Tensor, rows: Tensor) -> Tensor:
    """``relu(x + rows)`` written into the rows ``routed`` of x, one run of adjacent rows at a time."""
    for start, offset, length in _adjacent_runs(routed.tolist()):
        x.narrow(0, start, length).add_(rows.narrow(0, offset, length)).relu_()
    return x


def _relu_merge_few_rows_(x: Tensor, routed: Tensor, rows: Tensor, gathered: Tensor) -> Tensor:
    """``relu(x + rows)`` written into the rows ``routed`` of x >= 0, whose copy is ``gathered``; other rows untouched.

    ``x + max(rows, -x)`` is ``relu(x + rows)`` bit for bit for ``x >= 0``, and ``index_add_`` of it is 2-3
    times faster than ``index_copy_`` of the ReLU: the rows that skip get no pass at all.
    """
    if _shares_memory(rows, gathered):  # a branch that returns a view of its input
        rows = rows.clone()
    return _index_add_rows_(x, routed, torch.maximum(rows, gathered.neg_(), out=rows))
