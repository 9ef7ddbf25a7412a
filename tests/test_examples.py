"""Smoke runs of the training examples on tiny generated data, and the original CoDiNet command line."""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from torchvision import datasets
from torchvision import transforms as torchvision_transforms

import dynroute

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import codinet_flags  # noqa: E402
import quickstart  # noqa: E402
import run_folder  # noqa: E402
import train_cifar  # noqa: E402
import train_imagenet  # noqa: E402
import training_loop  # noqa: E402

ORIGINAL_COMMAND = (
    "--dataset cifar10 --backbone resnet20 --train_bs 60 --aug_repeat 1 --test_bs 100 --lr 0.1 --epochs 60 "
    "--beta 25 --loss_w 0.0 --num_target 16 --log_path ./outputs --note your_note"
).split()


pytestmark = pytest.mark.usefixtures("one_thread")


def _image_folder(root: Path, splits: tuple[str, ...], classes: int, per_class: int, size: int) -> Path:
    generator = torch.Generator().manual_seed(0)
    for split in splits:
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("cifar"), ("train", "test"), classes=3, per_class=8, size=32)


def _tiny_run(folder: Path, log_path: Path, *extra: str) -> list[str]:
    return [
        "--data-root", str(folder), "--backbone", "resnet20", "--train-bs", "4", "--test-bs", "8",
        "--lr", "0.01", "--max-steps", "2", "--workers", "0", "--threads", "1",
        "--log-path", str(log_path), "--note", "smoke", *extra,
    ]  # fmt: skip


def _csv_rows(path: Path) -> list[dict]:
    with open(path) as file:
        return list(csv.DictReader(file))


def test_resumed_log_keeps_its_columns(tmp_path: Path) -> None:
    args = argparse.Namespace(log_path=str(tmp_path), note="old")
    run = run_folder.Run(args, is_main=True)
    with open(run.csv_path, "w", newline="") as file:  # a log begun before a term was added
        file.write("epoch,ce,minutes\n1,0.5,3.0\n")
    run.log_epoch({"epoch": 2, "ce": 0.4, "gate_entropy": 0.3, "minutes": 6.0})
    run.writer.close()
    assert _csv_rows(Path(run.csv_path)) == [
        {"epoch": "1", "ce": "0.5", "minutes": "3.0"},
        {"epoch": "2", "ce": "0.4", "minutes": "6.0"},
    ]


