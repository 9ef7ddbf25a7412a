"""Progress bars of the passes over a loader (summary, collect_routing, calibrate), with tqdm."""

from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, progress: bool | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown if ``progress`` is True, hidden if False, and if None only on a terminal.

    None is tqdm's own ``disable=None``: the bar is drawn when its output (stderr) is a terminal,
    so logs and captured output stay free of bar updates.
    """
    return tqdm(iterable, disable=None if progress is None else not progress, **kwargs)
