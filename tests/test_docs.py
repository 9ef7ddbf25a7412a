import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import dynroute

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# A fenced block, possibly indented (inside a list item); its body ends at a fence of the same indent.
FENCE = re.compile(
    r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.DOTALL | re.MULTILINE
)
# The visible marker that keeps the python block right after it out of CI, with the reason.
SKIP_MARKER = re.compile(r"<!--\s*skip-in-ci:\s*(?P<reason>.*?)\s*-->")


@dataclass(frozen=True)
class CodeBlock:
    """One ```python block of a docs page, numbered from 1 in page order."""

    page: str
    number: int
    source: str
    skip_reason: str | None


def python_blocks(page: str) -> list[CodeBlock]:
    """The page's python blocks; a block right after a ``<!-- skip-in-ci: reason -->`` line is marked skipped."""
    text = (ROOT / page).read_text()
    blocks = []
    for fence in FENCE.finditer(text):
        if fence["lang"] != "python":
            continue
        preceding = text[: fence.start()].rstrip().rsplit("\n", 1)[-1]
        marker = SKIP_MARKER.fullmatch(preceding.strip())
        source = textwrap.dedent(fence["body"])
        blocks.append(CodeBlock(page, len(blocks) + 1, source, marker["reason"] if marker else None))
    return blocks


def pages_with_code() -> list[str]:
    """The docs pages and the README that hold python blocks, as paths from the repository root."""
    pages = [ROOT / "README.md", *DOCS.rglob("*.md")]
    return sorted(path.relative_to(ROOT).as_posix() for path in pages if "```python" in path.read_text())


def run_page(page: str, monkeypatch, tmp_path, namespace: dict) -> dict:
    """Execute every python block of a page that is not marked skipped, in order, in one namespace, from an empty
    folder; the namespace starts with the page's stand-ins."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}", **namespace}
    dynamo_config = torch._dynamo.config.get_config_copy()  # pages may raise dynamo's recompile limits
    try:
        for block in python_blocks(page):
            if block.skip_reason is None:
                exec(compile(block.source, f"{page} block {block.number}", "exec"), namespace)
    finally:
        changed = {key for key, value in torch._dynamo.config.get_config_copy().items() if dynamo_config[key] != value}
        torch._dynamo.config.load_config({key: dynamo_config[key] for key in changed})
    return namespace


# Stand-ins for what a page takes from the reader (their model and data) or from a block marked skipped.


def analytics_stand_ins() -> dict:
    """A small routed model and loader standing in for the reader's trained model and test set."""
    model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32))
    for _, block in dynroute.gated_blocks(model):
        nn.init.normal_(block.router.fc2.weight)
    loader = [(torch.randn(6, 3, 32, 32) + torch.randn(6, 3, 1, 1), torch.arange(6) % 3) for _ in range(2)]
    return {"model": model, "test_loader": loader, "feature_extractor": nn.AdaptiveAvgPool2d(1), "CLASSES": list("abc")}


def training_stand_ins() -> dict:
    """The skipped CIFAR-10 block's names: a multi-view loader of 2 batches of 4 fake images, and 2 epochs."""
    views = dynroute.MultiViewTransform(dynroute.train_transform("cifar10"), num_views=2)
    fake = torchvision.datasets.FakeData(size=8, image_size=(3, 32, 32), num_classes=10, transform=views)
    loader = DataLoader(fake, batch_size=4, drop_last=True, collate_fn=dynroute.multiview_collate)
    return {"loader": loader, "epochs": 2, "stage1_epochs": 1}


STAND_INS: dict[str, Callable[[], dict]] = {
    "docs/how-to/analytics.md": analytics_stand_ins,
    "docs/training.md": training_stand_ins,
}


# What a page's code must have done, beyond running without an error.


def check_getting_started(namespace: dict, tmp_path: Path) -> None:
    assert namespace["record"].num_samples == 12


def check_fast_inference(namespace: dict, tmp_path: Path) -> None:
    paths = namespace["paths"]
    assert paths.shape == (16, 9)
    assert 0 < paths.sum() < paths.numel(), "the page's routers must skip some blocks and run others"


def check_families(namespace: dict, tmp_path: Path) -> None:
    assert len(namespace["same_logits"]) == 9 and all(namespace["same_logits"].values())
    assert namespace["refusal"].startswith("torchvision.models.densenet.DenseNet has no residual add to gate")
    assert [name for name, _ in dynroute.gated_blocks(namespace["model"])] == ["1", "2", "3"]


def check_new_block(namespace: dict, tmp_path: Path) -> None:
    assert namespace["model"].blocks[0].__class__.__name__ == "GatedBlock"


