"""Evaluate a model over a loader in one pass: top-1 accuracy, MACs per image and distinct paths."""

from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dynroute.analysis.metrics import _evaluating, _model_device, _split_batch, collect_for_macs
from dynroute.conversion.flops import MacsTable, count_macs
from dynroute.layers.routing import gated_blocks

__all__ = ["Evaluation", "evaluate"]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured; ``str()`` of it is a one-line report.

    Attributes:
        top1: top-1 accuracy in percent.
        images: images evaluated.
        macs: mean MACs per image.
        dense_macs: MACs of one image through the dense network (:func:`dynroute.count_macs`).
        macs_fraction: ``macs / dense_macs``.
        macs_std_fraction: standard deviation of the per-image MACs (over the images, not a sample
            estimate) as a fraction of ``dense_macs``; 0 for a dense model.
        distinct_paths: distinct hard paths the images took; 1 for a dense model.
        input_size: (C, H, W) of the images, at which the MACs were counted.
    """

    top1: float
    images: int
    macs: float
    dense_macs: int
    macs_fraction: float
    macs_std_fraction: float
    distinct_paths: int
    input_size: tuple[int, ...]

    def __str__(self) -> str:
        return (
            f"top-1 {self.top1:.2f}% on {self.images:,} images | MACs {100 * self.macs_fraction:.1f}% of dense "
            f"({self.macs / 1e6:,.1f} M of {self.dense_macs / 1e6:,.1f} M at {tuple(self.input_size)}), spread "
            f"(std) {100 * self.macs_std_fraction:.1f}% of dense | {self.distinct_paths:,} distinct paths"
        )


def _top1(predictions: Tensor, labels: Tensor) -> float:
    """Percentage of ``predictions`` (N,) equal to ``labels`` (N,)."""
    return 100.0 * (predictions == labels).double().mean().item()


def _progress_bar(loader: Iterable, progress: bool | None, max_batches: int | None) -> Iterable:
    """``loader`` behind a tqdm bar on stderr: shown if ``progress``, or when stderr is a terminal if None."""
    total = len(loader) if isinstance(loader, Sized) else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(loader, desc="evaluate", total=total, leave=False, disable=None if progress is None else not progress)


def _evaluate_dense(model: nn.Module, loader: Iterable, max_batches: int | None) -> Evaluation:
    """:func:`evaluate` for a model without gated blocks: every image pays the dense MACs of its size."""
    device = _model_device(model, None)
    predictions, labels, input_size = [], [], None
    with _evaluating(model):
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            images, batch_labels = _split_batch(batch)
            if batch_labels is None:
                raise ValueError("evaluate needs labels; pass a loader that yields (images, labels)")
            if input_size is None:
                input_size = tuple(images.shape[1:])
            elif tuple(images.shape[1:]) != input_size:
                raise ValueError(
                    f"batch {index} has images of size {tuple(images.shape[1:])}, the first had {input_size}; MACs "
                    "depend on the image size, so evaluate images of one size (resize them in the transform)"
                )
            predictions.append(model(images.to(device)).argmax(1).cpu())
            labels.append(batch_labels.cpu())
    if input_size is None:
        raise ValueError("the loader yielded no batches; pass a non-empty loader")
    dense = count_macs(model, input_size)
    return Evaluation(
        top1=_top1(torch.cat(predictions), torch.cat(labels)),
        images=sum(batch.numel() for batch in labels),
        macs=float(dense),
        dense_macs=dense,
        macs_fraction=1.0,
        macs_std_fraction=0.0,
        distinct_paths=1,
        input_size=input_size,
    )


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    table: MacsTable | None = None,
    progress: bool | None = None,
    max_batches: int | None = None,
) -> Evaluation:
    """Top-1 accuracy, MACs per image and distinct paths of ``model`` over a labelled loader.

    The model runs in eval mode without gradients (its own mode is restored after), so a converted
    model takes hard decisions and skips blocks for real; each image's MACs are those of the path it
    took (:func:`dynroute.collect_routing` records them). A dense model, one without gated blocks, is
    counted with :func:`dynroute.count_macs` at the loader's image size: fraction 1, spread 0, one path.

    Args:
        model: a converted or a dense network (or its DDP / ``torch.compile`` wrapper), on the device to run on.
        loader: yields ``(images (N, C, H, W), labels (N,), ...)`` batches.
        table: for a converted model, the MAC table of the loader's image size; default
            :func:`dynroute.macs_table` (model). A batch of another size raises a ValueError at that batch.
        progress: a progress bar on stderr; None shows it when stderr is a terminal.
        max_batches: stop after this many batches.

    Returns:
        The :class:`Evaluation`; ``dataclasses.asdict`` of it is a JSON-ready report.

    Example:
        >>> result = dynroute.evaluate(model, test_loader)
        >>> result.top1, result.macs_fraction, result.distinct_paths
    """
    batches = _progress_bar(loader, progress, max_batches)
    if not any(True for _ in gated_blocks(model)):
        if table is not None:
            raise ValueError(
                f"{type(model).__name__} has no gated blocks, so a MAC table does not apply; drop table=, or "
                "convert the model with dynroute.convert_resnet first"
            )
        return _evaluate_dense(model, batches, max_batches)
    record = collect_for_macs(model, batches, max_batches=max_batches, table=table)
    if record.labels is None:
        raise ValueError("evaluate needs labels; pass a loader that yields (images, labels)")
    macs = record.macs()
    return Evaluation(
        top1=_top1(record.predictions, record.labels),
        images=record.num_samples,
        macs=macs.mean,
        dense_macs=macs.dense_macs,
        macs_fraction=macs.fraction,
        macs_std_fraction=macs.samples.std(correction=0).item() / macs.dense_macs,
        distinct_paths=record.distinct_paths,
        input_size=record.table.input_size,
    )
