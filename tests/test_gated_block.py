import contextlib
import copy

import pytest
import timm.models.resnet as timm_resnet
import torch
import torchvision.models.resnet as tv_resnet
from torch import nn

import dynroute
from dynroute import GatedBlock
from dynroute.models import CifarBasicBlock


def _random_router(block: GatedBlock, x: torch.Tensor) -> GatedBlock:
    """Random router weights, centred on the inputs x so that about half of them are routed."""
    nn.init.normal_(block.router.fc2.weight, std=3.0)
    nn.init.zeros_(block.router.fc2.bias)
    with torch.no_grad():
        logits = block.router(x)
        block.router.fc2.bias[1] -= (logits[:, 1] - logits[:, 0]).median() + 1e-3
    return block


def _blocks():
    return {
        "cifar-identity": (CifarBasicBlock(8, 8), (8, 8, 8)),
        "cifar-option-a": (CifarBasicBlock(8, 16, stride=2), (8, 8, 8)),
        "cifar-option-b": (CifarBasicBlock(8, 16, stride=2, shortcut="B"), (8, 8, 8)),
        "tv-basic-down": (
            tv_resnet.BasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))),
            (8, 8, 8),
        ),
        "tv-bottleneck": (tv_resnet.Bottleneck(16, 4), (16, 6, 6)),
        "timm-basic": (timm_resnet.BasicBlock(8, 8), (8, 8, 8)),
        "timm-bottleneck-down": (
            timm_resnet.Bottleneck(
                8, 4, stride=2, downsample=nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))
            ),
            (8, 8, 8),
        ),
    }


