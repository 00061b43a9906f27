r"""The classification tasks of the experiments: bundled digits, a synthetic task, data on disk.

``digits`` and ``synthetic`` are held in memory, already normalized: images of shape
``(1, 8, 8)`` with 10 classes, fixed (the split and the synthetic data do not depend on the
training seed).

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), split
  75 % / 25 % stratified with a fixed seed, every pixel standardized with the training mean and
  standard deviation (constant pixels are only centred).
- ``synthetic``: Gaussian inputs :math:`x \sim \mathcal{N}(0, I_{64})` labelled by a fixed
  random teacher :math:`y = \arg\max_k\, (V \tanh(U x))_k` with :math:`U \in \mathbb{R}^{32
  \times 64}`, :math:`V \in \mathbb{R}^{10 \times 32}`; 2048 training and 1024 test points.

The other datasets are read from a directory (``data_dir``) in their standard formats, never
downloaded (see :mod:`~psi_geoopt.experiments.formats` for the files expected), and kept as
``uint8`` images (:class:`~psi_geoopt.experiments.images.ImageDataset`, which normalizes and
augments them):

- ``cifar10``, ``cifar100``: 50000 training and 10000 test RGB images, 32x32, 10 / 100 classes;
- ``mnist``, ``fashion-mnist``: 60000 training and 10000 test gray images, 28x28, 10 classes;
- ``imagefolder``: a class-per-folder tree of images, resized to ``image_size``.

Both kinds offer the same methods to the training loop: ``input_shape``, ``num_train``,
``example_inputs``, ``train_batches`` and ``evaluation_batches``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from .formats import DatasetError, read_cifar10, read_cifar100, read_image_folder, read_mnist
from .images import ImageDataset
from .sampling import minibatches

__all__ = [
    "DATASETS",
    "DEFAULT_IMAGE_SIZE",
    "IN_MEMORY_DATASETS",
    "ON_DISK_DATASETS",
    "Dataset",
    "DatasetError",
    "check_batch_size",
    "load_dataset",
]

IN_MEMORY_DATASETS = ("digits", "synthetic")
ON_DISK_DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder")
DATASETS = IN_MEMORY_DATASETS + ON_DISK_DATASETS
DEFAULT_IMAGE_SIZE = 32
_SPLIT_SEED = 0
_IMAGE_SHAPE = (1, 8, 8)
_NUM_CLASSES = 10


@dataclass(frozen=True)
class Dataset:
    """A fixed train/test split: float32 images ``(N, 1, 8, 8)`` and int64 labels ``(N,)``."""

    name: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int = _NUM_CLASSES

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_inputs.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_targets)

    def example_inputs(self, count: int) -> torch.Tensor:
        """The first ``count`` training inputs."""
        return self.train_inputs[:count]

    def train_batches(
        self,
        batch_size: int,
        seed: int,
        *,
        augment: str = "none",
        workers: int = 0,
        pin_memory: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches of :func:`~psi_geoopt.experiments.sampling.minibatches`,
        built in this process (``workers`` and ``pin_memory`` are accepted and unused; these
        inputs are not images, so ``augment`` must be ``"none"``)."""
        if augment != "none":
            raise ValueError(f"{self.name}: augment={augment!r} needs an image dataset")
        return self._train_batches(batch_size, seed)

    def _train_batches(
        self, batch_size: int, seed: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in minibatches(self.num_train, batch_size, seed):
            yield self.train_inputs[indices], self.train_targets[indices]

    def evaluation_batches(
        self, split: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole ``split`` (``"train"`` or ``"test"``) as one batch."""
        yield {
            "train": (self.train_inputs, self.train_targets),
            "test": (self.test_inputs, self.test_targets),
        }[split]


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    return (train - mean) / std, (test - mean) / std


def _as_dataset(name, train_x, train_y, test_x, test_y) -> Dataset:
    def images(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float32).reshape(-1, *_IMAGE_SHAPE)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(y, dtype=torch.int64)

    return Dataset(name, images(train_x), labels(train_y), images(test_x), labels(test_y))


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    inputs, targets = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(
        inputs, targets, test_size=0.25, stratify=targets, random_state=_SPLIT_SEED
    )
    train_x, test_x = _standardize(train_x, test_x)
    return _as_dataset("digits", train_x, train_y, test_x, test_y)


def _synthetic(num_train: int = 2048, num_test: int = 1024, hidden: int = 32) -> Dataset:
    rng = np.random.default_rng(_SPLIT_SEED)
    features = int(np.prod(_IMAGE_SHAPE))
    first = rng.standard_normal((hidden, features)) / np.sqrt(features)
    second = rng.standard_normal((_NUM_CLASSES, hidden)) / np.sqrt(hidden)
    inputs = rng.standard_normal((num_train + num_test, features))
    targets = (np.tanh(inputs @ first.T) @ second.T).argmax(axis=1)
    train, test = slice(num_train), slice(num_train, None)
    return _as_dataset("synthetic", inputs[train], targets[train], inputs[test], targets[test])


def load_dataset(
    name: str, data_dir: Path | str | None = None, image_size: int = DEFAULT_IMAGE_SIZE
) -> Dataset | ImageDataset:
    """The dataset called ``name`` (one of :data:`DATASETS`), built once per process.

    The datasets of :data:`ON_DISK_DATASETS` are read from ``data_dir`` (``imagefolder`` at
    ``image_size`` pixels a side); the others ignore both. Raises :class:`DatasetError`, with
    a one-line message naming the files expected, when the data is missing or malformed.
    """
    if name in IN_MEMORY_DATASETS:
        return _in_memory(name)
    if name not in ON_DISK_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    if data_dir is None:
        raise DatasetError(f"{name} is read from disk: it needs a data directory (--data-dir)")
    if not Path(data_dir).is_dir():
        raise DatasetError(f"{name}: the data directory {str(data_dir)!r} does not exist")
    if not (isinstance(image_size, int) and image_size >= 2):
        raise ValueError(f"image_size must be an integer >= 2, got {image_size!r}")
    size = image_size if name == "imagefolder" else DEFAULT_IMAGE_SIZE
    return _on_disk(name, Path(data_dir).resolve(), size)


@cache
def _in_memory(name: str) -> Dataset:
    return _digits() if name == "digits" else _synthetic()


@cache
def _on_disk(name: str, data_dir: Path, image_size: int) -> ImageDataset:
    readers = {
        "cifar10": lambda: read_cifar10(data_dir),
        "cifar100": lambda: read_cifar100(data_dir),
        "mnist": lambda: read_mnist(data_dir, "MNIST"),
        "fashion-mnist": lambda: read_mnist(data_dir, "FashionMNIST"),
        "imagefolder": lambda: read_image_folder(data_dir, image_size),
    }
    return ImageDataset.from_splits(name, readers[name]())


def check_batch_size(batch_size: int, datasets: Sequence[str], **location) -> str | None:
    """The reason ``--batch-size`` exceeds the training set of one of ``datasets``, else None
    (``location``: the ``data_dir`` and ``image_size`` of datasets read from disk)."""
    for name in datasets:
        samples = load_dataset(name, **location).num_train
        if batch_size > samples:
            return f"--batch-size {batch_size} exceeds the {samples} training samples of {name!r}"
    return None
