"""Multi-view data for CoDiNet training: M augmented views of each image, batched sample-major.

The consistency loss (CoDiNet Eq. 8) compares the routing paths of M augmented views of one
image, so a batch holds L samples x M views laid out sample-major: rows ``i * M .. i * M + M - 1``
are the views of sample i, and each label is repeated M times. :class:`MultiViewTransform` makes
the views, :func:`multiview_collate` lays them out, and :func:`train_transform` /
:func:`eval_transform` are the paper's augmentations built on torchvision transforms.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import transforms as T

from dynroute._validation import check_num_views

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiViewTransform",
    "multiview_collate",
    "train_transform",
    "eval_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The dataset names train_transform knows: natural images, mirrored in training ("imagefolder" for
# any other natural-image folder), and digits, which must not be: flipping a digit changes what it shows.
_FLIP_DATASETS = ("cifar10", "cifar100", "imagefolder")
_NO_FLIP_DATASETS = ("svhn", "digits", "mnist")


class MultiViewTransform:
    """Apply ``transform`` ``num_views`` times to one image and stack the views.

    Args:
        transform: a transform returning a (C, H, W) tensor, random so that the views differ.
        num_views: M, the views per image; 1 gives a (1, C, H, W) tensor.

    Example:
        >>> views = MultiViewTransform(train_transform("cifar10"), num_views=2)
        >>> views(PIL.Image.new("RGB", (32, 32))).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, transform: Callable[[Any], Tensor], num_views: int = 2) -> None:
        check_num_views(num_views)
        self.transform = transform
        self.num_views = num_views

    def __call__(self, image: Any) -> Tensor:
        """One image -> its views, shape (M, C, H, W)."""
        return torch.stack([self.transform(image) for _ in range(self.num_views)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_views={self.num_views}, transform={self.transform!r})"


def multiview_collate(batch: Sequence[tuple[Tensor, int | Tensor]]) -> tuple[Tensor, Tensor]:
    """Lay out L ``(views (M, C, H, W), label)`` pairs as (L * M, C, H, W) images and (L * M,) labels.

    Sample-major, as the losses expect: the M views of a sample are adjacent and share its label.
    A sample given as a single (C, H, W) image counts as one view.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    views = [images if images.dim() == 4 else images.unsqueeze(0) for images, _ in batch]
    counts = {images.shape[0] for images in views}
    if len(counts) != 1:
        raise ValueError(
            f"every sample must have the same number of views, but got {sorted(counts)}; "
            "wrap the dataset's transform in one MultiViewTransform"
        )
    labels = torch.as_tensor([int(label) for _, label in batch], dtype=torch.long)
    return torch.cat(views), labels.repeat_interleave(counts.pop())


def train_transform(
    dataset: str,
    image_size: int = 32,
    padding: int = 4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """The paper's training augmentation: random crop with ``padding`` px, horizontal flip, normalise.

    Args:
        dataset: one of ``"cifar10"``, ``"cifar100"``, ``"imagefolder"`` (other natural images),
            which get the flip, or ``"svhn"``, ``"digits"``, ``"mnist"``, which get the crop only;
            case-insensitive. Any other name is a ValueError.
        image_size: side of the square crop.
        padding: zero padding on each side before cropping.
        mean: per-channel normalisation mean; the default is ImageNet's, which the widely used
            pretrained CIFAR ResNets (Yerlan Idelbayev's pytorch_resnet_cifar10) were trained with.
        std: per-channel normalisation standard deviation.
    """
    name = dataset.lower() if isinstance(dataset, str) else dataset
    if name not in _FLIP_DATASETS + _NO_FLIP_DATASETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; train_transform knows {_FLIP_DATASETS} (flipped) and "
            f"{_NO_FLIP_DATASETS} (digits: crop only, no flip); use 'imagefolder' for other natural images"
        )
    augment: list = [T.RandomCrop(image_size, padding=padding)]
    if name in _FLIP_DATASETS:
        augment.append(T.RandomHorizontalFlip())
    return T.Compose([*augment, T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(
    image_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Test-time transform: optional resize and centre crop to ``image_size``, then normalise."""
    resize = [] if image_size is None else [T.Resize(image_size), T.CenterCrop(image_size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
