"""channels_last inputs and weights stay channels_last through gated blocks, in every execution path."""

import pytest
import torch
from routed_models import centre_routers, images, routed_model

import dynroute


def _is_channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


class TestChannelsLast:
    """Block outputs keep the memory format and the values of the NCHW model."""

    @pytest.mark.parametrize(
        "mode", ["eval-sparse", "eval-masked", "train-relaxed", "train-hard-sparse"], ids=lambda mode: mode
    )
    def test_block_outputs(self, mode):
        model = routed_model()
        reference = routed_model()
        for m in (model, reference):
            m.train(mode.startswith("train"))
            dynroute.set_execution(m, "masked" if mode.endswith("masked") else "sparse")
            for _, block in dynroute.gated_blocks(m):
                block.hard_decisions = mode == "train-hard-sparse"
        x = images(8)
        if mode == "train-hard-sparse":  # batch statistics move the decisions: centre the routers on them
            for m in (model, reference):
                torch.manual_seed(4)
                centre_routers(m, x)
        model.to(memory_format=torch.channels_last)
        outputs = {}
        for name, block in dynroute.gated_blocks(model):
            block.register_forward_hook(lambda module, args, output, name=name: outputs.__setitem__(name, output))
        torch.manual_seed(3)
        out = model(x.to(memory_format=torch.channels_last))
        paths = dynroute.routing_paths(model)
        torch.manual_seed(3)
        expected = reference(x)
        if mode != "train-relaxed":
            mixed = ((paths > 0) & (paths < 1)) | ((paths.sum(0) > 0) & (paths.sum(0) < len(x)))
            assert mixed.any(), "some block should run for part of the batch"
        for name, output in outputs.items():
            assert _is_channels_last(output), f"{name} returned a {output.stride()}-strided tensor"
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    def test_unhooked_stages_in_inference(self):
        # Without hooks and autograd a stage's blocks write into their inputs and scatter through NHWC views.
        model, reference = routed_model(blocks_per_stage=3), routed_model(blocks_per_stage=3)
        model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            x = reference.act(reference.bn1(reference.conv1(images(64, seed=100)[:16])))  # the routers' stem outputs
            out = model.layer1(x.to(memory_format=torch.channels_last))
            paths = dynroute.routing_paths(model.layer1)
            expected = reference.layer1(x)
            expected_paths = dynroute.routing_paths(reference.layer1)
        assert ((paths.sum(0) > 0) & (paths.sum(0) < len(x))).any(), "some block should run for part of the batch"
        assert torch.equal(paths, expected_paths)
        assert _is_channels_last(out)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
