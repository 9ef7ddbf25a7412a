"""Train a routed timm ResNet-50/101 on ImageNet (or any ImageFolder) the CoDiNet way, 1 or N processes.

    torchrun --nproc_per_node=8 examples/train_imagenet.py --data-root /data/imagenet --model resnet50 \\
        --pretrained hub --budget 0.6 --epochs 10 --stage2-epochs 2 --lr 0.01 --router-lr 0.1

``--data-root`` holds ``train/<class>/*`` and ``val/<class>/*``. ``--pretrained`` is ``hub`` (timm
downloads the weights), a local checkpoint file, or absent (from scratch). Losses, stages, logs
and resume are those of train_cifar.py; see docs/training.md.
"""

import argparse
import os
import sys

import timm
import torch
from torchvision import datasets
from torchvision import transforms as T

import dynroute

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from codinet_flags import add_training_arguments, resolve_arguments  # noqa: E402
from training_loop import image_folder_split, run_training, setup_distributed  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--data-root", "--data_root", dest="data_root", required=True, help="ImageFolder root with train/ and val/")
    add("--model", "--backbone", dest="model", default="resnet50", help="a timm ResNet: resnet50, resnet101, ...")
    add("--pretrained", default=None, help="'hub' for timm's weights, or a local checkpoint file")
    add("--image-size", type=int, default=224, help="training crop; evaluation resizes to size / 0.875 and crops")
    add_training_arguments(parser)
    parser.set_defaults(train_bs=32, test_bs=64, lr=0.01, epochs=10, workers=8)
    return parser


def build_dense(args: argparse.Namespace, num_classes: int, weights: str | None) -> torch.nn.Module:
    """The dense timm ``--model`` with ``weights``: ``hub``, a local checkpoint file, or None (from scratch)."""
    hub = weights == "hub"
    model = timm.create_model(args.model, pretrained=hub, num_classes=num_classes)
    if weights and not hub:
        state = timm.models.load_state_dict(weights)
        new_head = state.get("fc.weight") is not None and state["fc.weight"].shape[0] != num_classes
        if new_head:
            state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not (new_head and key.startswith("fc."))]
        if missing or unexpected:
            raise SystemExit(
                f"{weights} does not fit --model {args.model}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                "pass the checkpoint of the same architecture"
            )
    return model


def build_model(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The timm model with the requested weights, converted unless ``--dense``."""
    model = build_dense(args, num_classes, args.pretrained)
    if args.dense:
        return model
    size = (3, args.image_size, args.image_size)
    router = dynroute.StaticRouter if args.static_router else dynroute.Router
    return dynroute.convert_resnet(
        model, input_size=size, router_layer=router, temperature=args.temperature, relaxation=args.relaxation
    )


def build_transforms(model: torch.nn.Module, image_size: int) -> tuple[T.Compose, T.Compose]:
    """Random resized crops + flip for training, resize + centre crop (crop_pct 0.875) for evaluation; timm's stats."""
    config = model.pretrained_cfg
    mean = config.get("mean", dynroute.training.data.IMAGENET_MEAN)
    std = config.get("std", dynroute.training.data.IMAGENET_STD)
    train_tf = dynroute.train_transform("imagefolder", image_size, mean=mean, std=std)
    return train_tf, dynroute.eval_transform(image_size, mean, std, crop_pct=0.875)


def main(argv: list[str] | None = None) -> dict:
    args = resolve_arguments(build_parser().parse_args(argv))
    torch.manual_seed(args.seed)
    env = setup_distributed()
    root = os.path.expanduser(args.data_root)
    train_set = datasets.ImageFolder(image_folder_split(root, ("train",)))
    test_set = datasets.ImageFolder(image_folder_split(root, ("val", "test")))
    model = build_model(args, len(train_set.classes))
    teacher = build_dense(args, len(train_set.classes), args.teacher) if args.teacher else None
    train_tf, test_set.transform = build_transforms(model, args.image_size)
    train_set.transform = dynroute.MultiViewTransform(train_tf, args.views)
    return run_training(model, train_set, test_set, args, env, teacher, test_set.transform)


if __name__ == "__main__":
    main()
