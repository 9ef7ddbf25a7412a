"""export_skipping_program: one torch.cond per gated block, and a skipped block's convolutions do not run.

Every check compares against the eager routed model (its logits and paths) or the unconverted network.
"""

import importlib.util

import pytest
import torch
from routed_models import RowCountBlock, centre_routers, eager_reference, images
from torch import Tensor, nn

import dynroute
from dynroute.export.onnx_model import _outer_names as _outer
from dynroute.models import CifarResNet

# The residual branch of a CIFAR basic block holds two convolutions.
BRANCH_CONVOLUTIONS = 2


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A converted CIFAR ResNet-8 with 1x1-convolution shortcuts (option B) whose routers disagree between images."""
    torch.manual_seed(0)
    model = dynroute.convert_resnet(CifarResNet(1, shortcut="B"), input_size=(3, 32, 32)).eval()
    return centre_routers(model, images(64, seed=100))


@pytest.fixture(scope="module")
def reference(model) -> tuple[Tensor, Tensor, Tensor]:
    """Images, and the eager eval model's logits and paths on them (sparse execution)."""
    return eager_reference(model)


@pytest.fixture(scope="module")
def single_image(model, reference) -> torch.export.ExportedProgram:
    return dynroute.export_skipping_program(model, reference[0][:1], dynamic_batch=False, with_paths=True)


@pytest.fixture(scope="module")
def any_batch(model, reference) -> torch.export.ExportedProgram:
    return dynroute.export_skipping_program(model, reference[0][:2], with_paths=True)


def convolution_rows(module: nn.Module, x: Tensor) -> tuple[list[int], tuple[Tensor, Tensor]]:
    """The batch size of every convolution that runs in ``module(x)``, in order, and the outputs."""
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as profile:
        outputs = module(x)
    # aten::_convolution is the op that computes: one per convolution run
    rows = [event.input_shapes[0][0] for event in profile.events() if event.name == "aten::_convolution"]
    return rows, outputs


def dense_convolutions(model: nn.Module) -> int:
    """Convolutions the unconverted network runs on one image: the reference for a path that runs every block."""
    torch.manual_seed(0)
    rows, _ = convolution_rows(CifarResNet(1, shortcut="B").eval(), torch.randn(1, 3, 32, 32))
    return len(rows)


def top_level_calls(program: torch.export.ExportedProgram) -> list[object]:
    """The ops the program's top graph calls (a cond's branches are graphs of their own)."""
    return [node.target for node in program.graph.nodes if node.op == "call_function"]


