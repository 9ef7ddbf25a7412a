"""Bad input fails with a clear error that names the value and the fix (the table in docs/errors.md)."""

import copy
import os
import tempfile

import pytest
import torch
import torchvision
from routed_models import RowCountBlock, UnregisteredBlock
from torch import nn

import dynroute
from dynroute.models import CifarBasicBlock, CifarResNet


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dynroute.convert_resnet(CifarResNet(1), input_size=(3, 32, 32)).eval()


@pytest.fixture(scope="module")
def table(model):
    return dynroute.macs_table(model)


@pytest.fixture(scope="module")
def table_40(model):
    return dynroute.build_macs_table(model, (3, 40, 40))


class _Subclassed(CifarBasicBlock):
    pass


def _load_checkpoint_of(model: nn.Module, into: nn.Module) -> dict:
    """dynroute.save_checkpoint of ``model`` then dynroute.load_checkpoint of it into ``into``."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "routed.pt")
        dynroute.save_checkpoint(path, model)
        return dynroute.load_checkpoint(path, into)


def _paths(n: int = 4, width: int = 3) -> torch.Tensor:
    return torch.rand(n, width)


# (situation, call(model, table), error type, pattern naming the value and the fix)
CASES = [
    (
        "batch-not-divisible-by-views",
        lambda model, table: dynroute.consistency_loss(_paths(5), num_views=2),
        ValueError,
        r"a batch of 5 paths does not split into views of 2; .*num_views=M",
    ),
    (
        "fewer-than-2-views",
        lambda model, table: dynroute.ConsistencyLoss(num_views=1)(_paths(4)),
        ValueError,
        r"at least 2 views per sample, but got num_views=1; .*MultiViewTransform",
    ),
    (
        "diversity-one-sample",
        lambda model, table: dynroute.diversity_loss(_paths(2), num_views=2),
        ValueError,
        r"at least 2 samples in the batch, but got 1",
    ),
    (
        "cost-table-width",
        lambda model, table: dynroute.CostLoss(table)(_paths(4, width=5)),
        ValueError,
        r"paths have 5 blocks but the cost table has 3; .*dynroute.macs_table\(model\)",
    ),
    (
        "sample-macs-width",
        lambda model, table: dynroute.sample_macs(_paths(4, width=2), table),
        ValueError,
        r"paths must have shape \(N, 3\) for this table, but got \(4, 2\)",
    ),
    (
        "nan-paths",
        lambda model, table: dynroute.diversity_loss(torch.tensor([[0.5, float("nan")], [0.1, 0.2]]), 1),
        ValueError,
        r"finite gate values in \[0, 1\], but got NaN or inf; pass gates, not router logits",
    ),
    (
        "out-of-range-paths",
        lambda model, table: dynroute.CostLoss(table)(_paths() + 1.5),
        ValueError,
        r"values outside \[0, 1\]; pass gates, not router logits",
    ),
    (
        "integer-paths",
        lambda model, table: dynroute.diversity_loss(torch.ones(4, 3, dtype=torch.long), 1),
        ValueError,
        r"floating point, but got torch.int64; use paths.float\(\)",
    ),
    (
        "1d-paths",
        lambda model, table: dynroute.consistency_loss(torch.rand(8), num_views=2),
        ValueError,
        r"\(batch, n_blocks\) tensor, but got \(8,\); use dynroute.routing_paths\(model\)",
    ),
    (
        "empty-paths",
        lambda model, table: dynroute.consistency_loss(torch.rand(0, 3), num_views=2),
        ValueError,
        r"empty batch",
    ),
    (
        "empty-batch",
        lambda model, table: model(torch.zeros(0, 3, 32, 32)),
        ValueError,
        r"empty batch of shape \(0, 3, 32, 32\); .*drop_last=True",
    ),
    (
        "non-4d-input",
        lambda model, table: model(torch.zeros(3, 32, 32)),
        ValueError,
        r"batched 4D input \(N, C, H, W\), but got shape \(3, 32, 32\); .*x.unsqueeze\(0\)",
    ),
    (
        "non-4d-input-to-a-block",
        lambda model, table: model.layer1[0](torch.zeros(16, 32, 32)),
        ValueError,
        r"GatedBlock expects a batched 4D input .* \(16, 32, 32\)",
    ),
    (
        "unsupported-model",
        lambda model, table: dynroute.convert_resnet(nn.Sequential(nn.Conv2d(3, 8, 3)), input_size=(3, 8, 8)),
        TypeError,
        r"Sequential has no supported residual blocks, and no module that looks like one; .*dynroute.register_block",
    ),
    (
        "unregistered-block-types",
        lambda model, table: dynroute.convert_resnet(
            nn.Sequential(nn.Conv2d(3, 8, 3), UnregisteredBlock(8), UnregisteredBlock(8)), input_size=(3, 8, 8)
        ),
        TypeError,
        r"Sequential has no supported residual blocks; it has blocks of types dynroute does not know: "
        r"routed_models\.UnregisteredBlock \(2 blocks: '1', '2'\)\. .*dynroute\.register_block\(UnregisteredBlock, "
        r"dynroute\.BlockAdapter\(residual=",
    ),
    (
        "non-residual-network",
        lambda model, table: dynroute.convert_resnet(
            torchvision.models.DenseNet(growth_rate=4, block_config=(1,), num_init_features=8), input_size=(3, 8, 8)
        ),
        TypeError,
        r"torchvision\.models\.densenet\.DenseNet has no residual add to gate: each layer concatenates its output",
    ),
    (
        "subclassed-block",
        lambda model, table: dynroute.convert_resnet(nn.Sequential(_Subclassed(8, 8)), input_size=(8, 8, 8)),
        TypeError,
        r"block '0' is a _Subclassed, a subclass of a supported block.*dynroute.register_block",
    ),
    (
        "bare-block",
        lambda model, table: dynroute.convert_resnet(CifarBasicBlock(8, 8), input_size=(8, 8, 8)),
        TypeError,
        r"takes a whole network, but got a bare CifarBasicBlock; wrap .* dynroute.GatedBlock\(block\)",
    ),
    (
        "unsupported-block",
        lambda model, table: dynroute.GatedBlock(nn.Conv2d(3, 3, 3)),
        TypeError,
        r"no adapter is registered for Conv2d; register one with dynroute.register_block",
    ),
    (
        "convert-twice",
        lambda model, table: dynroute.convert_resnet(model, input_size=(3, 32, 32)),
        ValueError,
        r"already converted \(found a GatedBlock at 'layer1.0'\); convert the original model only once",
    ),
    (
        "paths-before-forward",
        lambda model, table: dynroute.routing_paths(dynroute.convert_resnet(CifarResNet(1), input_size=(3, 32, 32))),
        RuntimeError,
        r"blocks \['layer1.0', 'layer2.0', 'layer3.0'\] have not run yet; call model\(x\) first",
    ),
    (
        "paths-of-unconverted-model",
        lambda model, table: dynroute.routing_paths(CifarResNet(1)),
        TypeError,
        r"CifarResNet has no gated blocks; convert it first with dynroute.convert_resnet",
    ),
    (
        "no-macs-table",
        lambda model, table: dynroute.macs_table(CifarResNet(1)),
        TypeError,
        r"CifarResNet has no MAC table; .*dynroute.build_macs_table\(model, input_size\)",
    ),
    (
        "bad-cost-target",
        lambda model, table: dynroute.CostLoss(table, target=60),
        ValueError,
        r"fraction of dense MACs in \(0\.\d{3}, 1\], but got 60",
    ),
    (
        "cost-target-below-fixed-cost",
        lambda model, table: dynroute.CostLoss(table, target=0.001),
        ValueError,
        r"in \(0\.\d{3}, 1\], but got 0.001; a network that skips every block still costs 0\.\d{3} of dense",
    ),
    (
        "cost-loss-given-the-model",
        lambda model, table: dynroute.CostLoss(model, target=0.6),
        TypeError,
        r"table must be the model's MacsTable, but got the model itself; pass dynroute.macs_table\(model\)",
    ),
    (
        "codinet-paths-of-another-batch",
        lambda model, table: dynroute.CoDiNetLoss(table, num_views=2)(
            torch.randn(4, 10), torch.zeros(4, dtype=torch.long), _paths(6)
        ),
        ValueError,
        r"paths have 6 rows but logits 4; pass dynroute.routing_paths\(model\) of the forward",
    ),
    (
        "labels-not-repeated-per-view",
        lambda model, table: dynroute.CoDiNetLoss(table, num_views=2)(
            torch.randn(8, 10), torch.zeros(4, dtype=torch.long), _paths(8)
        ),
        ValueError,
        r"labels have 4 rows but logits 8; .*\(L \* M,\) = \(8,\) with each sample's label repeated for its 2 "
        r"adjacent views, as dynroute.multiview_collate returns them",
    ),
    (
        "negative-cost-weight",
        lambda model, table: dynroute.CoDiNetLoss(table, num_views=2, gamma=-0.5),
        ValueError,
        r"gamma must be >= 0, but got -0.5; a negative cost weight rewards cost",
    ),
    (
        "negative-initial-gamma",
        lambda model, table: dynroute.BudgetLoss(table, target=0.6, initial_gamma=-0.5),
        ValueError,
        r"initial_gamma must be >= 0, but got -0.5",
    ),
    (
        "routed-checkpoint-into-unconverted-model",
        lambda model, table: _load_checkpoint_of(model, CifarResNet(1)),
        TypeError,
        r"this checkpoint has routers \(keys layer1\.0\.router\.\*, .*\) but CifarResNet is not converted; "
        r"convert the model first with dynroute\.convert_resnet\(model, input_size=\.\.\.\).*then load",
    ),
    (
        "routed-state-dict-into-unconverted-model",
        lambda model, table: dynroute.load_dense_state_dict(CifarResNet(1), model.state_dict()),
        TypeError,
        r"this state_dict has routers \(keys layer1\.0\.router\.\*, .*convert the model first",
    ),
    (
        "padding-with-random-resized-crops",
        lambda model, table: dynroute.train_transform("imagefolder", image_size=64, padding=4),
        ValueError,
        r"padding=4 applies to the pad-and-crop of a dataset name, but 'imagefolder' takes random resized crops",
    ),
    (
        "bad-crop-pct",
        lambda model, table: dynroute.eval_transform(224, crop_pct=87.5),
        ValueError,
        r"crop_pct must be in \(0, 1\], but got 87.5; e.g. 0.875 for ImageNet",
    ),
    (
        "unknown-dataset-transform",
        lambda model, table: dynroute.train_transform("cifar-10"),
        ValueError,
        r"unknown dataset 'cifar-10'; train_transform knows \('cifar10', 'cifar100', 'imagefolder'\)",
    ),
    (
        "bad-forced-gate",
        lambda model, table: dynroute.force_gates(model, "half"),
        ValueError,
        r"'open', 'closed', a tensor of decisions or None, but got 'half'",
    ),
    (
        "bad-execution",
        lambda model, table: dynroute.set_execution(model, "lazy"),
        ValueError,
        r"execution must be one of \('sparse', 'masked'\), but got 'lazy'",
    ),
    (
        "bad-input-size",
        lambda model, table: dynroute.build_macs_table(model, (32, 32)),
        ValueError,
        r"input_size must be \(C, H, W\) of positive ints, but got \(32, 32\)",
    ),
    (
        "input-size-not-a-tuple",
        lambda model, table: dynroute.convert_resnet(CifarResNet(1), input_size=32),
        ValueError,
        r"input_size must be \(C, H, W\) of positive ints, but got 32; .*e.g. input_size=\(3, 32, 32\)",
    ),
    (
        "input-size-channels-last",
        lambda model, table: dynroute.convert_resnet(CifarResNet(1), input_size=(32, 32, 3)),
        ValueError,
        r"MACs of CifarResNet at input_size=\(32, 32, 3\) failed: .*channels first; its first convolution "
        r"takes 3, so pass \(3, H, W\)",
    ),
    (
        "missing-input-size",
        lambda model, table: dynroute.convert_resnet(CifarResNet(1)),
        ValueError,
        r"input_size is needed .* CifarResNet \(only timm models carry a default\); .*input_size=\(3, H, W\)\), "
        r".*e\.g\. \(3, 32, 32\) for CIFAR",
    ),
    (
        "unsupported-model-without-input-size",
        lambda model, table: dynroute.convert_resnet(nn.Sequential(nn.Conv2d(3, 8, 3))),
        TypeError,
        r"Sequential has no supported residual blocks",
    ),
    (
        "dense-checkpoint-of-another-depth",
        lambda model, table: dynroute.load_dense_state_dict(model, CifarResNet(2).state_dict()),
        ValueError,
        r"unexpected keys \['layer1.1.conv1.weight'.*same depth and width",
    ),
    (
        "export-unbatched-example",
        lambda model, table: dynroute.export_skipping_program(model, torch.zeros(3, 32, 32)),
        ValueError,
        r"example_inputs must be a batch \(N, C, H, W\), but got \(3, 32, 32\)",
    ),
    (
        "export-skipping-batch-row-count",
        lambda model, table: dynroute.export_skipping_program(
            dynroute.convert_resnet(nn.Sequential(RowCountBlock(), RowCountBlock()), input_size=(4, 8, 8)),
            torch.randn(3, 4, 8, 8),
        ),
        RuntimeError,
        r"depends on how many rows it runs on.*dynamic_batch=False.*dynroute\.export_masked_program",
    ),
]


class TestBadInput:
    """Each situation of the docs table raises its error type with a message naming the value and the fix."""

    @pytest.mark.parametrize("call, error, pattern", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
    def test_raises(self, model, table, call, error, pattern):
        with pytest.raises(error, match=pattern):
            call(model, table)

    def test_docs_table_lists_every_situation(self):
        from pathlib import Path

        docs = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
        missing = [case[0] for case in CASES if f"`{case[0]}`" not in docs]
        assert not missing, f"docs/errors.md lacks rows for {missing}"


# What counts MACs over a loader, each returning the mean cost as a fraction of dense; keywords go to the call.
LOADER_MEASURES = {
    "summary": lambda model, loader, **kw: dynroute.summary(model, loader, verbose=False, **kw).macs_fraction,
    "collect_routing": lambda model, loader, **kw: dynroute.collect_routing(model, loader, **kw).macs().fraction,
    "calibrate_budget": lambda model, loader, **kw: dynroute.calibrate_budget(model, loader, 0.5, **kw),
}


class TestInputSizeOtherThanTheTable:
    """Train at 32, test at 40: MAC counts refuse the 32-pixel table and count exactly with a 40-pixel one."""

    def test_refuses_the_table_of_another_size(self, model):
        with torch.no_grad():
            model(torch.randn(2, 3, 40, 40))
        with pytest.raises(ValueError, match=r"\(16, 40, 40\), but the MAC table was measured at input_size "):
            dynroute.forward_macs(model)

    def test_counts_with_a_table_of_the_forward_size(self, model, table_40):
        with torch.no_grad():
            model(torch.randn(2, 3, 40, 40))
        assert table_40.dense_macs > dynroute.macs_table(model).dense_macs  # a bigger image costs more
        paths = dynroute.routing_paths(model)
        torch.testing.assert_close(dynroute.forward_macs(model, table_40), dynroute.sample_macs(paths, table_40))

    @pytest.mark.parametrize("measure", list(LOADER_MEASURES.values()), ids=list(LOADER_MEASURES))
    def test_loader_measures_refuse_the_table_of_another_size(self, model, measure):
        before = copy.deepcopy(model.state_dict())
        sizes = [32, 40, 32, 32]  # the second batch is of another size
        drawn = []

        def loader():
            for size in sizes:
                drawn.append(size)
                yield torch.randn(2, 3, size, size)

        with pytest.raises(ValueError, match=r"\(16, 40, 40\), but the MAC table .* pass table=table"):
            measure(model, loader())
        assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
        # A measure of MACs stops at the bad batch; a record of paths goes on and refuses only its MACs.
        assert drawn == (sizes if measure is LOADER_MEASURES["collect_routing"] else sizes[:2])

    def test_a_record_of_another_size_keeps_its_paths_and_refuses_only_macs(self, model):
        loader = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 40, 40)]
        record = dynroute.collect_routing(model, loader)
        expected = []
        with torch.no_grad():
            for images in loader:
                model(images)
                expected.append(dynroute.routing_paths(model))
        assert torch.equal(record.paths, dynroute.hard_paths(torch.cat(expected)))
        with pytest.raises(ValueError, match=r"\(16, 40, 40\), but the MAC table .* pass table=table"):
            record.macs()

    @pytest.mark.parametrize("measure", list(LOADER_MEASURES.values()), ids=list(LOADER_MEASURES))
    def test_loader_measures_count_with_a_table_of_the_loader_size(self, model, table_40, measure):
        loader = [torch.randn(2, 3, 40, 40), torch.randn(3, 3, 40, 40)]
        model = copy.deepcopy(model)  # calibration moves the routers' thresholds
        fraction = measure(model, loader, table=table_40)
        expected = []
        with torch.no_grad():
            for images in loader:
                model(images)
                expected.append(dynroute.forward_macs(model, table_40))
        assert fraction == pytest.approx(torch.cat(expected).mean().item() / table_40.dense_macs, rel=1e-12)

    def test_summary_shows_the_sizes_of_its_table(self, model, table_40):
        printed = str(dynroute.summary(model, [torch.randn(2, 3, 40, 40)], verbose=False, table=table_40))
        assert "16x40x40" in printed and "16x32x32" not in printed
        assert f"{table_40.dense_macs:,}" in printed

    def test_same_size_uses_the_model_table(self, model, table):
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        dynroute.force_gates(model, "open")
        try:
            with torch.no_grad():
                model(torch.randn(2, 3, 32, 32))
            # all blocks open: dense MACs plus the routers
            expected = torch.full((2,), float(table.dense_macs + sum(table.router_macs)), dtype=torch.float64)
            torch.testing.assert_close(dynroute.forward_macs(model), expected)
        finally:
            dynroute.force_gates(model, None)
