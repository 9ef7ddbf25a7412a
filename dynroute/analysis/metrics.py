"""Routing analytics of CoDiNet (Wang et al., TPAMI 2021, Sec. 5): where the compute goes, and why.

Collect once with :func:`collect_routing` (eval mode, hard deterministic decisions), then call the
pure functions on the collected tensors: :func:`execution_rate`, :func:`execution_rate_by_class`,
:func:`gate_entropy`, :func:`macs_distribution`, :func:`path_agreement`, :func:`prediction_kl`,
:func:`similarity_correlation`. :func:`augmentation_agreement` compares each image with an
augmented copy in one pass (the paper's path agreement and Fig. 9).
"""

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynroute._progress import progress_bar
from dynroute.analysis.accounting import count_distinct_paths, hard_paths, sample_macs, table_mismatch
from dynroute.conversion.flops import MacsTable, macs_table
from dynroute.layers.routing import routing_logits, routing_paths

__all__ = [
    "RoutingRecord",
    "MacsDistribution",
    "AugmentationAgreement",
    "collect_routing",
    "execution_rate",
    "execution_rate_by_class",
    "gate_entropy",
    "macs_distribution",
    "path_agreement",
    "prediction_kl",
    "similarity_correlation",
    "augmentation_agreement",
]

Augment = Callable[[Tensor], Tensor]
Encoder = Callable[[Tensor], Tensor]
_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True, eq=False)
class MacsDistribution:
    """Per-sample MACs of a set of paths, next to the dense network's.

    Attributes:
        samples: MACs each sample paid, shape (N,), float64.
        dense_macs: MACs of the original, unconverted network.
    """

    samples: Tensor
    dense_macs: int

    @property
    def mean(self) -> float:
        """Mean MACs per sample."""
        return self.samples.mean().item()

    @property
    def fraction(self) -> float:
        """Mean MACs per sample as a fraction of dense."""
        return self.mean / self.dense_macs

    @property
    def fractions(self) -> Tensor:
        """Each sample's MACs as a fraction of dense, shape (N,)."""
        return self.samples / self.dense_macs

    def quantiles(self, q: Iterable[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> Tensor:
        """Quantiles of the per-sample MACs, one per entry of ``q`` in [0, 1]."""
        return torch.quantile(self.samples, torch.tensor(list(q), dtype=torch.float64))


@dataclass(frozen=True, eq=False, repr=False)
class RoutingRecord:
    """What a converted model did on every sample of a loader, in loader order (all on the CPU).

    Attributes:
        paths: hard decisions u (N, n_blocks), uint8 0/1, block order of :func:`dynroute.gated_blocks`.
        run_probs: the relaxed path, each router's run probability softmax(logits)[..., 1], (N, n_blocks).
        logits: model outputs (N, num_classes).
        labels: targets (N,) when the loader yields ``(images, labels)``, else None.
        features: ``encoder(images)`` flattened to (N, D) when an encoder was given, else None.
        table: the model's MAC table; :meth:`macs` raises a ValueError if a batch had another
            input size than the table's.
    """

    paths: Tensor
    run_probs: Tensor
    logits: Tensor
    labels: Tensor | None
    features: Tensor | None
    table: MacsTable
    _table_mismatch: str | None = field(default=None, repr=False)  # why the table does not fit, if it does not

    @property
    def num_samples(self) -> int:
        """Samples recorded."""
        return self.paths.shape[0]

    @property
    def predictions(self) -> Tensor:
        """Predicted classes (N,)."""
        return self.logits.argmax(dim=1)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy; needs labels."""
        if self.labels is None:
            raise ValueError("this record has no labels; collect from a loader that yields (images, labels)")
        return (self.predictions == self.labels).double().mean().item()

    @property
    def executed_blocks(self) -> Tensor:
        """Number of blocks each sample executed (N,)."""
        return self.paths.sum(dim=1)

    @property
    def distinct_paths(self) -> int:
        """Number of distinct hard paths taken."""
        return count_distinct_paths(self.paths)

    def execution_rate(self) -> Tensor:
        """Fraction of samples that ran each block (n_blocks,)."""
        return execution_rate(self.paths)

    def gate_entropy(self) -> Tensor:
        """Mean entropy of each router's decision in bits (n_blocks,); see :func:`gate_entropy`."""
        return gate_entropy(self.run_probs)

    def macs(self) -> MacsDistribution:
        """Per-sample MACs of the recorded paths; a ValueError if the table is of another input size."""
        if self._table_mismatch is not None:
            raise ValueError(self._table_mismatch)
        return macs_distribution(self.paths, self.table)

    def __repr__(self) -> str:
        features = None if self.features is None else tuple(self.features.shape)
        return (
            f"RoutingRecord(num_samples={self.num_samples}, num_blocks={self.paths.shape[1]}, "
            f"distinct_paths={self.distinct_paths}, labels={self.labels is not None}, features={features})"
        )


@dataclass(frozen=True, eq=False)
class AugmentationAgreement:
    """How an image and its augmented copy are routed and classified.

    Attributes:
        num_agreeing: images whose hard path equals their augmented copy's.
        num_samples: images compared.
        kl: KL(p(x) || p(augment(x))) of the predictions, per image (N,).
    """

    num_agreeing: int
    num_samples: int
    kl: Tensor

    @property
    def agreement(self) -> float:
        """Fraction of images that keep their path under the augmentation."""
        return self.num_agreeing / self.num_samples

    @property
    def mean_kl(self) -> float:
        """Mean prediction KL over the images, in nats."""
        return self.kl.mean().item()


def _check_matrix(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.dim() != 2:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a 2D tensor (N, n), but got {shape}")
    if value.shape[0] == 0:
        raise ValueError(f"{name} holds no samples; collect from a non-empty loader")


def _check_same_rows(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must describe the same samples, but got {a.shape[0]} and {b.shape[0]} rows"
        )


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _check_matrix(name_a, a)
    _check_matrix(name_b, b)
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, but got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def execution_rate(paths: Tensor) -> Tensor:
    """Fraction of samples whose hard path runs each block.

    Args:
        paths: gates (N, n_blocks); a block runs where its gate is >= 0.5.

    Returns:
        Execution rates (n_blocks,), float64 in [0, 1].
    """
    _check_matrix("paths", paths)
    return hard_paths(paths).double().mean(dim=0)


def execution_rate_by_class(paths: Tensor, labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Execution rate of each block among the samples of each class.

    Args:
        paths: gates (N, n_blocks).
        labels: class indices (N,).
        num_classes: rows of the result; default ``labels.max() + 1``.

    Returns:
        Rates (num_classes, n_blocks), float64; NaN for a class with no samples.
    """
    _check_matrix("paths", paths)
    if labels.dim() != 1 or labels.is_floating_point():
        raise ValueError(f"labels must be class indices of shape (N,), but got {labels.dtype} {tuple(labels.shape)}")
    _check_same_rows("paths", paths, "labels", labels)
    labels = labels.long().to(paths.device)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), but got [{int(labels.min())}, {int(labels.max())}]")
    one_hot = F.one_hot(labels, num_classes).double()  # (N, C)
    runs = one_hot.T @ hard_paths(paths).double()  # (C, n_blocks)
    return runs / one_hot.sum(dim=0).unsqueeze(1)


def gate_entropy(run_probs: Tensor) -> Tensor:
    """Mean entropy of each router's run/skip decision, in bits: 1 undecided, 0 saturated.

    A block whose router is saturated the same way for every sample is pruned or kept for all of
    them; routing that depends on the input needs routers that stay undecided on some samples.

    Args:
        run_probs: run probabilities softmax(router logits)[..., 1] (N, n_blocks), as
            :attr:`RoutingRecord.run_probs` holds them.

    Returns:
        Entropies (n_blocks,), float64 in [0, 1], averaged over the N samples.
    """
    _check_matrix("run_probs", run_probs)
    if not run_probs.is_floating_point() or run_probs.min() < 0 or run_probs.max() > 1:
        raise ValueError("run_probs must be probabilities in [0, 1]: pass softmax(router logits)[..., 1]")
    bernoulli = torch.distributions.Bernoulli(probs=run_probs.double())
    return bernoulli.entropy().mean(dim=0) / math.log(2)


def macs_distribution(paths: Tensor, table: MacsTable) -> MacsDistribution:
    """Per-sample MACs of ``paths`` (N, n_blocks) and their mean as a fraction of dense."""
    return MacsDistribution(samples=sample_macs(paths, table).cpu(), dense_macs=table.dense_macs)


def path_agreement(paths_a: Tensor, paths_b: Tensor) -> float:
    """Fraction of samples whose hard path in ``paths_a`` equals the one in ``paths_b``.

    Args:
        paths_a: gates (N, n_blocks), e.g. of the original images.
        paths_b: gates (N, n_blocks) of the same samples, e.g. augmented.

    Returns:
        The agreeing fraction in [0, 1]; times N it is the paper's count (5,342 of 10,000).
    """
    _check_pair("paths_a", paths_a, "paths_b", paths_b)
    same = (hard_paths(paths_a) == hard_paths(paths_b)).all(dim=1)
    return same.double().mean().item()


def prediction_kl(logits_a: Tensor, logits_b: Tensor, reduction: str = "mean") -> Tensor:
    """KL(p_a || p_b) between the softmax predictions of two views of each sample (Fig. 9).

    Args:
        logits_a: logits (N, num_classes) of the original samples.
        logits_b: logits (N, num_classes) of their augmented copies.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (one value per sample).

    Returns:
        The KL divergence in nats: a scalar, or (N,) with ``reduction="none"``.
    """
    _check_pair("logits_a", logits_a, "logits_b", logits_b)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, but got {reduction!r}")
    log_a = logits_a.double().log_softmax(dim=1)
    log_b = logits_b.double().log_softmax(dim=1)
    kl = F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(dim=1)
    if reduction == "none":
        return kl
    return kl.mean() if reduction == "mean" else kl.sum()


def similarity_correlation(features: Tensor, paths: Tensor, chunk_size: int = 1024) -> float:
    """Pearson r between sample similarity and path similarity over all pairs i < j (Table 9).

    Both similarities are cosine similarities: of the samples' features and of their paths. The
    N (N - 1) / 2 pairs are visited in row chunks, so memory stays O(chunk_size * N).

    Args:
        features: one feature vector per sample (N, D), from any encoder.
        paths: paths (N, n_blocks) of the same samples, relaxed (``run_probs``) or hard.
        chunk_size: rows per chunk of the pairwise similarity matrices.

    Returns:
        The correlation coefficient in [-1, 1]; NaN if either similarity is constant over the pairs.
    """
    _check_matrix("features", features)
    _check_matrix("paths", paths)
    _check_same_rows("features", features, "paths", paths)
    if features.shape[0] < 3:
        raise ValueError(f"a correlation over pairs needs at least 3 samples, but got {features.shape[0]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, but got {chunk_size}")
    unit_features = F.normalize(features.double(), dim=1)
    unit_paths = F.normalize(paths.double().to(features.device), dim=1)
    n = features.shape[0]
    columns = torch.arange(n, device=features.device)
    sums = torch.zeros(5, dtype=torch.float64, device=features.device)  # x, y, xx, yy, xy
    for start in range(0, n, chunk_size):
        rows = columns[start : start + chunk_size]
        upper = columns.unsqueeze(0) > rows.unsqueeze(1)
        x = (unit_features[rows] @ unit_features.T)[upper]
        y = (unit_paths[rows] @ unit_paths.T)[upper]
        sums += torch.stack([x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
    pairs = n * (n - 1) / 2
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = (sums / pairs).tolist()
    covariance = mean_xy - mean_x * mean_y
    variance_x, variance_y = mean_xx - mean_x**2, mean_yy - mean_y**2
    if variance_x <= 0 or variance_y <= 0:
        return float("nan")
    return covariance / (variance_x * variance_y) ** 0.5


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _split_batch(batch: Tensor | tuple | list) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], labels
    raise TypeError(
        f"the loader must yield image tensors or (images, labels, ...) tuples, but yielded {type(batch).__name__}"
    )


def _augment_each(augment: Augment, images: Tensor) -> Tensor:
    # Per image, so random augmentations draw their parameters for each sample, not once per batch.
    return torch.stack([augment(image) for image in images])


class _Collector:
    """Runs the model on batches and keeps what :class:`RoutingRecord` holds.

    With ``stop_on_mismatch`` a batch that does not fit the MAC table raises at once; otherwise the
    record keeps the reason and only its MACs are refused.
    """

    def __init__(self, model: nn.Module, table: MacsTable | None = None, stop_on_mismatch: bool = False) -> None:
        self.model, self.stop_on_mismatch = model, stop_on_mismatch
        self.table = macs_table(model) if table is None else table
        self.paths: list[Tensor] = []
        self.run_probs: list[Tensor] = []
        self.logits: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.features: list[Tensor] = []
        self.table_mismatch: str | None = None

    def add(self, images: Tensor, labels: Tensor | None = None, encoder: Encoder | None = None) -> None:
        logits = self.model(images)
        if self.table_mismatch is None:
            self.table_mismatch = table_mismatch(self.model, self.table)
            if self.table_mismatch is not None and self.stop_on_mismatch:
                raise ValueError(self.table_mismatch)
        self.logits.append(logits.float().cpu())
        self.paths.append(hard_paths(routing_paths(self.model)).cpu())
        self.run_probs.append(routing_logits(self.model).float().softmax(dim=-1)[..., 1].cpu())
        if labels is not None:
            self.labels.append(labels.cpu())
        if encoder is not None:
            self.features.append(encoder(images).flatten(1).float().cpu())

    def record(self) -> RoutingRecord:
        if not self.paths:
            raise ValueError("the loader yielded no batches; pass a non-empty loader")
        has_labels = len(self.labels) == len(self.paths)
        return RoutingRecord(
            paths=torch.cat(self.paths),
            run_probs=torch.cat(self.run_probs),
            logits=torch.cat(self.logits),
            labels=torch.cat(self.labels) if has_labels else None,
            features=torch.cat(self.features) if self.features else None,
            table=self.table,
            _table_mismatch=self.table_mismatch,
        )


@contextmanager
def _evaluating(*modules: object) -> Iterator[None]:
    """Eval mode and no gradients inside; every submodule's own mode restored after."""
    roots = [module for module in modules if isinstance(module, nn.Module)]
    modes = [(m, m.training) for root in roots for m in root.modules()]  # parents before children
    try:
        for root in roots:
            root.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.train(mode)


def collect_routing(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str | None = None,
    augment: Augment | None = None,
    encoder: Encoder | None = None,
    max_batches: int | None = None,
    table: MacsTable | None = None,
    progress: bool | None = None,
) -> RoutingRecord:
    """Run a converted model over a loader in eval mode and record its paths and predictions.

    The record counts MACs with ``table``, which holds for one input size: if a batch had another
    size, paths, predictions and accuracy are recorded as usual, but :meth:`RoutingRecord.macs`
    raises a ValueError rather than count wrongly. To count MACs at another size (train at 224,
    test at 256), pass a table of that size, ``table=dynroute.build_macs_table(model, (C, H, W))``.

    Args:
        model: a network converted with :func:`dynroute.convert_resnet`; left in the mode it had.
        loader: yields image batches (N, C, H, W) or ``(images, labels, ...)`` tuples.
        device: where to run; default the model's.
        augment: applied to each image (C, H, W) before the forward, if given.
        encoder: features for :func:`similarity_correlation`, ``encoder(images) -> (N, ...)``;
            an ``nn.Module`` encoder is run in eval mode too.
        max_batches: stop after this many batches.
        table: the MAC table of the loader's image size; default :func:`dynroute.macs_table` (model).
        progress: show a tqdm progress bar over the batches; None (default) shows it when stderr is
            a terminal.

    Returns:
        The :class:`RoutingRecord` of every sample, in loader order.

    Example:
        >>> record = dynroute.collect_routing(model, loader)
        >>> record.distinct_paths, record.macs().fraction
    """
    collector = _Collector(model, table)
    bar = {"progress": progress, "desc": "collect_routing"}
    return _collect(collector, loader, device, augment, encoder, max_batches, bar)


def collect_for_macs(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    table: MacsTable | None = None,
    **bar: Any,
) -> RoutingRecord:
    """:func:`collect_routing` for a MAC count: the ValueError of a table of another size comes at that batch.

    ``bar`` holds the progress bar's ``progress`` switch and tqdm settings (``desc``, ``leave``).
    """
    collector = _Collector(model, table, stop_on_mismatch=True)
    return _collect(collector, loader, device, None, None, max_batches, bar)


def _collect(
    collector: "_Collector",
    loader: Iterable,
    device: torch.device | str | None,
    augment: Augment | None,
    encoder: Encoder | None,
    max_batches: int | None,
    bar: dict[str, Any],
) -> RoutingRecord:
    """Feed ``collector`` the loader's batches in eval mode without gradients, under a progress bar; its record."""
    device = _model_device(collector.model, device)
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    with _evaluating(collector.model, encoder), progress_bar(total=total, unit="batch", **bar) as batches:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            images, labels = _split_batch(batch)
            images = images.to(device)
            collector.add(images if augment is None else _augment_each(augment, images), labels, encoder)
            batches.update()
    return collector.record()


def augmentation_agreement(
    model: nn.Module,
    loader: Iterable,
    augment: Augment,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
) -> AugmentationAgreement:
    """Route every image and an augmented copy of it; count equal paths and measure the KL.

    Both views of a batch are run in the same step, so the loader may shuffle.

    Args:
        model: a converted network; left in the mode it had.
        loader: yields image batches or ``(images, labels, ...)`` tuples.
        augment: applied to each image (C, H, W), e.g. ``torchvision.transforms.v2.RandomHorizontalFlip(1.0)``.
        device: where to run; default the model's.
        max_batches: stop after this many batches.

    Returns:
        Agreeing count, sample count and per-image prediction KL.
    """
    device = _model_device(model, device)
    table = macs_table(model)
    original, augmented = _Collector(model, table), _Collector(model, table)
    with _evaluating(model):
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            images = _split_batch(batch)[0].to(device)
            original.add(images)
            augmented.add(_augment_each(augment, images))
    a, b = original.record(), augmented.record()
    return AugmentationAgreement(
        num_agreeing=round(path_agreement(a.paths, b.paths) * a.num_samples),
        num_samples=a.num_samples,
        kl=prediction_kl(a.logits, b.logits, reduction="none"),
    )
