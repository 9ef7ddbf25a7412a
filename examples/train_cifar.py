"""Train a routed CIFAR ResNet the CoDiNet way: CIFAR-10/100, SVHN or an ImageFolder at 32x32; 1 or N processes.

Single process:
    python examples/train_cifar.py --dataset cifar10 --backbone resnet56 --pretrained cifar_resnet56.th \\
        --data-root ~/data/cifar10 --budget 0.6 --epochs 10 --stage2-epochs 2
Several processes (gloo on CPU, nccl on CUDA), replacing the original torch.distributed.launch:
    torchrun --nproc_per_node=2 examples/train_cifar.py ...
The original CoDiNet stage-1 command line is accepted as is; its separate stage-2 job becomes
--stage2-epochs N in the same run. docs/training.md maps each of its flags.
"""

import argparse
import copy
import os
import sys
from collections.abc import Callable

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T

import dynroute
from dynroute.training.data import MultiViewTransform, eval_transform, train_transform

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from codinet_flags import add_training_arguments, resolve_arguments  # noqa: E402
from training_loop import image_folder_split, run_training, setup_distributed  # noqa: E402

BACKBONES = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet74", "resnet110")
DATASETS = ("cifar10", "cifar100", "svhn", "imagefolder")
IMAGE_SIZE = 32  # CIFAR and SVHN images; ImageFolder images are resized to it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add(
        "--dataset",
        default="cifar10",
        help=f"one of {DATASETS}; it picks the augmentation (svhn: no flip) and, unless --data-root holds train/, "
        "the torchvision dataset",
    )
    add(
        "--data-root",
        "--data_root",
        dest="data_root",
        default=os.path.expanduser("~/data"),
        help="torchvision dataset folder, or an ImageFolder root with train/ and test/ (or val/), resized to 32x32; "
        "a root with train/ is read as an ImageFolder whatever --dataset says",
    )
    add("--download", action="store_true", help="let torchvision download CIFAR / SVHN into --data-root")
    add("--backbone", default="resnet56", help=f"one of {BACKBONES}")
    add("--pretrained", "--model_path", dest="pretrained", default=None, help="dense checkpoint to start from")
    add("--pretrain", action="store_true", help="original flag; the checkpoint is --model_path")
    add("--shortcut", default="A", choices=("A", "B"), help="shortcut option of the CIFAR ResNet")
    add("--train-subset", type=int, default=None, help="train on a fixed random subset of this many images")
    add("--test-subset", type=int, default=None, help="evaluate on the first this many test images")
    add(
        "--val-per-class",
        type=int,
        default=0,
        help="hold out the last N training images of each class as a validation split: the run trains on the "
        "rest and reports on the validation images instead of the test set (choose recipes on it, then score the "
        "chosen model on the test set once, e.g. with python -m dynroute eval)",
    )
    add_training_arguments(parser)
    return parser


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int, Callable]:
    """(train set with M views per sample, test set, number of classes, evaluation transform).

    A ``--data-root`` with a ``train/`` folder is read as an ImageFolder for any ``--dataset`` (a JPEG
    copy of CIFAR-10, say), which then picks only the augmentation: SVHN's has no flip. ImageFolder
    images are first resized (shorter side) and centre-cropped to 32x32, the size of CIFAR and SVHN
    images, which the recipe and the MAC table of ``build_model`` assume.
    """
    dataset = args.dataset.lower()
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, but got {args.dataset!r}")
    train_tf, test_tf = train_transform(dataset), eval_transform()
    root = os.path.expanduser(args.data_root)
    image_folder = dataset == "imagefolder" or os.path.isdir(os.path.join(root, "train"))
    if image_folder and args.download:
        raise ValueError(
            f"--download fetches torchvision's CIFAR / SVHN, but {root!r} is read as an ImageFolder (--dataset "
            "imagefolder, or a train/ folder in it); drop --download, or give a --data-root without train/"
        )
    if image_folder:
        # Once resized to 32 px, an ImageFolder gets the paper's pad-and-crop (SVHN's without the flip).
        augmentation = "cifar10" if dataset == "imagefolder" else dataset
        train_tf = T.Compose([T.Resize(IMAGE_SIZE), T.CenterCrop(IMAGE_SIZE), train_transform(augmentation)])
        test_tf = eval_transform(image_size=IMAGE_SIZE)
    views = MultiViewTransform(train_tf, args.views)
    if image_folder:
        train_set = datasets.ImageFolder(image_folder_split(root, ("train",)), views)
        test_set = datasets.ImageFolder(image_folder_split(root, ("test", "val")), test_tf)
        classes = len(train_set.classes)
    elif dataset == "svhn":
        train_set = datasets.SVHN(root, split="train", transform=views, download=args.download)
        test_set = datasets.SVHN(root, split="test", transform=test_tf, download=args.download)
        classes = 10
    else:
        factory = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
        train_set = factory(root, train=True, transform=views, download=args.download)
        test_set = factory(root, train=False, transform=test_tf, download=args.download)
        classes = 10 if dataset == "cifar10" else 100
    if args.val_per_class:
        train_set, test_set = validation_split(train_set, args.val_per_class, test_tf)
    if args.train_subset:
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed))
        train_set = Subset(train_set, order[: args.train_subset].tolist())
    if args.test_subset:
        test_set = Subset(test_set, range(min(args.test_subset, len(test_set))))
    return train_set, test_set, classes, test_tf


