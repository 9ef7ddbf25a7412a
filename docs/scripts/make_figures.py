"""Make the pictures and numbers of docs/how-to/analytics.md on a briefly fine-tuned CIFAR ResNet-20.

Fine-tunes a pretrained CIFAR ResNet-20 with routers for 200 steps, once with the CoDiNet losses and
once with the cost loss alone (a "vanilla" router), at each MAC budget, then runs every analysis of
dynroute.metrics and dynroute.plots on 1,000 CIFAR-10 test images; two to ten minutes a run on two
busy CPU cores. With --checkpoint it analyses a routed model you trained instead.

python docs/scripts/make_figures.py --data ~/data/cifar10 --weights ../shared/weights/cifar_resnet20.th
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, Subset
from torchvision import datasets
from torchvision.transforms import v2

import dynroute
from dynroute import plots
from dynroute.training.data import eval_transform, train_transform

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
AUGMENT = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])  # on test tensors, for agreement


def train(model, loader, steps: int, target: float, codinet: bool) -> None:
    table = dynroute.macs_table(model)
    consistency, diversity = dynroute.ConsistencyLoss(num_views=2), dynroute.DiversityLoss(num_views=2)
    cost = dynroute.CostLoss(table, target=target)
    groups = [
        {"params": dynroute.router_parameters(model), "lr": 0.05},
        {"params": dynroute.block_parameters(model), "lr": 0.005},
    ]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=1e-4)
    model.train()
    batches = iter(loader)
    for _ in range(steps):
        images, labels = next(batches)  # sample-major: 32 samples x 2 views
        logits = model(images)
        paths = dynroute.routing_paths(model)
        loss = F.cross_entropy(logits, labels) + 5.0 * cost(paths)
        if codinet:
            loss = loss + 0.5 * consistency(paths) + 1.0 * diversity(paths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def analyse(model, test_loader, encoder) -> tuple[dict, dynroute.RoutingRecord]:
    """Every number of the analytics page for one routed model."""
    record = dynroute.collect_routing(model, test_loader, encoder=encoder)
    flip = dynroute.augmentation_agreement(model, test_loader, augment=v2.RandomHorizontalFlip(p=1.0))
    crop = dynroute.augmentation_agreement(model, test_loader, augment=AUGMENT)
    numbers = {
        "accuracy": record.accuracy,
        "macs_fraction": record.macs().fraction,
        "distinct_paths": record.distinct_paths,
        "flip_agreement": flip.agreement,
        "crop_flip_agreement": crop.agreement,
        "flip_mean_kl": flip.mean_kl,
        "crop_flip_mean_kl": crop.mean_kl,
        "similarity_correlation": dynroute.similarity_correlation(record.features, record.run_probs),
        "execution_rate": [round(r, 3) for r in record.execution_rate().tolist()],
    }
    return numbers, record


def draw(record: dynroute.RoutingRecord, results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plots.plot_path_tsne(
        record.run_probs,
        out / "tsne.png",
        labels=record.labels,
        executed_blocks=record.executed_blocks,
        class_names=CLASSES,
    )
    plots.plot_execution_by_class(
        record.paths, record.labels, out / "execution_by_class.png", CLASSES, record.table.block_names
    )
    plots.plot_macs_histogram(record.macs(), out / "macs_histogram.png")
    plots.plot_accuracy_vs_macs(results, out / "accuracy_vs_macs.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path.home() / "data/cifar10", help="ImageFolder (train/, test/)")
    parser.add_argument("--weights", type=Path, default=Path("../shared/weights/cifar_resnet20.th"))
    parser.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth of --weights")
    parser.add_argument("--checkpoint", type=Path, help="analyse this routed checkpoint instead of fine-tuning")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "img")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6])
    args = parser.parse_args()
    torch.manual_seed(0)

    train_set = datasets.ImageFolder(args.data / "train", dynroute.MultiViewTransform(train_transform("cifar10"), 2))
    test_set = datasets.ImageFolder(args.data / "test", eval_transform())
    test_subset = Subset(test_set, range(0, len(test_set), 10))  # 100 images a class
    test_loader = DataLoader(test_subset, batch_size=100)
    dense = getattr(dynroute.models, f"resnet{args.depth}")()
    dense = dynroute.models.load_cifar_checkpoint(dense, args.weights).eval()
    with torch.no_grad():
        dense_accuracy = sum((dense(x).argmax(1) == y).sum().item() for x, y in test_loader) / len(test_subset)
    encoder = lambda images: dense.pool(dense.forward_features(images))  # noqa: E731  sample features of Table 9

    if args.checkpoint is not None:
        jobs = [("checkpoint", None)]
    else:
        jobs = [(method, target) for method in ("CoDiNet losses", "cost loss only") for target in args.budgets]
    results = [{"macs": 1.0, "accuracy": dense_accuracy, "label": f"dense ResNet-{args.depth}"}]
    numbers = {"dense_accuracy": dense_accuracy, "steps": args.steps, "runs": []}
    for method, target in jobs:
        start = time.perf_counter()
        model = dynroute.convert_resnet(copy.deepcopy(dense), input_size=(3, 32, 32))
        if args.checkpoint is not None:
            dynroute.models.load_cifar_checkpoint(model, args.checkpoint)
        else:
            sampler = RandomSampler(train_set, num_samples=args.steps * 32)
            loader = DataLoader(train_set, batch_size=32, sampler=sampler, collate_fn=dynroute.multiview_collate)
            train(model, loader, args.steps, target, codinet=method == "CoDiNet losses")
        run, record = analyse(model, test_loader, encoder)
        run = {"method": method, "target": target, **run, "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(run))
        numbers["runs"].append(run)
        results.append({"macs": run["macs_fraction"], "accuracy": run["accuracy"], "label": method})
        if len(numbers["runs"]) == 1:
            dynroute.summary(model, test_loader)
            shown = record
    draw(shown, results, args.out)
    (args.out / "numbers.json").write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