def _inputs(n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Non-negative block inputs whose channel means differ per sample, so routers disagree."""
    return torch.randn(n, *shape).relu() * torch.rand(n, shape[0], 1, 1) * 4


def _perturb_batchnorm(module: nn.Module) -> None:
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.normal_()
            bn.bias.data.normal_()


def _shortcut_reference(original: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a skipped block outputs, written from each library's own block layout."""
    if isinstance(original, CifarBasicBlock):
        return torch.relu(original.shortcut(x))
    identity = x if original.downsample is None else original.downsample(x)
    return torch.relu(identity)


@pytest.mark.parametrize("name", list(_blocks()))
class TestGatedBlockAgainstOriginal:
    """GatedBlock against the unconverted block run sample by sample (brute force)."""

    def _pair(self, name):
        original, shape = _blocks()[name]
        _perturb_batchnorm(original)
        original.eval()
        x = _inputs(12, shape)
        return original, _random_router(GatedBlock(copy.deepcopy(original)), x).eval(), x

    def test_eval_equals_per_sample_reference(self, name):
        original, gated, x = self._pair(name)
        with torch.no_grad():
            out = gated(x)
            gates = gated.last_gate
            reference = torch.cat(
                [original(x[i : i + 1]) if gates[i] else _shortcut_reference(original, x[i : i + 1]) for i in range(12)]
            )
        assert 0 < gates.sum() < 12, "the test needs a mix of routed and skipped samples"
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)

    def test_batch_of_one_runs_or_skips(self, name):
        original, gated, x = self._pair(name)
        with torch.no_grad():
            for i in range(6):
                out = gated(x[i : i + 1])
                expected = original(x[i : i + 1]) if gated.last_gate[0] else _shortcut_reference(original, x[i : i + 1])
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)

    def test_forced_open_is_the_original_block(self, name):
        original, gated, x = self._pair(name)
        gated.force_gate("open")
        with torch.no_grad():
            torch.testing.assert_close(gated(x), original(x), atol=1e-6, rtol=0)
        assert gated.last_gate.eq(1).all()

    def test_forced_closed_is_the_shortcut(self, name):
        original, gated, x = self._pair(name)
        gated.force_gate("closed")
        with torch.no_grad():
            torch.testing.assert_close(gated(x), _shortcut_reference(original, x), atol=1e-6, rtol=0)
        assert gated.last_gate.eq(0).all()

    @pytest.mark.parametrize("routed", ["mixed", "all", "none", "one-runs", "one-skips"])
    def test_eval_leaves_its_input_alone(self, name, routed):
        # Without autograd sums are written in place into buffers of the forward's own, never into x.
        original, gated, x = self._pair(name)
        bias = {"all": (0.0, 10.0), "none": (10.0, 0.0), "one-runs": (0.0, 10.0), "one-skips": (10.0, 0.0)}
        if routed in bias:
            nn.init.zeros_(gated.router.fc2.weight)
            gated.router.fc2.bias.data = torch.tensor(bias[routed])
        x = x[:1] if routed.startswith("one") else x
        before = x.clone()
        with torch.inference_mode():
            out = gated(x)
            gates = gated.last_gate
            reference = torch.cat(
                [original(row) if gate else _shortcut_reference(original, row) for row, gate in zip(x.split(1), gates)]
            )
        torch.testing.assert_close(x, before, atol=0, rtol=0)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)

    @pytest.mark.parametrize("routed", ["mixed", "all", "none", "forced-closed"])
    @pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
    def test_tensors_that_hooks_hold_are_left_alone(self, name, routed, grad_mode):
        # Sums go in place only into buffers nobody else can see, not into a hooked module's output. Held:
        # the outputs the original block leaves alone too (the shortcut's, the router's, every module's
        # of the CIFAR block; timm and torchvision blocks apply in-place ReLUs and sums to their own).
        original, gated, x = self._pair(name)
        if routed in ("all", "none"):
            nn.init.zeros_(gated.router.fc2.weight)
            gated.router.fc2.bias.data = torch.tensor([0.0, 10.0] if routed == "all" else [10.0, 0.0])
        if routed == "forced-closed":
            gated.force_gate("closed")
        shortcut = getattr(gated, "shortcut", None) or getattr(gated, "downsample", None)
        hooked = [*gated.router.modules(), *([] if shortcut is None else [shortcut])]
        if isinstance(original, CifarBasicBlock):
            hooked = [module for module in gated.modules() if module is not gated]
        held = []
        for module in hooked:
            module.register_forward_hook(lambda m, args, output: held.append((output, output.detach().clone())))
        with grad_mode():
            out = gated(x)
            gates = gated.last_gate
            reference = torch.cat(
                [original(row) if gate else _shortcut_reference(original, row) for row, gate in zip(x.split(1), gates)]
            )
        if routed == "mixed":
            assert 0 < gated.last_gate.sum() < len(x)
        assert held
        for output, copy_at_hook_time in held:
            torch.testing.assert_close(output.detach(), copy_at_hook_time, atol=0, rtol=0)
        torch.testing.assert_close(out.detach(), reference, atol=1e-5, rtol=0)

    def test_forced_decisions_run_the_rows_they_name(self, name):
        original, gated, x = self._pair(name)
        decisions = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1])
        gated.force_gate(decisions)
        with torch.no_grad():
            out = gated(x)
            reference = torch.cat(
                [
                    original(row) if run else _shortcut_reference(original, row)
                    for row, run in zip(x.split(1), decisions.tolist())
                ]
            )
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(gated.last_gate, decisions.float(), atol=0, rtol=0)
        assert gated.last_logits.shape == (12, 2), "the router still runs"

    def test_sparse_equals_masked(self, name):
        _, gated, x = self._pair(name)
        with torch.no_grad():
            sparse = gated(x)
            gated.set_execution("masked")
            masked = gated(x)
        torch.testing.assert_close(sparse, masked, atol=1e-5, rtol=0)


