"""The inference fast path of a stage against the reference forward, the conditions it names and its cached plan.

The reference is the same model with plain ``nn.Sequential`` stages: every gated block then runs
``GatedBlock.forward``. Each comparison first checks that the fast path really ran the stages.
"""

import copy
import functools
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from routed_models import centre_routers, images, routed_model
from torch import nn

import dynroute
from dynroute import GatedBlock, GatedSequential
from dynroute.models import CifarResNet

_fastpath = pytest.importorskip("dynroute.layers._fastpath")


def _random_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters: fresh (and timm's zero-initialised) BNs make branches zero."""
    generator = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            shape = bn.running_mean.shape
            bn.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.25)
            bn.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model


ZOO = {
    "cifar": lambda: CifarResNet(3),
    "timm-basic": lambda: timm.create_model("resnet18"),
    "timm-bottleneck": lambda: timm.create_model("resnet26"),
    "torchvision-basic": lambda: torchvision.models.resnet18(),
    "torchvision-bottleneck": lambda: torchvision.models.resnet50(),
}


@functools.cache
def _zoo_model(name: str) -> nn.Module:
    """A converted member of the zoo in eval mode, routers centred on ``images(32)`` (about half of them run)."""
    torch.manual_seed(0)
    model = dynroute.convert_resnet(_random_batchnorm(ZOO[name]()), input_size=(3, 32, 32)).eval()
    return centre_routers(model, images(32))


def _model(name: str) -> nn.Module:
    return copy.deepcopy(_zoo_model(name))


def _reference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose stages are plain ``nn.Sequential``: every gated block runs GatedBlock.forward."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if type(module) is GatedSequential:
            module.__class__ = nn.Sequential
    return reference


def _stages(model: nn.Module) -> list[GatedSequential]:
    return [module for module in model.modules() if type(module) is GatedSequential]


def _assert_fast(model: nn.Module, x: torch.Tensor) -> None:
    """Every stage of ``model`` takes the fast path now (call in the forward's grad mode, after the forward:
    asking works the plan out again, so a forward after it would not run a stale one)."""
    for stage in _stages(model):
        assert _fastpath.why_not_fast_path(stage, x) == ""


def _routing_state(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[torch.Size]]:
    shapes = [block.last_input_shape for _, block in dynroute.gated_blocks(model)]
    return dynroute.routing_paths(model), dynroute.routing_logits(model), shapes


def _assert_same_forward(model: nn.Module, reference: nn.Module, x: torch.Tensor, atol: float = 1e-6) -> None:
    """Same outputs within ``atol``, same routing state, and x left as it was, in inference mode."""
    before = x.clone()
    with torch.inference_mode():
        out = model(x)
        state = _routing_state(model)
        _assert_fast(model, x)
        expected = reference(x)
        expected_state = _routing_state(reference)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=atol)
    torch.testing.assert_close(state[0], expected_state[0], rtol=0, atol=0)
    torch.testing.assert_close(state[1], expected_state[1], rtol=0, atol=0, equal_nan=True)
    assert state[2] == expected_state[2]


class HalfScale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2


def _random_decisions(batch: int, model: nn.Module, rate: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, len(list(dynroute.gated_blocks(model))), generator=generator) < rate


