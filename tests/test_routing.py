import pytest
import torch

import dynroute


class TestRoutingPaths:
    """routing_paths reads the gates of the last forward, in block order."""

    def _model(self):
        return dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))

    def test_eval_paths_are_hard_and_train_paths_relaxed_with_gradients(self):
        model = self._model().eval()
        model(torch.randn(3, 3, 32, 32))
        paths = dynroute.routing_paths(model)
        assert paths.shape == (3, 9) and set(paths.unique().tolist()) <= {0.0, 1.0}
        model.train()
        model(torch.randn(3, 3, 32, 32))
        paths = dynroute.routing_paths(model)
        assert paths.requires_grad and ((paths > 0) & (paths < 1)).all()
        assert dynroute.routing_logits(model).shape == (3, 9, 2)

    def test_paths_follow_block_order(self):
        model = self._model().eval()
        dict(dynroute.gated_blocks(model))["layer2.0"].force_gate("closed")
        model(torch.randn(2, 3, 32, 32))
        assert dynroute.routing_paths(model)[:, 3].eq(0).all()

    def test_before_any_forward_is_an_error(self):
        with pytest.raises(RuntimeError, match="call model\\(x\\) first"):
            dynroute.routing_paths(self._model())

    def test_unconverted_model_is_an_error(self):
        with pytest.raises(TypeError, match="convert it first"):
            dynroute.routing_paths(dynroute.models.resnet20())

    def test_force_gates_round_trip(self):
        model = self._model().eval()
        x = torch.randn(2, 3, 32, 32)
        dynroute.force_gates(model, "closed")
        model(x)
        assert dynroute.routing_paths(model).eq(0).all()
        dynroute.force_gates(model, None)
        assert all(block.forced_gate is None for _, block in dynroute.gated_blocks(model))
