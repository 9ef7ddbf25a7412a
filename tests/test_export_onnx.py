"""export_onnx: each If branch gets the weights only it reads and unread weights go; bad programs are refused."""

import pytest
import torch
from torch import nn

import dynroute
from dynroute.export import onnx_model

onnx = pytest.importorskip("onnx", reason="export_onnx needs the optional extra: pip install 'dynroute[export]'")
helper = onnx.helper


def _initializer(name: str) -> onnx.TensorProto:
    return helper.make_tensor(name, onnx.TensorProto.FLOAT, [1], [1.0])


def _branch(name: str, reads: list[str]) -> onnx.GraphProto:
    """A branch graph whose one Sum node reads ``reads`` from the enclosing graph."""
    output = helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [1])
    return helper.make_graph([helper.make_node("Sum", reads, [f"{name}_out"])], name, [], [output])


class TestMoveBranchWeights:
    """Against a hand-made graph: where each initializer ends up is known in advance."""

    @pytest.fixture
    def graph(self) -> onnx.GraphProto:
        # "then_only" and "else_only" are read by one branch each, "both" by both branches of the If,
        # "main" by a node of the main graph, "nested" by an If inside the then branch, and "unread" by nothing.
        inner_then, inner_else = _branch("inner_then", ["nested"]), _branch("inner_else", ["x"])
        inner = helper.make_node("If", ["flag"], ["inner_out"], then_branch=inner_then, else_branch=inner_else)
        then_branch = _branch("then", ["then_only", "both"])
        then_branch.node.append(inner)
        node = helper.make_node(
            "If", ["flag"], ["y"], then_branch=then_branch, else_branch=_branch("else", ["else_only", "both"])
        )
        flag = helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])
        x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        z = helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1])
        names = ["then_only", "else_only", "both", "main", "nested", "unread"]
        return helper.make_graph(
            [node, helper.make_node("Sum", ["x", "main"], ["z"])],
            "main",
            [flag, x],
            [y, z],
            initializer=[_initializer(name) for name in names],
        )

    def test_each_initializer_moves_to_its_only_reader_and_unread_ones_go(self, graph):
        assert onnx_model._place_weights(graph) == (3, 1)
        branches = {attribute.name: attribute.g for attribute in graph.node[0].attribute}
        assert {tensor.name for tensor in graph.initializer} == {"both", "main"}
        assert {tensor.name for tensor in branches["then_branch"].initializer} == {"then_only", "nested"}
        assert {tensor.name for tensor in branches["else_branch"].initializer} == {"else_only"}
        onnx.checker.check_graph(graph)

    def test_a_second_pass_moves_nothing(self, graph):
        onnx_model._place_weights(graph)
        assert onnx_model._place_weights(graph) == (0, 0)


class TestRefused:
    def test_without_the_extra(self, monkeypatch):
        monkeypatch.setattr(onnx_model, "find_spec", lambda name: None if name == "onnxscript" else object())
        with pytest.raises(ImportError, match=r"\['onnxscript'\].*dynroute\[export\]"):
            dynroute.export_onnx(None, "model.onnx")

    def test_a_program_of_three_outputs(self, tmp_path):
        class ThreeOutputs(nn.Module):
            def forward(self, x):
                return x, x + 1, x + 2

        program = torch.export.export(ThreeOutputs(), (torch.zeros(1, 3, 4, 4),))
        with pytest.raises(ValueError, match="logits, or logits and paths, but it returns 3 outputs"):
            dynroute.export_onnx(program, tmp_path / "model.onnx")
