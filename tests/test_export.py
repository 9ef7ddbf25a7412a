"""export_masked_program: torch.export and ONNX of the eval model as the masked static graph, with its outputs."""

import importlib.util

import pytest
import torch
from routed_models import images, routed_model
from torch.torch_version import TorchVersion

import dynroute


@pytest.fixture(scope="module")
def model():
    return routed_model()


@pytest.fixture(scope="module")
def reference(model):
    """Logits and paths of the eager eval model (sparse execution) on a fixed batch."""
    x = images(8, seed=3)
    with torch.no_grad():
        logits = model(x)
    paths = dynroute.routing_paths(model)
    assert ((paths.sum(0) > 0) & (paths.sum(0) < len(x))).any(), "some block should run for part of the batch"
    return x, logits, paths


class TestTorchExport:
    """export_masked_program gives the eager eval outputs, for any batch size, and leaves the model as it was."""

    def test_same_logits_and_paths(self, model, reference):
        x, logits, paths = reference
        program = dynroute.export_masked_program(model, x[:2], with_paths=True)
        got_logits, got_paths = program.module()(x)
        torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_paths, paths, rtol=0, atol=0)
        assert all(block.execution == "sparse" for _, block in dynroute.gated_blocks(model))
        assert not model.training

    @pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.enable_grad])
    def test_router_ops_keep_their_module_names(self, model, reference, grad_mode):
        # Without autograd, eager stages call blocks and routers without nn.Module.__call__; an exported
        # graph must still name them (quantizers and unflatten select modules by these names).
        with grad_mode():
            program = dynroute.export_masked_program(model, reference[0][:2])
        stacks = [node.meta.get("nn_module_stack", {}) for node in program.graph.nodes]
        router_ops = [
            node
            for node, stack in zip(program.graph.nodes, stacks)
            if any(path.endswith(".router") for path, _ in stack.values())
        ]
        names = {path for stack in stacks for path, _ in stack.values()}
        assert len(router_ops) >= 4 * len(list(dynroute.gated_blocks(model)))
        assert {name for name, _ in dynroute.gated_blocks(model)} <= names

    def test_logits_only_and_fixed_batch(self, model, reference):
        x, logits, _ = reference
        program = dynroute.export_masked_program(model, x, dynamic_batch=False)
        torch.testing.assert_close(program.module()(x), logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(Exception, match="batch|shape|size"):
            program.module()(x[:3])

    def test_graph_is_static(self, model, reference):
        """The masked graph has no data-dependent ops: no nonzero, no index_select."""
        program = dynroute.export_masked_program(model, reference[0])
        targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert not {t for t in targets if "nonzero" in t or "index_select" in t or "index_add" in t}

    def test_sparse_execution_does_not_export(self, model, reference):
        """The eager model itself does not export: it cannot guard on how many rows a block runs on."""
        with pytest.raises(Exception, match="data-dependent|data dependent"):
            torch.export.export(model, (reference[0],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))

    def test_one_image_example_with_a_dynamic_batch(self, model, reference):
        x, logits, paths = reference
        program = dynroute.export_masked_program(model, x[:1], with_paths=True)
        got_logits, got_paths = program.module()(x[:3])
        torch.testing.assert_close(got_logits, logits[:3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_paths, paths[:3], rtol=0, atol=0)

    def test_old_name_warns_and_exports_the_masked_graph(self, model, reference):
        x, logits, _ = reference
        with pytest.warns(FutureWarning, match="export_masked_program"):
            program = dynroute.export_program(model, x[:2])
        assert "export_program" not in dynroute.__all__
        torch.testing.assert_close(program.module()(x), logits, rtol=1e-5, atol=1e-5)

    def test_bad_example(self, model):
        with pytest.raises(ValueError, match=r"example_inputs must be a batch \(N, C, H, W\), but got \(3, 32, 32\)"):
            dynroute.export_masked_program(model, torch.zeros(3, 32, 32))


@pytest.mark.slow
@pytest.mark.skipif(
    TorchVersion(torch.__version__) < (2, 5), reason="torch.onnx.export(program, dynamo=True) needs torch 2.5"
)
@pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")),
    reason="ONNX export needs the optional extra: pip install 'dynroute[export]' (onnx, onnxscript, onnxruntime)",
)
class TestOnnx:
    """The exported program converts to ONNX, and onnxruntime gives the eager eval outputs."""

    def test_onnxruntime_matches(self, model, reference, tmp_path):
        import onnxruntime

        x, logits, paths = reference
        program = dynroute.export_masked_program(model, x[:2], with_paths=True)
        dynroute.export_onnx(program, tmp_path / "model.onnx")
        session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
        got_logits, got_paths = session.run(None, {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got_logits), logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.from_numpy(got_paths), paths, rtol=0, atol=0)
