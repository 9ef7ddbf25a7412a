import sys
from dataclasses import dataclass

import pytest
import torch

import dynroute
from dynroute import plots

image = pytest.importorskip("matplotlib.image")
pytest.importorskip("sklearn")


def read_png(path) -> torch.Size:
    assert path.exists() and path.stat().st_size > 0
    return torch.Size(image.imread(path).shape)


@pytest.fixture
def clusters() -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated groups of relaxed paths, 15 samples each, labelled 0 and 1."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.9, 0.1, 0.9, 0.1, 0.9, 0.1], [0.1, 0.9, 0.1, 0.9, 0.1, 0.9]])
    labels = torch.arange(2).repeat_interleave(15)
    return (centres[labels] + 0.05 * torch.randn(30, 6, generator=generator)).clamp(0, 1), labels


class TestPathEmbedding:
    """t-SNE coordinates as data."""

    def test_keeps_clusters_apart(self, clusters):
        paths, labels = clusters
        points = plots.path_embedding(paths, perplexity=5)
        assert points.shape == (30, 2)
        distances = torch.cdist(points, points) + torch.eye(30) * 1e9
        assert torch.equal(labels[distances.argmin(1)], labels), "each point's nearest neighbour is in its cluster"

    def test_deterministic_for_a_seed(self, clusters):
        paths, _ = clusters
        assert torch.equal(plots.path_embedding(paths, seed=3), plots.path_embedding(paths, seed=3))

    def test_too_few_samples(self):
        with pytest.raises(ValueError, match="N >= 3"):
            plots.path_embedding(torch.rand(2, 4))


class TestPictures:
    """Each plot writes a non-empty PNG of figsize x dpi pixels."""

    def test_tsne_two_panels(self, clusters, tmp_path):
        paths, labels = clusters
        written = plots.plot_path_tsne(
            paths, tmp_path / "tsne.png", labels=labels, executed_blocks=(paths > 0.5).sum(1), class_names=["a", "b"]
        )
        assert read_png(written)[:2] == (450, 1100)

    def test_tsne_one_panel_with_embedding(self, clusters, tmp_path):
        paths, labels = clusters
        embedding = torch.randn(30, 2)
        written = plots.plot_path_tsne(paths, tmp_path / "sub" / "t.png", labels=labels, embedding=embedding, dpi=50)
        assert read_png(written)[:2] == (225, 275)

    def test_tsne_needs_a_colouring(self, clusters, tmp_path):
        with pytest.raises(ValueError, match="labels, executed_blocks"):
            plots.plot_path_tsne(clusters[0], tmp_path / "t.png")
        with pytest.raises(ValueError, match=r"shape \(30,\)"):
            plots.plot_path_tsne(clusters[0], tmp_path / "t.png", labels=torch.zeros(3, dtype=torch.long))

    def test_accuracy_vs_macs(self, tmp_path):
        @dataclass
        class Result:
            macs: float
            accuracy: float

        results = [
            {"macs": 0.6, "accuracy": 0.91, "label": "CoDiNet"},
            {"macs": 0.4, "accuracy": 0.89, "label": "CoDiNet"},
            Result(macs=1.0, accuracy=0.92),
        ]
        written = plots.plot_accuracy_vs_macs(results, tmp_path / "acc.png", figsize=(4, 3), dpi=80)
        assert read_png(written)[:2] == (240, 320)
        with pytest.raises(ValueError, match="'macs' and 'accuracy'"):
            plots.plot_accuracy_vs_macs([{"accuracy": 0.9}], tmp_path / "bad.png")

    def test_execution_by_class(self, clusters, tmp_path):
        paths, labels = clusters
        written = plots.plot_execution_by_class(
            paths, labels, tmp_path / "rates.png", class_names=["a", "b"], block_names=list("pqrstu")
        )
        assert read_png(written)[:2] == (450, 700)

    def test_macs_histogram(self, tmp_path):
        table = dynroute.macs_table(dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)))
        distribution = dynroute.macs_distribution(torch.rand(50, table.num_blocks), table)
        written = plots.plot_macs_histogram(distribution, tmp_path / "macs.png")
        assert read_png(written)[:2] == (400, 600)


class TestMissingExtra:
    """Without matplotlib the error names the extra to install."""

    def test_import_error_names_the_extra(self, monkeypatch, clusters, tmp_path):
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(ImportError, match=r"pip install dynroute\[plots\]"):
            plots.plot_execution_by_class(*clusters, tmp_path / "rates.png")
