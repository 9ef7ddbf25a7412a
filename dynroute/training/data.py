"""Multi-view data for CoDiNet training: M augmented views of each image, batched sample-major.

The consistency loss (CoDiNet Eq. 8) compares the routing paths of M augmented views of one
image, so a batch holds L samples x M views laid out sample-major: rows ``i * M .. i * M + M - 1``
are the views of sample i, and each label is repeated M times. :class:`MultiViewTransform` makes
the views, :func:`multiview_collate` lays them out, and :func:`train_transform` /
:func:`eval_transform` give fixed-size crops from images of any size (the paper's pad-and-crop for
the datasets it used, random resized crops for photos) with torchvision transforms.
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
# Image sides the datasets ship at: there the paper's pad-and-crop runs on the image as it is.
_NATIVE_SIZES = {"cifar10": 32, "cifar100": 32, "svhn": 32, "mnist": 28}


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

    Sample-major, as the losses expect: the M views of a sample are adjacent and share its label,
    so the labels come already repeated per view; pass them to the loss as they are. A sample given
    as a single (C, H, W) image counts as one view.
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
    padding: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Training augmentation giving ``image_size`` x ``image_size`` crops from images of any size, normalised.

    Two policies, chosen by ``dataset``:

    - ``"imagefolder"`` (natural photos of any size): ImageNet-style ``RandomResizedCrop(image_size)``
      (torchvision's defaults: 8-100 % of the area, aspect ratio 3/4-4/3) and a horizontal flip.
    - A dataset name: the paper's pad-and-crop, ``RandomCrop(image_size, padding)``, plus a flip for
      natural images (``"cifar10"``, ``"cifar100"``) and none for digits (``"svhn"``, ``"digits"``,
      ``"mnist"``: flipping a digit changes what it shows). At the dataset's native size (32 px for
      CIFAR and SVHN, 28 px for MNIST) that is all; at any other ``image_size`` (and always for
      ``"digits"``, which has none) the image is first resized, shorter side to ``image_size``, and
      centre-cropped to a square.

    Args:
        dataset: one of the names above, case-insensitive; any other name is a ValueError.
        image_size: side of the square output.
        padding: zero padding in pixels on each side before the random crop; default
            ``image_size / 8``, rounded (the paper's 4 px at 32 px). Pad-and-crop only: ``"imagefolder"``
            refuses it.
        mean: per-channel normalisation mean; the default is ImageNet's, which the widely used
            pretrained CIFAR ResNets (Yerlan Idelbayev's pytorch_resnet_cifar10) were trained with.
        std: per-channel normalisation standard deviation.

    Returns:
        A transform from a PIL image to a normalised (C, image_size, image_size) tensor.

    Example:
        >>> train_transform("imagefolder", image_size=64)(PIL.Image.new("RGB", (500, 375))).shape
        torch.Size([3, 64, 64])
    """
    name = dataset.lower() if isinstance(dataset, str) else dataset
    if name not in _FLIP_DATASETS + _NO_FLIP_DATASETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; train_transform knows {_FLIP_DATASETS} (flipped) and "
            f"{_NO_FLIP_DATASETS} (digits: crop only, no flip); use 'imagefolder' for other natural images"
        )
    if name == "imagefolder":
        if padding is not None:
            raise ValueError(
                f"padding={padding} applies to the pad-and-crop of a dataset name, but 'imagefolder' takes "
                "random resized crops; drop padding, or name the dataset (e.g. 'cifar10') for pad-and-crop"
            )
        augment: list = [T.RandomResizedCrop(image_size)]
    else:
        resize = [] if _NATIVE_SIZES.get(name) == image_size else [T.Resize(image_size), T.CenterCrop(image_size)]
        padding = max(1, round(image_size / 8)) if padding is None else padding
        augment = [*resize, T.RandomCrop(image_size, padding=padding)]
    if name in _FLIP_DATASETS:
        augment.append(T.RandomHorizontalFlip())
    return T.Compose([*augment, T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(
    image_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 1.0,
) -> T.Compose:
    """Test-time transform: resize and centre crop to ``image_size`` x ``image_size`` (any input size), normalise.

    The policy is timm's ``crop_pct``: the shorter side is resized to ``image_size / crop_pct``, then
    the centre ``image_size`` square is cut out. The default 1.0 keeps the whole shorter side
    (the view of CIFAR images resized to another size); 0.875 is the ImageNet convention that goes
    with random resized crops in training (resize to 256, crop 224).

    Args:
        image_size: side of the square output; None leaves the image at its size (CIFAR's 32 px test images).
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        crop_pct: fraction of the resized shorter side kept by the centre crop, in (0, 1].
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], but got {crop_pct!r}; e.g. 0.875 for ImageNet, 1.0 for CIFAR")
    resize = [] if image_size is None else [T.Resize(round(image_size / crop_pct)), T.CenterCrop(image_size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
