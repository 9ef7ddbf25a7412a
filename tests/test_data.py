"""Tests of dynroute.data: multi-view transform, sample-major collate, default augmentations."""

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

import dynroute
from dynroute.training.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiViewTransform,
    eval_transform,
    multiview_collate,
    train_transform,
)


def _image(seed: int, size: int | tuple[int, int] = 32) -> Image.Image:
    """A random RGB image, ``size`` = side or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


class _Images(Dataset):
    def __init__(self, count: int, transform) -> None:
        self.images = [_image(seed) for seed in range(count)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), index % 3


class TestMultiViewTransform:
    """M calls of the wrapped transform, stacked in call order."""

    @pytest.mark.parametrize("num_views", [1, 2, 4])
    def test_views_are_the_transform_applied_m_times(self, num_views: int) -> None:
        image = _image(0)
        transform = train_transform("cifar10")
        torch.manual_seed(3)
        views = MultiViewTransform(transform, num_views)(image)
        torch.manual_seed(3)
        reference = torch.stack([transform(image) for _ in range(num_views)])
        assert views.shape == (num_views, 3, 32, 32)
        assert torch.equal(views, reference)

    def test_random_views_differ(self) -> None:
        torch.manual_seed(0)
        views = MultiViewTransform(train_transform("cifar10"), 8)(_image(1))
        assert len({tuple(view.flatten()[:64].tolist()) for view in views}) > 1

    @pytest.mark.parametrize("bad", [0, -1, 2.0, True])
    def test_bad_num_views(self, bad) -> None:
        with pytest.raises(ValueError, match="num_views"):
            MultiViewTransform(T.ToTensor(), bad)


class TestMultiviewCollate:
    """L samples x M views laid out sample-major, labels repeated per view."""

    def test_layout_matches_a_loop(self) -> None:
        samples = [(torch.randn(3, 2, 4, 4), label) for label in (5, 1, 7)]
        images, labels = multiview_collate(samples)
        assert images.shape == (9, 2, 4, 4)
        for i, (views, label) in enumerate(samples):
            for j in range(3):
                assert torch.equal(images[i * 3 + j], views[j])
                assert labels[i * 3 + j] == label

    def test_single_images_count_as_one_view(self) -> None:
        samples = [(torch.randn(3, 4, 4), 0), (torch.randn(3, 4, 4), 1)]
        images, labels = multiview_collate(samples)
        assert torch.equal(images, torch.stack([samples[0][0], samples[1][0]]))
        assert labels.tolist() == [0, 1]

    def test_mixed_view_counts_are_refused(self) -> None:
        with pytest.raises(ValueError, match="same number of views"):
            multiview_collate([(torch.randn(2, 3, 4, 4), 0), (torch.randn(3, 3, 4, 4), 1)])

    def test_empty_batch_is_refused(self) -> None:
        with pytest.raises(ValueError, match="empty"):
            multiview_collate([])

    def test_loader_batches_feed_the_consistency_loss(self) -> None:
        """Identical views of each sample give identical eval paths, so consistency is exactly zero."""
        views = MultiViewTransform(eval_transform(), 2)
        loader = DataLoader(_Images(4, views), batch_size=4, collate_fn=multiview_collate)
        images, labels = next(iter(loader))
        assert labels.tolist() == [0, 0, 1, 1, 2, 2, 0, 0]
        model = dynroute.convert_resnet(dynroute.models.resnet20(), input_size=(3, 32, 32)).eval()
        with torch.no_grad():
            model(images)
        paths = dynroute.routing_paths(model)
        assert torch.equal(paths[0::2], paths[1::2])
        assert dynroute.consistency_loss(paths, num_views=2, margin=0.0).item() == 0.0


class TestDefaultTransforms:
    """Crop with 4-px padding and flip by default; crop only for SVHN."""

    @staticmethod
    def _types(transform: T.Compose) -> list[type]:
        return [type(step) for step in transform.transforms]

    def test_cifar_crops_and_flips(self) -> None:
        transform = train_transform("cifar10")
        assert self._types(transform)[:2] == [T.RandomCrop, T.RandomHorizontalFlip]
        assert transform.transforms[0].padding == 4

    @pytest.mark.parametrize("name", ["svhn", "SVHN"])
    def test_svhn_only_crops(self, name: str) -> None:
        types = self._types(train_transform(name))
        assert T.RandomCrop in types and T.RandomHorizontalFlip not in types

    @pytest.mark.parametrize("name", ["svhn_extra", "cifar-10", "imagenet"])
    def test_unknown_names_are_refused(self, name: str) -> None:
        with pytest.raises(ValueError, match=f"unknown dataset '{name}'.*'imagefolder'.*'svhn'"):
            train_transform(name)

    def test_imagefolder_crops_and_flips(self) -> None:
        assert T.RandomHorizontalFlip in self._types(train_transform("imagefolder"))

    def test_normalisation(self) -> None:
        image = Image.new("RGB", (32, 32), (124, 116, 104))
        out = eval_transform()(image)
        expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        assert torch.allclose(out[:, 0, 0], expected, atol=1e-6)

    def test_eval_resize(self) -> None:
        assert eval_transform(16)(Image.new("RGB", (40, 32))).shape == (3, 16, 16)


# (width, height) of a photo, a CIFAR image, a tall thumbnail and an image smaller than the crop
ANY_SIZES = [(500, 375), (32, 32), (20, 90), (12, 12)]


def _seeded(transform, image: Image.Image, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    return transform(image)


class TestAnyInputSize:
    """Every transform returns image_size x image_size crops whatever the size of the image it gets."""

    @pytest.mark.parametrize("size", ANY_SIZES)
    @pytest.mark.parametrize("dataset", ["imagefolder", "cifar10", "svhn", "mnist", "digits"])
    def test_train_crops_have_the_requested_size(self, dataset: str, size: tuple[int, int]) -> None:
        assert train_transform(dataset, image_size=64)(_image(0, size)).shape == (3, 64, 64)

    @pytest.mark.parametrize("size", ANY_SIZES)
    @pytest.mark.parametrize("crop_pct", [1.0, 0.875])
    def test_eval_crops_have_the_requested_size(self, size: tuple[int, int], crop_pct: float) -> None:
        assert eval_transform(64, crop_pct=crop_pct)(_image(0, size)).shape == (3, 64, 64)

    @pytest.mark.parametrize("size", ANY_SIZES)
    def test_imagefolder_takes_random_resized_crops(self, size: tuple[int, int]) -> None:
        reference = T.Compose(
            [T.RandomResizedCrop(64), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )
        image = _image(1, size)
        assert torch.equal(_seeded(train_transform("imagefolder", image_size=64), image), _seeded(reference, image))

    def test_a_dataset_at_another_size_is_resized_then_padded_and_cropped(self) -> None:
        reference = T.Compose(
            [
                T.Resize(64),
                T.CenterCrop(64),
                T.RandomCrop(64, padding=8),  # the paper's 4 px at 32 px, scaled with the image
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        image = _image(2)
        assert torch.equal(_seeded(train_transform("cifar10", image_size=64), image), _seeded(reference, image))

    @pytest.mark.parametrize("dataset, native", [("cifar10", 32), ("cifar100", 32), ("svhn", 32), ("mnist", 28)])
    def test_a_dataset_at_its_native_size_is_only_padded_and_cropped(self, dataset: str, native: int) -> None:
        steps = train_transform(dataset, image_size=native).transforms
        assert type(steps[0]) is T.RandomCrop and steps[0].size == (native, native) and steps[0].padding == 4
        assert not any(isinstance(step, (T.Resize, T.CenterCrop, T.RandomResizedCrop)) for step in steps)

    def test_eval_follows_crop_pct(self) -> None:
        reference = T.Compose(
            [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )
        image = _image(3, (500, 375))
        assert torch.equal(eval_transform(224, crop_pct=0.875)(image), reference(image))

    def test_padding_is_refused_for_random_resized_crops(self) -> None:
        with pytest.raises(ValueError, match="padding=4 applies to the pad-and-crop.*drop padding"):
            train_transform("imagefolder", image_size=64, padding=4)

    @pytest.mark.parametrize("crop_pct", [0.0, 1.5, float("nan")])
    def test_bad_crop_pct(self, crop_pct: float) -> None:
        with pytest.raises(ValueError, match="crop_pct must be in"):
            eval_transform(64, crop_pct=crop_pct)