class TestSparseExecution:
    """In eval the residual branch runs only on the samples routed to it."""

    def test_branch_sees_only_routed_rows(self):
        x = _inputs(32, (8, 8, 8))
        gated = _random_router(GatedBlock(CifarBasicBlock(8, 8)), x).eval()
        seen = []
        gated.conv1.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
        with torch.no_grad():
            gated(x)
        routed = int(gated.last_gate.sum())
        assert 0 < routed < 32
        assert seen == [routed]

    @pytest.mark.parametrize(
        "skip, run",
        [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (float("nan"), 1.0), (1.0, float("nan")), (float("nan"), float("nan"))]
        + [(float("-inf"), float("-inf")), (float("inf"), float("inf")), (float("-inf"), 0.0)],
    )
    def test_batch_of_one_decides_as_argmax(self, skip, run):
        # A batch of one decides with a Python comparison of its two logits; a batch of two with argmax.
        gated = GatedBlock(CifarBasicBlock(8, 8)).eval()
        _perturb_batchnorm(gated)
        with torch.no_grad():
            gated.router.fc2.bias.copy_(torch.tensor([skip, run]))  # zero weights: the logits are the bias
        x = _inputs(1, (8, 8, 8))
        branch_rows = []
        gated.conv1.register_forward_hook(lambda module, args, output: branch_rows.append(len(args[0])))
        with torch.no_grad():
            pair = gated(x.expand(2, -1, -1, -1))
            argmax_gate = gated.last_gate
            single = gated(x)
        expected = int(torch.tensor([[skip, run]]).argmax(1))
        assert argmax_gate.tolist() == [float(expected)] * 2
        assert branch_rows == [2] * expected + [1] * expected  # the branch ran for the single image iff argmax says so
        assert gated.last_gate.tolist() == [float(expected)]
        torch.testing.assert_close(single, pair[:1], atol=1e-5, rtol=0)

    def test_gathered_rows_keep_channels_last(self):
        x = _inputs(16, (8, 8, 8)).to(memory_format=torch.channels_last)
        gated = _random_router(GatedBlock(CifarBasicBlock(8, 8)), x).eval().to(memory_format=torch.channels_last)
        channels_last = []
        gated.conv1.register_forward_pre_hook(
            lambda module, args: channels_last.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
        with torch.no_grad():
            out = gated(x)
        assert 0 < gated.last_gate.sum() < 16
        assert channels_last == [True], "the branch runs on channels_last rows"
        assert out.is_contiguous(memory_format=torch.channels_last)

    def test_closed_block_computes_no_branch(self):
        gated = GatedBlock(CifarBasicBlock(8, 8)).eval()
        gated.force_gate("closed")
        calls = []
        gated.conv1.register_forward_hook(lambda *args: calls.append(1))
        gated(torch.randn(4, 8, 8, 8))
        assert calls == []

    @pytest.mark.parametrize("hook", ["on-shortcut", "global"])
    @pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.enable_grad])
    def test_hooks_on_an_identity_shortcut_fire(self, hook, grad_mode):
        original = CifarBasicBlock(8, 8).eval()
        stage = dynroute.GatedSequential(GatedBlock(copy.deepcopy(original)), GatedBlock(copy.deepcopy(original)))
        dynroute.force_gates(stage.eval(), "open")
        x = _inputs(3, (8, 8, 8))
        seen = []
        if hook == "on-shortcut":
            stage[1].shortcut.register_forward_hook(lambda module, args, output: seen.append((module, args[0])))
        with grad_mode(), contextlib.ExitStack() as stack:
            if hook == "global":
                handle = nn.modules.module.register_module_forward_hook(
                    lambda module, args, output: seen.append((module, args[0]))
                )
                stack.callback(handle.remove)
            out = stage(x)
            expected = original(original(x))
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        shortcut_inputs = [args for module, args in seen if module is stage[1].shortcut]
        assert len(shortcut_inputs) == 1
        torch.testing.assert_close(shortcut_inputs[0], original(x), atol=1e-6, rtol=0)

    def test_backward_hooks_on_an_identity_shortcut_fire(self):
        gated = GatedBlock(CifarBasicBlock(8, 8)).train()
        fired = []
        gated.shortcut.register_full_backward_hook(lambda module, grad_input, grad_output: fired.append(module))
        gated(_inputs(3, (8, 8, 8)).requires_grad_()).sum().backward()
        assert fired == [gated.shortcut]

    def test_skipped_identity_block_leaves_its_input_alone_and_backpropagates(self):
        # torchvision's shared ReLU is in place; a skipped identity block must not write into x.
        gated = GatedBlock(tv_resnet.BasicBlock(8, 8))
        gated.hard_decisions = True
        gated.force_gate(None)
        nn.init.constant_(gated.router.fc2.bias, 0.0)
        gated.router.fc2.bias.data[0] = 10.0  # always skip
        x = torch.randn(4, 8, 8, 8, requires_grad=True)
        y = x * 1.0
        before = y.detach().clone()
        out = gated(y)
        torch.testing.assert_close(y.detach(), before)
        out.sum().backward()
        torch.testing.assert_close(x.grad, (before > 0).float())

    @pytest.mark.parametrize("aliasing", ["residual-is-input", "shortcut-is-a-view"])
    def test_adapters_returning_views_of_the_input_are_added_out_of_place(self, aliasing):
        class Aliasing(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.scale = nn.Parameter(torch.ones(()))

        view = aliasing == "shortcut-is-a-view"
        dynroute.register_block(
            Aliasing,
            dynroute.BlockAdapter(
                residual=(lambda b, x: x * b.scale) if view else (lambda b, x: x),
                shortcut=(lambda b, x: x[:, :]) if view else (lambda b, x: x * 2),
                activation=lambda b, x: x,
                in_channels=lambda b: 4,
            ),
        )
        gated = GatedBlock(Aliasing()).eval()
        x = torch.rand(6, 4, 5, 5)
        nn.init.normal_(gated.router.fc2.weight, std=3.0)
        with torch.no_grad():
            logits = gated.router(x)
            gated.router.fc2.bias[1] -= (logits[:, 1] - logits[:, 0]).median() + 1e-3
        for batch in (x, x[:1]):
            before = batch.clone()
            with torch.no_grad():
                out = gated(batch)
            torch.testing.assert_close(batch, before, atol=0, rtol=0)
            gate = gated.last_gate.view(-1, 1, 1, 1)
            torch.testing.assert_close(out, (2 - view) * before + gate * before)


class TestGatedResidual:
    """The functional gate op against a brute-force loop over the samples."""

    def _parts(self, n: int = 6):
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 4, 3, padding=1)
        x = torch.randn(n, 4, 5, 5)
        seen = []

        def residual(rows):
            seen.append(len(rows))
            return conv(rows)

        return conv, x, 2 * x, residual, seen

    def test_masked_scales_every_row_by_its_gate(self):
        conv, x, shortcut, residual, seen = self._parts()
        gate = torch.rand(6)
        out = dynroute.gated_residual(shortcut, residual, x, gate, execution="masked")
        expected = torch.stack([shortcut[i] + gate[i] * conv(x[i : i + 1])[0] for i in range(6)])
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        assert seen == [6]

    @pytest.mark.parametrize("decisions", [[1, 0, 0, 1, 1, 0], [1] * 6, [0] * 6, [0, 0, 1, 0, 0, 0]])
    def test_sparse_runs_the_branch_on_the_routed_rows_only(self, decisions):
        conv, x, shortcut, residual, seen = self._parts()
        gate = torch.tensor(decisions, dtype=torch.bool)
        with torch.no_grad():
            out = dynroute.gated_residual(shortcut, residual, x, gate)
            expected = torch.stack(
                [shortcut[i] + conv(x[i : i + 1])[0] if d else shortcut[i] for i, d in enumerate(decisions)]
            )
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        assert seen == ([sum(decisions)] if any(decisions) else [])
        assert out.data_ptr() not in (x.data_ptr(), shortcut.data_ptr()), "a new tensor, never x or the shortcut"

    @pytest.mark.parametrize("gate", [True, False])
    def test_a_bool_is_the_same_decision_for_every_row(self, gate):
        conv, x, shortcut, residual, seen = self._parts()
        with torch.no_grad():
            out = dynroute.gated_residual(shortcut, residual, x, gate)
        torch.testing.assert_close(out, shortcut + conv(x) if gate else shortcut, atol=1e-6, rtol=0)
        assert seen == ([6] if gate else [])
        assert out.data_ptr() != shortcut.data_ptr()

    def test_training_runs_a_single_routed_row_masked(self):
        conv, x, shortcut, residual, seen = self._parts()
        gate = torch.tensor([0, 0, 1, 0, 0, 0])
        out = dynroute.gated_residual(shortcut, residual, x, gate, training=True)
        assert seen == [6]
        torch.testing.assert_close(out, dynroute.gated_residual(shortcut, residual, x, gate), atol=1e-6, rtol=0)

    def test_training_with_no_routed_row_gives_the_parameters_a_zero_gradient(self):
        conv, x, shortcut, residual, _ = self._parts()
        gate = torch.zeros(6, dtype=torch.bool)
        out = dynroute.gated_residual(shortcut, residual, x, gate, training=True, parameters=conv.parameters())
        out.sum().backward()
        assert torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))
        torch.testing.assert_close(out, shortcut, atol=0, rtol=0)
        out = dynroute.gated_residual(shortcut, residual, x, gate, parameters=conv.parameters())  # not training
        assert not out.requires_grad

    def test_bad_arguments(self):
        _, x, shortcut, residual, _ = self._parts()
        with pytest.raises(ValueError, match="execution must be one of"):
            dynroute.gated_residual(shortcut, residual, x, torch.ones(6), execution="lazy")
        with pytest.raises(ValueError, match=r"one value per sample, shape \(6,\), but got \(3,\)"):
            dynroute.gated_residual(shortcut, residual, x, torch.ones(3))


