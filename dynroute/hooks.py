"""Whether a forward hook could see a module's tensors: the condition for the shortcuts of inference.

Sparse execution writes sums in place and the router skips module dispatch only when nothing could
observe the intermediate tensors: no forward or forward-pre hook, global or on a module involved.
"""

from torch import nn
from torch.nn.modules import module as nn_module

__all__ = ["has_own_forward_hooks", "has_forward_hooks", "has_global_forward_hooks", "observed"]


def has_own_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself (not a module inside it) has a forward or forward-pre hook."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` or any module inside it has a forward or forward-pre hook (global ones aside)."""
    modules = [module]
    for submodule in modules:  # a breadth-first walk over a list that grows as it goes
        if submodule is None:
            continue
        if has_own_forward_hooks(submodule):
            return True
        modules += submodule._modules.values()
    return False


def has_global_forward_hooks() -> bool:
    """Whether a global forward or forward-pre hook (``nn.modules.module.register_module_forward_hook``) is set."""
    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def observed(module: nn.Module) -> bool:
    """Whether a forward hook, global or on ``module`` or inside it, could hold a tensor of its forward."""
    return has_global_forward_hooks() or has_forward_hooks(module)
