import pytest
import torch
from torch import nn

import dynroute


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
    for _, block in dynroute.gated_blocks(model):
        nn.init.normal_(block.router.fc2.weight)
    return model


@pytest.fixture(scope="module")
def loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randn(5, 3, 32, 32, generator=generator) + 3 * torch.randn(5, 3, 1, 1, generator=generator), labels)
        for labels in (torch.tensor([0, 1, 2, 3, 4]), torch.tensor([4, 3, 2, 1, 0]))
    ]


class TestSummary:
    """The summary's numbers against the MAC table and a manual eval pass."""

    def test_table_only(self, model, capsys):
        result = dynroute.summary(model)
        printed = capsys.readouterr().out
        assert printed == str(result) + "\n"
        table = dynroute.macs_table(model)
        for name, macs, router in zip(table.block_names, table.block_macs, table.router_macs):
            row = next(line for line in printed.splitlines() if line.startswith(name + " "))
            assert row.split()[-2:] == [f"{macs:,}", f"{router:,}"]
        assert f"{table.dense_macs:,}" in printed and "exec rate" not in printed
        assert result.macs_fraction is None

    def test_over_loader_matches_manual_pass(self, model, loader):
        result = dynroute.summary(model, loader, verbose=False)
        table = dynroute.macs_table(model)
        model.eval()
        with torch.no_grad():
            passes = [(model(x).argmax(1) == y, dynroute.routing_paths(model)) for x, y in loader]
        paths = torch.cat([p for _, p in passes])
        assert result.num_samples == 10
        assert result.execution_rates.tolist() == paths.double().mean(0).tolist()
        assert result.macs_fraction == pytest.approx(dynroute.macs_fraction(paths, table))
        assert result.distinct_paths == dynroute.count_distinct_paths(paths)
        assert result.accuracy == torch.cat([c for c, _ in passes]).double().mean().item()

    def test_expected_column_adds_up_to_mean(self, model, loader):
        result = dynroute.summary(model, loader, verbose=False)
        table = dynroute.macs_table(model)
        rows = [line.split() for line in str(result).splitlines() if line.split()[0] in table.block_names]
        expected = sum(int(row[-1].replace(",", "")) for row in rows)
        assert table.fixed_macs + expected == pytest.approx(result.mean_macs, abs=len(rows))
        last = str(result).splitlines()[-1]
        assert f"{result.macs_fraction:.1%} of dense" in last and "routed, mean of 10 samples" in last

    def test_refuses_unconverted_model(self):
        with pytest.raises(TypeError, match="convert"):
            dynroute.summary(dynroute.models.resnet20())
