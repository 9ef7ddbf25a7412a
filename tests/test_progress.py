"""Progress bars over a loader: summary, collect_routing and calibrate_budget, on a terminal or when asked."""

import copy
import io
import sys

import pytest
import torch

import dynroute
from dynroute.models.cifar_resnet import CifarResNet


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = dynroute.convert_resnet(CifarResNet(1, num_classes=3), input_size=(3, 16, 16)).eval()
    with torch.no_grad():  # routers that disagree between images, so calibration has something to move
        for _, block in dynroute.gated_blocks(model):
            block.router.fc2.weight.normal_(0.0, 3.0)
    return model


LOADER = [
    (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)), torch.arange(4) % 3) for i in range(3)
]

# Each pass over a loader, returning a number that must not depend on the bar, and the bar's description.
PASSES = {
    "summary": (lambda model, **kw: dynroute.summary(model, LOADER, verbose=False, **kw).macs_fraction, "summary"),
    "collect_routing": (lambda model, **kw: dynroute.collect_routing(model, LOADER, **kw).accuracy, "collect_routing"),
    "calibrate_budget": (
        lambda model, **kw: dynroute.calibrate_budget(copy.deepcopy(model), LOADER, 0.5, max_passes=3, **kw),
        "calibrate pass 1",
    ),
}


@pytest.mark.parametrize("name", list(PASSES))
class TestProgress:
    """A bar over the batches when asked, or by default on a terminal; never in captured output; same results."""

    def test_shown_when_asked(self, model, name, capsys):
        run, desc = PASSES[name]
        quiet = run(model, progress=False)
        assert capsys.readouterr().err == ""
        shown = run(model, progress=True)
        err = capsys.readouterr().err
        assert f"{desc}: " in err and "3/3" in err
        if name == "calibrate_budget":
            assert "calibrate: " in err and "pass" in err  # the bar over the passes
        assert shown == quiet

    def test_default_follows_the_terminal(self, model, name, capsys, monkeypatch):
        run, desc = PASSES[name]
        run(model)
        assert capsys.readouterr().err == ""  # pytest's captured stderr is not a terminal
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        run(model)
        assert f"{desc}: " in terminal.getvalue()
