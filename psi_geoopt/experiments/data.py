r"""The classification tasks of the experiments: real digits and a synthetic teacher–student task.

Both give images of shape ``(1, 8, 8)`` with 10 classes, so every model runs on either, and
both are fixed: the split and the synthetic data do not depend on the training seed.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), split
  75 % / 25 % stratified with a fixed seed, every pixel standardized with the training mean and
  standard deviation (constant pixels are only centred).
- ``synthetic``: Gaussian inputs :math:`x \sim \mathcal{N}(0, I_{64})` labelled by a fixed
  random teacher :math:`y = \arg\max_k\, (V \tanh(U x))_k` with :math:`U \in \mathbb{R}^{32
  \times 64}`, :math:`V \in \mathbb{R}^{10 \times 32}`; 2048 training and 1024 test points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

__all__ = ["DATASETS", "Dataset", "check_batch_size", "load_dataset"]

DATASETS = ("digits", "synthetic")
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


@cache
def load_dataset(name: str) -> Dataset:
    """The dataset called ``name`` (one of :data:`DATASETS`), built once per process."""
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic()
    raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")


def check_batch_size(batch_size: int, datasets: Sequence[str]) -> str | None:
    """The reason ``--batch-size`` exceeds the training set of one of ``datasets``, else None."""
    for name in datasets:
        samples = len(load_dataset(name).train_targets)
        if batch_size > samples:
            return f"--batch-size {batch_size} exceeds the {samples} training samples of {name!r}"
    return None
