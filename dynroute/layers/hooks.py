"""Whether a forward hook could see a module's tensors: the condition for the shortcuts of inference.

Sparse execution writes sums in place and the router skips module dispatch only when nothing could
observe the intermediate tensors: no forward or forward-pre hook, global or on a module involved.
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules import module as nn_module

__all__ = [
    "has_own_forward_hooks",
    "has_forward_hooks",
    "has_global_forward_hooks",
    "observed",
    "torch_forward",
    "runs_as_stock",
    "runs_own_forward",
]


def has_own_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself (not a module inside it) has a forward or forward-pre hook."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or any module inside it has a forward or forward-pre hook (global ones aside)."""
    modules = [module]
    for submodule in modules:  # a breadth-first walk over a list that grows as it goes
        if submodule is None:
            continue
        # has_own_forward_hooks, inlined: a stage walks every gated block's modules before each forward
        if submodule._forward_hooks or submodule._forward_pre_hooks:
            return True
        modules += submodule._modules.values()
    return False


def has_global_forward_hooks() -> bool:
    """Whether a global forward or forward-pre hook (``nn.modules.module.register_module_forward_hook``) is set."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def observed(module: nn.Module) -> bool:
    """Whether a forward hook, global or on ``module`` or inside it, could hold a tensor of its forward."""
    return has_global_forward_hooks() or has_forward_hooks(module)


def torch_forward(layer_type: type[nn.Module]) -> Callable[..., Tensor] | None:
    """``layer_type.forward`` if it is torch's own (defined in the class's module), None if it was patched."""
    forward = layer_type.forward
    defined_by_torch = (
        forward.__module__ == layer_type.__module__
        and forward.__qualname__ == f"{layer_type.__name__}.forward"
        and not hasattr(forward, "__wrapped__")  # functools.wraps copies the two names above
    )
    return forward if defined_by_torch else None


def runs_as_stock(layer: nn.Module, stock_type: type[nn.Module], stock_forward: Callable[..., Tensor] | None) -> bool:
    """Whether ``layer`` is exactly ``stock_type``, its forward torch's own (on the class and the object), unhooked.

    ``stock_forward`` is :func:`torch_forward` of ``stock_type``, taken at import. A forward replaced on the
    object (accelerate's offloading hooks do this) or patched on the class, a subclass (quantized,
    parametrized) or a hook means the layer must be called as a module.
    """
    return (
        type(layer) is stock_type
        and stock_type.forward is stock_forward
        and "forward" not in layer.__dict__
        and not has_own_forward_hooks(layer)
    )


def runs_own_forward(module: nn.Module, own_forward: Callable[..., Tensor]) -> bool:
    """Whether all that calling ``module`` (unhooked) does is run ``own_forward``, its class's forward taken at import.

    Not so when a subclass overrides that forward or it was patched on the class after import, when a forward
    is set on the object, when the module was compiled with ``nn.Module.compile``, or while ``torch.compile``,
    ``torch.export`` or ``torch.jit.trace`` traces (their graphs name each module they see called).
    """
    return (
        type(module).forward is own_forward
        and "forward" not in module.__dict__
        and module._compiled_call_impl is None
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )
