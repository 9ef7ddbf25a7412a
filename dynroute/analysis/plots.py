"""Pictures of routing, saved as PNG: CoDiNet's Figs. 6, 7, 8, 11 for your own model.

Needs the ``plots`` extra (``pip install dynroute[plots]``: matplotlib and scikit-learn), imported
only when a picture is drawn. Every picture has its numbers as data too: :func:`path_embedding`
for the t-SNE, :func:`dynroute.execution_rate_by_class`, :func:`dynroute.macs_distribution`.
Figures are drawn on a :class:`matplotlib.figure.Figure` of their own, never through pyplot's
global state, so drawing works headless and leaves the user's figures alone.
"""

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dynroute.analysis.metrics import MacsDistribution, execution_rate_by_class

__all__ = [
    "path_embedding",
    "plot_path_tsne",
    "plot_accuracy_vs_macs",
    "plot_execution_by_class",
    "plot_macs_histogram",
]

_INSTALL_HINT = "pip install dynroute[plots]"


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"dynroute.plots needs {module.split('.')[0]}, which is not installed; install it with {_INSTALL_HINT}"
        ) from error


def _figure(figsize: tuple[float, float], dpi: int) -> Any:
    return _import("matplotlib.figure").Figure(figsize=figsize, dpi=dpi, layout="constrained")


