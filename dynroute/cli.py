"""The dynroute command line, ``python -m dynroute``: evaluate a saved model, print MAC tables and summaries.

``eval`` and ``summary`` read models saved by :func:`dynroute.save_pretrained` (a ``.pt`` file, a
folder, or ``hf-hub:org/name``) and an ImageFolder split, which they read with the evaluation
transform the model records. Errors in what was given print one line naming the fix and exit with
status 2.
"""

import argparse
import difflib
import json
import os
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from dynroute.analysis.evaluation import evaluate
from dynroute.analysis.summary import summary
from dynroute.conversion.convert import convert_resnet
from dynroute.conversion.flops import MacsTable, build_macs_table, macs_table
from dynroute.export.pretrained import HUB_PREFIX, from_pretrained
from dynroute.training.data import eval_transform

__all__ = ["main", "build_parser"]

PROG = "python -m dynroute"
_SPLITS = ("test", "val")


class UsageError(ValueError):
    """Something given on the command line that cannot work; the message names the fix."""


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be a positive int, but got {threads}")
        torch.set_num_threads(threads)


def _split_folder(data_root: str) -> str:
    """``data_root/test``, else ``data_root/val``, else ``data_root`` itself: the ImageFolder split to read."""
    root = os.path.expanduser(data_root)
    if not os.path.isdir(root):
        raise UsageError(f"--data-root {data_root!r} is not a folder; give an ImageFolder split (class folders inside)")
    for name in _SPLITS:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return root


def _image_loader(model: nn.Module, args: argparse.Namespace) -> DataLoader:
    """The ImageFolder split of ``--data-root`` under the model's evaluation transform, in file order."""
    from torchvision.datasets import ImageFolder

    config = model.dynroute_config
    split = _split_folder(args.data_root)
    dataset = ImageFolder(split, transform=eval_transform(**config["preprocessing"]))
    num_classes = config["architecture"]["kwargs"].get("num_classes")
    if num_classes is not None and len(dataset.classes) != num_classes:
        raise UsageError(
            f"{split} has {len(dataset.classes)} class folders but the model predicts {num_classes} classes; "
            "ImageFolder numbers classes by sorted folder name, so give the split with one folder per class the model "
            "learned"
        )
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"--batch-size must be >= 1 and --workers >= 0, but got {args.batch_size} and {args.workers}")
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)


def _table_for_images(model: nn.Module) -> MacsTable | None:
    """The MAC table at the evaluation image size, if that differs from the saved table's; None for a dense model."""
    config = model.dynroute_config
    if not config["converted"]:
        return None
    side = config["preprocessing"]["image_size"]
    size = (config["input_size"][0], side, side)
    return None if size == macs_table(model).input_size else build_macs_table(model, size)


def _load(checkpoint: str, device: str) -> nn.Module:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device {device!r} is not a device ({error}); use cpu, cuda or cuda:1") from None
    return from_pretrained(checkpoint).to(device)