class TestSingleImage:
    """A fixed batch of one: each block's branch for a routed image is the plain block."""

    def test_same_logits_and_paths_as_eager(self, single_image, reference):
        x, logits, paths = reference
        module = single_image.module()
        for i in range(len(x)):
            with torch.inference_mode():
                got_logits, got_paths = module(x[i : i + 1])
            torch.testing.assert_close(got_logits, logits[i : i + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_paths, paths[i : i + 1], rtol=0, atol=0)

    def test_skipped_blocks_run_no_convolution(self, model, single_image, reference):
        x, _, paths = reference
        dense = dense_convolutions(model)
        module = single_image.module()
        for i in range(len(x)):
            rows, _ = convolution_rows(module, x[i : i + 1])
            skipped = int((paths[i] == 0).sum())
            assert len(rows) == dense - BRANCH_CONVOLUTIONS * skipped, f"image {i}, path {paths[i].tolist()}"

    def test_one_cond_per_gated_block_and_branches_inside(self, model, single_image):
        blocks = len(list(dynroute.gated_blocks(model)))
        calls = top_level_calls(single_image)
        assert calls.count(torch.ops.higher_order.cond) == blocks
        # Outside the conds: the stem and the two downsampling shortcuts, which always run.
        assert sum("conv" in str(target) for target in calls) == 3

    def test_batch_is_fixed_to_one(self, single_image, reference):
        with pytest.raises(Exception, match="batch|shape|size|dim"):
            single_image.module()(reference[0][:2])

    def test_logits_only(self, model, reference):
        x, logits, _ = reference
        program = dynroute.export_skipping_program(model, x[:1], dynamic_batch=False)
        with torch.inference_mode():
            got = program.module()(x[:1])
        assert isinstance(got, Tensor)
        torch.testing.assert_close(got, logits[:1], rtol=1e-5, atol=1e-5)

    def test_saved_and_loaded(self, single_image, reference, tmp_path):
        x, logits, paths = reference
        torch.export.save(single_image, tmp_path / "routed.pt2")
        with torch.inference_mode():
            got_logits, got_paths = torch.export.load(tmp_path / "routed.pt2").module()(x[:1])
        torch.testing.assert_close(got_logits, logits[:1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_paths, paths[:1], rtol=0, atol=0)


class TestAnyBatch:
    """A dynamic batch: each block gathers its routed rows, runs its branch on them and adds them back."""

    @pytest.mark.parametrize("size", [1, 3, 12])
    def test_same_logits_and_paths_as_eager(self, any_batch, reference, size):
        x, logits, paths = reference
        with torch.inference_mode():
            got_logits, got_paths = any_batch.module()(x[:size])
        torch.testing.assert_close(got_logits, logits[:size], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_paths, paths[:size], rtol=0, atol=0)

    @pytest.mark.parametrize("routed", ["none", "all"])
    def test_blocks_no_image_or_every_image_runs(self, any_batch, reference, routed):
        x, logits, paths = reference
        block = 1
        rows = paths[:, block] == (1 if routed == "all" else 0)
        assert rows.sum() >= 2
        with torch.inference_mode():
            got_logits, got_paths = any_batch.module()(x[rows])
        torch.testing.assert_close(got_logits, logits[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_paths, paths[rows], rtol=0, atol=0)

    def test_branches_run_on_the_routed_rows_only(self, any_batch, reference):
        x, _, paths = reference
        rows, _ = convolution_rows(any_batch.module(), x)
        routed = [int(count) for count in paths.sum(0)]
        # stem; block 1: its branch's two convolutions; blocks 2 and 3: the shortcut on every row, then the branch
        expected = [len(x), *[routed[0]] * 2]
        for count in routed[1:]:
            expected += [len(x), count, count]
        assert sorted(rows) == sorted(expected)

    def test_one_image_example(self, model, reference):
        x, logits, paths = reference
        program = dynroute.export_skipping_program(model, x[:1], with_paths=True)
        with torch.inference_mode():
            got_logits, got_paths = program.module()(x[:5])
        torch.testing.assert_close(got_logits, logits[:5], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_paths, paths[:5], rtol=0, atol=0)


@pytest.fixture(scope="module")
def static_model() -> nn.Module:
    """The ResNet-8 converted with StaticRouter: the first and last blocks run for every image, the middle one never."""
    torch.manual_seed(0)
    model = dynroute.convert_resnet(
        CifarResNet(1, shortcut="B"), input_size=(3, 32, 32), router_layer=dynroute.StaticRouter
    ).eval()
    with torch.no_grad():
        for (_, block), run in zip(dynroute.gated_blocks(model), (True, False, True)):
            block.router.logits.copy_(torch.tensor([0.0, 1.0 if run else -1.0]))
    return model


class TestStaticRouter:
    """A StaticRouter's logits do not depend on the image; its decision is traced like a Router's."""

    @pytest.mark.parametrize("dynamic_batch", [False, True])
    def test_same_logits_and_paths_as_eager(self, static_model, dynamic_batch):
        x = images(4, seed=5)
        example = x[:2] if dynamic_batch else x[:1]
        program = dynroute.export_skipping_program(static_model, example, dynamic_batch, with_paths=True)
        with torch.no_grad():
            logits = static_model(x)
        paths = dynroute.routing_paths(static_model)
        module = program.module()
        with torch.inference_mode():  # the whole batch at once, or one image per call
            got = [module(chunk) for chunk in ((x,) if dynamic_batch else x.split(1))]
        torch.testing.assert_close(torch.cat([out[0] for out in got]), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([out[1] for out in got]), paths, rtol=0, atol=0)

    def test_skipped_block_runs_no_convolution(self, static_model):
        program = dynroute.export_skipping_program(static_model, images(1), dynamic_batch=False)
        rows, _ = convolution_rows(program.module(), images(1, seed=6))
        assert len(rows) == dense_convolutions(static_model) - BRANCH_CONVOLUTIONS


class TestModelAndErrors:
    """The user's model is left as it was; gates forced on it are exported; what cannot skip is refused."""

    def test_model_is_unchanged(self, model, single_image, any_batch):
        assert not model.training
        assert all(type(block) is dynroute.GatedBlock for _, block in dynroute.gated_blocks(model))
        assert all(block.execution == "sparse" for _, block in dynroute.gated_blocks(model))
        assert type(model.layer1) is dynroute.GatedSequential

    @pytest.mark.parametrize("state", ["open", "closed"])
    def test_forced_gates(self, model, reference, state):
        x = reference[0][:3]
        try:
            dynroute.force_gates(model, state)
            with torch.no_grad():
                expected = model(x)
            program = dynroute.export_skipping_program(model, x, with_paths=True)
        finally:
            dynroute.force_gates(model, None)
        with torch.inference_mode():
            logits, paths = program.module()(x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert paths.eq(float(state == "open")).all()

    def test_forced_decisions_per_image(self, model, reference):
        x, _, paths = reference
        forced = 1 - paths[:4]  # the opposite of what the routers decide
        try:
            dynroute.force_gates(model, forced.bool())
            with torch.no_grad():
                expected = model(x[:4])
            program = dynroute.export_skipping_program(model, x[:4], dynamic_batch=False, with_paths=True)
        finally:
            dynroute.force_gates(model, None)
        with torch.inference_mode():
            logits, got_paths = program.module()(x[:4])
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_paths, forced, rtol=0, atol=0)

    def test_branch_that_depends_on_the_row_count(self):
        model = dynroute.convert_resnet(nn.Sequential(RowCountBlock(), RowCountBlock()), input_size=(4, 8, 8)).eval()
        x = torch.randn(3, 4, 8, 8)
        with pytest.raises(RuntimeError, match=r"dynamic_batch=False.*export_masked_program"):
            dynroute.export_skipping_program(model, x)
        program = dynroute.export_skipping_program(model, x[:1], dynamic_batch=False)
        with torch.inference_mode():
            torch.testing.assert_close(program.module()(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-5)

    def test_unbatched_example(self, model):
        with pytest.raises(ValueError, match=r"example_inputs must be a batch \(N, C, H, W\), but got \(3, 32, 32\)"):
            dynroute.export_skipping_program(model, torch.zeros(3, 32, 32))

    def test_unconverted_model(self):
        with pytest.raises(TypeError, match="convert it first"):
            dynroute.export_skipping_program(CifarResNet(1), torch.zeros(1, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="ONNX export needs the optional extra: pip install 'dynroute[export]' (onnx, onnxscript, onnxruntime)",
)
class TestOnnx:
    """export_onnx gives one If per gated block, and ONNX Runtime gives the eager logits and paths."""

    @staticmethod
    def session(program, path):
        import onnxruntime

        dynroute.export_onnx(program, path)
        return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def test_single_image(self, model, single_image, reference, tmp_path):
        import onnx

        x, logits, paths = reference
        session = self.session(single_image, tmp_path / "routed.onnx")
        for i in range(len(x)):
            got_logits, got_paths = session.run(None, {"images": x[i : i + 1].numpy()})
            torch.testing.assert_close(torch.from_numpy(got_logits), logits[i : i + 1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.from_numpy(got_paths), paths[i : i + 1], rtol=0, atol=0)
        graph = onnx.load(tmp_path / "routed.onnx").graph
        blocks = len(list(dynroute.gated_blocks(model)))
        assert sum(node.op_type == "If" for node in graph.node) == blocks
        assert sum(node.op_type == "Conv" for node in graph.node) == 3  # the stem and the downsampling shortcuts
        branches = [attribute.g for node in graph.node if node.op_type == "If" for attribute in node.attribute]
        assert sum(node.op_type == "Conv" for branch in branches for node in branch.node) == 2 * blocks
        # The branches' convolution weights are their own constants, not values of the main graph.
        main_initializers = {tensor.name for tensor in graph.initializer}
        for branch in branches:
            for node in branch.node:
                if node.op_type == "Conv":
                    assert node.input[1] not in main_initializers
                    assert node.input[1] in {tensor.name for tensor in branch.initializer}

    def test_any_batch(self, any_batch, reference, tmp_path):
        x, logits, paths = reference
        session = self.session(any_batch, tmp_path / "routed.onnx")
        for size in (1, 5, 12):
            got_logits, got_paths = session.run(None, {"images": x[:size].numpy()})
            torch.testing.assert_close(torch.from_numpy(got_logits), logits[:size], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.from_numpy(got_paths), paths[:size], rtol=0, atol=0)

    @pytest.mark.parametrize("dynamic_batch", [False, True])
    def test_static_router(self, static_model, dynamic_batch, tmp_path):
        import onnx

        x = images(4, seed=5)
        program = dynroute.export_skipping_program(
            static_model, x[:2] if dynamic_batch else x[:1], dynamic_batch, with_paths=True
        )
        session = self.session(program, tmp_path / "static.onnx")
        with torch.no_grad():
            logits = static_model(x)
        paths = dynroute.routing_paths(static_model)
        outputs = [session.run(None, {"images": chunk.numpy()}) for chunk in ((x,) if dynamic_batch else x.split(1))]
        got_logits = torch.cat([torch.from_numpy(out[0]) for out in outputs])
        torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.cat([torch.from_numpy(out[1]) for out in outputs]), paths, rtol=0, atol=0)
        # At batch 1 the exporter folds each If on the constant decision; the skipped branch's weights go with it.
        graph = onnx.load(tmp_path / "static.onnx").graph
        read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
        read |= {
            name
            for node in graph.node
            for branch in node.attribute
            if branch.type == onnx.AttributeProto.GRAPH
            for name in _outer(branch.g)
        }
        assert all(tensor.name in read for tensor in graph.initializer), "no weight that nothing reads"