class TestOriginalCommandLine:
    """The original CoDiNet flags parse and map to this project's settings."""

    def test_mapping(self) -> None:
        args = codinet_flags.resolve_arguments(train_cifar.build_parser().parse_args(ORIGINAL_COMMAND))
        assert (args.dataset, args.backbone) == ("cifar10", "resnet20")
        assert (args.train_bs, args.test_bs, args.lr, args.epochs) == (60, 100, 0.1, 60)
        assert args.views == 1
        assert args.temperature == 1.0 and args.beta == 25  # the original never used --beta
        assert args.gamma == 0.0 and args.num_target == 16
        assert (args.log_path, args.note) == ("./outputs", "your_note")

    def test_zero_cost_weight_means_no_cost_term(self) -> None:
        """--loss_w 0.0 switched the original's cost loss off: no cost term, no controller, gamma stays 0."""
        args = codinet_flags.resolve_arguments(train_cifar.build_parser().parse_args(ORIGINAL_COMMAND))
        model = train_cifar.build_model(args, 10)
        criterion = codinet_flags.build_criterion(args, model)
        assert not isinstance(criterion.cost, dynroute.BudgetLoss) and criterion.gamma == 0.0
        assert criterion.consistency is None  # --aug_repeat 1: one view, no consistency term
        model.train()
        logits = model(torch.randn(4, 3, 32, 32))
        loss, terms = criterion(logits, torch.arange(4), dynroute.routing_paths(model))
        assert "cost" not in terms and "gamma" not in terms

    def test_original_command_says_what_each_flag_became(self, capsys) -> None:
        args = codinet_flags.resolve_arguments(train_cifar.build_parser().parse_args(ORIGINAL_COMMAND))
        notes = codinet_flags.record_derived_settings(args, train_cifar.build_model(args, 10))
        assert notes == [
            "--aug_repeat 1 -> 1 view(s) per sample",
            "--beta 25.0 -> unused, as in the original (the router temperature is --temperature)",
            "--loss_w 0.0 -> no cost term and no budget controller (cost weight 0, as in the original)",
            "--num_target 16 -> no budget (resnet20 has 9 gated blocks)",
        ]
        assert args.derived == {
            "views": 1,
            "consistency_weight": 0.2,
            "diversity_weight": 0.2,
            "router_lr": 0.1,
            "cost_term": "none",
            "budget": None,
            "gamma": 0.0,
            "gated_blocks": 9,
            "flag_mapping": notes,
        }

    @pytest.mark.parametrize(
        "flags, term, gamma",
        [
            (("--num_target", "16"), "none", 0.0),  # K >= 9 blocks asks for every block: no budget
            (("--num_target", "9", "--loss_w", "0.5"), "none", 0.0),
            (("--num_target", "5", "--loss_w", "0.5"), "budget", 0.5),  # gamma's starting value
            (("--num_target", "5"), "budget", 0.0),
            (("--num_target", "5", "--budget", "0.7"), "budget", 0.0),  # --budget wins
            (("--loss_w", "0.3"), "fixed", 0.3),
            ((), "fixed", 1.0),
        ],
    )
    def test_cost_flags(self, flags: tuple[str, ...], term: str, gamma: float) -> None:
        args = codinet_flags.resolve_arguments(
            train_cifar.build_parser().parse_args(["--backbone", "resnet20", *flags])
        )
        model = train_cifar.build_model(args, 10)
        table = dynroute.macs_table(model)
        cost = codinet_flags.resolve_cost_flags(args, table, "resnet20")
        assert (cost.term, cost.gamma) == (term, gamma)
        expected_budget = {"none": None, "fixed": None, "budget": args.budget}[term]
        if term == "budget" and args.budget is None:
            expected_budget = codinet_flags.budget_from_num_target(5, table)
        assert cost.budget == expected_budget
        assert len(cost.notes) == sum(flag.startswith("--") and flag != "--budget" for flag in flags)
        criterion = codinet_flags.build_criterion(args, model)
        assert isinstance(criterion.cost, dynroute.BudgetLoss) == (term == "budget")
        if term == "budget":
            assert (criterion.cost.target, criterion.cost.gamma.item()) == (cost.budget, gamma)
        else:
            assert criterion.gamma == gamma

    @pytest.mark.parametrize(
        "flags, message",
        [
            (("--budget", "0.6", "--gamma", "0"), r"--gamma 0 switches the cost term off, but --budget 0.6 asks"),
            (("--loss_w", "0.1", "--gamma", "0.2"), r"--loss_w 0.1 and --gamma 0.2 both set the cost weight"),
            (("--loss_w", "-0.5"), r"--loss_w must be >= 0, but got -0.5"),
            (("--num_target", "4", "--loss_w", "0", "--calibrate-images", "8"), r"but --loss_w 0 switches the cost"),
        ],
    )
    def test_contradicting_cost_flags(self, flags: tuple[str, ...], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            codinet_flags.resolve_arguments(train_cifar.build_parser().parse_args(list(flags)))

    def test_calibration_of_no_budget_is_refused_before_training(self) -> None:
        args = codinet_flags.resolve_arguments(
            train_cifar.build_parser().parse_args(
                ["--backbone", "resnet20", "--num_target", "12", "--calibrate-images", "8"]
            )
        )
        with pytest.raises(
            ValueError, match=r"calibrates a budget, but the flags ask for none \(--num_target 12 -> no"
        ):
            codinet_flags.record_derived_settings(args, train_cifar.build_model(args, 10))

    def test_num_target_below_the_block_count(self) -> None:
        table = dynroute.macs_table(dynroute.convert_resnet(dynroute.models.resnet56(), input_size=(3, 32, 32)))
        expected = (table.base_macs + sum(table.router_macs) + 16 * sum(table.block_macs) / 27) / table.dense_macs
        assert codinet_flags.budget_from_num_target(16, table) == pytest.approx(expected, rel=1e-5)

    def test_torch_distributed_launch_rank_flag_is_accepted(self) -> None:
        args = train_cifar.build_parser().parse_args([*ORIGINAL_COMMAND, "--local_rank", "0"])
        assert args.local_rank == 0

    @pytest.mark.parametrize("flags", [("--freeze_gate",), ("--resume_path", "stage1.pt")])
    def test_stage2_job_flags_name_the_fix(self, flags: tuple[str, ...], capsys) -> None:
        with pytest.raises(SystemExit) as exit_info:
            train_cifar.build_parser().parse_args([*ORIGINAL_COMMAND, *flags])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"error: {flags[0]}: the original ran stage 2 as a second job" in error
        assert "add --stage2-epochs N to the stage-1 command line" in error and "--resume" in error

    def test_distill_flags_need_a_teacher(self) -> None:
        args = train_cifar.build_parser().parse_args([*ORIGINAL_COMMAND, "--distill-weight", "0.5"])
        with pytest.raises(ValueError, match="--distill-weight set without --teacher"):
            codinet_flags.resolve_arguments(args)
        args = train_cifar.build_parser().parse_args([*ORIGINAL_COMMAND, "--teacher", "dense.th"])
        assert (codinet_flags.resolve_arguments(args).distill_weight, args.distill_temperature) == (1.0, 4.0)

    def test_bad_num_target(self) -> None:
        table = dynroute.macs_table(dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)))
        with pytest.raises(ValueError, match="--num_target"):
            codinet_flags.budget_from_num_target(0, table)