def _run_eval(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    model = _load(args.checkpoint, args.device)
    loader = _image_loader(model, args)
    result = evaluate(model, loader, table=_table_for_images(model), max_batches=args.max_batches)
    if args.json:
        figures = ("top1", "macs_fraction", "distinct_paths", "macs_std_fraction")
        print(json.dumps({name: getattr(result, name) for name in figures}))
    else:
        print(f"{args.checkpoint} on {loader.dataset.root}")
        print(result)


def _model_for_macs(name_or_path: str) -> nn.Module:
    """A saved model, or a timm model of that name without pretrained weights."""
    if name_or_path.startswith(HUB_PREFIX) or os.path.exists(name_or_path):
        return from_pretrained(name_or_path)
    import timm

    if timm.is_model(name_or_path):
        return timm.create_model(name_or_path, pretrained=False)
    close = difflib.get_close_matches(name_or_path, timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; list timm's with timm.list_models('resnet*')"
    raise UsageError(
        f"MODEL {name_or_path!r} is no file or folder of dynroute.save_pretrained, no {HUB_PREFIX}org/name id and no "
        f"timm model name{hint}"
    )


def _run_macs(args: argparse.Namespace) -> None:
    model = _model_for_macs(args.model)
    input_size = None if args.input_size is None else tuple(args.input_size)
    config = getattr(model, "dynroute_config", None)
    if config is not None and config["converted"]:
        table = macs_table(model) if input_size is None else build_macs_table(model, input_size)
    else:  # a timm model or a saved dense one: the table its conversion would have
        if input_size is None and config is not None:
            input_size = tuple(config["input_size"])
        table = macs_table(convert_resnet(model, input_size=input_size))
    print(table)


def _run_summary(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    model = _load(args.checkpoint, args.device)
    if not model.dynroute_config["converted"]:
        raise UsageError(
            f"{args.checkpoint} is a dense model, without routers to summarise; "
            f"'{PROG} macs {args.checkpoint}' prints the MAC table its conversion would have"
        )
    if args.data_root is None:
        summary(model)
    else:
        summary(model, _image_loader(model, args), max_batches=args.max_batches, table=_table_for_images(model))


def _add_data_arguments(parser: argparse.ArgumentParser, data_root_required: bool) -> None:
    add = parser.add_argument
    add(
        "--data-root",
        required=data_root_required,
        metavar="DIR",
        help="an ImageFolder split (one folder per class), or a root holding test/ or val/",
    )
    add("--batch-size", type=int, default=100, metavar="N", help="images per batch (default 100)")
    add("--workers", type=int, default=2, metavar="N", help="data loader worker processes (default 2)")
    add("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default torch's)")
    add("--device", default="cpu", help="where to run: cpu (default), cuda, cuda:1, ...")
    add("--max-batches", type=int, default=None, metavar="N", help="stop after N batches (default all)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m dynroute`` and its subcommands."""
    parser = argparse.ArgumentParser(prog=PROG, description="Evaluate and inspect dynroute models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    evaluation = commands.add_parser(
        "eval",
        help="top-1, MACs fraction, distinct paths and MACs spread of a saved model on an ImageFolder split",
        description="Evaluate a model saved by dynroute.save_pretrained on an ImageFolder split, with the evaluation "
        "transform it records. Prints top-1 (percent), mean MACs as a fraction of the dense network, the spread "
        "(standard deviation) of the per-image MACs as a fraction of dense, and the distinct paths.",
    )
    evaluation.add_argument(
        "--checkpoint", required=True, metavar="FILE", help="a .pt file, a folder or hf-hub:org/name"
    )
    _add_data_arguments(evaluation, data_root_required=True)
    evaluation.add_argument(
        "--json",
        action="store_true",
        help="print only one JSON object with top1, macs_fraction, distinct_paths and macs_std_fraction",
    )
    evaluation.set_defaults(run=_run_eval)

    macs = commands.add_parser(
        "macs",
        help="the MAC table of a timm model or a saved model",
        description="Print the MAC table (each gated block's MACs and its router's, the always-paid rest, the dense "
        "total) of a timm model, created without pretrained weights and converted, or of a saved model.",
    )
    macs.add_argument("model", metavar="MODEL", help="a timm model name, or a .pt file, folder or hf-hub:org/name")
    macs.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="image size to measure at (default: timm's for a timm model, the saved table's for a saved model)",
    )
    macs.set_defaults(run=_run_macs)

    summarise = commands.add_parser(
        "summary",
        help="dynroute.summary of a saved routed model, over an ImageFolder split if given",
        description="Print each gated block's MACs, router MACs and, over an ImageFolder split read with the "
        "model's evaluation transform, its execution rate; then the totals, distinct paths and accuracy.",
    )
    summarise.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file, a folder or hf-hub:org/name")
    _add_data_arguments(summarise, data_root_required=False)
    summarise.set_defaults(run=_run_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); 0 on success, 2 on an error in what was given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError) as error:  # dynroute's errors name the value and the fix
        parser.exit(2, f"{PROG} {args.command}: error: {' '.join(str(error).split())}\n")
    return 0