class TestTrainMode:
    """Train mode computes Eq. 7 with relaxed gates; stage 2 uses hard decisions."""

    def test_relaxed_forward_is_eq7(self):
        original = CifarBasicBlock(8, 16, stride=2, shortcut="B")
        x = _inputs(6, (8, 8, 8))
        gated = _random_router(GatedBlock(copy.deepcopy(original)), x).train()
        out = gated(x)
        v = gated.last_gate
        assert ((v > 0) & (v < 1)).all()
        # Eq. 7 from the original block's own modules, with batch statistics as in training.
        original.train()
        residual = original.bn2(original.conv2(torch.relu(original.bn1(original.conv1(x)))))
        expected = torch.relu(original.shortcut(x) + v.detach().view(-1, 1, 1, 1) * residual)
        torch.testing.assert_close(out.detach(), expected.detach(), atol=1e-5, rtol=1e-5)

    def test_gates_carry_gradients_to_the_router(self):
        gated = GatedBlock(CifarBasicBlock(8, 8)).train()
        gated(torch.randn(4, 8, 8, 8)).sum().backward()
        assert gated.router.fc2.bias.grad is not None and gated.router.fc2.bias.grad.abs().sum() > 0

    def test_hard_decisions_in_training_use_argmax_and_train_the_branch(self):
        x = _inputs(16, (8, 8, 8))
        gated = _random_router(GatedBlock(CifarBasicBlock(8, 8)), x).train()
        gated.hard_decisions = True
        gated(x).sum().backward()
        torch.testing.assert_close(gated.last_gate, dynroute.hard_gate(gated.last_logits))
        assert gated.conv1.weight.grad.abs().sum() > 0

    def test_a_single_routed_sample_in_training_runs_masked(self):
        # Batch norm in training needs more than one value per channel: one routed row of a 2x2 input to a
        # stride-2 block is 1x1 inside the branch. The branch then runs on the whole batch, as masked execution.
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        block = timm_resnet.BasicBlock(8, 16, stride=2, downsample=downsample)
        gated = {execution: GatedBlock(copy.deepcopy(block)).train() for execution in ("sparse", "masked")}
        x = _inputs(5, (8, 2, 2))
        for execution, module in gated.items():
            module.hard_decisions = True
            module.set_execution(execution)
            nn.init.zeros_(module.router.fc2.weight)
            module.router.fc2.bias.data = torch.tensor([10.0, 0.0])  # every sample skips ...
        outputs = {}
        for execution, module in gated.items():
            with torch.no_grad():  # ... but the third, by a bias on its channel means
                module.router.fc1.weight.zero_()
                module.router.fc1.bias.zero_()
                module.router.fc1.weight[0, 0] = 1.0
                module.router.fc2.weight[1, 0] = 100.0
            x_routed = x.clone()
            x_routed[:, 0] = 0
            x_routed[2, 0] = 1.0
            outputs[execution] = module(x_routed)
            assert module.last_gate.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
        torch.testing.assert_close(outputs["sparse"], outputs["masked"], atol=1e-6, rtol=0)
        torch.testing.assert_close(gated["sparse"].bn1.running_var, gated["masked"].bn1.running_var)
        outputs["sparse"].sum().backward()
        assert gated["sparse"].conv1.weight.grad.abs().sum() > 0