def check_analytics(namespace: dict, tmp_path: Path) -> None:
    assert namespace["record"].features.shape == (12, 3)
    pictures = {p.name for p in tmp_path.glob("*.png")}
    assert pictures == {"execution_by_class.png", "macs_histogram.png", "tsne.png", "accuracy_vs_macs.png"}


def check_training(namespace: dict, tmp_path: Path) -> None:
    assert dynroute.get_stage(namespace["model"]) == 2, "the loop must reach stage 2"


def check_custom_loop(namespace: dict, tmp_path: Path) -> None:
    images, labels = next(iter(namespace["loader"]))
    assert len(images) == len(labels) == 2 * namespace["loader"].batch_size, "labels once per view"


def check_save_and_share(namespace: dict, tmp_path: Path) -> None:
    assert {path.name for path in (tmp_path / "resnet20-routed").iterdir()} == {
        "config.json",
        "pytorch_model.bin",
        "README.md",
    }
    assert (tmp_path / "hub" / "your-name" / "resnet20-routed" / "config.json").exists()
    assert namespace["result"].images == 16 and namespace["model"].dynroute_config["metadata"]["top1"] >= 0


def check_deploy(namespace: dict, tmp_path: Path) -> None:
    assert {"routed.pt2", "routed.onnx", "routed_batched.onnx"} <= {path.name for path in tmp_path.iterdir()}
    assert namespace["label"] in range(10)
    assert len(namespace["blocks_run"]) == 9


def offline_hub(monkeypatch, tmp_path: Path) -> None:
    """huggingface_hub's upload and download go to a folder standing in for the Hub: the page runs offline."""
    hub = tmp_path / "hub"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, hub / repo_id)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, name, **kwargs: str(hub / repo_id / name))


# What a page needs set up before it runs (beyond stand-ins for the reader's objects).
SETUPS: dict[str, Callable] = {"docs/how-to/save-and-share.md": offline_hub}

CHECKS: dict[str, Callable[[dict, Path], None]] = {
    "docs/getting-started.md": check_getting_started,
    "docs/how-to/fast-inference.md": check_fast_inference,
    "docs/families.md": check_families,
    "docs/how-to/new-block.md": check_new_block,
    "docs/how-to/analytics.md": check_analytics,
    "docs/training.md": check_training,
    "docs/how-to/custom-loop.md": check_custom_loop,
    "docs/how-to/save-and-share.md": check_save_and_share,
    "docs/how-to/deploy.md": check_deploy,
}

# Pages that need an optional extra, and a module of it.
NEEDS_EXTRA = {"docs/how-to/analytics.md": ("plots", "sklearn"), "docs/how-to/deploy.md": ("export", "onnxscript")}
SKIPPED_BLOCKS = [block for page in pages_with_code() for block in python_blocks(page) if block.skip_reason]


class TestExecutedPages:
    """Every python block of the docs pages and the README runs as written, in page order: the docs cannot drift.

    A block that needs a GPU, a network or data that does not ship is marked ``<!-- skip-in-ci: reason -->`` in
    the markdown, right above it; it is compiled, reported as skipped with its reason, and not run.
    """

    @pytest.mark.slow
    @pytest.mark.parametrize("page", pages_with_code())
    def test_page_runs(self, page, monkeypatch, tmp_path, one_thread):
        extra, module = NEEDS_EXTRA.get(page, (None, "dynroute"))
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the {extra} extra")
        if page in SETUPS:
            SETUPS[page](monkeypatch, tmp_path)
        torch.manual_seed(0)
        namespace = run_page(page, monkeypatch, tmp_path, STAND_INS.get(page, dict)())
        if page in CHECKS:
            CHECKS[page](namespace, tmp_path)

    @pytest.mark.parametrize("block", SKIPPED_BLOCKS, ids=lambda block: f"{block.page}-block{block.number}")
    def test_skipped_block(self, block):
        compile(block.source, f"{block.page} block {block.number}", "exec")  # a skipped block still parses
        pytest.skip(f"{block.page} block {block.number}: {block.skip_reason}")

    @pytest.mark.parametrize("page", pages_with_code())
    def test_every_block_and_marker_is_seen(self, page):
        """Each ```python fence of the page is parsed as a block, and each skip marker sits right above one."""
        text, blocks = (ROOT / page).read_text(), python_blocks(page)
        assert len(re.findall(r"^[ ]*```python", text, re.MULTILINE)) == len(blocks)
        assert len(SKIP_MARKER.findall(text)) == sum(block.skip_reason is not None for block in blocks)
        assert all(block.skip_reason for block in blocks if block.skip_reason is not None), "a marker needs a reason"

    def test_stand_ins_and_checks_name_pages_with_code(self):
        assert set(STAND_INS) | set(CHECKS) | set(SETUPS) <= set(pages_with_code())


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
