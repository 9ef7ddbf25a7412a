"""optimize_onnx: ONNX Runtime's CPU model with NCHWc carried across the If nodes gives the eager logits and paths."""

import pytest
import torch
from routed_models import centre_routers, eager_reference, images

import dynroute
from dynroute.models import CifarResNet

onnx = pytest.importorskip("onnx", reason="optimize_onnx needs the optional extra: pip install 'dynroute[export]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="optimize_onnx needs onnxruntime")
pytest.importorskip("onnxscript", reason="export_onnx needs onnxscript")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A converted CIFAR ResNet-8 with 1x1-convolution shortcuts whose routers disagree between images."""
    torch.manual_seed(0)
    model = dynroute.convert_resnet(CifarResNet(1, shortcut="B"), input_size=(3, 32, 32)).eval()
    return centre_routers(model, images(64, seed=100))


@pytest.fixture(scope="module")
def reference(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, and the eager eval model's logits and paths on them (sparse execution)."""
    return eager_reference(model)


def optimized_session(program, folder) -> tuple[onnxruntime.InferenceSession, onnx.GraphProto]:
    """A session of ``program``'s ONNX model optimised by optimize_onnx, loaded with optimisations off."""
    dynroute.export_onnx(program, folder / "routed.onnx")
    dynroute.optimize_onnx(folder / "routed.onnx", folder / "routed.cpu.onnx")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(folder / "routed.cpu.onnx", options, providers=["CPUExecutionProvider"])
    return session, onnx.load(folder / "routed.cpu.onnx").graph


def branches(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    return [attribute.g for node in graph.node if node.op_type == "If" for attribute in node.attribute]


class TestOptimizeOnnx:
    def test_single_image_graph(self, model, reference, tmp_path):
        x, logits, paths = reference
        program = dynroute.export_skipping_program(model, x[:1], dynamic_batch=False, with_paths=True)
        session, graph = optimized_session(program, tmp_path)
        for i in range(len(x)):
            got_logits, got_paths = session.run(None, {"images": x[i : i + 1].numpy()})
            torch.testing.assert_close(torch.from_numpy(got_logits), logits[i : i + 1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.from_numpy(got_paths), paths[i : i + 1], rtol=0, atol=0)
        if not any(node.domain == "com.microsoft.nchwc" for node in graph.node):
            pytest.skip("ONNX Runtime uses no NCHWc layout on this CPU: nothing to carry")
        # Each branch reads and returns NCHWc: no conversion, and the routed branch's shortcut sum and ReLU are
        # fused into its last convolution.
        blocks = len(list(dynroute.gated_blocks(model)))
        assert len(branches(graph)) == 2 * blocks
        for branch in branches(graph):
            assert {node.op_type for node in branch.node} <= {"Conv", "Relu"}
            last = branch.node[-1]
            if last.op_type == "Conv":
                assert last.domain == "com.microsoft.nchwc" and len(last.input) == 4
                assert onnx.helper.get_attribute_value(last.attribute[-1]) == b"Relu"
        assert sum(node.op_type == "ReorderOutput" for node in graph.node) == 0  # the head pools NCHWc too

    def test_any_batch_graph(self, model, reference, tmp_path):
        x, logits, paths = reference
        program = dynroute.export_skipping_program(model, x[:2], with_paths=True)
        session, _ = optimized_session(program, tmp_path)
        for size in (1, 5, 12):
            got_logits, got_paths = session.run(None, {"images": x[:size].numpy()})
            torch.testing.assert_close(torch.from_numpy(got_logits), logits[:size], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(torch.from_numpy(got_paths), paths[:size], rtol=0, atol=0)

    def test_dense_graph(self, reference, tmp_path):
        torch.manual_seed(1)
        dense = CifarResNet(1, shortcut="B").eval()
        x = reference[0]
        with torch.no_grad():
            logits = dense(x)
        program = torch.export.export(dense, (x[:1],), strict=False)
        session, _ = optimized_session(program, tmp_path)
        got = torch.cat([torch.from_numpy(session.run(None, {"images": one.numpy()})[0]) for one in x.split(1)])
        torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)