class TestValidation:
    """Clear errors for unsupported blocks, bad inputs and bad settings."""

    def test_unregistered_block_is_refused(self):
        with pytest.raises(TypeError, match="register_block"):
            GatedBlock(nn.Conv2d(3, 3, 1))

    def test_non_4d_input_is_refused(self):
        with pytest.raises(ValueError, match="unsqueeze"):
            GatedBlock(CifarBasicBlock(8, 8))(torch.randn(8, 8, 8))

    def test_bad_forced_gate_and_execution(self):
        gated = GatedBlock(CifarBasicBlock(8, 8))
        with pytest.raises(ValueError, match="'open', 'closed', a tensor of decisions or None"):
            gated.force_gate("half")
        with pytest.raises(ValueError, match="1-D bool or integer tensor"):
            gated.force_gate(torch.ones(4))
        gated.force_gate(torch.ones(4, dtype=torch.bool))
        with pytest.raises(ValueError, match="hold 4 samples but the batch has 2"):
            gated(torch.randn(2, 8, 8, 8))
        with pytest.raises(ValueError, match="execution"):
            gated.set_execution("lazy")

    def test_state_dict_keys_are_the_blocks_plus_router(self):
        block = CifarBasicBlock(8, 16, stride=2, shortcut="B")
        block_keys = set(block.state_dict())
        keys = set(GatedBlock(block).state_dict())
        assert {k for k in keys if not k.startswith("router.")} == block_keys
        assert any(k.startswith("router.") for k in keys)


