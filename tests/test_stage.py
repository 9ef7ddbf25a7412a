import copy
import inspect

import pytest
import timm
import torch
import torchvision
from routed_models import centre_routers, images, routed_model
from torch import nn

import dynroute
from dynroute import GatedBlock, GatedSequential
from dynroute.layers import gated_block
from dynroute.layers import stage as stage_module
from dynroute.models import CifarResNet


def _record_flags(monkeypatch, flag: str) -> list[bool]:
    """The value of argument ``flag`` each gated block is called with (by position or keyword), in call order.

    For ``reuse_input``, the value the block acted on: it declines the offer when a hook could see its tensors.
    """
    flags: list[bool] = []
    forward = GatedBlock._planned_forward  # what both a stage and GatedBlock.forward call
    signature = inspect.signature(forward)

    def recording_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        arguments = signature.bind(self, *args, **kwargs)
        arguments.apply_defaults()
        accepted = self.last_forward_unobserved if flag == "reuse_input" else True
        flags.append(arguments.arguments[flag] and accepted)
        return output

    monkeypatch.setattr(GatedBlock, "_planned_forward", recording_forward)
    return flags


def _count_run_merges(monkeypatch, row_bytes: int) -> list[int]:
    """Set the row size from which ReLU inputs merge run by run; the returned list gets an entry per such merge."""
    merges: list[int] = []
    merge_by_runs = gated_block._merge_by_runs

    def counting_merge(x, routed, residual):
        merges.append(len(routed))
        return merge_by_runs(x, routed, residual)

    monkeypatch.setattr(gated_block, "_RUN_MERGE_MIN_ROW_BYTES", row_bytes)
    monkeypatch.setattr(gated_block, "_merge_by_runs", counting_merge)
    return merges


@pytest.fixture
def reuse_flags(monkeypatch):
    """Whether each gated block could reuse its input (offered and accepted), in call order; tests clear it first."""
    return _record_flags(monkeypatch, "reuse_input")


@pytest.fixture
def relu_flags(monkeypatch):
    """The ``relu_input`` each gated block is called with, in call order; tests clear it before their forward."""
    return _record_flags(monkeypatch, "relu_input")


def _random_batchnorm(model: nn.Module) -> nn.Module:
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data.uniform_(0.25, 0.75)
            bn.bias.data.normal_(0, 0.1)
    return model


