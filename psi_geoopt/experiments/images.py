r"""Image datasets held as ``uint8`` tensors: normalization, augmentation and batch loading.

:class:`ImageDataset` keeps the images of both splits as they are stored (``uint8``,
``(N, C, H, W)``) and makes float32 batches on demand:

- **normalization**: :math:`x = (p / 255 - \mu_c) / \sigma_c` per channel :math:`c`, where
  :math:`\mu_c` and :math:`\sigma_c` are the mean and the (population) standard deviation of
  the channel over every training pixel — for CIFAR-10 the usual
  ``(0.4914, 0.4822, 0.4465)``, ``(0.2470, 0.2435, 0.2616)``;
- **augmentation** ``crop-flip`` (training batches only): the image is padded with
  ``side // 8`` zero pixels on each border (4 for 32x32), a ``side`` x ``side`` window is cut
  at a uniformly random offset, and it is mirrored left–right with probability 1/2 — the
  ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` of CIFAR practice, applied to the
  whole batch at once;
- **batches**: the training batches follow the sampling of
  :func:`~psi_geoopt.experiments.sampling.minibatches` (a fresh permutation of the training set
  per epoch, incomplete batches dropped). The random numbers of the augmentation of step
  ``t`` are drawn from a generator seeded with ``(seed, t)``, so a run is the same with any
  number of data-loading workers. With ``workers > 0`` a :class:`torch.utils.data.DataLoader`
  builds whole batches in that many processes (automatic batching off: one item = one batch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .formats import DatasetError, ImageSplits
from .sampling import minibatches

__all__ = ["AUGMENTATIONS", "ImageDataset", "random_crop_flip"]

AUGMENTATIONS = ("none", "crop-flip")


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pad by ``side // 8`` zeros, crop back at a random offset, mirror with probability 1/2.

    ``images`` is a batch ``(B, C, H, W)`` of any dtype; every image gets its own offset and
    coin, drawn from ``generator``.
    """
    count, _, height, width = images.shape
    padding = min(height, width) // 8
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (count, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (count, 1), generator=generator)
    mirror = torch.rand(count, 1, generator=generator) < 0.5
    rows = top + torch.arange(height)
    columns = left + torch.arange(width)
    columns = torch.where(mirror, columns.flip(1), columns)
    batch = torch.arange(count)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], columns[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()


def _channel_statistics(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population standard deviation of each channel of ``uint8`` images, in [0, 1],
    computed exactly from the histogram of the 256 values."""
    values = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = np.bincount(images[:, channel].ravel(), minlength=256).astype(np.float64)
        mean = counts @ values / counts.sum()
        means.append(mean)
        stds.append(math.sqrt(counts @ (values - mean) ** 2 / counts.sum()))
    return torch.tensor(means, dtype=torch.float32), torch.tensor(stds, dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A train/test split of ``uint8`` images ``(N, C, H, W)`` with ``int64`` labels; see the
    module docstring for the normalization, augmentation and batches it makes."""

    name: str
    train_images: torch.Tensor
    train_targets: torch.Tensor
    test_images: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)

    @classmethod
    def from_splits(cls, name: str, splits: ImageSplits) -> ImageDataset:
        mean, std = _channel_statistics(splits.train_images)
        if not bool((std > 0).all()):
            raise DatasetError(f"{name}: a channel of the training images is constant")
        return cls(
            name,
            torch.from_numpy(np.ascontiguousarray(splits.train_images)),
            torch.from_numpy(splits.train_labels),
            torch.from_numpy(np.ascontiguousarray(splits.test_images)),
            torch.from_numpy(splits.test_labels),
            len(splits.classes),
            mean,
            std,
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_targets)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8`` images → float32, channel by channel standardized."""
        scaled = images.to(torch.float32) / 255
        return (scaled - self.mean[:, None, None]) / self.std[:, None, None]

    def example_inputs(self, count: int) -> torch.Tensor:
        """The first ``count`` training images, normalized, not augmented."""
        return self.normalize(self.train_images[:count])

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        *,
        augment: str = "none",
        workers: int = 0,
        pin_memory: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless normalized (and augmented) training batches, as described above."""
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        batches = _TrainingBatches(self, seed, augment == "crop-flip")
        keys = _StepKeys(self.num_train, batch_size, seed)
        if workers == 0 and not pin_memory:
            return map(batches.__getitem__, keys)
        loader = DataLoader(
            batches, batch_size=None, sampler=keys, num_workers=workers, pin_memory=pin_memory
        )
        return iter(loader)

    def evaluation_batches(
        self, split: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole ``split`` (``"train"`` or ``"test"``) in order, normalized, in
        ``max(1, N // batch_size)`` batches of ``batch_size`` to ``2 * batch_size - 1``
        images (none smaller, so BatchNorm with batch statistics sees batches like the
        training ones)."""
        images, targets = {
            "train": (self.train_images, self.train_targets),
            "test": (self.test_images, self.test_targets),
        }[split]
        for indices in torch.arange(len(targets)).tensor_split(max(1, len(targets) // batch_size)):
            yield self.normalize(images[indices]), targets[indices]


class _StepKeys(Iterable):
    """Endless ``(step, indices)`` pairs: the minibatches of :func:`minibatches`, numbered."""

    def __init__(self, num_samples: int, batch_size: int, seed: int):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        return enumerate(minibatches(self.num_samples, self.batch_size, self.seed), start=1)


class _TrainingBatches(torch.utils.data.Dataset):
    """Map ``(step, indices)`` → a normalized, possibly augmented training batch."""

    def __init__(self, dataset: ImageDataset, seed: int, augment: bool):
        self.dataset, self.seed, self.augment = dataset, seed, augment

    def __getitem__(self, key: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        step, indices = key
        images = self.dataset.train_images[indices]
        if self.augment:
            state = np.random.SeedSequence((self.seed, step)).generate_state(1, np.uint64)[0]
            images = random_crop_flip(images, torch.Generator().manual_seed(int(state)))
        return self.dataset.normalize(images), self.dataset.train_targets[indices]