class TestDistillationLoss:
    """The KD term of the examples against its formula written out per sample and class."""

    def test_matches_the_formula(self) -> None:
        generator = torch.Generator().manual_seed(0)
        student, teacher = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
        temperature = 3.0
        expected = 0.0
        for row in range(5):
            p_teacher = torch.softmax(teacher[row] / temperature, 0)
            p_student = torch.softmax(student[row] / temperature, 0)
            expected += sum(p_teacher[k] * (p_teacher[k].log() - p_student[k].log()) for k in range(7)).item()
        expected *= temperature**2 / 5
        assert training_loop.distillation_loss(student, teacher, temperature).item() == pytest.approx(
            expected, rel=1e-5
        )
        assert training_loop.distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


class TestTrainCifar:
    """train_cifar.py runs both stages, logs, resumes and reports on tiny ImageFolder data."""

    def test_two_stages_then_resume(self, cifar_folder: Path, tmp_path: Path) -> None:
        args = _tiny_run(cifar_folder, tmp_path, "--budget", "0.6", "--epochs", "1", "--stage2-epochs", "1")
        report = train_cifar.main(args)
        run = tmp_path / "smoke"
        rows = _csv_rows(run / "log.csv")
        assert [row["stage"] for row in rows] == ["1", "2"]
        assert report["images"] == 24 and 0 < report["macs_fraction"] <= 1.01
        assert json.loads((run / "results.json").read_text())["top1"] == report["top1"]
        derived = json.loads((run / "args.json").read_text())["derived"]
        assert (derived["cost_term"], derived["budget"], derived["gamma"], derived["views"]) == ("budget", 0.6, 0.0, 2)
        assert any((run / "tensorboard").iterdir())
        resumed = train_cifar.main([*args[:-4], "--epochs", "1", "--stage2-epochs", "2", "--resume"])
        rows = _csv_rows(run / "log.csv")
        assert [row["stage"] for row in rows] == ["1", "2", "2"]  # only the new epoch ran
        assert resumed["images"] == 24

    def test_dense_baseline(self, cifar_folder: Path, tmp_path: Path) -> None:
        report = train_cifar.main(_tiny_run(cifar_folder, tmp_path, "--dense", "--epochs", "1", "--views", "1"))
        assert report["macs_fraction"] == 1.0 and report["distinct_paths"] == 1
        assert report["dense_macs"] == pytest.approx(41e6, rel=0.02)

    def test_distillation_and_straight_through(self, cifar_folder: Path, tmp_path: Path) -> None:
        teacher_path = tmp_path / "teacher.th"
        torch.save({"state_dict": dynroute.models.resnet20(num_classes=3).state_dict()}, teacher_path)
        extra = ("--budget", "0.6", "--epochs", "1", "--stage2-epochs", "1", "--relaxation", "straight_through")
        args = _tiny_run(cifar_folder, tmp_path, *extra, "--teacher", str(teacher_path))
        train_cifar.main(args)
        rows = _csv_rows(tmp_path / "smoke" / "log.csv")
        assert all(float(row["distill"]) > 0 for row in rows)  # a random teacher disagrees with the student
        stage1, stage2 = rows
        assert 0 < float(stage1["gate_entropy"]) <= 1 and math.isnan(float(stage2["gate_entropy"]))
        model = train_cifar.build_model(codinet_flags.resolve_arguments(train_cifar.build_parser().parse_args(args)), 3)
        assert {block.router.relaxation for _, block in dynroute.gated_blocks(model)} == {"straight_through"}

    def test_path_terms_on_probabilities(self, cifar_folder: Path, tmp_path: Path) -> None:
        diversity = {}
        for source in ("gates", "probabilities"):
            extra = ("--budget", "0.6", "--epochs", "1", "--views", "2", "--path-terms", source, "--seed", "0")
            train_cifar.main(_tiny_run(cifar_folder, tmp_path / source, *extra))
            (row,) = _csv_rows(tmp_path / source / "smoke" / "log.csv")
            diversity[source] = float(row["diversity"])
        # Untrained routers give every image nearly the same run probabilities (diversity near its
        # ceiling margin^2 = 0.25), while the Gumbel noise of the gates already keeps paths apart.
        assert diversity["probabilities"] > 0.2 > diversity["gates"] + 0.1

    def test_budget_calibration(self, cifar_folder: Path, tmp_path: Path, capsys) -> None:
        extra = ("--budget", "0.6", "--epochs", "1", "--stage2-epochs", "1", "--calibrate-images", "12")
        train_cifar.main(_tiny_run(cifar_folder, tmp_path, *extra))
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("calibrated"))
        assert "on 12 training images" in line and "budget of at most 60.0%" in line
        cost = float(line.split("cost ")[1].split("%")[0])
        assert 55.0 <= cost <= 60.0  # 12 images x 9 blocks: coarse steps of cost

    def test_budget_calibration_before_every_stage2_epoch(self, cifar_folder: Path, tmp_path: Path, capsys) -> None:
        extra = ("--budget", "0.6", "--epochs", "1", "--stage2-epochs", "2", "--calibrate-images", "12")
        train_cifar.main(_tiny_run(cifar_folder, tmp_path, *extra, "--calibrate-when", "stage2"))
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("calibrated")]
        assert len(lines) == 3  # before each of the 2 stage-2 epochs, and after training
        assert all(55.0 <= float(line.split("cost ")[1].split("%")[0]) <= 60.0 for line in lines)

    def test_a_train_folder_is_read_as_an_image_folder_with_the_dataset_augmentation(self, cifar_folder: Path) -> None:
        args = train_cifar.build_parser().parse_args(["--dataset", "svhn", "--data-root", str(cifar_folder)])
        train_set, _, classes, _ = train_cifar.build_datasets(codinet_flags.resolve_arguments(args))
        assert isinstance(train_set, datasets.ImageFolder) and classes == 3
        steps = [type(step) for step in train_set.transform.transform.transforms[-1].transforms]
        assert torchvision_transforms.RandomCrop in steps and torchvision_transforms.RandomHorizontalFlip not in steps

    def test_download_into_an_image_folder_is_refused(self, cifar_folder: Path) -> None:
        args = train_cifar.build_parser().parse_args(["--data-root", str(cifar_folder), "--download"])
        with pytest.raises(ValueError, match=r"--download fetches torchvision's CIFAR / SVHN, but .* ImageFolder"):
            train_cifar.build_datasets(codinet_flags.resolve_arguments(args))

    def test_calibrate_when_needs_images(self) -> None:
        args = train_cifar.build_parser().parse_args(["--budget", "0.6", "--calibrate-when", "stage2"])
        with pytest.raises(ValueError, match="--calibrate-when stage2 needs images"):
            codinet_flags.resolve_arguments(args)

    @pytest.mark.parametrize("extra", [(), ("--dense",)])
    def test_calibration_needs_a_budget(self, extra: tuple[str, ...]) -> None:
        args = train_cifar.build_parser().parse_args(["--calibrate-images", "100", *extra])
        with pytest.raises(ValueError, match="--calibrate-images calibrates a budget"):
            codinet_flags.resolve_arguments(args)

    def test_calibration_images_are_clean_training_images(self, cifar_folder: Path) -> None:
        views = dynroute.MultiViewTransform(dynroute.train_transform("cifar10"), 2)
        train_set = torch.utils.data.Subset(datasets.ImageFolder(cifar_folder / "train", views), [1, 4, 9, 17, 20])
        clean = training_loop.calibration_subset(train_set, dynroute.eval_transform(), 3, seed=0)
        reference = datasets.ImageFolder(cifar_folder / "train", dynroute.eval_transform())
        assert len(clean) == 3 and set(clean.indices) <= {1, 4, 9, 17, 20}
        for position, index in enumerate(clean.indices):
            assert torch.equal(clean[position][0], reference[index][0])  # one un-augmented image, not views
        assert train_set.dataset.transform is views  # the training set keeps its views

    def test_image_folder_is_resized_to_32_px(self, tmp_path: Path) -> None:
        folder = _image_folder(tmp_path / "data", ("train", "test"), classes=2, per_class=1, size=48)
        args = codinet_flags.resolve_arguments(train_cifar.build_parser().parse_args(["--data-root", str(folder)]))
        train_set, test_set, classes, test_tf = train_cifar.build_datasets(args)
        assert train_set[0][0].shape == (2, 3, 32, 32) and test_set[0][0].shape == (3, 32, 32)
        assert classes == 2 and test_tf is test_set.transform  # calibration images get the same resize

    def test_image_folder_gets_the_cifar_pad_and_crop_after_the_resize(self, cifar_folder: Path) -> None:
        args = train_cifar.build_parser().parse_args(["--dataset", "imagefolder", "--data-root", str(cifar_folder)])
        train_set, _, _, _ = train_cifar.build_datasets(codinet_flags.resolve_arguments(args))
        resize, crop, augment = train_set.transform.transform.transforms
        assert (type(resize), type(crop)) == (torchvision_transforms.Resize, torchvision_transforms.CenterCrop)
        steps = augment.transforms
        assert type(steps[0]) is torchvision_transforms.RandomCrop and steps[0].padding == 4
        assert type(steps[1]) is torchvision_transforms.RandomHorizontalFlip

    def test_evaluation_refuses_another_size_than_the_mac_table(self) -> None:
        model = dynroute.convert_resnet(dynroute.models.resnet20(num_classes=3), input_size=(3, 32, 32))
        batch = (torch.randn(2, 3, 48, 48), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="the MAC table was measured at input_size"):
            training_loop.evaluate(model, [batch], progress=False)

    def test_unknown_dataset(self, cifar_folder: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="--dataset"):
            train_cifar.main(_tiny_run(cifar_folder, tmp_path, "--dataset", "mnist"))

    @pytest.mark.slow
    def test_torchrun_two_processes(self, cifar_folder: Path, tmp_path: Path) -> None:
        """torchrun --nproc_per_node=2 on CPU: gloo, sharded batches, thresholds calibrated on rank 0, one report."""
        extra = ("--budget", "0.6", "--epochs", "1", "--stage2-epochs", "1", "--calibrate-images", "12")
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(EXAMPLES / "train_cifar.py"), *_tiny_run(cifar_folder, tmp_path, *extra, "--calibrate-when", "stage2"),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / "smoke" / "results.json").read_text())
        assert report["images"] == 24
        assert [row["stage"] for row in _csv_rows(tmp_path / "smoke" / "log.csv")] == ["1", "2"]
        assert result.stdout.count("calibrated the decision threshold") == 2  # rank 0: before stage 2, after it


