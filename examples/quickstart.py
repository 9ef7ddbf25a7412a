"""Train a routed ResNet the CoDiNet way on real data, offline, in minutes on a CPU.

The data is scikit-learn's handwritten digits (1,797 8x8 images shipped inside the package),
upsampled to 16x16. A CIFAR ResNet-20 is converted with ``dynroute.convert_resnet``, trained in
stage 1 with all three path losses and a budget of 60 % of dense MACs, then in stage 2 with the
routers frozen and hard decisions. It prints test accuracy, average MACs against the dense
network, the number of distinct paths, the eval-time speedup over the dense network and the
wall time of the whole run.

    python examples/quickstart.py --threads 2
"""

import argparse
import logging
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

import dynroute

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from training_loop import evaluate  # noqa: E402

# Importing torch.utils.benchmark imports torch.utils.cpp_extension, which on a CUDA build of torch without a GPU
# logs "No CUDA runtime is found, using CUDA_HOME=..." at import. It concerns compiling CUDA extensions, which the
# timing never does: drop that one record, before the import.
logging.getLogger("torch.utils.cpp_extension").addFilter(
    lambda record: not record.getMessage().startswith("No CUDA runtime is found")
)
from torch.utils import benchmark  # noqa: E402

IMAGE_SIZE = 16  # the digits are 8x8; twice that gives the ResNet's three stages room


class DigitImages(Dataset):
    """scikit-learn digits as (1, 16, 16) float images in [0, 1], each passed through ``transform``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def load_digit_splits(test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels); images (N, 1, 16, 16) in [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(len(labels) * (1 - test_fraction))
    train, test = order[:split], order[split:]
    return images[train], labels[train], images[test], labels[test]


def dense_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in an unconverted network: the dense baseline for timing."""
    dense = dynroute.models.resnet20(num_classes=10, in_chans=1)
    state = {key: value for key, value in model.state_dict().items() if ".router." not in key}
    dense.load_state_dict(state)
    return dense.eval()


def paired_eval_times(
    dense: torch.nn.Module, routed: torch.nn.Module, images: torch.Tensor, rounds: int = 5
) -> tuple[float, float, float]:
    """Median wall times of a no-grad eval forward over ``images`` and the median of their paired ratios.

    The two networks are timed in alternation, ``rounds`` times, so a change in the host's load
    between them moves both: (dense seconds, routed seconds, dense / routed).
    """
    timers = [
        benchmark.Timer(
            "with torch.no_grad(): model(images)", globals={"model": model.eval(), "images": images, "torch": torch}
        )
        for model in (dense, routed)
    ]
    pairs = [[timer.blocked_autorange(min_run_time=0.4).median for timer in timers] for _ in range(rounds)]
    return (
        statistics.median(dense_s for dense_s, _ in pairs),
        statistics.median(routed_s for _, routed_s in pairs),
        statistics.median(dense_s / routed_s for dense_s, routed_s in pairs),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="stage-1 epochs (relaxed gates, all losses)")
    parser.add_argument("--stage2-epochs", type=int, default=2, help="stage-2 epochs (routers frozen, hard)")
    parser.add_argument("--budget", type=float, default=0.6, help="target average cost, fraction of dense MACs")
    parser.add_argument("--views", type=int, default=2, help="augmented views per image")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (each with --views views)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each epoch early (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_x, train_y, test_x, test_y = load_digit_splits(seed=args.seed)
    augment = T.Compose([T.RandomCrop(IMAGE_SIZE, padding=2), T.Normalize((0.5,), (0.5,))])  # digits: no flips
    train_set = DigitImages(train_x, train_y, dynroute.MultiViewTransform(augment, args.views))
    test_set = DigitImages(test_x, test_y, T.Normalize((0.5,), (0.5,)))
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=dynroute.multiview_collate
    )
    test_loader = DataLoader(test_set, batch_size=len(test_set))

    model = dynroute.convert_resnet(
        dynroute.models.resnet20(num_classes=10, in_chans=1), input_size=(1, IMAGE_SIZE, IMAGE_SIZE)
    )
    criterion = dynroute.CoDiNetLoss(dynroute.macs_table(model), num_views=args.views, target=args.budget)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = min(len(train_loader), args.max_steps or len(train_loader))
    total_epochs = args.epochs + args.stage2_epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=total_epochs * steps_per_epoch)

    with tqdm(total=total_epochs * steps_per_epoch, desc="training") as bar:
        for epoch in range(total_epochs):
            dynroute.set_stage(model, 1 if epoch < args.epochs else 2)
            model.train()
            for step, (images, labels) in enumerate(train_loader):
                if step == steps_per_epoch:
                    break
                logits = model(images)
                loss, terms = criterion(logits, labels, dynroute.routing_paths(model))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                criterion.step(model)  # the budget controller: gamma in stage 1, the threshold in stage 2
                scheduler.step()
                bar.set_postfix(stage=dynroute.get_stage(model), ce=f"{terms['ce']:.3f}")
                bar.update()

    report = evaluate(model, test_loader, progress=False)
    test_images = next(iter(test_loader))[0]
    dense_seconds, routed_seconds, speedup = paired_eval_times(dense_copy(model), model, test_images)
    print(f"test accuracy   {report['top1']:.2f} % on {report['images']} held-out digits")
    print(
        f"average MACs    {report['macs'] / 1e6:.2f} M of {report['dense_macs'] / 1e6:.2f} M dense "
        f"= {100 * report['macs_fraction']:.1f} % (budget {100 * args.budget:.0f} %)"
    )
    print(f"distinct paths  {report['distinct_paths']} over {report['images']} test images")
    print(
        f"eval speedup    {speedup:.2f}x  (dense {1e3 * dense_seconds:.1f} ms, "
        f"routed {1e3 * routed_seconds:.1f} ms for {len(test_images)} images, {torch.get_num_threads()} threads)"
    )
    seconds = time.perf_counter() - start
    print(f"wall time       {seconds:.0f} s (data, training, evaluation and timing; {torch.get_num_threads()} threads)")
    return {**report, "speedup": speedup, "wall_seconds": seconds}


if __name__ == "__main__":
    main()