def _save(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def path_embedding(paths: Tensor, perplexity: float = 30.0, seed: int = 0) -> Tensor:
    """2D t-SNE embedding of paths, e.g. the relaxed paths ``record.run_probs`` (Figs. 6, 7, 11).

    Args:
        paths: one path per sample (N, n_blocks), N >= 3.
        perplexity: t-SNE perplexity; lowered to N - 1 for small N.
        seed: random state of the embedding.

    Returns:
        Coordinates (N, 2), float32.
    """
    if paths.dim() != 2 or paths.shape[0] < 3:
        raise ValueError(f"paths must have shape (N, n_blocks) with N >= 3, but got {tuple(paths.shape)}")
    manifold = _import("sklearn.manifold")
    tsne = manifold.TSNE(n_components=2, perplexity=min(perplexity, paths.shape[0] - 1), random_state=seed)
    return torch.from_numpy(tsne.fit_transform(paths.detach().double().cpu().numpy())).float()


def plot_path_tsne(
    paths: Tensor,
    path: str | os.PathLike,
    labels: Tensor | None = None,
    executed_blocks: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    embedding: Tensor | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """t-SNE of paths coloured by class and/or by executed blocks (Figs. 6, 7, 11), saved as PNG.

    Args:
        paths: one path per sample (N, n_blocks), usually the relaxed ``record.run_probs``.
        path: the PNG file to write.
        labels: class of each sample (N,), for a panel coloured by class.
        executed_blocks: blocks each sample ran (N,), e.g. ``record.executed_blocks``, for a
            panel coloured by compute.
        class_names: legend names of the classes.
        embedding: precomputed :func:`path_embedding` of ``paths``; computed if None.
        figsize: inches; default 5.5 x 4.5 per panel.
        dpi: pixels per inch.

    Returns:
        The written path.
    """
    colourings = [
        (name, value) for name, value in (("class", labels), ("executed blocks", executed_blocks)) if value is not None
    ]
    if not colourings:
        raise ValueError("give labels, executed_blocks or both to colour the t-SNE by")
    for name, value in colourings:
        if value.shape != (paths.shape[0],):
            raise ValueError(f"the {name} colouring must have shape ({paths.shape[0]},), but got {tuple(value.shape)}")
    points = path_embedding(paths) if embedding is None else embedding
    figure = _figure(figsize or (5.5 * len(colourings), 4.5), dpi)
    for axes, (name, value) in zip(figure.subplots(1, len(colourings), squeeze=False)[0], colourings):
        if name == "class":
            for label in torch.unique(value).tolist():
                chosen = value == label
                text = class_names[label] if class_names is not None else str(label)
                axes.scatter(points[chosen, 0], points[chosen, 1], s=6, label=text, color=f"C{label % 10}")
            axes.legend(fontsize="small", markerscale=2, loc="best")
        else:
            scatter = axes.scatter(points[:, 0], points[:, 1], s=6, c=value.float(), cmap="viridis")
            colorbar = figure.colorbar(scatter, ax=axes, label="executed blocks")
            colorbar.ax.yaxis.set_major_locator(_import("matplotlib.ticker").MaxNLocator(integer=True))
        axes.set_title(f"paths (t-SNE) by {name}")
        axes.set_xticks([])
        axes.set_yticks([])
    return _save(figure, path)


def _field(result: Mapping[str, Any] | object, name: str) -> Any:
    return result[name] if isinstance(result, Mapping) else getattr(result, name)


def plot_accuracy_vs_macs(
    results: Iterable[Mapping[str, Any] | object],
    path: str | os.PathLike,
    xlabel: str = "MACs (fraction of dense)",
    figsize: tuple[float, float] = (6.0, 4.5),
    dpi: int = 100,
) -> Path:
    """Accuracy against MACs, one line per method, across budgets (Fig. 8 / Table 2), saved as PNG.

    Args:
        results: mappings (or objects with attributes) holding ``macs`` and ``accuracy``, and
            optionally ``label``, the method's name; points of a label are joined in MACs order.
        path: the PNG file to write.
        xlabel: what ``macs`` measures.
        figsize: inches.
        dpi: pixels per inch.

    Returns:
        The written path.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for result in results:
        try:
            point = (float(_field(result, "macs")), float(_field(result, "accuracy")))
        except (KeyError, AttributeError) as error:
            raise ValueError(f"each result needs 'macs' and 'accuracy', but got {result!r}") from error
        label = _field(result, "label") if _has_field(result, "label") else "dynroute"
        series.setdefault(str(label), []).append(point)
    if not series:
        raise ValueError("results is empty; pass at least one {'macs': ..., 'accuracy': ...}")
    figure = _figure(figsize, dpi)
    axes = figure.subplots()
    for label, points in series.items():
        macs, accuracy = zip(*sorted(points))
        axes.plot(macs, accuracy, marker="o", label=label)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("accuracy")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _has_field(result: Mapping[str, Any] | object, name: str) -> bool:
    return name in result if isinstance(result, Mapping) else hasattr(result, name)


def plot_execution_by_class(
    paths: Tensor,
    labels: Tensor,
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    block_names: Sequence[str] | None = None,
    figsize: tuple[float, float] = (7.0, 4.5),
    dpi: int = 100,
) -> Path:
    """Heat map of each block's execution rate within each class, saved as PNG.

    The numbers are :func:`dynroute.execution_rate_by_class` (paths, labels).

    Args:
        paths: hard or relaxed paths (N, n_blocks).
        labels: class indices (N,).
        path: the PNG file to write.
        class_names: row names; default the class indices.
        block_names: column names, e.g. ``dynroute.macs_table(model).block_names``.
        figsize: inches.
        dpi: pixels per inch.

    Returns:
        The written path.
    """
    num_classes = len(class_names) if class_names is not None else None
    rates = execution_rate_by_class(paths, labels, num_classes=num_classes)
    figure = _figure(figsize, dpi)
    axes = figure.subplots()
    image = axes.imshow(rates.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label="execution rate")
    axes.set_yticks(range(rates.shape[0]), class_names or [str(c) for c in range(rates.shape[0])])
    axes.set_xticks(range(rates.shape[1]), block_names or [str(b) for b in range(rates.shape[1])], rotation=90)
    axes.set_xlabel("block")
    axes.set_ylabel("class")
    return _save(figure, path)


def plot_macs_histogram(
    distribution: MacsDistribution,
    path: str | os.PathLike,
    bins: int = 30,
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Histogram of per-sample MACs as a fraction of dense, with the mean marked, saved as PNG.

    Args:
        distribution: from :func:`dynroute.macs_distribution` or ``record.macs()``.
        path: the PNG file to write.
        bins: histogram bins.
        figsize: inches.
        dpi: pixels per inch.

    Returns:
        The written path.
    """
    figure = _figure(figsize, dpi)
    axes = figure.subplots()
    axes.hist(distribution.fractions.numpy(), bins=bins, color="C0")
    axes.axvline(distribution.fraction, color="C3", linestyle="--", label=f"mean {distribution.fraction:.1%}")
    axes.set_xlabel("MACs per sample (fraction of dense)")
    axes.set_ylabel("samples")
    axes.legend()
    return _save(figure, path)
