import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dynroute

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(page: str) -> list[str]:
    return PYTHON_BLOCK.findall((DOCS / page).read_text())


def run_page(page: str, monkeypatch, tmp_path, namespace: dict | None = None) -> dict:
    """Execute every ```python block of a page in order, in one namespace, from an empty folder."""
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{Path(page).stem}", **(namespace or {})}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"{page} block {number}", "exec"), namespace)
    return namespace


class TestExecutedPages:
    """Pages whose code must run as written, so the docs cannot drift from the code."""

    @pytest.mark.slow
    def test_getting_started(self, monkeypatch, tmp_path):
        namespace = run_page("getting-started.md", monkeypatch, tmp_path)
        assert namespace["record"].num_samples == 12

    def test_fast_inference(self, monkeypatch, tmp_path):
        namespace = run_page("how-to/fast-inference.md", monkeypatch, tmp_path)
        paths = namespace["paths"]
        assert paths.shape == (16, 9)
        assert 0 < paths.sum() < paths.numel(), "the page's routers must skip some blocks and run others"

    def test_new_block(self, monkeypatch, tmp_path):
        namespace = run_page("how-to/new-block.md", monkeypatch, tmp_path)
        assert namespace["model"].blocks[0].__class__.__name__ == "GatedBlock"

    @pytest.mark.slow
    @pytest.mark.skipif(
        not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")),
        reason="needs the export extra",
    )
    def test_deploy(self, monkeypatch, tmp_path):
        namespace = run_page("how-to/deploy.md", monkeypatch, tmp_path)
        assert {"routed.pt2", "routed.onnx", "routed_batched.onnx"} <= {p.name for p in tmp_path.iterdir()}
        assert namespace["label"] in range(10)
        assert len(namespace["blocks_run"]) == 9

    @pytest.mark.slow
    @pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs the plots extra")
    def test_analytics(self, monkeypatch, tmp_path):
        """The page's snippets on a small routed model and loader standing in for the reader's."""
        torch.manual_seed(0)
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
        for _, block in dynroute.gated_blocks(model):
            nn.init.normal_(block.router.fc2.weight)
        loader = [(torch.randn(6, 3, 32, 32) + torch.randn(6, 3, 1, 1), torch.arange(6) % 3) for _ in range(2)]
        setup = {"model": model, "test_loader": loader, "feature_extractor": nn.AdaptiveAvgPool2d(1)}
        namespace = run_page("how-to/analytics.md", monkeypatch, tmp_path, {**setup, "CLASSES": ["a", "b", "c"]})
        assert namespace["record"].features.shape == (12, 3)
        assert {p.name for p in tmp_path.glob("*.png")} == {
            "execution_by_class.png",
            "macs_histogram.png",
            "tsne.png",
            "accuracy_vs_macs.png",
        }


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The documentation site, built once with ``mkdocs build --strict``."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("needs the docs extra")
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return site_dir


# A module-level object in the API reference: an h3 heading whose id is its dotted path.
API_OBJECT = re.compile(r'<h3 id="dynroute\.(?:[\w]+\.)+?(\w+)" class="doc doc-heading')


def public_names() -> set[str]:
    """The public API: the objects of ``dynroute.__all__``, ``dynroute.plots`` and ``dynroute.models``."""
    modules_and_version = {"models", "plots", "__version__"}
    return (set(dynroute.__all__) - modules_and_version) | set(dynroute.plots.__all__) | set(dynroute.models.__all__)


class TestSite:
    """The documentation site builds without a warning, and its API reference is the public API."""

    @pytest.mark.slow
    def test_mkdocs_build_strict(self, site):
        assert (site / "api" / "index.html").exists()

    @pytest.mark.slow
    def test_api_reference_shows_the_public_api_only(self, site):
        shown, public = set(API_OBJECT.findall((site / "api" / "index.html").read_text())), public_names()
        assert not public - shown, f"docs/api.md lacks public names {sorted(public - shown)}"
        assert not shown - public, f"docs/api.md shows internal names {sorted(shown - public)}"