def _plain_stages(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose stages are plain ``nn.Sequential``: no block reuses a buffer."""
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if type(module) is GatedSequential:
            module.__class__ = nn.Sequential
    return plain


class TestConversion:
    @pytest.mark.parametrize(
        "make",
        [lambda: timm.create_model("resnet18"), lambda: torchvision.models.resnet18(), lambda: CifarResNet(2)],
        ids=["timm", "torchvision", "cifar"],
    )
    def test_stages_become_gated_sequential_in_place(self, make):
        model = make()
        stage, downsample = model.layer2, model.layer2[0].downsample if hasattr(model.layer2[0], "downsample") else None
        keys = list(model.state_dict())
        dynroute.convert_resnet(model, input_size=(3, 32, 32))
        assert model.layer2 is stage and type(stage) is GatedSequential
        if downsample is not None:  # a Sequential without gated blocks stays what it was
            assert type(downsample) is nn.Sequential
        assert [key for key in model.state_dict() if ".router." not in key] == keys


class TestPlans:
    """A stage works out its blocks' checks before the first runs; what it cannot vouch for is called as a module."""

    def _stage_outputs(self, model, x):
        with torch.inference_mode():
            return model(x), _plain_stages(model)(x)

    def test_forwards_set_on_the_object_or_a_subclass_run(self):
        model, x = routed_model(blocks_per_stage=3), images(8)
        calls = []
        second = model.layer1[1]
        second.forward = lambda *args, **kwargs: calls.append("object") or GatedBlock.forward(second, *args, **kwargs)

        class Subclass(GatedBlock):
            def forward(self, *args, **kwargs):
                calls.append("subclass")
                return super().forward(*args, **kwargs)

        model.layer2[2].__class__ = Subclass
        out, plain = self._stage_outputs(model, x)
        assert calls == ["object", "subclass"] * 2  # the stage, then the plain copy (same objects' copies)
        torch.testing.assert_close(out, plain, rtol=0, atol=1e-6)

    def test_a_compiled_block_runs_compiled(self):
        model, x = routed_model(blocks_per_stage=3), images(8)
        block = model.layer1[1]
        block.compile(backend="eager")
        compiled_call, calls = block._compiled_call_impl, []
        block._compiled_call_impl = lambda *args, **kwargs: calls.append(1) or compiled_call(*args, **kwargs)
        with torch.inference_mode():
            out = model(x)
        assert calls == [1]
        torch.testing.assert_close(out, _plain_stages(model)(x), rtol=0, atol=1e-6)

    def test_plans_are_worked_out_only_where_nothing_could_see_the_tensors(self):
        model = routed_model(blocks_per_stage=2)
        first, second = model.layer1
        with torch.inference_mode():
            assert stage_module._plan(first) is not None and stage_module._plan(second) is not None
            second.router.fc2.register_forward_hook(lambda *args: None)
            assert stage_module._plan(first) is not None and stage_module._plan(second) is None
            assert stage_module._plan(model.layer1) is None  # not a gated block
        assert first._unobserved_plan() is None  # autograd on

    def test_plan_holds_the_routers_logits_and_the_final_relu(self):
        block = routed_model(blocks_per_stage=2).layer1[0]
        x = torch.randn(4, block.router.fc1.in_features, 8, 8)
        with torch.inference_mode():
            plan = block._unobserved_plan()
            torch.testing.assert_close(plan.router_logits(x), block.router(x), rtol=0, atol=0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                autocast_plan = block._unobserved_plan()
                torch.testing.assert_close(autocast_plan.router_logits(x), block.router(x), rtol=0, atol=0)
                assert autocast_plan.router_logits(x.bfloat16()).dtype == torch.float32
        assert plan.relu_output == block.ends_with_relu is True


class TestScratchBuffers:
    def test_outputs_equal_plain_stages_and_per_sample_forwards(self):
        model, x = routed_model(blocks_per_stage=3), images(64)
        with torch.inference_mode():
            logits = model(x)
            rates = dynroute.routing_paths(model).mean(0)
            plain = _plain_stages(model)(x)
            per_sample = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        assert ((rates > 0) & (rates < 1)).sum() >= 6, "most blocks must route part of the batch"
        torch.testing.assert_close(logits, plain, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, per_sample, rtol=1e-5, atol=1e-5)

    def test_every_block_after_the_first_of_a_stage_reuses_its_input(self, reuse_flags):
        model = routed_model(blocks_per_stage=3)
        reuse_flags.clear()
        with torch.inference_mode():
            model(images(8))
        assert reuse_flags == [False, True, True] * 3

    def test_reuse_without_autograd_only(self, reuse_flags):
        model = routed_model(blocks_per_stage=3)
        reuse_flags.clear()
        with torch.no_grad():
            model(images(8))
        assert reuse_flags == [False, True, True] * 3
        reuse_flags.clear()
        model(images(8))  # eval mode with autograd on: the input may be needed for the backward pass
        assert reuse_flags == [False] * 9

    def test_hooked_blocks_neither_reuse_nor_hand_on_their_output(self, reuse_flags):
        model, x = routed_model(blocks_per_stage=3), images(64)
        seen = []

        def keep(module, args, output=None):
            tensor = args[0] if output is None else output
            seen.append((tensor, tensor.clone()))

        model.layer1[1].register_forward_hook(keep)  # sees layer1.1's output, layer1.2's input
        model.layer2[2].router.register_forward_pre_hook(keep)  # sees layer2.2's input
        model.layer3.register_forward_pre_hook(keep)  # the stage's own input
        reuse_flags.clear()
        with torch.inference_mode():
            model(x)
        assert reuse_flags == [False, False, False, False, True, False, False, True, True]
        for tensor, copied in seen:
            assert torch.equal(tensor, copied), "a tensor a hook kept was overwritten"

    def test_global_hooks_turn_reuse_off(self, reuse_flags):
        model = routed_model(blocks_per_stage=2)
        handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
        reuse_flags.clear()
        try:
            with torch.inference_mode():
                model(images(8))
        finally:
            handle.remove()
        assert reuse_flags == [False] * 6

    def test_an_ungated_block_in_between_breaks_the_chain(self, reuse_flags):
        model = dynroute.convert_resnet(
            CifarResNet(3), input_size=(3, 32, 32), blocks=lambda name, _: name != "layer1.1"
        ).eval()
        reuse_flags.clear()
        with torch.inference_mode():
            model(images(4))
        assert reuse_flags == [False, False] + [False, True, True] * 2

    def test_hooks_on_blocks_see_the_input_alone(self):
        # The stage passes its flags as keywords: a hook that unpacks (x,) keeps working in inference.
        model, x = routed_model(blocks_per_stage=3), images(8)
        seen = []
        for _, block in dynroute.gated_blocks(model):
            block.register_forward_pre_hook(lambda module, args: seen.append(len(args)))
        with torch.inference_mode():
            model(x)
        assert seen == [1] * 9

    def test_the_stage_input_is_never_written(self):
        model, x = routed_model(blocks_per_stage=3), images(64)
        seen = []
        model.layer1.register_forward_pre_hook(lambda module, args: seen.append((args[0], args[0].clone())))
        with torch.inference_mode():
            model(x)
        assert all(0 < block.last_gate.mean().item() < 1 for block in model.layer1), "every block must route some rows"
        ((stage_input, copied),) = seen
        assert torch.equal(stage_input, copied)


class TestReluInputs:
    """Rows a block skips are left as they are when its input came out of a ReLU and it ends with one."""

    @pytest.mark.parametrize(
        "make",
        [lambda: timm.create_model("resnet26"), lambda: torchvision.models.resnet18(), lambda: CifarResNet(3)],
        ids=["timm-bottleneck", "torchvision-basic", "cifar"],
    )
    def test_outputs_equal_masked_plain_stages_and_per_sample(self, make, relu_flags):
        torch.manual_seed(0)
        model = dynroute.convert_resnet(_random_batchnorm(make()), input_size=(3, 32, 32)).eval()
        x = images(32)
        centre_routers(model, x)
        relu_flags.clear()
        with torch.inference_mode():
            logits = model(x)
            rates = dynroute.routing_paths(model).mean(0)
            masked = dynroute.set_execution(copy.deepcopy(model), "masked")(x)
            plain = _plain_stages(model)(x)
            per_sample = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        assert any(relu_flags), "some block must take the ReLU-input path"
        assert ((rates > 0) & (rates < 1)).any(), "some block must route part of the batch"
        torch.testing.assert_close(logits, masked, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, per_sample, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("merge", ["index_add", "runs"])
    @pytest.mark.parametrize("fraction", [0.25, 0.75], ids=["few-rows-run", "most-rows-run"])
    def test_outputs_equal_masked_and_plain_stages_whatever_the_share_of_routed_rows(
        self, fraction, merge, relu_flags, monkeypatch
    ):
        # With index_add, few routed rows are scattered as max(F(x), -x); with most, F(x) is added and every
        # row goes through the ReLU. Large rows on CPU (any row here, with the threshold at 0) are merged run
        # by run of adjacent routed rows.
        runs_merged = _count_run_merges(monkeypatch, row_bytes=0 if merge == "runs" else 2**62)
        model, x = routed_model(blocks_per_stage=3), images(16)
        generator = torch.Generator().manual_seed(0)
        for _, block in dynroute.gated_blocks(model):
            run = torch.zeros(len(x), dtype=torch.bool)
            run[torch.randperm(len(x), generator=generator)[: int(len(x) * fraction)]] = True
            block.router.forward = lambda _, run=run: torch.stack([~run, run], dim=1).float()
        relu_flags.clear()
        with torch.inference_mode():
            logits = model(x)
            assert relu_flags == [False, True, True] * 3
            masked = dynroute.set_execution(copy.deepcopy(model), "masked")(x)
            plain = _plain_stages(model)(x)
        assert len(runs_merged) == (6 if merge == "runs" else 0)
        torch.testing.assert_close(logits, masked, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, plain, rtol=0, atol=1e-6)

    def test_relu_input_follows_the_previous_blocks_activation(self, relu_flags):
        model = routed_model(blocks_per_stage=3)
        relu_flags.clear()
        with torch.inference_mode():
            model(images(8))
        assert relu_flags == [False, True, True] * 3
        assert all(block.ends_with_relu for _, block in dynroute.gated_blocks(model))

    def test_other_activations_are_applied_to_every_row(self):
        torch.manual_seed(0)
        original = CifarResNet(3)
        for block in original.modules():
            if isinstance(block, dynroute.models.CifarBasicBlock):
                block.act = nn.LeakyReLU(0.1)  # leaky_relu(leaky_relu(y)) != leaky_relu(y) for y < 0
        model = dynroute.convert_resnet(_random_batchnorm(original), input_size=(3, 32, 32)).eval()
        x = images(32)
        centre_routers(model, x)
        with torch.inference_mode():
            logits = model(x)
            masked = dynroute.set_execution(copy.deepcopy(model), "masked")(x)
        assert not any(block.ends_with_relu for _, block in dynroute.gated_blocks(model))
        torch.testing.assert_close(logits, masked, rtol=1e-5, atol=1e-5)


class TestWithOtherLayoutsAndPrecisions:
    """Buffer reuse keeps channels_last and autocast behaving as in plain stages."""

    @pytest.mark.parametrize("merge", ["index_add", "runs"])
    def test_channels_last_stays_channels_last(self, merge, reuse_flags, monkeypatch):
        runs_merged = _count_run_merges(monkeypatch, row_bytes=0 if merge == "runs" else 2**62)
        model, x = routed_model(blocks_per_stage=3), images(32)
        with torch.no_grad():
            expected = _plain_stages(model)(x)
        model.to(memory_format=torch.channels_last)
        stage_outputs = []
        for stage in (model.layer1, model.layer2, model.layer3):  # hooks on a stage leave reuse on
            stage.register_forward_hook(lambda module, args, output: stage_outputs.append(output))
        reuse_flags.clear()
        with torch.no_grad():
            logits = model(x.to(memory_format=torch.channels_last))
        assert reuse_flags == [False, True, True] * 3
        assert (len(runs_merged) > 0) == (merge == "runs")
        assert all(out.is_contiguous(memory_format=torch.channels_last) for out in stage_outputs)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)

    def test_autocast_matches_plain_stages(self, reuse_flags):
        model, x = routed_model(blocks_per_stage=3), images(32)
        plain = _plain_stages(model)
        reuse_flags.clear()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            paths = dynroute.routing_paths(model)
            expected = plain(x)
            expected_paths = dynroute.routing_paths(plain)
        assert reuse_flags[:9] == [False, True, True] * 3
        assert torch.equal(paths, expected_paths)
        torch.testing.assert_close(logits, expected, rtol=1e-2, atol=1e-2)


class TestFeatureExtraction:
    def test_timm_feature_maps_are_those_of_plain_stages(self):
        """features_only returns every stage's output: the next stage's first block must not write into it."""
        torch.manual_seed(0)
        model = timm.create_model("resnet26", features_only=True).eval()
        model = dynroute.convert_resnet(_random_batchnorm(model), input_size=(3, 64, 64)).eval()
        x = images(16, size=64)
        centre_routers(model, x)
        with torch.inference_mode():
            features = model(x)
            rates = dynroute.routing_paths(model).mean(0)
            plain = _plain_stages(model)(x)
            masked = dynroute.set_execution(copy.deepcopy(model), "masked")(x)
        assert ((rates > 0) & (rates < 1)).any(), "some block must route part of the batch"
        for got, expected, reference in zip(features, plain, masked, strict=True):
            assert torch.equal(got, expected)
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)

    def test_timm_forward_intermediates_are_those_of_plain_stages(self):
        """forward_intermediates keeps every stage's output too, and returns the final features."""
        torch.manual_seed(0)
        model = dynroute.convert_resnet(_random_batchnorm(timm.create_model("resnet26")), input_size=(3, 64, 64))
        model.eval()
        x = images(16, size=64)
        centre_routers(model, x)
        with torch.inference_mode():
            final, intermediates = model.forward_intermediates(x)
            rates = dynroute.routing_paths(model).mean(0)
            plain_final, plain_intermediates = _plain_stages(model).forward_intermediates(x)
            masked_final, _ = dynroute.set_execution(copy.deepcopy(model), "masked").forward_intermediates(x)
        assert ((rates > 0) & (rates < 1)).any(), "some block must route part of the batch"
        assert len(intermediates) == len(plain_intermediates) == 5  # the stem and four stages
        for got, expected in zip([final, *intermediates], [plain_final, *plain_intermediates], strict=True):
            assert torch.equal(got, expected)
        torch.testing.assert_close(final, masked_final, rtol=1e-5, atol=1e-5)