class TestSharedChildren:
    """The wrapped block's children, parameters and buffers are the GatedBlock's: replacing one takes effect."""

    def test_replaced_child_is_the_one_that_runs(self):
        original = tv_resnet.BasicBlock(8, 8).eval()
        _perturb_batchnorm(original)
        gated = GatedBlock(copy.deepcopy(original)).eval()
        gated.force_gate("open")
        gated.bn1 = nn.Identity()
        original.bn1 = nn.Identity()
        x = _inputs(3, (8, 6, 6))
        with torch.no_grad():
            torch.testing.assert_close(gated(x), original(x), atol=1e-6, rtol=0)
        assert gated.block.bn1 is gated.bn1

    def test_sync_batchnorm_conversion_reaches_the_blocks(self):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
        ran = []
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(lambda m, args: ran.append(type(m)))
        with torch.no_grad():
            dynroute.force_gates(model, "open")
            model(torch.randn(2, 3, 32, 32))
        assert len(ran) == 19 and set(ran) == {nn.SyncBatchNorm}

    def test_parameters_and_buffers_of_the_block_itself_are_kept(self):
        class ScaledBlock(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(4, 4, 3, padding=1)
                self.scale = nn.Parameter(torch.tensor(2.0))
                self.register_buffer("offset", torch.tensor(0.5))

            def forward(self, x):
                return torch.relu(self.scale * self.conv(x) + self.offset + x)

        dynroute.register_block(
            ScaledBlock,
            dynroute.BlockAdapter(
                residual=lambda b, x: b.scale * b.conv(x) + b.offset,
                shortcut=lambda b, x: x,
                activation=lambda b, x: torch.relu(x),
                in_channels=lambda b: b.conv.in_channels,
            ),
        )
        original = ScaledBlock()
        gated = GatedBlock(copy.deepcopy(original)).double()
        assert {"scale", "offset"} <= set(gated.state_dict())
        assert gated.block.scale.dtype == gated.block.offset.dtype == torch.float64
        gated.force_gate("open")
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(gated(x), original.double()(x))


class TestRegistry:
    """A user can teach the converter a new block type."""

    def test_register_a_custom_block(self):
        class TinyBlock(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(4, 4, 3, padding=1)

            def forward(self, x):
                return torch.relu(self.conv(x) + x)

        dynroute.register_block(
            TinyBlock,
            dynroute.BlockAdapter(
                residual=lambda b, x: b.conv(x),
                shortcut=lambda b, x: x,
                activation=lambda b, x: torch.relu(x),
                in_channels=lambda b: b.conv.in_channels,
            ),
        )
        original = TinyBlock()
        gated = GatedBlock(copy.deepcopy(original)).eval()
        gated.force_gate("open")
        x = torch.randn(2, 4, 5, 5)
        torch.testing.assert_close(gated(x), original(x))

    def test_registry_refuses_wrong_arguments(self):
        with pytest.raises(TypeError, match="nn.Module subclass"):
            dynroute.register_block("Block", None)
        with pytest.raises(TypeError, match="BlockAdapter"):
            dynroute.register_block(nn.Conv2d, lambda b, x: x)