def validation_split(train_set: Dataset, per_class: int, transform: Callable) -> tuple[Subset, Subset]:
    """(training images, validation images): the last ``per_class`` images of each class, in dataset order, held out.

    For CIFAR-10's ImageFolder layout (``NNNN.jpg`` files, 5,000 a class) ``per_class=500`` holds out files
    4500-4999 of each class. The validation images get ``transform`` (the evaluation one), not the views.
    """
    targets = torch.as_tensor(train_set.targets)
    held_out: list[int] = []
    for label in targets.unique().tolist():
        indices = (targets == label).nonzero().squeeze(1).tolist()
        if per_class >= len(indices):
            raise ValueError(f"--val-per-class {per_class} holds out every image of class {label} ({len(indices)})")
        held_out += indices[-per_class:]
    held = set(held_out)
    clean = copy.copy(train_set)  # shares the file list; only the transform differs
    clean.transform = transform
    kept = [index for index in range(len(targets)) if index not in held]
    return Subset(train_set, kept), Subset(clean, sorted(held_out))


def build_dense(args: argparse.Namespace, num_classes: int, checkpoint: str | None) -> torch.nn.Module:
    """The dense CIFAR ResNet of ``--backbone``, loaded from ``checkpoint`` if given."""
    if args.backbone not in BACKBONES:
        raise ValueError(f"--backbone must be one of {BACKBONES}, but got {args.backbone!r}")
    model = getattr(dynroute.models, args.backbone)(num_classes=num_classes, shortcut=args.shortcut)
    if checkpoint:
        dynroute.models.load_cifar_checkpoint(model, checkpoint)
    return model


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The CIFAR ResNet, loaded from ``--pretrained`` if given, converted unless ``--dense``."""
    model = build_dense(args, num_classes, args.pretrained)
    if args.dense:
        return model
    return dynroute.convert_resnet(
        model,
        input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
        router_layer=dynroute.StaticRouter if args.static_router else dynroute.Router,
        temperature=args.temperature,
        relaxation=args.relaxation,
    )


def main(argv: list[str] | None = None) -> dict:
    args = resolve_arguments(build_parser().parse_args(argv))
    torch.manual_seed(args.seed)
    env = setup_distributed()
    train_set, test_set, classes, test_tf = build_datasets(args)
    model = build_model(args, classes)
    teacher = build_dense(args, classes, args.teacher) if args.teacher else None
    return run_training(model, train_set, test_set, args, env, teacher, test_tf)


if __name__ == "__main__":
    main()