@pytest.mark.usefixtures("one_thread")
class TestAgainstReference:
    """Outputs within 1e-6, the same paths, logits and shapes recorded, and the input untouched."""

    @pytest.mark.parametrize("batch", [1, 16])
    @pytest.mark.parametrize("name", list(ZOO))
    def test_zoo(self, name, batch):
        model = _model(name)
        reference = _reference(model)
        x = images(batch, seed=5)
        if batch > 1:
            with torch.inference_mode():
                model(x)
            rates = dynroute.routing_paths(model).mean(0)
            assert ((rates > 0) & (rates < 1)).any(), "some block must route part of the batch"
        for execution in ("sparse", "masked"):
            for gates in ("routers", "decisions", "open", "closed"):
                for network in (model, reference):
                    dynroute.set_execution(network, execution)
                    state = _random_decisions(batch, network, 0.5, seed=1) if gates == "decisions" else gates
                    dynroute.force_gates(network, None if gates == "routers" else state)
                _assert_same_forward(model, reference, x)

    @pytest.mark.parametrize("name", ["cifar", "timm-bottleneck", "torchvision-basic"])
    def test_hooks_inside_some_stages(self, name):
        # A stage with hooks inside runs the reference; the others keep the fast path. The hooks hold every
        # module's output in the first stage: each ends as it does in the reference, which lets timm's and
        # torchvision's blocks apply their in-place ReLUs to their own tensors.
        model = _model(name)
        reference = _reference(model)
        x = images(16, seed=7)
        held = {model: [], reference: []}
        for network in (model, reference):
            for module in network.layer1.modules():
                if module is not network.layer1:
                    module.register_forward_hook(lambda m, args, output, seen=held[network]: seen.append(output))
        with torch.inference_mode():
            out = model(x)
            expected = reference(x)
            assert "a forward hook is set" in _fastpath.why_not_fast_path(model.layer1, x)
            for stage in _stages(model):
                if stage is not model.layer1:
                    assert _fastpath.why_not_fast_path(stage, x) == ""
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert torch.equal(dynroute.routing_paths(model), dynroute.routing_paths(reference))
        assert len(held[model]) == len(held[reference]) > 0
        for tensor, expected_tensor in zip(held[model], held[reference]):
            torch.testing.assert_close(tensor, expected_tensor, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("name", ["cifar", "timm-bottleneck", "torchvision-basic"])
    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
    @pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
    def test_layouts_and_precisions(self, name, channels_last, autocast):
        model = _model(name)
        reference = _reference(model)
        x = images(16, seed=6)
        if channels_last:
            model, reference = (
                model.to(memory_format=torch.channels_last),
                reference.to(memory_format=torch.channels_last),
            )
            x = x.to(memory_format=torch.channels_last)
        outputs = []
        for stage in _stages(model):
            stage.register_forward_hook(lambda module, args, output: outputs.append(output))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _assert_same_forward(model, reference, x)
        if channels_last:
            assert all(out.is_contiguous(memory_format=torch.channels_last) for out in outputs)
        if autocast:
            assert outputs[-1].dtype == torch.bfloat16
            assert dynroute.routing_logits(model).dtype == torch.float32

    @pytest.mark.parametrize("fraction", [0.25, 0.75], ids=["few-rows-run", "most-rows-run"])
    @pytest.mark.parametrize("size", [32, 64], ids=["small-rows", "large-rows"])
    def test_share_of_routed_rows(self, fraction, size):
        # After the first block of a stage, inputs are ReLU outputs the block may write into: few routed rows
        # are added as max(F(x), -x), most get F(x) and one ReLU over all rows, and on CPU rows of 128 KiB and
        # more (a CIFAR stage 1 at 64 px) are merged run by run.
        model = routed_model(blocks_per_stage=3)
        reference = _reference(model)
        decisions = torch.zeros(16, 9, dtype=torch.bool)
        generator = torch.Generator().manual_seed(0)
        for column in decisions.T:
            column[torch.randperm(16, generator=generator)[: int(16 * fraction)]] = True
        for network in (model, reference):
            dynroute.force_gates(network, decisions)
        _assert_same_forward(model, reference, images(16, size=size))

    def test_large_batch_with_every_and_no_row_routed_in_turn(self):
        model = routed_model(blocks_per_stage=3)
        reference = _reference(model)
        decisions = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1]], dtype=torch.bool).expand(8, 9)
        for network in (model, reference):
            dynroute.force_gates(network, decisions)
        _assert_same_forward(model, reference, images(8))

    def test_other_activations_and_shortcuts(self):
        # A LeakyReLU (leaky_relu(leaky_relu(y)) != leaky_relu(y)) and option-B shortcuts.
        torch.manual_seed(0)
        original = CifarResNet(3, shortcut="B")
        for block in original.modules():
            if isinstance(block, dynroute.models.CifarBasicBlock):
                block.act = nn.LeakyReLU(0.1)
        model = dynroute.convert_resnet(_random_batchnorm(original), input_size=(3, 32, 32)).eval()
        centre_routers(model, images(32))
        _assert_same_forward(model, _reference(model), images(16))

    def test_an_ungated_block_in_between(self):
        torch.manual_seed(0)
        original = _random_batchnorm(CifarResNet(3))
        model = dynroute.convert_resnet(original, input_size=(3, 32, 32), blocks=lambda name, _: name != "layer1.1")
        centre_routers(model.eval(), images(32))
        _assert_same_forward(model, _reference(model), images(16))

    @pytest.mark.parametrize(
        "skip, run",
        [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (float("nan"), 1.0), (1.0, float("nan")), (float("nan"), float("nan"))]
        + [(float("-inf"), float("-inf")), (float("inf"), float("inf")), (float("-inf"), 0.0)],
    )
    def test_a_batch_of_one_decides_as_argmax(self, skip, run):
        # The fast path decides a single image by comparing its two logits in Python: a tie skips, a NaN runs.
        model = routed_model(blocks_per_stage=2)
        for _, block in dynroute.gated_blocks(model):
            nn.init.zeros_(block.router.fc2.weight)
            block.router.fc2.bias.data = torch.tensor([skip, run])  # the logits are the bias
        _assert_same_forward(model, _reference(model), images(1))
        expected = float(torch.tensor([[skip, run]]).argmax(1))
        assert dynroute.routing_paths(model).eq(expected).all()

    @pytest.mark.parametrize("aliasing", ["residual-is-input", "shortcut-is-a-view"])
    def test_adapters_returning_views_of_the_input(self, aliasing):
        class Aliasing(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.scale = nn.Parameter(torch.ones(()))
                self.act = nn.ReLU()

        view = aliasing == "shortcut-is-a-view"
        dynroute.register_block(
            Aliasing,
            dynroute.BlockAdapter(
                residual=(lambda b, x: x * b.scale) if view else (lambda b, x: x),
                shortcut=(lambda b, x: x[:, :]) if view else (lambda b, x: x * 2),
                activation=lambda b, x: b.act(x),
                in_channels=lambda b: 4,
            ),
        )
        stage = GatedSequential(*(GatedBlock(Aliasing()) for _ in range(3))).eval()
        x = torch.rand(6, 4, 5, 5) - 0.5
        centre_routers(stage, x)
        reference = _reference(nn.Sequential(stage))
        for batch in (x, x[:1]):
            before = batch.clone()
            with torch.inference_mode():
                assert _fastpath.why_not_fast_path(stage, batch) == ""
                out, expected = stage(batch), reference(batch)
            torch.testing.assert_close(batch, before, rtol=0, atol=0)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)

    def test_a_router_of_another_type(self):
        class ChannelRouter(nn.Module):
            """Runs a block when the first channel's mean is positive."""

            def forward(self, x):
                mean = x[:, 0].mean((1, 2))
                return torch.stack([-mean, mean], dim=1)

        model = routed_model(blocks_per_stage=3)
        model.layer2[1].router = ChannelRouter()
        _assert_same_forward(model, _reference(model), images(16))

    @pytest.mark.parametrize("batch", [1, 16])
    def test_static_routers(self, batch):
        torch.manual_seed(0)
        model = dynroute.convert_resnet(CifarResNet(3), input_size=(3, 32, 32), router_layer=dynroute.StaticRouter)
        with torch.no_grad():
            for _, block in dynroute.gated_blocks(model.eval()):
                block.router.logits.normal_()
        with torch.inference_mode():
            model(images(batch))
        paths = dynroute.routing_paths(model)
        assert 0 < paths.mean() < 1, "some blocks must run and some skip"
        _assert_same_forward(model, _reference(model), images(batch, seed=5))

    @pytest.mark.parametrize("batch", [1, 16])
    def test_decision_offsets(self, batch):
        """The offset moves the run bias that the fast path reads at every forward, not a copy taken before."""
        model, x = routed_model(blocks_per_stage=3), images(batch, seed=5)
        reference = _reference(model)
        with torch.inference_mode():
            model(x)
        paths = [dynroute.routing_paths(model)]
        for offset in (-1.5, 2.0):
            for network in (model, reference):
                dynroute.set_decision_offset(network, offset)
            _assert_same_forward(model, reference, x)
            paths.append(dynroute.routing_paths(model))
        assert not torch.equal(paths[1], paths[0]) and not torch.equal(paths[2], paths[0]), "offsets must change paths"

    def test_hooks_on_a_stage_see_untouched_tensors(self):
        model = routed_model(blocks_per_stage=3)
        reference = _reference(model)
        held = []
        for stage in _stages(model):
            stage.register_forward_pre_hook(lambda module, args: held.append((args[0], args[0].clone())))
            stage.register_forward_hook(lambda module, args, output: held.append((output, output.clone())))
        _assert_same_forward(model, reference, images(16))
        assert len(held) == 2 * 3
        for tensor, copied in held:
            assert torch.equal(tensor, copied)

    def test_timm_feature_maps(self):
        torch.manual_seed(0)
        model = timm.create_model("resnet26", features_only=True)
        model = dynroute.convert_resnet(_random_batchnorm(model), input_size=(3, 64, 64)).eval()
        x = images(16, size=64)
        centre_routers(model, x)
        reference = _reference(model)
        with torch.inference_mode():
            for stage in _stages(model):
                assert _fastpath.why_not_fast_path(stage, x) == ""
            features, expected = model(x), reference(x)
        for got, want in zip(features, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    def test_functional_call_runs_the_tensors_it_is_given(self):
        model = routed_model(blocks_per_stage=3)
        reference = _reference(model)
        x = images(16)
        swapped = {
            name: torch.randn_like(tensor) * 3 for name, tensor in model.named_parameters() if ".router.fc" in name
        }
        with torch.inference_mode():
            out = torch.func.functional_call(model, swapped, (x,))
            paths = dynroute.routing_paths(model)
            _assert_fast(model, x)
            expected = torch.func.functional_call(reference, swapped, (x,))
            expected_paths = dynroute.routing_paths(reference)
            unswapped = reference(x)
        assert not torch.equal(expected, unswapped), "the swapped routers must route differently"
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert torch.equal(paths, expected_paths)


class TestWhyNot:
    """Each condition the fast path needs is named when it fails, and the reference runs."""

    def _check(self, model, reference, x, reason, context=torch.inference_mode):
        with context():
            assert reason in _fastpath.why_not_fast_path(model.layer2, x)
            out = model(x)
        with torch.inference_mode():
            expected = reference(x)
        torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-6)

    def _models(self):
        model = routed_model(blocks_per_stage=2)
        return model, _reference(model), images(8)

    def test_autograd(self):
        model, reference, x = self._models()
        self._check(model, reference, x, "autograd is enabled", context=torch.enable_grad)

    def test_global_hook(self):
        model, reference, x = self._models()
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
        try:
            self._check(model, reference, x, "a global forward hook is set")
        finally:
            handle.remove()
        with torch.inference_mode():
            assert _fastpath.why_not_fast_path(model.layer2, x) == ""

    def test_hook_inside_the_stage(self):
        model, reference, x = self._models()
        model.layer2[1].router.fc1.register_forward_hook(lambda module, args, output: None)
        self._check(model, reference, x, "a forward hook is set on '1.router.fc1' in the stage")

    def test_training_mode(self):
        model, _, x = self._models()
        model.layer2[0].train()
        with torch.inference_mode():
            assert "gated block '0' is in training mode" in _fastpath.why_not_fast_path(model.layer2, x)

    def test_forward_set_on_a_block_or_compiled(self):
        model, reference, x = self._models()
        block = model.layer2[1]
        calls = []
        block.forward = lambda *args: calls.append(1) or GatedBlock.forward(block, *args)
        self._check(model, reference, x, "a GatedBlock of gated block '1' has a forward set on it")
        assert calls == [1]
        del block.forward
        block.compile(backend="eager")
        with torch.inference_mode():
            assert "compiled" in _fastpath.why_not_fast_path(model.layer2, x)

    def test_a_gated_block_subclass_with_its_own_forward(self):
        class Subclass(GatedBlock):
            def forward(self, x):
                calls.append(1)
                return super().forward(x)

        model, reference, x = self._models()
        calls = []
        model.layer2[1].__class__ = Subclass
        self._check(model, reference, x, "is a Subclass with a forward of its own")
        assert calls == [1]

    @pytest.mark.parametrize("child", ["router", "router.fc1", "router.act", "shortcut", "act"])
    def test_forward_set_on_a_module_it_would_not_call(self, child):
        # The fast path runs a stock router as ops, a stock nn.Identity shortcut as its input and a final
        # nn.ReLU in place: a forward set on any of them must run instead.
        model, reference, x = self._models()
        module = model.layer2[1].get_submodule(child)
        stock = type(module).forward
        calls = []
        module.forward = lambda *args: calls.append(1) or stock(module, *args)
        self._check(model, reference, x, f"a {type(module).__qualname__} of gated block '1' has a forward set on it")
        assert calls == [1]

    @pytest.mark.parametrize("patched", [nn.ReLU, nn.Linear, nn.Identity, dynroute.Router])
    def test_forward_patched_on_a_class(self, patched, monkeypatch):
        model, reference, x = self._models()
        stock, calls = patched.forward, []
        monkeypatch.setattr(patched, "forward", lambda self, *args: calls.append(1) or stock(self, *args))
        self._check(model, reference, x, f"{patched.__qualname__}.forward is patched")
        assert calls

    def test_class_forward_patched_before_import(self):
        # A library that patched nn.ReLU.forward before dynroute was imported, even keeping torch's names with
        # functools.wraps: its forward runs.
        script = (
            "import copy, functools, torch\n"
            "torch.nn.ReLU.forward = functools.wraps(torch.nn.ReLU.forward)(lambda self, input: input.abs())\n"
            "import dynroute\n"
            "from dynroute.layers import _fastpath\n"
            "model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)).eval()\n"
            "for _, block in dynroute.gated_blocks(model):\n"
            "    torch.nn.init.normal_(block.router.fc2.weight, std=3.0)\n"
            "plain = torch.nn.Sequential(*copy.deepcopy(model.layer1))\n"
            "x = torch.randn(4, 16, 32, 32)\n"
            "with torch.inference_mode():\n"
            "    assert 'ReLU.forward is patched' in _fastpath.why_not_fast_path(model.layer1, x)\n"
            "    assert torch.equal(model.layer1(x), plain(x)), 'the patched forward did not run'\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    def test_tracing(self):
        class Recording(nn.Module):
            def __init__(self, stage):
                super().__init__()
                self.stage = stage

            def forward(self, x):
                reasons.append(_fastpath.why_not_fast_path(self.stage, x))
                return self.stage(x)

        reasons = []
        recording = Recording(routed_model(blocks_per_stage=2).layer2)
        stage_input = images(2, size=32)[:, :1].expand(2, 16, 32, 32).contiguous()
        with torch.no_grad():
            torch.jit.trace(recording, (stage_input,), check_trace=False)
            torch.compile(recording, backend="eager")(stage_input)
        assert reasons == ["torch.jit.trace is tracing", "torch.compile or torch.export is tracing"]

    def test_input_that_is_not_a_plain_batch(self):
        model = routed_model(blocks_per_stage=2)
        with torch.inference_mode():
            assert "not a batch" in _fastpath.why_not_fast_path(model.layer2, torch.randn(16, 32, 32))
            with pytest.raises(ValueError, match="unsqueeze"):
                model.layer2(torch.randn(16, 32, 32))


class TestPlanCache:
    """The plan is kept while the model stays as it is, and every change the fast path depends on takes effect."""

    def _same(self, model, x):
        _assert_same_forward(model, _reference(model), x)

    def test_plan_is_kept_across_forwards_and_batches(self):
        model = routed_model(blocks_per_stage=2)
        with torch.inference_mode():
            model(images(8))
            plan = _fastpath._PLANS[model.layer2]
            model(images(1))
            model(images(8, seed=2))
        assert _fastpath._PLANS[model.layer2] is plan

    def test_hook_added_after_a_forward_sees_untouched_tensors_then_removed(self):
        model, x = routed_model(blocks_per_stage=3), images(16)
        self._same(model, x)  # the plan is cached
        held = []
        handle = model.layer1[0].register_forward_hook(
            lambda module, args, output: held.append((output, output.clone()))
        )
        router_calls = []
        router_handle = model.layer1[1].router.fc1.register_forward_hook(lambda *args: router_calls.append(1))
        with torch.inference_mode():
            model(x)
        assert router_calls == [1]
        ((output, copied),) = held
        assert torch.equal(output, copied), "the next block wrote into a tensor a hook holds"
        handle.remove()
        router_handle.remove()
        self._same(model, x)

    @pytest.mark.parametrize("child", ["act", "bn2"])
    def test_module_assigned_with_a_hook_of_its_own(self, child):
        # With every gate open, a block adds its shortcut into its branch output (bn2's) in place and the next
        # block writes into the block output (act's).
        model, x = routed_model(blocks_per_stage=3), images(16)
        dynroute.force_gates(model, "open")
        held = []
        replacement = copy.deepcopy(model.layer1[1].get_submodule(child))
        replacement.register_forward_hook(lambda module, args, output: held.append((output, output.clone())))
        self._same(model, x)  # the plan is worked out after the hook was registered
        setattr(model.layer1[1], child, replacement)  # assigning it is the only change
        with torch.inference_mode():
            model(x)
        assert held, "the hook of the assigned module ran"
        for output, copied in held:
            assert torch.equal(output, copied), "a block wrote into a tensor a hook holds"

    def test_router_layer_replaced(self):
        model, x = routed_model(blocks_per_stage=3), images(16)
        self._same(model, x)
        router = model.layer2[1].router
        router.fc2 = nn.Sequential(router.fc2, nn.Tanh())
        self._same(model, x)

    def test_router_layer_replaced_by_writing_modules(self):
        # torch.ao.quantization's convert swaps children through _modules, with no assignment to notice.
        model, x = routed_model(blocks_per_stage=3), images(16)
        router = model.layer2[1].router
        replacement = nn.Sequential(router.fc2, nn.Tanh())  # built first: writing it is the only change
        self._same(model, x)
        router._modules["fc2"] = replacement
        self._same(model, x)

    def test_router_weight_set_as_a_plain_attribute(self):
        model, x = routed_model(blocks_per_stage=3), images(16)
        self._same(model, x)
        fc1 = model.layer2[1].router.fc1
        weight = torch.randn_like(fc1.weight) * 3
        del fc1.weight
        fc1.weight = weight  # a plain attribute now, outside the layer's parameters
        self._same(model, x)

    def test_stage_children_replaced_inserted_and_deleted(self):
        model, x = routed_model(blocks_per_stage=3), images(16)
        self._same(model, x)
        scale = nn.Identity()
        model.layer2.insert(1, scale)  # writes _modules directly
        self._same(model, x)
        del model.layer2[1]
        model.layer2[2] = copy.deepcopy(model.layer2[1])
        model.layer2[2].force_gate("closed")
        self._same(model, x)
        del model.layer2[2]
        self._same(model, x)
        halve = HalfScale()  # an ungated child, written into _modules with no assignment to notice
        model.layer2.insert(1, nn.Identity())
        self._same(model, x)
        model.layer2._modules["1"] = halve
        self._same(model, x)

    def test_a_module_returning_its_input_does_not_make_it_writable(self):
        # nn.Identity first in a stage hands the stage input on: the gated blocks after it must not write into it.
        model = routed_model(blocks_per_stage=3)
        dynroute.force_gates(model, _random_decisions(16, model, 0.5, seed=3))
        model.layer1.insert(0, nn.Identity())
        reference = _reference(model)
        stage_input = torch.rand(16, 16, 32, 32)
        before = stage_input.clone()
        with torch.inference_mode():
            assert _fastpath.why_not_fast_path(model.layer1, stage_input) == ""
            out, expected = model.layer1(stage_input), reference.layer1(stage_input)
        torch.testing.assert_close(stage_input, before, rtol=0, atol=0)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("batch", [1, 8])
    def test_masked_execution_runs_every_row(self, batch):
        # Masked execution is the static graph that computes every branch: the fast path keeps it so.
        model, x = routed_model(blocks_per_stage=3), images(batch)
        seen = []

        class RecordingConv(nn.Conv2d):
            def forward(self, input):
                seen.append(len(input))
                return super().forward(input)

        block = model.layer1[1]
        recording = RecordingConv(16, 16, 3, padding=1, bias=False)
        recording.load_state_dict(block.conv1.state_dict())
        block.conv1 = recording
        dynroute.force_gates(model, torch.zeros(batch, 9, dtype=torch.bool))  # every block skips every row
        for execution, rows in (("masked", [batch]), ("sparse", [])):
            dynroute.set_execution(model, execution)
            seen.clear()
            _assert_same_forward(model, _reference(model), x)
            assert seen == rows * 2  # the model's forward, the reference's

    def test_train_then_eval(self):
        model, x = routed_model(blocks_per_stage=3), images(16)
        self._same(model, x)
        model.train()
        reference = _reference(model)
        outputs = []
        for network in (model, reference):
            torch.manual_seed(0)  # the same Gumbel noise for both
            with torch.no_grad():
                outputs.append(network(x))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-6)
        model.eval()
        self._same(model, x)

    def test_dtype_and_device_changes(self):
        model, x = routed_model(blocks_per_stage=3), images(16)
        self._same(model, x)
        model.double()
        self._same(model, x.double())
        model.to("cpu", memory_format=torch.channels_last)
        self._same(model, x.double().to(memory_format=torch.channels_last))

    def test_adapter_registered_again(self):
        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(4, 4, 3, padding=1)
                self.act = nn.ReLU()

        def adapter(scale):
            return dynroute.BlockAdapter(
                residual=lambda b, x: scale * b.conv(x),
                shortcut=lambda b, x: x,
                activation=lambda b, x: b.act(x),
                in_channels=lambda b: 4,
            )

        dynroute.register_block(Block, adapter(1.0))
        stage = nn.Sequential(Block(), Block())
        dynroute.convert_resnet(nn.Sequential(stage), input_size=(4, 6, 6))
        dynroute.force_gates(stage.eval(), "open")
        x = torch.rand(3, 4, 6, 6)
        with torch.inference_mode():
            assert _fastpath.why_not_fast_path(stage, x) == ""
            first = stage(x)
            dynroute.register_block(Block, adapter(2.0))
            second = stage(x)
            expected = nn.Sequential(*stage)(x)
        assert not torch.equal(first, second)
        torch.testing.assert_close(second, expected, rtol=0, atol=1e-6)
