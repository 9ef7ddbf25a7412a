"""dynroute.evaluate against a brute-force loop over the same batches."""

import dataclasses
import math

import pytest
import torch
from routed_models import images, routed_model

import dynroute
from dynroute.models import CifarResNet


def _loader(batches: int = 3, size: int = 32, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (images(batch_size, size=size, seed=10 + index), torch.randint(0, 10, (batch_size,), generator=generator))
        for index in range(batches)
    ]


def _reference(model: torch.nn.Module, loader: list, table: dynroute.MacsTable) -> dict:
    """Per-image loop: eval forward, hard path, MACs of that path by the table's definition."""
    model.eval()
    correct, per_image, paths = 0, [], set()
    with torch.no_grad():
        for batch_images, labels in loader:
            for image, label in zip(batch_images, labels):
                logits = model(image.unsqueeze(0))
                correct += int(logits.argmax(1).item() == label.item())
                path = tuple(int(gate) for gate in dynroute.routing_paths(model)[0].tolist())
                paths.add(path)
                per_image.append(table.fixed_macs + sum(m for m, run in zip(table.block_macs, path) if run))
    mean = sum(per_image) / len(per_image)
    std = math.sqrt(sum((macs - mean) ** 2 for macs in per_image) / len(per_image))
    return {
        "top1": 100 * correct / len(per_image),
        "images": len(per_image),
        "macs": mean,
        "macs_fraction": mean / table.dense_macs,
        "macs_std_fraction": std / table.dense_macs,
        "distinct_paths": len(paths),
    }


class TestRoutedModel:
    """A converted model: accuracy, MACs of each image's path, spread and distinct paths."""

    def test_equals_a_per_image_loop(self, one_thread):
        model, loader = routed_model(blocks_per_stage=2), _loader()
        result = dynroute.evaluate(model, loader, progress=False)
        expected = _reference(model, loader, dynroute.macs_table(model))
        assert expected["distinct_paths"] > 3 and 0 < expected["macs_std_fraction"]  # the routers really differ
        assert result.images == expected["images"] and result.distinct_paths == expected["distinct_paths"]
        for name in ("top1", "macs", "macs_fraction", "macs_std_fraction"):
            assert getattr(result, name) == pytest.approx(expected[name], rel=1e-9), name
        assert result.dense_macs == dynroute.count_macs(model, (3, 32, 32))
        assert result.input_size == (3, 32, 32)

    def test_max_batches_and_the_mode_is_restored(self, one_thread):
        model, loader = routed_model(), _loader()
        model.train()
        result = dynroute.evaluate(model, loader, max_batches=2, progress=False)
        assert model.training and result.images == 32
        assert result.top1 == pytest.approx(_reference(model, loader[:2], dynroute.macs_table(model))["top1"])

    def test_skipped_blocks_are_not_computed(self, one_thread):
        """A block's branch sees only the rows routed to it."""
        model, loader = routed_model(), _loader(batches=1)
        names = [name for name, _ in dynroute.gated_blocks(model)]
        block = dict(dynroute.gated_blocks(model))["layer2.0"]
        seen = []
        block.conv1.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
        dynroute.evaluate(model, loader, progress=False)
        assert seen == [int(dynroute.routing_paths(model)[:, names.index("layer2.0")].sum())]
        assert 0 < seen[0] < 16

    def test_table_of_another_size(self, one_thread):
        model, loader = routed_model(), _loader(batches=1, size=48)
        with pytest.raises(ValueError, match="the MAC table was measured at input_size"):
            dynroute.evaluate(model, loader, progress=False)
        table = dynroute.build_macs_table(model, (3, 48, 48))
        result = dynroute.evaluate(model, loader, table=table, progress=False)
        assert result.macs_fraction == pytest.approx(_reference(model, loader, table)["macs_fraction"], rel=1e-9)
        assert result.input_size == (3, 48, 48)

    def test_report_as_json_and_text(self, one_thread):
        result = dynroute.evaluate(routed_model(), _loader(batches=1), progress=False)
        report = dataclasses.asdict(result)
        assert set(report) >= {"top1", "images", "macs", "dense_macs", "macs_fraction", "macs_std_fraction"}
        assert f"{result.top1:.2f}%" in str(result) and f"{result.distinct_paths:,} distinct paths" in str(result)
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.top1 = 0.0


class TestDenseModel:
    """A model without gated blocks: fvcore's MACs at the loader's size, fraction 1, spread 0, one path."""

    def test_equals_a_loop_and_count_macs(self, one_thread):
        model, loader = CifarResNet(1).eval(), _loader()
        result = dynroute.evaluate(model, loader, progress=False)
        with torch.no_grad():
            correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
        assert result.top1 == pytest.approx(100 * correct / 48, rel=1e-12) and result.images == 48
        assert result.macs == result.dense_macs == dynroute.count_macs(model, (3, 32, 32))
        assert (result.macs_fraction, result.macs_std_fraction, result.distinct_paths) == (1.0, 0.0, 1)

    def test_images_of_two_sizes_are_refused(self):
        loader = [*_loader(batches=1), *_loader(batches=1, size=40)]
        with pytest.raises(ValueError, match=r"batch 1 has images of size \(3, 40, 40\), the first had \(3, 32, 32\)"):
            dynroute.evaluate(CifarResNet(1), loader, progress=False)

    def test_table_is_refused(self):
        model = routed_model()
        with pytest.raises(ValueError, match="no gated blocks, so a MAC table does not apply"):
            dynroute.evaluate(CifarResNet(1), _loader(batches=1), table=dynroute.macs_table(model), progress=False)


class TestInput:
    @pytest.mark.parametrize("build", [routed_model, lambda: CifarResNet(1)], ids=["routed", "dense"])
    def test_labels_and_batches_are_needed(self, build):
        with pytest.raises(ValueError, match="evaluate needs labels"):
            dynroute.evaluate(build(), [images(4)], progress=False)
        with pytest.raises(ValueError, match="the loader yielded no batches"):
            dynroute.evaluate(build(), [], progress=False)

    def test_progress_bar_on_stderr_only_when_asked(self, capsys):
        model, loader = routed_model(), _loader(batches=2)
        dynroute.evaluate(model, loader, progress=False)
        assert capsys.readouterr().err == ""
        dynroute.evaluate(model, loader, progress=True)
        captured = capsys.readouterr()
        assert "evaluate" in captured.err and "/2" in captured.err and captured.out == ""  # the bar with its total
