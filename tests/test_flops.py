import copy
import warnings

import numpy as np
import pytest
import timm
import torch
from torch import nn

import dynroute

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from fvcore.nn import FlopCountAnalysis


def _fvcore_total(model: nn.Module, input_size: tuple[int, ...]) -> int:
    analysis = FlopCountAnalysis(copy.deepcopy(model).eval(), torch.zeros(1, *input_size))
    analysis.unsupported_ops_warnings(False)
    return analysis.total()


class TestMacsTable:
    """The MAC table against fvcore on the unconverted model and against hand counts."""

    @pytest.mark.parametrize(
        "build, input_size",
        [
            (dynroute.models.resnet20, (3, 32, 32)),
            (lambda: dynroute.models.resnet32(shortcut="B"), (3, 32, 32)),
            (lambda: timm.create_model("resnet26d"), (3, 96, 96)),
        ],
    )
    def test_dense_macs_equal_the_unconverted_model(self, build, input_size):
        original = build()
        table = dynroute.macs_table(dynroute.convert_resnet(copy.deepcopy(original), input_size=input_size))
        assert table.dense_macs == _fvcore_total(original, input_size)

    def test_cifar_block_and_router_by_hand(self):
        table = dynroute.macs_table(dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)))
        # layer1 block: two 3x3 convs 16 -> 16 on 32x32, and two affine batch norms (2 flops per element).
        conv = 16 * 16 * 9 * 32 * 32
        batch_norm = 2 * 16 * 32 * 32
        assert table.block_macs[0] == 2 * conv + 2 * batch_norm
        # router of layer1: pooling reads 16 x 32 x 32 values, fc1 16 -> 16, fc2 16 -> 2 (no bias counted).
        assert table.router_macs[0] == 16 * 32 * 32 + 16 * 16 + 16 * 2
        assert table.block_input_shapes[0] == (16, 32, 32)
        assert table.block_input_shapes[-1] == (64, 8, 8)
        assert table.block_names[:2] == ("layer1.0", "layer1.1")

    def test_closed_network_is_the_fixed_part(self):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        table = dynroute.macs_table(model)
        assert table.fixed_macs == table.base_macs + sum(table.router_macs)
        assert table.fixed_cost() == pytest.approx(table.fixed_macs / table.dense_macs)
        assert table.block_costs().sum().item() == pytest.approx(1 - table.base_macs / table.dense_macs, rel=1e-6)

    def test_measuring_does_not_change_the_model(self):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)).train()
        blocks = dict(dynroute.gated_blocks(model))
        blocks["layer2.1"].force_gate("closed")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        dynroute.build_macs_table(model, (3, 48, 48))
        assert model.training and blocks["layer2.1"].forced_gate == "closed"
        assert blocks["layer1.0"].forced_gate is None and blocks["layer1.0"].last_gate is None
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key])

    def test_format_lists_every_block_and_the_totals(self):
        table = dynroute.macs_table(dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)))
        text = str(table)
        assert all(name in text for name in table.block_names)
        assert f"{table.dense_macs:,}" in text
        # The MAC column lines up on every row, block rows and totals alike.
        macs_ends = {
            line.index(f"{macs:,}") + len(f"{macs:,}")
            for line, macs in zip(
                text.splitlines()[1:], [*table.block_macs, table.base_macs, table.dense_macs, table.fixed_macs]
            )
        }
        assert len(macs_ends) == 1 and text.splitlines()[0].index("MACs") + 4 in macs_ends

    def test_bad_input_size_and_unconverted_model(self):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        with pytest.raises(ValueError, match=r"\(C, H, W\)"):
            dynroute.build_macs_table(model, (32, 32))
        with pytest.raises(TypeError, match="convert_resnet"):
            dynroute.macs_table(dynroute.models.resnet20())
        with pytest.raises(TypeError, match="no gated blocks"):
            dynroute.build_macs_table(dynroute.models.resnet20(), (3, 32, 32))

    @pytest.mark.parametrize(
        "input_size",
        [torch.Size([3, 16, 16]), [3, 16, 16], (3, np.int64(16), torch.tensor(16))],
        ids=["torch-size", "list", "numpy-and-tensor-ints"],
    )
    def test_integer_like_input_sizes_measure_as_ints(self, input_size):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        table = dynroute.build_macs_table(model, input_size)
        assert table.input_size == (3, 16, 16) and all(type(size) is int for size in table.input_size)
        assert table.dense_macs == dynroute.build_macs_table(model, (3, 16, 16)).dense_macs

    @pytest.mark.parametrize("input_size", [(3, 16.0, 16), (3, True, 16), (3, 0, 16), "3x16x16"])
    def test_non_integer_input_sizes_are_refused(self, input_size):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\) of positive ints"):
            dynroute.build_macs_table(model, input_size)


class TestCountMacs:
    """MACs of the dense network, against hand counts and fvcore on the unconverted model."""

    def test_toy_network_by_hand(self):
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
        )
        # conv: 4 x 3 x 3 x 3 per output pixel; pooling reads each of 4 x 8 x 6 values once; linear 4 -> 2.
        assert dynroute.count_macs(model, (3, 8, 6)) == 4 * 3 * 9 * 8 * 6 + 4 * 8 * 6 + 4 * 2

    @pytest.mark.parametrize(
        "build, input_size",
        [
            (dynroute.models.resnet20, (3, 32, 32)),
            (lambda: timm.create_model("resnet26d", num_classes=3), (3, 64, 64)),
        ],
    )
    def test_same_before_and_after_conversion(self, build, input_size):
        original = build()
        dense = dynroute.count_macs(original, input_size)
        assert dense == _fvcore_total(original, input_size)
        converted = dynroute.convert_resnet(original, input_size=input_size)
        assert dynroute.count_macs(converted, input_size) == dense == dynroute.macs_table(converted).dense_macs
        # at another size it is still the dense network, not the path a zero image happens to take
        closed = dynroute.force_gates(copy.deepcopy(converted), "closed")
        assert dynroute.count_macs(closed, (3, 48, 48)) == _fvcore_total(build(), (3, 48, 48))

    def test_the_model_is_not_changed(self):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)).train()
        before = {key: value.clone() for key, value in model.state_dict().items()}
        dynroute.count_macs(model, (3, 32, 32))
        assert model.training and all(block.last_gate is None for _, block in dynroute.gated_blocks(model))
        assert all(block.forced_gate is None for _, block in dynroute.gated_blocks(model))
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)

    def test_wrong_input_size_names_the_fix(self):
        with pytest.raises(ValueError, match=r"its first convolution takes 3, so pass \(3, H, W\)"):
            dynroute.count_macs(dynroute.models.resnet20(), (1, 32, 32))
        with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\)"):
            dynroute.count_macs(dynroute.models.resnet20(), (32, 32))
        with pytest.raises(TypeError, match="torch.nn.Module"):
            dynroute.count_macs("resnet20", (3, 32, 32))
