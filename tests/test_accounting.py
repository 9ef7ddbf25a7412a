import pytest
import torch

import dynroute


@pytest.fixture(scope="module")
def table():
    return dynroute.macs_table(dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)))


class TestAccounting:
    """Per-sample MACs and distinct paths against loops over the table."""

    def test_sample_macs_by_loop(self, table):
        paths = torch.rand(5, table.num_blocks)
        expected = [
            table.base_macs + sum(table.router_macs) + sum(m for m, v in zip(table.block_macs, row) if v >= 0.5)
            for row in paths.tolist()
        ]
        assert dynroute.sample_macs(paths, table).tolist() == expected

    def test_fraction_of_dense(self, table):
        open_paths = torch.ones(3, table.num_blocks)
        assert dynroute.macs_fraction(open_paths, table) == pytest.approx(
            (table.dense_macs + sum(table.router_macs)) / table.dense_macs
        )
        assert dynroute.macs_fraction(torch.zeros(3, table.num_blocks), table) == pytest.approx(table.fixed_cost())

    def test_distinct_paths(self):
        paths = torch.tensor([[1.0, 0.0, 1.0], [0.9, 0.2, 0.7], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.1, 0.4, 0.3]])
        assert dynroute.count_distinct_paths(paths) == 3

    def test_wrong_width_is_refused(self, table):
        with pytest.raises(ValueError, match=r"shape \(N, 9\)"):
            dynroute.sample_macs(torch.rand(2, 5), table)

    def test_routed_forward_pays_what_the_paths_say(self, table):
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)).eval()
        blocks = dict(dynroute.gated_blocks(model))
        for name in ("layer1.1", "layer2.2", "layer3.1"):
            blocks[name].force_gate("closed")
        model(torch.randn(4, 3, 32, 32))
        paths = dynroute.routing_paths(model)
        skipped = sum(table.block_macs[table.block_names.index(n)] for n in ("layer1.1", "layer2.2", "layer3.1"))
        assert dynroute.sample_macs(paths, table).tolist() == [table.fixed_macs + sum(table.block_macs) - skipped] * 4
