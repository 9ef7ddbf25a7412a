"""``python -m dynroute`` run as a user runs it: a subprocess on a tiny ImageFolder written to tmp_path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from routed_models import centre_routers
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

import dynroute
from dynroute import cli
from dynroute.models import CifarResNet

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dynroute", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """root/test/<class>/<n>.png: 2 classes of 6 random 32x32 images, brightness varying so routers disagree."""
    root = tmp_path_factory.mktemp("data")
    generator = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        (root / "test" / label).mkdir(parents=True)
        for index in range(6):
            scale = torch.rand(1, generator=generator).item()
            pixels = (torch.rand(32, 32, 3, generator=generator) * 255 * scale).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "test" / label / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root) -> Path:
    """A routed CIFAR ResNet for the 2 classes, routers centred on the folder's images, saved as one file."""
    torch.manual_seed(0)
    model = dynroute.convert_resnet(CifarResNet(1, num_classes=2), input_size=(3, 32, 32)).eval()
    dataset = ImageFolder(data_root / "test", transform=dynroute.eval_transform(32))
    centre_routers(model, torch.stack([image for image, _ in dataset]))
    return dynroute.save_pretrained(model, tmp_path_factory.mktemp("models") / "routed.pt")


class TestEval:
    @pytest.mark.slow
    def test_json_equals_dynroute_evaluate(self, checkpoint, data_root, tmp_path):
        result = run_cli(
            "eval", "--checkpoint", str(checkpoint), "--data-root", str(data_root), "--json", "--workers", "0",
            "--batch-size", "5", "--threads", "1", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        figures = json.loads(result.stdout)  # the whole of stdout is one JSON object
        assert set(figures) == {"top1", "macs_fraction", "distinct_paths", "macs_std_fraction"}
        model = dynroute.from_pretrained(checkpoint)
        loader = DataLoader(ImageFolder(data_root / "test", transform=dynroute.eval_transform(32)), batch_size=5)
        expected = dynroute.evaluate(model, loader, progress=False)
        assert expected.distinct_paths > 1 and expected.macs_std_fraction > 0
        assert figures["top1"] == pytest.approx(expected.top1, abs=1e-12)
        assert figures["distinct_paths"] == expected.distinct_paths
        assert figures["macs_fraction"] == pytest.approx(expected.macs_fraction, rel=1e-12)
        assert figures["macs_std_fraction"] == pytest.approx(expected.macs_std_fraction, rel=1e-12)

    def test_text_on_the_split_folder_itself(self, checkpoint, data_root, capsys):
        argv = ["eval", "--checkpoint", str(checkpoint), "--data-root", str(data_root / "test"), "--workers", "0"]
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "top-1" in out and "on 12 images" in out and "distinct paths" in out


class TestMacsAndSummary:
    def test_macs_of_a_timm_name(self, capsys):
        assert cli.main(["macs", "resnet18", "--input-size", "3", "64", "64"]) == 0
        out = capsys.readouterr().out
        dense = dynroute.count_macs(timm.create_model("resnet18"), (3, 64, 64))
        assert "dense network" in out and f"{dense:,}" in out and "layer4.1" in out

    def test_macs_of_a_saved_model(self, checkpoint, capsys):
        assert cli.main(["macs", str(checkpoint)]) == 0
        assert capsys.readouterr().out.strip() == str(dynroute.macs_table(dynroute.from_pretrained(checkpoint)))

    def test_summary_over_the_split(self, checkpoint, data_root, capsys):
        assert cli.main(["summary", str(checkpoint), "--data-root", str(data_root), "--workers", "0"]) == 0
        out = capsys.readouterr().out
        assert "exec rate" in out and "mean of 12 samples" in out and "layer3.0" in out


class TestHelp:
    @pytest.mark.parametrize(
        "command, option", [("eval", "--json"), ("macs", "--input-size"), ("summary", "--data-root")]
    )
    def test_help_of_every_command(self, command, option, capsys):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0 and option in capsys.readouterr().out


class TestErrors:
    """One line naming the fix on stderr, exit status 2, no traceback."""

    @pytest.mark.slow
    def test_in_a_subprocess(self, data_root, tmp_path):
        result = run_cli("eval", "--checkpoint", "missing.pt", "--data-root", str(data_root), cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            "python -m dynroute eval: error: no file or folder 'missing.pt'; pass the path dynroute.save_pretrained "
            "wrote, or 'hf-hub:org/name' for a model on the Hugging Face Hub"
        ]

    def _assert_clear(self, argv: list[str], message: str, capsys) -> None:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        captured = capsys.readouterr()
        assert exit_info.value.code == 2 and captured.out == ""
        assert len(captured.err.strip().splitlines()) == 1 and message in captured.err, captured.err

    def test_not_a_dynroute_checkpoint(self, data_root, tmp_path, capsys):
        torch.save(CifarResNet(1).state_dict(), tmp_path / "weights.th")
        argv = ["eval", "--checkpoint", str(tmp_path / "weights.th"), "--data-root", str(data_root)]
        self._assert_clear(argv, "is not a dynroute model", capsys)

    def test_unknown_model_name(self, capsys):
        self._assert_clear(["macs", "resnet1"], "did you mean resnet18", capsys)

    def test_wrong_input_size(self, capsys):
        self._assert_clear(["macs", "resnet18", "--input-size", "1", "64", "64"], "so pass (3, H, W)", capsys)

    def test_split_with_other_classes(self, checkpoint, tmp_path, capsys):
        (tmp_path / "one" / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "one" / "cat" / "0.png")
        argv = ["eval", "--checkpoint", str(checkpoint), "--data-root", str(tmp_path / "one")]
        self._assert_clear(argv, "has 1 class folders but the model predicts 2 classes", capsys)

    def test_dense_model_has_no_summary(self, tmp_path, capsys):
        path = dynroute.save_pretrained(CifarResNet(1, num_classes=2), tmp_path / "dense.pt", input_size=(3, 32, 32))
        self._assert_clear(["summary", str(path)], "is a dense model", capsys)