class TestTrainImagenet:
    """train_imagenet.py with a timm ResNet on tiny generated ImageFolder data."""

    def test_few_steps(self, tmp_path: Path) -> None:
        folder = _image_folder(tmp_path / "data", ("train", "val"), classes=2, per_class=4, size=40)
        teacher = tmp_path / "teacher.pth"
        torch.save(timm.create_model("resnet18", num_classes=2).state_dict(), teacher)
        report = train_imagenet.main(
            [
                "--data-root", str(folder), "--model", "resnet18", "--image-size", "32", "--train-bs", "2",
                "--test-bs", "4", "--max-steps", "2", "--workers", "0", "--threads", "1", "--budget", "0.6",
                "--epochs", "1", "--stage2-epochs", "1", "--log-path", str(tmp_path / "runs"), "--note", "smoke",
                "--teacher", str(teacher),
            ]
        )  # fmt: skip
        assert report["images"] == 8 and 1 <= report["distinct_paths"] <= 8
        assert all(float(row["distill"]) > 0 for row in _csv_rows(tmp_path / "runs" / "smoke" / "log.csv"))
        dense = dynroute.count_macs(timm.create_model("resnet18", num_classes=2), (3, 32, 32))
        assert report["dense_macs"] == dense and 0 < report["macs_fraction"] <= 1.01
        assert (tmp_path / "runs" / "smoke" / "last.pt").exists()

    def test_transforms_are_imagenet_style(self) -> None:
        """Random resized crops and flips for training; resize to size / 0.875 and centre crop for evaluation."""
        model = timm.create_model("resnet18", num_classes=2)
        train_tf, eval_tf = train_imagenet.build_transforms(model, 64)
        T = torchvision_transforms
        normalize = T.Normalize(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
        image = Image.fromarray(torch.randint(0, 256, (75, 100, 3), dtype=torch.uint8).numpy())
        reference_train = T.Compose([T.RandomResizedCrop(64), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        torch.manual_seed(1)
        expected = reference_train(image)
        torch.manual_seed(1)
        assert torch.equal(train_tf(image), expected)
        reference_eval = T.Compose([T.Resize(73), T.CenterCrop(64), T.ToTensor(), normalize])
        assert torch.equal(eval_tf(image), reference_eval(image))

    def test_dense_checkpoint_must_fit_the_model(self, tmp_path: Path) -> None:
        args = argparse.Namespace(model="resnet18")
        pretrained = timm.create_model("resnet18")  # 1000 classes: the head is replaced, the rest loads
        torch.save(pretrained.state_dict(), tmp_path / "resnet18.pth")
        model = train_imagenet.build_dense(args, 2, str(tmp_path / "resnet18.pth"))
        torch.testing.assert_close(model.conv1.weight, pretrained.conv1.weight, atol=0, rtol=0)
        torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "resnet34.pth")
        with pytest.raises(SystemExit, match=r"does not fit --model resnet18: .*unexpected \['layer1.2"):
            train_imagenet.build_dense(args, 2, str(tmp_path / "resnet34.pth"))


class TestQuickstart:
    """quickstart.py trains on scikit-learn digits and prints its four figures."""

    @pytest.mark.slow
    def test_few_steps(self, capsys) -> None:
        report = quickstart.main(["--epochs", "1", "--stage2-epochs", "1", "--max-steps", "2", "--threads", "1"])
        out = capsys.readouterr().out
        for label in ("test accuracy", "average MACs", "distinct paths", "eval speedup", "wall time"):
            assert label in out
        assert report["images"] == 360
        assert f"eval speedup    {report['speedup']:.2f}x" in out and 0.1 < report["speedup"] < 10
        assert f"wall time       {report['wall_seconds']:.0f} s (" in out and "; 1 threads)" in out

    def test_import_does_not_log_the_cuda_runtime_warning(self, tmp_path: Path) -> None:
        """Importing torch.utils.benchmark warns about CUDA on a CUDA build without a GPU; quickstart drops that."""
        env = {**os.environ, "CUDA_HOME": str(tmp_path), "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{EXAMPLES.parent}"}

        def stderr_of(code: str) -> str:
            return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr

        if "No CUDA runtime is found" not in stderr_of("import torch.utils.benchmark"):
            pytest.skip("this torch build logs no CUDA runtime warning (a GPU, or a CPU-only build)")
        assert "No CUDA runtime is found" not in stderr_of("import quickstart")
