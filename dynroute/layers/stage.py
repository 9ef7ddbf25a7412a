"""A stage of gated blocks: ``nn.Sequential`` with an inference fast path.

:func:`dynroute.convert_resnet` turns every ``nn.Sequential`` that holds gated blocks into a
:class:`GatedSequential`, in place, the way ``torch.nn.utils.parametrize`` swaps a module's class:
same object, children, hooks and ``state_dict`` keys.
"""

from torch import Tensor, nn

from dynroute.layers import _fastpath

__all__ = ["GatedSequential"]


class GatedSequential(nn.Sequential):
    """``nn.Sequential`` of (gated) blocks whose outputs are those of ``nn.Sequential``.

    In inference, when nothing could tell the difference (no autograd, no forward hook inside the
    stage, blocks in eval mode running their own forwards, no tracing or compiling), the stage runs
    its gated blocks by a private fast path: the same outputs and routing state, with less Python
    around the kernels and fewer memory passes. Otherwise each module is called in turn.
    """

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> the output of the last module, as ``nn.Sequential`` computes it."""
        out = _fastpath.run_stage(self, x)
        return super().forward(x) if out is None else out


def adopt_stage(stage: nn.Module) -> None:
    """Make a plain ``nn.Sequential`` a :class:`GatedSequential` in place; any other module is left alone."""
    if type(stage) is nn.Sequential:
        stage.__class__ = GatedSequential
