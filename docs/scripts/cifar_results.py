"""Score the CIFAR-10 runs of docs/results.md: accuracy, MACs, path statistics and the budget sweep.

Each run is a folder that examples/train_cifar.py wrote (args.json, last.pt, log.csv) or a checkpoint
file that docs/scripts/cifar_ship.py saved from one (docs/results/cifar10/*.pt). The script rebuilds the
network the run trained, loads its last weights and measures it on the validation split (the last
500 training images of each class, which the runs held out) or on the test split, in eval mode with
blocks really skipped:

    python docs/scripts/cifar_results.py --data ~/data/cifar10 --split val runs/r70-rate-s0 runs/dense56-s0
    python docs/scripts/cifar_results.py --data ~/data/cifar10 --split test --sweep docs/results/cifar10/r70-plain-s0.pt

For a routed run it adds the per-image MACs spread, the execution rate of each block (overall and by
class), the entropy of each router's decision in bits (0: saturated, the same choice for every image), the
agreement of paths under a horizontal flip and the correlation between sample similarity (features of
the pretrained dense ResNet-56) and path similarity (CoDiNet Table 9); with --sweep, accuracy and MACs
at a range of shared decision offsets (one model, every budget). One JSON object per run is printed,
with the run's budget and, for a run folder, its training wall time in minutes (``wall_minutes``, the
last row of its log.csv); docs/scripts/cifar_table.py turns these lines into the tables of docs/results.md.
"""

import argparse
import csv
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision.transforms import v2

import dynroute
from dynroute.training.data import eval_transform

OFFSETS = (-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def load_run(path: Path) -> tuple[torch.nn.Module, dict]:
    """The network of a run (folder or shipped file) in eval mode, and what describes it.

    The description holds ``run`` (the run's name), ``kind`` (dense, static or routed), ``backbone``,
    ``budget`` (None for a dense run) and, for a run folder, ``wall_minutes``.
    """
    if path.is_file():
        model = dynroute.from_pretrained(path)
        config = model.dynroute_config
        routing = config["routing"]
        kind = "dense" if routing is None else "static" if routing["router_layer"] == "StaticRouter" else "routed"
        run = config["metadata"].get("run", path.stem)
        return model, {
            "run": run,
            "kind": kind,
            "backbone": config["architecture"]["name"],
            "budget": config["metadata"].get("budget"),
        }
    args = json.loads((path / "args.json").read_text())
    model = getattr(dynroute.models, args["backbone"])(num_classes=10, shortcut=args.get("shortcut", "A"))
    if not args["dense"]:
        router = dynroute.StaticRouter if args.get("static_router") else dynroute.Router
        model = dynroute.convert_resnet(model, input_size=(3, 32, 32), router_layer=router)
    dynroute.load_checkpoint(path / "last.pt", model)
    kind = "dense" if args["dense"] else "static" if args.get("static_router") else "routed"
    with open(path / "log.csv", newline="") as file:
        wall_minutes = round(float(list(csv.DictReader(file))[-1]["minutes"]), 1)
    return model.eval(), {
        "run": path.name,
        "kind": kind,
        "backbone": args["backbone"],
        "budget": None if args["dense"] else args.get("budget"),
        "wall_minutes": wall_minutes,
    }


def split_loader(root: Path, split: str, per_class: int = 500) -> DataLoader:
    """The validation images (the last ``per_class`` training images of each class) or the test set."""
    if split == "test":
        dataset = datasets.ImageFolder(root / "test", eval_transform())
    else:
        dataset = datasets.ImageFolder(root / "train", eval_transform())
        targets = torch.as_tensor(dataset.targets)
        held = [i for c in range(10) for i in (targets == c).nonzero().squeeze(1)[-per_class:].tolist()]
        dataset = Subset(dataset, sorted(held))
    return DataLoader(dataset, batch_size=250, num_workers=1)


@torch.no_grad()
def dense_top1(model: torch.nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(1) == labels).sum().item()
        total += labels.numel()
    return 100.0 * correct / total


def routed_figures(model: torch.nn.Module, loader: DataLoader, encoder=None) -> dict:
    """Top-1, MACs and path statistics of a converted model over ``loader``."""
    record = dynroute.collect_routing(model, loader, encoder=encoder)
    macs = record.macs()
    figures = {
        "top1": 100.0 * record.accuracy,
        "macs_fraction": macs.fraction,
        "macs_std_fraction": macs.fractions.std().item(),
        "distinct_paths": record.distinct_paths,
    }
    if encoder is not None:
        by_class = dynroute.execution_rate_by_class(record.paths, record.labels, 10)
        flip = dynroute.augmentation_agreement(model, loader, augment=v2.RandomHorizontalFlip(p=1.0))
        figures |= {
            "execution_rate": [round(rate, 3) for rate in record.execution_rate().tolist()],
            "gate_entropy": [round(bits, 4) for bits in record.gate_entropy().tolist()],
            "execution_rate_by_class": [[round(rate, 3) for rate in row] for row in by_class.tolist()],
            "flip_agreement": flip.agreement,
            "similarity_correlation": dynroute.similarity_correlation(record.features, record.run_probs),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", type=Path, nargs="+", help="run folders of examples/train_cifar.py or checkpoints of cifar_ship.py"
    )
    parser.add_argument("--data", type=Path, default=Path.home() / "data/cifar10", help="ImageFolder (train/, test/)")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument(
        "--weights",
        type=Path,
        default=Path("../shared/weights/cifar_resnet56.th"),
        help="pretrained dense ResNet-56 whose features are the sample similarity of the PCC",
    )
    parser.add_argument("--sweep", action="store_true", help="also measure accuracy and MACs at shared offsets")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loader = split_loader(args.data, args.split)
    reference = dynroute.models.load_cifar_checkpoint(dynroute.models.resnet56(), args.weights).eval()

    def encoder(images: torch.Tensor) -> torch.Tensor:
        return reference.pool(reference.forward_features(images))

    for path in args.runs:
        model, description = load_run(path)
        result = {**description, "split": args.split}
        if description["kind"] == "dense":
            result |= {
                "top1": dense_top1(model, loader),
                "macs_fraction": 1.0,
                "macs_std_fraction": 0.0,
                "distinct_paths": 1,
            }
        else:
            result |= routed_figures(model, loader, encoder)
            if args.sweep:
                trained = [block.router.decision_offset.item() for _, block in dynroute.gated_blocks(model)]
                sweep = []
                for offset in OFFSETS:
                    for (_, block), base in zip(dynroute.gated_blocks(model), trained):
                        block.router.set_decision_offset(base + offset)
                    point = routed_figures(model, loader)
                    sweep.append({"offset": offset, "top1": point["top1"], "macs_fraction": point["macs_fraction"]})
                result["sweep"] = sweep
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
